"""The norm layers the config can name, with the epsilons of the reference (timm).

`model.norm` picks the block, final norm: 'layernorm' is timm's LayerNorm
(eps 1e-6) and 'rmsnorm' timm's RmsNorm (eps 1e-6 as well, its default in
timm/layers/norm.py). The per-head norm of differential attention is timm's
`sub_norm`, RmsNorm with eps 1e-5; the LayerNorm alternative uses the same eps.
"""

import flax.linen as nn
import jax.numpy as jnp

NORMS = ("layernorm", "rmsnorm")
HEAD_NORMS = ("rmsnorm", "layernorm", "none")

BLOCK_NORM_EPS = 1e-6
HEAD_NORM_EPS = 1e-5


def make_norm(kind: str, *, eps: float, dtype, name: str | None = None) -> nn.Module:
  """A norm over the last axis ('layernorm' | 'rmsnorm', validated by config_lib); statistics
  in float32 (flax upcasts), output in `dtype`."""
  if kind == "layernorm":
    # Two-pass variance, as torch computes it: E[x^2] - E[x]^2 loses digits
    # when the mean is large, which would show in the timm equivalence tests.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)
  return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)  # 'rmsnorm'
