"""Input data: the Tiny ImageNet TFDS builder, other sources, the grain pipeline.

`input_pipeline` is what the trainer calls; `sharding` turns host batches into
globally sharded arrays. Nothing here has side effects at import: grain
workers start with `spawn` and re-import these modules.
"""
