"""The precision policy (models/precision.py) holds in the traced train step of every arch."""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffvit_jax import config_lib, models
from diffvit_jax.models import precision, registry
from diffvit_jax.training import optim, steps

NUM_CLASSES = 7  # sizes no other axis has, so tensors can be told by shape
PAIRS = 2
MLP_DIM = 80
DIGITS_STEPS = 400  # short of the recipe's 1000, where both dtypes are already past 90%
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arch: str, impl: str):
  config = config_lib.base_config()
  config.model = config_lib.model_config(
      arch=arch, width=48, depth=2, num_heads=2 * PAIRS, mlp_dim=MLP_DIM, patch_size=4,
      num_classes=NUM_CLASSES, dtype="bfloat16", attention_impl=impl, stoch_depth=0.1)
  config.data.image_size = 16
  config.train.update(batch_size=10, steps=10, mixup_alpha=0.8, cutmix_alpha=1.0,
                      label_smoothing=0.1)
  return config


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _equations(sub)


def _traced_step(config):
  model = models.build_model(config.model, config.model.attention_impl)
  tx = optim.create_optimizer(config.train, 10)
  state = steps.create_train_state(jax.random.PRNGKey(0), model, 16, tx)
  batch = {"image": jnp.zeros((10, 16, 16, 3)), "label": jnp.zeros((10,), jnp.int32)}
  step = functools.partial(steps.train_step, config=config,
                           learning_rate_fn=optim.learning_rate_schedule(config.train, 10))
  closed, out_shapes = jax.make_jaxpr(step, return_shape=True)(state, batch)
  return model, state, closed.jaxpr, out_shapes


@pytest.mark.parametrize("impl", ["einsum", "xla"])
@pytest.mark.parametrize("arch", list(registry.ARCHS))
def test_train_step_follows_the_policy(arch, impl):
  config = _config(arch, impl)
  assert precision.policy(config.model).compute == "bfloat16"
  model, state, jaxpr, (new_state, metrics) = _traced_step(config)
  # Parameters, optimizer state and gradients (through the update) stay float32.
  for leaf in jax.tree_util.tree_leaves((new_state.params, new_state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert metrics.loss.total.dtype == jnp.float32
  logits, captured = model.apply({"params": state.params}, jnp.zeros((2, 16, 16, 3)),
                                 capture_intermediates=True, mutable=["intermediates"])
  assert logits.dtype == jnp.float32
  blocks = captured["intermediates"]
  for i in range(config.model.depth):  # The residual stream, and what the attention returns.
    assert blocks[f"block_{i}"]["__call__"][0].dtype == jnp.float32
    assert blocks[f"block_{i}"]["attn"]["__call__"][0].dtype == jnp.bfloat16

  eqns = list(_equations(jaxpr))
  # Softmax statistics, norm statistics and lambda: float32 transcendentals. (The GELU's
  # derivative is an activation, in the compute dtype.)
  for eqn in eqns:
    aval = eqn.invars[0].aval if eqn.invars else None
    if eqn.primitive.name in ("exp", "log", "logistic", "rsqrt", "sqrt") and (
        aval.shape[-1:] != (MLP_DIM,)):
      assert aval.dtype == jnp.float32, (eqn.primitive.name, aval)
  # Matmuls: in bf16, except the head's and lambda's, which the policy keeps in float32.
  products = [eqn for eqn in eqns if eqn.primitive.name == "dot_general"]
  bf16 = [e for e in products if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
  f32 = [e for e in products if all(v.aval.dtype == jnp.float32 for v in e.invars)]
  for eqn in products:  # Autodiff's transposes may mix the dtypes, then accumulate in f32.
    if eqn not in bf16 and eqn not in f32:
      assert eqn.outvars[0].aval.dtype == jnp.float32
  for eqn in f32:  # The head, lambda, and the softmax backward's row term out . dout.
    shapes = [v.aval.shape for v in eqn.invars]
    assert (any(NUM_CLASSES in s or PAIRS in s[-1:] for s in shapes)
            or all(len(s) <= 1 for s in shapes) or shapes[0] == shapes[1]), shapes
  # Every block's projections, MLP and attention products, forward and backward.
  assert len(bf16) >= config.model.depth * 3 * 7


def test_policy_is_recorded_and_rejects_unknown_dtypes():
  policy = precision.policy(config_lib.model_config(dtype="bfloat16")).as_dict()
  assert policy["compute"] == "bfloat16"
  assert {policy[k] for k in policy if k != "compute"} == {"float32"}
  with pytest.raises(ValueError, match="float16"):
    precision.policy(config_lib.model_config(dtype="float16"))


def test_tiny_imagenet_configs_compute_in_bfloat16_and_digits_in_float32():
  repo = REPO
  loaded = {}
  for name in ("tiny_imagenet", "digits"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo, "configs",
                                                                     f"{name}.py"))
    loaded[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded[name])
  for arch in registry.ARCHS:
    assert loaded["digits"].get_config(arch).model.dtype == "float32"
    for size in config_lib.MODEL_SIZES:
      for protocol in ("v2", "seed"):
        config = loaded["tiny_imagenet"].get_config(f"{arch}_{size},{protocol}")
        assert config.model.dtype == "bfloat16"
  assert np.dtype(jnp.bfloat16).itemsize == 2


def test_bfloat16_digits_run_trains_as_well_as_float32(tmp_path):
  """The policy keeps what matters in float32: bf16 compute costs under 1.5 points of top-1."""
  from diffvit_jax.training import loop

  spec_path = os.path.join(REPO, "configs", "digits.py")
  spec = importlib.util.spec_from_file_location("digits_config", spec_path)
  digits = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(digits)
  top1 = {}
  for dtype in ("float32", "bfloat16"):
    config = digits.get_config("vit")
    config.model.dtype = dtype
    config.train.update(steps=DIGITS_STEPS, eval_every=DIGITS_STEPS,
                        checkpoint_every=DIGITS_STEPS)
    top1[dtype] = loop.train_and_evaluate(config, str(tmp_path / dtype))["top1"]
  assert top1["float32"] > 0.9
  assert abs(top1["bfloat16"] - top1["float32"]) <= 0.015, top1


# Relative L2 error of the differential output in bfloat16 against float32, at init-like
# (near-uniform) attention and lambda 0.73, where A1 v and lambda A2 v nearly cancel. 'einsum'
# and 'xla' subtract A1 - lambda A2 in float32 and round once, for the value product: bfloat16
# inputs alone give ~0.3%. The cuDNN form returns A1 v and A2 v in bfloat16 and subtracts
# after: each rounding (2^-9) is amplified by |A1 v| / |A1 v - lambda A2 v|, ~1% here.
PATH_TOLERANCE = {"einsum": 0.006, "xla": 0.006, "cudnn": 0.02}


@pytest.mark.parametrize("path", list(PATH_TOLERANCE))
def test_differential_paths_against_float32_at_init_like_attention(path):
  from diffvit_jax.models import attention_ops

  rng = np.random.default_rng(0)
  pairs, size = 4, 16
  q, k = (0.1 * rng.standard_normal((2, 64, 2 * pairs, size)) for _ in range(2))
  v = rng.standard_normal((2, 64, pairs, 2 * size))
  lam, scale = jnp.float32(0.73), size**-0.5
  with jax.default_matmul_precision("highest"):
    reference = attention_ops.attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                                        scale=scale, impl="einsum", lam=lam)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  if path == "cudnn":  # its form, run by JAX's XLA attention on the CPU (bfloat16 outputs)
    out = attention_ops.differential_cudnn(q, k, v, lam, scale, implementation="xla")
  else:
    out = attention_ops.attention(q, k, v, scale=scale, impl=path, lam=lam)
  error = float(jnp.linalg.norm(out.astype(jnp.float32) - reference)
                / jnp.linalg.norm(reference))
  assert error < PATH_TOLERANCE[path]
  if path != "cudnn":  # the float32 subtraction is what keeps these well inside cuDNN's form
    assert error < PATH_TOLERANCE["cudnn"] / 2
