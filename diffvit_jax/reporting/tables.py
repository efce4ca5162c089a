"""The results tables: one row per config (seeds as mean and std), per run, and differences.

Each table is a list of dicts (one per row) with numeric cells, written as
CSV (full precision, for other tools) and rendered as Markdown (percentages,
mean +- std over seeds, for people).
"""

import csv
import math

import numpy as np

from diffvit_jax.reporting import runs as runs_lib

# Per-run numbers that get a mean and a std over seeds; see `Run.summary` for their source.
METRICS = ("best_top1", "final_top1", "best_top5", "final_top5", "final_loss", "images_per_sec",
           "train_seconds")
# Accuracy differences reported between each differential architecture and the ViT.
DIFF_METRICS = ("best_top1", "final_top1", "final_top5")
BASELINE_ARCH = "vit"


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
  return float(values.mean()), std


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
               seeds=" ".join(map(str, group.seeds)), n_seeds=len(group.runs),
               steps=min(s["steps"] for s in summaries))
    for metric in METRICS:
      row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([s[metric] for s in summaries])
    rows.append(row)
  return rows


def difference_rows(groups: list[runs_lib.Group]) -> list[dict]:
  """Each differential config minus the ViT of the same protocol and size.

  `diff`: mean over its seeds minus mean over the ViT's seeds. `std`: the
  standard deviation over seeds of the per-seed difference, pairing the runs
  by seed number (NaN with fewer than two seeds in common); `min`/`max`: the
  range of those per-seed differences.
  """
  rows = []
  by_key = {}
  for group in groups:
    by_key.setdefault((group.protocol, group.size), []).append(group)
  for (protocol, size), members in by_key.items():
    baselines = [g for g in members if g.arch == BASELINE_ARCH]
    if len(baselines) != 1:
      continue
    base = baselines[0]
    base_by_seed = {r.seed: r.summary() for r in base.runs}
    for group in members:
      if group.arch == BASELINE_ARCH:
        continue
      mine_by_seed = {r.seed: r.summary() for r in group.runs}
      paired = sorted(set(base_by_seed) & set(mine_by_seed))
      row = dict(protocol=protocol, size=size, arch=group.arch, baseline=base.arch,
                 seeds=len(group.runs), baseline_seeds=len(base.runs),
                 paired_seeds=" ".join(map(str, paired)))
      for metric in DIFF_METRICS:
        mine = np.mean([s[metric] for s in mine_by_seed.values()])
        theirs = np.mean([s[metric] for s in base_by_seed.values()])
        per_seed = [mine_by_seed[s][metric] - base_by_seed[s][metric] for s in paired]
        row[f"{metric}_diff"] = float(mine - theirs)
        row[f"{metric}_std"] = _mean_std(per_seed)[1] if per_seed else math.nan
        row[f"{metric}_min"] = float(min(per_seed)) if per_seed else math.nan
        row[f"{metric}_max"] = float(max(per_seed)) if per_seed else math.nan
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


def results_markdown(rows: list[dict]) -> str:
  header = ["arch", "size", "params", "protocol", "seeds", "steps", "best top-1 %",
            "final top-1 %", "best top-5 %", "final top-5 %", "final val loss", "train img/s",
            "wall time"]
  body = []
  for r in rows:
    body.append([
        runs_lib.ARCH_LABELS.get(r["arch"], r["arch"]), r["size"], _params(r["params"]),
        r["protocol"], r["seeds"], f"{r['steps']:.0f}",
        _pct(r["best_top1_mean"], r["best_top1_std"]),
        _pct(r["final_top1_mean"], r["final_top1_std"]),
        _pct(r["best_top5_mean"], r["best_top5_std"]),
        _pct(r["final_top5_mean"], r["final_top5_std"]),
        _num(r["final_loss_mean"], r["final_loss_std"]),
        _num(r["images_per_sec_mean"], digits=0), _duration(r["train_seconds_mean"])])
  return markdown_table(header, body, "lllllrrrrrrrr")


def differences_markdown(rows: list[dict]) -> str:
  header = ["size", "protocol", "model", "best top-1 (pp)", "final top-1 (pp)",
            "final top-5 (pp)", "seeds (model / ViT / paired)"]
  body = []
  for r in rows:
    n_paired = len(r["paired_seeds"].split())
    body.append([r["size"], r["protocol"],
                 f"{runs_lib.ARCH_LABELS.get(r['arch'], r['arch'])} − ViT"]
                + [_pct(r[f"{m}_diff"], r[f"{m}_std"], signed=True) for m in DIFF_METRICS]
                + [f"{r['seeds']} / {r['baseline_seeds']} / {n_paired}"])
  return markdown_table(header, body, "lllrrrr")


def runs_markdown(rows: list[dict]) -> str:
  header = ["workdir", "arch", "size", "seed", "params", "steps", "best top-1 %",
            "final top-1 %", "final top-5 %", "final val loss", "train img/s", "wall time"]
  body = [[f"`{r['workdir']}`", runs_lib.ARCH_LABELS.get(r["arch"], r["arch"]), r["size"],
           str(r["seed"]), _params(r["params"]), f"{r['steps']:.0f}", _pct(r["best_top1"]),
           _pct(r["final_top1"]), _pct(r["final_top5"]), _num(r["final_loss"]),
           _num(r["images_per_sec"], digits=0), _duration(r["train_seconds"])] for r in rows]
  return markdown_table(header, body, "llllrrrrrrrr")


def robustness_markdown(rows: list[dict]) -> str:
  header = ["arch", "size", "protocol", "seeds", "clean top-1 %",
            "mean corruption error %", "mCE % (baseline)"]
  body = []
  for r in rows:
    mce = _pct(r["mce_mean"], r["mce_std"])
    if r.get("coverage") == "partial":  # Not all 15 corruptions x 5 severities.
      mce += " partial"
    body.append([runs_lib.ARCH_LABELS.get(r["arch"], r["arch"]), r["size"], r["protocol"],
                 str(r["n_seeds"]), _pct(r["clean_top1_mean"], r["clean_top1_std"]),
                 _pct(r["mean_corruption_error_mean"], r["mean_corruption_error_std"]),
                 f"{mce} ({r['mce_baseline']})" if r["mce_baseline"] else mce])
  table = markdown_table(header, body, "lllrrrr")
  names = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("top1/")})
  if not names:
    return table
  configs = [f"{runs_lib.ARCH_LABELS.get(r['arch'], r['arch'])} {r['size']}" for r in rows]
  per = [[name.replace("_", " ")] + [_pct(r.get(f"top1/{name}", math.nan)) for r in rows]
         for name in names]
  return (table + "\n\nTop-1 % per corruption, mean over severities (and seeds):\n\n"
          + markdown_table(["corruption"] + configs, per, "l" + "r" * len(configs)))
