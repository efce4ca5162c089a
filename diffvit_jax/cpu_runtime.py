"""CPU-backend runtime settings, applied before JAX initialises (the benchmark and main call it).

    from diffvit_jax import cpu_runtime
    cpu_runtime.apply_cpu_defaults()   # first thing, before `import jax` anywhere
    import jax

Why (measured in benchmarks/RESULTS.md, "Train step on the CPU"):

- Allocator. XLA:CPU allocates one temp buffer per execution for all
  intermediates (every activation of the step, so large even for the digits
  model) and frees it at the end. glibc serves blocks that large with mmap, so
  every step page-faults the whole buffer in again, and the kernel time that
  costs is a large share of a small model's step (the fault counts and times
  are in RESULTS.md). Telling glibc never to mmap and not to trim (one arena,
  so that the block is found again whichever thread asks) keeps the buffer
  mapped across steps: zero faults after the first steps. The cost is that
  freed memory stays in the process (its peak is kept), which a training
  process reaches anyway.
- Steps in flight (`StepQueue`). JAX dispatches asynchronously; on GPUs
  queued steps cost nothing, but on XLA:CPU each queued execution holds its
  own temp buffer (all of its intermediates) and slows the running one. So on
  the CPU the train loop waits for each step before dispatching the next; the
  input pipeline runs in its own threads meanwhile.
- Dense weight gradients (`dense_dot_general`, the `dot_general` of every
  Dense in the models). Autodiff's dW = x^T dy contracts the token axis of
  both operands; XLA:CPU lays that out by transposing dy, and then fuses the
  whole chain that produces dy (the residual stream's gradient, summed back
  through every later block) into each such transpose, so the backward pass
  recomputes it once per layer, quadratically in depth. Computing dW from an
  explicitly transposed x leaves dy as it is. Same values (one product
  either way); on any other backend the plain `lax.dot_general` runs.

The allocator setting concerns only the CPU backend: nothing is done when an accelerator
backend is requested (`JAX_PLATFORMS` naming one) or installed (a jax CUDA /
ROCm plugin, or libtpu), where host memory is not the step's working memory.
Set `DIFFVIT_CPU_DEFAULTS=0` to skip it all.
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


def apply_cpu_defaults() -> dict:
  """Applies the CPU settings once if JAX will run on the CPU; returns what was done."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = dict(cpu=False, allocator=False)
  if os.environ.get("DIFFVIT_CPU_DEFAULTS", "1") == "0" or not cpu_only():
    return _applied
  _applied["cpu"] = True
  _applied["allocator"] = keep_freed_memory_mapped()
  return _applied


def max_steps_in_flight() -> int | None:
  """Train steps that may stay unfinished after a dispatch returns; None for no limit."""
  import jax

  return 0 if jax.default_backend() == "cpu" else None


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


def plain_weight_gradients() -> bool:
  """Whether `dense_dot_general` takes its CPU form (JAX's default backend is the CPU)."""
  import jax

  return jax.default_backend() == "cpu"


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, **kwargs):
  """`lax.dot_general` for `nn.Dense(dot_general=...)`: on the CPU, the Dense product's
  weight gradient from a transposed x (see the module docstring); otherwise unchanged."""
  from jax import lax

  (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
  if (plain_weight_gradients() and rhs.ndim == 2 and not lhs_batch
      and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and precision is None and preferred_element_type is None and not kwargs
      and lhs.dtype == rhs.dtype):
    return _dense_with_plain_weight_gradient()(lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)


def describe() -> dict:
  """What of this module applies in this process (logged, and in run_info.json)."""
  return dict(allocator=bool(_applied and _applied["allocator"]),
              max_steps_in_flight=max_steps_in_flight(),
              dense_weight_gradient=("from transposed x" if plain_weight_gradients()
                                     else "autodiff"))
