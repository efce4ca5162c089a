"""Two training processes on this machine (gloo collectives on the CPU) against one process
with two simulated devices: same model, every validation example once, checkpoints that
either process count resumes, chief-only logs, and one agreed stop step on SIGTERM.

All runs share one small digits config whose per-example randomness is all on (drop-path,
dropout, Mixup/CutMix), so a run that depended on how the global batch is split would differ.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from diffvit_jax.tools import multihost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
FLAGS = ["--config", "configs/digits.py:vit", f"--config.train.steps={STEPS}",
         "--config.train.batch_size=32", "--config.train.eval_every=4",
         "--config.train.checkpoint_every=4", "--config.train.log_every=4",
         "--config.train.warmup_steps=2", "--config.model.depth=2", "--config.model.width=32",
         "--config.model.num_heads=2", "--config.model.mlp_dim=64",
         "--config.model.stoch_depth=0.5", "--config.model.dropout=0.1",
         "--config.train.mixup_alpha=0.8", "--config.train.cutmix_alpha=1.0"]
NUM_EVAL = 360  # digits: 1797 images, 1437 for training.
TIMEOUT_S = 300


def _env():
  return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_two(workdir, *, wait=True):
  """Two processes, one CPU device each; their output in <workdir>/process_<i>.log."""
  job = multihost.start(2, [*FLAGS, "--workdir", str(workdir)], timeout_s=TIMEOUT_S,
                        kill_after_s=TIMEOUT_S, chief_to_terminal=False, env=_env())
  if not wait:
    return job
  try:
    codes = [proc.wait(timeout=TIMEOUT_S + 40) for proc in job.procs]
  finally:
    job.kill()
  assert codes == [0, 0], _logs(workdir)
  return _final(workdir)


def run_one(workdir):
  """One process with two simulated devices, no distributed runtime."""
  env = multihost.process_env(2, _env())
  proc = subprocess.Popen(
      ["timeout", "-k", str(TIMEOUT_S), str(TIMEOUT_S), sys.executable, "-m", "diffvit_jax.main",
       *FLAGS, "--workdir", str(workdir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    _, err = proc.communicate(timeout=TIMEOUT_S + 40)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert proc.returncode == 0, err[-3000:]
  return _final(workdir)


def _logs(workdir):
  return "\n".join(f"--- process {i}:\n{multihost._tail(str(workdir / f'process_{i}.log'), 25)}"
                   for i in range(2))


def _final(workdir):
  with open(workdir / "run_info.json") as f:
    info = json.load(f)
  assert info["completed_steps"] == STEPS
  return info


def _assert_same_eval(a, b):
  for key in ("loss", "top1", "top5"):
    np.testing.assert_allclose(a["final_eval"][key], b["final_eval"][key], rtol=2e-5,
                               err_msg=key)


def _rewind(src, dst, step):
  """A copy of run `src` as it was when its checkpoint at `step` was the latest."""
  shutil.copytree(src, dst)
  for sub in ("checkpoints", "best"):
    for name in os.listdir(dst / sub):
      if name.isdigit() and int(name) > step:
        shutil.rmtree(dst / sub / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  return {"root": root, "two": run_two(root / "two"), "one": run_one(root / "one")}


def test_two_processes_train_what_one_process_with_two_devices_does(runs):
  two, one, workdir = runs["two"], runs["one"], runs["root"] / "two"
  _assert_same_eval(two, one)
  assert two["eval_examples"] == one["eval_examples"] == NUM_EVAL
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]  # One per step, no leftovers.
  assert len([f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]) == 1
  chief, other = (open(workdir / f"process_{i}.log").read() for i in range(2))
  assert "train/loss=" in chief and "eval/top1=" in chief
  assert "train/loss=" not in other and "parameters" not in other


def test_each_process_count_resumes_the_others_checkpoints(runs):
  root = runs["root"]
  _rewind(root / "one", root / "one_then_two", 4)
  _assert_same_eval(run_two(root / "one_then_two"), runs["two"])
  assert "Resumed from the checkpoint at step 4" in open(
      root / "one_then_two" / "process_0.log").read()
  _rewind(root / "two", root / "two_then_one", 4)
  _assert_same_eval(run_one(root / "two_then_one"), runs["one"])


def test_sigterm_to_one_process_stops_all_at_one_step_and_resumes(runs):
  workdir = runs["root"] / "sigterm"
  job = run_two(workdir, wait=False)
  try:
    chief_log = workdir / "process_0.log"
    deadline = time.monotonic() + TIMEOUT_S
    # Logged just before the first step, whose compilation leaves time for the signal.
    while "device(s)." not in (open(chief_log).read() if chief_log.exists() else ""):
      assert time.monotonic() < deadline and job.procs[0].poll() is None, _logs(workdir)
      time.sleep(0.05)
    os.kill(job.procs[1].pid, signal.SIGTERM)  # `timeout` passes it on to process 1.
    codes = [proc.wait(timeout=TIMEOUT_S) for proc in job.procs]
  finally:
    job.kill()
  assert codes == [multihost.PREEMPTED] * 2, _logs(workdir)
  stopped = sorted(int(name) for name in os.listdir(workdir / "checkpoints"))[-1]
  assert 0 < stopped < STEPS
  for i in range(2):
    assert f"at step {stopped}/{STEPS}: saved a checkpoint" in open(
        workdir / f"process_{i}.log").read()
  _assert_same_eval(run_two(workdir), runs["two"])
  assert f"Resumed from the checkpoint at step {stopped}" in open(
      workdir / "process_0.log").read()


def test_a_failed_process_stops_the_others_with_a_message(tmp_path):
  log = tmp_path / "process_1.log"
  log.write_text("error: config.train.batch_size: not divisible\n")
  job = multihost.Job(
      procs=[subprocess.Popen(["sleep", "60"], start_new_session=True),
             subprocess.Popen(["sh", "-c", "exit 2"], start_new_session=True)],
      log_paths=[None, str(log)])
  messages = []
  try:
    start = time.monotonic()
    code = multihost.wait(job, error_grace_s=0.5, say=messages.append)
  finally:
    job.kill()
  assert code == 2 and time.monotonic() - start < 30
  assert job.procs[0].returncode == -signal.SIGKILL
  assert "process 1 exited with code 2" in messages[0] and "batch_size" in messages[0]


def test_start_up_flags_are_checked_before_jax_starts():
  from diffvit_jax import distributed
  from diffvit_jax.errors import ConfigError

  assert not distributed.check_args("", None, None)
  assert distributed.check_args("127.0.0.1:1234", 2, 1)
  for args, message in ((("10.0.0.1:1", 2, None), "--process_id missing"),
                        (("10.0.0.1", 2, 0), "host:port"),
                        (("10.0.0.1:1", 0, 0), "num_processes=0"),
                        (("10.0.0.1:1", 2, 2), r"process_id=2: must be in \[0, 2\)")):
    with pytest.raises(ConfigError, match=message):
      distributed.check_args(*args)


def test_stop_flags_are_gathered_only_at_the_steps_that_ask(monkeypatch):
  """Between log/eval/save steps nothing waits for the devices: no per-step collective."""
  import jax
  from jax.experimental import multihost_utils

  from diffvit_jax import distributed

  gathered, polled = [], []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: gathered.append(int(x)) or np.array([x, 1]))
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: polled.append(step) or False)
  stops = [distributed.stop_agreed(step, False, gather=step % 4 == 0) for step in range(1, 9)]
  assert polled == list(range(1, 9))  # The preemption sync point: host-side, every step.
  assert len(gathered) == 2  # Steps 4 and 8 only.
  assert stops == [False, False, False, True, False, False, False, True]  # The other's flag.
