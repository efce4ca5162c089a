"""`config.model` -> a validated `ViT` module.

Every invalid value raises `ConfigError` naming the field, so that a bad
command-line override ends in one clear message instead of a shape error deep
inside a jitted function.
"""

import jax.numpy as jnp

from diffvit_jax.config_lib import ARCHS
from diffvit_jax.errors import ConfigError
from diffvit_jax.models.attention import ATTENTION_IMPLS
from diffvit_jax.models.norms import HEAD_NORMS, NORMS
from diffvit_jax.models.posemb import POSEMBS
from diffvit_jax.models.vit import ViT

POOLS = ("cls", "gap")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DIFFERENTIAL_ARCHS = ("diffvit", "diffvit2")


def _field(model_config, name):
  try:
    return model_config[name]
  except (KeyError, AttributeError) as e:
    raise ConfigError(f"config.model.{name} is missing.") from e


def validate(model_config) -> None:
  """Raises ConfigError for any value `build_model` cannot honour."""
  get = lambda name: _field(model_config, name)
  choices = dict(arch=ARCHS, pool=POOLS, posemb=POSEMBS, norm=NORMS, diff_head_norm=HEAD_NORMS,
                 attention_impl=ATTENTION_IMPLS, dtype=tuple(DTYPES))
  for name, allowed in choices.items():
    if get(name) not in allowed:
      raise ConfigError(f"config.model.{name}={get(name)!r} is not one of {allowed}.")
  for name in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "num_classes"):
    value = get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"config.model.{name}={value!r} must be a positive integer.")
  for name in ("dropout", "attn_dropout", "stoch_depth"):
    value = get(name)
    if not 0.0 <= value < 1.0:
      raise ConfigError(f"config.model.{name}={value!r} must be in [0, 1).")

  width, heads, arch = get("width"), get("num_heads"), get("arch")
  if width % heads:
    raise ConfigError(
        f"config.model.num_heads={heads} must divide config.model.width={width} "
        "(head size = width / num_heads).")
  if arch in DIFFERENTIAL_ARCHS and heads % 2:
    raise ConfigError(
        f"config.model.num_heads={heads} must be even for arch={arch!r}: differential "
        "attention uses num_heads // 2 pairs of heads (the classic ViT's heads, paired).")
  if get("posemb") == "sincos2d" and width % 4:
    raise ConfigError(f"config.model.posemb='sincos2d' needs config.model.width={width} "
                      "divisible by 4.")


def check_image_size(model_config, image_size: int) -> None:
  patch = model_config.patch_size
  if image_size < 1 or image_size % patch:
    raise ConfigError(f"The image size {image_size} (config.data.image_size) must be a positive "
                      f"multiple of config.model.patch_size={patch}.")


def build_model(model_config) -> ViT:
  """The ViT of `config.model` (any arch), after validating it."""
  validate(model_config)
  m = model_config
  return ViT(num_classes=m.num_classes, arch=m.arch, width=m.width, depth=m.depth,
             num_heads=m.num_heads, mlp_dim=m.mlp_dim, patch_size=m.patch_size, pool=m.pool,
             posemb=m.posemb, norm=m.norm, attn_bias=bool(m.attn_bias),
             diff_head_norm=m.diff_head_norm, dropout=float(m.dropout),
             attn_dropout=float(m.attn_dropout), stoch_depth=float(m.stoch_depth),
             attention_impl=m.attention_impl, dtype=DTYPES[m.dtype])
