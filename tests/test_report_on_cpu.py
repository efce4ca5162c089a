"""The report runs on the CPU and starts no JAX backend: a sweep's GPUs stay with its runs."""

import csv
import json
import os
import subprocess
import sys

import pytest
from analysis_runs import digits_config, rising_evals, write_synthetic_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the report as `python -m` does, then prints the JAX platforms it was left with and the
# backends it started (at exit, whatever its exit code).
_RUN_AS_MAIN = """
import atexit, json, os, runpy, sys

def show():
  from jax._src import xla_bridge
  print(json.dumps({"platforms": os.environ.get("JAX_PLATFORMS"),
                    "backends": sorted(xla_bridge._backends)}))

atexit.register(show)
sys.argv = ["report", *sys.argv[1:]]
runpy.run_module("diffvit_jax.reporting.report", run_name="__main__")
"""


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  dirs = []
  for arch in ("vit", "diffvit"):
    for seed in (0, 1):
      config = json.loads(digits_config(arch, seed).to_json_best_effort())
      dirs.append(write_synthetic_run(
          root / f"{arch}_{seed}", name=f"{arch}_digits", arch=arch, params=1000, seed=seed,
          evals=rising_evals(0.5 + 0.01 * seed), protocol="digits", config=config))
  return dirs


@pytest.mark.parametrize("platforms", [None, "cuda"])
def test_report_starts_no_backend(workdirs, tmp_path, platforms):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  if platforms:  # What launch.sh exported before the sweep's report: it must not matter.
    env["JAX_PLATFORMS"] = platforms
  out = tmp_path / "report"
  result = subprocess.run([sys.executable, "-c", _RUN_AS_MAIN, *workdirs, "--out", str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  state = json.loads(result.stdout.strip().splitlines()[-1])
  assert state == {"platforms": "cpu", "backends": []}
  # The report did count FLOPs from the runs' configs (models/stats.py, via jax.eval_shape).
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert rows and all(float(row["train_gflops_per_image"]) > 0 for row in rows)


def test_parameter_counts_start_no_backend():
  script = ("from diffvit_jax import config_lib; from diffvit_jax.models import stats; "
            "from jax._src import xla_bridge; "
            "n = stats.count_params(config_lib.model_config(arch='diffvit'), 96)['total']; "
            "print(n, sorted(xla_bridge._backends))")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  count, backends = result.stdout.split(maxsplit=1)
  assert int(count) > 1_000_000 and backends.strip() == "[]"
