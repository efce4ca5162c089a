r"""Throughput of the real train step (or of the input pipeline) for one config.

  python -m diffvit_jax.tools.bench --config configs/tiny_imagenet.py:diffvit_10m \
      [--batch 256] [--steps 20] [--warmup 3] [--config.model.dtype=float32]
  python -m diffvit_jax.tools.bench --config configs/tiny_imagenet.py:diffvit_10m \
      --config.model.attention_impl=xla   # vs cuDNN, what 'auto' takes on a recent GPU
  python -m diffvit_jax.tools.bench --config configs/digits.py:vit --pipeline
  python -m diffvit_jax.tools.bench --config configs/tiny_imagenet.py:vit_10m --pipeline \
      --config.data.source=digits        # no Tiny ImageNet build needed

Human-readable lines go to stderr; the last stdout line is one JSON object:
arch, params, gflops_per_image (as `describe`), batch, images_per_sec,
step_ms, compile_s, device_kind, num_devices, dtype and mfu (achieved model
FLOP/s over the devices' peak dense FLOP/s from `PEAK_TFLOPS`; null where
the device is not in the table, e.g. the CPU).

On the CPU, `cpu_runtime.apply_cpu_defaults()` runs first, as in training. No TensorFlow.
"""

import json
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffvit_jax import config_cli, cpu_runtime
from diffvit_jax.data import sharding
from diffvit_jax.errors import UserError
from diffvit_jax.models import attention_impl, stats
from diffvit_jax.training import trainer as trainer_lib

# Peak dense (no sparsity) TFLOP/s per device from the vendors' data sheets, by compute
# dtype, keyed by the exact `device.device_kind` (CUDA's device name): a substring rule
# would give an L40 the L4's peak. 'bfloat16' is with float32 accumulation (what XLA asks
# for; GeForce cards run it at half their float16-accumulate rate). 'float32' is what
# float32 matmuls run at under JAX's default precision: TF32 tensor cores on NVIDIA Ampere
# and later, one bf16 pass on TPUs. A kind not listed has no MFU (None), never a guess.
_H100_SXM = {"bfloat16": 989.4, "float32": 494.7}
_NVL = {"bfloat16": 835.0, "float32": 417.5}
_A100 = {"bfloat16": 312.0, "float32": 156.0}
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,  # SXM5
    "NVIDIA H100 80GB HBM3e": _H100_SXM,
    "NVIDIA H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "NVIDIA H100 NVL": _NVL,
    "NVIDIA H200": _H100_SXM,  # SXM: the H100's compute, more memory
    "NVIDIA H200 NVL": _NVL,
    "NVIDIA GH200 480GB": _H100_SXM,
    "NVIDIA GH200 144G HBM3e": _H100_SXM,
    "NVIDIA B200": {"bfloat16": 2250.0, "float32": 1100.0},
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA GeForce RTX 4090": {"bfloat16": 165.2, "float32": 82.6},  # Ada whitepaper
    "NVIDIA RTX 6000 Ada Generation": {"bfloat16": 364.2, "float32": 182.1},
    "NVIDIA L40": {"bfloat16": 181.0, "float32": 90.5},
    "NVIDIA L40S": {"bfloat16": 362.0, "float32": 183.0},
    "NVIDIA L4": {"bfloat16": 121.0, "float32": 60.0},
    "NVIDIA A10": {"bfloat16": 125.0, "float32": 62.5},
    # No NVIDIA data sheet: AWS's A10G, 80 SMs at 1.71 GHz at GA102's float32-accumulate rate.
    "NVIDIA A10G": {"bfloat16": 70.0, "float32": 35.0},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},  # v5p
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},
}


def peak_flops_per_device(device_kind: str, dtype: str) -> float | None:
  """Peak dense FLOP/s of one device of `device_kind` (exact name) at `dtype`, or None."""
  peaks = PEAK_TFLOPS.get(device_kind.strip(), {})
  return peaks[dtype] * 1e12 if dtype in peaks else None


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict:
  """A host batch as the input pipeline gives it (`trainer.batch_spec`): uint8 images, int32
  labels."""
  rng = np.random.default_rng(seed)
  size = config.data.image_size
  return {"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
          "label": rng.integers(0, config.model.num_classes, batch_size, dtype=np.int32)}


def build_train_step(config, batch_size: int, mesh=None, total_steps: int = 10_000):
  """(trainer, sharded synthetic batch): the trainer as training builds it, at `batch_size`.

  The build compiles the train step (its memory plan), for that batch.
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  if batch_size != config.train.batch_size:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.train.batch_size = batch_size
  # Synthetic data has no epochs: call `total_steps` one, which only sets the learning-rate
  # values (warmup in epochs), not the cost of a step.
  trainer = trainer_lib.build(config, mesh, total_steps,
                              num_train_examples=total_steps * config.train.batch_size)
  return trainer, sharding.shard_batch(synthetic_batch(config, batch_size), mesh)


def time_steps(train_step, state, batch, num_steps: int):
  """(new state, seconds) for `num_steps` steps dispatched as the train loop does.

  Back to back with one wait at the end, except where `dispatch` bounds the
  steps in flight (the CPU: one at a time).
  """
  in_flight = cpu_runtime.StepQueue(cpu_runtime.max_steps_in_flight())
  start = time.perf_counter()
  for _ in range(num_steps):
    state, metrics = train_step(state, batch)
    in_flight.push(metrics)
  jax.block_until_ready(state)
  return state, time.perf_counter() - start


def bench_step(config, batch_size: int, num_steps: int, warmup: int, repeats: int) -> dict:
  """The train step's time, exactly as training runs it.

  `steps.create_train_state` and `steps.jit_steps` of the config, fed synthetic batches
  already sharded on the device mesh (`sharding.shard_batch`): the step alone, not the
  input pipeline. Steps are dispatched back to back and the host waits only at the end of
  each timed window (as the training loop, which syncs only to log). `step_ms` is the median
  over `repeats` windows of `num_steps` steps, after `warmup` untimed steps; `compile_s` is
  the wall time of building the trainer (which compiles the step) and its first step.
  """
  mesh = sharding.make_mesh()
  start = time.perf_counter()
  trainer, batch = build_train_step(config, batch_size, mesh)  # compiles the step
  return time_trainer(trainer, batch, config, num_steps, warmup, repeats, start)


def time_trainer(trainer, batch, config, num_steps: int, warmup: int, repeats: int,
                 start: float) -> dict:
  """`bench_step`'s timing of a built trainer on `batch`; `start`: when its build began."""
  batch_size = config.train.batch_size
  mesh = trainer.mesh
  train_step, state = trainer.train_step, trainer.state
  state, _ = train_step(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - start
  if warmup > 1:
    state, _ = time_steps(train_step, state, batch, warmup - 1)
  windows = []
  for _ in range(repeats):
    state, seconds = time_steps(train_step, state, batch, num_steps)
    windows.append(seconds / num_steps)
    print(f"window: {1e3 * windows[-1]:.1f} ms/step", file=sys.stderr)
  step_s = statistics.median(windows)
  images_per_sec = batch_size / step_s
  gflops = stats.gflops_per_image(config.model, config.data.image_size)
  devices = mesh.devices.ravel()
  peak = peak_flops_per_device(devices[0].device_kind, config.model.dtype)
  mfu = None if peak is None else gflops * 1e9 * images_per_sec / (peak * len(devices))
  return dict(step_ms=round(1e3 * step_s, 3), step_ms_windows=[round(1e3 * w, 3) for w in windows],
              images_per_sec=round(images_per_sec, 2), compile_s=round(compile_s, 3),
              mfu=None if mfu is None else round(mfu, 4))


def bench_pipeline(config, batch_size: int, num_batches: int, warmup: int, repeats: int) -> dict:
  """`input_pipeline.create_train_iterator` alone: host batches of the config's augmentation.

  No device transfer. tiny_imagenet configs need the built data set, or
  `--config.data.source=digits` to run the same augmentation on the embedded digits.
  """
  from diffvit_jax.data import input_pipeline

  start = time.perf_counter()
  iterator = input_pipeline.create_train_iterator(
      config.data, global_batch_size=batch_size, seed=config.train.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  for _ in range(max(warmup, 1)):  # absorbs thread / worker start-up
    next(iterator)
  startup_s = time.perf_counter() - start
  windows = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(num_batches):
      next(iterator)
    windows.append((time.perf_counter() - start) / num_batches)
    print(f"window: {batch_size / windows[-1]:.0f} images/s", file=sys.stderr)
  batch_s = statistics.median(windows)
  host_batch = batch_size // jax.process_count()
  return dict(step_ms=round(1e3 * batch_s, 3), images_per_sec=round(host_batch / batch_s, 2),
              compile_s=round(startup_s, 3), mfu=None, source=config.data.source,
              num_workers=input_pipeline.num_workers(config.data),
              read_threads=config.data.read_threads)


def run(config, *, batch_size: int | None, num_steps: int, warmup: int, repeats: int,
        pipeline: bool) -> dict:
  batch_size = batch_size or config.train.batch_size
  if num_steps < 1 or repeats < 1 or warmup < 0:
    raise UserError("--steps and --repeats must be >= 1 and --warmup >= 0.")
  if batch_size % jax.device_count():
    raise UserError(f"--batch {batch_size} is not divisible by the {jax.device_count()} devices.")
  model = config.model
  summary = dict(
      name=config.get("name", ""), mode="pipeline" if pipeline else "step", arch=model.arch,
      params=stats.count_params(model, config.data.image_size)["total"],
      gflops_per_image=round(stats.gflops_per_image(model, config.data.image_size), 4),
      batch=batch_size, dtype=model.dtype, attention=attention_impl.resolve(model).as_dict(),
      device_kind=jax.devices()[0].device_kind, num_devices=jax.device_count(),
      platform=jax.devices()[0].platform)
  if pipeline:
    summary.update(bench_pipeline(config, batch_size, num_steps, warmup, repeats))
  else:
    summary.update(bench_step(config, batch_size, num_steps, warmup, repeats))
  return summary


def _define_flags():
  """Command-line flags, defined only when run as a program (other scripts import this module)."""
  return dict(
      config=config_flags.DEFINE_config_file(
          "config", None, "Config file, e.g. configs/tiny_imagenet.py:vit_10m.",
          lock_config=True),
      batch=flags.DEFINE_integer("batch", None,
                                 "Global batch size (default: config.train.batch_size)."),
      steps=flags.DEFINE_integer("steps", 10, "Timed steps (or pipeline batches) per window."),
      warmup=flags.DEFINE_integer("warmup", 2, "Untimed steps first; the first one compiles."),
      repeats=flags.DEFINE_integer("repeats", 3, "Timed windows; step_ms is their median."),
      pipeline=flags.DEFINE_bool("pipeline", False,
                                 "Time the input pipeline instead of the step."))


def main(argv, flag_values):
  del argv
  try:
    if flag_values["config"].value is None:
      raise UserError("--config is required, e.g. --config configs/tiny_imagenet.py:vit_10m.")
    value = lambda name: flag_values[name].value
    summary = run(value("config"), batch_size=value("batch"), num_steps=value("steps"),
                  warmup=value("warmup"), repeats=value("repeats"), pipeline=value("pipeline"))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  print(json.dumps(summary))


if __name__ == "__main__":
  cpu_runtime.apply_cpu_defaults()  # Before JAX initialises its backends (importing it does not).
  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS), flags_parser=config_cli.flags_parser)
