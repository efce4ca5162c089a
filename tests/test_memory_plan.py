"""Gradient accumulation equals the whole-batch update; the memory plan fits a step to a device."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffvit_jax import config_lib, models
from diffvit_jax.data import sharding
from diffvit_jax.errors import ConfigError
from diffvit_jax.models import attention_impl, registry
from diffvit_jax.training import memory, optim, steps
from diffvit_jax.training import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "tiny_imagenet_config", os.path.join(REPO, "configs", "tiny_imagenet.py"))
tiny_imagenet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_imagenet)


def _tiny_v2_config(arch: str, **model_overrides):
  """The v2 recipe (Mixup/CutMix, label smoothing, drop-path, clipping) on a tiny model.

  Dropout is on too, so every kind of per-example mask is drawn.
  """
  config = tiny_imagenet.get_config(f"{arch}_10m,v2")
  config.model.update({**dict(width=32, depth=2, num_heads=4, mlp_dim=64, num_classes=10,
                              dtype="float32", dropout=0.1, stoch_depth=0.2),
                       **model_overrides})
  config.data.image_size = 16
  config.train.update(batch_size=16, num_epochs=0.0, steps=4, warmup_epochs=0.0, warmup_steps=1,
                      lr_reference_batch=0, learning_rate=3e-3)
  return config


def _train(config, microbatches: int, num_steps: int = 3):
  model = models.build_model(config.model, attention_impl.resolve(config.model))
  tx = optim.create_optimizer(config.train, config.train.steps)
  state = steps.create_train_state(jax.random.PRNGKey(0), model, config.data.image_size, tx)
  mesh = sharding.make_mesh()
  train_step = steps.jit_steps(config, mesh, config.train.steps, microbatches=microbatches)[0]
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(num_steps):
    batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    state, metrics = train_step(state, sharding.shard_batch(batch, mesh))
    losses.append(float(metrics.compute()["loss"]))
  return state.params, losses


def _max_difference(a, b) -> float:
  leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
  return max(float(np.abs(x - y).max()) for x, y in leaves)


@pytest.mark.parametrize("arch", list(registry.ARCHS))
def test_microbatches_and_remat_give_the_whole_batch_update(arch):
  reference, ref_losses = _train(_tiny_v2_config(arch), 1)
  variants = [(4, True)] + ([(2, False)] if arch == registry.BASELINE_ARCH else [])
  for microbatches, remat in variants:
    params, losses = _train(_tiny_v2_config(arch, remat=remat), microbatches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(params),
                    strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  if arch == registry.BASELINE_ARCH:  # Not vacuous: the masks move the parameters by far more.
    no_masks, _ = _train(_tiny_v2_config(arch, dropout=0.0, stoch_depth=0.0), 1)
    assert _max_difference(reference, no_masks) > 1e-4


class _Device:
  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    return self._stats


@functools.cache
def _compiled_30m(microbatches: int):
  """The v2 DiffViT 30m train step at its batch 512 on one device, compiled once per count."""
  config = tiny_imagenet.get_config("diffvit_30m,v2")
  model = models.build_model(config.model, attention_impl.resolve(config.model))
  tx = optim.create_optimizer(config.train, 10_000, num_train_examples=100_000)
  abstract = jax.eval_shape(
      lambda rng: steps.create_train_state(rng, model, config.data.image_size, tx),
      jax.random.PRNGKey(0))
  train = steps.jit_steps(config, sharding.make_mesh(jax.devices()[:1]), 10_000,
                          num_train_examples=100_000, microbatches=microbatches)[0]
  return train.lower(abstract, trainer_lib.batch_spec(config, 512)).compile()


def test_plan_for_the_30m_v2_config_follows_the_device_memory():
  """The compiled step of XLA:CPU: it keeps bf16 activations largely in float32, so its bytes
  are about twice a GPU's; the planning rule is the same on both."""
  config = tiny_imagenet.get_config("diffvit_30m,v2")
  assert config.model.dtype == "bfloat16" and config.train.batch_size == 512
  plans = {}
  for gib in (24, 80, 1024):
    config.train.device_memory_gib = float(gib)
    plans[gib], _ = memory.plan(config, 512, memory.device_memory(_Device(None), config.train),
                                _compiled_30m)
  whole = plans[1024].tried[1]
  assert plans[1024].microbatches == 1 and plans[1024].fits
  assert plans[24].microbatches > plans[80].microbatches >= 1
  for gib in (24, 80):
    assert plans[gib].fits and plans[gib].bytes_per_device <= 0.9 * gib * 2**30
    assert 512 % plans[gib].microbatches == 0
    # Not more microbatches than needed: half as many would not fit.
    fewer = plans[gib].microbatches // 2
    assert fewer == 0 or plans[gib].tried.get(fewer, whole) > 0.9 * gib * 2**30
  record = plans[24].as_dict()
  assert json.loads(json.dumps(record)) == record
  assert record["device_bytes_source"] == "train.device_memory_gib"


def test_nothing_fits_is_one_error_naming_the_options():
  config = _tiny_v2_config("vit")
  config.train.device_memory_gib = 1e-6  # ~1 KiB: no step fits.
  with pytest.raises(ConfigError) as error:
    trainer_lib.build(config, sharding.make_mesh(), 4)
  message = str(error.value)
  assert "does not fit one device" in message and "model.remat=True" in message
  assert "GiB" in message and "\n" not in message


def test_device_memory_comes_from_the_config_or_the_device():
  train = config_lib.train_config()
  assert memory.device_memory(_Device({"bytes_limit": 24 * 2**30}), train) == (
      24 * 2**30, "device")
  assert memory.device_memory(_Device(None), train) == (None, "unknown")
  train.device_memory_gib = 8.0
  assert memory.device_memory(_Device({"bytes_limit": 1}), train) == (
      8 * 2**30, "train.device_memory_gib")


def test_explicit_microbatches_are_used_and_checked():
  config = _tiny_v2_config("diffvit")
  config.train.microbatches = "4"
  trainer = trainer_lib.build(config, sharding.make_mesh(), 4)
  assert trainer.memory_plan.microbatches == 4
  assert trainer.memory_plan.reason == "train.microbatches as configured"
  config.train.microbatches = "3"
  with pytest.raises(ConfigError, match="3 does not divide the 16 examples"):
    config_lib.validate(config, num_devices=1)
  config.train.microbatches = "some"
  with pytest.raises(ConfigError, match="'auto' or a positive integer"):
    config_lib.validate(config, num_devices=1)


def test_describe_prints_the_memory_plan():
  result = subprocess.run(
      [sys.executable, "-m", "diffvit_jax.tools.describe", "--config",
       "configs/digits.py:diffvit", "--memory", "--config.train.device_memory_gib=0.02",
       "--num_devices=2"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  plan = summary["memory_plan"]
  assert plan["per_device_batch"] == 64  # digits' batch 128 over 2 devices
  assert plan["device_bytes"] == int(0.02 * 2**30)
  assert plan["microbatches"] > 1 and plan["fits"]
  assert "Memory plan:" in result.stdout
