"""Secondary readings beside the verdict: descriptive, never a verdict, no multiplicity control.

- The pooled effect of a family (the per-size mean differences averaged with
  equal weights) and its trend with size, from the planned seeds.
- P(model > baseline) with a stratified bootstrap interval.
- Per size, the per-seed correlation of the two architectures and whether
  pairing by seed narrowed the interval (paired t against Welch's).
- Compute beside accuracy: training FLOPs, throughput, wall time, and each
  architecture's top-1 at the other's training time and FLOPs, from the curves.
"""

import math
import re

import numpy as np

from diffvit_jax.models import registry
from diffvit_jax.reporting import tables, verdict

METRIC = tables.PRIMARY_METRIC


def _families(comparisons, plan: tables.Plan) -> dict[tuple, list[tables.Comparison]]:
  families: dict[tuple, list] = {}
  for comparison in comparisons:
    if comparison.matched:
      families.setdefault((comparison.model.protocol, comparison.model.arch),
                          []).append(comparison)
  if plan.design is not None:  # Only the family's members, as the verdict.
    planned = {(p.protocol, p.baseline, p.model) for p in plan.design.family}
    families = {k: [c for c in v if (c.model.protocol, c.baseline.name, c.model.name)
                    in planned] for k, v in families.items()}
  return {k: v for k, v in families.items() if v}


def _planned_sizes(key: tuple, plan: tables.Plan, present: int) -> int:
  if plan.design is None:
    return present
  return sum(1 for p in plan.design.family if (p.protocol, p.model_arch) == key)


def level_value(level: str) -> float:
  """The number a level label starts with ('8 fragments' -> 8.0)."""
  return float(re.match(r"\s*(\d+(?:\.\d+)?)", level).group(1))


def level_unit(level: str) -> str:
  """What one step of a level counts ('8 fragments' -> 'fragment'); '' without a level."""
  unit = re.sub(r"^\s*\d+(?:\.\d+)?\s*", "", level)
  return unit[:-1] if unit.endswith("s") else unit


def _axis_value(comparison) -> float:
  """x of the trend: the study's level where it has one (the clutter study's interaction:
  the difference against fragments per image), else log10(parameters)."""
  level = comparison.model.level
  return level_value(level) if level else float(np.log10(comparison.baseline.params))


def pooled_rows(comparisons, plan: tables.Plan | None = None) -> list[dict]:
  """Per family: pooled effect, trend with size (or level: the interaction), P(better); per
  size: pairing."""
  plan = plan or tables.Plan()
  rows = []
  for (protocol, arch), members in _families(comparisons, plan).items():
    key = dict(protocol=protocol, arch=arch, baseline=members[0].baseline.arch)
    sizes, means, variances, dfs, axis, groups = [], [], [], [], [], []
    for comparison in members:
      seeds = comparison.seeds(plan.seeds)
      d = comparison.differences(METRIC, seeds)
      base, mine = tables._per_seed_values(comparison, METRIC, seeds)
      if len(seeds) >= 2:
        groups.append((mine, base))
      paired = verdict.paired_interval(d)
      welch = verdict.unpaired_half_width(mine, base)
      half = (paired.high - paired.low) / 2
      rows.append(dict(key, kind="pairing", size=comparison.model.size, n=len(seeds),
                       correlation=verdict.correlation(mine, base), paired_half_width=half,
                       unpaired_half_width=welch,
                       narrowed=(half < welch) if math.isfinite(half + welch) else None))
      if verdict.status(d) == "ok":
        sizes.append(comparison.model.size)
        means.append(paired.mean)
        variances.append(paired.std ** 2 / len(d))
        dfs.append(len(d) - 1)
        axis.append(_axis_value(comparison))
    planned = _planned_sizes((protocol, arch), plan, len(members))
    over = f"{len(sizes)} of {planned} planned size{'s' if planned != 1 else ''}"
    if sizes:
      pooled = verdict.contrast(np.full(len(sizes), 1 / len(sizes)), means, variances, dfs)
      rows.append(dict(key, kind="pooled", sizes=" ".join(sizes), over=over,
                       estimate=pooled.estimate, low=pooled.low, high=pooled.high, df=pooled.df))
    if len(sizes) >= 2:
      trend = verdict.contrast(verdict.slope_weights(axis), means, variances, dfs)
      rows.append(dict(key, kind="trend", sizes=" ".join(sizes), over=over,
                       estimate=trend.estimate, low=trend.low, high=trend.high, df=trend.df,
                       per=level_unit(members[0].model.level) or "10x parameters"))
    if groups:
      point, low, high = verdict.prob_improvement_interval(groups)
      rows.append(dict(key, kind="p_better", sizes=" ".join(c.model.size for c in members),
                       over=f"{len(groups)} size(s)", estimate=point, low=low, high=high,
                       df=math.nan))
  return rows


def pooled_markdown(rows: list[dict]) -> str:
  header = ["protocol", "comparison", "reading", "over", "estimate", "95% interval"]
  body = []
  names = {"pooled": "pooled effect (equal weights over sizes)",
           "p_better": "P(model > ViT), a run of each"}
  for r in rows:
    if r["kind"] == "pairing":
      continue
    comparison = f"{registry.label(r['arch'])} − {registry.label(r['baseline'])}"
    if r["kind"] == "p_better":
      value = f"{r['estimate']:.2f}"
      bounds = f"[{r['low']:.2f}, {r['high']:.2f}] (bootstrap)"
    else:
      value = tables._signed(r["estimate"], METRIC)
      bounds = (f"{tables._bounds(r['low'], r['high'], METRIC)} "
                f"(t, {r['df']:.1f} df)" if math.isfinite(r["low"]) else "-")
    name = (f"trend: change of the difference per {r['per']}" if r["kind"] == "trend"
            else names[r["kind"]])
    body.append([r["protocol"], comparison, name, r["over"], value, bounds])
  table = tables.markdown_table(header, body, "llllrr")
  pairing = [r for r in rows if r["kind"] == "pairing"]
  if not pairing:
    return table
  body = [[r["protocol"], r["size"],
           f"{registry.label(r['arch'])} − {registry.label(r['baseline'])}", str(r["n"]),
           "-" if math.isnan(r["correlation"]) else f"{r['correlation']:+.2f}",
           tables._size(r["paired_half_width"], METRIC),
           tables._size(r["unpaired_half_width"], METRIC),
           {True: "yes", False: "no", None: "-"}[r["narrowed"]]] for r in pairing]
  return (table + "\n\nPairing by seed (both architectures of a seed share the data order "
          "and augmentation draws): the per-seed correlation of their top-1, and the "
          "half-width of the 95% paired t-interval against Welch's interval, which ignores "
          "the pairing.\n\n"
          + tables.markdown_table(["protocol", "size", "comparison", "paired seeds",
                                   "correlation", "± paired t", "± Welch (unpaired)",
                                   "pairing narrowed it"], body, "llllrrrl"))


# --- Compute beside accuracy ----------------------------------------------------------------

def _steps(run) -> float:
  return float(run.info.get("total_steps") or run.summary()["steps"])


def _train_pflops(run, gflops_per_image: float) -> float:
  return gflops_per_image * float(run.info.get("batch_size", math.nan)) * _steps(run) / 1e6


def _top1_at(run, fraction: float) -> float:
  """Top-1 on the run's validation curve at `fraction` of its steps (linear between
  evaluations); NaN beyond its end or before its first evaluation."""
  series = run.series("eval/top1")
  if series is None or not len(series) or not 0 < fraction <= 1 + 1e-9:
    return math.nan
  step = fraction * _steps(run)
  if step < series.steps[0]:
    return math.nan
  return float(np.interp(step, series.steps, series.values))


def _mean(values) -> float:
  values = [v for v in values if math.isfinite(v)]
  return float(np.mean(values)) if values else math.nan


def _mean_of_all(values) -> float:
  """The mean, or NaN unless every run has a value (a mean over the runs that happen to
  reach the other's budget would select them)."""
  values = list(values)
  return float(np.mean(values)) if values and all(map(math.isfinite, values)) else math.nan


def compute_rows(comparisons) -> list[dict]:
  """Per matched pair: each architecture's cost and its top-1 at the other's budget."""
  rows = []
  for comparison in comparisons:
    if not comparison.matched:
      continue
    groups = {"baseline": comparison.baseline, "model": comparison.model}
    cost = {}
    for role, group in groups.items():
      cost[role] = dict(
          gflops=group.gflops_per_image,
          pflops=_mean([_train_pflops(r, group.gflops_per_image) for r in group.runs]),
          images_per_sec=_mean([r.summary()["images_per_sec"] for r in group.runs]),
          wall=_mean([r.summary()["train_seconds"] for r in group.runs]),
          top1=_mean([r.summary()["final_top1"] for r in group.runs]))
    row = dict(protocol=comparison.model.protocol, size=comparison.model.size,
               arch=comparison.model.arch, baseline=comparison.baseline.arch)
    for role, other in (("baseline", "model"), ("model", "baseline")):
      group = groups[role]
      row.update({f"{role}_{k}": v for k, v in cost[role].items()})
      # At the other's budget: the same fraction of this run's steps (time and FLOPs
      # taken as proportional to the step).
      row[f"{role}_top1_at_other_time"] = _mean_of_all(
          [_top1_at(r, cost[other]["wall"] / r.summary()["train_seconds"])
           for r in group.runs])
      row[f"{role}_top1_at_other_flops"] = _mean_of_all(
          [_top1_at(r, cost[other]["pflops"] / _train_pflops(r, group.gflops_per_image))
           for r in group.runs])
    rows.append(row)
  return rows


def compute_markdown(rows: list[dict]) -> str:
  header = ["protocol", "size", "architecture", "train GFLOPs/img", "training PFLOPs",
            "train img/s", "wall time", "final top-1 %", "top-1 % at the other's wall time",
            "top-1 % at the other's FLOPs"]
  body = []
  for r in rows:
    for role in ("baseline", "model"):
      arch = r["arch"] if role == "model" else r["baseline"]
      body.append([r["protocol"], r["size"], registry.label(arch),
                   tables._gflops(r[f"{role}_gflops"]),
                   "-" if math.isnan(r[f"{role}_pflops"]) else f"{r[f'{role}_pflops']:.3g}",
                   tables._num(r[f"{role}_images_per_sec"], digits=0),
                   tables._duration(r[f"{role}_wall"]), tables._pct(r[f"{role}_top1"]),
                   tables._pct(r[f"{role}_top1_at_other_time"]),
                   tables._pct(r[f"{role}_top1_at_other_flops"])])
  return tables.markdown_table(header, body, "lllrrrrrrr")
