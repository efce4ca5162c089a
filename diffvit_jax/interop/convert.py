"""Weights to and from timm's `VisionTransformer` (attn_layer 'attn' or 'diff').

timm is the reference the tests compare against: `timm_kwargs` builds the timm
model equivalent to a `config.model`, `from_timm` ports its state dict into our
parameter tree and `to_timm` goes back. torch and timm are imported lazily so
that importing this module costs nothing.
"""

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from diffvit_jax.config_lib import validate_model as validate
from diffvit_jax.errors import ConfigError
from diffvit_jax.models import posemb, registry
from diffvit_jax.models.build import check_image_size

# timm's Linear / conv weight -> our kernel, and back.
_TO_OURS = {"linear": lambda w: w.T, "conv": lambda w: w.transpose(2, 3, 1, 0),
            "copy": lambda w: w}
_TO_TIMM = {"linear": lambda w: w.T, "conv": lambda w: w.transpose(3, 2, 0, 1),
            "copy": lambda w: w}


# timm VisionTransformer's attn_layer of each arch that timm has.
TIMM_ATTN_LAYERS = {"vit": "attn", "diffvit": "diff"}


def _check_timm_compatible(model_config) -> None:
  validate(model_config)
  timm_layer = TIMM_ATTN_LAYERS.get(model_config.arch)
  if timm_layer is None:
    raise ConfigError(f"config.model.arch={model_config.arch!r} has no timm equivalent.")
  if timm_layer == "diff" and model_config.diff_head_norm != "rmsnorm":
    raise ConfigError(f"config.model.diff_head_norm={model_config.diff_head_norm!r} has no timm "
                      "equivalent: timm's DiffAttention always has an RmsNorm sub_norm.")


def timm_kwargs(model_config, image_size: int) -> dict[str, Any]:
  """Keyword arguments of `timm.models.vision_transformer.VisionTransformer` for our config."""
  _check_timm_compatible(model_config)
  check_image_size(model_config, image_size)
  m = model_config
  mlp_ratio = m.mlp_dim / m.width
  if int(m.width * mlp_ratio) != m.mlp_dim:  # timm: hidden = int(dim * mlp_ratio)
    raise ConfigError(f"config.model.mlp_dim={m.mlp_dim} is not representable as timm's "
                      f"int(width * mlp_ratio) with width={m.width}.")
  cls = m.pool == "cls"
  return dict(
      img_size=image_size, patch_size=m.patch_size, in_chans=3, num_classes=m.num_classes,
      global_pool="token" if cls else "avg", class_token=cls, fc_norm=False,
      embed_dim=m.width, depth=m.depth,
      # timm's DiffAttention takes the number of pairs as num_heads, as the registry counts.
      num_heads=registry.attention_heads(m),
      mlp_ratio=mlp_ratio, qkv_bias=bool(m.attn_bias), proj_bias=True,
      pos_embed="learn", no_embed_class=False, norm_layer=m.norm,
      drop_rate=0.0, pos_drop_rate=m.dropout, proj_drop_rate=m.dropout,
      attn_drop_rate=m.attn_dropout, drop_path_rate=m.stoch_depth,
      attn_layer=TIMM_ATTN_LAYERS[m.arch])


def _entries(model_config) -> Iterator[tuple[str, tuple[str, ...], str]]:
  """(timm key, our path, layout) of every tensor but the fused qkv and a sincos pos_embed."""
  m = model_config
  norm_params = [("weight", "scale"), ("bias", "bias")] if m.norm == "layernorm" else [
      ("weight", "scale")]

  def linear(timm_name, path):
    yield f"{timm_name}.weight", (*path, "kernel"), "linear"
    yield f"{timm_name}.bias", (*path, "bias"), "copy"

  def norm(timm_name, path):
    for timm_param, ours in norm_params:
      yield f"{timm_name}.{timm_param}", (*path, ours), "copy"

  yield "patch_embed.proj.weight", ("embedding", "kernel"), "conv"
  yield "patch_embed.proj.bias", ("embedding", "bias"), "copy"
  if m.pool == "cls":
    yield "cls_token", ("cls",), "copy"
  if m.posemb == "learn":
    yield "pos_embed", ("pos_embedding",), "copy"
  for i in range(m.depth):
    ours, theirs = f"block_{i}", f"blocks.{i}"
    yield from norm(f"{theirs}.norm1", (ours, "norm1"))
    yield from linear(f"{theirs}.attn.proj", (ours, "attn", "out"))
    if TIMM_ATTN_LAYERS[m.arch] == "diff":  # timm's DiffAttention's parameters
      for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
        yield f"{theirs}.attn.{name}", (ours, "attn", name), "copy"
      yield f"{theirs}.attn.sub_norm.weight", (ours, "attn", "head_norm", "scale"), "copy"
    yield from norm(f"{theirs}.norm2", (ours, "norm2"))
    yield from linear(f"{theirs}.mlp.fc1", (ours, "mlp", "fc1"))
    yield from linear(f"{theirs}.mlp.fc2", (ours, "mlp", "fc2"))
  yield from norm("norm", ("norm",))
  yield from linear("head", ("head",))


def _numpy(tensor) -> np.ndarray:
  if hasattr(tensor, "detach"):  # a torch tensor
    tensor = tensor.detach().cpu().float().numpy()
  return np.asarray(tensor, np.float32)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _sincos_table(model_config, grid_tokens: int, with_cls: bool) -> np.ndarray:
  grid = int(round(grid_tokens**0.5))
  table = posemb.sincos_2d(grid, grid, model_config.width)
  return np.pad(table, [(1 if with_cls else 0, 0), (0, 0)])[None]


def from_timm(state_dict: Mapping[str, Any], model_config) -> dict:
  """Our 'params' tree (numpy float32) from a timm VisionTransformer state dict.

  Raises ConfigError when the state dict does not match the config (missing or
  extra tensors, e.g. attn_bias or pool differing from the timm model's).

  Layout differences handled here:
  - torch Linear weights are [out, in], flax Dense kernels [in, out];
  - the patch-embedding conv is OIHW in torch, HWIO in flax;
  - timm's attention has one fused `qkv` Linear [3D, D]; ours has separate
    query/key/value kernels (rows 0:D, D:2D, 2D:3D of timm's weight);
  - timm's DiffAttention `sub_norm` is our `head_norm` (always RmsNorm, eps 1e-5,
    so only diff_head_norm='rmsnorm' has a timm equivalent);
  - timm has no 'sincos2d' position embedding: timm_kwargs asks for a learned
    one and to_timm fills it with our fixed table (zeros for the class token).
  """
  _check_timm_compatible(model_config)
  m = model_config
  remaining = {k: _numpy(v) for k, v in state_dict.items()}
  params: dict = {}

  def take(key):
    if key not in remaining:
      raise ConfigError(f"The timm state dict has no {key!r}; does config.model match the "
                        "timm model (pool, attn_bias, norm, arch, depth)?")
    return remaining.pop(key)

  for key, path, layout in _entries(m):
    _set(params, path, _TO_OURS[layout](take(key)))

  for i in range(m.depth):
    qkv = take(f"blocks.{i}.attn.qkv.weight")
    qkv_bias = take(f"blocks.{i}.attn.qkv.bias") if m.attn_bias else None
    for j, name in enumerate(("query", "key", "value")):
      rows = slice(j * m.width, (j + 1) * m.width)
      _set(params, (f"block_{i}", "attn", name, "kernel"), qkv[rows].T)
      if qkv_bias is not None:
        _set(params, (f"block_{i}", "attn", name, "bias"), qkv_bias[rows])

  if m.posemb == "sincos2d":
    # Not a parameter of ours: the timm model must carry exactly our table.
    theirs = take("pos_embed")
    ours = _sincos_table(m, theirs.shape[1] - (m.pool == "cls"), m.pool == "cls")
    if ours.shape != theirs.shape or not np.allclose(ours, theirs, atol=1e-6):
      raise ConfigError("config.model.posemb='sincos2d' but the timm pos_embed is not the "
                        "2-D sin-cos table.")
  if remaining:
    raise ConfigError(f"The timm state dict has tensors config.model has no place for: "
                      f"{sorted(remaining)[:8]}; does config.model match the timm model?")
  return params


def to_timm(params: Mapping, model_config, image_size: int | None = None) -> dict:
  """The timm state dict (torch float32 tensors) of our 'params' tree.

  `image_size` is needed only for posemb='sincos2d' (to write the fixed table
  into timm's learned pos_embed).
  """
  import torch

  _check_timm_compatible(model_config)
  m = model_config
  out = {}
  tensor = lambda a: torch.from_numpy(np.array(a, np.float32))
  for key, path, layout in _entries(m):
    try:
      value = _get(params, path)
    except KeyError as e:
      raise ConfigError(f"Our params have no {'/'.join(path)}; do they match config.model?") from e
    out[key] = tensor(_TO_TIMM[layout](np.asarray(value)))

  for i in range(m.depth):
    attn = params[f"block_{i}"]["attn"]
    out[f"blocks.{i}.attn.qkv.weight"] = tensor(np.concatenate(
        [np.asarray(attn[name]["kernel"]).T for name in ("query", "key", "value")], axis=0))
    if m.attn_bias:
      out[f"blocks.{i}.attn.qkv.bias"] = tensor(np.concatenate(
          [np.asarray(attn[name]["bias"]) for name in ("query", "key", "value")], axis=0))

  if m.posemb == "sincos2d":
    if image_size is None:
      raise ValueError("to_timm needs image_size for posemb='sincos2d'.")
    check_image_size(m, image_size)
    grid_tokens = (image_size // m.patch_size)**2
    out["pos_embed"] = tensor(_sincos_table(m, grid_tokens, m.pool == "cls"))
  return out
