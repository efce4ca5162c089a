"""The memory plan: what one device needs for a train step, and the microbatches that fit.

The train step is compiled (not run) for the device's share of the global
batch, and XLA's memory analysis of that program gives its bytes: arguments
(state, batch) + outputs - donated buffers + temporaries + code. The device's
memory is `train.device_memory_gib` when set, else `memory_stats()['bytes_limit']`
(GPUs report it; the CPU does not), else a target GPU's (targets/). Off the CPU the
plan also reserves what the compile does not see: the input batches queued on the
device (prefetched, and held by steps in flight) and cuBLAS/cuDNN workspaces.
`train.microbatches='auto'` takes the fewest microbatches (a divisor of the
per-device batch) whose step fits in all but `MARGIN` of the memory, less those
reserves; if none fits, a ConfigError names what is needed and the options.
"""

import dataclasses
import math
from collections.abc import Callable

from diffvit_jax import config_lib, cpu_runtime
from diffvit_jax.errors import ConfigError

MARGIN = 0.10  # of the device's memory kept free (allocator fragmentation, the eval step)
# cuBLAS and cuDNN workspaces, which a compile without a GPU does not size (and XLA on a GPU
# sizes per kernel): a stated reserve on every GPU plan.
GPU_WORKSPACE_RESERVE = 256 * 2**20
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  microbatches: int
  remat: bool
  per_device_batch: int
  bytes_per_device: int | None  # the planned step, from XLA's memory analysis
  device_bytes: int | None  # None: unknown (no limit applied)
  device_bytes_source: str  # 'train.device_memory_gib' | 'device' | 'unknown'
  margin: float
  breakdown: dict  # of the planned step: arguments, outputs, aliased, temporaries, code
  tried: dict  # microbatches -> bytes per device, for every count compiled
  reason: str
  reserved: dict = dataclasses.field(default_factory=dict)  # bytes held outside the step

  @property
  def budget(self) -> float | None:
    """Bytes the step may take: the device's memory less the margin and the reserves."""
    if self.device_bytes is None:
      return None
    return (1 - self.margin) * self.device_bytes - sum(self.reserved.values())

  @property
  def fits(self) -> bool | None:
    if self.device_bytes is None or self.bytes_per_device is None:
      return None
    return self.bytes_per_device <= self.budget

  def as_dict(self) -> dict:
    return dict(dataclasses.asdict(self), fits=self.fits, budget=self.budget,
                tried={str(k): v for k, v in self.tried.items()})

  def describe(self) -> str:
    need = "unknown" if self.bytes_per_device is None else f"{self.bytes_per_device / GIB:.2f}"
    have = ("unknown" if self.device_bytes is None
            else f"{self.device_bytes / GIB:.2f} GiB ({self.device_bytes_source})")
    reserved = "".join(f", {name} {size / GIB:.2f} GiB" for name, size in self.reserved.items())
    return (f"{self.microbatches} microbatch(es) of {self.per_device_batch // self.microbatches}"
            f" per device, remat {'on' if self.remat else 'off'}: {need} GiB per device of "
            f"{have} ({self.margin:.0%} kept free{reserved}); {self.reason}")


def device_memory(device, train_config) -> tuple[int | None, str]:
  """(bytes of one device's memory, where that number comes from)."""
  if train_config.device_memory_gib:
    return int(train_config.device_memory_gib * GIB), "train.device_memory_gib"
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
    stats = None
  limit = (stats or {}).get("bytes_limit")
  return (int(limit), "device") if limit else (None, "unknown")


def step_bytes(compiled) -> tuple[int | None, dict]:
  """(bytes one device holds while the compiled step runs, their breakdown) from XLA."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None, {}
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  parts = dict(arguments=analysis.argument_size_in_bytes, outputs=analysis.output_size_in_bytes,
               aliased=analysis.alias_size_in_bytes, temporaries=analysis.temp_size_in_bytes,
               code=analysis.generated_code_size_in_bytes)
  total = (parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"]
           + parts["code"])
  return int(total), {k: int(v) for k, v in parts.items()}


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def tree_bytes(tree) -> int:
  """Bytes of a pytree of arrays or ShapeDtypeStructs."""
  import jax

  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def reserves(config, platform: str, batch_bytes: int) -> dict:
  """Bytes a device holds beside the running step: none on the CPU (it runs one step at a
  time from host memory); on an accelerator, the batches queued there and, on a GPU, the
  library workspaces."""
  if platform == "cpu":
    return {}
  queued = config.data.prefetch + cpu_runtime.max_steps_in_flight(platform)
  out = {f"{queued} queued input batches": queued * batch_bytes}
  if platform == "gpu":
    out["cuBLAS/cuDNN workspaces"] = GPU_WORKSPACE_RESERVE
  return out


def plan(config, per_device_batch: int, memory: tuple[int | None, str],
         compile_step: Callable[[int], object], *, platform: str = "cpu",
         batch_bytes: int = 0) -> tuple[MemoryPlan, object]:
  """(the plan, the compiled step it chose); `compile_step(microbatches)` compiles one count.

  `memory` is (the device's bytes or None, where that number comes from), `platform` the
  device's, `batch_bytes` one device's share of an input batch (for the reserves).
  'auto' compiles one microbatch first, then predicts the bytes of larger counts
  as fixed + variable / count from what it compiled, and confirms each guess by
  compiling it: usually two compilations when one microbatch does not fit.
  """
  t = config.train
  requested = config_lib.microbatches(t)
  limit, source = memory
  reserved = reserves(config, platform, batch_bytes)
  budget = None if limit is None else (1 - MARGIN) * limit - sum(reserved.values())
  tried, breakdowns, compiled = {}, {}, {}

  def measure(count: int) -> int | None:
    compiled[count] = compile_step(count)
    tried[count], breakdowns[count] = step_bytes(compiled[count])
    return tried[count]

  def result(count: int, reason: str) -> tuple[MemoryPlan, object]:
    return MemoryPlan(
        microbatches=count, remat=bool(config.model.remat), per_device_batch=per_device_batch,
        bytes_per_device=tried[count], device_bytes=limit, device_bytes_source=source,
        margin=MARGIN, breakdown=breakdowns[count], tried=dict(tried),
        reason=reason, reserved=reserved), compiled[count]

  if requested is not None:
    needed = measure(requested)
    if budget is not None and needed is not None and needed > budget:
      raise _does_not_fit(config, per_device_batch, tried, limit, source, reserved)
    return result(requested, "train.microbatches as configured")
  needed = measure(1)
  if budget is None or needed is None:
    return result(1, "auto: the device's memory is unknown (set train.device_memory_gib to "
                  "plan for one)" if budget is None else "auto: XLA gave no memory analysis")
  if needed <= budget:
    return result(1, "auto: the whole per-device batch fits")
  for count in _divisors(per_device_batch)[1:]:
    if count not in tried and _predicted(tried, breakdowns, count) > budget:
      continue
    if count not in tried and measure(count) > budget:
      continue
    return result(count, "auto: the fewest microbatches that fit")
  raise _does_not_fit(config, per_device_batch, tried, limit, source, reserved)


def _predicted(tried: dict, breakdowns: dict, count: int) -> float:
  """Bytes at `count` microbatches: the two latest compiles fit fixed + variable / count."""
  counts = sorted(tried)
  if len(counts) == 1:  # The temporaries scale with the microbatch, the rest does not.
    temp = breakdowns[counts[0]]["temporaries"]
    return tried[counts[0]] - temp + temp * counts[0] / count
  a, b = counts[-2], counts[-1]
  variable = (tried[a] - tried[b]) / (1 / a - 1 / b)
  return tried[b] - variable / b + variable / count


def _does_not_fit(config, per_device_batch, tried, limit, source, reserved) -> ConfigError:
  best = min(tried, key=tried.get)
  whole = (f" ({tried[1] / GIB:.2f} GiB for the whole per-device batch of {per_device_batch})"
           if 1 in tried and best != 1 else "")
  return ConfigError(
      f"The train step of {config.name or config.model.arch!r} does not fit one device: it "
      f"needs {tried[best] / GIB:.2f} GiB per device at {best} microbatch(es) of "
      f"{per_device_batch // best} examples{whole}, and the device has {limit / GIB:.2f} GiB "
      f"({source}), {MARGIN:.0%} of it kept free and {sum(reserved.values()) / GIB:.2f} GiB "
      "reserved for queued batches and workspaces. Options: --config.model.remat=True "
      "(recompute each block in the backward pass), more devices (a smaller share of the "
      "batch each), --config.model.dtype=bfloat16, or a smaller --config.train.batch_size "
      "(the learning rate follows it where train.lr_reference_batch is set).")
