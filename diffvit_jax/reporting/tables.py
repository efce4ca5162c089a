"""The results tables: the verdict, per config (seeds as mean and std), per run, comparisons.

Each table is a list of dicts (one per row) with numeric cells, written as
CSV (full precision, for other tools) and rendered as Markdown (percentages,
mean +- std over seeds, for people).

Comparisons pair each differential config with the classic ViT of the same
protocol and size, run by run by seed. Only parameter-matched pairs (within
`MATCH_TOLERANCE`) say something about the attention alone; the others
(DiffViT-v2, whose wider queries and W_lambda add parameters and FLOPs) are
shown apart, with their parameters and training FLOPs beside the accuracy.
"""

import csv
import dataclasses
import math

import numpy as np

from diffvit_jax.models import registry
from diffvit_jax.reporting import runs as runs_lib
from diffvit_jax.reporting import verdict

# Per-run numbers that get a mean and a std over seeds; see `Run.summary` for their source.
METRICS = ("final_top1", "final_top5", "final_loss", "best_top1", "best_top5", "best_step",
           "images_per_sec", "train_seconds")
# Per-seed differences (model minus ViT) of the comparison tables.
DIFF_METRICS = ("final_top1", "final_top5", "final_loss", "best_top1")
# The verdict: (metric, whether higher is better).
VERDICT_METRICS = (("final_top1", True), ("final_loss", False))
# Largest relative parameter gap of a pair that is still compared as matched.
MATCH_TOLERANCE = 0.005


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
  return float(values.mean()), std


def _by_seed(group: runs_lib.Group, metric: str) -> dict[int, float]:
  values = {}
  for run in group.runs:
    values.setdefault(run.seed, run.summary()[metric])
  return values


@dataclasses.dataclass
class Comparison:
  """A differential config and the classic config of the same protocol and size."""

  baseline: runs_lib.Group
  model: runs_lib.Group

  @property
  def param_gap(self) -> float:
    """Relative parameter difference, model / baseline - 1."""
    return self.model.params / self.baseline.params - 1 if self.baseline.params else math.nan

  @property
  def matched(self) -> bool:
    return abs(self.param_gap) <= MATCH_TOLERANCE

  @property
  def paired_seeds(self) -> list[int]:
    return sorted(set(self.baseline.seeds) & set(self.model.seeds))

  def differences(self, metric: str) -> list[float]:
    """Model minus baseline per paired seed (the first run of a seed that has several)."""
    base, mine = _by_seed(self.baseline, metric), _by_seed(self.model, metric)
    return [mine[s] - base[s] for s in self.paired_seeds]

  def interval(self, metric: str) -> verdict.PairedInterval:
    return verdict.paired_interval(self.differences(metric))


def comparisons(groups: list[runs_lib.Group]) -> list[Comparison]:
  """Each differential config against the one classic config of its protocol and size."""
  out = []
  by_key: dict[tuple, list[runs_lib.Group]] = {}
  for group in groups:
    by_key.setdefault((group.protocol, group.size), []).append(group)
  for members in by_key.values():
    baselines = [g for g in members if g.differential is False]
    if len(baselines) != 1:
      continue
    out += [Comparison(baselines[0], g) for g in members if g.differential]
  return out


def run_rows(groups: list[runs_lib.Group]) -> list[dict]:
  rows = []
  for group in groups:
    for run in group.runs:
      rows.append(dict(protocol=group.protocol, size=group.size, arch=group.arch,
                       name=group.name, seed=run.seed, params=run.params,
                       **run.summary(), workdir=run.workdir))
  return rows


def group_rows(groups: list[runs_lib.Group]) -> list[dict]:
  rows = []
  for group in groups:
    summaries = [r.summary() for r in group.runs]
    params = sorted({r.params for r in group.runs})
    row = dict(protocol=group.protocol, size=group.size, arch=group.arch, name=group.name,
               params=params[0] if len(params) == 1 else "/".join(map(str, params)),
               train_gflops_per_image=group.gflops_per_image,
               seeds=" ".join(map(str, group.seeds)), n_seeds=len(group.runs),
               steps=min(s["steps"] for s in summaries))
    for metric in METRICS:
      row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([s[metric] for s in summaries])
    rows.append(row)
  return rows


def _comparison_row(comparison: Comparison) -> dict:
  base, model = comparison.baseline, comparison.model
  return dict(protocol=model.protocol, size=model.size, arch=model.arch, baseline=base.arch,
              seeds=len(model.runs), baseline_seeds=len(base.runs),
              paired_seeds=" ".join(map(str, comparison.paired_seeds)),
              n_paired=len(comparison.paired_seeds))


def _interval_cells(interval: verdict.PairedInterval, prefix: str) -> dict:
  return {f"{prefix}_mean": interval.mean, f"{prefix}_std": interval.std,
          f"{prefix}_ci_low": interval.low, f"{prefix}_ci_high": interval.high}


def verdict_rows(comparisons_: list[Comparison]) -> list[dict]:
  """Per matched pair and verdict metric: the paired mean difference, its CI, the reading.

  With fewer than `verdict.MIN_SEEDS` paired seeds the difference and its
  interval are left out (NaN): the row carries only the reading that no
  conclusion is possible.
  """
  rows = []
  for comparison in comparisons_:
    if not comparison.matched:
      continue
    for metric, higher_is_better in VERDICT_METRICS:
      interval = comparison.interval(metric)
      row = _comparison_row(comparison)
      row.update(metric=metric, confidence=interval.confidence,
                 interval="paired t (two-sided)",
                 reading=verdict.reading(interval, comparison.model.label,
                                         higher_is_better=higher_is_better))
      if interval.conclusive:
        row.update(mean=interval.mean, std=interval.std, ci_low=interval.low,
                   ci_high=interval.high)
      else:
        row.update(mean=math.nan, std=math.nan, ci_low=math.nan, ci_high=math.nan)
      rows.append(row)
  return rows


def difference_rows(comparisons_: list[Comparison]) -> list[dict]:
  """Per matched pair: mean per-seed difference and its paired t-interval, per metric."""
  rows = []
  for comparison in comparisons_:
    if not comparison.matched:
      continue
    row = _comparison_row(comparison)
    row["param_gap"] = comparison.param_gap
    for metric in DIFF_METRICS:
      row.update(_interval_cells(comparison.interval(metric), metric))
    rows.append(row)
  return rows


def unmatched_rows(comparisons_: list[Comparison]) -> list[dict]:
  """Pairs whose parameter counts differ by more than `MATCH_TOLERANCE`, with their costs."""
  rows = []
  for comparison in comparisons_:
    if comparison.matched:
      continue
    base, model = comparison.baseline, comparison.model
    row = _comparison_row(comparison)
    row.update(params=model.params, baseline_params=base.params,
               param_gap=comparison.param_gap,
               train_gflops_per_image=model.gflops_per_image,
               baseline_train_gflops_per_image=base.gflops_per_image,
               gflops_gap=model.gflops_per_image / base.gflops_per_image - 1)
    for metric in ("final_top1", "final_loss"):
      row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(
          [r.summary()[metric] for r in model.runs])
      row[f"baseline_{metric}_mean"], row[f"baseline_{metric}_std"] = _mean_std(
          [r.summary()[metric] for r in base.runs])
    interval = comparison.interval("final_top1")
    row.update(_interval_cells(interval, "final_top1_diff"))
    row["reading"] = verdict.reading(interval, model.label)
    rows.append(row)
  return rows


def robustness_rows(groups: list[runs_lib.Group]) -> list[dict]:
  """Per config with `robustness.json` in every seed: clean top-1, mean corruption error, mCE."""
  rows = []
  for group in groups:
    results = [r.robustness for r in group.runs]
    if any(r is None for r in results):
      continue
    row = dict(protocol=group.protocol, size=group.size, arch=group.arch, name=group.name,
               n_seeds=len(results))
    row["clean_top1_mean"], row["clean_top1_std"] = _mean_std(
        [r["clean"]["top1"] for r in results])
    row["mean_corruption_error_mean"], row["mean_corruption_error_std"] = _mean_std(
        [r["mean_corruption_error"] for r in results])
    # Results older than the coverage field did not check it: not known to be full.
    row["coverage"] = ("full" if all(r.get("coverage", {}).get("status") == "full"
                                     for r in results) else "partial")
    relative = [r.get("relative") for r in results]
    if all(relative):
      row["mce_mean"], row["mce_std"] = _mean_std([r["mce"] for r in relative])
      row["mce_baseline"] = " ".join(sorted({r["baseline_name"] for r in relative}))
    else:
      row["mce_mean"] = row["mce_std"] = math.nan
      row["mce_baseline"] = ""
    for name in sorted(results[0]["corrupted"]):
      row[f"top1/{name}"] = float(np.mean([r["per_corruption_top1"][name] for r in results
                                           if name in r["per_corruption_top1"]]))
    rows.append(row)
  return rows


def write_csv(rows: list[dict], path: str) -> None:
  columns = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)


# --- Markdown rendering ---------------------------------------------------------------------

def _pct(mean: float, std: float = math.nan, *, signed: bool = False) -> str:
  if math.isnan(mean):
    return "-"
  text = f"{100 * mean:+.2f}" if signed else f"{100 * mean:.2f}"
  return text if math.isnan(std) else f"{text} ± {100 * std:.2f}"


def _num(mean: float, std: float = math.nan, digits: int = 3) -> str:
  if math.isnan(mean):
    return "-"
  text = f"{mean:.{digits}f}"
  return text if math.isnan(std) else f"{text} ± {std:.{digits}f}"


def _gflops(value: float) -> str:
  return "-" if math.isnan(value) else f"{value:.3g}"


def _duration(seconds: float) -> str:
  if math.isnan(seconds):
    return "-"
  if seconds < 120:
    return f"{seconds:.0f} s"
  hours, minutes = divmod(round(seconds / 60), 60)
  return f"{hours}h {minutes:02d}m" if hours else f"{minutes} min"


def markdown_table(header: list[str], rows: list[list[str]], align: str = "") -> str:
  align = align or "l" * len(header)
  rule = ["---:" if a == "r" else "---" for a in align]
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def _params(value) -> str:
  return f"{value:,}" if isinstance(value, int) else str(value)


def _signed(value: float, metric: str) -> str:
  """A difference: percentage points for accuracies, plain for losses."""
  if math.isnan(value):
    return "-"
  return f"{value:+.4f}" if metric.endswith("loss") else f"{100 * value:+.2f} pp"


def _interval(mean: float, low: float, high: float, metric: str) -> str:
  """'+1.20 pp [+0.40, +2.00]': the mean difference and its confidence interval."""
  if math.isnan(mean):
    return "-"
  if math.isnan(low):
    return _signed(mean, metric)
  bounds = (f"{v:+.4f}" if metric.endswith("loss") else f"{100 * v:+.2f}" for v in (low, high))
  return f"{_signed(mean, metric)} [{', '.join(bounds)}]"


_METRIC_NAMES = {"final_top1": "final top-1", "final_top5": "final top-5",
                 "final_loss": "final val loss", "best_top1": "best-on-val top-1"}


def verdict_markdown(rows: list[dict]) -> str:
  header = ["protocol", "size", "comparison", "metric", "mean difference", "95% CI (paired t)",
            "paired seeds", "reading"]
  body = []
  for r in rows:
    metric = r["metric"]
    conclusive = not math.isnan(r["mean"])
    ci = (f"[{_signed(r['ci_low'], metric)}, {_signed(r['ci_high'], metric)}]" if conclusive
          else "-")
    body.append([r["protocol"], r["size"],
                 f"{registry.label(r['arch'])} − {registry.label(r['baseline'])}",
                 _METRIC_NAMES[metric], _signed(r["mean"], metric), ci, str(r["n_paired"]),
                 r["reading"]])
  return markdown_table(header, body, "llllrrrl")


def results_markdown(rows: list[dict]) -> str:
  header = ["arch", "size", "params", "train GFLOPs/img", "protocol", "seeds", "steps",
            "final top-1 %", "final top-5 %", "final val loss", "best-on-val top-1 %",
            "its top-5 %", "its step", "train img/s", "wall time"]
  body = []
  for r in rows:
    body.append([
        registry.label(r["arch"]), r["size"], _params(r["params"]),
        _gflops(r["train_gflops_per_image"]),
        r["protocol"], r["seeds"], f"{r['steps']:.0f}",
        _pct(r["final_top1_mean"], r["final_top1_std"]),
        _pct(r["final_top5_mean"], r["final_top5_std"]),
        _num(r["final_loss_mean"], r["final_loss_std"]),
        _pct(r["best_top1_mean"], r["best_top1_std"]),
        _pct(r["best_top5_mean"], r["best_top5_std"]),
        _num(r["best_step_mean"], digits=0),
        _num(r["images_per_sec_mean"], digits=0), _duration(r["train_seconds_mean"])])
  return markdown_table(header, body, "lllrllrrrrrrrrr")


def differences_markdown(rows: list[dict]) -> str:
  """Matched pairs only; with fewer than `verdict.MIN_SEEDS` pairs no difference is shown."""
  header = (["size", "protocol", "model", "params vs ViT"]
            + [f"{_METRIC_NAMES[m]}" for m in DIFF_METRICS] + ["seeds (model / ViT / paired)"])
  body = []
  for r in rows:
    conclusive = r["n_paired"] >= verdict.MIN_SEEDS
    cells = [_interval(r[f"{m}_mean"], r[f"{m}_ci_low"], r[f"{m}_ci_high"], m) if conclusive
             else "no conclusion" for m in DIFF_METRICS]
    body.append([r["size"], r["protocol"],
                 f"{registry.label(r['arch'])} − {registry.label(r['baseline'])}",
                 f"{100 * r['param_gap']:+.2f}%"] + cells
                + [f"{r['seeds']} / {r['baseline_seeds']} / {r['n_paired']}"])
  return markdown_table(header, body, "lll" + "r" * (len(DIFF_METRICS) + 2))


def unmatched_markdown(rows: list[dict]) -> str:
  header = ["size", "protocol", "model", "params", "train GFLOPs/img", "final top-1 %",
            "final val loss", "top-1 difference [95% CI]", "paired seeds", "reading"]
  body = []
  for r in rows:
    base, model = registry.label(r["baseline"]), registry.label(r["arch"])
    gflops_gap = "" if math.isnan(r["gflops_gap"]) else f" ({100 * r['gflops_gap']:+.1f}%)"
    conclusive = r["n_paired"] >= verdict.MIN_SEEDS
    diff = (_interval(r["final_top1_diff_mean"], r["final_top1_diff_ci_low"],
                      r["final_top1_diff_ci_high"], "final_top1") if conclusive else "-")
    body.append([r["size"], r["protocol"], f"{model} vs {base}",
                 f"{_params(round(r['params']))} vs {_params(round(r['baseline_params']))} "
                 f"({100 * r['param_gap']:+.1f}%)",
                 f"{_gflops(r['train_gflops_per_image'])} vs "
                 f"{_gflops(r['baseline_train_gflops_per_image'])}{gflops_gap}",
                 f"{_pct(r['final_top1_mean'], r['final_top1_std'])} vs "
                 f"{_pct(r['baseline_final_top1_mean'], r['baseline_final_top1_std'])}",
                 f"{_num(r['final_loss_mean'], r['final_loss_std'])} vs "
                 f"{_num(r['baseline_final_loss_mean'], r['baseline_final_loss_std'])}",
                 diff, str(r["n_paired"]), r["reading"]])
  return markdown_table(header, body, "llllrrrrrl")


def runs_markdown(rows: list[dict]) -> str:
  header = ["workdir", "arch", "size", "seed", "params", "steps", "final top-1 %",
            "final top-5 %", "final val loss", "best-on-val top-1 %", "its top-5 %",
            "its step", "train img/s", "wall time"]
  body = [[f"`{r['workdir']}`", registry.label(r["arch"]), r["size"],
           str(r["seed"]), _params(r["params"]), f"{r['steps']:.0f}", _pct(r["final_top1"]),
           _pct(r["final_top5"]), _num(r["final_loss"]), _pct(r["best_top1"]),
           _pct(r["best_top5"]), _num(r["best_step"], digits=0),
           _num(r["images_per_sec"], digits=0), _duration(r["train_seconds"])] for r in rows]
  return markdown_table(header, body, "llllrrrrrrrrrr")


def robustness_markdown(rows: list[dict]) -> str:
  header = ["arch", "size", "protocol", "seeds", "clean top-1 %",
            "mean corruption error %", "mCE % (baseline)"]
  body = []
  for r in rows:
    mce = _pct(r["mce_mean"], r["mce_std"])
    if r.get("coverage") == "partial":  # Not all 15 corruptions x 5 severities.
      mce += " partial"
    body.append([registry.label(r["arch"]), r["size"], r["protocol"],
                 str(r["n_seeds"]), _pct(r["clean_top1_mean"], r["clean_top1_std"]),
                 _pct(r["mean_corruption_error_mean"], r["mean_corruption_error_std"]),
                 f"{mce} ({r['mce_baseline']})" if r["mce_baseline"] else mce])
  table = markdown_table(header, body, "lllrrrr")
  names = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("top1/")})
  if not names:
    return table
  configs = [f"{registry.label(r['arch'])} {r['size']}" for r in rows]
  per = [[name.replace("_", " ")] + [_pct(r.get(f"top1/{name}", math.nan)) for r in rows]
         for name in names]
  return (table + "\n\nTop-1 % per corruption, mean over severities (and seeds):\n\n"
          + markdown_table(["corruption"] + configs, per, "l" + "r" * len(configs)))
