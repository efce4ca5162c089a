"""Multi-process runs: start-up of JAX's distributed runtime, and decisions all processes share.

Every process runs the same program on its block of each global batch (see
data/input_pipeline.py); jitted steps are collectives, so the processes must
also agree on everything that changes the sequence of steps, saves and
evaluations. The only such decision not already a function of the step is
the stop on SIGTERM/SIGINT, which reaches the processes at different times:
`stop_agreed` turns each process's flag into one answer for all.
"""

import re

import numpy as np

from diffvit_jax.errors import ConfigError, UserError

_ADDRESS = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")


def check_args(coordinator_address: str, num_processes: int | None,
               process_id: int | None) -> bool:
  """Validates the explicit start-up flags; True if they ask for an explicit initialization.

  Explicit means all three together (plain hosts); none of them means
  auto-detection (SLURM, Open MPI, cloud TPU), when `config.train.distributed` is set.
  """
  given = {"--coordinator_address": bool(coordinator_address),
           "--num_processes": num_processes is not None,
           "--process_id": process_id is not None}
  if not any(given.values()):
    return False
  if not all(given.values()):
    missing = ", ".join(name for name, ok in given.items() if not ok)
    raise ConfigError(
        "--coordinator_address, --num_processes and --process_id go together (a multi-host "
        f"run on plain hosts); {missing} missing. Give none of them on SLURM, where "
        "--config.train.distributed=True detects them.")
  if not _ADDRESS.match(coordinator_address):
    raise ConfigError(f"--coordinator_address={coordinator_address!r}: expected host:port of "
                      "process 0's machine, e.g. 10.0.0.1:12345.")
  if num_processes < 1:
    raise ConfigError(f"--num_processes={num_processes}: must be >= 1.")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id={process_id}: must be in [0, {num_processes}) "
                      f"for --num_processes={num_processes}.")
  return True


def initialize(distributed: bool, coordinator_address: str = "",
               num_processes: int | None = None, process_id: int | None = None) -> None:
  """Starts JAX's distributed runtime when asked for; must run before any other JAX call."""
  explicit = check_args(coordinator_address, num_processes, process_id)
  if not (explicit or distributed):
    return
  import jax

  kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id) if explicit else {}
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    where = (f"coordinator {coordinator_address}, process {process_id} of {num_processes}"
             if explicit else "auto-detected cluster (SLURM, Open MPI, ...)")
    raise UserError(
        f"Could not start JAX's distributed runtime ({where}): {str(e).splitlines()[0]}. "
        "Check that every process was started with the same coordinator address and "
        "process count and a distinct process id, that process 0 runs on the coordinator's "
        "host, and that its port is reachable from all hosts.") from e


def stop_agreed(step: int, signalled: bool, *, gather: bool) -> bool:
  """Whether every process stops after `step`: true on all of them, or on none.

  `signalled` is this process's own SIGTERM/SIGINT flag (the training loop's
  handler). With several processes the flags are gathered only when `gather`
  (a collective that waits for the step: the loop asks at its log, eval and save
  steps and every `train.stop_check_every` steps, where it synchronises anyway);
  every process passes the same `gather` for a step. A SIGTERM that came before
  that handler was installed was caught by JAX's preemption notifier instead;
  its sync point (a host-side check, made at every step) is agreed across processes too.
  """
  import jax

  if jax.process_count() == 1:
    return signalled
  from jax.experimental import multihost_utils

  try:
    if multihost_utils.reached_preemption_sync_point(step):
      return True
  except RuntimeError:  # No preemption service (e.g. jax_enable_preemption_service off).
    pass
  return gather and bool(multihost_utils.process_allgather(np.int32(signalled)).any())
