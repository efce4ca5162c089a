"""Read-outs for the analysis tools: lambda per layer and the attention maps."""

import jax
import numpy as np

from diffvit_jax.models.attention import LAMBDA_VECTORS, differential_lambda
from diffvit_jax.models.build import build_model


def lambda_per_layer(params, model_config) -> np.ndarray | None:
  """The scalar lambda of each layer, [depth], for arch 'diffvit'.

  None for 'vit' (no lambda) and for 'diffvit2', whose lambda depends on the
  token (see `attention_maps` for its per-query values on given images).
  """
  if model_config.arch != "diffvit":
    return None
  values = []
  for i in range(model_config.depth):
    attn = params[f"block_{i}"]["attn"]
    values.append(differential_lambda(*(attn[name] for name in LAMBDA_VECTORS), layer=i + 1))
  return np.asarray(jax.device_get(values), np.float32)


def attention_maps(model_config, params, images) -> list[dict[str, np.ndarray]]:
  """Attention maps of every layer on `images` (NHWC), one dict per layer, numpy arrays.

  'vit': {'attn': [B, heads, T, T]}.
  'diffvit': {'attn1', 'attn2': [B, H, T, T], 'lambda': scalar, 'diff': attn1 - lambda attn2}.
  'diffvit2': as 'diffvit' but 'lambda' is [B, H, T], one value per query token.
  Runs the einsum path (the only one that materialises the maps) in eval mode.
  """
  config = model_config.copy_and_resolve_references()
  config.attention_impl = "einsum"
  model = build_model(config)
  _, state = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False,
                                              mutable=["intermediates"]))(params, images)
  maps = []
  for i in range(config.depth):
    sown = state["intermediates"][f"block_{i}"]["attn"]
    maps.append({name: np.asarray(values[0]) for name, values in sown.items()})
  return maps
