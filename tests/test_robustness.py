"""`--mode eval_corrupted`: every corruption x severity, CE and mCE, resuming, the report."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from analysis_runs import REPO, copy_run, digits_config, trained_runs
from PIL import Image

from diffvit_jax.data import corruptions
from diffvit_jax.errors import CheckpointError, ConfigError, DataError
from diffvit_jax.evaluation import robustness
from diffvit_jax.reporting import report

TINY = ["--config.model.depth=2", "--config.model.width=32"]


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory):
  return trained_runs(tmp_path_factory)


def test_cli_writes_every_corruption_and_severity(runs_root, tmp_path):
  workdir = copy_run(runs_root, "vit", 0, tmp_path)
  proc = subprocess.run(
      [sys.executable, "-m", "diffvit_jax.main", "--config", "configs/digits.py:vit",
       "--workdir", workdir, "--mode", "eval_corrupted", *TINY],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["mode"] == "eval_corrupted" and 0 <= summary["mean_corruption_error"] <= 1

  with open(os.path.join(workdir, "robustness.json")) as f:
    result = json.load(f)
  assert sorted(result["corrupted"]) == sorted(corruptions.CORRUPTIONS)
  cells = []
  for name in corruptions.CORRUPTIONS:
    assert sorted(result["corrupted"][name], key=int) == ["1", "2", "3", "4", "5"]
    for metrics in result["corrupted"][name].values():
      assert all(0.0 <= metrics[k] <= 1.0 for k in ("top1", "top5"))
      assert metrics["top1"] <= metrics["top5"]
      cells.append(metrics["top1"])
  # The benchmark's mean leaves out the extras and is partial: frost cannot be generated.
  benchmark = [result["corrupted"][c][s]["top1"] for c in corruptions.BENCHMARK_CORRUPTIONS
               if c in result["corrupted"] for s in "12345"]
  assert len(benchmark) == 14 * 5 and len(cells) == 16 * 5
  assert result["mean_corruption_error"] == pytest.approx(1 - np.mean(benchmark))
  extras = [result["corrupted"][c][s]["top1"] for c in corruptions.EXTRA_CORRUPTIONS
            for s in "12345"]
  assert result["extras_mean_corruption_error"] == pytest.approx(1 - np.mean(extras))
  coverage = result["coverage"]
  assert coverage["status"] == "partial" and not coverage["comparable_with_papers"]
  assert coverage["missing"] == [f"frost/{s}" for s in range(1, 6)]
  assert coverage["extras"] == sorted(corruptions.EXTRA_CORRUPTIONS)
  assert "published Tiny-ImageNet-C" in coverage["note"]
  assert summary["coverage"] == "partial" and summary["missing"] == coverage["missing"]
  # The clean accuracy is the trainer's final evaluation of the same checkpoint.
  with open(os.path.join(workdir, "run_info.json")) as f:
    assert result["clean"]["top1"] == pytest.approx(json.load(f)["final_eval"]["top1"],
                                                    abs=1e-6)
  assert "relative" not in result

  with open(os.path.join(workdir, "robustness.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 1 + 5 * len(corruptions.CORRUPTIONS)
  assert rows[0]["corruption"] == "clean"
  with Image.open(os.path.join(workdir, "robustness.png")) as image:
    assert image.size[0] > 600 and image.size[1] > 350
    assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 20
  assert os.path.exists(os.path.join(workdir, "robustness.svg"))


@pytest.fixture(scope="module")
def evaluated_pair(runs_root, tmp_path_factory):
  """ViT and DiffViT (seed 0) on two corruptions x two severities, CE relative to the ViT."""
  root = tmp_path_factory.mktemp("robust")
  vit = copy_run(runs_root, "vit", 0, root)
  diff = copy_run(runs_root, "diffvit", 0, root)
  choice = dict(corruptions=["gaussian_noise", "contrast"], severities=["1", "5"])
  robustness.evaluate_corrupted(digits_config("vit", 0), vit, **choice)
  summary = robustness.evaluate_corrupted(digits_config("diffvit", 0), diff,
                                          baseline_workdir=vit, **choice)
  return vit, diff, summary


def test_ce_and_mce_are_relative_to_the_baseline(evaluated_pair):
  vit, diff, summary = evaluated_pair
  mine, theirs = robustness.read_results(diff), robustness.read_results(vit)
  ce = {}
  for name in ("gaussian_noise", "contrast"):
    errors = [1 - mine["corrupted"][name][s]["top1"] for s in ("1", "5")]
    base = [1 - theirs["corrupted"][name][s]["top1"] for s in ("1", "5")]
    ce[name] = sum(errors) / sum(base)
  assert mine["relative"]["ce"] == pytest.approx(ce)
  assert mine["relative"]["mce"] == pytest.approx(np.mean(list(ce.values())))
  assert summary["mce"] == pytest.approx(mine["relative"]["mce"])
  assert mine["relative"]["baseline_workdir"] == vit
  assert mine["relative"]["mce_status"] == "partial"
  assert len(mine["relative"]["mce_missing"]) == 15 * 5 - 2 * 2


def _cells(top1_of):
  return {c: {str(s): {"top1": top1_of(c, s), "top5": 1.0, "loss": 0.0} for s in range(1, 6)}
          for c in (*corruptions.BENCHMARK_CORRUPTIONS, *corruptions.EXTRA_CORRUPTIONS)}


def test_mce_is_over_the_benchmark_and_extras_are_apart():
  data = dict(source="tiny_imagenet_c", eval_split="validation", num_eval=10)
  benchmark = corruptions.BENCHMARK_CORRUPTIONS
  mine = robustness.summarise(dict(data=data, corrupted=_cells(
      lambda c, s: 0.5 if c in benchmark else 0.9)))
  base = robustness.summarise(dict(data=data, corrupted=_cells(lambda c, s: 0.75)))
  assert mine["mean_corruption_error"] == pytest.approx(0.5)
  assert mine["extras_mean_corruption_error"] == pytest.approx(0.1)
  assert mine["coverage"]["status"] == "full" and mine["coverage"]["comparable_with_papers"]
  relative = robustness.relative_to(mine, base, "base_run")
  assert sorted(relative["ce"]) == sorted(benchmark)
  assert relative["mce"] == pytest.approx(0.5 / 0.25)  # The extras' CE of 0.4 stays out.
  assert relative["extras_ce"] == pytest.approx({c: 0.1 / 0.25
                                                 for c in corruptions.EXTRA_CORRUPTIONS})
  assert relative["mce_status"] == "full" and relative["mce_missing"] == []

  # One cell short: still computed over what there is, but labelled partial.
  del mine["corrupted"]["fog"]["3"]
  robustness.summarise(mine)
  assert mine["coverage"]["status"] == "partial" and mine["coverage"]["missing"] == ["fog/3"]
  assert not mine["coverage"]["comparable_with_papers"]
  assert robustness.relative_to(mine, base, "base_run")["mce_status"] == "partial"
  # Generated corruptions are never comparable with papers, even if complete.
  generated = robustness.summarise(dict(data={**data, "source": "tiny_imagenet"},
                                        corrupted=_cells(lambda c, s: 0.5)))
  assert generated["coverage"]["status"] == "full"
  assert not generated["coverage"]["comparable_with_papers"]


def test_corruption_error_formulas():
  cells = {"a": {"1": {"top1": 0.9}, "2": {"top1": 0.7}}, "b": {"1": {"top1": 0.5}}}
  base = {"a": {"1": {"top1": 0.8}, "2": {"top1": 0.6}}, "b": {"1": {"top1": 0.75}}}
  assert robustness.mean_corruption_error(cells) == pytest.approx((0.1 + 0.3 + 0.5) / 3)
  ce = robustness.corruption_errors(cells, base)
  assert ce == pytest.approx({"a": 0.4 / 0.6, "b": 0.5 / 0.25})


def test_an_interrupted_evaluation_resumes(evaluated_pair, tmp_path):
  vit = shutil.copytree(evaluated_pair[0], tmp_path / "vit")
  result = robustness.read_results(vit)
  # As if the run had been killed after one cell: that cell is kept, not recomputed.
  result["corrupted"] = {"contrast": {"1": {"top1": 0.123, "top5": 0.5, "loss": 9.0}}}
  with open(os.path.join(vit, "robustness.json"), "w") as f:
    json.dump(result, f)
  robustness.evaluate_corrupted(digits_config("vit", 0), vit, corruptions=["contrast"],
                                severities=["1", "2"])
  resumed = robustness.read_results(vit)
  assert resumed["corrupted"]["contrast"]["1"]["top1"] == 0.123
  assert set(resumed["corrupted"]["contrast"]) == {"1", "2"}


def test_user_errors(evaluated_pair, tmp_path):
  vit, diff, _ = evaluated_pair
  with pytest.raises(DataError, match="eval_corrupted on it first"):
    robustness.evaluate_corrupted(digits_config("vit", 0), vit, baseline_workdir=str(tmp_path))
  with pytest.raises(ConfigError, match="not available"):
    robustness.evaluate_corrupted(digits_config("vit", 0), vit, corruptions=["fog_of_war"])
  with pytest.raises(ConfigError, match="--corruptions: 'frost' cannot be generated"):
    robustness.evaluate_corrupted(digits_config("vit", 0), vit, corruptions=["frost"])
  with pytest.raises(ConfigError, match="severities"):
    robustness.evaluate_corrupted(digits_config("vit", 0), vit, severities=["6"])
  with pytest.raises(CheckpointError, match="model.arch"):
    robustness.evaluate_corrupted(digits_config("vit", 0), diff, corruptions=["contrast"],
                                  severities=["1"])
  with pytest.raises(DataError, match="no results for"):
    robustness.evaluate_corrupted(digits_config("diffvit", 0), diff, baseline_workdir=vit,
                                  corruptions=["brightness"], severities=["1"])


def test_report_includes_robustness(evaluated_pair, tmp_path):
  vit, diff, _ = evaluated_pair
  out = str(tmp_path / "report")
  assert report.main([vit, diff, "--out", out]) == 0
  names = set(os.listdir(out))
  assert {"robustness.md", "robustness.csv"} <= names
  pngs = [n for n in names if n.startswith("robustness_") and n.endswith(".png")]
  assert len(pngs) == 3  # mean over corruptions per size, and one per config
  with open(os.path.join(out, "report.md")) as f:
    text = f.read()
  assert "## Robustness" in text and "mCE" in text and "(vit_digits)" in text
  assert "partial (vit_digits)" in text  # 2 corruptions x 2 severities of the 15 x 5


def _synthetic_robustness(workdir, clean, cells, *, step=1000):
  result = dict(name="x", workdir=str(workdir), step=step, checkpoint="latest",
                data=dict(source="tiny_imagenet", eval_split="validation", num_eval=10,
                          corruption_jpeg=True),
                clean={"top1": clean, "top5": 1.0, "loss": 0.0},
                corrupted={c: {s: {"top1": v, "top5": 1.0, "loss": 0.0} for s, v in by.items()}
                           for c, by in cells.items()})
  robustness.summarise(result)
  with open(os.path.join(workdir, "robustness.json"), "w") as f:
    json.dump(result, f)


def test_mce_is_paired_by_seed_with_relative_mce_and_an_interval(tmp_path):
  from analysis_runs import rising_evals, write_synthetic_run

  from diffvit_jax.reporting import runs as runs_lib
  from diffvit_jax.reporting import tables, verdict

  expected = {}
  workdirs = []
  for seed in range(3):
    vit_clean, diff_clean = 0.60 + 0.01 * seed, 0.62 + 0.01 * seed
    vit = {"fog": {"1": 0.50, "5": 0.30}, "contrast": {"1": 0.55, "5": 0.20 + 0.01 * seed}}
    diff = {"fog": {"1": 0.52, "5": 0.33}, "contrast": {"1": 0.56, "5": 0.25}}
    runs = {}
    for arch, clean, cells in (("vit", vit_clean, vit), ("diffvit", diff_clean, diff)):
      workdir = write_synthetic_run(tmp_path / arch / f"seed{seed}", name=f"{arch}_10m,v2",
                                    arch=arch, params=10_000_000, seed=seed,
                                    evals=rising_evals(clean))
      _synthetic_robustness(workdir, clean, cells, step=1000 if seed < 2 or arch == "vit"
                            else 800)
      runs[arch] = workdir
      workdirs.append(workdir)
    ce = {c: sum(1 - diff[c][s] for s in diff[c]) / sum(1 - vit[c][s] for s in vit[c])
          for c in vit}
    rel = {c: sum((1 - diff[c][s]) - (1 - diff_clean) for s in diff[c])
           / sum((1 - vit[c][s]) - (1 - vit_clean) for s in vit[c]) for c in vit}
    expected[seed] = (np.mean(list(ce.values())), np.mean(list(rel.values())))
  admitted, _ = runs_lib.admit([runs_lib.load_run(w) for w in workdirs])
  rows = tables.robustness_paired_rows(tables.comparisons(runs_lib.group_runs(admitted)))
  per_seed = {r["seed"]: r for r in rows if r["kind"] == "seed"}
  assert sorted(per_seed) == [0, 1]  # seed 2's DiffViT was evaluated at step 800 of 1000
  for seed, row in per_seed.items():
    assert row["mce"] == pytest.approx(expected[seed][0])
    assert row["relative_mce"] == pytest.approx(expected[seed][1])
  (summary,) = [r for r in rows if r["kind"] == "summary"]
  interval = verdict.paired_interval([expected[s][0] - 1 for s in (0, 1)])
  assert summary["mce_minus_1_mean"] == pytest.approx(interval.mean)
  assert summary["mce_minus_1_ci_low"] == pytest.approx(interval.low)
  assert "seed 2" in summary["left_out"] and "step 800, not the final step 1000" in (
      summary["left_out"])
  assert summary["reading"].startswith("no conclusion possible: 2 paired seeds")
  assert "mCE − 100%" in tables.robustness_paired_markdown(rows)
