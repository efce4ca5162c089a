r"""Figures of what each layer and head attends to, for a checkpoint and a few validation images.

  python -m diffvit_jax.evaluation.attention_maps --workdir RUN [--num_images 4] [--out DIR] \
      [--best]

Writes into --out (default RUN/attention_maps): attention_<i>.{png,svg} per
image and attention_summary.{png,svg}.
"""

import os
import sys

import numpy as np
from absl import flags

from diffvit_jax import cli
from diffvit_jax.errors import ConfigError, UserError

PROG = "python -m diffvit_jax.evaluation.attention_maps"
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The training run's directory (config and checkpoints are "
                    "read from it).", flag_values=FLAGS)
flags.DEFINE_integer("num_images", 4, "Validation images to show.", flag_values=FLAGS)
flags.DEFINE_string("out", "", "Output directory (default: WORKDIR/attention_maps).",
                    flag_values=FLAGS)
flags.DEFINE_bool("best", False, "Use the best checkpoint, not the latest.", flag_values=FLAGS)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)

DIFF_CMAP = "RdBu_r"
ATTN_CMAP = "viridis"
CELL = 1.15  # inches per map


def load_images(config, num_images: int):
  """The first `num_images` validation images (uint8 pixels, as evaluation reads them) and
  their labels."""
  from diffvit_jax.data import input_pipeline

  batch = next(iter(input_pipeline.create_eval_iterator(
      config.data, global_batch_size=num_images, corruption="", severity=0)))
  keep = np.asarray(batch["mask"]) > 0  # A split smaller than num_images is padded.
  return np.asarray(batch["image"])[keep], np.asarray(batch["label"])[keep]


def unnormalise(images, data_config) -> np.ndarray:
  """uint8 pixels or normalised float images -> RGB in [0, 1] for display."""
  from diffvit_jax.data import normalise

  return normalise.pixels(images, data_config.mean, data_config.std)


def pool_queries(attn: np.ndarray, pool: str, grid: int) -> np.ndarray:
  """[B, H, T, T] attention -> [B, H, grid, grid]: what the pooled representation reads.

  pool='cls': the class token's row (its attention over the patches, the
  class token itself left out); pool='gap': the mean over query tokens, since
  the head averages every token.
  """
  if pool == "cls":
    rows = attn[:, :, 0, 1:]
  else:
    rows = attn.mean(axis=2)
  return rows.reshape(*rows.shape[:2], grid, grid)


def pool_lambda(lam, pool: str, batch: int, heads: int) -> np.ndarray:
  """lambda as [B, H]: a scalar per layer (diffvit), or per query token (diffvit2, [B, H, T])."""
  lam = np.asarray(lam, np.float64)
  if lam.ndim == 0:
    return np.full((batch, heads), float(lam))
  return lam[:, :, 0] if pool == "cls" else lam.mean(axis=2)


def pooled_maps(model_config, params, images, grid: int) -> list[dict[str, np.ndarray]]:
  """Per layer: {'attn'} or {'attn1', 'attn2', 'diff', 'lambda' [B, H]}, maps [B, H, g, g]."""
  from diffvit_jax import models

  pooled = []
  for layer in models.attention_maps(model_config, params, images):
    out = {k: pool_queries(v, model_config.pool, grid) for k, v in layer.items()
           if k != "lambda"}
    if "lambda" in layer:
      batch, heads = out["diff"].shape[:2]
      out["lambda"] = pool_lambda(layer["lambda"], model_config.pool, batch, heads)
    pooled.append(out)
  return pooled


def _plain(ax):
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_visible(False)


def image_figure(image, layers: list[dict], index: int, title: str):
  """One image: rows = layers; per head A (vit) or A1, A2, A1 - lambda A2 (differential)."""
  import matplotlib.pyplot as plt
  from matplotlib import gridspec

  differential = "diff" in layers[0]
  heads = layers[0]["diff" if differential else "attn"].shape[1]
  per_head = ("attn1", "attn2", "diff") if differential else ("attn",)
  names = {"attn": "A", "attn1": "A1", "attn2": "A2", "diff": "A1−λA2"}
  # Columns: image, gap, heads (each len(per_head) maps, a gap between heads), then the
  # colour bars (gap, bar, room for its tick labels, bar).
  widths = [1.0, 0.15]
  for h in range(heads):
    widths += [1.0] * len(per_head) + ([0.25] if h < heads - 1 else [])
  bars_at = len(widths) + 1
  widths += [0.2, 0.1] + ([0.75, 0.1] if differential else []) + [0.55]
  depth = len(layers)
  top, bottom, row_height = 0.85, 0.15, CELL * 1.35  # inches: title, margin, map + its title
  height = top + bottom + row_height * depth
  fig = plt.figure(figsize=(CELL * sum(widths) + 0.5, height))
  spec = gridspec.GridSpec(depth, len(widths), figure=fig, width_ratios=widths, wspace=0.06,
                           hspace=0.45, top=1 - top / height, bottom=bottom / height,
                           left=0.03, right=0.99)
  for row, layer in enumerate(layers):
    ax = fig.add_subplot(spec[row, 0])
    ax.imshow(image, interpolation="nearest")
    _plain(ax)
    ax.set_ylabel(f"layer {row + 1}", fontsize=10)
    # One scale for every softmax map of the layer, one symmetric scale for the differences.
    vmax = max(float(layer[k][index].max()) for k in per_head if k != "diff")
    dmax = float(np.abs(layer["diff"][index]).max()) if differential else 0.0
    col = 2
    for h in range(heads):
      for key in per_head:
        ax = fig.add_subplot(spec[row, col])
        values = layer[key][index, h]
        if key == "diff":
          im_diff = ax.imshow(values, cmap=DIFF_CMAP, vmin=-dmax, vmax=dmax,
                              interpolation="nearest")
          label = f"h{h + 1} {names[key]}\nλ={layer['lambda'][index, h]:.3f}"
        else:
          im_attn = ax.imshow(values, cmap=ATTN_CMAP, vmin=0.0, vmax=vmax,
                              interpolation="nearest")
          label = f"h{h + 1} {names[key]}"
        _plain(ax)
        ax.set_title(label, fontsize=8, pad=2)
        col += 1
      col += 1 if h < heads - 1 else 0
    cbar = fig.colorbar(im_attn, cax=fig.add_subplot(spec[row, bars_at]))
    cbar.ax.tick_params(labelsize=7)
    cbar.ax.set_title("A" if not differential else "A1, A2", fontsize=7)
    if differential:
      cbar = fig.colorbar(im_diff, cax=fig.add_subplot(spec[row, bars_at + 2]))
      cbar.ax.tick_params(labelsize=7)
      cbar.ax.set_title("A1−λA2", fontsize=7)
  fig.suptitle(title, fontsize=11, y=1 - 0.1 / height, va="top")
  return fig


def summary_figure(images, layers: list[dict], titles: list[str], suptitle: str):
  """Rows = images; columns = the image and each layer's map averaged over heads."""
  import matplotlib.pyplot as plt

  differential = "diff" in layers[0]
  key = "diff" if differential else "attn"
  depth, count = len(layers), len(images)
  top, bottom, row_height = 0.8, 0.75, CELL * 1.45
  height = top + bottom + row_height * count
  fig, axes = plt.subplots(count, depth + 1, squeeze=False,
                           figsize=(CELL * 1.3 * (depth + 1) + 0.4, height),
                           gridspec_kw=dict(top=1 - top / height, bottom=bottom / height,
                                            hspace=0.55, wspace=0.12, left=0.02, right=0.98))
  for i in range(count):
    axes[i, 0].imshow(images[i], interpolation="nearest")
    axes[i, 0].set_title(titles[i], fontsize=8)
    _plain(axes[i, 0])
  for j, layer in enumerate(layers):
    values = layer[key].mean(axis=1)  # [B, g, g], heads averaged
    # One scale per layer, shared by the images: compare images at equal depth.
    if differential:
      vmax = float(np.abs(values).max())
      scale = dict(cmap=DIFF_CMAP, vmin=-vmax, vmax=vmax)
    else:
      scale = dict(cmap=ATTN_CMAP, vmin=0.0, vmax=float(values.max()))
    for i in range(count):
      im = axes[i, j + 1].imshow(values[i], interpolation="nearest", **scale)
      _plain(axes[i, j + 1])
    axes[0, j + 1].set_title(f"layer {j + 1}", fontsize=9)
    # Below the column, in the bottom margin, so the last row's maps keep their size.
    box = axes[-1, j + 1].get_position()
    cax = fig.add_axes([box.x0 + 0.1 * box.width, box.y0 - 0.3 / height, 0.8 * box.width,
                        0.09 / height])
    cbar = fig.colorbar(im, cax=cax, orientation="horizontal")
    cbar.ax.tick_params(labelsize=6, rotation=45)
  fig.suptitle(suptitle, fontsize=10, y=1 - 0.1 / height, va="top")
  return fig


def write_attention_maps(workdir: str, out_dir: str = "", num_images: int = 4,
                         best: bool = False) -> list[str]:
  """Writes the per-image figures and the summary; returns the PNG paths.

  The maps come from `models.attention_maps` (the extraction lives with the
  models). For each image, one figure: a row per layer, and per head the
  attention of the class token (pool='cls') or the mean over query tokens
  (pool='gap') over the patches, on the patch grid, beside the input image. For
  differential models each head shows its two softmax maps A1, A2 and the
  differential map A1 - lambda A2 that the layer actually uses: the paper's
  claim is that the subtraction cancels attention noise, which shows as a
  differential map more concentrated than A1. A1 and A2 share one colour scale
  per layer; the difference has its own, diverging and centred on zero (blue
  means the pair takes probability away from a patch). One more figure shows all
  images at once with the head-averaged map of every layer.
  """
  import jax

  from diffvit_jax import models
  from diffvit_jax.data import input_pipeline, normalise
  from diffvit_jax.models import registry
  from diffvit_jax.reporting import plots
  from diffvit_jax.training import checkpointing

  if num_images < 1:
    raise ConfigError(f"--num_images must be at least 1, got {num_images}.")
  params, config, step = checkpointing.load_for_inference(workdir, best=best)
  out_dir = out_dir or os.path.join(workdir, "attention_maps")
  os.makedirs(out_dir, exist_ok=True)
  pixels, labels = load_images(config, num_images)
  images = normalise.model_input(pixels, config.data.mean, config.data.std)
  grid = config.data.image_size // config.model.patch_size
  layers = pooled_maps(config.model, params, images, grid)
  logits = models.build_model(config.model).apply({"params": params}, images, train=False)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  class_names = input_pipeline.get_dataset_info(config.data).class_names

  arch = registry.label(config.model.arch)
  query = ("class-token attention" if config.model.pool == "cls"
           else "attention averaged over queries")
  shown = unnormalise(pixels, config.data)
  paths, titles = [], []
  for i in range(len(images)):
    pred = int(probs[i].argmax())
    titles.append(f"label {class_names[labels[i]]}\npred {class_names[pred]} "
                  f"({probs[i, pred]:.2f})")
    title = (f"{config.name or arch} ({arch}, step {step}), validation image {i}: "
             f"label {class_names[labels[i]]}, predicted {class_names[pred]} "
             f"(p={probs[i, pred]:.2f})\n{query} on the {grid}x{grid} patch grid")
    fig = image_figure(shown[i], layers, i, title)
    paths.append(plots.save(fig, os.path.join(out_dir, f"attention_{i}"))[0])
  what = "A1 − λA2" if "diff" in layers[0] else "A"
  fig = summary_figure(shown, layers, titles,
                       f"{config.name or arch} ({arch}, step {step}): {what}, mean over heads,\n"
                       f"{query}; one colour scale per layer")
  paths.append(plots.save(fig, os.path.join(out_dir, "attention_summary"))[0])
  return paths


def main(argv: list[str] | None = None) -> int:
  """The command line (argv without the program name); returns the exit code."""
  try:
    extra = cli.parse(FLAGS, argv, prog=PROG, usage=__doc__)
    if extra is None:
      return 0
    if extra:
      raise ConfigError(f"{PROG} takes no positional arguments, got {' '.join(extra)}.")
    paths = write_attention_maps(FLAGS.workdir, FLAGS.out, FLAGS.num_images, FLAGS.best)
  except UserError as e:
    return cli.report(e)
  print("\n".join(paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())
