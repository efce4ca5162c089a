"""Read-outs for the analysis tools: lambda per layer and the attention maps."""

import jax
import numpy as np

from diffvit_jax.models import registry
from diffvit_jax.models.build import build_model


def lambda_per_layer(params, model_config) -> np.ndarray | None:
  """The scalar lambda of each layer, [depth], for kinds whose lambda is one per layer.

  None where the registry has no per-layer read-out ('vit' has no lambda;
  'diffvit2's depends on the token: see `attention_maps` for its per-query
  values on given images).
  """
  readout = registry.kind(model_config.arch).lambda_per_layer
  if readout is None:
    return None
  return np.asarray(jax.device_get(readout(params, model_config)), np.float32)


def attention_maps(model_config, params, images) -> list[dict[str, np.ndarray]]:
  """Attention maps of every layer on `images` (NHWC), one dict per layer, numpy arrays.

  'vit': {'attn': [B, heads, T, T]}.
  'diffvit': {'attn1', 'attn2': [B, H, T, T], 'lambda': scalar, 'diff': attn1 - lambda attn2}.
  'diffvit2': as 'diffvit' but 'lambda' is [B, H, T], one value per query token.
  Runs the einsum path (the only one that materialises the maps) in eval mode.
  """
  model = build_model(model_config, attention="einsum")
  _, state = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False,
                                              mutable=["intermediates"]))(params, images)
  maps = []
  for i in range(model_config.depth):
    sown = state["intermediates"][f"block_{i}"]["attn"]
    maps.append({name: np.asarray(values[0]) for name, values in sown.items()})
  return maps
