"""`./launch.sh clutter`'s sweep, in small: tiny models, 2 levels, 2 seeds, 4 steps, 2 CPU slots.

What launch.sh runs (tools/sweep.py --study clutter), with the study's own report: the
verdict per level with Holm, the interaction as the trend against the level, the attention
shares of both archs per layer, and the two figures.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from analysis_runs import rising_evals, write_synthetic_run

from diffvit_jax.reporting import report, secondary, verdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.width=16", "--config.model.depth=1", "--config.model.mlp_dim=32",
        "--config.train.steps=4", "--config.train.warmup_steps=1",
        "--config.train.eval_every=4", "--config.train.checkpoint_every=4",
        "--config.train.log_every=2", "--config.train.batch_size=32"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp("clutter")
  command = [sys.executable, "-m", "diffvit_jax.tools.sweep", "--study", "clutter",
             "--protocol", "clutter", "--sizes", "0 8", "--seeds", "0 1", "--devices", "cpu:2",
             "--root", str(root / "runs"), "--reports", str(root / "report"), *TINY]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return root, result.stdout


def _csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_the_design_is_written_first_with_one_comparison_per_level(study):
  root, out = study
  with open(root / "runs" / "clutter" / "study.json") as f:
    design = json.load(f)
  assert [p["size"] for p in design["family"]] == ["0 fragments", "8 fragments"]
  assert design["planned_seeds"] == [0, 1]
  assert out.index("Study manifest written") < out.index("== started")
  # The two slots ran on disjoint cores (the runs record them).
  with open(root / "runs" / "clutter" / "vit_0" / "seed0" / "run_info.json") as f:
    info = json.load(f)
  assert info["config"]["data"]["clutter"]["fragments"] == 0
  if len(os.sched_getaffinity(0)) >= 2:
    assert isinstance(info["cpu_runtime"]["cores"], list)


def test_the_report_gives_the_verdict_per_level_and_the_attention_shares(study):
  root, _ = study
  report = root / "report"
  verdict = [r for r in _csv(report / "verdict.csv") if r["role"] == "primary"]
  assert sorted(r["size"] for r in verdict) == ["0 fragments", "8 fragments"]
  # Two seeds are below the verdict's three: each level is in the family, read as too few.
  assert all("at least 3 needed" in r["reading"] for r in verdict), verdict
  rows = _csv(report / "attention.csv")
  shares = [r for r in rows if r["kind"] in ("target", "clutter", "empty")]
  assert {(r["level"], r["role"]) for r in shares} == {
      (level, role) for level in ("0 fragments", "8 fragments")
      for role in ("baseline", "model", "difference")}
  # Per layer and arch, the three shares add up to the whole row (A, or its DiffViT form).
  for level in ("0 fragments", "8 fragments"):
    for role in ("baseline", "model"):
      total = sum(float(r["share_mean"]) for r in shares
                  if (r["level"], r["role"], r["layer"]) == (level, role, "1"))
      assert total == pytest.approx(1.0, abs=1e-6)
  clutter_at_0 = [float(r["share_mean"]) for r in shares
                  if r["level"] == "0 fragments" and r["kind"] == "clutter"]
  assert clutter_at_0 and all(v == 0 for v in clutter_at_0)
  text = (report / "report.md").read_text()
  assert "Across levels" in text
  for figure in ("accuracy_levels.png", "attention_share.png"):
    assert (report / figure).stat().st_size > 10_000


def test_the_interaction_is_the_slope_of_the_paired_difference_against_the_level(tmp_path):
  """Synthetic finished runs at 3 levels x 3 seeds: the trend row is the least-squares slope of
  the per-level mean differences against fragments, per fragment, with a t-interval."""
  workdirs, means = [], []
  for level in (0, 4, 8):
    diffs = []
    for seed in range(3):
      base = 0.95 - 0.01 * level + 0.002 * seed
      gain = 0.001 * level + 0.003 * ((seed * 2) % 3 - 1)
      diffs.append(gain)
      for arch, top1, params in (("vit", base, 1000), ("diffvit", base + gain, 1002)):
        config = dict(model=dict(depth=2), data=dict(image_size=48),
                      analysis=dict(level=f"{level} fragments"))
        workdirs.append(write_synthetic_run(
            tmp_path / f"{arch}_{level}" / f"seed{seed}", name=f"{arch}_clutter{level},clutter",
            arch=arch, params=params, seed=seed, evals=rising_evals(top1), protocol="clutter",
            config=config))
    means.append(np.mean(diffs))
  written = report.write_report(workdirs, str(tmp_path / "report"))
  rows = _csv(written["secondary.csv"])
  trend = [r for r in rows if r["kind"] == "trend"]
  assert len(trend) == 1 and trend[0]["per"] == "fragment"
  slope = verdict.slope_weights([0, 4, 8]) @ np.array(means)
  assert float(trend[0]["estimate"]) == pytest.approx(slope, rel=1e-4)
  assert float(trend[0]["low"]) < slope < float(trend[0]["high"])
  verdicts = [r for r in _csv(written["verdict.csv"]) if r["role"] == "primary"]
  assert [r["size"] for r in verdicts] == ["0 fragments", "4 fragments", "8 fragments"]
  assert {r["p_holm"] != "" for r in verdicts} == {True}
  text = (tmp_path / "report" / "report.md").read_text()
  assert "change of the difference per fragment" in text and "Across levels" in text
  assert secondary.level_value("16 fragments") == 16.0
  assert (tmp_path / "report" / "accuracy_levels.png").stat().st_size > 10_000
