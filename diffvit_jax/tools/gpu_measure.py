"""The measurements of the GPU check (tools/gpu_check.py), each a JSON-able record.

Each builds what training builds from a config (`trainer.build`, the sweep's
step counts) and knows nothing of budgets or reports. No TensorFlow.
"""

import importlib.util
import math
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffvit_jax import cpu_runtime, models
from diffvit_jax.data import sharding
from diffvit_jax.models import stats
from diffvit_jax.tools import bench
from diffvit_jax.training import optim
from diffvit_jax.training import trainer as trainer_lib

TRAIN_EXAMPLES = 100_000  # Tiny ImageNet's training set: the sweep's steps and warmup
GRAD_NAMES = ("logits", "param_grads", "input_grads")


def sweep_config(name: str, overrides: dict):
  """configs/tiny_imagenet.py:<name> as the sweep runs it, with dotted `overrides` applied."""
  path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny_imagenet.py"
  spec = importlib.util.spec_from_file_location("tiny_imagenet_configs", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(name)
  for field, value in overrides.items():
    section, key = field.split(".")
    config[section][key] = value
  return config


def error_text(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}"


def is_out_of_memory(e: BaseException) -> bool:
  """Whether `e` is XLA running out of device memory (RESOURCE_EXHAUSTED)."""
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def build_trainer(config, total_steps: int | None = None, devices=None):
  """The trainer a sweep run builds: its steps from the recipe on Tiny ImageNet's size, on
  `devices` (a run's slot; default all)."""
  total = total_steps or optim.derive_recipe(config.train, TRAIN_EXAMPLES).total_steps
  return trainer_lib.build(config, sharding.make_mesh(devices), total,
                           num_train_examples=TRAIN_EXAMPLES)


# Agreement.


def relative_error(tree, reference) -> float:
  """||tree - reference|| / ||reference|| over all leaves, in float32."""
  diff = jax.tree.map(lambda a, b: jnp.asarray(a, jnp.float32) - b, tree, reference)
  return l2_norm(diff) / max(l2_norm(reference), 1e-30)


def l2_norm(tree) -> float:
  return math.sqrt(sum(float(jnp.sum(jnp.asarray(x, jnp.float32) ** 2))
                       for x in jax.tree.leaves(tree)))


def agreement_inputs(model_config, image_size: int, batch: int):
  """(params, images, labels): the float32 init with a random head, and random data."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((batch, image_size, image_size, 3), np.float32))
  labels = jnp.asarray(rng.integers(0, model_config.num_classes, batch))
  model = models.build_model(model_config, "einsum")
  params = model.init(jax.random.key(0), images[:1], train=False)["params"]
  # The head starts at zero (timm's init): logits and input gradients would be zero on
  # every path, and the comparison empty.
  head = params["head"]["kernel"]
  params["head"]["kernel"] = jax.random.normal(jax.random.key(1), head.shape) / math.sqrt(
      head.shape[0])
  return params, images, labels


def logits_and_grads(model_config, impl: str, params, images, labels):
  """(logits, d loss / d params, d loss / d images) on path `impl`, eval mode, on the host."""
  model = models.build_model(model_config, impl)

  def loss_fn(params, images):
    logits = model.apply({"params": params}, images, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return loss.mean(), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
      params, images)
  return jax.device_get((logits, *grads))


# Step time.


def time_train_step(config, timed_steps: int, repeats: int, devices=None) -> dict:
  """The train step of `config` as training builds and dispatches it, on synthetic batches,
  on `devices` (default all).

  `setup_s`: the build (memory plan, compiles) and the first step.
  """
  start = time.perf_counter()
  trainer = build_trainer(config, devices=devices)
  batch = sharding.shard_batch(bench.synthetic_batch(config, config.train.batch_size),
                               trainer.mesh)
  state, _ = trainer.train_step(trainer.state, batch)
  jax.block_until_ready(state)
  setup_s = time.perf_counter() - start
  windows = []
  for _ in range(repeats):
    state, seconds = bench.time_steps(trainer.train_step, state, batch, timed_steps)
    windows.append(seconds / timed_steps)
  step_s = statistics.median(windows)
  gflops = stats.gflops_per_image(config.model, config.data.image_size)
  devices = trainer.mesh.devices.ravel()
  peak = bench.peak_flops_per_device(devices[0].device_kind, config.model.dtype)
  images_per_sec = config.train.batch_size / step_s
  mfu = None if peak is None else gflops * 1e9 * images_per_sec / (peak * len(devices))
  return dict(arch=config.model.arch, dtype=config.model.dtype,
              attention=trainer.attention.impl, batch=config.train.batch_size,
              precision=trainer.precision.as_dict(), memory_plan=trainer.memory_plan.as_dict(),
              setup_s=setup_s, step_ms=1e3 * step_s, images_per_sec=images_per_sec,
              mfu=mfu, gflops_per_image=gflops)


# Input pipeline.


def write_image_folder(root: pathlib.Path, num_images: int, num_classes: int = 10,
                       size: int = 64) -> None:
  """<root>/train/<class>/<i>.jpg: smooth-noise 64x64 JPEGs (decode cost near a photo's)."""
  from PIL import Image

  rng = np.random.default_rng(0)
  for i in range(num_images):
    folder = root / "train" / f"class_{i % num_classes:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(
        folder / f"{i:05d}.jpg", quality=90)


def built_data(config) -> str | None:
  """The TFDS directory of the built Tiny ImageNet `config.data` reads, or None if not built."""
  from diffvit_jax.data import sources
  from diffvit_jax.errors import UserError

  try:
    sources.tiny_imagenet_builder_dir(config.data)
  except UserError:
    return None
  return str(sources.tfds_data_dir(config.data))


def pipeline_warmup(num_workers: int) -> int:
  """Batches read before timing: each worker process fills a buffer of a few batches first,
  which a timing must not count as throughput."""
  return max(1, 3 * num_workers)


def time_pipeline(config, root: pathlib.Path, num_images: int, num_workers: int,
                  num_batches: int, repeats: int) -> dict:
  """The train input pipeline of `config` (host batches, no device) with `num_workers`: on the
  built Tiny ImageNet (array_record) where there is one, else over generated JPEGs."""
  data_dir = built_data(config)
  if data_dir is None:
    write_image_folder(root, num_images)
    config.data.update(source="image_folder", dir=str(root))
  config.data.num_workers = num_workers
  warmup = pipeline_warmup(num_workers)
  result = bench.bench_pipeline(config, config.train.batch_size, num_batches, warmup=warmup,
                                repeats=repeats)
  return dict(images_per_sec=result["images_per_sec"], num_workers=num_workers,
              warmup_batches=warmup, batch=config.train.batch_size,
              image_size=config.data.image_size, randaugment=config.data.randaugment,
              crop=config.data.crop, source=config.data.source, data_dir=data_dir)


# Training on a learnable generated task.


def learnable_batches(num_classes: int, image_size: int, batch_size: int, seed: int = 0):
  """Endless uint8 batches whose class sets a colour and a stripe pattern, plus noise."""
  rng = np.random.default_rng(seed)
  colours = rng.standard_normal((num_classes, 1, 1, 3)).astype(np.float32)
  ys, xs = np.mgrid[:image_size, :image_size] / image_size
  angles, freqs = rng.uniform(0, np.pi, num_classes), rng.uniform(2, 6, num_classes)
  patterns = np.stack([np.sin(2 * np.pi * f * (np.cos(a) * xs + np.sin(a) * ys))
                       for a, f in zip(angles, freqs, strict=True)])[..., None]
  # Pixels around mid-grey, about one standard deviation of a photo per unit.
  prototypes = (128 + 40 * (colours + patterns)).astype(np.float32)
  # Noise drawn once: fresh noise per step would make the host, not the step, set the pace.
  noise = 20 * rng.standard_normal((4 * batch_size, image_size, image_size, 3), np.float32)
  while True:
    labels = rng.integers(0, num_classes, batch_size).astype(np.int32)
    image = prototypes[labels] + noise[rng.integers(0, len(noise), batch_size)]
    yield {"image": np.clip(image, 0, 255).astype(np.uint8), "label": labels}


def train_on_learnable(config, num_steps: int, num_classes: int = 10, devices=None) -> dict:
  """`num_steps` steps of the config's recipe on `learnable_batches`: warmup shortened, and
  the recipe's learning rate at this (small) batch rather than scaled down to it."""
  config.model.num_classes = num_classes
  config.train.update(steps=num_steps, warmup_steps=max(1, num_steps // 10), warmup_epochs=0.0,
                      lr_reference_batch=0)
  start = time.perf_counter()
  trainer = build_trainer(config, num_steps, devices)
  state, losses = trainer.state, []
  batches = learnable_batches(num_classes, config.data.image_size, config.train.batch_size)
  in_flight = cpu_runtime.StepQueue(cpu_runtime.max_steps_in_flight())
  for _ in range(num_steps):
    state, metrics = trainer.train_step(state, sharding.shard_batch(next(batches), trainer.mesh))
    in_flight.push(metrics)
    losses.append(metrics.loss)  # device values, read once at the end
  losses = [float(x.compute()) for x in jax.device_get(losses)]
  window = max(1, min(20, num_steps // 4))
  first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
  return dict(steps=num_steps, batch=config.train.batch_size, window=window, first_loss=first,
              last_loss=last, fell=bool(last < first), finite=all(map(math.isfinite, losses)),
              attention=trainer.attention.impl, train_s=time.perf_counter() - start,
              losses=losses)


def device_memory() -> dict:
  """The first local device's peak and limit (`memory_stats()`, None where not reported)."""
  device = jax.local_devices()[0]
  try:
    memory = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - backends without the call
    memory = {}
  return dict(device=device.device_kind, peak_bytes_in_use=memory.get("peak_bytes_in_use"),
              bytes_limit=memory.get("bytes_limit"))
