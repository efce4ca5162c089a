"""The attention modules and the ViT: identities, paths, dtypes, rngs, read-outs, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffvit_jax import config_lib
from diffvit_jax.errors import ConfigError
from diffvit_jax.models import (
  DifferentialAttention,
  DifferentialAttentionV2,
  MultiHeadAttention,
  attention_maps,
  build_model,
  lambda_init,
  lambda_per_layer,
  registry,
)
from diffvit_jax.models.differential import LAMBDA_VECTORS, differential_lambda

ARCHS = tuple(registry.ARCHS)
IMAGE = 16


def small_config(arch="vit", **overrides):
  """A tiny model: width 32, depth 2, 4 classic heads (2 differential pairs), 17 tokens."""
  fields = dict(arch=arch, width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4,
                num_classes=5, pool="cls")
  fields.update(overrides)
  return config_lib.model_config(**fields)


def images(batch=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, IMAGE, IMAGE, 3), jnp.float32)


def random_params(shapes, seed=1):
  """Random values for a params tree of ShapeDtypeStructs (no init compile needed).

  Not the init: every leaf is random (norm scales around 1, biases, heads and
  lambdas away from 0), so that no zero or one can hide a mismatch.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return jnp.asarray(1.0 + 0.2 * rng.standard_normal(leaf.shape), jnp.float32)
    fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 10.0
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def param_shapes(module_or_config, *args):
  module = module_or_config
  if not hasattr(module, "apply"):
    module, args = build_model(module_or_config), (images(1),)
  return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]


def init_params(module_or_config, *args, seed=1):
  return random_params(param_shapes(module_or_config, *args), seed)


def forward(module_or_config, params, x, *, train=False, seed=0):
  """Jitted apply (eager flax runs op by op, far slower on these small shapes)."""
  return jitted_apply(module_or_config, train)(params, x, seed)


def jitted_apply(module_or_config, train=False):
  """(params, images, seed) -> logits, one compilation for all seeds."""
  module = module_or_config
  if not hasattr(module, "apply"):
    module = build_model(module_or_config)

  def apply(params, x, seed):
    # rbg keys: the default threefry costs seconds of CPU compile for a few dropout masks.
    rngs = {"dropout": jax.random.key(seed, impl="rbg")} if train else {}
    return module.apply({"params": params}, x, train=train, rngs=rngs)

  return jax.jit(apply)


def test_lambda_init_per_layer():
  assert lambda_init(1) == pytest.approx(0.2)
  assert lambda_init(2) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
  assert lambda_init(12) == pytest.approx(0.8 - 0.6 * math.exp(-3.3))
  assert all(lambda_init(layer) < lambda_init(layer + 1) < 0.8 for layer in range(1, 30))


def test_differential_attention_with_zero_lambda_is_multi_head_attention():
  """lambda = 0, no head norm: MHA with H heads of size 2d on the (q[2h], k[2h]) halves."""
  width, heads, tokens, layer = 32, 4, 9, 1
  pairs, d = heads // 2, width // heads
  x = jax.random.normal(jax.random.key(0), (2, tokens, width))
  diff = DifferentialAttention(num_heads=heads, layer=layer, head_norm="none", impl="einsum")
  params = init_params(diff, x)
  # exp(q1.k1) - exp(q2.k2) + lambda_init = (1 - lambda_init) - 1 + lambda_init = 0.
  first = np.eye(d, dtype=np.float32)[0]
  params["lambda_q1"] = jnp.asarray(first * math.log(1.0 - lambda_init(layer)))
  params["lambda_k1"] = jnp.asarray(first)
  params["lambda_q2"] = params["lambda_k2"] = jnp.zeros(d)
  lam = differential_lambda(*(params[name] for name in LAMBDA_VECTORS), layer=layer)
  assert abs(float(lam)) < 1e-6

  def halves(kernel_or_bias):
    """Columns of the even q/k heads (size d) padded to 2d, scaled by sqrt(2) so that
    MHA's 1/sqrt(2d) becomes the differential 1/sqrt(d)."""
    by_head = kernel_or_bias.reshape(*kernel_or_bias.shape[:-1], pairs, 2, d)[..., 0, :]
    padded = jnp.concatenate([by_head * math.sqrt(2.0), jnp.zeros_like(by_head)], axis=-1)
    return padded.reshape(*kernel_or_bias.shape[:-1], width)

  mha_params = {
      "query": jax.tree.map(halves, params["query"]),
      # sqrt(2) once is enough: put it on q only.
      "key": jax.tree.map(lambda a: halves(a) / math.sqrt(2.0), params["key"]),
      "value": params["value"],
      # The differential output is scaled by (1 - lambda_init); fold it into Wo.
      "out": {"kernel": params["out"]["kernel"] * (1.0 - lambda_init(layer)),
              "bias": params["out"]["bias"]},
  }
  mha = MultiHeadAttention(num_heads=pairs, impl="einsum")
  expected = forward(mha, mha_params, x)
  got = forward(diff, params, x)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_xla_and_einsum_paths_agree(arch):
  config = small_config(arch, attention_impl="xla")
  params = init_params(config)
  xla = forward(config, params, images())
  config.attention_impl = "einsum"
  einsum = forward(config, params, images())
  assert xla.dtype == jnp.float32 and xla.shape == (2, 5)
  assert float(jnp.abs(xla).max()) > 0.1  # a real signal, not zeros
  np.testing.assert_allclose(xla, einsum, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_compute_keeps_float32_params_and_logits(arch):
  config = small_config(arch, dtype="bfloat16")
  model = build_model(config)
  variables = jax.eval_shape(model.init, jax.random.key(0), images(1))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  params = init_params(config)
  logits = forward(model, params, images())
  assert logits.dtype == jnp.float32
  config.dtype = "float32"
  reference = forward(config, params, images())
  np.testing.assert_allclose(logits, reference, atol=0.1, rtol=0.05)


def test_v2_shapes_gradients_and_lambda_range():
  config = small_config("diffvit2", pool="gap")
  model = build_model(config)
  params = init_params(config)
  logits = forward(model, params, images())
  assert logits.shape == (2, 5)

  def loss(p):
    out = model.apply({"params": p}, images(), train=True,
                      rngs={"dropout": jax.random.key(3, impl="rbg")})
    return jnp.mean(out**2)

  grads = jax.jit(jax.grad(loss))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["block_0"]["attn"]["lambda_proj"]["kernel"]).max()) > 0

  maps = attention_maps(config, params, images())
  tokens = (IMAGE // 4)**2
  for layer in maps:
    assert layer["lambda"].shape == (2, 2, tokens)  # [B, H, T]: per query token
    assert np.all((layer["lambda"] > 0) & (layer["lambda"] < 1))
    assert layer["attn1"].shape == layer["attn2"].shape == (2, 2, tokens, tokens)


def test_v2_matches_its_formula():
  """An independent numpy reading of the V2 formula, weight by weight."""
  width, heads, tokens = 32, 4, 6
  pairs, hd = heads // 2, width // (heads // 2)
  x = jax.random.normal(jax.random.key(0), (2, tokens, width))
  module = DifferentialAttentionV2(num_heads=heads, impl="xla")
  p = jax.tree.map(np.asarray, init_params(module, x))
  xn = np.asarray(x, np.float64)
  dense = lambda name: xn @ p[name]["kernel"] + p[name]["bias"]
  q = dense("query").reshape(2, tokens, 2 * pairs, hd)
  k = dense("key").reshape(2, tokens, pairs, hd)
  v = dense("value").reshape(2, tokens, pairs, hd)
  lam = 1.0 / (1.0 + np.exp(-(xn @ p["lambda_proj"]["kernel"])))  # [B, T, H]

  def softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)

  heads_out = []
  for h in range(pairs):
    a1 = softmax(np.einsum("btd,bsd->bts", q[:, :, 2 * h], k[:, :, h]) / np.sqrt(hd))
    a2 = softmax(np.einsum("btd,bsd->bts", q[:, :, 2 * h + 1], k[:, :, h]) / np.sqrt(hd))
    heads_out.append(a1 @ v[:, :, h] - lam[:, :, h, None] * (a2 @ v[:, :, h]))
  expected = np.concatenate(heads_out, axis=-1) @ p["out"]["kernel"] + p["out"]["bias"]
  np.testing.assert_allclose(forward(module, p, x), expected, atol=1e-4, rtol=1e-4)


def test_attention_maps_and_lambda_per_layer():
  config = small_config("diffvit", depth=3)
  params = init_params(config)
  maps = attention_maps(config, params, images())
  lambdas = lambda_per_layer(params, config)
  assert lambdas.shape == (3,)
  tokens = (IMAGE // 4)**2 + 1
  for layer, lam in zip(maps, lambdas, strict=True):
    assert layer["attn1"].shape == (2, 2, tokens, tokens)
    np.testing.assert_allclose(layer["attn1"].sum(-1), 1.0, atol=1e-5)
    assert float(layer["lambda"]) == pytest.approx(float(lam), abs=1e-5)
    np.testing.assert_allclose(layer["diff"], layer["attn1"] - lam * layer["attn2"], atol=1e-5)

  vit = small_config("vit")
  vit_maps = attention_maps(vit, init_params(vit), images())
  assert len(vit_maps) == 2 and vit_maps[0]["attn"].shape == (2, 4, tokens, tokens)
  assert lambda_per_layer(init_params(vit), vit) is None
  v2 = small_config("diffvit2")
  assert lambda_per_layer(init_params(v2), v2) is None


def test_lambda_per_layer_at_zero_vectors_is_lambda_init():
  config = small_config("diffvit", depth=3)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.zeros_like(a) if "lambda" in jax.tree_util.keystr(path) else a,
      init_params(config))
  np.testing.assert_allclose(lambda_per_layer(params, config),
                             [lambda_init(1), lambda_init(2), lambda_init(3)], rtol=1e-6)


def test_parameter_names_follow_the_convention():
  """The trainer's weight-decay mask relies on these names."""
  allowed = {"kernel", "bias", "scale", "pos_embedding", "cls",
             "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"}
  for arch in ARCHS:
    params = param_shapes(small_config(arch))
    paths = [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert {path[-1] for path in paths} <= allowed
    assert {path[0] for path in paths} == {"embedding", "cls", "pos_embedding", "norm", "head",
                                           "block_0", "block_1"}
    assert all(path[1] in ("norm1", "attn", "norm2", "mlp") for path in paths
               if path[0].startswith("block_"))
  params = param_shapes(small_config("diffvit2"))
  assert params["block_0"]["attn"]["lambda_proj"].keys() == {"kernel"}


def test_pooling_and_position_embedding_options():
  params = param_shapes(small_config(pool="gap", posemb="sincos2d"))
  assert "cls" not in params and "pos_embedding" not in params
  cls = param_shapes(small_config(pool="cls"))
  assert cls["pos_embedding"].shape == (1, (IMAGE // 4)**2 + 1, 32)
  assert cls["cls"].shape == (1, 1, 32)


def test_train_mode_draws_only_from_the_dropout_stream():
  config = small_config("diffvit", dropout=0.1, attn_dropout=0.1, stoch_depth=0.2)
  params = init_params(config)
  train = jitted_apply(config, train=True)
  run = lambda seed: train(params, images(), seed)
  np.testing.assert_array_equal(run(0), run(0))
  assert float(jnp.abs(run(0) - run(1)).max()) > 0
  assert float(jnp.abs(run(0) - forward(config, params, images())).max()) > 0
  # Without any dropout, training and evaluation compute the same function.
  plain = small_config("diffvit")
  np.testing.assert_allclose(
      forward(plain, params, images(), train=True), forward(plain, params, images()), atol=1e-6)


@pytest.mark.parametrize("overrides, field", [
    (dict(num_heads=5), "num_heads"),  # 32 % 5
    (dict(arch="diffvit", num_heads=1), "num_heads"),  # odd: differential heads come in pairs
    (dict(arch="diffvit2", num_heads=3, width=48), "num_heads"),
    (dict(arch="transformer"), "arch"),
    (dict(norm="batchnorm"), "norm"),
    (dict(pool="max"), "pool"),
    (dict(posemb="rope"), "posemb"),
    (dict(diff_head_norm="groupnorm"), "diff_head_norm"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(dtype="float16"), "dtype"),
    (dict(depth=0), "depth"),
    (dict(dropout=1.0), "dropout"),
])
def test_invalid_configs_raise_config_error(overrides, field):
  config = small_config(**overrides)
  with pytest.raises(ConfigError, match=field):
    build_model(config)


def test_image_size_must_be_a_multiple_of_the_patch():
  model = build_model(small_config())
  with pytest.raises(ConfigError, match="patch_size"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 18, 18, 3)))
