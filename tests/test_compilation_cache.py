"""The persistent compilation cache: a second identical run (a sweep's next seed) reads its
programs from the cache, says so, and starts sooner; the sweep points its runs at it."""

import json
import os
import subprocess
import sys
import types

from diffvit_jax import compilation_cache
from diffvit_jax.data import input_pipeline
from diffvit_jax.tools import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, cache_dir):
  cmd = [sys.executable, "-m", "diffvit_jax.main", "--config", "configs/digits.py:vit",
         "--workdir", str(workdir), "--config.train.steps=2", "--config.train.eval_every=2",
         "--config.train.log_every=2", "--config.train.checkpoint_every=2",
         "--config.model.depth=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "run_info.json") as f:
    return json.load(f), result.stderr


def test_second_identical_run_hits_the_cache_and_starts_sooner(tmp_path):
  cache_dir = tmp_path / "xla_cache"
  first, _ = _train(tmp_path / "seed0", cache_dir)
  second, log = _train(tmp_path / "seed1", cache_dir)
  assert first["compilation_cache"]["dir"] == str(cache_dir)
  assert first["compilation_cache"]["hits"] == 0 and first["compilation_cache"]["misses"] > 0
  assert second["compilation_cache"]["hits"] > 0
  assert second["compilation_cache"]["saved_s"] > 0
  assert second["setup_seconds"] < first["setup_seconds"]
  assert first["data_workers"] == 0  # digits: data.num_workers=0, recorded as resolved
  assert "compilation cache: " + str(cache_dir) in log and "hit(s)" in log
  # The same training: the cache gives the executables a fresh compile would.
  assert second["final_eval"] == first["final_eval"]


def test_counter_counts_only_its_own_span():
  counter = compilation_cache.Counter()
  compilation_cache.Counter._on_event("/jax/compilation_cache/cache_hits")
  compilation_cache.Counter._on_event("/jax/compilation_cache/cache_misses")
  compilation_cache.Counter._on_event("/jax/compilation_cache/something_else")
  later = compilation_cache.Counter()
  assert counter.summary()["hits"] == 1 and counter.summary()["misses"] == 1
  assert later.summary()["hits"] == 0


def test_sweep_runs_share_the_cache_and_the_host_cores(tmp_path, monkeypatch):
  monkeypatch.delenv(compilation_cache.DIR_ENV, raising=False)
  fv = types.SimpleNamespace(root=str(tmp_path / "runs"))
  slot = sweep.Slot("gpu 0", {"CUDA_VISIBLE_DEVICES": "0"}, 1)
  env = sweep.run_env(slot, fv, concurrent_runs=4)
  assert env[compilation_cache.DIR_ENV] == os.path.join(fv.root, "xla_cache")
  assert env[input_pipeline.CONCURRENT_RUNS_ENV] == "4"
  assert env["CUDA_VISIBLE_DEVICES"] == "0"
  # A cache the user chose wins.
  monkeypatch.setenv(compilation_cache.DIR_ENV, str(tmp_path / "mine"))
  assert sweep.run_env(slot, fv, 1)[compilation_cache.DIR_ENV] == str(tmp_path / "mine")
