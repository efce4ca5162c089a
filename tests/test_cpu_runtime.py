"""The bound on train steps in flight: which steps are waited for, and when."""

import jax
import pytest

from diffvit_jax import cpu_runtime


class FakeStepOutput:
  def __init__(self, name, log):
    self.name, self.log = name, log

  def block_until_ready(self):
    self.log.append(self.name)
    return self


@pytest.mark.parametrize("limit, waited", [
    (None, []),  # no bound: never waits
    (0, ["s0", "s1", "s2", "s3"]),  # waits for each step right after dispatching it
    (2, ["s0", "s1"]),  # keeps the two newest unfinished
])
def test_step_queue_waits_for_the_oldest_steps(limit, waited):
  log = []
  queue = cpu_runtime.StepQueue(limit)
  for i in range(4):
    queue.push(FakeStepOutput(f"s{i}", log))
  assert log == waited


def test_cpu_waits_for_every_step():
  # On XLA:CPU each queued step holds its own temporaries (RESULTS.md: 3.6x the memory).
  assert jax.default_backend() == "cpu"
  assert cpu_runtime.max_steps_in_flight() == 0
