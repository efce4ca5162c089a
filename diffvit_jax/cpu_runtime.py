"""CPU-backend runtime settings; `apply_cpu_defaults()` runs before JAX initialises.

- Allocator: glibc keeps freed blocks mapped (no mmap, no trim, one arena), so XLA:CPU's
  per-execution temp buffer is not page-faulted in again at every step.
- `StepQueue`: on the CPU the loop waits for each step before dispatching the next (each
  queued XLA:CPU execution holds its own temp buffer and slows the running one); on an
  accelerator it waits for the step of STEPS_IN_FLIGHT steps ago, which keeps the device busy
  while bounding the batches queued executions hold (PJRT would queue dozens).
- Core share: with DIFFVIT_CPU_SHARE=i/n the process pins itself to the i-th of n disjoint
  shares of its cores (`cpu_shares`), so that XLA sizes its thread pool by them. What runs
  small models side by side (the quickstart, the sweep's CPU slots) sets it: one core's tiny
  steps gain little from a second thread, so n runs at once on disjoint cores train more per
  second than n runs in turn (benchmarks/RESULTS.md, "Quickstart: two runs at once").
- `dense_dot_general`: a Dense whose weight gradient dW = x^T dy comes from a transposed x,
  so XLA:CPU does not fuse dy's whole producer chain into a transpose of dy per layer.
  Same values; the trainer gives it to the model on the CPU unless `model.cpu_dense_grad=False`.
The measurements are in benchmarks/RESULTS.md ("Train step on the CPU"). Nothing is done
where an accelerator backend is requested or installed; `DIFFVIT_CPU_DEFAULTS=0` skips it.
"""

import collections
import ctypes
import functools
import importlib.util
import os

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")

_applied = None
CPU_SHARE_ENV = "DIFFVIT_CPU_SHARE"


def cpu_only() -> bool:
  """Whether JAX will run on the CPU: asked for explicitly, or no accelerator plugin installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "").lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def keep_freed_memory_mapped() -> bool:
  """Makes glibc keep freed blocks (no mmap, no trim, one arena); False if not glibc."""
  try:
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  ok = mallopt(_M_MMAP_MAX, 0)
  ok &= mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim (man mallopt)
  ok &= mallopt(_M_ARENA_MAX, 1)
  return bool(ok)


def cpu_shares(count: int) -> list[tuple[int, ...]]:
  """This process's cores dealt into `count` disjoint shares; all () (no pinning) when there
  are fewer cores than shares or no affinity call (not Linux)."""
  if count < 1 or not hasattr(os, "sched_getaffinity"):
    return [()] * max(count, 0)
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < count:
    return [()] * count
  return [tuple(cores[i::count]) for i in range(count)]


def pin_to_share() -> tuple[int, ...]:
  """Pins this process to the share DIFFVIT_CPU_SHARE='i/n' names; returns its cores (())."""
  value = os.environ.get(CPU_SHARE_ENV, "").strip()
  if not value:
    return ()
  try:
    index, count = (int(v) for v in value.split("/"))
    if not 0 <= index < count:
      raise ValueError
  except ValueError:
    from diffvit_jax.errors import ConfigError

    raise ConfigError(f"{CPU_SHARE_ENV}={value!r}: expected 'i/n' with 0 <= i < n, e.g. "
                      "'0/2' (the first of two disjoint shares of this process's cores).") from None
  cores = cpu_shares(count)[index]
  if cores:
    os.sched_setaffinity(0, cores)
  return cores


def apply_cpu_defaults() -> dict:
  """Applies the CPU settings once if JAX will run on the CPU; returns what was done."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = dict(cpu=False, allocator=False, cores=())
  if os.environ.get("DIFFVIT_CPU_DEFAULTS", "1") == "0" or not cpu_only():
    return _applied
  _applied["cpu"] = True
  _applied["allocator"] = keep_freed_memory_mapped()
  _applied["cores"] = pin_to_share()
  return _applied


# Train steps that may stay unfinished after a dispatch returns, off the CPU: each holds its
# input batch on the device, so the memory plan counts them (training/memory.py).
STEPS_IN_FLIGHT = 2


def max_steps_in_flight(platform: str | None = None) -> int:
  """Unfinished train steps allowed on `platform` (default: JAX's default backend)."""
  if platform is None:
    import jax

    platform = jax.default_backend()
  return 0 if platform == "cpu" else STEPS_IN_FLIGHT


class StepQueue:
  """Waits for the oldest dispatched steps while more than `limit` are unfinished."""

  def __init__(self, limit: int | None):
    self._limit = limit
    self._pending = collections.deque()

  def push(self, outputs) -> None:
    """Records a step's outputs (not donated ones) and waits while too many are queued."""
    if self._limit is None:
      return
    self._pending.append(outputs)
    while len(self._pending) > self._limit:
      import jax

      jax.block_until_ready(self._pending.popleft())


@functools.cache
def _dense_with_plain_weight_gradient():
  """y = x W ([..., K] x [K, N]) whose backward takes dW = (x^T) dy from a transposed x."""
  import jax
  from jax import lax

  @jax.custom_vjp
  def dense(x, w):
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))

  def forward(x, w):
    return dense(x, w), (x, w)

  def backward(residuals, dy):
    x, w = residuals
    dx = lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
    rows = lambda a: a.reshape(-1, a.shape[-1])
    dw = rows(x).T @ rows(dy)
    return dx.astype(x.dtype), dw.astype(w.dtype)

  dense.defvjp(forward, backward)
  return dense


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, **kwargs):
  """`lax.dot_general` for `nn.Dense(dot_general=...)` whose Dense product takes its weight
  gradient from a transposed x (see the module docstring); other products are unchanged."""
  from jax import lax

  (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
  if (rhs.ndim == 2 and not lhs_batch
      and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and precision is None and preferred_element_type is None and not kwargs
      and lhs.dtype == rhs.dtype):
    return _dense_with_plain_weight_gradient()(lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)


def model_dot_general(model_config, backend: str):
  """The models' Dense `dot_general`: the CPU form on the CPU when `model.cpu_dense_grad`."""
  return dense_dot_general if backend == "cpu" and model_config.cpu_dense_grad else None


def describe(model) -> dict:
  """What of this module applies to `model` in this process (logged, and in run_info.json)."""
  return dict(allocator=bool(_applied and _applied["allocator"]),
              cores=list(_applied["cores"]) if _applied and _applied["cores"] else "all",
              max_steps_in_flight=max_steps_in_flight(),
              dense_weight_gradient=("from transposed x" if model.dot_general is dense_dot_general
                                     else "autodiff"))
