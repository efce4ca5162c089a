r"""The sweep's plan of each distinct model: memory plan, steps, timed warm-up (GPU only).

  python -m diffvit_jax.tools.sweep_plan < spec.json     (what tools/sweep.py sends it)

`tools/sweep.py` runs this in a process of its own, on the devices of its first slot, so
that the sweep's own process never starts JAX (on a GPU it would hold memory the runs
need). The spec is a JSON list of {"key", "config", "overrides", "num_devices", "time", "target"}
(a GPU of diffvit_jax/targets/ to compile for instead of the slot's devices);
the last line printed is one JSON object: key -> {"plan", "microbatches", "total_steps",
"num_train", "step_s"} (step_s None off the GPU), or {"error": message} with exit code 2.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from diffvit_jax import cpu_runtime  # noqa: E402

if __name__ == "__main__":
  cpu_runtime.apply_cpu_defaults()  # Before JAX initialises its backends.

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from diffvit_jax.errors import UserError  # noqa: E402

# Training examples of a source whose data set is not built yet (a plan made before the data
# preparation, e.g. --dry_run on a fresh machine): the published split sizes.
KNOWN_TRAIN_EXAMPLES = {"tiny_imagenet": 100_000}
WARMUP_STEPS, TIMED_STEPS = 3, 10  # the first warm-up step compiles


def plan_one(item: dict) -> dict:
  """Memory plan, total steps and (on an accelerator) the measured step time of one model."""
  import jax

  from diffvit_jax.data import input_pipeline
  from diffvit_jax.tools import bench, describe, sweep
  from diffvit_jax.training import optim

  config = sweep.build_config(item["config"], item["overrides"])
  try:  # Before training, a missing data set is one error here, not one per run.
    num_train, source = input_pipeline.get_dataset_info(config.data).num_train, "data set"
  except UserError:
    if item["need_data"]:
      raise
    num_train = KNOWN_TRAIN_EXAMPLES.get(config.data.source)
    source = "published size; data set not built here"
  total_steps = None
  if config.train.steps or num_train:
    total_steps = optim.total_train_steps(config.train, num_train or 0)
  target = item.get("target", "")
  step_s = None
  if not target and item["time"] and jax.devices()[0].platform != "cpu":
    # One build, as the run's (this slot's devices): its plan is the one timed, and the
    # model compiles once here (the runs then find it in the compilation cache).
    start = time.perf_counter()
    trainer, batch = bench.build_train_step(config, config.train.batch_size)
    plan = trainer.memory_plan
    timed = bench.time_trainer(trainer, batch, config, TIMED_STEPS, WARMUP_STEPS, 1, start)
    step_s = timed["step_ms"] / 1e3
  else:
    plan = describe.memory_plan(config, item["num_devices"], target)
  step_source = "measured"
  if target:  # no GPU here to time: the step's FLOPs at the estimate's MFU
    step_s = describe.step_seconds(config, target, item["num_devices"])
    step_source = f"estimated for {target} at {describe.ESTIMATE_MFU:.0%} MFU"
  return dict(plan=plan.describe(), microbatches=plan.microbatches, total_steps=total_steps,
              num_train=num_train, num_train_source=source, step_s=step_s,
              step_source=step_source, batch=config.train.batch_size,
              num_workers=config.data.num_workers)


def main() -> int:
  try:
    spec = json.load(sys.stdin)
    out = {item["key"]: plan_one(item) for item in spec}
  except UserError as e:
    print(json.dumps({"error": str(e)}))
    return e.exit_code
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
