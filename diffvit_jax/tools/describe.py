r"""Print a model's parameter tree and its size, without allocating it.

  python -m diffvit_jax.tools.describe --config configs/tiny_imagenet.py:diffvit_20m \
      [--config.model.depth=12 ...]

Prints clu's parameter overview of the real tree (from `jax.eval_shape`) and,
as the last line, one JSON object (params, non_embedding_params, arch, tokens,
gflops_per_image, width, depth, heads, attention_heads, extra_params_vs_vit: what
the attention kind adds to the classic ViT of the same config) for scripts to parse.
"""

import json
import sys

from absl import app
from clu import parameter_overview
from ml_collections import config_flags

from diffvit_jax.errors import UserError
from diffvit_jax.models import registry, stats

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (e.g. "
                                          "configs/tiny_imagenet.py:vit_10m).", lock_config=True)


def describe(config) -> tuple[str, dict]:
  """(parameter overview table, summary dict) of `config.model` at `config.data.image_size`."""
  model, image_size = config.model, config.data.image_size
  shapes = stats.param_shapes(model, image_size)
  counts = stats.count_params(model, image_size)
  summary = dict(
      name=config.get("name", ""), arch=model.arch, params=counts["total"],
      non_embedding_params=counts["non_embedding"],
      tokens=stats.num_tokens(model, image_size), image_size=image_size,
      gflops_per_image=round(stats.gflops_per_image(model, image_size), 4),
      width=model.width, depth=model.depth, heads=model.num_heads,
      attention_heads=registry.attention_heads(model),
      mlp_dim=model.mlp_dim, patch_size=model.patch_size,
      extra_params_vs_vit=stats.extra_params_vs_baseline(model, image_size))
  overview = parameter_overview.get_parameter_overview(shapes, include_stats=False)
  return overview, summary


def main(argv):
  del argv
  try:
    if _CONFIG.value is None:
      raise UserError("--config is required, e.g. --config configs/tiny_imagenet.py:vit_10m.")
    overview, summary = describe(_CONFIG.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  print(overview)
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
