"""A short digits run end to end: it learns, logs the named scalars, checkpoints, resumes."""

import json
import os
import subprocess
import sys

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir, steps, *flags):
  cmd = [sys.executable, "-m", "diffvit_jax.main", "--config", "configs/digits.py:diffvit",
         "--workdir", str(workdir), f"--config.train.steps={steps}",
         "--config.train.eval_every=100", "--config.train.log_every=50",
         "--config.train.checkpoint_every=100", *flags]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def scalars(workdir):
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  return {tag: [e.step for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}


def test_digits_run_learns_logs_checkpoints_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  first = train(workdir, 200)
  final = json.loads(first.stdout.strip().splitlines()[-1])
  assert final["top1"] > 0.5  # Chance is 0.1.

  logged = scalars(workdir)
  for tag in ("train/loss", "train/accuracy_vs_dominant_target", "train/learning_rate",
              "train/grad_norm", "train/images_per_sec", "steps_per_sec", "lambda/layer_1",
              "lambda/layer_4", "eval/loss", "eval/top1", "eval/top5"):
    assert tag in logged, f"{tag} missing from {sorted(logged)}"
  assert logged["eval/top1"] == [100, 200]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["100", "200"]
  assert os.listdir(workdir / "best")

  # Another microbatch count is the same run (the update is the whole-batch one).
  second = train(workdir, 250, "--config.train.microbatches=2")
  assert "Resumed from the checkpoint at step 200" in second.stderr
  logged = scalars(workdir)
  assert logged["eval/top1"] == [100, 200, 250]  # Not restarted from step 0.
  assert logged["train/loss"] == [50, 100, 150, 200, 250]
  with open(workdir / "run_info.json") as f:
    info = json.load(f)
  assert info["completed_steps"] == 250 and info["eval_step"] == 250
  # digits: 50 warmup steps, lr 5e-3 at its own batch 128, whatever --config.train.steps says.
  assert (info["total_steps"], info["warmup_steps"]) == (250, 50)
  assert info["peak_learning_rate"] == 5e-3
  assert "250 steps of global batch 128" in second.stderr
  assert "warmup 50 steps" in second.stderr and "peak learning rate 0.005" in second.stderr
  assert np.isfinite(info["final_eval"]["loss"])
  # What of the CPU runtime ran is part of the run's record, like the attention path.
  assert info["cpu_runtime"]["dense_weight_gradient"] == "from transposed x"
  assert info["cpu_runtime"]["max_steps_in_flight"] == 0
  # And so are the precision policy and the memory plan of the last session.
  assert info["precision"]["compute"] == "float32" and info["precision"]["params"] == "float32"
  plan = info["memory_plan"]
  assert plan["microbatches"] == 2 and plan["per_device_batch"] == 128
  assert plan["bytes_per_device"] > 0 and plan["device_bytes_source"] == "unknown"
  assert "Precision: compute float32" in second.stderr and "Memory plan: 2 micro" in second.stderr
