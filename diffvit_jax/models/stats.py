"""Sizes and costs computed from the real parameter tree (via `jax.eval_shape`, no allocation).

Every count comes from the tree the trainer optimises, never from a summary of the layers.
Nothing here starts a JAX backend (the report counts parameters beside a running sweep,
whose GPUs a started backend would claim memory on).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffvit_jax import config_lib
from diffvit_jax.models import registry
from diffvit_jax.models.build import build_model, check_image_size

# Top-level entries of the tree that are the embedding, not the transformer.
EMBEDDING_PARAMS = ("embedding", "pos_embedding", "cls")


def num_tokens(model_config, image_size: int) -> int:
  """Tokens the blocks see: (image_size / patch)^2 patches, plus the class token for pool='cls'."""
  config_lib.validate_model(model_config)
  check_image_size(model_config, image_size)
  grid = image_size // model_config.patch_size
  return grid * grid + (1 if model_config.pool == "cls" else 0)


def param_shapes(model_config, image_size: int):
  """The 'params' tree as ShapeDtypeStructs (the real tree, nothing allocated)."""
  model = build_model(model_config, attention="einsum")  # any path has the same tree
  check_image_size(model_config, image_size)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  # An abstract raw key: a concrete one (jax.random.key(0)) would start a backend.
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, key, images)["params"]


def _size(tree) -> int:
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)))


def count_params(model_config, image_size: int) -> dict[str, int]:
  """{'total': every parameter, 'non_embedding': total minus the embedding}.

  non_embedding (N) = the transformer blocks + the final norm + the head, i.e.
  everything but the patch embedding (conv kernel and bias), the learned
  position embedding and the class token. The head is included (it is a
  matmul per image, like the blocks' per token; with 200 classes it is <1%).
  """
  shapes = param_shapes(model_config, image_size)
  embedding = _size({k: v for k, v in shapes.items() if k in EMBEDDING_PARAMS})
  total = _size(shapes)
  return dict(total=total, non_embedding=total - embedding)


def gflops_per_image(model_config, image_size: int) -> float:
  """Forward + backward matmul GFLOPs per image: 6 N T + 6 L T^2 (D_qk + D_v).

  N: non-embedding parameters (see `count_params`), T: tokens, L: depth.
  D_qk and D_v are the total widths of the query-key and the probability-value
  products; D_qk = qk_width_factor * D from the attention registry: both D
  for 'vit' and 'diffvit' (2H heads of d for q.k; one (A1 - lambda A2) v
  over H heads of 2d), giving the usual 6 N T + 12 L T^2 D; 'diffvit2' has
  D_qk = 2D (2H query heads of 2d), so 6 N T + 18 L T^2 D.
  The head's matmul is counted per token like the blocks' (a slight overcount,
  T times its one-per-image cost, under 1% here). Patch embedding, norms and
  softmax are not counted.
  """
  tokens = num_tokens(model_config, image_size)
  n = count_params(model_config, image_size)["non_embedding"]
  width = model_config.width
  qk_width = registry.kind(model_config.arch).qk_width_factor * width
  flops = 6 * n * tokens + 6 * model_config.depth * tokens**2 * (qk_width + width)
  return flops / 1e9


def extra_params_vs_baseline(model_config, image_size: int) -> int:
  """Parameters this attention kind adds to the classic ViT of the same config.

  The difference of the two real trees (the baseline is `registry.BASELINE_ARCH`),
  so it holds for any registered kind, and is 0 for the baseline itself.
  """
  config_lib.validate_model(model_config)
  baseline = model_config.copy_and_resolve_references()
  with baseline.unlocked():
    baseline.arch = registry.BASELINE_ARCH
  return (count_params(model_config, image_size)["total"]
          - count_params(baseline, image_size)["total"])
