"""The report on short digits runs: its files, numbers equal to the events, real figures."""

import csv
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from analysis_runs import (
  ARCHS,
  SEEDS,
  STEPS,
  rising_evals,
  run_dir,
  trained_runs,
  write_synthetic_run,
)
from PIL import Image

from diffvit_jax.reporting import events, report
from diffvit_jax.reporting import runs as runs_lib


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory):
  return trained_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def report_dir(runs_root, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("report"))
  workdirs = [run_dir(runs_root, a, s) for a in ARCHS for s in SEEDS]
  assert report.main([*workdirs, "--out", out]) == 0
  return out


def tf_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """The events read with TensorFlow's own reader (independent of `reporting.events`)."""
  import tensorflow as tf

  scalars = {}
  for name in sorted(os.listdir(workdir)):
    if not name.startswith("events.out.tfevents"):
      continue
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
      for value in event.summary.value:
        if value.HasField("simple_value"):
          number = value.simple_value
        elif value.metadata.plugin_data.plugin_name == "scalars":
          number = float(tf.make_ndarray(value.tensor))
        else:
          continue
        scalars.setdefault(value.tag, {})[event.step] = number
  return scalars


def read_csv(path: str) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


def check_png(path: str, min_size=(400, 250), max_size=(4000, 3000)) -> None:
  with Image.open(path) as image:
    width, height = image.size
    pixels = np.asarray(image.convert("RGB"))
  assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1], (
      path, image.size)
  colours = np.unique(pixels.reshape(-1, 3), axis=0)
  assert len(colours) > 20, f"{path} is (nearly) one colour"


def test_report_writes_every_file(report_dir):
  names = set(os.listdir(report_dir))
  size = sorted(n for n in names if n.startswith("curves_digits_"))[0][len("curves_digits_"):-4]
  for stem in ("report.md", "verdict.csv", "results.md", "results.csv", "differences.md",
               "differences.csv", "runs.csv", f"curves_digits_{size}.png",
               f"curves_digits_{size}.svg", "lambda_digits.png", "lambda_digits.svg"):
    assert stem in names, sorted(names)
  with open(os.path.join(report_dir, "report.md")) as f:
    text = f.read()
  assert "| ViT |" in text and "| DiffViT |" in text and "DiffViT − ViT" in text
  # Two seeds: the verdict says that nothing can be concluded yet.
  assert text.index("## Verdict") < text.index("## Results per config")
  assert "no conclusion possible: 2 paired seeds" in text
  for line in text.splitlines():
    if line.startswith("!["):
      assert os.path.exists(os.path.join(report_dir, line.split("](")[1].rstrip(")")))


def test_figures_are_images_of_the_right_size(report_dir):
  pngs = [n for n in os.listdir(report_dir) if n.endswith(".png")]
  assert len(pngs) >= 2
  for name in pngs:
    # 2 x 3 panels of 5.2 x 3.8 inches at 110 dpi: about 1700 x 840 pixels.
    big = name.startswith("curves_")
    check_png(os.path.join(report_dir, name), min_size=(1400, 700) if big else (400, 250))
    svg = ET.parse(os.path.join(report_dir, name[:-4] + ".svg")).getroot()
    assert svg.tag.endswith("svg")


def test_table_numbers_equal_the_events(runs_root, report_dir):
  per_run = {}
  for arch in ARCHS:
    for seed in SEEDS:
      scalars = tf_scalars(run_dir(runs_root, arch, seed))
      top1 = scalars["eval/top1"]
      last = max(top1)
      assert last == STEPS
      best_step = min(s for s, v in top1.items() if v == max(top1.values()))
      per_run[(arch, seed)] = dict(
          best_top1=top1[best_step], best_top5=scalars["eval/top5"][best_step],
          best_step=best_step, final_top1=top1[last],
          final_top5=scalars["eval/top5"][last], final_loss=scalars["eval/loss"][last],
          images_per_sec=float(np.median(list(scalars["train/images_per_sec"].values()))))

  rows = read_csv(os.path.join(report_dir, "runs.csv"))
  assert len(rows) == len(ARCHS) * len(SEEDS)
  for row in rows:
    expected = per_run[(row["arch"], int(row["seed"]))]
    for key, value in expected.items():
      assert float(row[key]) == pytest.approx(value, rel=1e-6), key

  groups = {r["arch"]: r for r in read_csv(os.path.join(report_dir, "results.csv"))}
  assert set(groups) == set(ARCHS)
  for arch, row in groups.items():
    assert row["seeds"] == " ".join(map(str, SEEDS))
    assert int(row["params"]) > 0 and float(row["train_gflops_per_image"]) > 0
    for key in ("best_top1", "final_top1", "final_top5", "final_loss"):
      values = [per_run[(arch, s)][key] for s in SEEDS]
      assert float(row[f"{key}_mean"]) == pytest.approx(np.mean(values), rel=1e-6)
      assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-5,
                                                       abs=1e-9)

  (diff,) = read_csv(os.path.join(report_dir, "differences.csv"))
  assert diff["arch"] == "diffvit" and diff["baseline"] == "vit"
  for key in ("best_top1", "final_top1"):
    per_seed = [per_run[("diffvit", s)][key] - per_run[("vit", s)][key] for s in SEEDS]
    assert float(diff[f"{key}_mean"]) == pytest.approx(np.mean(per_seed), abs=1e-7)
    assert float(diff[f"{key}_std"]) == pytest.approx(np.std(per_seed, ddof=1), abs=1e-7)

  # The Markdown table shows the same numbers, in percent.
  with open(os.path.join(report_dir, "results.md")) as f:
    table = f.read()
  vit = groups["vit"]
  assert f"{100 * float(vit['best_top1_mean']):.2f} ± {100 * float(vit['best_top1_std']):.2f}" in (
      table)


def test_lambda_is_logged_per_layer_for_differential_runs_only(runs_root):
  diff = runs_lib.load_run(run_dir(runs_root, "diffvit", 0))
  vit = runs_lib.load_run(run_dir(runs_root, "vit", 0))
  assert diff.lambda_tags() == ["lambda/layer_1", "lambda/layer_2"]
  assert vit.lambda_tags() == []


def test_resumed_run_keeps_the_last_value_per_step(tmp_path):
  from clu import metric_writers

  first = metric_writers.SummaryWriter(str(tmp_path))
  for step in (10, 20, 30):  # Interrupted after step 30; the checkpoint was at 20.
    first.write_scalars(step, {"train/loss": float(step), "eval/top1": 0.1})
  first.close()
  second = metric_writers.SummaryWriter(str(tmp_path))
  for step in (30, 40):  # Resumed from 20: logs 30 again, and 40.
    second.write_scalars(step, {"train/loss": 100.0 + step})
  second.close()
  assert len(events.event_files(str(tmp_path))) == 2
  scalars = events.read_scalars(str(tmp_path))
  assert scalars["train/loss"].steps.tolist() == [10, 20, 30, 40]
  assert scalars["train/loss"].values.tolist() == [10.0, 20.0, 130.0, 140.0]
  # A tag the resumed session has not logged again keeps its old points.
  assert scalars["eval/top1"].steps.tolist() == [10, 20, 30]


def test_resume_drops_points_the_new_session_has_not_reached(tmp_path):
  from clu import metric_writers

  first = metric_writers.SummaryWriter(str(tmp_path))
  for step in (10, 20, 30, 40):
    first.write_scalars(step, {"train/loss": 1.0})
  first.close()
  second = metric_writers.SummaryWriter(str(tmp_path))
  second.write_scalars(30, {"train/loss": 2.0})  # Restarted at 20, killed again after 30.
  second.close()
  series = events.read_scalars(str(tmp_path))["train/loss"]
  assert series.steps.tolist() == [10, 20, 30]
  assert series.values.tolist() == [1.0, 1.0, 2.0]


def _fake_run(name, arch, params, seed=0, width=64, protocol="v2"):
  info = dict(name=name, arch=arch, params=params, seed=seed, protocol=protocol,
              config=dict(model=dict(width=width, depth=4, num_heads=4, mlp_dim=128,
                                     patch_size=2), data=dict(image_size=16)))
  return runs_lib.Run(workdir=f"/runs/{name}/{seed}", info=info, scalars={}, robustness=None)


def test_sizes_from_names_or_matched_param_counts():
  runs = [_fake_run("vit_10m,v2", "vit", 10_100_000), _fake_run("diffvit_10m,v2", "diffvit",
                                                                 10_120_000),
          _fake_run("vit_digits", "vit", 204_000, protocol="digits"),
          _fake_run("diffvit_digits", "diffvit", 204_100, protocol="digits"),
          _fake_run("vit_digits", "vit", 800_000, width=128, protocol="digits")]
  runs_lib.assign_sizes(runs)
  assert [r.size for r in runs] == ["10m", "10m", "204k", "204k", "800k"]
  groups = runs_lib.group_runs(runs)
  assert [(g.protocol, g.size, g.arch) for g in groups] == [
      ("digits", "204k", "vit"), ("digits", "204k", "diffvit"), ("digits", "800k", "vit"),
      ("v2", "10m", "vit"), ("v2", "10m", "diffvit")]


def test_seeds_are_aligned_on_the_steps_they_all_have():
  a = _fake_run("vit_10m,v2", "vit", 1, seed=0)
  b = _fake_run("vit_10m,v2", "vit", 1, seed=1)
  a.scalars["eval/top1"] = events.Series([10, 20, 30], [0.1, 0.2, 0.3])
  b.scalars["eval/top1"] = events.Series([10, 20], [0.3, 0.4])  # still running
  steps, values = runs_lib.aligned([a, b], "eval/top1")
  assert steps.tolist() == [10, 20]
  np.testing.assert_allclose(values, [[0.1, 0.2], [0.3, 0.4]])
  assert runs_lib.aligned([a, _fake_run("x", "vit", 1)], "eval/top1") is None


def test_bad_run_dirs_are_one_line_errors(tmp_path, capsys):
  assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and "run_info.json" in err and "Traceback" not in err


def test_nan_free_summary(runs_root):
  summary = runs_lib.load_run(run_dir(runs_root, "vit", 0)).summary()
  assert all(not math.isnan(v) for v in summary.values()), summary


def test_sizes_get_their_own_and_a_cross_size_figure(tmp_path):
  workdirs = []
  for size, params, depth in (("10m", 10_100_000, 8), ("20m", 20_200_000, 11)):
    for arch in ARCHS:
      for seed in SEEDS:
        workdirs.append(write_synthetic_run(
            tmp_path / "runs" / f"{arch}_{size}" / f"seed{seed}", name=f"{arch}_{size},v2",
            arch=arch, params=params, seed=seed, depth=depth,
            evals=rising_evals(0.5 + 0.01 * seed)))
  out = str(tmp_path / "report")
  assert report.main([*workdirs, "--out", out]) == 0
  names = set(os.listdir(out))
  for stem in ("curves_v2_10m", "curves_v2_20m", "curves_v2_vit", "curves_v2_diffvit",
               "lambda_v2"):
    check_png(os.path.join(out, stem + ".png"))
  assert len(read_csv(os.path.join(out, "differences.csv"))) == 2
  assert {r["size"] for r in read_csv(os.path.join(out, "results.csv"))} == {"10m", "20m"}
  assert not any(n.startswith("robustness") for n in names)
