"""The Vision Transformer shared by both families; only the attention module differs.

Equal to timm's `VisionTransformer` with `fc_norm=False`, `no_embed_class=False`
(the class token has a position embedding), `global_pool='token'|'avg'`, pre-norm
blocks and exact GELU: `diffvit_jax.interop.convert` ports weights both ways and
tests/test_timm_equivalence.py checks the logits.

Parameter tree (every Dense/Conv weight is a `kernel`, so the trainer's
weight-decay mask can select matrices by name):

  embedding/{kernel,bias}     patch embedding, a conv with kernel = stride = patch
  cls                         class token [1, 1, D] (pool='cls' only)
  pos_embedding               [1, T, D] (posemb='learn' only; sincos2d is a constant)
  block_{i}/norm1, attn/{query,key,value,out,...}, norm2, mlp/{fc1,fc2}
  norm                        final norm, applied to all tokens before pooling
  head/{kernel,bias}
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffvit_jax.errors import ConfigError
from diffvit_jax.models import posemb, registry
from diffvit_jax.models.attention_ops import projection
from diffvit_jax.models.dropout import Dropout
from diffvit_jax.models.norms import BLOCK_NORM_EPS, make_norm

Dtype = Any


def stochastic_depth_rates(rate: float, depth: int) -> list[float]:
  """Drop-path rate of each block: linear from 0 (first) to `rate` (last), timm's rule."""
  return [float(r) for r in np.linspace(0.0, rate, depth)]


class MlpBlock(nn.Module):
  """fc1 -> exact GELU -> dropout -> fc2 -> dropout (timm's `Mlp`)."""

  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  dot_general: Callable | None = None  # of both Dense (None: lax.dot_general)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    dense = lambda features, name: projection(
        features, use_bias=True, dtype=self.dtype, dot_general=self.dot_general, name=name)
    width = x.shape[-1]
    x = dense(self.mlp_dim, "fc1")(x)
    x = nn.gelu(x, approximate=False)
    x = Dropout(self.dropout)(x, deterministic=not train)
    x = dense(width, "fc2")(x)
    return Dropout(self.dropout)(x, deterministic=not train)


class EncoderBlock(nn.Module):
  """Pre-norm block: x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

  attention: Callable[..., nn.Module]  # ViT.attention_fn(layer): the arch's attention class
  mlp_dim: int
  norm: str = "layernorm"
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  dot_general: Callable | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:  # positional for remat
    # Stochastic depth: drop the whole residual branch per example, scale the
    # kept ones by 1 / (1 - rate) (timm's DropPath with scale_by_keep).
    drop_path = Dropout(self.drop_path, broadcast_dims=(1, 2), name="drop_path")
    norm = lambda name: make_norm(self.norm, eps=BLOCK_NORM_EPS, dtype=self.dtype, name=name)
    y = self.attention(name="attn")(norm("norm1")(x), train=train)
    x = x + drop_path(y, deterministic=not train)
    y = MlpBlock(self.mlp_dim, dropout=self.dropout, dtype=self.dtype,
                 dot_general=self.dot_general, name="mlp")(
        norm("norm2")(x), train=train)
    return x + drop_path(y, deterministic=not train)


class ViT(nn.Module):
  """Vision Transformer classifier; `arch` picks the attention. NHWC images -> float32 logits.

  Its fields are `config.model`'s (config_lib.model_config documents them);
  build it with `models.build_model`, which validates the config and resolves
  `attention_impl` to the path that runs.
  """

  num_classes: int
  arch: str = registry.BASELINE_ARCH
  width: int = 320
  depth: int = 8
  num_heads: int = 10  # of the classic ViT; differential kinds use num_heads // 2 pairs
  mlp_dim: int = 1280
  patch_size: int = 4
  pool: str = "gap"
  posemb: str = "learn"
  norm: str = "layernorm"
  attn_bias: bool = True
  arch_fields: Mapping[str, Any] = flax.core.FrozenDict()  # the kind's own config fields
  dropout: float = 0.0
  attn_dropout: float = 0.0
  stoch_depth: float = 0.0
  attention_impl: str = "einsum"  # resolved: 'einsum' | 'xla' | 'cudnn'
  attention_chunk_mib: int = 1024
  dtype: str = "float32"  # compute dtype; the rest is models/precision.py's table
  remat: bool = False  # recompute each block in the backward pass (same numbers, less memory)
  # The blocks' Dense product (None: lax.dot_general); build_model picks a backend's own form.
  dot_general: Callable | None = None

  def attention_fn(self, layer: int) -> Callable[..., nn.Module]:
    """The attention constructor for the 1-based `layer` (call it with name=...)."""
    kind = registry.kind(self.arch)
    return functools.partial(
        kind.module, num_heads=self.num_heads, qkv_bias=self.attn_bias,
        attn_dropout=self.attn_dropout, dropout=self.dropout, impl=self.attention_impl,
        chunk_bytes=self.attention_chunk_mib * 2**20, dtype=jnp.dtype(self.dtype),
        dot_general=self.dot_general,
        **kind.layer_fields(self.arch_fields, layer))

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    if images.ndim != 4 or images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
      # A VALID conv would silently drop the border pixels.
      raise ConfigError(f"Images of shape {images.shape} are not NHWC with height and width "
                        f"multiples of config.model.patch_size={self.patch_size}.")
    dtype = jnp.dtype(self.dtype)
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                dtype=dtype, param_dtype=jnp.float32,
                kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros,
                name="embedding")(images.astype(dtype))
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, self.width)

    # The residual stream is float32 (models/precision.py), as under PyTorch's autocast:
    # blocks compute in `dtype` and their outputs are added to it in float32.
    x = x.astype(jnp.float32)
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.normal(stddev=1e-6), (1, 1, self.width), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)), x], axis=1)
    if self.posemb == "learn":
      # As timm: the class token has a position too (concat, then add).
      pos = self.param("pos_embedding", nn.initializers.truncated_normal(stddev=0.02),
                       (1, x.shape[1], self.width), jnp.float32)
    else:
      # Fixed; the class token (if any) gets zeros, i.e. no position.
      table = posemb.sincos_2d(grid_h, grid_w, self.width)
      pos = np.pad(table, [(x.shape[1] - table.shape[0], 0), (0, 0)])[None]
    x = x + pos
    x = Dropout(self.dropout)(x, deterministic=not train)

    rates = stochastic_depth_rates(self.stoch_depth, self.depth)
    # static_argnums: `train` (argument 2, counting the module) is a Python bool.
    block = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block(self.attention_fn(layer=i + 1), mlp_dim=self.mlp_dim, norm=self.norm,
                dropout=self.dropout, drop_path=rates[i], dtype=dtype,
                dot_general=self.dot_general, name=f"block_{i}")(x, train)

    # Final norm on every token before pooling, for both pools (timm fc_norm=False).
    x = make_norm(self.norm, eps=BLOCK_NORM_EPS, dtype=dtype, name="norm")(x)
    x = x[:, 0] if self.pool == "cls" else jnp.mean(x.astype(jnp.float32), axis=1)
    # Head in float32: logits are float32 whatever the compute dtype.
    return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                    name="head")(x.astype(jnp.float32))
