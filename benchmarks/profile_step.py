r"""Where a CPU train step's time goes: XLA's ops in JAX's step, torch's ops in timm's.

  .venv/bin/python benchmarks/profile_step.py --digits=32 --batch=128
  .venv/bin/python benchmarks/profile_step.py --digits=32 --impls=xla,einsum --archs=vit --top=20
  .venv/bin/python benchmarks/profile_step.py --digits= --protocols=seed --batch=32 --torch=false

JAX: the real train step (`tools/bench.build_train_step`) run `--steps` times
inside `jax.profiler.trace` with XLA:CPU's per-thunk trace events on
(`--xla_cpu_enable_xprof_traceme`, added to XLA_FLAGS before JAX starts), the
trace's events summed by op and sorted. Op names are XLA's (fusion.12,
dot.3, ...); each is shown with a short form of its HLO so that a reader sees
which product or fusion it is. timm: the same step as
`benchmarks/compare_timm.py` runs it, under `torch.profiler`, its
`key_averages()` table by self CPU time. Both tables give each op's share of the
step; shares, not milliseconds, are what compares across loads.
"""

import collections
import gzip
import json
import os
import re
import sys
import tempfile

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import compare_timm  # noqa: E402  (its flags: --digits, --protocols, --sizes, --archs, --batch, --steps)

flags.FLAGS.set_default("digits", ["32"])
flags.FLAGS.set_default("protocols", [])
flags.FLAGS.set_default("batch", 128)
_IMPLS = flags.DEFINE_list("impls", ["xla", "einsum"], "Attention paths of the JAX step.")
_TOP = flags.DEFINE_integer("top", 12, "Ops listed per table.")
_TORCH = flags.DEFINE_bool("torch", True, "Also profile timm's step.")
_DIGITS, _PROTOCOLS, _SIZES, _ARCHS, _BATCH, _STEPS = (
    compare_timm._DIGITS, compare_timm._PROTOCOLS, compare_timm._SIZES, compare_timm._ARCHS,
    compare_timm._BATCH, compare_timm._STEPS)


def _configs():
  from configs import digits, tiny_imagenet

  for size in _DIGITS.value:
    def digits_config(arch, n=int(size)):
      config = digits.get_config(arch)
      config.data.image_size = n
      return config
    yield f"digits {size}x{size}", digits_config
  for protocol in _PROTOCOLS.value:
    for size in _SIZES.value:
      yield (f"{protocol} {size}",
             lambda arch, p=protocol, s=size: tiny_imagenet.get_config(f"{arch}_{s},{p}"))


def _hlo_summaries(compiled_text: str) -> dict:
  """op name -> (what it is, its role): kind, shape and fused ops; JAX's op_name, layer-free.

  The role (the JAX operation the op came from, with `block_<i>` as `block_*`)
  groups the same op of every layer into one row.
  """
  bodies, current = {}, None
  for line in compiled_text.splitlines():
    header = re.match(r"%?([\w.\-]+) .*\{$", line)
    if header and not line.startswith(" "):
      current = bodies.setdefault(header.group(1), [])
    elif current is not None and line.startswith("  "):
      match = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = \S+ (\w[\w\-]*)\(", line)
      if match and match.group(1) not in ("parameter", "constant", "broadcast", "bitcast"):
        current.append(match.group(1))
  summaries = {}
  for line in compiled_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(", line)
    if not match:
      continue
    name, shape, kind = match.groups()
    called = re.search(r"calls=%?([\w.\-]+)", line)
    fused = ""
    if kind == "fusion" and called:
      ops = collections.Counter(bodies.get(called.group(1), []))
      fused = " [" + " ".join(f"{op}" + (f"x{n}" if n > 1 else "") for op, n in ops.items()) + "]"
    op_name = re.search(r'op_name="([^"]*)"', line)
    role = re.sub(r"block_\d+", "block_*", op_name.group(1)) if op_name else ""
    role = role.removeprefix("jit(train_step)/")
    summaries[name] = (f"{kind} {shape.split('{')[0]}{fused}", role)
  return summaries


def _trace_events(log_dir: str):
  """The complete ('X') events of the perfetto trace jax.profiler wrote under `log_dir`."""
  for root, _, files in os.walk(log_dir):
    for name in files:
      if name.endswith("perfetto_trace.json.gz"):
        with gzip.open(os.path.join(root, name)) as f:
          trace = json.load(f)
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        return [e for e in events if e.get("ph") == "X"]
  raise FileNotFoundError(f"no perfetto trace under {log_dir}")


def profile_jax(config, batch: int, steps: int) -> tuple[dict, float]:
  """({op name: microseconds per step}, step microseconds) of the real train step."""
  import jax

  from diffvit_jax.tools import bench

  trainer, device_batch = bench.build_train_step(config, batch)
  state = trainer.state
  state, _ = bench.time_steps(trainer.train_step, state, device_batch, 2)
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      state, seconds = bench.time_steps(trainer.train_step, state, device_batch, steps)
    events = _trace_events(log_dir)
  step = trainer.train_step  # compiled already (the trainer's memory plan compiles it)
  hlo = step.as_text() if hasattr(step, "as_text") else step.lower(state, device_batch).compile(
  ).as_text()
  summaries = _hlo_summaries(hlo)
  if os.environ.get("PROFILE_DEBUG"):
    print(collections.Counter(e.get("name", "") for e in events).most_common(40))
    print(list(summaries.items())[:20])
  per_op = collections.Counter()
  for event in events:
    name = event.get("name", "")
    if name in summaries:  # XLA's thunks carry their HLO instruction's name
      what, role = summaries[name]
      per_op[f"{what} <- {role}"] += event.get("dur", 0.0) / steps
  return dict(per_op), 1e6 * seconds / steps


def profile_torch(config, batch: int, steps: int, params, host_batch) -> tuple[dict, float]:
  """({op: self CPU microseconds per step}, step microseconds) of timm's step."""
  import time

  import torch

  step = compare_timm.TorchStep(config, batch, params, host_batch)
  step.run(2)
  start = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    step.run(steps)
  seconds = time.perf_counter() - start
  return ({e.key: e.self_cpu_time_total / steps for e in prof.key_averages()},
          1e6 * seconds / steps)


def _table(title: str, per_op: dict, step_us: float, top: int) -> str:
  total = sum(per_op.values())
  lines = [f"{title}: step {step_us / 1e3:.0f} ms, ops sum {total / 1e3:.0f} ms",
           "| op | ms/step | share of ops |", "|---|---:|---:|"]
  for name, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f"| `{name[:160]}` | {us / 1e3:.1f} | {100 * us / total:.1f}% |")
  return "\n".join(lines)


def main(argv):
  del argv
  if compare_timm._THREADS.value > 0:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:compare_timm._THREADS.value])
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_enable_xprof_traceme" not in xla_flags:
    os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_cpu_enable_xprof_traceme=true".strip()
  from diffvit_jax import cpu_runtime

  cpu_defaults = cpu_runtime.apply_cpu_defaults()
  import jax
  import numpy as np
  import torch

  from diffvit_jax.tools import bench

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  print(f"{compare_timm.cpu_kind()}, {len(os.sched_getaffinity(0))} CPUs, jax {jax.__version__}, "
        f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}, load {os.getloadavg()}, "
        f"CPU defaults {cpu_defaults}", flush=True)
  for label, config_of in _configs():
    for arch in _ARCHS.value:
      for impl in _IMPLS.value:
        config = config_of(arch)
        config.model.attention_impl = impl
        per_op, step_us = profile_jax(config, _BATCH.value, _STEPS.value)
        print(_table(f"\nJAX {arch} {label} b{_BATCH.value} {impl}", per_op, step_us, _TOP.value),
              flush=True)
      if _TORCH.value:
        config = config_of(arch)
        trainer, _ = bench.build_train_step(config, _BATCH.value)
        params = jax.tree_util.tree_map(np.asarray, trainer.state.params)
        host_batch = bench.synthetic_batch(config, _BATCH.value)
        per_op, step_us = profile_torch(config, _BATCH.value, _STEPS.value, params, host_batch)
        print(_table(f"\ntimm {arch} {label} b{_BATCH.value}", per_op, step_us, _TOP.value),
              flush=True)
  print(f"\nload after: {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
