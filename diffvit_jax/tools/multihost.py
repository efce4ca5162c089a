r"""N processes of `diffvit_jax.main` on this machine, as a multi-host job would run them.

  python -m diffvit_jax.tools.multihost 2 --config configs/digits.py:vit --workdir runs/mh
  ./launch.sh multihost 2 --config configs/digits.py:vit --workdir runs/mh

"""

import argparse
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

PREEMPTED = 128 + signal.SIGTERM.value
TIMED_OUT = 124  # What `timeout` exits with when the time ran out.


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int, base: dict | None = None) -> dict:
  """The environment of each process: CPU devices, `devices_per_process` of them, gloo."""
  env = dict(os.environ if base is None else base)
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                     env.get("XLA_FLAGS", "")).strip()
  env["XLA_FLAGS"] = (f"{xla_flags} --xla_force_host_platform_device_count="
                      f"{devices_per_process}").strip()
  return env


def _workdir(main_args: Sequence[str]) -> str | None:
  for i, arg in enumerate(main_args):
    if arg == "--workdir" and i + 1 < len(main_args):
      return main_args[i + 1]
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
  return None


@dataclasses.dataclass
class Job:
  """The processes of one launch; `procs[i]` is `timeout` wrapping process i (its group leader)."""

  procs: list[subprocess.Popen]
  log_paths: list[str | None]

  def signal_all(self, signum: int, *, group: bool = False) -> None:
    """To each `timeout`, which passes it on once (a second SIGINT would mean: stop unsaved);
    with `group`, to `timeout` and its python child together (by their group id)."""
    for proc in self.procs:
      if proc.poll() is None:
        try:
          (os.killpg if group else os.kill)(proc.pid, signum)
        except ProcessLookupError:
          pass

  def kill(self) -> None:
    self.signal_all(signal.SIGKILL, group=True)
    for proc in self.procs:
      proc.wait()


def start(num_processes: int, main_args: Sequence[str], *, devices_per_process: int = 1,
          timeout_s: float = 7 * 24 * 3600, kill_after_s: float = 600,
          log_dir: str | None = None, chief_to_terminal: bool = True,
          python: str = sys.executable, env: dict | None = None) -> Job:
  """Starts the processes and returns at once (tests signal and kill them by PID).

  With `chief_to_terminal=False` process 0's output goes to `<log_dir>/process_0.log` too.
  """
  if num_processes < 1:
    raise ValueError(f"The number of processes must be >= 1, got {num_processes}.")
  address = f"127.0.0.1:{free_port()}"
  log_dir = log_dir or _workdir(main_args) or "."
  os.makedirs(log_dir, exist_ok=True)
  procs, log_paths = [], []
  try:
    for process_id in range(num_processes):
      command = ["timeout", "-k", f"{kill_after_s:g}", f"{timeout_s:g}", python, "-m",
                 "diffvit_jax.main", *main_args, f"--coordinator_address={address}",
                 f"--num_processes={num_processes}", f"--process_id={process_id}"]
      if process_id == 0 and chief_to_terminal:
        out, log_path = None, None
      else:
        log_path = os.path.join(log_dir, f"process_{process_id}.log")
        out = open(log_path, "ab")  # noqa: SIM115 - the child holds it; closed below.
      procs.append(subprocess.Popen(command, env=process_env(devices_per_process, env),
                                    stdout=out, stderr=subprocess.STDOUT if out else None,
                                    start_new_session=True))
      log_paths.append(log_path)
      if out is not None:
        out.close()
  except BaseException:
    Job(procs, log_paths).kill()
    raise
  return Job(procs, log_paths)


def _tail(path: str | None, lines: int = 15) -> str:
  if path is None:
    return ""
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


def wait(job: Job, *, error_grace_s: float = 10, preempt_grace_s: float = 300,
         say=lambda message: print(message, file=sys.stderr, flush=True)) -> int:
  """Waits for all processes; the first failure's exit code, else 0.

  After a failure the others get `error_grace_s` to fail on their own (a bad
  config fails everywhere) before being killed; after a preemption
  (exit 128 + 15) they get `preempt_grace_s` to save the same step.
  """
  first_failure, deadline = None, None
  while True:
    codes = [proc.poll() for proc in job.procs]
    if all(code is not None for code in codes):
      break
    if first_failure is None:
      failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
      if failed:
        first_failure = failed[0]
        process_id, code = first_failure
        preempted = code == PREEMPTED
        deadline = time.monotonic() + (preempt_grace_s if preempted else error_grace_s)
        if not preempted:
          why = (f"ran past its time limit ({TIMED_OUT})" if code == TIMED_OUT
                 else f"exited with code {code}")
          log = job.log_paths[process_id]
          say(f"multihost: process {process_id} {why}; stopping the other processes, which "
              "cannot go on without it." + (f" Its output is in {log}; the last lines:\n"
                                            f"{_tail(log)}" if log else ""))
    if deadline is not None and time.monotonic() > deadline:
      still = [i for i, code in enumerate(codes) if code is None]
      say(f"multihost: killing process(es) {still}, still running "
          f"{'after the preemption' if first_failure[1] == PREEMPTED else 'after the failure'}.")
      job.kill()
      break
    time.sleep(0.1)
  codes = [proc.wait() for proc in job.procs]
  if first_failure is not None:
    return first_failure[1]
  return next((code for code in codes if code != 0), 0)


def launch(num_processes: int, main_args: Sequence[str], **kwargs) -> int:
  """Starts the processes and waits for them, passing SIGTERM / SIGINT on to all of them.

  Each process gets CPU devices (--devices_per_process, default 1), the coordinator
  127.0.0.1:<a free port>, its --process_id, and gloo for the cross-process
  collectives; every flag after N that is not one of this launcher's own goes to
  main.py unchanged, so batch sizes stay global. Process 0 (the chief) writes to
  this terminal; the others' output (warnings and errors only, see main.py) goes
  to <log_dir>/process_<i>.log. Each runs under `timeout -k`, in its own process
  group. If one fails, the others are stopped (they would wait in a collective
  for it forever) and the launcher exits with its code. SIGTERM / SIGINT to the
  launcher is passed on to every process: they save a checkpoint at one step and
  exit with 128 + 15; rerunning the same command resumes there.
  """
  start_kwargs = {k: v for k, v in kwargs.items() if k not in ("error_grace_s",
                                                              "preempt_grace_s")}
  wait_kwargs = {k: v for k, v in kwargs.items() if k in ("error_grace_s", "preempt_grace_s")}
  job = start(num_processes, main_args, **start_kwargs)

  def forward(signum, frame):
    del frame
    job.signal_all(signum)

  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    return wait(job, **wait_kwargs)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    job.kill()  # A no-op unless this launcher itself was interrupted.


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="multihost", allow_abbrev=False,
      description="Runs N processes of diffvit_jax.main on this machine; other flags go to it.")
  parser.add_argument("num_processes", type=int)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--timeout", type=float, default=7 * 24 * 3600,
                      help="seconds before each process gets SIGTERM (it then saves and exits)")
  parser.add_argument("--kill_after", type=float, default=600,
                      help="seconds after a SIGTERM before SIGKILL: enough to finish the step "
                      "(compiling it, when the signal comes before the first) and save")
  parser.add_argument("--log_dir", default=None,
                      help="where the non-chief processes' output goes (default: --workdir)")
  args, main_args = parser.parse_known_args(argv)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("num_processes and --devices_per_process must be >= 1.")
  return launch(args.num_processes, main_args, devices_per_process=args.devices_per_process,
                timeout_s=args.timeout, kill_after_s=args.kill_after, log_dir=args.log_dir)


if __name__ == "__main__":
  sys.exit(main())
