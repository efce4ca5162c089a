"""Fused attention on the CPU: the C++ kernel in cpu_attention.cc, called through the XLA FFI.

XLA:CPU has no fused attention: its einsum-softmax-einsum streams [B, heads,
T, S] float32 logits and probabilities (and their gradients) through memory,
which made attention ~55% of the v2-protocol step (576 tokens) and JAX 1.2-1.3x
slower than PyTorch's fused CPU kernel there (benchmarks/RESULTS.md). The
kernel keeps blocks of full probability rows in cache and recomputes them in
the backward pass from the saved log-sum-exp, as FlashAttention does.

    out = attention(q, k, v, lam, scale=s, num_maps=1)   # softmax(s q k^T) v
    out = attention(q, k, v, lam, scale=s, num_maps=2)   # (A1 - lam A2) v, pairs of q/k heads

q [B, T, Nq, dq], k [B, S, Nk, dq], v [B, S, Nv, dv], float32; output head o
reads query heads o M .. o M + M - 1, key head qh Nk / Nq (grouped queries
when Nk < Nq) and value head o Nv / (Nq / M). `lam` is a float32 scalar
(ignored when num_maps == 1).

The kernel is compiled on first use with the system C++ compiler ($CXX, else
g++; -O3 -march=native) against the FFI headers that ship with jaxlib, and
cached in $DIFFVIT_KERNEL_CACHE (default ~/.cache/diffvit_jax) under a key of
the source, jax version, compiler, flags and CPU. Where that fails (no
compiler, say), `available()` is False, a warning says why, and the models
use XLA's attention. `DIFFVIT_CPU_ATTENTION=0` turns the kernel off.
"""

import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

SOURCE = Path(__file__).with_name("cpu_attention.cc")
ENABLE_ENV = "DIFFVIT_CPU_ATTENTION"
CACHE_ENV = "DIFFVIT_KERNEL_CACHE"
CXX_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC")
_TARGETS = {"fwd": "DiffvitAttentionForward", "bwd": "DiffvitAttentionBackward"}
_TARGET_PREFIX = "diffvit_cpu_attention_"


def _cpu_signature() -> str:
  """What -march=native compiles for: the CPU's model name and feature flags."""
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  wanted = ("model name", "flags", "Features", "CPU part")
  return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _compile(cache_dir: Path) -> Path:
  """The kernel's shared library, compiled into cache_dir unless already there."""
  cxx = shlex.split(os.environ.get("CXX") or "g++")  # may be e.g. "ccache g++"
  if shutil.which(cxx[0]) is None:
    raise RuntimeError(f"no C++ compiler ({cxx[0]!r} is not on PATH; set CXX)")
  command = [*cxx, *CXX_FLAGS, "-isystem", jax.ffi.include_dir()]
  key = hashlib.sha256("\0".join([SOURCE.read_text(), jax.__version__, *command,
                                  _cpu_signature()]).encode()).hexdigest()[:16]
  library = cache_dir / f"cpu_attention-{key}.so"
  if library.exists():
    return library
  cache_dir.mkdir(parents=True, exist_ok=True)
  # Compile to a private name and rename, so that concurrent processes (pytest
  # workers) never load a half-written library.
  fd, partial = tempfile.mkstemp(suffix=".so", dir=cache_dir)
  os.close(fd)
  try:
    result = subprocess.run([*command, str(SOURCE), "-o", partial], capture_output=True,
                            text=True, timeout=600, check=False)
    if result.returncode != 0:
      raise RuntimeError(f"{' '.join(cxx)} failed:\n{result.stderr[-2000:]}")
    os.replace(partial, library)
  finally:
    if os.path.exists(partial):
      os.unlink(partial)
  return library


@functools.cache
def _load() -> bool:
  """Compiles (once per machine) and registers the kernel; False, with a warning, on failure."""
  import ctypes

  cache_dir = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffvit_jax")
  try:
    library = ctypes.cdll.LoadLibrary(str(_compile(cache_dir)))
    for name, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(_TARGET_PREFIX + name,
                                  jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
    logging.warning("The fused CPU attention kernel is unavailable, using XLA's attention "
                    "(slower on the CPU): %s", error)
    return False
  return True


def available() -> bool:
  """Whether the kernel can run here: on the CPU backend, enabled, and compiled."""
  if os.environ.get(ENABLE_ENV, "1") == "0" or jax.default_backend() != "cpu":
    return False
  return _load()


def usable(*arrays: jax.Array) -> bool:
  """Whether `attention` should take these float32 arrays in this computation.

  Single-device only: XLA cannot partition a custom call, so a computation
  sharded over several devices keeps XLA's attention (the multi-device CPU
  case exists for tests).
  """
  return (all(a.dtype == jnp.float32 for a in arrays) and jax.device_count() == 1
          and available())


def _ffi_call(name: str, result_types):
  if not _load():
    raise RuntimeError("the fused CPU attention kernel could not be built (see the warning)")
  return jax.ffi.ffi_call(_TARGET_PREFIX + name, result_types, vmap_method="sequential")


def _forward(q, k, v, lam, scale, num_maps):
  batch, tokens, q_heads, _ = q.shape
  out_type = jax.ShapeDtypeStruct((batch, tokens, q_heads // num_maps, v.shape[-1]), jnp.float32)
  lse_type = jax.ShapeDtypeStruct((batch, q_heads, tokens), jnp.float32)
  return _ffi_call("fwd", (out_type, lse_type))(
      q, k, v, jnp.reshape(lam, (1,)), scale=np.float32(scale), num_maps=np.int64(num_maps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, lam: jax.Array, scale: float,
              num_maps: int) -> jax.Array:
  """sum_m c_m softmax(scale q_m k^T) v, c = (1, -lam); see the module docstring."""
  return _forward(q, k, v, lam, scale, num_maps)[0]


def _attention_fwd(q, k, v, lam, scale, num_maps):
  out, lse = _forward(q, k, v, lam, scale, num_maps)
  return out, (q, k, v, lam, lse)


def _attention_bwd(scale, num_maps, residuals, dout):
  q, k, v, lam, lse = residuals
  dlam_shape = (q.shape[0], q.shape[2] // num_maps)  # one share per example and output head
  types = tuple(jax.ShapeDtypeStruct(shape, jnp.float32)
                for shape in (q.shape, k.shape, v.shape, dlam_shape))
  dq, dk, dv, dlam = _ffi_call("bwd", types)(
      q, k, v, jnp.reshape(lam, (1,)), lse, dout.astype(jnp.float32), scale=np.float32(scale),
      num_maps=np.int64(num_maps))
  return dq, dk, dv, jnp.sum(dlam).reshape(jnp.shape(lam)).astype(lam.dtype)


attention.defvjp(_attention_fwd, _attention_bwd)
