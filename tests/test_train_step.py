"""Optimizer, schedule, mixing and the sharded train step."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffvit_jax import config_lib, models
from diffvit_jax.training import optim, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_config(**overrides):
  return config_lib.train_config(**overrides)


def test_schedule_corners_match_config():
  cfg = _train_config(learning_rate=3e-4, warmup_steps=500, schedule="cosine")
  schedule = optim.learning_rate_schedule(cfg, total_steps=5000)
  assert float(schedule(0)) == 0.0
  assert float(schedule(250)) == pytest.approx(1.5e-4, rel=1e-5)
  assert float(schedule(500)) == pytest.approx(3e-4, rel=1e-6)
  assert float(schedule(5000)) == pytest.approx(0.0, abs=1e-12)
  assert float(schedule(2750)) == pytest.approx(1.5e-4, rel=1e-4)  # Cosine midpoint.


def test_constant_schedule_with_warmup():
  cfg = _train_config(learning_rate=1e-3, warmup_steps=10, schedule="constant")
  schedule = optim.learning_rate_schedule(cfg, total_steps=100)
  assert float(schedule(5)) == pytest.approx(5e-4)
  assert float(schedule(99)) == pytest.approx(1e-3)


def test_weight_decay_mask_modes():
  params = {"block_0": {"attn": {"q": {"kernel": 1, "bias": 2}, "lambda_q1": 3},
                        "norm1": {"scale": 4}},
            "pos_embedding": 5, "head": {"kernel": 6}}
  flat_all = jax.tree_util.tree_leaves(optim.weight_decay_mask(params, "all"))
  assert all(flat_all)
  mask = optim.weight_decay_mask(params, "matrices")
  assert mask["block_0"]["attn"]["q"] == {"kernel": True, "bias": False}
  assert mask["block_0"]["attn"]["lambda_q1"] is False
  assert mask["pos_embedding"] is False and mask["head"]["kernel"] is True


def test_weight_decay_applies_as_configured():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  for mode, bias_decays in (("all", True), ("matrices", False)):
    tx = optim.create_optimizer(
        _train_config(learning_rate=0.1, warmup_steps=0, schedule="constant",
                      weight_decay=0.5, weight_decay_mask=mode), total_steps=10)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert float(updates["dense"]["kernel"][0, 0]) == pytest.approx(-0.05)
    assert (float(updates["dense"]["bias"][0]) != 0.0) == bias_decays


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mix_batch_keeps_targets_consistent(mixup, cutmix):
  rng = jax.random.PRNGKey(0)
  images = jax.random.normal(rng, (8, 16, 16, 3))
  targets = steps.smooth_targets(jnp.arange(8) % 5, 5, 0.1)
  mixed, mixed_targets = steps.mix_batch(
      jax.random.PRNGKey(1), images, targets, mixup_alpha=mixup, cutmix_alpha=cutmix,
      mix_prob=1.0)
  assert mixed.shape == images.shape
  np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-5)
  assert not np.allclose(mixed, images)  # Something was mixed.
  # Every mixed pixel is a convex combination of the example and its mirror.
  partner = jnp.flip(images, 0)
  lo, hi = jnp.minimum(images, partner), jnp.maximum(images, partner)
  assert bool(jnp.all((mixed >= lo - 1e-5) & (mixed <= hi + 1e-5)))


def test_mix_batch_off_is_identity():
  images = jnp.ones((4, 8, 8, 3))
  targets = jnp.eye(4)
  out, out_targets = steps.mix_batch(jax.random.PRNGKey(0), images, targets,
                                     mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0)
  assert out is images and out_targets is targets


def test_warmup_in_epochs_follows_the_batch():
  for batch, warmup in ((100, 50), (250, 20)):
    cfg = _train_config(batch_size=batch, learning_rate=1e-3, lr_reference_batch=100,
                        warmup_epochs=5.0, schedule="constant")
    schedule = optim.learning_rate_schedule(cfg, total_steps=1000, num_train_examples=1000)
    peak = 1e-3 * batch / 100
    assert float(schedule(warmup // 2)) == pytest.approx(peak / 2, rel=1e-6)
    assert float(schedule(warmup)) == pytest.approx(peak, rel=1e-6)


def _tiny_step_setup(**train_overrides):
  """A deterministic 1-block ViT (no dropout, no drop-path) and one batch of 8 images."""
  config = config_lib.base_config()
  config.model = config_lib.model_config(
      arch="vit", width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4, num_classes=5)
  config.data.image_size = 8
  config.train.update(batch_size=8, learning_rate=1e-3, steps=10, **train_overrides)
  model = models.build_model(config.model)
  tx = optim.create_optimizer(config.train, 10)
  state = steps.create_train_state(jax.random.PRNGKey(0), model, 8, tx)
  # The head starts at zero (uniform predictions whatever the input); a random one makes the
  # loss depend on the images and targets.
  head = {"kernel": jax.random.normal(jax.random.PRNGKey(2), (16, 5)), "bias": jnp.zeros(5)}
  state = state.replace(params={**state.params, "head": head})
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(8, 8, 8, 3)), jnp.float32),
           "label": jnp.asarray([0, 1, 2, 3, 4, 0, 1, 2], jnp.int32)}
  return config, state, batch


def _run_step(config, state, batch):
  schedule = optim.learning_rate_schedule(config.train, 10)
  train_step = jax.jit(functools.partial(steps.train_step, config=config,
                                         learning_rate_fn=schedule))
  out = train_step(state, batch)[1].compute()
  return {name: float(out[name]) for name in ("loss", "accuracy_vs_dominant_target")}


def _logits(state, images):
  return state.apply_fn({"params": state.params}, images, train=True,
                        rngs={"dropout": jax.random.PRNGKey(1)})


def _cross_entropy(logits, targets):
  return float(jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits), -1)))


def test_label_smoothing_reaches_the_loss():
  losses = {}
  for smoothing in (0.0, 0.1):
    config, state, batch = _tiny_step_setup(label_smoothing=smoothing)
    logits = _logits(state, batch["image"])
    onehot = jax.nn.one_hot(batch["label"], 5)
    by_hand = _cross_entropy(logits, onehot * (1 - smoothing) + smoothing / 5)
    out = _run_step(config, state, batch)
    assert out["loss"] == pytest.approx(by_hand, rel=1e-5)
    # Unmixed, the dominant target is the label.
    plain = float(jnp.mean(jnp.argmax(logits, -1) == batch["label"]))
    assert out["accuracy_vs_dominant_target"] == pytest.approx(plain)
    losses[smoothing] = out["loss"]
  assert losses[0.1] != pytest.approx(losses[0.0], rel=1e-3)


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixing_reaches_the_loss_and_the_accuracy(mixup, cutmix):
  config, state, batch = _tiny_step_setup(label_smoothing=0.1, mixup_alpha=mixup,
                                          cutmix_alpha=cutmix)
  for step in range(10):  # the first step whose draw mixes (a CutMix box can be empty)
    state = state.replace(step=step)
    # The step's mixing key, as TrainState documents it: fold_in(rng, step), then split.
    mix_rng, _ = jax.random.split(jax.random.fold_in(state.rng, state.step))
    # Smooth-then-mix, called directly: the step mixes first, which must give the same targets.
    images, targets = steps.mix_batch(
        mix_rng, batch["image"], steps.smooth_targets(batch["label"], 5, 0.1),
        mixup_alpha=mixup, cutmix_alpha=cutmix, mix_prob=1.0)
    if not np.allclose(images, batch["image"]):
      break
  else:
    pytest.fail("no step in 10 mixed the batch")
  logits = _logits(state, images)
  out = _run_step(config, state, batch)
  assert out["loss"] == pytest.approx(_cross_entropy(logits, targets), rel=1e-5)
  unmixed = _cross_entropy(_logits(state, batch["image"]),
                           steps.smooth_targets(batch["label"], 5, 0.1))
  assert out["loss"] != pytest.approx(unmixed, rel=1e-3)
  dominant_accuracy = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)))
  assert out["accuracy_vs_dominant_target"] == pytest.approx(dominant_accuracy)


def test_dominant_target_is_the_partner_when_it_outweighs_the_example():
  labels = jnp.arange(8) % 5
  train_config = _train_config(mixup_alpha=0.8, label_smoothing=1.0)
  batch = {"image": jnp.zeros((8, 4, 4, 3)), "label": labels}
  for seed in range(20):  # the first key whose mixup weight of the example is below 1/2
    images, targets, dominant = steps.training_targets(
        jax.random.PRNGKey(seed), batch, train_config=train_config, num_classes=5)
    if not bool(jnp.all(dominant == labels)):
      break
  else:
    pytest.fail("no key in 20 gave a mixup weight below 1/2")
  # Smoothing 1 makes the targets uniform; the dominant class still comes from the mixing.
  np.testing.assert_allclose(targets, 0.2, rtol=1e-6)
  partner = jnp.flip(labels)
  np.testing.assert_array_equal(dominant, jnp.where(labels == partner, labels, partner))


_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, numpy as np, jax
    from jax.sharding import Mesh
    from diffvit_jax import config_lib, models
    from diffvit_jax.training import optim, steps

    config = config_lib.base_config()
    config.model = config_lib.model_config(
        arch=ARCH, width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4, num_classes=10,
        dropout=0.1, stoch_depth=0.1)
    config.data.image_size = 16
    config.train.update(batch_size=8, learning_rate=1e-3, warmup_steps=0, steps=10,
                        label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, size=8).astype(np.int32)}
    model = models.build_model(config.model)
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("four", jax.devices()[:4])):
      mesh = Mesh(np.array(devices), ("data",))
      tx = optim.create_optimizer(config.train, 10)
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
      state = jax.jit(lambda r: steps.create_train_state(r, model, 16, tx),
                      out_shardings=replicated)(jax.random.PRNGKey(0))
      train_step, _ = steps.jit_steps(config, mesh, 10)
      sharded = jax.device_put(batch, data)
      out[name + "_shards"] = sorted({tuple(s.data.shape) for s in
                                      sharded["image"].addressable_shards})
      out[name + "_devices"] = len(sharded["image"].sharding.device_set)
      state, metrics = train_step(state, sharded)
      out[name + "_loss"] = float(metrics.compute()["loss"])
      out[name + "_params"] = [np.asarray(x).ravel().tolist()
                               for x in jax.tree_util.tree_leaves(state.params)]
    print(json.dumps(out))
""")


@pytest.mark.parametrize("arch", ["vit", "diffvit"])
def test_step_on_four_devices_equals_one(arch):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  script = _MULTI_DEVICE_SCRIPT.replace("ARCH", repr(arch))
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["four_devices"] == 4 and out["one_devices"] == 1
  assert out["four_shards"] == [[2, 16, 16, 3]]  # Each device holds a quarter of the batch.
  assert out["one_shards"] == [[8, 16, 16, 3]]
  assert out["four_loss"] == pytest.approx(out["one_loss"], rel=1e-5, abs=1e-6)
  for a, b in zip(out["one_params"], out["four_params"], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
