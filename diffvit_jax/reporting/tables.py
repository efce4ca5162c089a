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
# The verdict: (metric, whether higher is better); the first is the primary endpoint.
VERDICT_METRICS = (("final_top1", True), ("final_loss", False))
PRIMARY_METRIC = VERDICT_METRICS[0][0]
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
  """A differential config and the classic config of the same protocol and size.

  `lost`: seed -> why it is not paired (a run left out by `runs.admit`, or no
  run of the other architecture); a comparison that lost seeds is incomplete.
  """

  baseline: runs_lib.Group
  model: runs_lib.Group
  lost: dict[int, str] = dataclasses.field(default_factory=dict)

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

  def per_image(self) -> tuple[dict[int, tuple], str]:
    """({seed: (baseline top-1 correct, model top-1 correct)}, why seeds lack them or '')."""
    base = {r.seed: r for r in self.baseline.runs}
    mine = {r.seed: r for r in self.model.runs}
    pairs, missing = {}, []
    for seed in self.paired_seeds:
      a, b = base[seed].per_example, mine[seed].per_example
      if a is None or b is None:
        missing.append(f"seed {seed}: no per_example.npz")
      elif not (np.array_equal(a["index"], b["index"])
                and np.array_equal(a["label"], b["label"])):
        missing.append(f"seed {seed}: the two runs were evaluated on other images")
      else:
        pairs[seed] = (a["top1"], b["top1"])
    return pairs, "; ".join(missing)


def _lost_seeds(baseline, model, excluded) -> dict[int, str]:
  lost = {}
  for group, other in ((baseline, model), (model, baseline)):
    for seed in sorted(set(group.seeds) - set(other.seeds)):
      lost.setdefault(seed, f"seed {seed}: no {other.label} run")
  for item in excluded:
    run = item.run
    if (run.protocol, run.size, run.name) in {(g.protocol, g.size, g.name)
                                              for g in (baseline, model)}:
      text = f"seed {run.seed} of {registry.label(run.arch)} left out ({item.reason})"
      lost[run.seed] = f"{lost[run.seed]}; {text}" if run.seed in lost else text
  return lost


def comparisons(groups: list[runs_lib.Group], excluded=()) -> list[Comparison]:
  """Each differential config against the one classic config of its protocol and size.

  `excluded` (`runs.Excluded`, from `runs.admit`) marks the seeds a comparison lost.
  """
  out = []
  by_key: dict[tuple, list[runs_lib.Group]] = {}
  for group in groups:
    by_key.setdefault((group.protocol, group.size), []).append(group)
  for members in by_key.values():
    baselines = [g for g in members if g.differential is False]
    if len(baselines) != 1:
      continue
    out += [Comparison(baselines[0], g, _lost_seeds(baselines[0], g, excluded))
            for g in members if g.differential]
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


def _per_seed_values(comparison: Comparison, metric: str) -> tuple[list[float], list[float]]:
  base, mine = _by_seed(comparison.baseline, metric), _by_seed(comparison.model, metric)
  seeds = comparison.paired_seeds
  return [base[s] for s in seeds], [mine[s] for s in seeds]


def _nan_unless_tested(row: dict, state: str, interval: verdict.PairedInterval) -> None:
  # Below MIN_SEEDS (or non-finite) no difference is printed at all; at zero spread the
  # mean is a fact but there is no interval.
  shown = state in ("ok", "no_spread")
  row.update(mean=interval.mean if shown else math.nan, std=interval.std if shown else math.nan,
             ci_low=interval.low if state == "ok" else math.nan,
             ci_high=interval.high if state == "ok" else math.nan)


def verdict_rows(comparisons_: list[Comparison], *,
                 margin: float = verdict.DEFAULT_EQUIVALENCE_MARGIN,
                 resamples: int = verdict.BOOTSTRAP_RESAMPLES,
                 bootstrap_seed: int = verdict.BOOTSTRAP_SEED) -> list[dict]:
  """Per matched pair: the primary endpoint (final top-1) row, then the secondary rows.

  Primary: paired t-test, Holm-adjusted over the sizes of its protocol (one
  family per protocol and differential arch), TOST against `margin`, the SD
  of the differences, the MDE and the seeds needed for `margin`, the
  two-level bootstrap interval, per-seed values. Secondary (validation loss):
  descriptive. A comparison that lost seeds reads "incomplete".
  """
  matched = [c for c in comparisons_ if c.matched]
  primaries = [verdict.primary(c.differences(PRIMARY_METRIC), margin) for c in matched]
  families: dict[tuple, list[int]] = {}
  for i, c in enumerate(matched):
    families.setdefault((c.model.protocol, c.model.arch), []).append(i)
  for members in families.values():
    # An incomplete or untestable comparison stays in its family, as p = 1 (conservative).
    adjusted = verdict.holm([math.nan if matched[i].lost else primaries[i].p for i in members])
    for i, p_holm in zip(members, adjusted, strict=True):
      primaries[i].p_holm = p_holm
  rows = []
  for comparison, result in zip(matched, primaries, strict=True):
    label = comparison.model.label
    base_values, model_values = _per_seed_values(comparison, PRIMARY_METRIC)
    pairs, missing = comparison.per_image()
    if pairs and not missing and result.status in ("ok", "no_spread"):
      boot = verdict.two_level_bootstrap(list(pairs.values()), resamples=resamples,
                                         seed=bootstrap_seed)
    else:
      boot = (math.nan, math.nan)
    row = _comparison_row(comparison)
    row.update(role="primary", metric=PRIMARY_METRIC, confidence=verdict.CONFIDENCE,
               interval="paired t (two-sided)")
    _nan_unless_tested(row, result.status, result.interval)
    reading = verdict.primary_reading(result, label)
    if comparison.lost:
      reading = (f"incomplete: {'; '.join(comparison.lost[s] for s in sorted(comparison.lost))}"
                 f" ({len(comparison.paired_seeds)} paired seeds remain)")
    row.update(
        p=result.p, p_holm=result.p_holm, holm_family=len(families[(comparison.model.protocol,
                                                                    comparison.model.arch)]),
        significant=result.significant and not comparison.lost, margin=margin,
        tost_p=result.tost_p, equivalent=result.equivalent and not comparison.lost,
        mde=result.mde, seeds_needed=result.seeds_needed, power=verdict.POWER,
        bootstrap_low=boot[0], bootstrap_high=boot[1], bootstrap_resamples=resamples,
        bootstrap_seed=bootstrap_seed, per_image_missing=missing,
        baseline_values=" ".join(f"{v:.6g}" for v in base_values),
        model_values=" ".join(f"{v:.6g}" for v in model_values),
        incomplete="; ".join(comparison.lost[s] for s in sorted(comparison.lost)),
        reading=reading)
    rows.append(row)
    for metric, _ in VERDICT_METRICS[1:]:
      differences = comparison.differences(metric)
      state = verdict.status(differences)
      row = _comparison_row(comparison)
      row.update(role="secondary", metric=metric, confidence=verdict.CONFIDENCE,
                 interval="paired t (two-sided)",
                 reading=verdict.secondary_reading(differences))
      _nan_unless_tested(row, state, verdict.paired_interval(differences))
      rows.append(row)
  return rows


def per_seed_rows(comparisons_: list[Comparison]) -> list[dict]:
  """Per matched pair and paired seed: both top-1s, the discordant images, McNemar's exact p."""
  rows = []
  for comparison in comparisons_:
    if not comparison.matched:
      continue
    pairs, _ = comparison.per_image()
    base_values, model_values = _per_seed_values(comparison, PRIMARY_METRIC)
    for seed, base, mine in zip(comparison.paired_seeds, base_values, model_values,
                                strict=True):
      row = dict(protocol=comparison.model.protocol, size=comparison.model.size,
                 arch=comparison.model.arch, baseline=comparison.baseline.arch, seed=seed,
                 baseline_top1=base, model_top1=mine, difference=mine - base)
      if seed in pairs:
        test = verdict.mcnemar(*pairs[seed])
        row.update(images=test.images, model_only=test.model_only,
                   baseline_only=test.baseline_only, mcnemar_p=test.p)
      else:
        row.update(images=0, model_only=-1, baseline_only=-1, mcnemar_p=math.nan)
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
    row["reading"] = verdict.secondary_reading(comparison.differences("final_top1"))
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


def _robustness_reason(run: runs_lib.Run) -> str:
  result = run.robustness
  if result is None:
    return "no robustness.json"
  total = run.info.get("total_steps")
  if result.get("checkpoint", "latest") != "latest" or result.get("step") != total:
    return (f"evaluated at the {result.get('checkpoint', 'latest')} checkpoint, step "
            f"{result.get('step')}, not the final step {total}")
  return ""


def robustness_paired_rows(comparisons_: list[Comparison]) -> list[dict]:
  """Per matched pair: per paired seed, the model's CE/mCE/relative mCE against the ViT of its
  seed, then a summary row: the paired t-interval over seeds of mCE - 1 and of the difference
  in mean corruption error. Seeds whose results are missing or not at the final step are named.
  """
  from diffvit_jax.errors import DataError
  from diffvit_jax.evaluation import robustness

  rows = []
  for comparison in comparisons_:
    if not comparison.matched:
      continue
    base = {r.seed: r for r in comparison.baseline.runs}
    mine = {r.seed: r for r in comparison.model.runs}
    if not any(r.robustness for r in comparison.model.runs):
      continue  # No corrupted evaluation of the differential model: nothing to pair.
    seeds, left_out = [], []
    key = dict(protocol=comparison.model.protocol, size=comparison.model.size,
               arch=comparison.model.arch, baseline=comparison.baseline.arch,
               baseline_name=comparison.baseline.name)
    for seed in comparison.paired_seeds:
      reason = "; ".join(f"{label}: {why}" for label, why in (
          (comparison.baseline.label, _robustness_reason(base[seed])),
          (comparison.model.label, _robustness_reason(mine[seed]))) if why)
      if not reason:
        try:
          paired = robustness.paired_with_baseline(mine[seed].robustness, base[seed].robustness)
        except DataError as e:
          reason = str(e)
      if reason:
        left_out.append(f"seed {seed} ({reason})")
        continue
      seeds.append(seed)
      rows.append(dict(key, kind="seed", seed=seed, mce=paired["mce"],
                       relative_mce=paired["relative_mce"],
                       mean_corruption_error_difference=paired[
                           "mean_corruption_error_difference"],
                       coverage=paired["status"],
                       ce=" ".join(f"{c}={v:.4f}" for c, v in sorted(paired["ce"].items()))))
    mine_rows = [r for r in rows if r.get("kind") == "seed" and r["arch"] == key["arch"]
                 and (r["protocol"], r["size"]) == (key["protocol"], key["size"])]
    mce = verdict.paired_interval([r["mce"] - 1 for r in mine_rows])
    error = verdict.paired_interval([r["mean_corruption_error_difference"] for r in mine_rows])
    rows.append(dict(key, kind="summary", seeds=" ".join(map(str, seeds)), n_paired=len(seeds),
                     mce_minus_1_mean=mce.mean, mce_minus_1_ci_low=mce.low,
                     mce_minus_1_ci_high=mce.high, error_difference_mean=error.mean,
                     error_difference_ci_low=error.low, error_difference_ci_high=error.high,
                     reading=verdict.secondary_reading([r["mce"] - 1 for r in mine_rows]),
                     left_out="; ".join(left_out)))
  return rows


def robustness_paired_markdown(rows: list[dict]) -> str:
  header = ["protocol", "size", "comparison", "seed", "mCE % (baseline: ViT of the seed)",
            "relative mCE %", "mean corruption error difference"]
  body = []
  for r in rows:
    comparison = f"{registry.label(r['arch'])} vs {r['baseline_name']}"
    if r["kind"] == "seed":
      body.append([r["protocol"], r["size"], comparison, str(r["seed"]), _pct(r["mce"]),
                   _pct(r["relative_mce"]),
                   _signed(r["mean_corruption_error_difference"], "top1")])
    else:
      mce = _interval(r["mce_minus_1_mean"], r["mce_minus_1_ci_low"], r["mce_minus_1_ci_high"],
                      "top1")
      error = _interval(r["error_difference_mean"], r["error_difference_ci_low"],
                        r["error_difference_ci_high"], "top1")
      seeds = f"all {r['n_paired']}" + (f"; left out: {r['left_out']}" if r["left_out"] else "")
      body.append([r["protocol"], r["size"], comparison, seeds,
                   f"mCE − 100%: {mce} ({r['reading']})", "", error])
  return markdown_table(header, body, "llllrrr")


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


def _p(value: float) -> str:
  return "-" if math.isnan(value) else f"{value:.3g}"


def _bounds(low: float, high: float, metric: str) -> str:
  if math.isnan(low):
    return "-"
  return f"[{_signed(low, metric)}, {_signed(high, metric)}]"


def _size(value: float, metric: str) -> str:
  """An unsigned spread or effect: pp for accuracies."""
  return _signed(value, metric).lstrip("+")


def _seeds_needed(value: float) -> str:
  if math.isnan(value):
    return "-"
  return "> 10000" if math.isinf(value) else f"{value:.0f}"


def _per_seed_cell(row: dict) -> str:
  seeds = row["paired_seeds"].split()
  base = [float(v) for v in row["baseline_values"].split()]
  mine = [float(v) for v in row["model_values"].split()]
  return "; ".join(f"{s}: {100 * b:.2f} → {100 * m:.2f}"
                   for s, b, m in zip(seeds, base, mine, strict=True))


def verdict_markdown(rows: list[dict]) -> str:
  """The primary endpoint's table, then the secondary (descriptive) metrics' table."""
  primary = [r for r in rows if r.get("role", "primary") == "primary"]
  secondary = [r for r in rows if r.get("role") == "secondary"]
  header = ["protocol", "size", "comparison", "paired seeds",
            "top-1 % per seed (seed: ViT → model)", "mean difference", "95% CI (paired t)",
            "95% CI (two-level bootstrap)", "p (t)",
            "Holm p", "TOST p (± margin)", "SD of differences", "MDE (80% power)",
            "seeds for the margin", "reading"]
  body = []
  for r in primary:
    metric = r["metric"]
    body.append([r["protocol"], r["size"],
                 f"{registry.label(r['arch'])} − {registry.label(r['baseline'])}",
                 str(r["n_paired"]), _per_seed_cell(r), _signed(r["mean"], metric),
                 _bounds(r["ci_low"], r["ci_high"], metric),
                 _bounds(r["bootstrap_low"], r["bootstrap_high"], metric), _p(r["p"]),
                 f"{_p(r['p_holm'])} (of {r['holm_family']})",
                 f"{_p(r['tost_p'])} (± {100 * r['margin']:.2f} pp)",
                 _size(r["std"], metric), _size(r["mde"], metric),
                 _seeds_needed(r["seeds_needed"]), r["reading"]])
  text = markdown_table(header, body, "llllrrrrrrrrrrl")
  if secondary:
    header = ["protocol", "size", "comparison", "metric", "mean difference",
              "95% CI (paired t)", "paired seeds", "reading"]
    body = [[r["protocol"], r["size"],
             f"{registry.label(r['arch'])} − {registry.label(r['baseline'])}",
             _METRIC_NAMES[r["metric"]], _signed(r["mean"], r["metric"]),
             _bounds(r["ci_low"], r["ci_high"], r["metric"]), str(r["n_paired"]), r["reading"]]
            for r in secondary]
    text += ("\n\nSecondary metrics, descriptive only (no test is claimed, no multiplicity "
             "control):\n\n" + markdown_table(header, body, "llllrrrl"))
  return text


def per_seed_markdown(rows: list[dict]) -> str:
  header = ["protocol", "size", "comparison", "seed", "ViT top-1 %", "model top-1 %",
            "difference", "images", "only the model right", "only ViT right",
            "McNemar exact p"]
  body = []
  for r in rows:
    has = r["images"] > 0
    body.append([r["protocol"], r["size"],
                 f"{registry.label(r['arch'])} − {registry.label(r['baseline'])}",
                 str(r["seed"]), _pct(r["baseline_top1"]), _pct(r["model_top1"]),
                 _signed(r["difference"], "final_top1"),
                 str(r["images"]) if has else "-", str(r["model_only"]) if has else "-",
                 str(r["baseline_only"]) if has else "-", _p(r["mcnemar_p"])])
  return markdown_table(header, body, "llllrrrrrrr")


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
