r"""Everything only a GPU can tell, in one call of under 10 minutes on one H100 / H200.

  ./launch.sh gpu_check [--dry_run] [--out DIR] [--only agreement,step_time,...]
  python -m diffvit_jax.tools.gpu_check --dry_run --out /tmp/gpu_check

Writes <out>/gpu_check.json and <out>/gpu_check.md (default out: benchmarks/),
one progress line per measurement on stderr. Sections (`--only` picks some):

  agreement     the fused attention path ('cudnn') against 'einsum' for vit,
                diffvit and diffvit2 in bfloat16: logits and gradients w.r.t.
                parameters and input images, each as a relative L2 error
                against a float32 'einsum' reference (see TOLERANCES).
  step_time     the real train step (tools/bench.py) of the six v2 models and
                the seed 10m pair in bfloat16 at the config's batch (what the
                sweep runs), then doubling the batch until the GPU runs out of
                memory (XLA RESOURCE_EXHAUSTED) or `max_batch`; the largest
                batch that ran is timed too. Step time, images/s, MFU,
                compiled memory, DiffViT/ViT step-time ratio per size.
  diffvit_forms DiffViT 10m v2 with attention_impl 'cudnn' against 'xla':
                step time and agreement.
  pipeline      the v2 train input pipeline (RandAugment, random resized crop
                to 96) over a generated image_folder of 64x64 JPEGs with one
                grain worker per core, against the images/s the step consumes.
  training      300 bfloat16 steps of the v2 10m models on a learnable
                generated task (class-coloured patterns); the loss must fall.
  memory        `device.memory_stats()['peak_bytes_in_use']` of the process.
  sweep         the six-run v2 sweep in H100-hours from the measured steps.

The goals (MFU, DiffViT/ViT ratio, pipeline headroom, sweep hours) are listed
with met / missed in the Markdown table and under 'goals' in the JSON.

`--dry_run` runs the same code on the CPU with tiny models (width 32, depth 1,
32x32 images), tiny batches and few steps, in a minute or two: the test suite
runs it (tests/test_gpu_check.py). cuDNN cannot run on the CPU, so there the
fused path is 'xla' (compared against 'einsum'), as the output says.

A measurement that fails (cuDNN refusing a shape, an unexpected error) is
recorded with its message under 'error' and the check goes on. A time budget
(`--budget_s`) skips the remaining optional measurements (largest batch,
second training run) rather than overrunning; skips are recorded too.
Nothing here imports TensorFlow: the GPU machine has none.
"""

from diffvit_jax import cpu_runtime

if __name__ == "__main__":
  cpu_runtime.apply_cpu_defaults()  # Before jax initialises its backends.

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from diffvit_jax import models  # noqa: E402
from diffvit_jax.data import sharding  # noqa: E402
from diffvit_jax.errors import UserError  # noqa: E402
from diffvit_jax.models import attention_impl, stats  # noqa: E402
from diffvit_jax.tools import bench  # noqa: E402
from diffvit_jax.training import optim  # noqa: E402

TINY_IMAGENET_TRAIN_EXAMPLES = 100_000  # the sweep's data set, not needed on this machine

SECTIONS = ("agreement", "step_time", "diffvit_forms", "pipeline", "training", "memory", "sweep")
ARCHS = ("vit", "diffvit", "diffvit2")
SIZES = ("10m", "20m", "30m")
# The six v2 runs of the sweep, then the seed protocol's 10m pair.
STEP_CONFIGS = tuple(f"{arch}_{size},v2" for size in SIZES for arch in ("vit", "diffvit")) + (
    "vit_10m,seed", "diffvit_10m,seed")

# Relative L2 error ||x - ref|| / ||ref|| of a bfloat16 path against the float32 einsum
# reference, whole tree for parameter gradients. bfloat16 keeps 8 significant bits (a
# rounding error of up to 2^-9 = 0.2% per operation); through 8 blocks of matmuls, softmax
# and norms the plain bfloat16 einsum path lands at about 1% on logits and a few % on
# gradients, whose small entries lose more. A fused path is accepted when it stays within
# these bounds, i.e. about as far from float32 as bfloat16 itself puts any path; a wrong mask,
# scale or head layout gives errors of order 100%.
TOLERANCES = {"logits": 0.05, "param_grads": 0.10, "input_grads": 0.10}

# Goals of the GPU study (the Markdown table lists each with its measured value).
GOAL_MFU = {"30m": 0.45, "10m": 0.30}
GOAL_DIFF_RATIO = 1.10
GOAL_PIPELINE_HEADROOM = 1.5
GOAL_SWEEP_HOURS = 2.5

DRY_RUN_MODEL = dict(width=32, depth=1, num_heads=4, mlp_dim=64)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How big each measurement is: the real run, or the CPU dry run's tiny stand-in."""

  dry_run: bool
  model_overrides: dict  # applied to every config.model (dry run: a tiny model)
  image_size: int | None  # data.image_size for the models (None: the config's)
  agreement_model: str  # the config whose model the agreement check runs (its size)
  agreement_depth: int | None  # fewer blocks than the config's: compiles faster, same heads
  agreement_batch: int
  step_batch: int | None  # None: the config's train.batch_size
  max_batch: int  # the doubling search stops here
  largest_for: tuple[str, ...]  # configs whose largest batch is searched
  timed_steps: int
  repeats: int
  pipeline_batches: int
  pipeline_images: int  # generated JPEGs (64x64) in the image_folder
  pipeline_workers: int
  train_steps: int
  train_names: tuple[str, ...]  # configs trained on the generated task
  train_batch: int
  train_window: int  # steps averaged at the start and at the end of training

  @classmethod
  def make(cls, dry_run: bool, train_steps: int | None, max_batch: int | None) -> "Plan":
    if dry_run:
      return cls(dry_run=True, model_overrides=dict(DRY_RUN_MODEL), image_size=32,
                 agreement_model="10m", agreement_depth=None, agreement_batch=4, step_batch=8,
                 max_batch=max_batch or 16, largest_for=("vit_10m,v2",), timed_steps=2,
                 repeats=1, pipeline_batches=2, pipeline_images=64, pipeline_workers=0,
                 train_steps=train_steps or 20, train_names=("diffvit_10m,v2",),
                 train_batch=16, train_window=5)
    return cls(dry_run=False, model_overrides={}, image_size=None, agreement_model="10m",
               agreement_depth=4, agreement_batch=8, step_batch=None,
               max_batch=max_batch or 8192, largest_for=STEP_CONFIGS, timed_steps=10,
               repeats=3, pipeline_batches=10, pipeline_images=2000,
               pipeline_workers=os.cpu_count() or 1, train_steps=train_steps or 300,
               train_names=("diffvit_10m,v2", "vit_10m,v2"), train_batch=128,
               train_window=20)


def log(message: str) -> None:
  print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def error_record(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def is_out_of_memory(e: BaseException) -> bool:
  """Whether `e` is XLA running out of device memory (RESOURCE_EXHAUSTED)."""
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def load_config(name: str, plan: Plan, *, dtype: str = "bfloat16", attention: str = "auto"):
  """configs/tiny_imagenet.py:<name>, in `dtype`, shrunk by the plan in a dry run."""
  config = _tiny_imagenet_configs().get_config(name)
  config.model.update(plan.model_overrides)
  config.model.dtype = dtype
  config.model.attention_impl = attention
  if plan.image_size:
    config.data.image_size = plan.image_size
  return config


def _tiny_imagenet_configs():
  import importlib.util

  path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny_imagenet.py"
  spec = importlib.util.spec_from_file_location("tiny_imagenet_configs", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def fused_impl() -> tuple[str, str]:
  """(the fused attention path to check, a note): 'cudnn' on a GPU, 'xla' elsewhere."""
  if jax.default_backend() == "gpu":
    return "cudnn", "cuDNN flash attention (attention_impl='cudnn')"
  return "xla", (f"attention_impl='cudnn' cannot run on {jax.default_backend()!r}: the 'xla' "
                 "path stands in for it here")


# 1. Agreement of attention paths.


def relative_error(tree, reference) -> float:
  diff = sum(float(jnp.sum((jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) ** 2))
             for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True))
  norm = sum(float(jnp.sum(jnp.asarray(b, jnp.float32) ** 2)) for b in jax.tree.leaves(reference))
  return math.sqrt(diff / max(norm, 1e-30))


def outputs_and_grads(model_config, impl: str, params, images, labels):
  """(logits, d loss / d params, d loss / d images) of the model on path `impl`, eval mode."""
  model = models.build_model(model_config, impl)

  def loss_fn(params, images):
    logits = model.apply({"params": params}, images, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return loss.mean(), logits

  (_, logits), (param_grads, input_grads) = jax.jit(
      jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(params, images)
  return jax.device_get((logits, param_grads, input_grads))


def check_agreement(arch: str, impls: tuple[str, ...], plan: Plan) -> dict:
  """Each path of `impls` in bfloat16 against float32 einsum (same params and data), and the
  paths against each other; a path that fails to run is recorded with its error."""
  config = load_config(f"{arch}_{plan.agreement_model},v2", plan)
  model_config = config.model
  model_config.depth = plan.agreement_depth or model_config.depth
  size = config.data.image_size
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((plan.agreement_batch, size, size, 3), np.float32))
  labels = jnp.asarray(rng.integers(0, model_config.num_classes, plan.agreement_batch))
  reference_config = model_config.copy_and_resolve_references()
  reference_config.dtype = "float32"
  reference_model = models.build_model(reference_config, "einsum")
  params = reference_model.init(jax.random.key(0), images[:1], train=False)["params"]
  # The head starts at zero (timm's init), which would make logits and input gradients zero
  # on every path and the comparison empty: give it trained-like random weights.
  head = params["head"]["kernel"]
  params["head"]["kernel"] = jax.random.normal(jax.random.key(1), head.shape) / math.sqrt(
      head.shape[0])
  reference = outputs_and_grads(reference_config, "einsum", params, images, labels)
  result = dict(arch=arch, batch=plan.agreement_batch, image_size=size,
                width=model_config.width, depth=model_config.depth, paths={}, pairwise={})
  outputs = {}
  for impl in impls:
    try:
      path_config = model_config.copy_and_resolve_references()
      path_config.attention_impl = impl
      attention_impl.resolve(path_config)  # a path that cannot run here: ConfigError saying why
      outputs[impl] = outputs_and_grads(model_config, impl, params, images, labels)
    except Exception as e:  # noqa: BLE001 - e.g. cuDNN refusing a shape: recorded, not fatal
      result["paths"][impl] = dict(error=error_record(e), within_tolerance=False)
      continue
    errors = {f"{name}_rel_err": relative_error(value, ref) for name, value, ref in zip(
        TOLERANCES, outputs[impl], reference, strict=True)}
    errors["within_tolerance"] = all(
        math.isfinite(errors[f"{name}_rel_err"]) and errors[f"{name}_rel_err"] <= tolerance
        for name, tolerance in TOLERANCES.items())
    result["paths"][impl] = errors
  for i, first in enumerate(impls):
    for second in impls[i + 1:]:
      if first in outputs and second in outputs:
        result["pairwise"][f"{first} vs {second}"] = {
            f"{name}_rel_diff": relative_error(a, b) for name, a, b in zip(
                TOLERANCES, outputs[first], outputs[second], strict=True)}
  result["passed"] = all(path["within_tolerance"] for path in result["paths"].values())
  return result


# 2. Step time and the largest batch.


def run_window(step, state, batch, num_steps: int, repeats: int):
  """(state, median seconds per step) over `repeats` windows of `num_steps` steps."""
  windows = []
  for _ in range(repeats):
    state, seconds = bench.time_steps(step, state, batch, num_steps)
    windows.append(seconds / num_steps)
  return state, statistics.median(windows)


def compiled_bytes(compiled) -> int | None:
  """Device memory XLA planned for one step (arguments + outputs + temporaries - aliased)."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None
  if analysis is None:
    return None
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  return int(total)


def measure_batch(trainer, state, config, batch_size: int, plan: Plan, peak: float | None):
  """(state, record) for one batch size: compile, one warm step, timed windows."""
  batch = sharding.shard_batch(bench.synthetic_batch(config, batch_size), trainer.mesh)
  start = time.perf_counter()
  compiled = trainer.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  state, _ = compiled(state, batch)  # warm-up: first allocation of the buffers
  jax.block_until_ready(state)
  state, step_s = run_window(compiled, state, batch, plan.timed_steps, plan.repeats)
  images_per_sec = batch_size / step_s
  gflops = stats.gflops_per_image(config.model, config.data.image_size)
  num_devices = trainer.mesh.devices.size
  mfu = None if peak is None else gflops * 1e9 * images_per_sec / (peak * num_devices)
  return state, dict(batch=batch_size, step_ms=1e3 * step_s, images_per_sec=images_per_sec,
                     mfu=mfu, compile_s=compile_s, compiled_bytes=compiled_bytes(compiled))


def build_trainer(name: str, plan: Plan, attention: str, batch_size: int | None = None):
  """(config, trainer, peak FLOP/s of one device or None) for `name` in bfloat16."""
  config = load_config(name, plan, attention=attention)
  batch_size = batch_size or plan.step_batch or config.train.batch_size
  trainer = bench.build_train_step(config, batch_size, sharding.make_mesh())[0]
  device = trainer.mesh.devices.ravel()[0]
  return config, trainer, bench.peak_flops_per_device(device.device_kind, config.model.dtype)


def measure_step_time(name: str, plan: Plan, *, attention: str = "auto") -> dict:
  """The train step of `name` at the config's batch (the batch the sweep runs)."""
  config, trainer, peak = build_trainer(name, plan, attention)
  batch_size = plan.step_batch or config.train.batch_size
  record = dict(name=name, arch=config.model.arch, dtype=config.model.dtype,
                attention=trainer.attention.impl,
                params=stats.count_params(config.model, config.data.image_size)["total"],
                gflops_per_image=stats.gflops_per_image(config.model, config.data.image_size))
  record.update(measure_batch(trainer, trainer.state, config, batch_size, plan, peak)[1])
  log(f"step {name} [{record['attention']}] batch {batch_size}: {record['step_ms']:.1f} ms, "
      f"{record['images_per_sec']:.0f} img/s, MFU {_pct(record['mfu'])}")
  return record


def find_largest_batch(record: dict, plan: Plan, deadline: float) -> dict:
  """Doubles `record`'s batch until out of memory (XLA RESOURCE_EXHAUSTED), the cap or the
  time budget; the largest batch that ran, timed, and why the search stopped."""
  name = record["name"]
  config, trainer, peak = build_trainer(name, plan, "auto", record["batch"])
  state = trainer.state
  keys = ("batch", "step_ms", "images_per_sec", "mfu", "compile_s", "compiled_bytes")
  found = dict(largest={k: record[k] for k in keys})
  trial = record["batch"] * 2
  while True:
    if trial > plan.max_batch:
      found["stopped"] = f"cap --max_batch={plan.max_batch}"
      break
    if time.perf_counter() > deadline:
      found["stopped"] = "time budget spent (--budget_s)"
      break
    try:
      state, largest = measure_batch(trainer, state, config, trial, plan, peak)
    except Exception as e:  # noqa: BLE001 - out of memory ends the search; others are recorded
      if is_out_of_memory(e):
        found.update(stopped="out of memory", out_of_memory_at=trial)
        log(f"step {name} batch {trial}: out of memory")
      else:
        found.update(stopped="error", error=error_record(e))
        log(f"step {name} batch {trial}: error {found['error']}")
      break
    found["largest"] = largest
    log(f"step {name} batch {trial}: {largest['step_ms']:.1f} ms, "
        f"{largest['images_per_sec']:.0f} img/s, MFU {_pct(largest['mfu'])}")
    trial *= 2
  del trainer, state
  gc.collect()
  return found


def _pct(value) -> str:
  return "n/a" if value is None else f"{100 * value:.1f}%"


# 4. Input pipeline.


def write_synthetic_image_folder(root: pathlib.Path, num_images: int, num_classes: int = 10,
                                 size: int = 64) -> None:
  """<root>/train/<class>/<i>.jpg: num_images random-textured 64x64 JPEGs (Tiny ImageNet's)."""
  from PIL import Image

  rng = np.random.default_rng(0)
  for i in range(num_images):
    folder = root / "train" / f"class_{i % num_classes:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    # Smooth noise rather than white noise: JPEG decode cost close to a natural photo's.
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
    image.save(folder / f"{i:05d}.jpg", quality=90)


def measure_pipeline(plan: Plan, root: pathlib.Path, batch_size: int | None) -> dict:
  """The v2 train pipeline at the v2 batch (or `batch_size`), unshrunk even in a dry run."""
  config = _tiny_imagenet_configs().get_config("vit_10m,v2")
  batch_size = batch_size or config.train.batch_size
  write_synthetic_image_folder(root, plan.pipeline_images)
  config.data.update(source="image_folder", dir=str(root), num_workers=plan.pipeline_workers)
  result = bench.bench_pipeline(config, batch_size, plan.pipeline_batches, warmup=1,
                                repeats=plan.repeats)
  result.update(batch=batch_size, image_size=config.data.image_size,
                randaugment=config.data.randaugment, crop=config.data.crop)
  return result


# 5. Training on a learnable generated task.


def learnable_batches(num_classes: int, image_size: int, batch_size: int, seed: int = 0):
  """Endless batches whose class sets a colour and a stripe pattern, plus noise."""
  rng = np.random.default_rng(seed)
  colours = rng.standard_normal((num_classes, 1, 1, 3)).astype(np.float32)
  ys, xs = np.mgrid[:image_size, :image_size] / image_size
  angles = rng.uniform(0, np.pi, num_classes)
  freqs = rng.uniform(2, 6, num_classes)
  patterns = np.stack([np.sin(2 * np.pi * f * (np.cos(a) * xs + np.sin(a) * ys))
                       for a, f in zip(angles, freqs, strict=True)])[..., None]
  prototypes = (colours + patterns).astype(np.float32)
  # Drawing fresh noise per step would make the host, not the step, set the pace.
  noise = 0.5 * rng.standard_normal((4 * batch_size, image_size, image_size, 3), np.float32)
  while True:
    labels = rng.integers(0, num_classes, batch_size).astype(np.int32)
    picks = rng.integers(0, len(noise), batch_size)
    yield {"image": prototypes[labels] + noise[picks], "label": labels}


def measure_training(name: str, plan: Plan) -> dict:
  config = load_config(name, plan)
  num_classes = 10
  config.model.num_classes = num_classes
  total = plan.train_steps
  # The v2 recipe (AdamW, mixing, smoothing, clipping), with a warmup that fits the short run.
  config.train.update(steps=total, warmup_steps=max(1, total // 10), warmup_epochs=0.0)
  mesh = sharding.make_mesh()
  trainer = bench.build_train_step(config, plan.train_batch, mesh, total_steps=total)[0]
  state, losses = trainer.state, []
  batches = learnable_batches(num_classes, config.data.image_size, plan.train_batch)
  in_flight = cpu_runtime.StepQueue(cpu_runtime.max_steps_in_flight())
  start = time.perf_counter()
  for _ in range(total):
    state, metrics = trainer.train_step(state, sharding.shard_batch(next(batches), mesh))
    in_flight.push(metrics)
    losses.append(metrics.loss)  # the device values; read once at the end
  losses = [float(x.compute()) for x in jax.device_get(losses)]
  seconds = time.perf_counter() - start
  window = min(plan.train_window, max(1, total // 2))
  first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
  return dict(name=name, steps=total, batch=plan.train_batch, num_classes=num_classes,
              window=window, first_loss=first, last_loss=last,
              fell=bool(last < first), finite=all(map(math.isfinite, losses)),
              seconds=seconds, attention=trainer.attention.impl, losses=losses)


# 6. Memory.


def memory_record() -> dict:
  device = jax.local_devices()[0]
  try:
    memory = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without the call
    memory = None
  if not memory:
    return dict(device=device.device_kind, peak_bytes_in_use=None,
                note="memory_stats() is not available on this backend")
  return dict(device=device.device_kind, peak_bytes_in_use=memory.get("peak_bytes_in_use"),
              bytes_limit=memory.get("bytes_limit"))


# 7. Sweep estimate and goals.


def sweep_estimate(step_records: list[dict], plan: Plan) -> dict:
  runs, hours = [], 0.0
  for record in step_records:
    if not record["name"].endswith(",v2") or "step_ms" not in record:
      continue
    config = load_config(record["name"], plan)
    config.train.batch_size = record["batch"]
    steps = optim.derive_recipe(config.train, TINY_IMAGENET_TRAIN_EXAMPLES).total_steps
    run_hours = steps * record["step_ms"] / 1e3 / 3600
    runs.append(dict(name=record["name"], batch=record["batch"], steps=steps,
                     step_ms=record["step_ms"], hours=run_hours))
    hours += run_hours
  complete = len(runs) == 6
  return dict(runs=runs, hours=hours if complete else None, complete=complete,
              device=jax.devices()[0].device_kind,
              note="train steps only (no evaluation, checkpoints or compilation), "
                   "on the device measured, counted as H100-hours")


def goals(report: dict) -> list[dict]:
  by_name = {r["name"]: r for r in report.get("step_time", {}).get("results", [])}
  rows = []

  def add(goal, target, measured, met, fmt):
    rows.append(dict(goal=goal, target=target, measured=measured,
                     status="n/a" if met is None else ("met" if met else "missed"),
                     shown=("n/a" if measured is None else fmt(measured))))

  for size, floor in GOAL_MFU.items():
    for arch in ("vit", "diffvit"):
      mfu = by_name.get(f"{arch}_{size},v2", {}).get("mfu")
      add(f"{arch}_{size},v2 bf16 MFU", f">= {100 * floor:.0f}%", mfu,
          None if mfu is None else mfu >= floor, lambda v: f"{100 * v:.1f}%")
  ratios = report.get("step_time", {}).get("diffvit_vit_ratio", {})
  for size in SIZES:
    ratio = ratios.get(size)
    add(f"DiffViT/ViT step time {size} v2", f"<= {GOAL_DIFF_RATIO:.2f}", ratio,
        None if ratio is None else ratio <= GOAL_DIFF_RATIO, lambda v: f"{v:.3f}")
  headroom = report.get("pipeline", {}).get("headroom")
  add("pipeline / step images/s", f">= {GOAL_PIPELINE_HEADROOM:.1f}x", headroom,
      None if headroom is None else headroom >= GOAL_PIPELINE_HEADROOM, lambda v: f"{v:.2f}x")
  hours = report.get("sweep", {}).get("hours")
  add("six-run v2 sweep", f"<= {GOAL_SWEEP_HOURS:.1f} H100-hours", hours,
      None if hours is None else hours <= GOAL_SWEEP_HOURS, lambda v: f"{v:.2f} h")
  return rows


# The check.


@contextlib.contextmanager
def section(report: dict, name: str, selected: tuple[str, ...]):
  """Runs a section if selected; an unexpected failure is recorded, not raised."""
  entry = report.setdefault(name, {})
  if name not in selected:
    entry["skipped"] = "not selected (--only)"
    yield None
    return
  start = time.perf_counter()
  try:
    yield entry
  except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
    entry["error"] = error_record(e)
    log(f"{name}: error {entry['error']}")
    traceback.print_exc(file=sys.stderr)
  entry["seconds"] = time.perf_counter() - start


def attempt(label: str, fn, **fields) -> dict:
  """fn()'s record, or {'error': message} for this one measurement."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - recorded per measurement, the check goes on
    log(f"{label}: error {error_record(e)}")
    return dict(fields, error=error_record(e))


def run_check(plan: Plan, selected: tuple[str, ...], budget_s: float) -> dict:
  start = time.perf_counter()
  deadline = start + budget_s
  device = jax.devices()[0]
  candidate, candidate_note = fused_impl()
  report = dict(meta=dict(dry_run=plan.dry_run, platform=device.platform,
                          device_kind=device.device_kind, num_devices=jax.device_count(),
                          jax_version=jax.__version__, cpu_count=os.cpu_count(),
                          fused_path=candidate, fused_path_note=candidate_note,
                          plan=dataclasses.asdict(plan)))
  log(f"device {device.device_kind} x{jax.device_count()} ({device.platform}); "
      f"{'dry run' if plan.dry_run else 'full run'}; fused path: {candidate_note}")

  impls = ("einsum", "xla", "cudnn") if candidate == "cudnn" else ("einsum", "xla")
  with section(report, "agreement", selected) as entry:
    if entry is not None:
      entry.update(fused=candidate, paths=list(impls), reference="einsum float32",
                   tolerances=TOLERANCES, note=candidate_note)
      entry["results"] = []
      for arch in ARCHS:
        result = attempt(f"agreement {arch}",
                         lambda arch=arch: check_agreement(arch, impls, plan),
                         arch=arch, passed=False)
        entry["results"].append(result)
        for impl, errors in result.get("paths", {}).items():
          log(f"agreement {arch} {impl} bf16 vs einsum f32: " + (
              f"error {errors['error']}" if "error" in errors else
              f"logits {errors['logits_rel_err']:.2e}, params' grads "
              f"{errors['param_grads_rel_err']:.2e}, input grads "
              f"{errors['input_grads_rel_err']:.2e} -> "
              f"{'pass' if errors['within_tolerance'] else 'FAIL'}"))

  step_results = []
  with section(report, "step_time", selected) as entry:
    if entry is not None:
      for name in STEP_CONFIGS:
        step_results.append(attempt(f"step {name}", lambda name=name: measure_step_time(
            name, plan), name=name))
        gc.collect()
      entry["results"] = step_results
      by_name = {r["name"]: r for r in step_results}
      ratios = {}
      for size in SIZES:
        vit, diff = by_name.get(f"vit_{size},v2", {}), by_name.get(f"diffvit_{size},v2", {})
        if "step_ms" in vit and "step_ms" in diff:
          ratios[size] = diff["step_ms"] / vit["step_ms"]
          log(f"DiffViT/ViT step time {size} v2: {ratios[size]:.3f}")
      entry["diffvit_vit_ratio"] = ratios

  with section(report, "diffvit_forms", selected) as entry:
    if entry is not None:
      baseline = "xla" if candidate == "cudnn" else "einsum"
      entry.update(candidate_path=candidate, baseline_path=baseline, note=candidate_note)
      for impl, role in ((candidate, "candidate"), (baseline, "baseline")):
        entry[role] = attempt(f"diffvit_10m,v2 [{impl}]", lambda impl=impl: measure_step_time(
            "diffvit_10m,v2", plan, attention=impl), attention=impl)
      if "step_ms" in entry["candidate"] and "step_ms" in entry["baseline"]:
        entry["step_time_ratio"] = entry["candidate"]["step_ms"] / entry["baseline"]["step_ms"]
        log(f"diffvit {candidate}/{baseline} step time: {entry['step_time_ratio']:.3f}")
      # Agreement: from the agreement section, which runs every path of every arch.
      diffvit = next((r for r in report.get("agreement", {}).get("results", [])
                      if r["arch"] == "diffvit" and "paths" in r), None)
      if diffvit is None:
        entry["agreement"] = dict(skipped="the agreement section did not run")
      else:
        entry["agreement"] = dict(
            candidate=diffvit["paths"].get(candidate), baseline=diffvit["paths"].get(baseline),
            between=diffvit["pairwise"].get(f"{baseline} vs {candidate}"),
            passed=bool(diffvit["paths"].get(candidate, {}).get("within_tolerance")
                        and diffvit["paths"].get(baseline, {}).get("within_tolerance")))

  with section(report, "pipeline", selected) as entry:
    if entry is not None:
      consumers = [r for r in step_results if r.get("name", "").endswith(",v2")
                   and "images_per_sec" in r]
      batch = plan.step_batch
      with tempfile.TemporaryDirectory(prefix="gpu_check_images_") as root:
        entry.update(attempt("pipeline", lambda: measure_pipeline(plan, pathlib.Path(root),
                                                                   batch)))
      if "images_per_sec" in entry:
        log(f"pipeline: {entry['images_per_sec']:.0f} img/s with {entry['num_workers']} "
            "workers")
      if consumers and "images_per_sec" in entry:
        fastest = max(consumers, key=lambda r: r["images_per_sec"])
        entry.update(step_consumes=fastest["images_per_sec"], step_name=fastest["name"],
                     headroom=entry["images_per_sec"] / fastest["images_per_sec"])
        log(f"pipeline / step ({fastest['name']}): {entry['headroom']:.2f}x")

  with section(report, "training", selected) as entry:
    if entry is not None:
      entry["results"] = []
      for name in plan.train_names:
        if entry["results"] and time.perf_counter() > deadline:
          entry["results"].append(dict(name=name, skipped="time budget spent"))
          continue
        result = attempt(f"training {name}", lambda name=name: measure_training(name, plan),
                         name=name)
        entry["results"].append(result)
        if "error" not in result:
          log(f"training {name}: loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} "
              f"over {result['steps']} steps ({'fell' if result['fell'] else 'DID NOT FALL'})")

  # Last, as it is the optional part: what is left of the time budget goes to it.
  if "step_time" in selected:
    for record in step_results:
      if "step_ms" in record and record["name"] in plan.largest_for:
        record.update(attempt(f"largest batch {record['name']}", lambda record=record: (
            find_largest_batch(record, plan, deadline)), stopped="error"))

  with section(report, "memory", selected) as entry:
    if entry is not None:
      entry.update(memory_record())
      entry["per_config_compiled_bytes"] = {
          r["name"]: r.get("compiled_bytes") for r in step_results if "step_ms" in r}
      peak = entry.get("peak_bytes_in_use")
      log(f"peak device memory: {'n/a' if peak is None else f'{peak / 2**30:.2f} GiB'}")

  with section(report, "sweep", selected) as entry:
    if entry is not None:
      entry.update(sweep_estimate(step_results, plan))
      if entry["hours"] is not None:
        log(f"six-run v2 sweep: {entry['hours']:.2f} device-hours")

  report["goals"] = goals(report)
  report["meta"]["total_s"] = time.perf_counter() - start
  return report


def markdown(report: dict) -> str:
  meta = report["meta"]
  lines = [f"# GPU check: {meta['device_kind']} x{meta['num_devices']}"
           f"{' (dry run on the CPU: tiny models, not real numbers)' if meta['dry_run'] else ''}",
           "", f"jax {meta['jax_version']}, {meta['cpu_count']} CPU cores, "
           f"{meta['total_s']:.0f} s. Fused attention path: {meta['fused_path_note']}.", "",
           "## Goals", "", "| goal | target | measured | status |", "|---|---|---|---|"]
  lines += [f"| {g['goal']} | {g['target']} | {g['shown']} | {g['status']} |"
            for g in report["goals"]]
  agreement = report.get("agreement", {})
  if "results" in agreement:
    tol = agreement["tolerances"]
    lines += ["", "## Agreement: attention paths in bfloat16 against float32 einsum "
              "(relative L2 error)", "", f"Fused path: {agreement['note']}. Tolerances: logits "
              f"{tol['logits']}, parameter gradients {tol['param_grads']}, input gradients "
              f"{tol['input_grads']}.", "",
              "| arch | path | logits | param grads | input grads | within tolerance |",
              "|---|---|---|---|---|---|"]
    for r in agreement["results"]:
      if "error" in r:
        lines.append(f"| {r['arch']} | - | error: {r['error']} | | | no |")
        continue
      for impl, errors in r["paths"].items():
        if "error" in errors:
          lines.append(f"| {r['arch']} | {impl} | error: {errors['error']} | | | no |")
          continue
        cells = " | ".join(f"{errors[f'{k}_rel_err']:.2e}" for k in TOLERANCES)
        lines.append(f"| {r['arch']} | {impl} | {cells} | "
                     f"{'yes' if errors['within_tolerance'] else 'NO'} |")
  steps = report.get("step_time", {})
  if "results" in steps:
    lines += ["", "## Train step (bfloat16)", "",
              "| config | attention | batch | ms/step | images/s | MFU | largest batch | "
              "its images/s | its MFU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in steps["results"]:
      if "error" in r:
        lines.append(f"| {r['name']} | error: {r['error']} | | | | | | | |")
        continue
      big = r.get("largest")
      largest = (f"{big['batch']} ({r['stopped']}) | {big['images_per_sec']:.0f} | "
                 f"{_pct(big['mfu'])}" if big else "not searched | - | -")
      lines.append(f"| {r['name']} | {r['attention']} | {r['batch']} | {r['step_ms']:.1f} | "
                   f"{r['images_per_sec']:.0f} | {_pct(r['mfu'])} | {largest} |")
  forms = report.get("diffvit_forms", {})
  if "candidate" in forms:
    lines += ["", f"## DiffViT 10m v2: {forms['candidate_path']} against "
              f"{forms['baseline_path']}", ""]
    for role in ("candidate", "baseline"):
      r = forms[role]
      lines.append(f"- {r.get('attention')}: " + (
          f"error: {r['error']}" if "error" in r else f"{r['step_ms']:.1f} ms/step"))
    if "step_time_ratio" in forms:
      lines.append(f"- step time ratio: {forms['step_time_ratio']:.3f}")
    between = forms.get("agreement", {}).get("between")
    if between:
      lines.append(f"- relative difference between the two (bfloat16): logits "
                   f"{between['logits_rel_diff']:.2e}, parameter gradients "
                   f"{between['param_grads_rel_diff']:.2e}; both within tolerance of float32: "
                   f"{'yes' if forms['agreement']['passed'] else 'NO'}")
  pipeline = report.get("pipeline", {})
  if "images_per_sec" in pipeline:
    lines += ["", "## Input pipeline", "",
              f"{pipeline['images_per_sec']:.0f} images/s ({pipeline['num_workers']} workers, "
              f"batch {pipeline['batch']}, {pipeline['randaugment']}, {pipeline['crop']} to "
              f"{pipeline['image_size']})" + (
                  f"; the step of {pipeline['step_name']} consumes "
                  f"{pipeline['step_consumes']:.0f}: {pipeline['headroom']:.2f}x"
                  if "headroom" in pipeline else "")]
  training = report.get("training", {})
  if "results" in training:
    lines += ["", "## Training on generated data", ""]
    for r in training["results"]:
      if "first_loss" in r:
        lines.append(f"- {r['name']}: mean loss of the first / last {r['window']} of "
                     f"{r['steps']} steps {r['first_loss']:.3f} -> {r['last_loss']:.3f} "
                     f"({'fell' if r['fell'] else 'did not fall'})")
      else:
        lines.append(f"- {r['name']}: {r.get('error') or r.get('skipped')}")
  memory = report.get("memory", {})
  if "device" in memory:
    peak = memory.get("peak_bytes_in_use")
    lines += ["", "## Memory", "", "Peak device memory of the process: " + (
        "n/a" if peak is None else f"{peak / 2**30:.2f} GiB")]
  sweep = report.get("sweep", {})
  if sweep.get("runs"):
    lines += ["", "## Six-run v2 sweep estimate", "", "| run | batch | steps | ms/step | hours |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['batch']} | {r['steps']} | {r['step_ms']:.1f} | "
              f"{r['hours']:.3f} |" for r in sweep["runs"]]
    if sweep["hours"] is not None:
      lines.append(f"| total | | | | {sweep['hours']:.2f} |")
    lines.append(f"\n{sweep['note']}.")
  errors = [f"{name}: {report[name]['error']}" for name in SECTIONS
            if isinstance(report.get(name), dict) and "error" in report[name]]
  if errors:
    lines += ["", "## Errors", ""] + [f"- {e}" for e in errors]
  return "\n".join(lines) + "\n"


def write(report: dict, out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  out.mkdir(parents=True, exist_ok=True)
  json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
  json_path.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
  md_path.write_text(markdown(report))
  return json_path, md_path


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def compile_cheaply(cache_dir: str) -> None:
  """For the dry run (a test): compile each program once, and quickly; call before JAX starts.

  In the dry run every size shrinks to the same tiny model, so the six v2 steps are two
  programs: a throw-away persistent cache compiles each once. And since the dry run's
  timings mean nothing, LLVM runs at -O0, which halves XLA:CPU's compile time (the
  programs compute the same values; only their machine code is slower). Not used in the
  real run, whose models differ and whose compile and step times are reported.
  """
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def parse_sections(text: str) -> tuple[str, ...]:
  chosen = tuple(s.strip() for s in text.split(",") if s.strip()) if text else SECTIONS
  unknown = [s for s in chosen if s not in SECTIONS]
  if unknown:
    raise UserError(f"--only: {', '.join(unknown)} not among the sections "
                    f"{', '.join(SECTIONS)}.")
  return chosen


def _define_flags():
  return dict(
      dry_run=flags.DEFINE_bool("dry_run", False, "Run on the CPU with tiny sizes (a test)."),
      out=flags.DEFINE_string("out", "benchmarks", "Where gpu_check.json and .md are written."),
      only=flags.DEFINE_string("only", "", f"Comma-separated sections (default all): "
                               f"{','.join(SECTIONS)}."),
      train_steps=flags.DEFINE_integer("train_steps", None,
                                       "Training steps (default 300; dry run 20)."),
      max_batch=flags.DEFINE_integer("max_batch", None, "Largest batch tried when doubling "
                                     "(default 8192; dry run 16)."),
      budget_s=flags.DEFINE_float("budget_s", 480.0, "After this many seconds the optional "
                                  "measurements (larger batches, second training run) are "
                                  "skipped."))


def main(argv, flag_values):
  del argv
  value = lambda name: flag_values[name].value
  try:
    selected = parse_sections(value("only"))
    for name in ("train_steps", "max_batch"):
      if value(name) is not None and value(name) < 2:
        raise UserError(f"--{name} must be at least 2, got {value(name)}.")
    if value("budget_s") <= 0:
      raise UserError(f"--budget_s must be positive, got {value('budget_s')}.")
    plan = Plan.make(value("dry_run"), value("train_steps"), value("max_batch"))
    if not plan.dry_run and jax.default_backend() == "cpu":
      raise UserError("No GPU here (JAX's backend is 'cpu'): the full check needs one; run "
                      "with --dry_run to exercise it on the CPU with tiny sizes.")
    with contextlib.ExitStack() as cleanup:
      if plan.dry_run:
        compile_cheaply(cleanup.enter_context(
            tempfile.TemporaryDirectory(prefix="gpu_check_xla_cache_")))
      report = run_check(plan, selected, value("budget_s"))
    json_path, md_path = write(report, pathlib.Path(value("out")))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  log(f"wrote {json_path} and {md_path}")
  print(md_path.read_text())


if __name__ == "__main__":
  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS))
