"""`python -m diffvit_jax.tools.bench`: the JSON summary of step and pipeline modes, no TF."""

import json
import os
import subprocess
import sys

import pytest

from diffvit_jax import cpu_runtime
from diffvit_jax.tools import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("arch", "params", "gflops_per_image", "batch", "images_per_sec", "step_ms", "compile_s",
          "device_kind", "num_devices", "dtype", "mfu")


def run_python(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)  # one CPU device, whatever the calling test session simulates
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def run_bench(*args):
  return run_python("-m", "diffvit_jax.tools.bench", *args, timeout=120)


def last_json(run):
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.strip().splitlines()[-1])


def test_step_mode_prints_all_fields():
  # A smaller digits model keeps the compile short; the step is the training one.
  summary = last_json(run_bench(
      "--config", "configs/digits.py:diffvit", "--batch", "16", "--steps", "2", "--warmup", "1",
      "--repeats", "1", "--config.model.width=32", "--config.model.depth=2",
      "--config.model.mlp_dim=64"))
  for field in FIELDS:
    assert field in summary, field
  assert summary["arch"] == "diffvit" and summary["batch"] == 16
  assert summary["dtype"] == "float32" and summary["num_devices"] == 1
  assert summary["device_kind"] == "cpu"
  assert summary["mfu"] is None  # no peak FLOP/s is known for a CPU
  for field in ("params", "gflops_per_image", "images_per_sec", "step_ms", "compile_s"):
    assert summary[field] > 0, field


def test_pipeline_mode_on_digits():
  summary = last_json(run_bench(
      "--config", "configs/digits.py:vit", "--pipeline", "--batch", "32", "--steps", "3",
      "--warmup", "1", "--repeats", "1"))
  assert summary["mode"] == "pipeline" and summary["images_per_sec"] > 0
  assert summary["mfu"] is None and summary["source"] == "digits"


def test_bad_config_is_one_clear_error():
  run = run_bench("--config", "configs/digits.py:vit", "--config.model.num_heads=5")
  assert run.returncode == 2
  assert "num_heads" in run.stderr and "Traceback" not in run.stderr


def test_importing_bench_does_not_import_tensorflow():
  code = ("import sys, diffvit_jax.tools.bench, diffvit_jax.training.steps; "
          "print('tensorflow' in sys.modules)")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H100 NVL", "bfloat16", 835e12),
    ("NVIDIA H200", "float32", 494.7e12),
    ("NVIDIA H200 NVL", "bfloat16", 835e12),
    ("NVIDIA GH200 480GB", "bfloat16", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-40GB", "float32", 156e12),
    ("NVIDIA A100-PCIE-40GB", "bfloat16", 312e12),
    ("NVIDIA A100 80GB PCIe", "bfloat16", 312e12),
    ("NVIDIA GeForce RTX 4090", "bfloat16", 165.2e12),
    ("NVIDIA GeForce RTX 4090", "float32", 82.6e12),
    ("NVIDIA RTX 6000 Ada Generation", "bfloat16", 364.2e12),
    ("NVIDIA L40", "bfloat16", 181e12),  # not the L4's 121 (a substring rule's answer)
    ("NVIDIA L40S", "bfloat16", 362e12),
    ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA A10", "bfloat16", 125e12),
    ("NVIDIA A10G", "bfloat16", 70e12),  # not the A10's 125
    ("TPU v5 lite", "bfloat16", 197e12),
    ("cpu", "float32", None),
    ("NVIDIA GeForce GTX 1080", "bfloat16", None),
    ("NVIDIA GeForce RTX 4090 D", "bfloat16", None),  # another card: no guess
    ("NVIDIA L4", "float16", None),
])
def test_peak_flops_table(kind, dtype, peak):
  assert bench.peak_flops_per_device(kind, dtype) == peak


def test_cpu_defaults_only_on_the_cpu(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not cpu_runtime.cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert cpu_runtime.cpu_only()


def test_compare_timm_times_both_frameworks_on_the_digits_model():
  # The JAX-vs-timm benchmark builds its steps from the same code as training: it must run.
  rows = last_json(run_python("benchmarks/compare_timm.py", "--protocols=", "--digits=8",
                              "--batch=8", "--rounds=1", "--steps=1", "--warmup=1"))
  assert [row["case"] for row in rows] == ["digits 8x8"]
  assert set(rows[0]["ms"]) == {"vit/jax", "vit/torch", "diffvit/jax", "diffvit/torch"}
  assert all(ms > 0 for ms in rows[0]["ms"].values())
  assert rows[0]["vit_jax_over_torch"] > 0 and rows[0]["diffvit_over_vit_jax"] > 0


def test_cpu_dense_ab_times_both_variants():
  rows = last_json(run_python("benchmarks/cpu_dense_ab.py", "--digits=8", "--archs=vit",
                               "--batch=8", "--steps=1", "--rounds=2"))
  assert [row["case"] for row in rows] == ["vit digits 8x8"]
  assert set(rows[0]["wall_ms"]) == {"cpu form", "autodiff"}
  assert all(ms > 0 for ms in rows[0]["wall_ms"].values())
  assert rows[0]["cpu_form_over_autodiff"] > 0


def test_attention_layer_times_every_path_and_part():
  run = run_python("benchmarks/attention_layer.py", "--shape=2,16,2,8", "--repeats=1",
                    "--parts")
  assert run.returncode == 0, run.stderr[-3000:]
  for line in ("jax einsum", "jax xla", "torch sdpa", "jax p^T do", "torch p k"):
    assert line in run.stdout, line
