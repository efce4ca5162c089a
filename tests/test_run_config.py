"""A run's config read back from its workdir, and the evaluation modes that use it."""

import json
import os
import subprocess
import sys

import pytest
from analysis_runs import REPO, copy_run, digits_config, run_dir, trained_runs

from diffvit_jax.errors import CheckpointError
from diffvit_jax.training import checkpointing


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory):
  return trained_runs(tmp_path_factory)


def _as_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


@pytest.mark.parametrize("arch", ["vit", "diffvit"])
def test_the_run_config_is_the_trained_config(runs_root, arch):
  config = checkpointing.load_run_config(run_dir(runs_root, arch, 0))
  assert _as_json(config) == _as_json(digits_config(arch, 0))
  assert isinstance(config.data.mean, tuple)  # JSON lists are tuples again, as in the schema
  assert config.is_locked


def test_falls_back_to_the_checkpoint_config(runs_root, tmp_path):
  workdir = copy_run(runs_root, "diffvit", 0, tmp_path)
  path = os.path.join(workdir, checkpointing.RUN_INFO)
  with open(path) as f:
    info = json.load(f)
  del info["config"]
  with open(path, "w") as f:
    json.dump(info, f)
  config = checkpointing.load_run_config(workdir)
  assert _as_json(config) == _as_json(digits_config("diffvit", 0))


def test_a_directory_without_a_run_is_one_error(tmp_path):
  with pytest.raises(CheckpointError, match="no training run"):
    checkpointing.load_run_config(str(tmp_path))


def test_another_config_is_named_field_by_field():
  other = digits_config("vit", 0)
  other.model.width = 48
  with pytest.raises(CheckpointError, match="model.width: the run has 32, the config has 48"):
    checkpointing.check_same_run(other, digits_config("vit", 0), "RUN")


def _main(*args):
  return subprocess.run([sys.executable, "-m", "diffvit_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_eval_mode_needs_only_the_workdir(runs_root, tmp_path):
  workdir = copy_run(runs_root, "vit", 0, tmp_path)
  proc = _main("--workdir", workdir, "--mode", "eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  with open(os.path.join(workdir, checkpointing.RUN_INFO)) as f:
    final = json.load(f)["final_eval"]
  assert result["top1"] == pytest.approx(final["top1"], abs=1e-6)


def test_eval_mode_refuses_a_config_of_another_model(runs_root, tmp_path):
  workdir = copy_run(runs_root, "vit", 0, tmp_path)
  # The file's model is width 64; the run was trained at width 32.
  proc = _main("--config", "configs/digits.py:vit", "--workdir", workdir, "--mode", "eval")
  assert proc.returncode == 2
  assert "model.width" in proc.stderr and "Traceback" not in proc.stderr


def test_train_mode_needs_a_config(tmp_path):
  proc = _main("--workdir", str(tmp_path / "run"))
  assert proc.returncode == 2
  assert "--config" in proc.stderr and "Traceback" not in proc.stderr
