"""uint8 batches to the device: the jitted steps normalise and mix, and train what the
host-normalised float batches trained before (issue 23, item 1)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from diffvit_jax import config_lib
from diffvit_jax.data import sharding
from diffvit_jax.training import steps, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 3


def _v2_config():
  """The v2 recipe (mixup + cutmix, smoothing, drop-path, clipping) on a tiny ViT."""
  config = config_lib.base_config()
  config.model = config_lib.model_config(arch="vit", width=32, depth=1, num_heads=4,
                                         mlp_dim=64, patch_size=4, num_classes=10,
                                         stoch_depth=0.1)
  config.data.update(image_size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
  config.train.update(batch_size=8, learning_rate=1e-2, warmup_steps=0, steps=NUM_STEPS,
                      label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0, grad_clip=1.0)
  return config


def _uint8_batches(config, count):
  rng = np.random.default_rng(0)
  size = config.data.image_size
  return [{"image": rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8),
           "label": rng.integers(0, 10, 8).astype(np.int32)} for _ in range(count)]


def _host_normalised(batch, data):
  """What the input pipeline sent before: float32 (x / 255 - mean) / std, computed on the host
  as its `Normalise` transform did (the reference this test keeps)."""
  std = np.asarray(data.std, np.float32)
  image = batch["image"].astype(np.float32) * (1.0 / (255.0 * std))
  image += -np.asarray(data.mean, np.float32) / std
  return {**batch, "image": image}


def _train(config, batches, microbatches=1):
  mesh = sharding.make_mesh(jax.devices()[:1])
  built = trainer.build(config, mesh, NUM_STEPS, for_training=False)
  train_step, _ = steps.jit_steps(config, mesh, NUM_STEPS, microbatches=microbatches)
  state = built.state
  init = jax.device_get(state.params)  # Before the first step donates them.
  for batch in batches:
    state, _ = train_step(state, sharding.shard_batch(batch, mesh))
  return jax.device_get(state.params), init


def _compared(params):
  """Every parameter but the attention's key biases, as {path: array}.

  A key bias adds the same amount to every score of a query, which softmax
  cancels: its gradient is 0 up to rounding, and AdamW turns that rounding
  noise into updates of the size of the learning rate.
  """
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)
          if "['key']['bias']" not in jax.tree_util.keystr(path)}


def _max_difference(a, b) -> float:
  a, b = _compared(a), _compared(b)
  assert a.keys() == b.keys()
  return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def reference():
  config = _v2_config()
  batches = _uint8_batches(config, NUM_STEPS)
  params, init = _train(config, [_host_normalised(b, config.data) for b in batches])
  return config, batches, params, init


@pytest.mark.parametrize("microbatches", [1, 4])
def test_uint8_steps_train_what_host_normalised_batches_trained(reference, microbatches):
  config, batches, expected, init = reference
  # Each step moves a parameter by about the learning rate (1e-2): agreeing to 1e-5 is
  # float rounding, while a wrong normalisation or mixing moves them by far more.
  assert _max_difference(expected, init) > 1e-3
  params, _ = _train(config, batches, microbatches)
  assert _max_difference(params, expected) < 1e-5


def test_eval_step_normalises_uint8_batches(reference):
  config, batches, params, _ = reference
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = trainer.build(config, mesh, NUM_STEPS, for_training=False).state.replace(params=params)
  _, eval_step = steps.jit_steps(config, mesh, NUM_STEPS)
  batch = {**batches[0], "mask": np.ones(8, np.float32)}
  ours = eval_step(state, sharding.shard_batch(batch, mesh)).compute()
  theirs = eval_step(state, sharding.shard_batch(_host_normalised(batch, config.data),
                                                 mesh)).compute()
  for name in ("loss", "top1", "top5"):
    assert float(ours[name]) == pytest.approx(float(theirs[name]), rel=1e-5, abs=1e-6)


def test_batch_spec_is_uint8():
  spec = trainer.batch_spec(_v2_config(), 8)
  assert spec["image"].dtype == np.uint8 and spec["image"].shape == (8, 16, 16, 3)
  assert spec["label"].dtype == np.int32


_FOUR_DEVICES = textwrap.dedent("""
    import json, re, jax, numpy as np
    import test_uint8_input as t
    from diffvit_jax.data import sharding
    from diffvit_jax.training import steps

    config = t._v2_config()
    batches = t._uint8_batches(config, t.NUM_STEPS)
    one, _ = t._train(config, batches)
    mesh = sharding.make_mesh(jax.devices()[:4])
    from diffvit_jax.training import trainer
    built = trainer.build(config, mesh, t.NUM_STEPS, for_training=False)
    train_step, _ = steps.jit_steps(config, mesh, t.NUM_STEPS)
    state = built.state
    batch = sharding.shard_batch(batches[0], mesh)
    hlo = train_step.lower(state, batch).compile().as_text()
    for b in batches:
      state, _ = train_step(state, sharding.shard_batch(b, mesh))
    four = jax.device_get(state.params)
    error = t._max_difference(one, four)
    # (element type, shape) of what each collective-permute sends.
    permutes = re.findall(r"= (\\w+)\\[([\\d,]*)\\]\\S* collective-permute\\(", hlo)
    print(json.dumps({"error": error, "permutes": permutes}))
""")


def test_mixing_partners_cross_devices_as_uint8():
  """On 4 devices the mirrored partners travel as uint8 and the update equals 1 device's."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.path.join(REPO, "tests"))
  result = subprocess.run([sys.executable, "-c", _FOUR_DEVICES], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["error"] < 1e-5
  # Each device's quarter of the images crosses as uint8 (the mirrored targets as float32).
  images = [kind for kind, shape in out["permutes"] if shape == "2,16,16,3"]
  assert images and set(images) == {"u8"}, out["permutes"]
