"""The verdict: primary endpoint with Holm, TOST, power, per-image evidence, admission."""

import csv
import json
import math
import os

import numpy as np
import pytest
from analysis_runs import correct_images, digits_config, rising_evals, write_synthetic_run
from scipy import stats as scipy_stats

from diffvit_jax import config_lib
from diffvit_jax.errors import DataError, UserError
from diffvit_jax.models import stats
from diffvit_jax.reporting import events, manifest, report, secondary, tables, verdict
from diffvit_jax.reporting import runs as runs_lib


def read_csv(path: str) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


def test_paired_interval_by_hand():
  # d = 1, 3, 2, 4, 0 pp: mean 2 pp, s^2 = (1 + 1 + 0 + 4 + 4) / 4 = 2.5 pp^2, se = sqrt(0.5),
  # half-width = t_{0.975, 4} * sqrt(0.5) = 2.776445 * 0.707107 = 1.963243 pp.
  interval = verdict.paired_interval([0.01, 0.03, 0.02, 0.04, 0.00])
  assert interval.n == 5
  assert interval.mean == pytest.approx(0.02)
  assert interval.std == pytest.approx(math.sqrt(2.5e-4))
  assert interval.low == pytest.approx(0.02 - 0.01963243, abs=1e-7)
  assert interval.high == pytest.approx(0.02 + 0.01963243, abs=1e-7)
  # t = 2 / sqrt(0.5) = 2.828427 on 4 df.
  assert verdict.paired_t_p([0.01, 0.03, 0.02, 0.04, 0.00]) == pytest.approx(
      2 * scipy_stats.t.sf(2.828427, 4), rel=1e-5)


def test_few_seeds_give_no_conclusion():
  for differences in ([-0.0222], [0.05, 0.06]):
    result = verdict.primary(differences)
    assert not result.interval.conclusive and result.status == "too_few"
    assert verdict.primary_reading(result, "DiffViT").startswith("no conclusion possible")


IMAGES = 1000  # validation images of the synthetic runs: one image is 0.1 pp


def _study(tmp_path, offsets: dict[int, float], *, vit_top1=0.6, size="10m",
           params=10_130_000) -> list[str]:
  """Synthetic ViT and DiffViT runs per seed; DiffViT's final top-1 is the ViT's + offset.

  Each run has a per_example.npz whose mean is exactly its final top-1.
  """
  workdirs = []
  rng = np.random.default_rng(len(offsets))
  for seed, offset in offsets.items():
    # Seed-to-seed spread shared by both archs (same data order): pairing removes it.
    base = vit_top1 + 0.03 * ((seed * 7) % 5 - 2)
    for arch, top1, count in (("vit", base, params), ("diffvit", base + offset, params + 10_000)):
      correct = correct_images(top1, IMAGES, rng)
      top1 = float(correct.mean())
      evals = rising_evals(top1)
      evals[1000]["loss"] = 1.5 - top1  # Loss moves with accuracy.
      workdirs.append(write_synthetic_run(
          tmp_path / "runs" / f"{arch}_{size}" / f"seed{seed}", name=f"{arch}_{size},v2",
          arch=arch, params=count, seed=seed, evals=evals, correct=correct))
  return workdirs


def _report(tmp_path, workdirs, *flags) -> tuple[list[dict], str]:
  out = str(tmp_path / "report")
  assert report.main([*workdirs, "--out", out, *flags]) == 0
  with open(os.path.join(out, "report.md")) as f:
    text = f.read()
  return read_csv(os.path.join(out, "verdict.csv")), text


def _primary(rows: list[dict]) -> dict:
  (row,) = [r for r in rows if r["role"] == "primary"]
  return row


def _verdict_table(text: str) -> str:
  """The verdict section of report.md: the first section, before the per-config results."""
  assert text.index("## Verdict") < text.index("## Results per config")
  return text[text.index("## Verdict"):text.index("## Results per config")]


def test_clear_difference_reads_better(tmp_path):
  offsets = {seed: 0.02 + 0.002 * (seed - 2) for seed in range(5)}  # +2 pp, +-0.4 pp
  rows, text = _report(tmp_path, _study(tmp_path, offsets))
  top1 = _primary(rows)
  assert int(top1["n_paired"]) == 5 and top1["metric"] == "final_top1"
  assert float(top1["mean"]) == pytest.approx(0.02, abs=1e-6)
  assert 0 < float(top1["ci_low"]) < 0.02 < float(top1["ci_high"])
  assert float(top1["p_holm"]) == pytest.approx(float(top1["p"]))  # a family of one size
  assert top1["reading"].startswith("DiffViT better (5 seeds, Holm p = ")
  # The seeds x images interval adds the noise of the 1000 images: it holds the mean and is
  # wider than the t one (the synthetic runs' per-seed top-1s are exact, their images random).
  assert float(top1["crossed_low"]) < 0.02 < float(top1["crossed_high"])
  assert float(top1["crossed_high"]) - float(top1["crossed_low"]) > (
      float(top1["ci_high"]) - float(top1["ci_low"]))
  # Per-seed values of both models, in seed order.
  vit = [float(v) for v in top1["baseline_values"].split()]
  diff = [float(v) for v in top1["model_values"].split()]
  assert np.allclose(np.subtract(diff, vit), [offsets[s] for s in range(5)], atol=1e-9)
  # Validation loss is secondary: descriptive, never "better".
  (loss,) = [r for r in rows if r["metric"] == "final_loss"]
  assert loss["role"] == "secondary"
  assert loss["reading"] == "descriptive: interval excludes 0 (lower)"
  table = _verdict_table(text)
  assert "+2.00 pp" in table and "DiffViT better (5 seeds" in table and "Holm" in table
  assert "primary endpoint is the final validation top-1" in table
  assert "±1.00 pp" in table and "10000 resamples" in table and "random seed 0" in table
  assert "0: 54.00 → 55.60" in table  # seed 0: ViT 54.00%, DiffViT +1.60 pp


def test_noise_around_zero_is_equivalent_within_the_margin_or_inconclusive(tmp_path):
  offsets = {0: 0.004, 1: -0.005, 2: 0.002, 3: -0.003, 4: 0.001}  # SD 0.37 pp
  workdirs = _study(tmp_path, offsets)
  rows, text = _report(tmp_path, workdirs)
  top1 = _primary(rows)
  d = np.subtract([float(v) for v in top1["model_values"].split()],
                  [float(v) for v in top1["baseline_values"].split()])
  assert d == pytest.approx([offsets[s] for s in range(5)], abs=1e-6)  # float32 events
  assert float(top1["tost_p"]) == pytest.approx(verdict.tost_p(d, 0.01), rel=1e-5)
  assert float(top1["tost_p"]) < 0.05 and float(top1["p"]) > 0.05
  assert top1["reading"].startswith("equivalent within ±1.00 pp (5 seeds, TOST p = ")
  # A narrower margin than the study can resolve: inconclusive, with both p-values.
  rows, text = _report(tmp_path, workdirs, "--equivalence_margin=0.2")
  top1 = _primary(rows)
  assert float(top1["margin"]) == pytest.approx(0.002)
  assert top1["reading"].startswith(
      "inconclusive at 5 seeds: no significant difference (Holm p = ")
  assert "±0.20 pp" in top1["reading"] and "±0.20 pp" in _verdict_table(text)
  # The MDE and the seeds needed, from the noncentral t at the observed SD.
  sd = float(np.std(d, ddof=1))
  assert float(top1["std"]) == pytest.approx(sd, rel=1e-4)
  assert verdict.power(float(top1["mde"]), sd, 5) == pytest.approx(0.8, abs=1e-6)
  needed = int(float(top1["seeds_needed"]))
  assert verdict.power(0.002, sd, needed) >= 0.8 > verdict.power(0.002, sd, needed - 1)


def test_tost_by_hand():
  # d: mean 0.1 pp, SD 0.2 pp, n 4 -> se 0.1 pp; margin 0.5 pp: t = (0.5 -+ 0.1) / 0.1.
  d = np.array([0.001, 0.003, -0.001, 0.001])
  d = 0.001 + (d - d.mean()) * (0.002 / d.std(ddof=1))
  expected = max(scipy_stats.t.sf(6.0, 3), scipy_stats.t.sf(4.0, 3))
  assert verdict.tost_p(d, 0.005) == pytest.approx(expected, rel=1e-6)


def test_zero_spread_has_no_zero_width_reading(tmp_path):
  rows, text = _report(tmp_path, _study(tmp_path, {0: 0.003, 1: 0.003, 2: 0.003}))
  top1 = _primary(rows)
  assert top1["reading"].startswith("no reading: no spread across the 3 seeds")
  assert "+0.30 pp" in top1["reading"] and "better" not in top1["reading"]
  assert top1["ci_low"] == "nan" and top1["p"] == "nan" and top1["mde"] == "nan"
  assert float(top1["mean"]) == pytest.approx(0.003, abs=1e-6)
  (loss,) = [r for r in rows if r["metric"] == "final_loss"]
  assert loss["reading"].startswith("no reading: no spread")


def test_non_finite_differences_are_stated():
  result = verdict.primary([0.01, math.nan, 0.02])
  assert result.status == "nonfinite" and not result.significant
  assert verdict.primary_reading(result, "DiffViT") == (
      "not computed: a per-seed value is not finite")


def test_one_seed_prints_no_bare_difference(tmp_path):
  rows, text = _report(tmp_path, _study(tmp_path, {0: -0.022}))
  for row in rows:
    assert row["reading"].startswith("no conclusion possible: 1 paired seed")
    assert row["mean"] == "nan" and row["ci_low"] == "nan"
  table = _verdict_table(text)
  assert "no conclusion possible" in table
  primary_table = table[:table.index("Secondary metrics")]
  assert "-2.20" not in primary_table and "| 1 | 0: 54.00 → 51.80 | - | - |" in primary_table
  differences = text[text.index("## Differential minus classic"):text.index("## Figures")]
  assert "2.20" not in differences and "no conclusion" in differences


def test_two_seeds_give_no_conclusion(tmp_path):
  rows, _ = _report(tmp_path, _study(tmp_path, {0: 0.05, 1: 0.06}))
  assert _primary(rows)["reading"] == ("no conclusion possible: 2 paired seeds (at least 3 "
                                       "needed); counted in Holm at p = 1")
  assert _primary(rows)["holm_as_1"] == "True"


def test_holm_by_hand():
  # Sorted 0.01, 0.03, 0.04: 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 1 x 0.04) = 0.06.
  assert verdict.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  assert verdict.holm([0.2, 0.01, 0.5]) == pytest.approx([0.4, 0.03, 0.5])
  # A comparison without a p stays in the family (as p = 1) and gets none.
  adjusted = verdict.holm([0.01, math.nan, 0.02])
  assert adjusted[0] == pytest.approx(0.03) and adjusted[2] == pytest.approx(0.04)
  assert math.isnan(adjusted[1])


def test_holm_across_three_sizes_of_a_protocol(tmp_path):
  workdirs = []
  for size, params, effect in (("10m", 10_130_000, 0.02), ("20m", 20_200_000, 0.006),
                               ("30m", 30_300_000, 0.0)):
    offsets = {s: effect + 0.004 * ((s * 3) % 5 - 2) for s in range(5)}
    workdirs += _study(tmp_path, offsets, size=size, params=params)
  rows, text = _report(tmp_path, workdirs)
  primary = {r["size"]: r for r in rows if r["role"] == "primary"}
  assert sorted(primary) == ["10m", "20m", "30m"]
  p = {k: float(r["p"]) for k, r in primary.items()}
  order = sorted(p, key=p.get)
  expected, running = {}, 0.0
  for rank, size in enumerate(order):
    running = max(running, min(1.0, (3 - rank) * p[size]))
    expected[size] = running
  for size, row in primary.items():
    assert float(row["p_holm"]) == pytest.approx(expected[size], rel=1e-9)
    assert row["holm_family"] == "3"
    assert (float(row["p_holm"]) < 0.05) == (row["significant"] == "True")
  assert primary["10m"]["reading"].startswith("DiffViT better")
  assert "(of 3)" in _verdict_table(text)


def test_mcnemar_is_the_exact_binomial_tail():
  base = np.array([True] * 12 + [False] * 3 + [True] * 50 + [False] * 35)
  model = np.array([False] * 12 + [True] * 3 + [True] * 50 + [False] * 35)
  test = verdict.mcnemar(base, model)
  assert (test.images, test.model_only, test.baseline_only) == (100, 3, 12)
  tail = sum(math.comb(15, k) for k in range(4)) / 2 ** 15
  assert test.p == pytest.approx(2 * tail, rel=1e-12)
  assert verdict.mcnemar(base, base).p == 1.0


def test_per_seed_table_has_mcnemar(tmp_path):
  out = str(tmp_path / "report")
  assert report.main([*_study(tmp_path, {0: 0.01, 1: 0.0, 2: -0.01}), "--out", out]) == 0
  rows = read_csv(os.path.join(out, "per_seed.csv"))
  assert [int(r["seed"]) for r in rows] == [0, 1, 2]
  for row in rows:
    b, c = int(row["model_only"]), int(row["baseline_only"])
    assert (b - c) / IMAGES == pytest.approx(float(row["difference"]), abs=1e-6)
    assert float(row["mcnemar_p"]) == pytest.approx(
        scipy_stats.binomtest(b, b + c, 0.5).pvalue)


# --- Simulations: the seeds x images interval, the bootstrap it replaces, type I error ---------
# Per-image differences of correctness (model minus ViT: -1, 0, +1), every seed on the same
# images, no true difference; vectorised over 1000 simulated studies (a second or two each).

def _seed_noise(rng, studies, seeds, images=1000):
  """Seed noise dominates: each seed its own effect (SD 3 pp), images independent."""
  a = np.clip(rng.normal(0, 0.03, (studies, seeds, 1)), -0.09, 0.09)
  u = rng.random((studies, seeds, images), dtype=np.float32)
  return np.where(u < 0.05 + a / 2, 1, np.where(u > 0.95 + a / 2, -1, 0)).astype(np.int8)


def _image_effects(rng, studies, seeds, images=360):
  """Images consistently favour one model: a tenth of them, each won by one side 90% of seeds."""
  special = rng.random((studies, 1, images)) < 0.1
  side = np.where(rng.random((studies, 1, images)) < 0.5, 1, -1)
  u = rng.random((studies, seeds, images), dtype=np.float32)
  other = np.where(u < 0.02, 1, np.where(u > 0.98, -1, 0))
  return np.where(special, np.where(u < 0.9, side, 0), other).astype(np.int8)


def test_seeds_by_images_interval_is_the_paired_t_without_image_noise():
  rng = np.random.default_rng(0)
  per_seed = rng.normal(0, 0.02, 4)
  d = np.repeat(per_seed[:, None], 50, axis=1)  # every image of a seed alike
  mean, low, high, df = verdict.crossed_interval(d)
  interval = verdict.paired_interval(per_seed)
  assert (mean, low, high) == pytest.approx((interval.mean, interval.low, interval.high))
  assert df == pytest.approx(3)
  assert np.isnan(verdict.crossed_interval(d[:1])[1])  # one seed: no interval


@pytest.mark.parametrize("seeds", [3, 5])
def test_seeds_by_images_interval_covers_in_both_scenarios(seeds):
  rng = np.random.default_rng(seeds)
  for scenario in (_seed_noise, _image_effects):
    d = scenario(rng, 1000, seeds)
    _, low, high, _ = verdict.crossed_interval(d)
    coverage = float(np.mean((low <= 0) & (0 <= high)))
    assert 0.925 <= coverage <= 0.975, (scenario.__name__, coverage)
  # The paired t-interval over seeds alone misses the shared images' noise.
  per_seed = d.mean(axis=-1)
  half = scipy_stats.t.ppf(0.975, seeds - 1) * per_seed.std(-1, ddof=1) / math.sqrt(seeds)
  assert np.mean(np.abs(per_seed.mean(-1)) <= half) < 0.85


def test_a_bootstrap_of_seeds_and_shared_images_undercovers_at_three_seeds():
  """Why the report prints no bootstrap: resampling 3 seeds (and one shared set of images per
  replicate) gives a percentile interval that misses the seed noise's small-sample spread."""
  rng = np.random.default_rng(7)
  studies, resamples = 200, 500
  covered = 0
  for study in _seed_noise(rng, studies, 3).astype(np.float32):
    seeds = rng.integers(0, 3, (resamples, 3))
    images = rng.integers(0, study.shape[1], (resamples, study.shape[1]))
    per_image = study[seeds].mean(axis=1)
    means = np.take_along_axis(per_image, images, axis=1).mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    covered += low <= 0 <= high
  assert covered / studies < 0.925


def test_the_recommended_seed_procedure_keeps_type_one_error_at_alpha():
  """README: the verdict reads the planned seeds only; seeds added later are exploratory."""
  rng = np.random.default_rng(11)
  studies, sizes, planned, added = 20_000, 3, 3, 5
  d = rng.normal(0, 0.014, (studies, sizes, planned + added))  # no true difference
  p = scipy_stats.ttest_1samp(d[..., :planned], 0, axis=-1).pvalue
  assert verdict.paired_t_p(d[0, 0, :planned]) == pytest.approx(p[0, 0])  # the code's test
  assert abs(float(np.mean(p < 0.05)) - 0.05) <= 0.01  # one size
  family = np.mean([min(verdict.holm(row)) < 0.05 for row in p[:4000]])
  assert family <= 0.06  # Holm over the three sizes
  # What the old recipe did (look at 3 seeds, add seeds, look again) is not at alpha.
  p_again = scipy_stats.ttest_1samp(d, 0, axis=-1).pvalue
  assert np.mean((p[:, 0] < 0.05) | (p_again[:, 0] < 0.05)) > 0.065


def test_seeds_for_the_margin_has_the_range_its_sd_allows():
  # The README study: SD 1.40 pp from 5 seeds (4 df), margin 1 pp.
  low, high = verdict.sd_interval(0.014, 5)
  assert low == pytest.approx(0.014 * math.sqrt(4 / scipy_stats.chi2.ppf(0.975, 4)))
  assert high == pytest.approx(0.014 * math.sqrt(4 / scipy_stats.chi2.ppf(0.025, 4)))
  assert verdict.seeds_needed(0.01, 0.014) == 18
  assert verdict.seeds_needed_range(0.01, 0.014, 5) == (
      verdict.seeds_needed(0.01, low), verdict.seeds_needed(0.01, high))
  assert 6 <= verdict.seeds_needed(0.01, low) <= 10 and verdict.seeds_needed(0.01, high) > 100


def test_mde_by_the_normal_approximation():
  # Large n: MDE -> (z_0.975 + z_0.8) * sd / sqrt(n).
  sd, n = 0.01, 400
  z = scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)
  assert verdict.min_detectable_effect(sd, n) == pytest.approx(z * sd / math.sqrt(n), rel=0.01)
  assert verdict.seeds_needed(0.001, sd) == pytest.approx((z * sd / 0.001) ** 2, rel=0.02)
  assert math.isnan(verdict.min_detectable_effect(0.0, 5))


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


# --- Which runs may enter the verdict ----------------------------------------------------------

def _rewrite_info(workdir, **changes):
  import json

  path = os.path.join(workdir, "run_info.json")
  with open(path) as f:
    info = json.load(f)
  for key, value in changes.items():
    if key == "config_train":
      info["config"]["train"].update(value)
    else:
      info[key] = value
  with open(path, "w") as f:
    json.dump(info, f)


def test_unfinished_mismatched_and_nan_runs_are_left_out_with_the_reason(tmp_path):
  offsets = {seed: 0.02 + 0.002 * (seed - 2) for seed in range(5)}
  workdirs = _study(tmp_path, offsets)
  by_name = {os.path.relpath(w, tmp_path / "runs"): w for w in workdirs}
  _rewrite_info(by_name["diffvit_10m/seed1"], completed_steps=600)  # stopped at 600 of 1000
  _rewrite_info(by_name["vit_10m/seed2"], config_train={"steps": 500})  # another recipe
  # Fields that do not change the result may differ.
  _rewrite_info(by_name["vit_10m/seed3"], config_train={"log_every": 7, "microbatches": 4})
  nan_run = by_name["diffvit_10m/seed4"]
  write_synthetic_run(tmp_path / "nan", name="diffvit_10m,v2", arch="diffvit",
                      params=10_140_000, seed=4,
                      evals={1000: dict(top1=math.nan, top5=0.5, loss=math.nan)})
  workdirs[workdirs.index(nan_run)] = str(tmp_path / "nan")
  rows, text = _report(tmp_path, workdirs)
  top1 = _primary(rows)
  assert top1["paired_seeds"] == "0 3"
  assert top1["reading"].startswith("incomplete: ")
  assert "better" not in top1["reading"] and top1["significant"] == "False"
  for seed in (1, 2, 4):
    assert f"seed {seed} of" in top1["incomplete"]
  left_out = text[text.index("### Runs left out"):text.index("## Results per config")]
  assert "unfinished: 600 of 1000 steps" in left_out
  assert "train.steps: this run has 500" in left_out
  assert "non-finite final metrics (final_top1, final_loss)" in left_out
  assert "vit_10m/seed3" not in left_out


def test_a_seed_without_its_pair_makes_the_comparison_incomplete(tmp_path):
  workdirs = _study(tmp_path, {0: 0.02, 1: 0.021, 2: 0.019, 3: 0.02})
  workdirs = [w for w in workdirs if not w.endswith(os.path.join("diffvit_10m", "seed3"))]
  rows, _ = _report(tmp_path, workdirs)
  assert _primary(rows)["reading"].startswith("incomplete: seed 3: no DiffViT run")


def test_a_duplicate_seed_is_an_error_naming_both_workdirs(tmp_path, capsys):
  workdirs = _study(tmp_path, {0: 0.0, 1: 0.01, 2: 0.0})
  twin = write_synthetic_run(tmp_path / "elsewhere" / "vit", name="vit_10m,v2", arch="vit",
                             params=10_130_000, seed=1, evals=rising_evals(0.5))
  assert report.main([*workdirs, twin, "--out", str(tmp_path / "report")]) == 2
  err = capsys.readouterr().err
  assert "seed 1" in err and twin in err and os.path.join("vit_10m", "seed1") in err
  with pytest.raises(DataError, match="have seed 1"):
    runs_lib.group_runs([runs_lib.load_run(w) for w in [*workdirs, twin]])


def test_a_missing_config_field_takes_its_default():
  old = runs_lib.full_config({"train": {"seed": 3}})
  assert old["train.seed"] == 3 and old["model.width"] == config_lib.model_config().width
  assert not runs_lib.config_differences(old, runs_lib.full_config({}))


def test_matches_says_whether_a_workdir_holds_the_requested_run(tmp_path):
  import json

  config = digits_config("vit", 0)
  saved = json.loads(config.to_json_best_effort())
  workdir = write_synthetic_run(tmp_path / "run", name=config.name, arch="vit", params=1,
                                seed=0, evals=rising_evals(0.5, steps=(15, 30)), config=saved)
  code, line = runs_lib.matches(workdir, config)
  assert code == runs_lib.MATCHES, line
  config.train.log_every = 3  # Does not change the result.
  assert runs_lib.matches(workdir, config)[0] == runs_lib.MATCHES
  config.train.steps = 500
  code, line = runs_lib.matches(workdir, config)
  assert code == runs_lib.OTHER_CONFIG and "train.steps: the run has 30, the request 500" in line
  assert runs_lib.matches(str(tmp_path / "none"), config)[0] == runs_lib.NOT_FINISHED
  _rewrite_info(workdir, completed_steps=15)
  assert runs_lib.matches(workdir, digits_config("vit", 0))[0] == runs_lib.NOT_FINISHED


def test_resume_identity_covers_the_recipe_but_not_the_intervals():
  from diffvit_jax.training import checkpointing

  config = digits_config("vit", 0)
  identity = checkpointing.resume_identity(config)
  for field, value in (("seed", 1), ("batch_size", 64), ("learning_rate", 1e-2)):
    other = digits_config("vit", 0)
    other.train[field] = value
    assert checkpointing.resume_identity(other) != identity, field
  same = digits_config("vit", 0)
  same.train.update(log_every=3, eval_every=7, checkpoint_every=9, keep_checkpoints=1)
  same.model.attention_impl = "einsum"
  assert checkpointing.resume_identity(same) == identity


# --- The study manifest: the design fixed before the data ---------------------------------------

def _manifest(tmp_path, sizes=("10m",), seeds=(0, 1, 2, 3, 4), margin=0.01):
  family = tuple(manifest.Planned("v2", size, f"vit_{size},v2", f"diffvit_{size},v2", "vit",
                                  "diffvit") for size in sizes)
  design = manifest.Design(endpoint="final_top1", family=family, margin=margin, alpha=0.05,
                           seeds=tuple(seeds), date="2026-12-07T00:00:00+00:00")
  path = str(tmp_path / "runs" / manifest.MANIFEST)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return manifest.write(path, design)


SIZES = (("10m", 10_130_000, 0.02), ("20m", 20_200_000, 0.015), ("30m", 30_300_000, 0.0))


def _verdict_only(workdirs):
  """The verdict's rows and Markdown as `report.write_report` builds them, without figures."""
  admitted, excluded = runs_lib.admit([runs_lib.load_run(w) for w in workdirs])
  comparisons = tables.comparisons(runs_lib.group_runs(admitted), excluded)
  plan = report.plan(workdirs)
  rows = tables.verdict_rows(comparisons, plan)
  return comparisons, plan, rows, report._design_text(plan, rows) + tables.verdict_markdown(rows)


def test_a_planned_size_whose_model_runs_all_failed_counts_at_p_1_of_3(tmp_path):
  _manifest(tmp_path, sizes=[s for s, _, _ in SIZES], seeds=range(5))
  workdirs = []
  for size, params, effect in SIZES:
    offsets = {s: effect + 0.004 * ((s * 3) % 5 - 2) for s in range(5)}
    workdirs += _study(tmp_path, offsets, size=size, params=params)
  for workdir in workdirs:  # Every DiffViT-30m run stopped before its end.
    if os.sep + "diffvit_30m" + os.sep in workdir:
      _rewrite_info(workdir, completed_steps=400)
  _, _, rows, table = _verdict_only(workdirs)
  primary = {r["size"]: r for r in rows if r["role"] == "primary"}
  assert sorted(primary) == ["10m", "20m", "30m"]
  lost = primary["30m"]
  assert lost["holm_as_1"] is True and math.isnan(lost["p"]) and lost["n_paired"] == 0
  assert lost["reading"].startswith("planned, no admissible comparison")
  p = [float(primary[s]["p"]) for s in ("10m", "20m")]
  expected = verdict.holm([*p, math.nan])  # the lost size at p = 1, not a family of 2
  for size, value in zip(("10m", "20m"), expected[:2], strict=True):
    assert float(primary[size]["p_holm"]) == pytest.approx(value)
    assert primary[size]["holm_family"] == 3
  assert expected[:2] != pytest.approx(verdict.holm(p))
  assert "p = 1 counted (of 3)" in table and "(of 3)" in table
  assert "Counted in Holm at p = 1" in table and "30m (no admissible comparison)" in table
  assert "Design from the study manifest" in table


def test_without_a_manifest_the_family_is_the_sizes_given(tmp_path):
  workdirs = []
  for size, params, effect in SIZES[:2]:
    workdirs += _study(tmp_path, {s: effect + 0.001 * s for s in range(3)}, size=size,
                       params=params)
  rows, text = _report(tmp_path, workdirs)
  assert {r["holm_family"] for r in rows if r["role"] == "primary"} == {"2"}
  table = _verdict_table(text)
  assert "No study manifest" in table and "the comparisons of the sizes given" in table
  assert "the code's default; no manifest fixed one" in table


def test_a_margin_given_only_at_report_time_is_post_hoc(tmp_path):
  offsets = {0: 0.004, 1: -0.005, 2: 0.002, 3: -0.003, 4: 0.001}
  workdirs = _study(tmp_path, offsets)
  _manifest(tmp_path, margin=0.01)
  rows, text = _report(tmp_path, workdirs)
  assert _primary(rows)["margin_source"] == "manifest"
  assert "fixed in the study manifest before the runs" in _verdict_table(text)
  rows, text = _report(tmp_path, workdirs, "--equivalence_margin=1.0")  # the planned one
  assert _primary(rows)["margin_source"] == "manifest"
  rows, text = _report(tmp_path, workdirs, "--equivalence_margin=2")
  assert _primary(rows)["margin_source"] == "post hoc"
  assert float(_primary(rows)["margin"]) == pytest.approx(0.02)
  assert "**post hoc**" in _verdict_table(text) and "planned one was ±1.00 pp" in text
  os.remove(tmp_path / "runs" / manifest.MANIFEST)
  rows, text = _report(tmp_path, workdirs, "--equivalence_margin=2")
  assert _primary(rows)["margin_source"] == "post hoc" and "**post hoc**" in text


def test_the_verdict_reads_the_planned_seeds_and_more_seeds_are_exploratory(tmp_path):
  # Planned 0 1 2 (no difference); seeds 3-6 added later all favour DiffViT by 3 pp.
  offsets = {0: 0.001, 1: -0.002, 2: 0.001, 3: 0.03, 4: 0.031, 5: 0.029, 6: 0.03}
  _, line = _manifest(tmp_path, seeds=(0, 1, 2))
  assert "written" in line
  rows, text = _report(tmp_path, _study(tmp_path, offsets))
  top1 = _primary(rows)
  assert top1["paired_seeds"] == "0 1 2" and "better" not in top1["reading"]
  assert float(top1["mean"]) == pytest.approx(0.0, abs=1e-6)
  (extra,) = [r for r in rows if r["role"] == "exploratory"]
  assert extra["paired_seeds"] == "0 1 2 3 4 5 6"
  assert extra["reading"].startswith("exploratory (all paired seeds; seeds 3 4 5 6 are beyond")
  table = _verdict_table(text)
  assert "Exploratory, not the verdict" in table and "planned seeds 0 1 2" in table


def test_a_rerun_keeps_the_manifest_or_refuses_another_design(tmp_path):
  design, line = _manifest(tmp_path, sizes=("10m", "20m"), seeds=(0, 1, 2))
  with open(design.path) as f:
    written = f.read()
  kept, line = _manifest(tmp_path, sizes=("10m",), seeds=(0, 1, 2, 3))  # part of it, more seeds
  assert kept.seeds == (0, 1, 2) and "kept" in line and "seeds 3 are beyond" in line
  with open(design.path) as f:
    assert f.read() == written
  for change in (dict(margin=0.02), dict(sizes=("10m", "20m", "30m"))):
    with pytest.raises(UserError, match="fixes this study's design"):
      _manifest(tmp_path, **{"sizes": ("10m", "20m"), **change})
  with open(design.path) as f:
    assert f.read() == written
  with open(design.path, "w") as f:
    f.write("{}")
  with pytest.raises(DataError, match="not a study manifest"):
    manifest.read(design.path)


def test_the_sweep_writes_its_manifest_before_any_run_trains(tmp_path, monkeypatch, capsys):
  from diffvit_jax.tools import sweep

  common = [f"--root={tmp_path / 'runs'}", "--sizes=10m", "--seeds=0 1 2",
            "--devices=cpu:1", "--equivalence_margin=0.5"]
  assert sweep.main([*common, "--slurm"]) == 0  # the scripts, nothing trained
  path = tmp_path / "runs" / "v2" / manifest.MANIFEST
  design = manifest.read(str(path))
  assert [(p.size, p.model, p.baseline) for p in design.family] == [
      ("10m", "diffvit_10m,v2", "vit_10m,v2")]
  assert design.seeds == (0, 1, 2) and design.margin == pytest.approx(0.005)
  assert "--config.analysis.equivalence_margin=0.5" in (
      tmp_path / "runs" / "v2" / "slurm" / "train_array.sbatch").read_text()
  os.remove(path)
  seen = {}

  def queue(runs, *args):  # instead of training: what is on disk when the first run starts
    seen["manifest"] = os.path.exists(path)
    return {r.index: sweep._entry(r, "failed", reason="not trained here") for r in runs}, None

  monkeypatch.setattr(sweep, "plan_models", lambda *a, **k: {})
  monkeypatch.setattr(sweep, "queue", queue)
  build = sweep.build_configs  # no data set here: planned as for --slurm
  monkeypatch.setattr(sweep, "build_configs",
                      lambda *a, **k: build(*a, **{**k, "need_data": False}))
  assert sweep.main(common) == 1  # every run "failed"
  assert seen == {"manifest": True}
  assert "Study manifest written" in capsys.readouterr().out
  # Another margin on the same study: refused before anything runs.
  seen.clear()
  assert sweep.main([*common[:-1], "--equivalence_margin=2"]) == 2
  assert not seen and "fixes this study's design" in capsys.readouterr().err


# --- Loose ends: per-image files and robustness only from the final evaluation -----------------

def test_per_example_counts_only_when_it_is_the_final_evaluation(tmp_path):
  workdirs = _study(tmp_path, {0: 0.01, 1: 0.0, 2: -0.01})
  rows, _ = _report(tmp_path, workdirs)
  assert _primary(rows)["per_image_missing"] == "" and _primary(rows)["crossed_low"] != "nan"
  by_name = {os.path.relpath(w, tmp_path / "runs"): w for w in workdirs}
  for name, change in (("diffvit_10m/seed1", dict(step=np.int64(600))),
                       ("vit_10m/seed2", dict(flip=True))):
    path = os.path.join(by_name[name], "per_example.npz")
    with np.load(path) as f:
      arrays = {k: f[k] for k in f.files}
    if change.get("flip"):
      arrays["top1"][0] = not arrays["top1"][0]  # its mean is no longer the final top-1
    arrays.update({k: v for k, v in change.items() if k != "flip"})
    np.savez(path, **arrays)
  rows, _ = _report(tmp_path, workdirs)
  missing = _primary(rows)["per_image_missing"]
  assert "seed 1: diffvit: per_example.npz is of step 600, not the final evaluation's 1000" in (
      missing)
  assert "seed 2: vit: per_example.npz's top-1" in missing and "not the final" in missing
  assert _primary(rows)["crossed_low"] == "nan"  # no interval from a partial set of seeds


def _robustness(workdir, *, step=1000, cells=(("fog", "1"), ("fog", "5"))):
  from diffvit_jax.evaluation import robustness

  corrupted = {}
  for name, severity in cells:
    corrupted.setdefault(name, {})[severity] = {"top1": 0.4, "top5": 1.0, "loss": 0.0}
  result = dict(name="x", workdir=str(workdir), step=step, checkpoint="latest",
                data=dict(source="tiny_imagenet", eval_split="validation", num_eval=10),
                clean={"top1": 0.6, "top5": 1.0, "loss": 0.0}, corrupted=corrupted)
  robustness.summarise(result)
  with open(os.path.join(workdir, "robustness.json"), "w") as f:
    json.dump(result, f)


def test_robustness_rows_only_from_final_evaluations_of_one_corruption_set(tmp_path):
  workdirs = _study(tmp_path, {0: 0.01, 1: 0.0, 2: -0.01})
  for workdir in workdirs:
    seed = int(workdir[-1])
    _robustness(workdir, step=800 if seed == 1 else 1000,  # seed 1 at a --best checkpoint
                cells=(("fog", "1"),) if seed == 2 and "diffvit" in workdir
                else (("fog", "1"), ("fog", "5")))
  admitted, _ = runs_lib.admit([runs_lib.load_run(w) for w in workdirs])
  groups = runs_lib.group_runs(admitted)
  rows = {r["arch"]: r for r in tables.robustness_rows(groups)}
  assert rows["vit"]["n_seeds"] == 2 and "seed 1 (evaluated at" in rows["vit"]["left_out"]
  assert rows["diffvit"]["n_seeds"] == 1 and "seed 2 (another corruption set)" in (
      rows["diffvit"]["left_out"])
  assert rows["vit"]["coverage"] == "partial" and rows["vit"]["cells"] == 2
  paired = tables.robustness_paired_rows(tables.comparisons(groups))
  assert [r["seed"] for r in paired if r["kind"] == "seed"] == [0]
  (summary,) = [r for r in paired if r["kind"] == "summary"]
  assert "seed 2 (the two runs were evaluated on other corruption cells)" in summary["left_out"]
  assert "partial, 2 cells" in tables.robustness_paired_markdown(paired)


# --- Secondary readings: pooled, trend, P(better), pairing, compute ----------------------------

def test_contrast_and_probability_of_improvement_by_hand():
  pooled = verdict.contrast([0.5, 0.5], [0.02, 0.0], [1e-5, 4e-5], [4, 4])
  assert pooled.estimate == pytest.approx(0.01)
  assert pooled.se == pytest.approx(math.sqrt(0.25 * 5e-5))
  df = (0.25 * 5e-5) ** 2 / ((0.25 * 1e-5) ** 2 / 4 + (0.25 * 4e-5) ** 2 / 4)
  assert pooled.df == pytest.approx(df)
  assert pooled.high - pooled.estimate == pytest.approx(
      scipy_stats.t.ppf(0.975, df) * pooled.se)
  assert verdict.slope_weights([1, 2, 3]) @ np.array([5.0, 7.0, 9.0]) == pytest.approx(2.0)
  assert verdict.prob_improvement([3, 4], [1, 3]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
  point, low, high = verdict.prob_improvement_interval([([0.7, 0.8, 0.9], [0.1, 0.2, 0.3])],
                                                       resamples=500)
  assert (point, low, high) == (1.0, 1.0, 1.0)
  x = np.array([0.60, 0.62, 0.58, 0.61])
  assert verdict.correlation(x + 0.01, x) == pytest.approx(1.0)
  assert verdict.unpaired_half_width(x + 0.01, x) > 0


def test_report_has_the_pooled_and_compute_readings_marked_secondary(tmp_path):
  _manifest(tmp_path, sizes=[s for s, _, _ in SIZES], seeds=range(5))
  workdirs = []
  for size, params, effect in SIZES:
    workdirs += _study(tmp_path, {s: effect + 0.004 * ((s * 3) % 5 - 2) for s in range(5)},
                       size=size, params=params)
  for workdir in workdirs:  # DiffViT takes 4000 s where ViT takes 3600 s
    if os.sep + "diffvit_" in workdir:
      _rewrite_info(workdir, train_seconds=4000.0)
  comparisons, plan, rows, _ = _verdict_only(workdirs)
  secondary_rows = secondary.pooled_rows(comparisons, plan)
  by_kind = {r["kind"]: r for r in secondary_rows if r["kind"] != "pairing"}
  means = [r["mean"] for r in rows if r["role"] == "primary"]
  assert float(by_kind["pooled"]["estimate"]) == pytest.approx(np.mean(means))
  logs = np.log10([p for _, p, _ in SIZES])
  assert float(by_kind["trend"]["estimate"]) == pytest.approx(
      verdict.slope_weights(logs) @ np.array(means))
  assert float(by_kind["trend"]["estimate"]) < 0  # the effect shrinks with size here
  assert 0 <= float(by_kind["p_better"]["low"]) <= float(by_kind["p_better"]["estimate"]) <= (
      float(by_kind["p_better"]["high"])) <= 1
  assert len([r for r in secondary_rows if r["kind"] == "pairing"]) == 3
  compute = {r["size"]: r for r in secondary.compute_rows(comparisons)}
  row = compute["10m"]
  # DiffViT at ViT's 3600 s: 90% of its steps, step 900, between its evaluations at 800, 1000.
  assert row["model_top1_at_other_time"] == pytest.approx(0.9 * row["model_top1"], rel=1e-4)
  assert math.isnan(row["baseline_top1_at_other_time"])  # ViT's run ended before 4000 s
  text = secondary.pooled_markdown(secondary_rows) + secondary.compute_markdown(
      list(compute.values()))
  assert "pooled effect (equal weights over sizes)" in text and "P(model > ViT)" in text
  assert "pairing narrowed it" in text and "top-1 % at the other's wall time" in text
  # In the report, as its own secondary sections (a smaller study: one size).
  out = str(tmp_path / "report")
  assert report.main([*workdirs[:10], "--out", out]) == 0
  with open(os.path.join(out, "report.md")) as f:
    text = f.read()
  assert "### Secondary: pooled over sizes" in text and "### Secondary: compute" in text
  assert "fixed effects, because the sizes are the design" in text
  assert {"secondary.csv", "compute.csv"} <= set(os.listdir(out))


def test_readme_study_table_is_the_reports_own():
  readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "README.md")
  with open(readme) as f:
    lines = f.read().splitlines()
  header = "| " + " | ".join(tables.VERDICT_HEADER) + " |"
  assert header in lines
  rule = lines[lines.index(header) + 1]
  assert rule == tables.markdown_table(list(tables.VERDICT_HEADER), [],
                                       "llllrrrrrrrrrrl").splitlines()[1]
  row = lines[lines.index(header) + 2]
  assert row.count(" | ") == len(tables.VERDICT_HEADER) - 1
