r"""Everything only a GPU can tell, in one call of at most 8 minutes on one H100 / H200.

  ./launch.sh gpu_check [--dry_run] [--out DIR] [--only agreement,step_time,...] [--budget_s S]
      [--archs vit,diffvit] [--gpus_per_run 1] [--seeds 3]

Writes <out>/gpu_check.json and <out>/gpu_check.md (default out: benchmarks/) after every
section, so a run stopped at any point leaves what it finished. Sections, by priority:

  agreement      every attention path of every registered arch, in the config's dtype, against
                 a float32 einsum reference at matmul precision 'highest' (logits, gradients)
  pipeline       the v2 input pipeline with the workers a sweep run gets, on the built
                 array_record data if there is one, else generated JPEGs (goal: 1.5x what the
                 step takes)
  step_time      the train step of the sweep's archs (--archs) at every size as the sweep runs
                 it (the config's dtype, microbatches and attention path, --gpus_per_run
                 devices), with its precision and memory plan
  diffvit_forms  each differential arch's step time on every path but einsum, against 'xla'
  training       a few hundred steps per arch on a learnable generated task: the loss falls
  largest_batch  the batch doubled until it needs microbatches, is out of memory or at the cap
  memory         the device's peak memory beside each config's memory plan
  sweep          the v2 sweep's device-hours from the measured step times, for --seeds seeds

Each measurement first compares its estimated cost (builds and steps, at the rates measured so
far) with what is left of `--budget_s`, and is recorded as skipped, with both, if it does not
fit. `--dry_run`: the same on the CPU with tiny models (the test suite runs it). Compiled
programs persist in <out>/xla_cache, so a second check skips most compiling. No TensorFlow.
"""

from diffvit_jax import cpu_runtime

if __name__ == "__main__":
  cpu_runtime.apply_cpu_defaults()  # Before jax initialises its backends.

import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402

from diffvit_jax import compilation_cache, config_lib, files  # noqa: E402
from diffvit_jax.errors import ConfigError, UserError  # noqa: E402
from diffvit_jax.models import attention_impl, registry, stats  # noqa: E402
from diffvit_jax.reporting import tables  # noqa: E402
from diffvit_jax.tools import gpu_measure  # noqa: E402
from diffvit_jax.training import optim  # noqa: E402

SECTIONS = ("agreement", "pipeline", "step_time", "diffvit_forms", "training", "largest_batch",
            "memory", "sweep")
PATHS = tuple(impl for impl in attention_impl.IMPLS if impl != "auto")
SIZES = tuple(config_lib.MODEL_SIZES)
BASELINE = registry.BASELINE_ARCH
AGREEMENT_DEPTH, AGREEMENT_BATCH = 2, 8  # fewer blocks than the config's: faster compiles
DEFAULT_BUDGET_S = 420.0  # with start-up and one estimate's error: within 8 minutes
SWEEP_ARCHS, SWEEP_SEEDS = ("vit", "diffvit"), 3  # tools/sweep.py's defaults

# Relative L2 error against the float32 reference. bfloat16 keeps 8 significant bits; through
# the blocks a correct path lands near 1% on logits and a few % on gradients, while a wrong
# mask, scale or head layout gives errors of order 100%.
TOLERANCES = {"logits": 0.05, "param_grads": 0.10, "input_grads": 0.10}
GOAL_MFU = {"30m": 0.45, "10m": 0.30}
GOAL_STEP_RATIO = 1.10  # for the kinds with the baseline's FLOPs (within MATCHED_FLOPS)
MATCHED_FLOPS = 0.05
GOAL_PIPELINE_HEADROOM = 1.5
# First guesses for the pipeline's cost (it compiles nothing): start-up, per JPEG written,
# per image augmented on one worker.
PIPELINE_GUESS_S = (5.0, 1e-3, 5e-3)


@dataclasses.dataclass(frozen=True)
class Scale:
  """How much is measured: the real check, or the dry run's tiny stand-in on the CPU."""

  dry_run: bool
  overrides: dict  # dotted config fields set in every config
  protocols: tuple[str, ...]  # step_time: v2 at every size, any other at the smallest
  timed_steps: int  # per window; the step time is the median of `repeats` windows
  repeats: int
  train_steps: int
  train_batch: int
  train_archs: tuple[str, ...]
  max_batch: int  # where the largest-batch search stops
  pipeline_images: int  # generated JPEGs
  compile_s_per_block: float  # first guesses of the rates, until a build is measured
  step_s_per_tflop: float


FULL = Scale(False, {}, protocols=("v2", "seed"), timed_steps=10, repeats=3, train_steps=300,
             train_batch=128, train_archs=tuple(registry.ARCHS), max_batch=8192,
             pipeline_images=2000, compile_s_per_block=3.0, step_s_per_tflop=1 / 200)
DRY_RUN = Scale(True, {"model.width": 32, "model.depth": 1, "model.num_heads": 4,
                       "model.mlp_dim": 64, "data.image_size": 32, "train.batch_size": 8},
                protocols=("v2",), timed_steps=2, repeats=1, train_steps=20, train_batch=16,
                train_archs=(BASELINE,), max_batch=16, pipeline_images=64,
                compile_s_per_block=3.0, step_s_per_tflop=200.0)


def log(message: str) -> None:
  print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


@functools.cache
def gflops(model_json: str, image_size: int) -> float:
  return stats.gflops_per_image(ml_collections.ConfigDict(json.loads(model_json)), image_size)


def config_gflops(config) -> float:
  return gflops(config.model.to_json(), config.data.image_size)


def cannot_run(model_config, impl: str, image_size: int) -> str | None:
  """Why attention path `impl` cannot train `model_config` here (attention_impl's rules).

  `image_size` gives the token count, which the training rules read (JAX's cuDNN backward
  needs an even one).
  """
  path = model_config.copy_and_resolve_references()
  path.attention_impl = impl
  try:
    attention_impl.resolve(path, tokens=stats.num_tokens(path, image_size))
  except ConfigError as e:
    return str(e).split(". Use attention_impl=")[0]  # the rule, without the advice after it
  return None


class Check:
  """The report as it grows (written after every section), the deadline and the cost rates."""

  def __init__(self, scale: Scale, selected: tuple[str, ...], budget_s: float,
               out: pathlib.Path, archs: tuple[str, ...] = SWEEP_ARCHS, gpus_per_run: int = 1,
               seeds: int = SWEEP_SEEDS):
    self.scale, self.out = scale, out
    self.archs, self.seeds = archs, seeds
    if gpus_per_run > jax.device_count():
      raise UserError(f"--gpus_per_run={gpus_per_run} but only {jax.device_count()} device(s) "
                      "are visible.")
    self.devices = jax.devices()[:gpus_per_run]  # one sweep run's slot
    self.cache = compilation_cache.Counter()
    self.start = time.perf_counter()
    self.deadline = self.start + budget_s
    self.compile_s_per_block = scale.compile_s_per_block
    self.step_s_per_tflop = scale.step_s_per_tflop
    device = jax.devices()[0]
    self.report = dict(meta=dict(
        dry_run=scale.dry_run, platform=device.platform, device_kind=device.device_kind,
        num_devices=jax.device_count(), gpus_per_run=gpus_per_run, archs=list(archs),
        seeds=seeds, jax_version=jax.__version__, cpu_count=os.cpu_count(),
        budget_s=budget_s, elapsed_s=0.0))
    for name in SECTIONS:
      self.report[name] = (dict(status="pending") if name in selected else
                           dict(status="skipped", reason="not selected (--only)"))
    out.mkdir(parents=True, exist_ok=True)
    self.write()

  def results(self, section: str) -> list[dict]:
    return self.report[section].get("results", [])

  def config(self, name: str, overrides: dict | None = None):
    return gpu_measure.sweep_config(name, {**self.scale.overrides, **(overrides or {})})

  def estimate(self, config, steps: int = 0) -> float:
    """Seconds for one build of `config` and `steps` of its train step, at the rates so far."""
    tflop = config.train.batch_size * config_gflops(config) / 1e3
    return config.model.depth * self.compile_s_per_block + steps * tflop * self.step_s_per_tflop

  def learn(self, config, record: dict) -> None:
    """The rates of a timed step (`setup_s`, `step_ms`) become those of the next estimates."""
    self.compile_s_per_block = record["setup_s"] / config.model.depth
    tflop = config.train.batch_size * config_gflops(config) / 1e3
    self.step_s_per_tflop = record["step_ms"] / 1e3 / tflop

  def attempt(self, label: str, estimate_s: float, fn):
    """(fn(), note of its estimate and seconds) if it fits in the budget and runs, else
    (None, note saying why it was skipped or how it failed)."""
    note = dict(estimate_s=estimate_s)
    left = self.deadline - time.perf_counter()
    if estimate_s > left:
      note["skipped"] = f"needs ~{estimate_s:.0f} s, {max(left, 0):.0f} s of --budget_s left"
      log(f"{label}: skipped, {note['skipped']}")
      return None, note
    start = time.perf_counter()
    try:
      value = fn()
    except Exception as e:  # noqa: BLE001 - recorded per measurement, the check goes on
      note.update(error=gpu_measure.error_text(e),
                  out_of_memory=gpu_measure.is_out_of_memory(e))
      log(f"{label}: {note['error']}")
      return None, note
    finally:
      gc.collect()  # the trainer's device buffers, before the next build
    note["seconds"] = time.perf_counter() - start
    return value, note

  def measure(self, label: str, estimate_s: float, fn, **fields) -> dict:
    """`fields` with fn()'s record, or with why it did not run."""
    record, note = self.attempt(label, estimate_s, fn)
    if record is not None:
      shown = [f"{k} {record[k]:.3g}" for k in LOGGED if isinstance(record.get(k), float)]
      log(f"{label}: {', '.join(shown)} ({note['seconds']:.0f} s)")
    return dict(fields, **(record or {}), **note)

  def section(self, name: str, run) -> None:
    """Runs section `name` if it is pending, records how it went, and writes the report."""
    entry = self.report[name]
    if entry["status"] != "pending":
      return
    start = time.perf_counter()
    try:
      entry.update(run(self))
    except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
      entry["error"] = gpu_measure.error_text(e)
      traceback.print_exc(file=sys.stderr)
    results = entry.get("results", [])
    skipped = bool(results) and all("skipped" in r for r in results)
    entry.update(status="error" if "error" in entry else "skipped" if skipped else "done",
                 seconds=time.perf_counter() - start,
                 estimate_s=sum(r.get("estimate_s", 0.0) for r in results))
    if skipped:
      entry["reason"] = results[0]["skipped"]
    log(f"{name}: {entry['status']} in {entry['seconds']:.0f} s")
    self.write()

  def write(self) -> None:
    """gpu_check.json and .md, each written whole to a temporary file and then renamed."""
    self.report["meta"]["elapsed_s"] = time.perf_counter() - self.start
    self.report["meta"]["compilation_cache"] = self.cache.summary()
    self.report["goals"] = goals(self.report)
    texts = {"gpu_check.json": json.dumps(self.report, indent=1, default=str) + "\n",
             "gpu_check.md": markdown(self.report)}
    for name, text in texts.items():
      files.write_text(str(self.out / name), text)


LOGGED = ("step_ms", "images_per_sec", "mfu", "logits_rel_err", "param_grads_rel_err",
          "input_grads_rel_err", "first_loss", "last_loss")


# The sections: each returns its entry of the report, its measurements under 'results'.


def agreement(check: Check) -> dict:
  rows = []
  for arch in registry.ARCHS:
    config = check.config(f"{arch}_{SIZES[0]},v2")
    model = config.model
    model.depth = min(model.depth, AGREEMENT_DEPTH)
    reference_config = model.copy_and_resolve_references()
    reference_config.dtype = "float32"

    def reference_outputs(reference_config=reference_config, image_size=config.data.image_size):
      inputs = gpu_measure.agreement_inputs(reference_config, image_size, AGREEMENT_BATCH)
      with jax.default_matmul_precision("highest"):
        return inputs, gpu_measure.logits_and_grads(reference_config, "einsum", *inputs)

    reference, note = check.attempt(f"agreement {arch} reference", check.estimate(config),
                                    reference_outputs)
    for impl in PATHS:
      fields = dict(arch=arch, path=impl, dtype=model.dtype)
      why = cannot_run(model, impl, config.data.image_size)
      if reference is None or why:
        rows.append(dict(fields, **(dict(skipped=why) if why else note)))
        continue
      rows.append(check.measure(f"agreement {arch} {impl}", check.estimate(config),
                                lambda model=model, impl=impl, reference=reference: compare(
                                    model, impl, *reference), **fields))
  ran = [r for r in rows if "within_tolerance" in r]
  return dict(reference="einsum, float32, matmul precision 'highest'", tolerances=TOLERANCES,
              batch=AGREEMENT_BATCH, depth=AGREEMENT_DEPTH, results=rows,
              passed=bool(ran) and all(r["within_tolerance"] for r in ran))


def compare(model_config, impl: str, inputs, reference) -> dict:
  outputs = gpu_measure.logits_and_grads(model_config, impl, *inputs)
  record = {f"{name}_rel_err": gpu_measure.relative_error(value, ref)
            for name, value, ref in zip(TOLERANCES, outputs, reference, strict=True)}
  record["within_tolerance"] = all(record[f"{name}_rel_err"] <= tolerance
                                   for name, tolerance in TOLERANCES.items())
  record["reference_norms"] = [gpu_measure.l2_norm(ref) for ref in reference]
  return record


def time_config(check: Check, name: str, overrides: dict | None = None) -> dict:
  """The step time of configs/tiny_imagenet.py:<name>, if it fits in the budget."""
  config = check.config(name, overrides)
  scale = check.scale
  steps = 1 + scale.timed_steps * scale.repeats
  label = " ".join([f"step {name}"] + [f"{k}={v}" for k, v in (overrides or {}).items()])
  timed = lambda: gpu_measure.time_train_step(config, scale.timed_steps, scale.repeats,
                                              check.devices)
  record = check.measure(label, check.estimate(config, steps), timed, name=name,
                         protocol=name.partition(",")[2])
  if "step_ms" in record:
    check.learn(config, record)
  return record


def step_time(check: Check) -> dict:
  sizes = [*GOAL_MFU, *(size for size in SIZES if size not in GOAL_MFU)]  # goals' first
  names = [f"{arch}_{size},v2" for size in sizes for arch in check.archs]
  names += [f"{arch}_{SIZES[0]},{protocol}" for protocol in check.scale.protocols
            if protocol != "v2" for arch in check.archs]
  results = [time_config(check, name) for name in names]
  by_name = {r["name"]: r for r in results}
  for record in results:
    arch, _, rest = record["name"].partition("_")
    baseline = by_name.get(f"{BASELINE}_{rest}", {})
    if arch != BASELINE and "step_ms" in record and "step_ms" in baseline:
      record["vs_baseline"] = record["step_ms"] / baseline["step_ms"]
  return dict(results=results)


def pipeline(check: Check) -> dict:
  scale = check.scale
  train = {k: v for k, v in scale.overrides.items() if k.startswith("train.")}
  config = gpu_measure.sweep_config(f"{BASELINE}_{SIZES[0]},v2", train)  # its own image size
  workers = sweep_run_workers(config, check)
  start_s, per_jpeg_s, per_image_s = PIPELINE_GUESS_S
  batches = gpu_measure.pipeline_warmup(workers) + scale.timed_steps * scale.repeats
  images = batches * config.train.batch_size
  estimate = start_s + per_jpeg_s * scale.pipeline_images + per_image_s * images / max(workers, 1)
  with tempfile.TemporaryDirectory(prefix="gpu_check_images_") as root:
    record = check.measure("pipeline", estimate, lambda: gpu_measure.time_pipeline(
        config, pathlib.Path(root), scale.pipeline_images, workers, scale.timed_steps,
        scale.repeats))
  return dict(results=[record])  # against the step's images/s in `goals`


def sweep_run_workers(config, check: Check) -> int:
  """The config's data.num_workers as one sweep run on this host resolves it: 'auto' shares
  the cores among the runs the sweep trains at once (one per --gpus_per_run devices)."""
  from diffvit_jax.data import input_pipeline

  concurrent = max(1, jax.device_count() // len(check.devices))
  return input_pipeline.num_workers(config.data, concurrent)


def diffvit_forms(check: Check) -> dict:
  """The step time of each path but einsum (the plain reference) against 'xla', per kind."""
  steps = {r["name"]: r for r in check.results("step_time")}
  agreed = {(r["arch"], r["path"]): r.get("within_tolerance")
            for r in check.results("agreement")}
  rows = []
  for arch, kind in registry.ARCHS.items():
    if not kind.differential or arch not in check.archs:
      continue
    name, forms = f"{arch}_{SIZES[0]},v2", {}
    model = check.config(name).model
    for impl in (p for p in PATHS if p != "einsum"):
      fields = dict(arch=arch, path=impl, agreement=agreed.get((arch, impl)))
      measured = steps.get(name, {})
      if measured.get("attention") == impl and "step_ms" in measured:
        forms[impl] = dict(fields, step_ms=measured["step_ms"], from_section="step_time")
      elif why := cannot_run(model, impl, check.config(name).data.image_size):
        forms[impl] = dict(fields, skipped=why)
      else:
        forms[impl] = dict(time_config(check, name, {"model.attention_impl": impl}), **fields)
    for row in forms.values():
      if "step_ms" in row and "step_ms" in forms.get("xla", {}):
        row["vs_xla"] = row["step_ms"] / forms["xla"]["step_ms"]
    rows += forms.values()
  return dict(results=rows)


def training(check: Check) -> dict:
  results, steps = [], check.scale.train_steps
  for arch in (a for a in check.scale.train_archs if a in check.archs):
    name = f"{arch}_{SIZES[0]},v2"
    config = check.config(name, {"train.batch_size": check.scale.train_batch})
    train = lambda config=config: gpu_measure.train_on_learnable(config, steps,
                                                                 devices=check.devices)
    results.append(check.measure(f"training {name}", check.estimate(config, steps), train,
                                 name=name))
  return dict(results=results)


def largest_batch(check: Check) -> dict:
  steps = {r["name"]: r for r in check.results("step_time")}
  names = ([f"{BASELINE}_{SIZES[0]},v2"] if check.scale.dry_run else
           [f"{arch}_{SIZES[-1]},v2" for arch in check.archs])
  return dict(results=[search_batch(check, steps.get(name, {}), name) for name in names])


def search_batch(check: Check, start: dict, name: str) -> dict:
  """Doubles the batch of `start` (a step_time record) while it fits in one microbatch."""
  if "step_ms" not in start:
    return dict(name=name, skipped="its step time at the config's batch was not measured")
  if start["memory_plan"]["microbatches"] > 1:
    return dict(name=name, stopped="the config's batch needs "
                f"{start['memory_plan']['microbatches']} microbatches")
  keys = ("batch", "step_ms", "images_per_sec", "mfu")
  largest, trials, stopped = {k: start[k] for k in keys}, [], None
  while stopped is None:
    batch = largest["batch"] * 2
    if batch > check.scale.max_batch:
      stopped = f"cap {check.scale.max_batch}"
      break
    # One microbatch: a memory plan that needs more is a ConfigError, the search's end.
    trials.append(time_config(check, name, {"train.batch_size": batch,
                                            "train.microbatches": "1"}))
    trial = trials[-1]
    if "step_ms" in trial:
      largest = {k: trial[k] for k in keys}
    else:
      error = trial.get("error", "time budget spent").split(". ")[0]  # in full in `trials`
      stopped = "out of memory" if trial.get("out_of_memory") else error
  if trials and all("skipped" in t for t in trials):
    return dict(name=name, skipped=trials[0]["skipped"], estimate_s=trials[0]["estimate_s"])
  return dict(name=name, **largest, stopped=stopped,
              estimate_s=sum(t.get("estimate_s", 0.0) for t in trials), trials=trials)


def memory(check: Check) -> dict:
  rows = [dict(name=r["name"], **r["memory_plan"]) for r in check.results("step_time")
          if "memory_plan" in r]
  return dict(gpu_measure.device_memory(), results=rows, deviceless=deviceless(check, rows))


def deviceless(check: Check, rows: list[dict]) -> dict:
  """The first planned config compiled again without the GPU, for the target description of
  this GPU (diffvit_jax/targets/, as the GPU rehearsal compiles it), at the same
  microbatches: how far the deviceless plan is from the device's own. The dry run compares
  XLA:CPU's plan with the H100's."""
  from diffvit_jax import targets
  from diffvit_jax.tools import gpu_rehearsal

  if not rows:
    return dict(skipped="no step was planned")
  kind = check.report["meta"]["device_kind"]
  target = next((n for n in targets.NAMES if targets.load(n).device_kind == kind),
                "h100" if check.scale.dry_run else None)
  if target is None:
    return dict(skipped=f"no target description in diffvit_jax/targets/ is a {kind!r}")
  row = rows[0]
  overrides = (*check.scale.overrides.items(), ("train.microbatches", str(row["microbatches"])))
  case = gpu_rehearsal.Case(row["name"], target, tuple(overrides))
  plan, note = check.attempt(f"deviceless {row['name']} for {target}",
                             check.estimate(check.config(row["name"])),
                             lambda: gpu_rehearsal.compile_case(case)[1].memory_plan)
  if plan is None:
    return dict(name=row["name"], target=target, **note)
  return dict(name=row["name"], target=target, microbatches=row["microbatches"],
              device_bytes_per_device=row["bytes_per_device"],
              deviceless_bytes_per_device=plan.bytes_per_device,
              ratio=plan.bytes_per_device / row["bytes_per_device"],
              device_breakdown=row["breakdown"], deviceless_breakdown=plan.breakdown, **note)


def sweep(check: Check) -> dict:
  """Device-hours of the v2 sweep's runs whose step was timed, each at every seed."""
  runs = []
  for record in check.results("step_time"):
    if record["protocol"] == "v2" and "step_ms" in record:
      train = gpu_measure.sweep_config(record["name"], {}).train
      train.batch_size = record["batch"]
      steps = optim.derive_recipe(train, gpu_measure.TRAIN_EXAMPLES).total_steps
      hours = steps * record["step_ms"] / 3.6e6 * len(check.devices)
      runs.append(dict(name=record["name"], batch=record["batch"], steps=steps,
                       step_ms=record["step_ms"], seeds=check.seeds, hours=hours * check.seeds))
  planned = [f"{arch}_{size},v2" for size in SIZES for arch in check.archs]
  missing = [name for name in planned if name not in {r["name"] for r in runs}]
  return dict(results=runs, complete=not missing, missing=missing,
              hours=sum(r["hours"] for r in runs) if runs else None,
              note=f"{check.seeds} seed(s) per run on {len(check.devices)} device(s) each; "
                   "train steps only (no evaluation, checkpoints or compilation)"
                   + (f"; not timed, so not counted: {', '.join(missing)}" if missing else ""))


RUN = dict(agreement=agreement, step_time=step_time, pipeline=pipeline,
           diffvit_forms=diffvit_forms, training=training, largest_batch=largest_batch,
           memory=memory, sweep=sweep)


# Goals and the Markdown.


@functools.cache
def matched_flops(arch: str, size: str) -> bool:
  """Whether `arch` costs the baseline's FLOPs per image at `size` (v2), within MATCHED_FLOPS."""
  ours, base = (gpu_measure.sweep_config(f"{a}_{size},v2", {}) for a in (arch, BASELINE))
  return abs(config_gflops(ours) / config_gflops(base) - 1) <= MATCHED_FLOPS


def goals(report: dict) -> list[dict]:
  steps = {r["name"]: r for r in report["step_time"].get("results", [])}
  rows = []

  def add(goal, target, value, met, shown):
    rows.append(dict(goal=goal, target=target, measured=value,
                     shown="n/a" if value is None else shown(value),
                     status="n/a" if value is None else "met" if met(value) else "missed"))

  archs = report.get("meta", {}).get("archs", list(registry.ARCHS))
  for size, floor in GOAL_MFU.items():
    for arch in archs:
      add(f"{arch}_{size},v2 MFU", f">= {floor:.0%}", steps.get(f"{arch}_{size},v2", {}).get(
          "mfu"), lambda v, floor=floor: v >= floor, _pct)
  for size in SIZES:
    for arch in archs:
      if arch != BASELINE and matched_flops(arch, size):
        add(f"{registry.label(arch)}/{registry.label(BASELINE)} step time {size} v2",
            f"<= {GOAL_STEP_RATIO:.2f}", steps.get(f"{arch}_{size},v2", {}).get("vs_baseline"),
            lambda v: v <= GOAL_STEP_RATIO, "{:.3f}".format)
  supplied = (report["pipeline"].get("results") or [{}])[0].get("images_per_sec")
  consumed = max((r["images_per_sec"] for r in steps.values()
                  if r.get("protocol") == "v2" and "images_per_sec" in r), default=None)
  headroom = supplied / consumed if supplied and consumed else None
  add("pipeline / fastest v2 step images/s", f">= {GOAL_PIPELINE_HEADROOM:.1f}x", headroom,
      lambda v: v >= GOAL_PIPELINE_HEADROOM, "{:.2f}x".format)
  return rows


def _pct(value) -> str:
  return "-" if value is None else f"{100 * value:.1f}%"


def _gib(value) -> str:
  return "-" if value is None else f"{value / 2**30:.2f}"


def _cell(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, float):
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
  return str(value)


# Per section: how many columns name a row, then {header: field, or a function of the row}.
COLUMNS = {
    "agreement": (2, {"arch": "arch", "path": "path", "dtype": "dtype",
                      "logits": "logits_rel_err", "param grads": "param_grads_rel_err",
                      "input grads": "input_grads_rel_err",
                      "within tolerance": "within_tolerance"}),
    "step_time": (1, {"config": "name", "attention": "attention", "dtype": "dtype",
                      "batch": "batch",
                      "microbatches": lambda r: r.get("memory_plan", {}).get("microbatches"),
                      "ms/step": "step_ms", "images/s": "images_per_sec",
                      "MFU": lambda r: _pct(r.get("mfu")),
                      f"vs {registry.label(BASELINE)}": "vs_baseline"}),
    "pipeline": (1, {"source": "source", "workers": "num_workers",
                     "warm-up batches": "warmup_batches", "batch": "batch",
                     "images/s": "images_per_sec", "image size": "image_size",
                     "RandAugment": "randaugment"}),
    "diffvit_forms": (2, {"arch": "arch", "path": "path", "ms/step": "step_ms",
                          "vs xla": "vs_xla", "agrees (above)": "agreement"}),
    "training": (1, {"config": "name", "steps": "steps", "first loss": "first_loss",
                     "last loss": "last_loss", "fell": "fell"}),
    "largest_batch": (1, {"config": "name", "largest batch": "batch", "ms/step": "step_ms",
                          "images/s": "images_per_sec", "MFU": lambda r: _pct(r.get("mfu")),
                          "stopped": "stopped"}),
    "memory": (1, {"config": "name", "GiB per device": lambda r: _gib(r["bytes_per_device"]),
                   "device GiB": lambda r: _gib(r["device_bytes"]),
                   "microbatches": "microbatches", "remat": "remat", "fits": "fits"}),
    "sweep": (1, {"run": "name", "batch": "batch", "steps": "steps", "ms/step": "step_ms",
                  "seeds": "seeds", "hours": "hours"}),
}
TITLES = dict(
    agreement="Agreement: each path against float32 einsum (relative L2 error)",
    step_time="Train step as the sweep runs it", pipeline="Input pipeline (v2)",
    diffvit_forms="Differential attention: step time per path (10m v2)",
    training="Training on generated data", largest_batch="Largest batch in one microbatch",
    memory="Memory plans", sweep="v2 sweep estimate")


def section_markdown(name: str, entry: dict) -> str:
  status = entry["status"]
  if status == "done":
    status += f" in {entry['seconds']:.0f} s (estimated {entry['estimate_s']:.0f} s)"
  elif status != "pending":
    status += f": {entry.get('reason') or entry.get('error')}"
  parts = [f"## {TITLES[name]}", status]
  named, columns = COLUMNS[name]
  rows = []
  for record in entry.get("results", []):
    cells = [_cell(field(record) if callable(field) else record.get(field))
             for field in columns.values()]
    why = record.get("skipped") or record.get("error")
    if why and "step_ms" not in record and "within_tolerance" not in record:
      kind = "skipped" if "skipped" in record else "error"
      cells = cells[:named] + [f"{kind}: {why}"] + [""] * (len(columns) - named - 1)
    rows.append(cells)
  if rows:
    parts.append(tables.markdown_table(list(columns), rows))
  if name == "memory" and "device" in entry:
    parts.append(f"Peak device memory of the process: {_gib(entry['peak_bytes_in_use'])} GiB.")
    compared = entry.get("deviceless", {})
    if "ratio" in compared:
      parts.append(
          f"{compared['name']} compiled without the GPU for target {compared['target']} (the "
          f"GPU rehearsal's compile) at {compared['microbatches']} microbatch(es): "
          f"{_gib(compared['deviceless_bytes_per_device'])} GiB per device against "
          f"{_gib(compared['device_bytes_per_device'])} GiB compiled here "
          f"(ratio {compared['ratio']:.2f}).")
  if name == "sweep" and entry.get("hours") is not None:
    parts.append(f"Total: {entry['hours']:.2f} device-hours ({entry['note']}).")
  return "\n\n".join(parts)


def markdown(report: dict) -> str:
  meta = report["meta"]
  goals_table = tables.markdown_table(["goal", "target", "measured", "status"], [
      [g["goal"], g["target"], g["shown"], g["status"]] for g in report["goals"]])
  head = (f"# GPU check: {meta['device_kind']} x{meta['num_devices']}"
          + (" (dry run on the CPU: tiny models, not real numbers)" if meta["dry_run"] else ""))
  lines = [head, f"jax {meta['jax_version']}; {meta['elapsed_s']:.0f} s of a "
           f"{meta['budget_s']:.0f} s budget.", "## Goals", goals_table]
  lines += [section_markdown(name, report[name]) for name in SECTIONS]
  return "\n\n".join(lines) + "\n"


# The command line.


def compile_cheaply() -> None:
  """Dry run only, before JAX starts: LLVM at -O0 (its timings mean nothing), and every
  program cached (every size shrinks to the same tiny model, compiled once)."""
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def parse_sections(text: str) -> tuple[str, ...]:
  chosen = tuple(s.strip() for s in text.split(",") if s.strip()) if text else SECTIONS
  unknown = [s for s in chosen if s not in SECTIONS]
  if unknown:
    raise UserError(f"--only: {', '.join(unknown)} not among the sections "
                    f"{', '.join(SECTIONS)}.")
  return chosen


def run_check(scale: Scale, selected: tuple[str, ...], budget_s: float,
              out: pathlib.Path, **sweep) -> Check:
  """`sweep`: Check's archs, gpus_per_run and seeds (the sweep's defaults if not given)."""
  check = Check(scale, selected, budget_s, out, **sweep)
  meta = check.report["meta"]
  log(f"{meta['device_kind']} x{meta['num_devices']} ({meta['platform']}), "
      f"{'dry run' if scale.dry_run else 'full run'}, budget {budget_s:.0f} s, archs "
      f"{','.join(check.archs)}, {len(check.devices)} device(s) per run, compilation cache "
      f"{compilation_cache.directory()}")
  for name in SECTIONS:
    check.section(name, RUN[name])
  log(f"compilation cache: {check.cache.describe()}")
  return check


def _define_flags():
  return dict(
      dry_run=flags.DEFINE_bool("dry_run", False, "Run on the CPU with tiny sizes (a test)."),
      out=flags.DEFINE_string("out", "benchmarks", "Where gpu_check.json and .md are written."),
      only=flags.DEFINE_string("only", "", f"Comma-separated sections (default all): "
                               f"{','.join(SECTIONS)}."),
      budget_s=flags.DEFINE_float("budget_s", DEFAULT_BUDGET_S, "Seconds the measurements may "
                                  "take; one that would not fit is skipped and recorded."),
      archs=flags.DEFINE_string("archs", ",".join(SWEEP_ARCHS), "The sweep's architectures "
                                f"(comma-separated, of {','.join(registry.ARCHS)})."),
      gpus_per_run=flags.DEFINE_integer("gpus_per_run", 1, "Devices of one sweep run (its "
                                        "--gpus_per_run): the mesh every step is timed on."),
      seeds=flags.DEFINE_integer("seeds", SWEEP_SEEDS, "Seeds per run, for the sweep's hours."))


def main(argv, flag_values):
  del argv
  value = lambda name: flag_values[name].value
  try:
    selected = parse_sections(value("only"))
    if value("budget_s") <= 0:
      raise UserError(f"--budget_s must be positive, got {value('budget_s')}.")
    scale = DRY_RUN if value("dry_run") else FULL
    archs = tuple(a.strip() for a in value("archs").split(",") if a.strip())
    unknown = [a for a in archs if a not in registry.ARCHS]
    if not archs or unknown:
      raise UserError(f"--archs: {','.join(unknown) or 'none given'}; the architectures are "
                      f"{', '.join(registry.ARCHS)}.")
    if value("gpus_per_run") < 1 or value("seeds") < 1:
      raise UserError("--gpus_per_run and --seeds must be at least 1.")
    if not scale.dry_run and jax.default_backend() == "cpu":
      raise UserError("No GPU here (JAX's backend is 'cpu'): the full check needs one; run "
                      "with --dry_run to exercise it on the CPU with tiny sizes.")
    out = pathlib.Path(value("out"))
    compilation_cache.enable(str(out.resolve() / compilation_cache.SUBDIR))
    if scale.dry_run:
      compile_cheaply()
    check = run_check(scale, selected, value("budget_s"), out, archs=archs,
                      gpus_per_run=value("gpus_per_run"), seeds=value("seeds"))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  log(f"wrote {check.out / 'gpu_check.json'} and {check.out / 'gpu_check.md'}")
  print((check.out / "gpu_check.md").read_text())


if __name__ == "__main__":
  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS))
