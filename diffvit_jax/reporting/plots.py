"""Figures of the report: learning curves, lambda per layer, accuracy under corruption.

Every figure is saved as PNG (for viewing) and SVG (for papers) by `save`.
Seeds of one config are drawn as their mean with a band from the lowest to
the highest seed, at the steps every seed has logged.
"""

import os

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator, PercentFormatter

from diffvit_jax.models import registry
from diffvit_jax.models.differential import lambda_init
from diffvit_jax.reporting import runs as runs_lib

DPI = 110
# (tag, panel title, y label) of the learning-curve panels.
CURVES = (
    ("train/loss", "Train loss", "loss"),
    ("eval/loss", "Validation loss", "loss"),
    ("eval/top1", "Validation top-1", "top-1 accuracy"),
)

matplotlib.use("Agg")  # Files only; never needs a display (no figure exists yet).
plt.rcParams.update({"svg.fonttype": "none", "axes.grid": True, "grid.alpha": 0.3,
                     "axes.spines.top": False, "axes.spines.right": False})


def save(fig, path_without_ext: str) -> list[str]:
  """Writes `<path>.png` and `<path>.svg`, closes the figure, returns both paths."""
  os.makedirs(os.path.dirname(path_without_ext) or ".", exist_ok=True)
  paths = []
  for ext in ("png", "svg"):
    path = f"{path_without_ext}.{ext}"
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    paths.append(path)
  plt.close(fig)
  return paths


BAND_NOTE = "lines: mean over seeds; bands: lowest to highest seed"
# Series with at most this many points get markers (few evaluations are points, not a curve).
_MARKERS_UP_TO = 30


def _band(ax, x, values, color, label, **kwargs):
  """Mean line, and a min-max band when there are several seeds."""
  marker = "o" if len(x) <= _MARKERS_UP_TO else None
  ax.plot(x, values.mean(0), color=color, label=label, lw=1.6, marker=marker, ms=3, **kwargs)
  if len(values) > 1:
    ax.fill_between(x, values.min(0), values.max(0), color=color, alpha=0.2, lw=0)


COLORS = {"vit": "tab:blue", "diffvit": "tab:red", "diffvit2": "tab:green"}


def _color(group: runs_lib.Group, index: int) -> str:
  """The arch's colour; matplotlib's cycle for the archs `COLORS` does not name."""
  return COLORS.get(group.arch, f"C{index}")


def _group_label(group: runs_lib.Group, lead: str) -> str:
  params = runs_lib.format_params(np.mean([r.params for r in group.runs]))
  seeds = len(group.runs)
  return f"{lead} ({params} params, {seeds} seed{'s' if seeds > 1 else ''})"


def learning_curves(groups: list[runs_lib.Group], title: str, *, colors: dict[int, str],
                    labels: dict[int, str]):
  """2 x 3 panels: train loss, validation loss, validation top-1; vs steps (top), epochs.

  `colors` and `labels` are indexed by position in `groups`.
  """
  fig, axes = plt.subplots(2, len(CURVES), figsize=(5.2 * len(CURVES), 7.6), squeeze=False)
  for col, (tag, panel, ylabel) in enumerate(CURVES):
    for i, group in enumerate(groups):
      data = runs_lib.aligned(group.runs, tag)
      if data is None:
        continue
      steps, values = data
      spe = group.runs[0].steps_per_epoch
      _band(axes[0, col], steps, values, colors[i], labels[i])
      if spe > 0:
        _band(axes[1, col], steps / spe, values, colors[i], labels[i])
    for row, xlabel in enumerate(("step", "epoch")):
      ax = axes[row, col]
      ax.set_title(f"{panel} vs {xlabel}s", fontsize=11)
      ax.set_xlabel(xlabel)
      ax.set_ylabel(ylabel)
      if xlabel == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
      if tag == "eval/top1":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
  handles, legend_labels = axes[0, -1].get_legend_handles_labels()
  if not handles:
    handles, legend_labels = axes[0, 0].get_legend_handles_labels()
  fig.suptitle(title, fontsize=13)
  fig.legend(handles, legend_labels, loc="lower center", ncol=min(len(handles), 3),
             frameon=False, bbox_to_anchor=(0.5, 0.01), title=BAND_NOTE,
             title_fontsize=9)
  fig.tight_layout(rect=(0, 0.09, 1, 0.97))
  return fig


def size_comparison(groups: list[runs_lib.Group], protocol: str, size: str):
  """ViT vs DiffViT(s) of one size and protocol."""
  colors = {i: _color(g, i) for i, g in enumerate(groups)}
  labels = {i: _group_label(g, g.label) for i, g in enumerate(groups)}
  title = f"{size} models, protocol {protocol or '?'}: " + " vs ".join(g.label for g in groups)
  return learning_curves(groups, title, colors=colors, labels=labels)


def arch_across_sizes(groups: list[runs_lib.Group], protocol: str, arch: str):
  """One architecture at every size of a protocol (darker = larger)."""
  # Classic in blues and differential in reds, as the two kinds' colours in other figures.
  shades = plt.get_cmap("Reds" if groups[0].differential else "Blues")
  n = len(groups)
  colors = {i: shades(0.45 + 0.5 * i / max(n - 1, 1)) for i in range(n)}
  labels = {i: _group_label(g, g.size) for i, g in enumerate(groups)}
  title = f"{registry.label(arch)} across sizes, protocol {protocol or '?'}"
  return learning_curves(groups, title, colors=colors, labels=labels)


def lambda_per_layer(groups: list[runs_lib.Group], protocol: str):
  """One panel per differential config: lambda of each layer over training (mean of seeds)."""
  groups = [g for g in groups if g.runs[0].lambda_tags()]
  cols = min(len(groups), 3)
  rows = -(-len(groups) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6.6 * cols, 4.2 * rows), squeeze=False)
  for ax, group in zip(axes.flat, groups, strict=False):
    tags = group.runs[0].lambda_tags()
    cmap = plt.get_cmap("viridis")
    for i, tag in enumerate(tags):
      data = runs_lib.aligned(group.runs, tag)
      if data is not None:
        layer = int(tag.rsplit("_", 1)[1])
        color = cmap(0.85 * i / max(len(tags) - 1, 1))  # Not viridis' pale yellow end.
        _band(ax, data[0], data[1], color, f"layer {layer}")
        # Where lambda started: the drift from it is what training learned.
        ax.axhline(lambda_init(layer), color=color, ls=":", lw=1.0)
    ax.set_title(_group_label(group, f"{group.label} {group.size}"), fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(r"$\lambda$")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # Outside the axes: with a dozen layers the lines fill the panel.
    ax.legend(fontsize=8, ncol=2 if len(tags) > 14 else 1, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)
  for ax in list(axes.flat)[len(groups):]:
    ax.set_visible(False)
  fig.suptitle(rf"Differential attention: $\lambda$ per layer, protocol {protocol or '?'}"
               "\n" rf"(dotted: $\lambda_{{init}}$ of the layer; {BAND_NOTE})", fontsize=11)
  fig.tight_layout()
  return fig


def accuracy_vs_severity(result: dict, title: str):
  """One run under corruption: top-1 vs severity, one line per corruption, clean as reference."""
  fig, ax = plt.subplots(figsize=(8.6, 5.0))
  corruptions = sorted(result["corrupted"])
  colors = plt.get_cmap("tab10").colors
  for i, name in enumerate(corruptions):
    cells = result["corrupted"][name]
    severities = sorted(int(s) for s in cells)
    # Ten distinct colours, then the same colours dashed: no two lines look alike.
    ax.plot(severities, [cells[str(s)]["top1"] for s in severities], marker="o", ms=3.5,
            lw=1.3, color=colors[i % 10], ls=("-", "--", ":")[i // 10 % 3],
            label=name.replace("_", " "))
  ax.axhline(result["clean"]["top1"], color="black", ls="--", lw=1.4, label="clean")
  ax.set_xlabel("severity")
  ax.set_ylabel("top-1 accuracy")
  ax.set_xticks(sorted({int(s) for c in result["corrupted"].values() for s in c}))
  ax.set_ylim(0, min(1.0, max(0.05, ax.get_ylim()[1])))
  ax.yaxis.set_major_formatter(PercentFormatter(1.0))
  ax.set_title(title, fontsize=11)
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
  fig.tight_layout()
  return fig


def mean_accuracy_vs_severity(groups: list[runs_lib.Group], title: str):
  """Top-1 averaged over corruptions vs severity (0 = clean), one line per config."""
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  x = None
  for i, group in enumerate(groups):
    results = [r.robustness for r in group.runs]
    severities = sorted({int(s) for c in results[0]["corrupted"].values() for s in c})
    # Seeds evaluated on other severities would not average: draw the first one's.
    results = [r for r in results if sorted({int(s) for c in r["corrupted"].values()
                                             for s in c}) == severities]
    values = np.asarray([[r["clean"]["top1"]]
                         + [np.mean([c[str(s)]["top1"] for c in r["corrupted"].values()])
                            for s in severities] for r in results])
    x = [0] + severities
    color = _color(group, i)
    _band(ax, x, values, color, _group_label(group, f"{group.label} {group.size}"))
  if x is not None:
    ax.set_xticks(x, ["clean"] + [str(s) for s in x[1:]])
  ax.set_xlabel("severity")
  ax.set_ylabel("top-1, mean over corruptions")
  ax.yaxis.set_major_formatter(PercentFormatter(1.0))
  ax.set_title(title, fontsize=11)
  ax.legend(fontsize=8, title=BAND_NOTE, title_fontsize=7)
  fig.tight_layout()
  return fig
