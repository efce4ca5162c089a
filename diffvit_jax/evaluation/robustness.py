r"""Accuracy under common corruptions: `--mode eval_corrupted`.

  python -m diffvit_jax.main --workdir RUN --mode eval_corrupted \
      [--baseline_workdir VIT_RUN] [--severities 1,2,3,4,5] [--corruptions a,b] [--best]

Evaluates the run's latest (or best) checkpoint on the validation set, clean
and under every corruption of `data.corruptions` at every severity (the
published Tiny-ImageNet-C files instead when data.source='tiny_imagenet_c'),
with the trainer's own evaluation (`train.evaluate`). Writes into RUN:

  robustness.json   clean and per-cell {top1, top5, loss}, the mean corruption
                    error, and, with a baseline, CE per corruption and the mCE
  robustness.csv    one row per (corruption, severity), plus the clean row
  robustness.{png,svg}  top-1 vs severity, one line per corruption, clean as reference

Errors (E = 1 - top-1):
  mean corruption error = mean over corruptions c and severities s of E_{c,s}
  CE_c = sum_s E_{c,s} / sum_s E_{c,s}(baseline),   mCE = mean_c CE_c
(ImageNet-C's definitions, with the baseline a named run of this project, e.g.
the ViT of the same size, instead of AlexNet.) The baseline's robustness.json
must exist (run this mode on it first) and cover the same cells.

Both means are over the benchmark's 15 corruptions only. A result that lacks
any of their 75 cells (generated corruptions always lack frost, which needs the
generator's photographs) is labelled "partial" and lists what is missing;
corruptions outside the 15 (speckle noise, gaussian blur) are reported apart,
under "extras". Only the published Tiny-ImageNet-C folders
(data.source='tiny_imagenet_c') give numbers comparable with papers: the
generator's base images are ImageNet validation crops, not Tiny ImageNet's
validation images, so generated corruptions compare models of this project only.

Each finished cell is written to robustness.json at once: an interrupted
evaluation resumes where it stopped when rerun on the same checkpoint.
"""

import csv
import json
import math
import os

import jax
import numpy as np
from absl import logging

from diffvit_jax import files
from diffvit_jax.errors import CheckpointError, ConfigError, DataError
from diffvit_jax.reporting import plots
from diffvit_jax.training import checkpointing

RESULTS_JSON = "robustness.json"
RESULTS_CSV = "robustness.csv"
RESULTS_PLOT = "robustness"  # .png and .svg
DEFAULT_SEVERITIES = (1, 2, 3, 4, 5)


def available_corruptions(data_config) -> tuple[str, ...]:
  """What can be evaluated: generated corruptions, or the published folders' names."""
  from diffvit_jax.data import corruptions

  if data_config.source == "tiny_imagenet_c":
    return tuple(corruptions.PUBLISHED_CORRUPTIONS)
  return tuple(corruptions.CORRUPTIONS)


def _check_choice(config, names, severities) -> tuple[list[str], list[int]]:
  available = available_corruptions(config.data)
  names = list(names) or list(available)
  unknown = [n for n in names if n not in available]
  if unknown and config.data.source != "tiny_imagenet_c":
    from diffvit_jax.data import corruptions

    for name in unknown:
      if name in corruptions.PUBLISHED_ONLY:  # Says why (frost) and where to find it.
        corruptions.check(name, 1, "--corruptions")
  if unknown:
    raise ConfigError(f"--corruptions: {', '.join(unknown)} not available for data.source="
                      f"{config.data.source!r}; choose from {', '.join(available)}.")
  try:
    severities = sorted({int(s) for s in severities})
  except ValueError as e:
    raise ConfigError(f"--severities: expected integers 1..5, got {list(severities)}.") from e
  if not severities or any(s not in DEFAULT_SEVERITIES for s in severities):
    raise ConfigError(f"--severities: expected integers 1..5, got {severities}.")
  return names, severities


def _data_identity(config, num_eval: int) -> dict:
  """What must be equal for two results to describe the same images."""
  d = config.data
  identity = dict(source=d.source, eval_split=d.eval_split, num_eval=num_eval)
  if d.source != "tiny_imagenet_c":  # Generated: with or without the final JPEG save.
    identity["corruption_jpeg"] = bool(d.get("corruption_jpeg", True))
  return identity


COMPARABILITY_NOTE = (
    "Only the published Tiny-ImageNet-C folders (data.source='tiny_imagenet_c'), all 15 "
    "corruptions at all 5 severities, give numbers comparable with papers. Generated "
    "corruptions follow the published generator but start from Tiny ImageNet's validation "
    "images, not the generator's ImageNet crops, and cannot include frost: they compare "
    "models of this project with each other.")


def coverage(cells: dict, source: str = "") -> dict:
  """Whether `cells` hold the whole benchmark: 'full' or 'partial', what is missing, extras."""
  from diffvit_jax.data import corruptions

  benchmark = corruptions.BENCHMARK_CORRUPTIONS
  missing = [f"{c}/{s}" for c in benchmark for s in DEFAULT_SEVERITIES
             if str(s) not in cells.get(c, {})]
  missing_corruptions = [c for c in benchmark if c not in cells]
  status = "partial" if missing else "full"
  return dict(status=status, missing=missing, missing_corruptions=missing_corruptions,
              extras=sorted(c for c in cells if c not in benchmark),
              comparable_with_papers=status == "full" and source == "tiny_imagenet_c",
              note=COMPARABILITY_NOTE)


def _split_benchmark(cells: dict) -> tuple[dict, dict]:
  """(the benchmark's corruptions, the extras) of `cells`."""
  from diffvit_jax.data import corruptions

  benchmark = {c: v for c, v in cells.items() if c in corruptions.BENCHMARK_CORRUPTIONS}
  return benchmark, {c: v for c, v in cells.items() if c not in benchmark}


# --- The summary numbers (pure functions of the cells) ---------------------------------------

def mean_corruption_error(cells: dict[str, dict[str, dict]]) -> float:
  """Mean over corruptions and severities of 1 - top-1 (NaN for no cells)."""
  errors = [1.0 - v["top1"] for c in cells.values() for v in c.values()]
  return float(np.mean(errors)) if errors else math.nan


def corruption_errors(cells: dict, baseline_cells: dict) -> dict[str, float]:
  """CE_c = sum_s E_{c,s} / sum_s E_{c,s}(baseline), over the model's severities."""
  ce = {}
  for name, by_severity in cells.items():
    mine = sum(1.0 - v["top1"] for v in by_severity.values())
    theirs = sum(1.0 - baseline_cells[name][s]["top1"] for s in by_severity)
    ce[name] = mine / theirs if theirs > 0 else math.nan
  return ce


def relative_corruption_errors(cells: dict, clean_top1: float, baseline_cells: dict,
                               baseline_clean_top1: float) -> dict[str, float]:
  """Relative CE_c = sum_s (E_{c,s} - E_clean) / sum_s (E_{c,s}(baseline) - E_clean(baseline)).

  Hendrycks & Dietterich's relative CE: the degradation from the clean error,
  so that a difference in clean accuracy does not leak into it.
  """
  out = {}
  for name, by_severity in cells.items():
    mine = sum((1.0 - v["top1"]) - (1.0 - clean_top1) for v in by_severity.values())
    theirs = sum((1.0 - baseline_cells[name][s]["top1"]) - (1.0 - baseline_clean_top1)
                 for s in by_severity)
    out[name] = mine / theirs if theirs > 0 else math.nan
  return out


def paired_with_baseline(result: dict, baseline: dict) -> dict:
  """CE per corruption, mCE and relative mCE of `result` against the baseline run's result.

  Both are robustness.json results of runs of one protocol, size and seed;
  DataError unless they were evaluated on the same images and the same cells.
  Over the benchmark's corruptions, as `relative_to`.
  """
  if baseline.get("data") != result.get("data"):
    raise DataError(f"{result.get('workdir')} and its baseline {baseline.get('workdir')} were "
                    "evaluated on other images; CE needs both on the same validation set.")
  _check_baseline_cells(baseline, baseline.get("workdir", "the baseline"), result["corrupted"],
                        {s for by_sev in result["corrupted"].values() for s in by_sev})
  benchmark, _ = _split_benchmark(result["corrupted"])
  ce = corruption_errors(benchmark, baseline["corrupted"])
  relative = relative_corruption_errors(benchmark, result["clean"]["top1"],
                                        baseline["corrupted"], baseline["clean"]["top1"])
  mean = lambda values: float(np.mean(values)) if values else math.nan
  return dict(ce=ce, mce=mean(list(ce.values())), relative_ce=relative,
              relative_mce=mean(list(relative.values())),
              mean_corruption_error_difference=(
                  mean_corruption_error(benchmark) - mean_corruption_error(
                      {c: {s: baseline["corrupted"][c][s] for s in by_severity}
                       for c, by_severity in benchmark.items()})),
              status=coverage(result["corrupted"])["status"])


def summarise(result: dict) -> dict:
  """Adds the derived numbers to a result holding 'clean' and 'corrupted'.

  The mean corruption error is over the benchmark's corruptions; the extras get
  their own, and `coverage` says whether the benchmark is complete.
  """
  cells = result["corrupted"]
  benchmark, extras = _split_benchmark(cells)
  result["mean_corruption_error"] = mean_corruption_error(benchmark)
  result["extras_mean_corruption_error"] = mean_corruption_error(extras)
  result["per_corruption_top1"] = {
      name: float(np.mean([v["top1"] for v in by_sev.values()])) for name, by_sev in cells.items()}
  result["coverage"] = coverage(cells, result.get("data", {}).get("source", ""))
  return result


def _check_baseline_cells(baseline: dict, baseline_workdir: str, names, severities) -> None:
  missing = [f"{c}/{s}" for c in names for s in sorted(severities, key=int)
             if str(s) not in baseline.get("corrupted", {}).get(c, {})]
  if missing:
    raise DataError(f"The baseline {baseline_workdir} has no results for {', '.join(missing)} "
                    "(corruption/severity). Run --mode eval_corrupted on it with the same "
                    "--corruptions and --severities first.")


def relative_to(result: dict, baseline: dict, baseline_workdir: str) -> dict:
  """CE per corruption and mCE of `result` against the `baseline` result."""
  if baseline.get("data") != result["data"]:
    raise DataError(f"The baseline {baseline_workdir} was evaluated on other images "
                    f"({baseline.get('data')}) than this run ({result['data']}); CE needs both "
                    "on the same validation set.")
  _check_baseline_cells(baseline, baseline_workdir, result["corrupted"],
                        {s for by_sev in result["corrupted"].values() for s in by_sev})
  benchmark, extras = _split_benchmark(result["corrupted"])
  ce = corruption_errors(benchmark, baseline["corrupted"])
  extras_ce = corruption_errors(extras, baseline["corrupted"])
  if any(math.isnan(v) for v in (*ce.values(), *extras_ce.values())):
    logging.warning("The baseline makes no errors on some corruption: its CE is undefined.")
  cover = coverage(result["corrupted"], result["data"].get("source", ""))
  return dict(baseline_workdir=baseline_workdir, baseline_name=baseline.get("name", ""),
              baseline_step=baseline.get("step"), ce=ce,
              mce=float(np.mean(list(ce.values()))) if ce else math.nan,
              mce_status=cover["status"], mce_missing=cover["missing"], extras_ce=extras_ce)


# --- Files -------------------------------------------------------------------------------------

def read_results(workdir: str) -> dict | None:
  path = os.path.join(workdir, RESULTS_JSON)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise DataError(f"{path} is not valid JSON ({e}); delete it and rerun "
                    "--mode eval_corrupted.") from e


def write_csv(result: dict, path: str) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["corruption", "severity", "top1", "top5", "loss", "error"])
    clean = result["clean"]
    writer.writerow(["clean", 0, clean["top1"], clean["top5"], clean["loss"], 1 - clean["top1"]])
    for name, by_severity in result["corrupted"].items():
      for severity, v in sorted(by_severity.items(), key=lambda kv: int(kv[0])):
        writer.writerow([name, severity, v["top1"], v["top5"], v["loss"], 1 - v["top1"]])


def write_plot(result: dict, path_without_ext: str) -> list[str]:
  title = (f"{result.get('name', '')} step {result['step']}: top-1 under corruption "
           f"(mean corruption error {100 * result['mean_corruption_error']:.1f}%")
  if result.get("relative"):
    title += f", mCE {100 * result['relative']['mce']:.1f}%"
  if result.get("coverage", {}).get("status") == "partial":
    title += ", partial: not the whole benchmark"
  return plots.save(plots.accuracy_vs_severity(result, title + ")"), path_without_ext)


# --- The evaluation ---------------------------------------------------------------------------

def _restore_state(config, workdir: str, best: bool):
  """(mesh, info, eval_step, state with the checkpoint's parameters, step) via the trainer."""
  from diffvit_jax.training import loop as train

  params, run_config, step = checkpointing.load_for_inference(workdir, best=best)
  checkpointing.check_same_run(config, run_config, workdir)
  run = train.setup(config, workdir, for_training=False)
  trainer = run.trainer
  replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(params, replicated)
  if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(trainer.state.params):
    raise CheckpointError(f"The parameters in {workdir} do not have this model's structure.")
  return (trainer.mesh, run.info, trainer.eval_step, trainer.state.replace(params=params),
          step)


def evaluate_corrupted(config, workdir: str, *, baseline_workdir: str = "",
                       corruptions=(), severities=DEFAULT_SEVERITIES, best: bool = False) -> dict:
  """Evaluates the checkpoint clean and under every corruption x severity; writes the files.

  Returns the summary printed by `main`: step, clean top-1, the mean corruption
  error, the mCE when there is a baseline, and where the results are.
  """
  from diffvit_jax.training import loop as train

  workdir, baseline_workdir = os.fspath(workdir), os.fspath(baseline_workdir)
  names, severities = _check_choice(config, corruptions, severities)
  baseline = None
  if baseline_workdir:  # Checked before the (long) evaluation, not after.
    baseline = read_results(baseline_workdir)
    if baseline is None:
      raise DataError(f"--baseline_workdir {baseline_workdir} has no {RESULTS_JSON}: run "
                      f"--mode eval_corrupted on it first (same --corruptions, --severities).")
    _check_baseline_cells(baseline, baseline_workdir, names, severities)
  mesh, info, eval_step, state, step = _restore_state(config, workdir, best)
  is_chief = jax.process_index() == 0
  json_path = os.path.join(workdir, RESULTS_JSON)

  result = dict(name=config.name or config.model.arch, arch=config.model.arch,
                workdir=workdir, step=step, checkpoint="best" if best else "latest",
                data=_data_identity(config, info.num_eval), clean=None, corrupted={})
  previous = read_results(workdir)
  if previous and all(previous.get(k) == result[k] for k in ("step", "checkpoint", "data")):
    # Same checkpoint, same images: keep what an interrupted evaluation finished.
    result["clean"] = previous.get("clean")
    result["corrupted"] = {c: dict(v) for c, v in previous.get("corrupted", {}).items()
                           if c in names}

  def evaluate(corruption="", severity=0):
    metrics = train.evaluate(eval_step, state, config, mesh, corruption=corruption,
                             severity=severity)
    return {k: float(metrics[k]) for k in ("top1", "top5", "loss")}

  if result["clean"] is None:
    result["clean"] = evaluate()
  total = len(names) * len(severities)
  for name in names:
    for severity in severities:
      cells = result["corrupted"].setdefault(name, {})
      if str(severity) in cells:
        continue
      cells[str(severity)] = evaluate(name, severity)
      done = sum(len(v) for v in result["corrupted"].values())
      logging.info("%s severity %d: top-1 %.4f (%d/%d)", name, severity,
                   cells[str(severity)]["top1"], done, total)
      if is_chief:
        files.write_json(json_path, result)
  # Only the requested severities count in the summary.
  result["corrupted"] = {c: {str(s): result["corrupted"][c][str(s)] for s in severities}
                         for c in names}
  summarise(result)
  if baseline is not None:
    result["relative"] = relative_to(result, baseline, baseline_workdir)
  if is_chief:
    files.write_json(json_path, result)
    write_csv(result, os.path.join(workdir, RESULTS_CSV))
    write_plot(result, os.path.join(workdir, RESULTS_PLOT))
  cover = result["coverage"]
  if cover["status"] == "partial":
    logging.warning("Partial result: the benchmark's mean corruption error and mCE miss %s.",
                    ", ".join(cover["missing_corruptions"]) or ", ".join(cover["missing"]))
  summary = dict(step=step, clean_top1=result["clean"]["top1"],
                 mean_corruption_error=result["mean_corruption_error"],
                 coverage=cover["status"], missing=cover["missing"], extras=cover["extras"],
                 comparable_with_papers=cover["comparable_with_papers"], results=json_path)
  if baseline is not None:
    summary["mce"] = result["relative"]["mce"]
  return summary
