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

import collections
import csv
import dataclasses
import math

import numpy as np

from diffvit_jax.models import registry
from diffvit_jax.reporting import manifest as manifest_lib
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
MATCH_TOLERANCE = manifest_lib.MATCH_TOLERANCE


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

  def seeds(self, planned=None) -> list[int]:
    """The paired seeds, only those in `planned` when given."""
    return [s for s in self.paired_seeds if planned is None or s in planned]

  def differences(self, metric: str, seeds=None) -> list[float]:
    """Model minus baseline per paired seed (or per seed of `seeds`, which must be paired)."""
    base, mine = _by_seed(self.baseline, metric), _by_seed(self.model, metric)
    return [mine[s] - base[s] for s in (self.paired_seeds if seeds is None else seeds)]

  def interval(self, metric: str) -> verdict.PairedInterval:
    return verdict.paired_interval(self.differences(metric))

  def per_image(self, seeds=None) -> tuple[dict[int, tuple], str]:
    """({seed: (baseline top-1 correct, model top-1 correct)}, why seeds lack them or '').

    Only files of the final evaluation count: their step is the run's last
    and their mean top-1 its final top-1; any other is left out, with why.
    """
    base = {r.seed: r for r in self.baseline.runs}
    mine = {r.seed: r for r in self.model.runs}
    pairs, missing = {}, []
    for seed in self.paired_seeds if seeds is None else seeds:
      a, b = base[seed].per_example, mine[seed].per_example
      stale = [f"{run.arch}: {why}" for run in (base[seed], mine[seed])
               if (why := _not_final(run))]
      if a is None or b is None:
        missing.append(f"seed {seed}: no per_example.npz")
      elif stale:
        missing.append(f"seed {seed}: {'; '.join(stale)}")
      elif not (np.array_equal(a["index"], b["index"])
                and np.array_equal(a["label"], b["label"])):
        missing.append(f"seed {seed}: the two runs were evaluated on other images")
      else:
        pairs[seed] = (a["top1"], b["top1"])
    return pairs, "; ".join(missing)


def _not_final(run: runs_lib.Run) -> str:
  """Why `run`'s per_example.npz is not its final evaluation ('' when it is)."""
  arrays = run.per_example
  if arrays is None:
    return "no per_example.npz"
  final_step = run.info.get("eval_step", run.info.get("total_steps"))
  if "step" in arrays and final_step is not None and int(arrays["step"]) != int(final_step):
    return (f"per_example.npz is of step {int(arrays['step'])}, not the final evaluation's "
            f"{final_step}")
  top1 = float(np.mean(arrays["top1"])) if len(arrays["top1"]) else math.nan
  final = run.summary()["final_top1"]
  # The logged final top-1 is a float32 mean over the same images.
  if not abs(top1 - final) <= 1e-5:
    return (f"per_example.npz's top-1 {100 * top1:.4f}% is not the final evaluation's "
            f"{100 * final:.4f}%")
  return ""


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


def _comparison_row(comparison: Comparison, seeds=None) -> dict:
  base, model = comparison.baseline, comparison.model
  seeds = comparison.paired_seeds if seeds is None else seeds
  return dict(protocol=model.protocol, size=model.size, arch=model.arch, baseline=base.arch,
              seeds=len(model.runs), baseline_seeds=len(base.runs),
              paired_seeds=" ".join(map(str, seeds)), n_paired=len(seeds))


def _interval_cells(interval: verdict.PairedInterval, prefix: str) -> dict:
  return {f"{prefix}_mean": interval.mean, f"{prefix}_std": interval.std,
          f"{prefix}_ci_low": interval.low, f"{prefix}_ci_high": interval.high}


def _per_seed_values(comparison: Comparison, metric: str,
                     seeds=None) -> tuple[list[float], list[float]]:
  base, mine = _by_seed(comparison.baseline, metric), _by_seed(comparison.model, metric)
  seeds = comparison.paired_seeds if seeds is None else seeds
  return [base[s] for s in seeds], [mine[s] for s in seeds]


def _nan_unless_tested(row: dict, state: str, interval: verdict.PairedInterval) -> None:
  # Below MIN_SEEDS (or non-finite) no difference is printed at all; at zero spread the
  # mean is a fact but there is no interval.
  shown = state in ("ok", "no_spread")
  row.update(mean=interval.mean if shown else math.nan, std=interval.std if shown else math.nan,
             ci_low=interval.low if state == "ok" else math.nan,
             ci_high=interval.high if state == "ok" else math.nan)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The verdict's design: a study manifest's, or (without one) the comparisons given.

  `margin_source`: 'manifest' (fixed before the runs), 'post hoc' (given only
  at report time), or 'default' (the code's, no manifest).
  """

  margin: float = verdict.DEFAULT_EQUIVALENCE_MARGIN
  alpha: float = verdict.ALPHA
  margin_source: str = "default"
  design: manifest_lib.Design | None = None

  @property
  def seeds(self) -> set[int] | None:
    return set(self.design.seeds) if self.design else None


def _family_members(matched: list[Comparison], plan: Plan):
  """([(planned entry or None, its comparison or None)], comparisons outside the family)."""
  if plan.design is None:
    return [(None, c) for c in matched], []
  by_names = {(c.model.protocol, c.baseline.name, c.model.name): c for c in matched}
  members = [(p, by_names.pop((p.protocol, p.baseline, p.model), None))
             for p in plan.design.family]
  return members, list(by_names.values())


def _planned_lost(comparison: Comparison, planned) -> dict[int, str]:
  """Why each planned seed is not paired (all lost seeds without a plan)."""
  if planned is None:
    return dict(comparison.lost)
  lost = {s: why for s, why in comparison.lost.items() if s in planned}
  for seed in sorted(set(planned) - set(comparison.paired_seeds) - set(lost)):
    lost[seed] = f"seed {seed}: planned, no run of either architecture"
  return lost


def _missing_row(planned: manifest_lib.Planned, plan: Plan) -> dict:
  return dict(protocol=planned.protocol, size=planned.size, arch=planned.model_arch,
              baseline=planned.baseline_arch, seeds=0, baseline_seeds=0, paired_seeds="",
              n_paired=0, role="primary", metric=PRIMARY_METRIC, confidence=verdict.CONFIDENCE,
              interval="paired t (two-sided)", mean=math.nan, std=math.nan, ci_low=math.nan,
              ci_high=math.nan, p=math.nan, margin=plan.margin, margin_source=plan.margin_source,
              alpha=plan.alpha, tost_p=math.nan, mde=math.nan, seeds_needed=math.nan,
              seeds_needed_low=math.nan, seeds_needed_high=math.nan, crossed_low=math.nan,
              crossed_high=math.nan, significant=False, equivalent=False, baseline_values="",
              model_values="", per_image_missing="", holm_as_1=True,
              incomplete="no admissible comparison",
              reading=(f"planned, no admissible comparison: no finished, admitted pair of "
                       f"{registry.label(planned.model_arch)} and "
                       f"{registry.label(planned.baseline_arch)} runs (see the runs left "
                       "out); counted in Holm at p = 1"))


def _crossed(comparison: Comparison, seeds, state: str) -> tuple[float, float, str]:
  pairs, missing = comparison.per_image(seeds)
  if not (pairs and not missing and state in ("ok", "no_spread")):
    return math.nan, math.nan, missing
  d = np.stack([np.asarray(b, np.int8) - np.asarray(a, np.int8) for a, b in pairs.values()])
  _, low, high, _ = verdict.crossed_interval(d)
  return float(low), float(high), missing


def _exploratory_row(comparison: Comparison, why: str) -> dict:
  differences = comparison.differences(PRIMARY_METRIC)
  state = verdict.status(differences)
  base_values, model_values = _per_seed_values(comparison, PRIMARY_METRIC)
  row = _comparison_row(comparison)
  row.update(role="exploratory", metric=PRIMARY_METRIC, confidence=verdict.CONFIDENCE,
             interval="paired t (two-sided)", p=verdict.paired_t_p(differences),
             baseline_values=" ".join(f"{v:.6g}" for v in base_values),
             model_values=" ".join(f"{v:.6g}" for v in model_values),
             reading=f"exploratory ({why}): {verdict.secondary_reading(differences)}")
  _nan_unless_tested(row, state, verdict.paired_interval(differences))
  return row


def verdict_rows(comparisons_: list[Comparison], plan: Plan | None = None) -> list[dict]:
  """Per planned comparison: the primary endpoint (final top-1) row, then the secondary rows.

  Primary, over the planned seeds: paired t-test, Holm-adjusted over the
  family (the manifest's comparisons of a protocol and differential arch, or
  without one those given), TOST against the margin, the SD of the
  differences, the MDE and the seeds needed for the margin (with the range its
  SD's 95% interval allows), the seeds x images interval, per-seed values. A
  planned comparison with no admissible runs, an incomplete one, or one the
  test does not apply to (fewer than 3 pairs) counts in Holm as p = 1.
  Secondary (validation loss): descriptive. Exploratory: all paired seeds
  where there are seeds beyond the plan, and comparisons outside the family.
  """
  plan = plan or Plan()
  matched = [c for c in comparisons_ if c.matched]
  members, unplanned = _family_members(matched, plan)
  planned_seeds = plan.seeds
  results = []
  for _, comparison in members:
    if comparison is None:
      results.append(None)
      continue
    seeds = comparison.seeds(planned_seeds)
    results.append(verdict.primary(comparison.differences(PRIMARY_METRIC, seeds), plan.margin,
                                   plan.alpha))
  families: dict[tuple, list[int]] = {}
  for i, (planned, comparison) in enumerate(members):
    key = ((planned.protocol, planned.model_arch) if planned
           else (comparison.model.protocol, comparison.model.arch))
    families.setdefault(key, []).append(i)
  as_one = [result is None or bool(_planned_lost(comparison, planned_seeds))
            or math.isnan(result.p_for_family)
            for (_, comparison), result in zip(members, results, strict=True)]
  for indices in families.values():
    adjusted = verdict.holm([math.nan if as_one[i] else results[i].p for i in indices])
    for i, p_holm in zip(indices, adjusted, strict=True):
      if results[i] is not None:
        results[i].p_holm = p_holm
  rows = []
  for i, ((planned, comparison), result) in enumerate(zip(members, results, strict=True)):
    family = len(next(f for f in families.values() if i in f))
    if comparison is None:
      rows.append(dict(_missing_row(planned, plan), holm_family=family, p_holm=math.nan))
      continue
    seeds = comparison.seeds(planned_seeds)
    lost = _planned_lost(comparison, planned_seeds)
    label = comparison.model.label
    base_values, model_values = _per_seed_values(comparison, PRIMARY_METRIC, seeds)
    crossed_low, crossed_high, missing = _crossed(comparison, seeds, result.status)
    row = _comparison_row(comparison, seeds)
    row.update(role="primary", metric=PRIMARY_METRIC, confidence=verdict.CONFIDENCE,
               interval="paired t (two-sided)")
    _nan_unless_tested(row, result.status, result.interval)
    reading = verdict.primary_reading(result, label)
    if lost:
      reading = (f"incomplete: {'; '.join(lost[s] for s in sorted(lost))}"
                 f" ({len(seeds)} paired seeds remain)")
    if as_one[i]:
      reading += "; counted in Holm at p = 1"
    row.update(
        p=result.p, p_holm=result.p_holm, holm_family=family, holm_as_1=as_one[i],
        significant=result.significant and not lost, margin=plan.margin,
        margin_source=plan.margin_source, alpha=plan.alpha, tost_p=result.tost_p,
        equivalent=result.equivalent and not lost, mde=result.mde,
        seeds_needed=result.seeds_needed, seeds_needed_low=result.seeds_needed_low,
        seeds_needed_high=result.seeds_needed_high, power=verdict.POWER,
        crossed_low=crossed_low, crossed_high=crossed_high, per_image_missing=missing,
        baseline_values=" ".join(f"{v:.6g}" for v in base_values),
        model_values=" ".join(f"{v:.6g}" for v in model_values),
        incomplete="; ".join(lost[s] for s in sorted(lost)), reading=reading)
    rows.append(row)
    for metric, _ in VERDICT_METRICS[1:]:
      differences = comparison.differences(metric, seeds)
      state = verdict.status(differences)
      row = _comparison_row(comparison, seeds)
      row.update(role="secondary", metric=metric, confidence=verdict.CONFIDENCE,
                 interval="paired t (two-sided)",
                 reading=verdict.secondary_reading(differences))
      _nan_unless_tested(row, state, verdict.paired_interval(differences))
      rows.append(row)
    extra = [s for s in comparison.paired_seeds if planned_seeds is not None
             and s not in planned_seeds]
    if extra:
      rows.append(_exploratory_row(comparison, "all paired seeds; seeds "
                                   f"{' '.join(map(str, extra))} are beyond the plan"))
  rows += [_exploratory_row(c, "not in the study's family") for c in unplanned]
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


def _cells(result: dict) -> frozenset:
  """The (corruption, severity) cells a robustness.json holds."""
  return frozenset((c, sev) for c, by_sev in result["corrupted"].items() for sev in by_sev)


def robustness_rows(groups: list[runs_lib.Group]) -> list[dict]:
  """Per config: clean top-1, mean corruption error, mCE, from final-step evaluations only.

  Seeds whose robustness.json is missing, not at the final step, or of
  another corruption set than the config's other seeds (the most common set
  is kept) are left out and named; `coverage` says whether the set is full.
  """
  rows = []
  for group in groups:
    usable = [r for r in group.runs if not _robustness_reason(r)]
    if not usable:
      continue
    sets = collections.Counter(_cells(r.robustness) for r in usable)
    cells = max(sets, key=sets.get)
    left_out = [f"seed {r.seed} ({_robustness_reason(r) or 'another corruption set'})"
                for r in group.runs if r not in usable or _cells(r.robustness) != cells]
    results = [r.robustness for r in usable if _cells(r.robustness) == cells]
    row = dict(protocol=group.protocol, size=group.size, arch=group.arch, name=group.name,
               n_seeds=len(results), left_out="; ".join(left_out))
    row["clean_top1_mean"], row["clean_top1_std"] = _mean_std(
        [r["clean"]["top1"] for r in results])
    row["mean_corruption_error_mean"], row["mean_corruption_error_std"] = _mean_std(
        [r["mean_corruption_error"] for r in results])
    # Results older than the coverage field did not check it: not known to be full.
    row["coverage"] = ("full" if all(r.get("coverage", {}).get("status") == "full"
                                     for r in results) else "partial")
    row["cells"] = len(cells)
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
    seeds, left_out, cells = [], [], None
    key = dict(protocol=comparison.model.protocol, size=comparison.model.size,
               arch=comparison.model.arch, baseline=comparison.baseline.arch,
               baseline_name=comparison.baseline.name)
    for seed in comparison.paired_seeds:
      reason = "; ".join(f"{label}: {why}" for label, why in (
          (comparison.baseline.label, _robustness_reason(base[seed])),
          (comparison.model.label, _robustness_reason(mine[seed]))) if why)
      if not reason and _cells(mine[seed].robustness) != _cells(base[seed].robustness):
        reason = "the two runs were evaluated on other corruption cells"
      if not reason and cells is not None and _cells(mine[seed].robustness) != cells:
        reason = "another corruption set than the comparison's first seed"
      if not reason:
        try:
          paired = robustness.paired_with_baseline(mine[seed].robustness, base[seed].robustness)
        except DataError as e:
          reason = str(e)
      if reason:
        left_out.append(f"seed {seed} ({reason})")
        continue
      cells = _cells(mine[seed].robustness)
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
    coverages = {r["coverage"] for r in mine_rows}
    rows.append(dict(key, kind="summary", seeds=" ".join(map(str, seeds)), n_paired=len(seeds),
                     coverage=coverages.pop() if len(coverages) == 1 else "",
                     cells=len(cells or ()),
                     mce_minus_1_mean=mce.mean, mce_minus_1_ci_low=mce.low,
                     mce_minus_1_ci_high=mce.high, error_difference_mean=error.mean,
                     error_difference_ci_low=error.low, error_difference_ci_high=error.high,
                     reading=verdict.secondary_reading([r["mce"] - 1 for r in mine_rows]),
                     left_out="; ".join(left_out)))
  return rows


def robustness_paired_markdown(rows: list[dict]) -> str:
  header = ["protocol", "size", "comparison", "seed", "mCE % (baseline: ViT of the seed)",
            "relative mCE %", "mean corruption error difference", "coverage"]
  body = []
  for r in rows:
    comparison = f"{registry.label(r['arch'])} vs {r['baseline_name']}"
    if r["kind"] == "seed":
      body.append([r["protocol"], r["size"], comparison, str(r["seed"]), _pct(r["mce"]),
                   _pct(r["relative_mce"]),
                   _signed(r["mean_corruption_error_difference"], "top1"), r["coverage"]])
    else:
      mce = _interval(r["mce_minus_1_mean"], r["mce_minus_1_ci_low"], r["mce_minus_1_ci_high"],
                      "top1")
      error = _interval(r["error_difference_mean"], r["error_difference_ci_low"],
                        r["error_difference_ci_high"], "top1")
      seeds = f"all {r['n_paired']}" + (f"; left out: {r['left_out']}" if r["left_out"] else "")
      body.append([r["protocol"], r["size"], comparison, seeds,
                   f"mCE − 100%: {mce} ({r['reading']})", "", error,
                   f"{r['coverage'] or 'mixed'}, {r['cells']} cells"])
  return markdown_table(header, body, "llllrrrl")


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
  seeds = str(row["paired_seeds"]).split()
  base = [float(v) for v in row["baseline_values"].split()]
  mine = [float(v) for v in row["model_values"].split()]
  return "; ".join(f"{s}: {100 * b:.2f} → {100 * m:.2f}"
                   for s, b, m in zip(seeds, base, mine, strict=True))


# The primary table's columns (the README's study table is pasted from it: a test checks).
VERDICT_HEADER = ("protocol", "size", "comparison", "paired seeds",
                  "top-1 % per seed (seed: ViT → model)", "mean difference", "95% CI (paired t)",
                  "95% CI (seeds × images)", "p (t)", "Holm p", "TOST p (± margin, unadjusted)",
                  "SD of differences", "MDE (80% power)", "seeds for the margin [95% range]",
                  "reading")


def _seeds_range(row: dict) -> str:
  text = _seeds_needed(row["seeds_needed"])
  if math.isnan(row.get("seeds_needed_low", math.nan)):
    return text
  return (f"{text} [{_seeds_needed(row['seeds_needed_low'])}, "
          f"{_seeds_needed(row['seeds_needed_high'])}]")


def _holm_cell(row: dict) -> str:
  if row.get("holm_as_1") in (True, "True") and math.isnan(row["p_holm"]):
    return f"p = 1 counted (of {row['holm_family']})"
  return f"{_p(row['p_holm'])} (of {row['holm_family']})"


def verdict_markdown(rows: list[dict]) -> str:
  """The primary endpoint's table, the secondary (descriptive) and the exploratory ones."""
  primary = [r for r in rows if r.get("role", "primary") == "primary"]
  secondary = [r for r in rows if r.get("role") == "secondary"]
  exploratory = [r for r in rows if r.get("role") == "exploratory"]
  body = []
  for r in primary:
    metric = r["metric"]
    body.append([r["protocol"], r["size"],
                 f"{registry.label(r['arch'])} − {registry.label(r['baseline'])}",
                 str(r["n_paired"]), _per_seed_cell(r) or "-", _signed(r["mean"], metric),
                 _bounds(r["ci_low"], r["ci_high"], metric),
                 _bounds(r["crossed_low"], r["crossed_high"], metric), _p(r["p"]),
                 _holm_cell(r), f"{_p(r['tost_p'])} (± {100 * r['margin']:.2f} pp)",
                 _size(r["std"], metric), _size(r["mde"], metric), _seeds_range(r),
                 r["reading"]])
  text = markdown_table(list(VERDICT_HEADER), body, "llllrrrrrrrrrrl")
  header = ["protocol", "size", "comparison", "metric", "mean difference",
            "95% CI (paired t)", "paired seeds", "reading"]
  if secondary:
    body = [[r["protocol"], r["size"],
             f"{registry.label(r['arch'])} − {registry.label(r['baseline'])}",
             _METRIC_NAMES[r["metric"]], _signed(r["mean"], r["metric"]),
             _bounds(r["ci_low"], r["ci_high"], r["metric"]), str(r["n_paired"]), r["reading"]]
            for r in secondary]
    text += ("\n\nSecondary metrics, descriptive only (no test is claimed, no multiplicity "
             "control):\n\n" + markdown_table(header, body, "llllrrrl"))
  if exploratory:
    body = [[r["protocol"], r["size"],
             f"{registry.label(r['arch'])} − {registry.label(r['baseline'])}",
             _METRIC_NAMES[r["metric"]], _signed(r["mean"], r["metric"]),
             _bounds(r["ci_low"], r["ci_high"], r["metric"]), r["paired_seeds"], r["reading"]]
            for r in exploratory]
    text += ("\n\nExploratory, not the verdict (seeds beyond the planned ones, or comparisons "
             "outside the study's family; no test is claimed):\n\n"
             + markdown_table(header, body, "llllrrrl"))
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
            "mean corruption error %", "mCE % (baseline)", "coverage", "left out"]
  body = []
  for r in rows:
    mce = _pct(r["mce_mean"], r["mce_std"])
    if r.get("coverage") == "partial":  # Not all 15 corruptions x 5 severities.
      mce += " partial"
    body.append([registry.label(r["arch"]), r["size"], r["protocol"],
                 str(r["n_seeds"]), _pct(r["clean_top1_mean"], r["clean_top1_std"]),
                 _pct(r["mean_corruption_error_mean"], r["mean_corruption_error_std"]),
                 f"{mce} ({r['mce_baseline']})" if r["mce_baseline"] else mce,
                 f"{r['coverage']}, {r['cells']} cells", r.get("left_out") or "-"])
  table = markdown_table(header, body, "lllrrrrll")
  names = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("top1/")})
  if not names:
    return table
  configs = [f"{registry.label(r['arch'])} {r['size']}" for r in rows]
  per = [[name.replace("_", " ")] + [_pct(r.get(f"top1/{name}", math.nan)) for r in rows]
         for name in names]
  return (table + "\n\nTop-1 % per corruption, mean over severities (and seeds):\n\n"
          + markdown_table(["corruption"] + configs, per, "l" + "r" * len(configs)))
