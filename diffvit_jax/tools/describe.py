r"""Print a model's parameter tree and its size, without allocating it; and its memory plan.

  python -m diffvit_jax.tools.describe --config configs/tiny_imagenet.py:diffvit_20m \
      [--config.model.depth=12 ...]
  python -m diffvit_jax.tools.describe --config configs/tiny_imagenet.py:diffvit_30m \
      --memory --num_devices 4 --target rtx4090   # 4x RTX 4090, compiled for it without one

Prints clu's parameter overview of the real tree (from `jax.eval_shape`) and,
as the last line, one JSON object (params, non_embedding_params, arch, tokens,
gflops_per_image, width, depth, heads, attention_heads, extra_params_vs_vit: what
the attention kind adds to the classic ViT of the same config) for scripts to parse.
`--memory` adds 'memory_plan' (training/memory.py): the train step compiled, not run,
for one device's share of the batch over `--num_devices`, on this machine's backend or, with
`--target`, for that GPU (and the run's time at 40% MFU).
"""

import json
import os
import sys

if __name__ == "__main__" and any(arg.startswith("--target") for arg in sys.argv[1:]):
  # Compiled for a GPU target on the CPU: before JAX starts its backends (the CUDA plugin's
  # start-up fails without a GPU, and JAX then refuses GPU topologies).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags
from clu import parameter_overview
from ml_collections import config_flags

from diffvit_jax import config_cli
from diffvit_jax.errors import ConfigError, UserError
from diffvit_jax.models import registry, stats

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (e.g. "
                                          "configs/tiny_imagenet.py:vit_10m).", lock_config=True)
_MEMORY = flags.DEFINE_bool("memory", False, "Also plan the train step's memory (compiles it).")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", 0, "Devices the global batch is split over for --memory (0: this machine's, "
    "or 1 with --target).")
_TARGET = flags.DEFINE_string(
    "target", "", "Plan --memory for this GPU (diffvit_jax/targets/: h100, a100, rtx4090), "
    "compiled for it without one.")


def describe(config) -> tuple[str, dict]:
  """(parameter overview table, summary dict) of `config.model` at `config.data.image_size`."""
  model, image_size = config.model, config.data.image_size
  shapes = stats.param_shapes(model, image_size)
  counts = stats.count_params(model, image_size)
  summary = dict(
      name=config.get("name", ""), arch=model.arch, params=counts["total"],
      non_embedding_params=counts["non_embedding"],
      tokens=stats.num_tokens(model, image_size), image_size=image_size,
      gflops_per_image=round(stats.gflops_per_image(model, image_size), 4),
      width=model.width, depth=model.depth, heads=model.num_heads,
      attention_heads=registry.attention_heads(model),
      mlp_dim=model.mlp_dim, patch_size=model.patch_size,
      extra_params_vs_vit=stats.extra_params_vs_baseline(model, image_size))
  overview = parameter_overview.get_parameter_overview(shapes, include_stats=False)
  return overview, summary


def memory_plan(config, num_devices: int = 0, target: str = ""):
  """The memory plan of one device running its share of the batch over `num_devices`.

  Compiled on one local device, or on `target`'s abstract GPU (targets/), at the per-device
  batch (a data-parallel step holds the same per device, up to its gradient all-reduce);
  total steps from `train.steps` or 10k.
  """
  import jax

  from diffvit_jax import targets
  from diffvit_jax.data import sharding
  from diffvit_jax.training import trainer as trainer_lib

  num_devices = num_devices or (1 if target else jax.device_count())
  batch = config.train.batch_size
  if batch % num_devices:
    raise ConfigError(f"config.train.batch_size={batch} is not divisible by --num_devices="
                      f"{num_devices}.")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.train.batch_size = batch // num_devices
  gpu = targets.load(target) if target else None
  mesh = sharding.make_mesh(targets.devices(target) if gpu else jax.local_devices()[:1])
  # Warmup in epochs needs a data set size; any stands in, the step's memory does not change.
  step = trainer_lib.compile_train_step(config, mesh, config.train.steps or 10_000,
                                        num_train_examples=100_000, target=gpu)
  return step.memory_plan


ESTIMATE_MFU = 0.4  # model FLOP utilisation assumed by the time estimates for a target GPU


def step_seconds(config, target: str, num_devices: int = 1) -> float | None:
  """A train step of `config` on `num_devices` of `target` at ESTIMATE_MFU (None: no peak)."""
  from diffvit_jax import targets

  peak = targets.load(target).peak_flops(config.model.dtype)
  flops = config.train.batch_size * stats.gflops_per_image(config.model, config.data.image_size)
  return None if not peak else flops * 1e9 / (peak * num_devices * ESTIMATE_MFU)


def time_estimate(config, target: str, num_devices: int) -> str:
  """One run of `config` on `num_devices` of `target`, in words (Tiny ImageNet's 100k)."""
  from diffvit_jax.training import optim

  step_s = step_seconds(config, target, num_devices)
  if step_s is None:
    return f"no peak FLOP/s known for {target} at {config.model.dtype}"
  steps = optim.total_train_steps(config.train, 100_000)
  return (f"{steps} steps of {step_s * 1e3:.0f} ms on {num_devices}x {target} at "
          f"{ESTIMATE_MFU:.0%} MFU: {steps * step_s / 3600:.1f} h per run (100k training images)")


def main(argv):
  del argv
  try:
    if _CONFIG.value is None:
      raise UserError("--config is required, e.g. --config configs/tiny_imagenet.py:vit_10m.")
    overview, summary = describe(_CONFIG.value)
    if _MEMORY.value:
      plan = memory_plan(_CONFIG.value, _NUM_DEVICES.value, _TARGET.value)
      summary["memory_plan"] = plan.as_dict()
      if _TARGET.value:
        estimate = time_estimate(_CONFIG.value, _TARGET.value, _NUM_DEVICES.value or 1)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  print(overview)
  if _MEMORY.value:
    print(f"Memory plan: {plan.describe()}")
    if _TARGET.value:
      print(f"Time estimate: {estimate}")
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main, flags_parser=config_cli.flags_parser)
