"""A study over levels (the clutter study): accuracy against the level, attention per layer.

For the comparisons whose runs name a level (analysis.level, e.g. '8 fragments'):
- accuracy against the level, both architectures, and their paired difference with the
  least-squares slope (the interaction; its interval is in the secondary table);
- where each layer's attention lands (the runs' attention_share.json): the share on target,
  clutter and empty patches, mean over seeds with a 95% t-interval over seeds, and the
  paired difference of the model minus the baseline per layer.
Descriptive: the verdict per level (Holm across levels) is the report's primary table.
"""

import math
import os

import numpy as np

from diffvit_jax.evaluation import attention_share
from diffvit_jax.models import registry
from diffvit_jax.reporting import secondary, tables, verdict

KINDS = attention_share.KINDS


def _interval(values) -> tuple[float, float, float]:
  """(mean, low, high): the 95% t-interval over seeds (NaN bounds below 2 values)."""
  result = verdict.paired_interval(values)
  return result.mean, result.low, result.high


def level_comparisons(comparisons, plan: tables.Plan) -> list[tables.Comparison]:
  """The matched comparisons with a level, in level order; only the design's family where
  there is a manifest (as the verdict and the secondary readings)."""
  planned = ({(p.protocol, p.baseline, p.model) for p in plan.design.family}
             if plan.design is not None else None)
  chosen = [c for c in comparisons if c.matched and c.model.level and (
      planned is None or (c.model.protocol, c.baseline.name, c.model.name) in planned)]
  return sorted(chosen, key=lambda c: (c.model.protocol, c.model.arch,
                                       secondary.level_value(c.model.level)))


def _shares(group, seeds) -> dict[int, dict]:
  """seed -> attention_share.json of that run (runs without one are left out)."""
  out = {}
  for run in group.runs:
    if run.seed in seeds and (found := attention_share.read(run.workdir)) is not None:
      out[run.seed] = found
  return out


def _final_lambdas(group, seeds, depth: int) -> list[list[float]]:
  """Per layer, each seed's last logged lambda (NaN where not logged): 1 - lambda is what
  the differential map is divided by, so a lambda near 1 amplifies that seed's map."""
  out = [[] for _ in range(depth)]
  for run in sorted(group.runs, key=lambda r: r.seed):
    if run.seed not in seeds:
      continue
    for i in range(depth):
      series = run.scalars.get(f"lambda/layer_{i + 1}")
      out[i].append(float(series.values[-1]) if series is not None else math.nan)
  return out


def _per_seed(found: dict, seeds, layer: int, field: str, k: int) -> list[float]:
  """One number of attention_share.json per seed (None, a kind no image has, as NaN)."""
  return [math.nan if (v := found[s]["layers"][layer][field][k]) is None else v for s in seeds]


def attention_rows(comparisons, plan: tables.Plan) -> list[dict]:
  """Per level, layer, kind and architecture (and the paired difference): share and
  enrichment over the planned seeds, mean and 95% t-interval over seeds."""
  rows = []
  for c in level_comparisons(comparisons, plan):
    seeds = c.seeds(plan.seeds)
    base, mine = _shares(c.baseline, seeds), _shares(c.model, seeds)
    paired = sorted(set(base) & set(mine))
    if not paired:
      continue
    depth = len(base[paired[0]]["layers"])
    where = dict(protocol=c.model.protocol, level=c.model.level)
    seed_list = " ".join(map(str, paired))
    for layer in range(depth):
      for k, kind in enumerate(KINDS):
        b, m = (_per_seed(found, paired, layer, "share", k) for found in (base, mine))
        for role, arch, share, enrich in (
            ("baseline", c.baseline.arch, b, _per_seed(base, paired, layer, "enrichment", k)),
            ("model", c.model.arch, m, _per_seed(mine, paired, layer, "enrichment", k)),
            ("difference", f"{c.model.arch} - {c.baseline.arch}",
             [x - y for x, y in zip(m, b, strict=True)], [math.nan])):
          mean, low, high = _interval(share)
          rows.append(dict(where, layer=layer + 1, kind=kind, arch=arch, role=role,
                           seeds=seed_list, share_mean=mean, share_low=low, share_high=high,
                           enrichment_mean=float(np.mean(enrich)),
                           per_seed=" ".join(f"{v:.4f}" for v in share)))
    negative = [[mine[s]["layers"][i]["negative"] for s in paired] for i in range(depth)]
    lambdas = _final_lambdas(c.model, paired, depth)
    rows += [dict(where, layer=i + 1, kind="negative mass", arch=c.model.arch, role="model",
                  seeds=seed_list, share_mean=float(np.mean(v)),
                  share_low=math.nan, share_high=math.nan, enrichment_mean=math.nan,
                  per_seed=" ".join(f"{x:.4f}" for x in v),
                  final_lambda=" ".join(f"{x:.3f}" for x in lambdas[i]))
             for i, v in enumerate(negative)]
  return rows


def _cell(r) -> str:
  text = f"{100 * r['share_mean']:+.1f}" if r["role"] == "difference" else (
      f"{100 * r['share_mean']:.1f}")
  if math.isfinite(r["share_low"]):
    text += f" [{100 * r['share_low']:.1f}, {100 * r['share_high']:.1f}]"
  return text


def attention_markdown(rows: list[dict]) -> str:
  """One table: per level and layer, target and clutter share of both archs and the paired
  difference (the empty share is 100% minus the two; all three are in attention.csv)."""
  index = {(r["level"], r["layer"], r["kind"], r["role"]): r for r in rows}
  keys = list(dict.fromkeys((r["level"], r["layer"]) for r in rows if r["role"] == "baseline"))
  if not keys:
    return ""
  first = next(r for r in rows if r["role"] == "difference")
  base, model = first["arch"].split(" - ")[1], first["arch"].split(" - ")[0]
  b, m = registry.label(base), registry.label(model)
  header = ["level", "layer"]
  for kind in ("target", "clutter"):
    header += [f"{b} {kind} %", f"{m} {kind} %", f"{m} − {b} {kind} (pp)"]
  header += [f"{m} negative mass %", f"{m} final λ per seed"]
  body = []
  for level, layer in keys:
    line = [level, str(layer)]
    for kind in ("target", "clutter"):
      line += [_cell(index[(level, layer, kind, role)])
               for role in ("baseline", "model", "difference")]
    neg = index.get((level, layer, "negative mass", "model"))
    line += [f"{100 * neg['share_mean']:.1f}", neg["final_lambda"]] if neg else ["-", "-"]
    body.append(line)
  return tables.markdown_table(header, body, "ll" + "r" * (len(header) - 2))


def accuracy_figure(comparisons, plan: tables.Plan):
  """Final top-1 against the level (both archs, mean and 95% t-interval over seeds) and the
  paired difference with its least-squares line."""
  import matplotlib.pyplot as plt

  from diffvit_jax.reporting import plots

  chosen = level_comparisons(comparisons, plan)
  fig, (ax, dx) = plt.subplots(1, 2, figsize=(10, 3.8))
  x = np.array([secondary.level_value(c.model.level) for c in chosen])
  dodge = 0.015 * (np.ptp(x) or 1.0)  # the two archs' bars side by side, not on each other
  for side, role in ((-1, "baseline"), (1, "model")):
    stats = []
    for c in chosen:
      base, mine = tables._per_seed_values(c, tables.PRIMARY_METRIC, c.seeds(plan.seeds))
      stats.append(_interval(base if role == "baseline" else mine))
    group = chosen[0].baseline if role == "baseline" else chosen[0].model
    mean, low, high = (100 * np.array(v) for v in zip(*stats, strict=True))
    ax.errorbar(x + side * dodge, mean, yerr=[mean - low, high - mean], marker="o", capsize=3,
                color=plots.COLORS.get(group.arch), label=group.label)
  diffs = [100 * np.array(c.differences(tables.PRIMARY_METRIC, c.seeds(plan.seeds)))
           for c in chosen]
  mean, low, high = (np.array(v) for v in zip(*(_interval(d) for d in diffs), strict=True))
  dx.errorbar(x, mean, yerr=[mean - low, high - mean], marker="o", capsize=3, color="black",
              label="mean [95% t-interval]")
  for xi, d in zip(x, diffs, strict=True):
    dx.scatter(np.full(len(d), xi), d, s=10, color="grey", alpha=0.7, zorder=3)
  if len(x) >= 2:
    slope = float(np.dot(verdict.slope_weights(x), mean))
    dx.plot(x, mean.mean() + slope * (x - x.mean()), "--", color="tab:purple",
            label=f"slope {slope:+.3f} pp per {secondary.level_unit(chosen[0].model.level)}")
  dx.axhline(0, color="grey", lw=0.8)
  unit = secondary.level_unit(chosen[0].model.level) + "s"
  ax.set(xlabel=unit, ylabel="final validation top-1 (%)", title="Accuracy against clutter")
  dx.set(xlabel=unit, ylabel=f"{chosen[0].model.label} − {chosen[0].baseline.label} (pp)",
         title="Paired difference per seed (grey) and its mean")
  for a in (ax, dx):
    a.set_xticks(x)
    a.legend(fontsize=8)
  fig.tight_layout()
  return fig


def attention_figure(rows: list[dict]):
  """Share of attention on target / clutter patches against the layer: one column per level,
  both archs, mean and 95% t-interval over seeds."""
  import matplotlib.pyplot as plt

  from diffvit_jax.reporting import plots

  levels = list(dict.fromkeys(r["level"] for r in rows))
  kinds = ("target", "clutter", "empty")
  fig, axes = plt.subplots(len(kinds), len(levels), figsize=(3.2 * len(levels), 7.5),
                           squeeze=False, sharey="row")
  for j, level in enumerate(levels):
    for i, kind in enumerate(kinds):
      ax = axes[i, j]
      for role in ("baseline", "model"):
        mine = [r for r in rows if (r["level"], r["kind"], r["role"]) == (level, kind, role)]
        if not mine:
          continue
        layer = np.array([r["layer"] for r in mine])
        mean = 100 * np.array([r["share_mean"] for r in mine])
        low = 100 * np.array([r["share_low"] for r in mine])
        high = 100 * np.array([r["share_high"] for r in mine])
        ax.errorbar(layer, mean, yerr=[mean - low, high - mean], marker="o", capsize=3,
                    color=plots.COLORS.get(mine[0]["arch"]), label=registry.label(mine[0]["arch"]))
        ax.set_xticks(layer)
      ax.axhline(0, color="grey", lw=0.6)
      if i == 0:
        ax.set_title(level)
      if j == 0:
        ax.set_ylabel(f"attention on {kind} patches (%)")
      if i == len(kinds) - 1:
        ax.set_xlabel("layer")
  # Each row's range from the means: an interval made huge by a lambda near 1 (a small
  # 1 - lambda) is cut at the panel's edge instead of flattening every curve of the row.
  for i, kind in enumerate(kinds):
    means = [100 * r["share_mean"] for r in rows if r["kind"] == kind and r["role"] != "difference"]
    low, high = min(means + [0.0]), max(means + [0.0])
    pad = 0.3 * (high - low) + 5
    axes[i, 0].set_ylim(low - pad, high + pad)
  axes[0, 0].legend(fontsize=8)
  fig.suptitle("Where attention lands (DiffViT: (A1 − λA2) / (1 − λ)); mean over seeds, "
               "95% t-interval (cut at the panel's edge)", fontsize=10)
  fig.tight_layout()
  return fig


def sections(comparisons, plan: tables.Plan, out_dir: str, written: dict) -> list[str]:
  """The report's markdown for a level study (writes attention.csv and the two figures);
  [] when no comparison has a level."""
  from diffvit_jax.reporting import plots

  if not level_comparisons(comparisons, plan):
    return []
  out = ["\n## Across levels: accuracy and where attention lands\n",
         "Descriptive, from the planned seeds; the verdict per level is above (Holm across "
         "levels). The interaction (does the difference grow with the level?) is the trend row "
         "of the secondary table: the least-squares slope of the per-level mean paired "
         "difference against the level, with its Welch-Satterthwaite t-interval.\n"]
  png = plots.save(accuracy_figure(comparisons, plan), os.path.join(out_dir, "accuracy_levels"))[0]
  written["accuracy_levels.png"] = png
  out.append(f"![accuracy against the level]({os.path.relpath(png, out_dir)})\n")
  rows = attention_rows(comparisons, plan)
  if rows:
    tables.write_csv(rows, written.setdefault("attention.csv", f"{out_dir}/attention.csv"))
    png = plots.save(attention_figure(rows), os.path.join(out_dir, "attention_share"))[0]
    written["attention_share.png"] = png
    out += ["Attention share per layer on the validation set (evaluation/attention_share.py): "
            "the mass on target and clutter patches, averaged over heads and query tokens, in "
            "%, mean over seeds [95% t-interval over seeds]; the difference is paired by seed. "
            "DiffViT's map is A1 − λA2 divided by its row sum 1 − λ; its negative entries are "
            "kept, and their mass per row is a column; so is each seed's final λ, since a λ "
            "near 1 divides that seed's map by a small 1 − λ and dominates the mean. "
            "Enrichment (the share over the patches' fraction) and the empty patches are in "
            "attention.csv.\n",
            attention_markdown(rows), "",
            f"![attention share per layer]({os.path.relpath(png, out_dir)})\n"]
  return out
