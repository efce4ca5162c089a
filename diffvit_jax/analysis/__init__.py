"""Reading finished (or running) training workdirs: events, run summaries, plots, tables.

Shared by `diffvit_jax.report` and `diffvit_jax.robustness`. Nothing here
trains or evaluates; everything reads what the trainer wrote.
"""
