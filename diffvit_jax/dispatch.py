"""How far the host may run ahead of the devices when dispatching train steps.

JAX dispatches asynchronously, and the train loop waits for results only when
it logs, evaluates or saves. On GPUs and TPUs queued steps cost nothing. On
XLA:CPU they cost a lot: each queued execution holds its own temp buffer (all
of its intermediates), and queued steps slow the running one. v2-protocol ViT
10m, batch 32, 4 steps (benchmarks/RESULTS.md):

  steps left unfinished after a dispatch   ms/step   peak RSS
  no limit (JAX's default)                 16,656    23.7 GB
  1                                        14,284    18.0 GB
  0 (wait for each step)                   10,390     6.5 GB

So on the CPU the loop waits for every step before dispatching the next; the
host has nothing useful to do meanwhile (the input pipeline runs in its own
threads). Elsewhere there is no limit.
"""

import collections

import jax

CPU_STEPS_IN_FLIGHT = 0


def max_steps_in_flight() -> int | None:
  """Steps that may stay unfinished after a dispatch returns; None for no limit."""
  return CPU_STEPS_IN_FLIGHT if jax.default_backend() == "cpu" else None


class StepQueue:
  """Waits for the oldest dispatched steps while more than `limit` are unfinished."""

  def __init__(self, limit: int | None):
    self._limit = limit
    self._pending = collections.deque()

  def push(self, outputs) -> None:
    """Records a step's outputs (not donated ones) and waits while too many are queued."""
    if self._limit is None:
      return
    self._pending.append(outputs)
    while len(self._pending) > self._limit:
      jax.block_until_ready(self._pending.popleft())
