"""Preemption, exact resume, checkpoint safety, divergence guard, config errors, determinism.

Every run here is a real subprocess of the entry point on a tiny digits model.
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

from diffvit_jax.training import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.width=32", "--config.model.depth=2", "--config.model.mlp_dim=64",
        "--config.train.batch_size=32", "--config.train.eval_batch_size=120",
        "--config.train.log_every=5", "--config.train.eval_every=1000",
        "--config.train.checkpoint_every=10", "--config.train.warmup_steps=5"]


def main_cmd(workdir, *overrides, config="configs/digits.py:diffvit"):
  tiny = TINY if config.startswith("configs/digits.py") else []
  return [sys.executable, "-m", "diffvit_jax.main", "--config", config,
          "--workdir", str(workdir), *tiny, *overrides]


def run_main(workdir, *overrides, env=None, **kwargs):
  return subprocess.run(main_cmd(workdir, *overrides, **kwargs), cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=env or _env())


def _env(**extra):
  return dict(os.environ, JAX_PLATFORMS="cpu", **extra)


def final_params(workdir):
  params, _, step = checkpointing.load_for_inference(str(workdir))
  import jax
  return step, [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def run_info(workdir):
  with open(os.path.join(workdir, "run_info.json")) as f:
    return json.load(f)


def last_scalar(workdir, tag):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  events = acc.Tensors(tag)
  return events[-1].step, float(np.asarray(
      __import__("tensorboard").util.tensor_util.make_ndarray(events[-1].tensor_proto)))


STEPS = "--config.train.steps=120"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = run_main(workdir, STEPS)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_sigterm_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(main_cmd(workdir, STEPS), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  # Wait until training is really under way (its first checkpoint exists), then preempt.
  while not (workdir / "checkpoints" / "10").exists():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert "Rerun the same command to resume" in stderr and "Traceback" not in stderr
  interrupted_step, _ = final_params(workdir)
  assert 10 <= interrupted_step < 120

  resumed = run_main(workdir, STEPS)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from the checkpoint at step {interrupted_step}" in resumed.stderr

  step_a, params_a = final_params(uninterrupted)
  step_b, params_b = final_params(workdir)
  assert step_a == step_b == 120
  for a, b in zip(params_a, params_b, strict=True):
    np.testing.assert_array_equal(a, b)
  assert run_info(workdir)["final_eval"] == run_info(uninterrupted)["final_eval"]
  assert last_scalar(workdir, "train/loss") == last_scalar(uninterrupted, "train/loss")


def test_same_seed_same_metrics_other_seed_differs(uninterrupted, tmp_path):
  again = run_main(tmp_path / "again", STEPS)
  other = run_main(tmp_path / "other", STEPS, "--config.train.seed=1")
  assert again.returncode == 0 and other.returncode == 0, other.stderr[-3000:]
  assert run_info(tmp_path / "again")["final_eval"] == run_info(uninterrupted)["final_eval"]
  assert run_info(tmp_path / "other")["final_eval"] != run_info(uninterrupted)["final_eval"]


def test_half_written_checkpoint_is_ignored(tmp_path):
  workdir = tmp_path / "run"
  first = run_main(workdir, "--config.train.steps=20")
  assert first.returncode == 0, first.stderr[-3000:]
  ckpts = workdir / "checkpoints"
  # A save killed half-way leaves orbax's temporary directory behind ...
  partial = ckpts / "30.orbax-checkpoint-tmp-1700000000"
  shutil.copytree(ckpts / "20", partial)
  for path in partial.rglob("*"):
    if path.is_file():
      path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
  # ... and a listed checkpoint whose array files were damaged afterwards is skipped too.
  shutil.copytree(ckpts / "20", tmp_path / "backup20")
  for path in (ckpts / "20" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  resumed = run_main(workdir, "--config.train.steps=30")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from the checkpoint at step 10" in resumed.stderr
  step, params = final_params(workdir)
  assert step == 30 and all(np.isfinite(p).all() for p in params)


def test_divergence_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  # A recipe that diverges at every step, whose first 10 steps are skipped (and saved): the
  # resume, which may change only what does not change the run, then stops at step 10.
  diverging = ("--config.train.learning_rate=1e30", "--config.train.schedule=constant",
               "--config.train.warmup_steps=0", "--config.train.grad_clip=0")
  good = run_main(workdir, "--config.train.steps=10", "--config.train.on_nonfinite=skip",
                  *diverging)
  assert good.returncode == 0, good.stderr[-3000:]
  bad = run_main(workdir, "--config.train.steps=40", *diverging)
  assert bad.returncode == 3, bad.stderr[-3000:]
  assert "Traceback" not in bad.stderr
  assert "diverged" in bad.stderr and "not finite at step 10" in bad.stderr
  assert "in a new --workdir" in bad.stderr
  assert "last good checkpoint is step 10" in bad.stderr
  step, params = final_params(workdir)
  assert step == 10 and all(np.isfinite(p).all() for p in params)


def test_skip_mode_carries_on(tmp_path):
  result = run_main(tmp_path / "run", "--config.train.steps=15",
                    "--config.train.learning_rate=1e30", "--config.train.schedule=constant",
                    "--config.train.warmup_steps=0", "--config.train.grad_clip=0",
                    "--config.train.on_nonfinite=skip")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Skipped non-finite steps" in result.stderr


BAD_CONFIGS = [
    (["--config.data.image_size=15"], "data.image_size"),
    (["--config.model.width=30"], "model.width"),
    (["--config.model.num_heads=1"], "model.num_heads"),
    (["--config.model.arch=transformer"], "model.arch"),
    (["--config.data.source=imagenet"], "data.source"),
    (["--config.data.train_corruption=frost", "--config.data.train_severity=3"],
     "data.train_corruption"),
    (["--config.train.steps=0", "--config.train.num_epochs=0"], "train.steps"),
    (["--config.train.learning_rate=0"], "train.learning_rate"),
    (["--config.train.learning_rate=-1e-3"], "train.learning_rate"),
]


@pytest.mark.parametrize("overrides,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_config_is_one_clear_error(overrides, field, tmp_path):
  result = run_main(tmp_path / "run", *overrides)
  assert result.returncode != 0
  assert field in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()  # No work was done.


def test_batch_not_divisible_by_devices(tmp_path):
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
  result = run_main(tmp_path / "run", "--config.train.batch_size=30", env=env)
  assert result.returncode != 0 and "train.batch_size" in result.stderr
  assert "4 devices" in result.stderr and "Traceback" not in result.stderr


def test_workdir_not_writable(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  result = run_main(blocker / "run")
  assert result.returncode != 0 and "--workdir" in result.stderr
  assert "Traceback" not in result.stderr


def test_missing_dataset_says_how_to_get_it(tmp_path):
  result = run_main(tmp_path / "run", f"--config.data.dir={tmp_path / 'empty'}",
                    config="configs/tiny_imagenet.py:vit_10m")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "tiny-imagenet-200.zip" in result.stderr


def test_checkpoints_of_another_model_are_refused(tmp_path):
  workdir = tmp_path / "run"
  first = run_main(workdir, "--config.train.steps=10")
  assert first.returncode == 0, first.stderr[-3000:]
  other = run_main(workdir, "--config.train.steps=20", "--config.model.width=48")
  assert other.returncode != 0 and "Traceback" not in other.stderr
  assert "model.width" in other.stderr and "32" in other.stderr and "48" in other.stderr
  step, _ = final_params(workdir)
  assert step == 10  # The refused run did not touch the checkpoints.


_FULL_DISK_AFTER_FIRST_SAVE = """
import os, runpy, shutil, sys
real, workdir = shutil.disk_usage, sys.argv[1]
def disk_usage(path):  # The disk fills up once the first checkpoint is written.
  usage = real(path)
  done = bool(os.listdir(os.path.join(workdir, "checkpoints")))
  return usage._replace(free=1000) if done else usage
shutil.disk_usage = disk_usage
sys.argv = ["diffvit_jax.main", *sys.argv[2:]]
runpy.run_module("diffvit_jax.main", run_name="__main__")
"""


def test_full_disk_is_one_paragraph_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  cmd = main_cmd(workdir, "--config.train.steps=30")
  result = subprocess.run([sys.executable, "-c", _FULL_DISK_AFTER_FIRST_SAVE, str(workdir),
                           *cmd[3:]], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=_env())
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith("error: Could not save the checkpoint of step 20")
  assert "not enough free space" in error and "the last good one is step 10" in error
  assert "MiB" in error and "rerun the same command" in error
  step, params = final_params(workdir)
  assert step == 10 and all(np.isfinite(p).all() for p in params)


def test_a_failed_asynchronous_save_is_one_paragraph(tmp_path, monkeypatch):
  from diffvit_jax import config_lib
  from diffvit_jax.errors import CheckpointError

  ckpt = checkpointing.Checkpointer(str(tmp_path), config_lib.base_config())

  def fail():
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ckpt.latest, "wait_until_finished", fail)
  with pytest.raises(CheckpointError) as error:
    ckpt.wait()
  message = str(error.value)
  assert "OSError" in message and "No space left on device" in message
  assert "the last good one is none" in message
