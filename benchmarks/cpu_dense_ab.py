r"""The CPU form of the Dense weight gradient against autodiff's, in one process, alternated.

  .venv/bin/python benchmarks/cpu_dense_ab.py --digits=8,32 --batch=128
  .venv/bin/python benchmarks/cpu_dense_ab.py --digits= --protocols=seed --sizes=10m --batch=32
  XLA_FLAGS=--xla_cpu_max_isa=AVX2 .venv/bin/python benchmarks/cpu_dense_ab.py ...

Both variants of each model's real train step (`tools/bench.build_train_step`)
are compiled in this process: 'cpu form' as training runs it, 'autodiff' with
`model.cpu_dense_grad=False`. Timing windows of `--steps` steps
alternate the two (the order flips every round); reported are median wall and
process-CPU ms per step and the median of the per-round ratios cpu form /
autodiff, so that load from other processes hits both sides of each ratio.
The last line is JSON.
"""

import os
import sys

from absl import app, flags

_DIGITS = flags.DEFINE_list("digits", ["8", "32"], "Image sizes for configs/digits.py's model.")
_PROTOCOLS = flags.DEFINE_list("protocols", [], "Protocols of configs/tiny_imagenet.py.")
_SIZES = flags.DEFINE_list("sizes", ["10m"], "Model sizes for --protocols.")
_ARCHS = flags.DEFINE_list("archs", ["vit", "diffvit"], "Architectures.")
_BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed window.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternation rounds.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere


def _configs():
  from configs import digits, tiny_imagenet

  for arch in _ARCHS.value:
    for size in _DIGITS.value:
      config = digits.get_config(arch)
      config.data.image_size = int(size)
      yield f"{arch} digits {size}x{size}", config
    for protocol in _PROTOCOLS.value:
      for size in _SIZES.value:
        config = tiny_imagenet.get_config(f"{arch}_{size},{protocol}")
        config.model.dtype = "float32"  # The CPU's dtype (bfloat16 is emulated there).
        yield f"{arch} {protocol} {size}", config


def _compiled_step(config, batch_size: int, cpu_form: bool):
  from diffvit_jax.tools import bench

  config = config.copy_and_resolve_references()
  config.model.cpu_dense_grad = cpu_form
  trainer, batch = bench.build_train_step(config, batch_size)  # compiled in the build
  return trainer.train_step, trainer.state, batch


def main(argv):
  del argv
  from diffvit_jax import cpu_runtime

  cpu_runtime.apply_cpu_defaults()  # as training does, before JAX starts
  import json
  import statistics
  import time

  import jax

  from diffvit_jax.tools import bench

  print(f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"load {os.getloadavg()}", flush=True)
  results = []
  for label, config in _configs():
    variants = {}
    for name, cpu_form in (("cpu form", True), ("autodiff", False)):
      step, state, batch = _compiled_step(config, _BATCH.value, cpu_form)
      state, _ = bench.time_steps(step, state, batch, 2)  # warm-up
      variants[name] = [step, state, batch]
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for round_index in range(_ROUNDS.value):
      order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
      for name in order:
        step, state, batch = variants[name]
        cpu_start = time.process_time()
        variants[name][1], seconds = bench.time_steps(step, state, batch, _STEPS.value)
        wall[name].append(1e3 * seconds / _STEPS.value)
        cpu[name].append(1e3 * (time.process_time() - cpu_start) / _STEPS.value)
    ratio = statistics.median(a / b for a, b in zip(wall["cpu form"], wall["autodiff"],
                                                    strict=True))
    row = {"case": label, "batch": _BATCH.value,
           "wall_ms": {n: round(statistics.median(v), 1) for n, v in wall.items()},
           "cpu_ms": {n: round(statistics.median(v), 1) for n, v in cpu.items()},
           "cpu_form_over_autodiff": round(ratio, 3)}
    print(json.dumps(row), flush=True)
    results.append(row)
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
