"""The verdict: paired t-intervals over seeds, the reading, and which models are compared."""

import csv
import math
import os

import numpy as np
import pytest
from analysis_runs import rising_evals, write_synthetic_run

from diffvit_jax import config_lib
from diffvit_jax.models import stats
from diffvit_jax.reporting import events, report, tables, verdict
from diffvit_jax.reporting import runs as runs_lib


def read_csv(path: str) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622),
                                          (30, 2.0423)])
def test_t_quantile_matches_the_table(df, quantile):
  # Two-sided 95% critical values of Student's t, as printed in statistics tables.
  assert verdict.t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)


def test_t_quantile_one_sided_and_bad_arguments():
  assert verdict.t_quantile(0.95, 4) == pytest.approx(2.1318, abs=1e-4)
  with pytest.raises(ValueError):
    verdict.t_quantile(0.975, 0)


def test_paired_interval_by_hand():
  # d = 1, 3, 2, 4, 0 pp: mean 2 pp, s^2 = (1 + 1 + 0 + 4 + 4) / 4 = 2.5 pp^2, se = sqrt(0.5),
  # half-width = t_{0.975, 4} * sqrt(0.5) = 2.776445 * 0.707107 = 1.963243 pp.
  interval = verdict.paired_interval([0.01, 0.03, 0.02, 0.04, 0.00])
  assert interval.n == 5
  assert interval.mean == pytest.approx(0.02)
  assert interval.std == pytest.approx(math.sqrt(2.5e-4))
  assert interval.low == pytest.approx(0.02 - 0.01963243, abs=1e-7)
  assert interval.high == pytest.approx(0.02 + 0.01963243, abs=1e-7)
  assert verdict.reading(interval, "DiffViT") == "DiffViT better (5 seeds)"
  # Lower is better for a loss: the same interval reads as worse.
  assert verdict.reading(interval, "DiffViT", higher_is_better=False) == "DiffViT worse (5 seeds)"


def test_few_seeds_give_no_conclusion():
  for differences in ([-0.0222], [0.05, 0.06]):
    interval = verdict.paired_interval(differences)
    assert not interval.conclusive
    assert verdict.reading(interval, "DiffViT").startswith("no conclusion possible")


def _study(tmp_path, offsets: dict[int, float], *, vit_top1=0.6) -> list[str]:
  """Synthetic ViT and DiffViT runs per seed; DiffViT's final top-1 is the ViT's + offset."""
  workdirs = []
  for seed, offset in offsets.items():
    # Seed-to-seed spread shared by both archs (same data order): pairing removes it.
    base = vit_top1 + 0.03 * ((seed * 7) % 5 - 2)
    for arch, top1, params in (("vit", base, 10_130_000), ("diffvit", base + offset, 10_140_000)):
      evals = rising_evals(top1)
      evals[1000]["loss"] = 1.5 - top1  # Loss moves with accuracy.
      workdirs.append(write_synthetic_run(
          tmp_path / "runs" / arch / f"seed{seed}", name=f"{arch}_10m,v2", arch=arch,
          params=params, seed=seed, evals=evals))
  return workdirs


def _report(tmp_path, workdirs) -> tuple[list[dict], str]:
  out = str(tmp_path / "report")
  assert report.main([*workdirs, "--out", out]) == 0
  with open(os.path.join(out, "report.md")) as f:
    text = f.read()
  return read_csv(os.path.join(out, "verdict.csv")), text


def _verdict_table(text: str) -> str:
  """The verdict section of report.md: the first section, before the per-config results."""
  assert text.index("## Verdict") < text.index("## Results per config")
  return text[text.index("## Verdict"):text.index("## Results per config")]


def test_clear_difference_reads_better(tmp_path):
  offsets = {seed: 0.02 + 0.002 * (seed - 2) for seed in range(5)}  # +2 pp, +-0.4 pp
  rows, text = _report(tmp_path, _study(tmp_path, offsets))
  by_metric = {r["metric"]: r for r in rows}
  top1 = by_metric["final_top1"]
  assert int(top1["n_paired"]) == 5
  assert float(top1["mean"]) == pytest.approx(0.02, abs=1e-6)
  assert 0 < float(top1["ci_low"]) < 0.02 < float(top1["ci_high"])
  assert top1["reading"] == "DiffViT better (5 seeds)"
  # Lower loss for the better model: also "better".
  assert by_metric["final_loss"]["reading"] == "DiffViT better (5 seeds)"
  table = _verdict_table(text)
  assert "+2.00 pp" in table and "DiffViT better (5 seeds)" in table and "paired t" in table


def test_noise_around_zero_reads_no_detectable_difference(tmp_path):
  offsets = {0: 0.01, 1: -0.012, 2: 0.004, 3: -0.006, 4: 0.002}
  rows, text = _report(tmp_path, _study(tmp_path, offsets))
  top1 = next(r for r in rows if r["metric"] == "final_top1")
  assert float(top1["ci_low"]) < 0 < float(top1["ci_high"])
  assert top1["reading"] == "no detectable difference at 5 seeds"
  assert "no detectable difference at 5 seeds" in _verdict_table(text)


def test_one_seed_prints_no_bare_difference(tmp_path):
  rows, text = _report(tmp_path, _study(tmp_path, {0: -0.0222}))
  for row in rows:
    assert row["reading"].startswith("no conclusion possible: 1 paired seed")
    assert row["mean"] == "nan" and row["ci_low"] == "nan"
  table = _verdict_table(text)
  assert "no conclusion possible" in table
  assert "2.22" not in text.split("## Results per config")[0]
  differences = text[text.index("## Differential minus classic"):text.index("## Figures")]
  assert "2.22" not in differences and "no conclusion" in differences


def _fake_group(arch, params, seeds=(0, 1, 2), top1=0.5, model=None):
  runs = []
  for seed in seeds:
    config = dict(model=model or dict(depth=2), data=dict(image_size=8))
    info = dict(name=f"{arch}_digits", arch=arch, params=params, seed=seed, protocol="digits",
                config=config)
    run = runs_lib.Run(workdir=f"/runs/{arch}/{seed}", info=info, robustness=None,
                       scalars={"eval/top1": events.Series([10], [top1 + 0.01 * seed]),
                                "eval/loss": events.Series([10], [1.0])})
    run.size = "s"
    runs.append(run)
  return runs_lib.Group("digits", "s", arch, f"{arch}_digits", runs)


def test_only_parameter_matched_pairs_are_compared():
  vit = _fake_group("vit", 10_000_000)
  within = _fake_group("diffvit", 10_049_000)  # +0.49%
  pairs = tables.comparisons([vit, within])
  assert [(c.baseline.arch, c.model.arch, c.matched) for c in pairs] == [
      ("vit", "diffvit", True)]
  assert len(tables.verdict_rows(pairs)) == 2 and not tables.unmatched_rows(pairs)
  beyond = _fake_group("diffvit", 10_051_000)  # +0.51%
  pairs = tables.comparisons([vit, beyond])
  assert not pairs[0].matched
  assert not tables.verdict_rows(pairs) and not tables.difference_rows(pairs)
  assert len(tables.unmatched_rows(pairs)) == 1


def test_diffvit2_is_compared_apart_with_its_costs():
  shape = dict(width=64, depth=4, num_heads=4, mlp_dim=128, patch_size=2, num_classes=10)
  models = {arch: config_lib.model_config(arch=arch, **shape) for arch in
            ("vit", "diffvit", "diffvit2")}
  params = {arch: stats.count_params(m, 8)["total"] for arch, m in models.items()}
  groups = [_fake_group(arch, params[arch], model=m.to_dict()) for arch, m in models.items()]
  pairs = tables.comparisons(groups)
  assert [(c.model.arch, c.matched) for c in pairs] == [("diffvit", True),
                                                       ("diffvit2", False)]
  assert {r["arch"] for r in tables.verdict_rows(pairs)} == {"diffvit"}
  (row,) = tables.unmatched_rows(pairs)
  assert row["arch"] == "diffvit2" and row["baseline"] == "vit"
  assert row["params"] == params["diffvit2"] and row["baseline_params"] == params["vit"]
  assert row["param_gap"] == pytest.approx(params["diffvit2"] / params["vit"] - 1)
  assert row["train_gflops_per_image"] == pytest.approx(stats.gflops_per_image(
      models["diffvit2"], 8))
  assert row["gflops_gap"] > 0
  markdown = tables.unmatched_markdown([row])
  assert "DiffViT-v2 vs ViT" in markdown and f"{100 * row['param_gap']:+.1f}%" in markdown


def test_headline_is_final_and_best_is_one_evaluation(tmp_path):
  # Top-1 peaks at step 400; top-5 peaks at step 600; the last evaluation is at 800.
  evals = {200: dict(top1=0.50, top5=0.70, loss=2.0), 400: dict(top1=0.62, top5=0.80, loss=1.8),
           600: dict(top1=0.58, top5=0.90, loss=1.7), 800: dict(top1=0.55, top5=0.85, loss=1.9)}
  workdirs = [write_synthetic_run(tmp_path / "runs" / arch, name=f"{arch}_10m,v2", arch=arch,
                                  params=10_000_000, seed=0, evals=evals)
              for arch in ("vit", "diffvit")]
  summary = runs_lib.load_run(workdirs[0]).summary()
  assert (summary["final_top1"], summary["final_top5"], summary["final_loss"]) == (
      pytest.approx(0.55), pytest.approx(0.85), pytest.approx(1.9))
  assert (summary["best_top1"], summary["best_top5"], summary["best_step"]) == (
      pytest.approx(0.62), pytest.approx(0.80), 400)
  out = str(tmp_path / "report")
  assert report.main([*workdirs, "--out", out]) == 0
  (row, _) = read_csv(os.path.join(out, "results.csv"))
  assert float(row["best_top5_mean"]) == pytest.approx(0.80)
  with open(os.path.join(out, "results.md")) as f:
    header, _, first = f.read().splitlines()[:3]
  columns = [c.strip() for c in header.strip("|").split("|")]
  cells = dict(zip(columns, [c.strip() for c in first.strip("|").split("|")], strict=True))
  # The headline columns come first and hold the last evaluation.
  assert columns.index("final top-1 %") < columns.index("best-on-val top-1 %")
  assert (cells["final top-1 %"], cells["best-on-val top-1 %"], cells["its top-5 %"],
          cells["its step"]) == ("55.00", "62.00", "80.00", "400")
  with open(os.path.join(out, "report.md")) as f:
    assert "selected on the validation split" in f.read()


def test_cli_takes_run_dirs_and_out_as_flags(tmp_path, capsys):
  workdirs = _study(tmp_path, {0: 0.0})
  out = str(tmp_path / "elsewhere")
  assert report.main(["--out", out, *workdirs]) == 0  # Flags before or after the run dirs.
  assert os.path.exists(os.path.join(out, "report.md"))
  assert report.main([*workdirs, "--outt", out]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and "outt" in err and "Traceback" not in err
  assert np.isfinite(float(read_csv(os.path.join(out, "runs.csv"))[0]["final_top1"]))
