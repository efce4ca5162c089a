"""`python -m diffvit_jax.tools.describe`: overview, JSON summary line, clean config errors."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from diffvit_jax.models import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def describe(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "diffvit_jax.tools.describe", *args], cwd=REPO,
                        env=env,
                        capture_output=True, text=True, timeout=300)


def _load_config(arg):
  spec = importlib.util.spec_from_file_location(
      "tiny_imagenet_config", os.path.join(REPO, "configs", "tiny_imagenet.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_describe_prints_overview_and_json_summary():
  run = describe("--config", "configs/tiny_imagenet.py:diffvit_20m")
  assert run.returncode == 0, run.stderr
  lines = run.stdout.strip().splitlines()
  assert any("block_0/attn/lambda_q1" in line for line in lines)  # the overview table
  summary = json.loads(lines[-1])
  config = _load_config("diffvit_20m")
  counts = stats.count_params(config.model, config.data.image_size)
  assert summary["params"] == counts["total"]
  assert summary["non_embedding_params"] == counts["non_embedding"]
  assert summary["arch"] == "diffvit"
  assert summary["tokens"] == stats.num_tokens(config.model, config.data.image_size) == 576
  assert (summary["width"], summary["depth"], summary["heads"]) == (384, 11, 12)
  assert summary["gflops_per_image"] == pytest.approx(
      stats.gflops_per_image(config.model, config.data.image_size), rel=1e-4)


def test_describe_applies_overrides_and_reports_diffvit2_extra():
  run = describe("--config", "configs/tiny_imagenet.py:diffvit2_10m,seed", "--config.model.depth=4")
  assert run.returncode == 0, run.stderr
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  assert summary["depth"] == 4 and summary["tokens"] == 65
  assert summary["extra_params_vs_vit"] == 4 * (320 * 320 + 320 * 5)  # seed: no attention biases


@pytest.mark.parametrize("override", ["--config.model.num_heads=7", "--config.model.num_heads=3"])
def test_bad_override_is_a_clean_error(override):
  # 384 / 7 is not an integer; 3 heads divide 384 but cannot be paired.
  run = describe("--config", "configs/tiny_imagenet.py:diffvit_20m", override)
  assert run.returncode == 2
  assert "num_heads" in run.stderr
  assert "Traceback" not in run.stderr
