"""Where each layer's attention lands on a data set whose patches have kinds (target/clutter/empty).

The trainer writes `attention_share.json` at its last step when the evaluation source
gives per-patch kinds (`patch_kinds`, the cluttered digits). Per layer, over the validation
set (each image weighs the same), from the einsum path's maps (`models.attention_maps`):

  share       the attention mass on target / clutter / empty patches, averaged over heads
              and query tokens (a row's shares sum to 1)
  enrichment  share / the fraction of the image's patches of that kind, averaged over the
              images that have such patches (1 = attention as if uniform over patches)
  negative    the mass of a row's negative entries (<= 0), averaged like the share

ViT: the softmax map A. DiffViT: the map the layer applies, A1 - lambda A2, divided by its
row sum 1 - lambda (per layer for V1, per query token for V2) so that it weighs the values
as A does; its negative entries are kept (they take mass away from a patch) and reported.
"""

import json
import os

import numpy as np

from diffvit_jax import files
from diffvit_jax.data import cluttered_digits

ATTENTION_SHARE = "attention_share.json"
KINDS = cluttered_digits.KINDS  # the codes 0, 1, 2 a source's patch_kinds gives
BATCH = 120


def effective_map(layer: dict) -> np.ndarray:
  """[B, H, T, T] rows summing to 1: A, or (A1 - lambda A2) / (1 - lambda)."""
  if "diff" not in layer:
    return np.asarray(layer["attn"], np.float64)
  lam = np.asarray(layer["lambda"], np.float64)
  row_sum = 1.0 - (lam[..., None] if lam.ndim else lam)  # V2: [B, H, T] -> [B, H, T, 1]
  return np.asarray(layer["diff"], np.float64) / row_sum


def image_shares(maps: np.ndarray, kinds: np.ndarray) -> dict[str, np.ndarray]:
  """Per image: share [B, 3], patch fraction [B, 3], negative mass [B], from maps [B, H, T, T]
  and patch kinds [B, T] (codes 0, 1, 2 in KINDS order)."""
  onehot = (kinds[:, :, None] == np.arange(len(KINDS))).astype(np.float64)  # [B, T, 3]
  mass = np.einsum("bhqk,bkc->bhqc", maps, onehot)
  return dict(share=mass.mean(axis=(1, 2)), fraction=onehot.mean(axis=1),
              negative=np.minimum(maps, 0.0).sum(-1).mean(axis=(1, 2)))


def summarise(per_image: list[dict[str, np.ndarray]]) -> dict:
  """One layer's numbers over the images (lists in KINDS order; None where no image has a kind)."""
  share = np.concatenate([p["share"] for p in per_image])
  fraction = np.concatenate([p["fraction"] for p in per_image])
  negative = np.concatenate([p["negative"] for p in per_image])
  enrichment = []
  for k in range(len(KINDS)):
    present = fraction[:, k] > 0
    enrichment.append(float((share[present, k] / fraction[present, k]).mean())
                      if present.any() else None)
  return dict(share=share.mean(axis=0).tolist(), enrichment=enrichment,
              fraction=fraction.mean(axis=0).tolist(), negative=float(negative.mean()))


def measure(config, params, source) -> list[dict]:
  """Per layer, `summarise` over `source` (the evaluation split, in batches of BATCH images)."""
  from diffvit_jax import models
  from diffvit_jax.data import normalise

  patch = config.model.patch_size
  per_layer: list[list[dict]] = [[] for _ in range(config.model.depth)]
  for start in range(0, len(source), BATCH):
    indices = range(start, min(start + BATCH, len(source)))
    pixels = np.stack([source[i]["image"] for i in indices])
    kinds = np.stack([source.patch_kinds(i, patch).reshape(-1) for i in indices])
    images = normalise.model_input(pixels, config.data.mean, config.data.std)
    for layer, maps in enumerate(models.attention_maps(config.model, params, images)):
      per_layer[layer].append(image_shares(effective_map(maps), kinds))
  return [summarise(p) for p in per_layer]


def write_final(state, config, workdir: str, step: int) -> str | None:
  """Writes `attention_share.json` (chief only) when the evaluation source has patch kinds."""
  import jax

  from diffvit_jax.data import sources

  source = sources.get_source(config.data, config.data.eval_split)
  if not hasattr(source, "patch_kinds") or jax.process_index() != 0:
    return None
  path = os.path.join(workdir, ATTENTION_SHARE)
  if (read(workdir) or {}).get("step") == step:
    return None
  layers = measure(config, jax.device_get(state.params), source)
  text = json.dumps(dict(step=step, kinds=list(KINDS), layers=layers), indent=1) + "\n"
  files.write_text(path, text, suffix=f".{os.getpid()}.tmp")
  return path


def read(workdir: str) -> dict | None:
  """`attention_share.json` of a run, None when there is none (or it cannot be read)."""
  try:
    with open(os.path.join(workdir, ATTENTION_SHARE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
