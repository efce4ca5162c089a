"""JAX's persistent compilation cache: where the sweep and the GPU check keep it, and what
it saved in this process.

Every seed of a model compiles the same programs, and so do the sweep's plan and the GPU
check's repeated builds. The sweep points its plan and its runs at <root>/xla_cache and
the GPU check at <out>/xla_cache, through JAX's own environment variable (`env`), so that
any process they start reads it before JAX is imported. `Counter` listens to JAX's
monitoring events: a run logs and records (run_info 'compilation_cache') how many of its
compiles came from the cache and the compile time that saved.
"""

import os
import threading

DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
SUBDIR = "xla_cache"
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"


def env(root: str) -> dict[str, str]:
  """The environment that gives a process the cache under `root`, unless one is set already."""
  return {DIR_ENV: os.environ.get(DIR_ENV) or os.path.join(os.path.abspath(root), SUBDIR)}


def enable(directory: str, *, min_compile_time_s: float | None = None) -> None:
  """Turns the cache on in this process (before its first compile)."""
  import jax

  jax.config.update("jax_compilation_cache_dir", directory)
  if min_compile_time_s is not None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)


def directory() -> str | None:
  import jax

  return jax.config.jax_compilation_cache_dir or None


class Counter:
  """Cache hits, misses and compile seconds saved since this counter was made."""

  _lock = threading.Lock()
  _totals = {"hits": 0, "misses": 0, "saved_s": 0.0}
  _listening = False

  def __init__(self):
    self._listen()
    self._start = dict(self._totals)

  @classmethod
  def _listen(cls) -> None:
    with cls._lock:
      if cls._listening:
        return
      from jax import monitoring

      monitoring.register_event_listener(cls._on_event)
      monitoring.register_event_duration_secs_listener(cls._on_duration)
      cls._listening = True

  @classmethod
  def _on_event(cls, event: str, **kwargs) -> None:
    key = {_HIT: "hits", _MISS: "misses"}.get(event)
    if key:
      with cls._lock:
        cls._totals[key] += 1

  @classmethod
  def _on_duration(cls, event: str, duration: float, **kwargs) -> None:
    if event == _SAVED:
      with cls._lock:
        cls._totals["saved_s"] += max(0.0, duration)

  def summary(self) -> dict:
    """{'dir', 'hits', 'misses', 'saved_s'} since this counter was made ('dir' None: off)."""
    out = {k: self._totals[k] - self._start[k] for k in self._totals}
    out["saved_s"] = round(out["saved_s"], 3)
    return {"dir": directory(), **out}

  def describe(self) -> str:
    s = self.summary()
    if s["dir"] is None:
      return "off"
    return (f"{s['dir']}: {s['hits']} hit(s), {s['misses']} miss(es), "
            f"{s['saved_s']:.1f} s of compiling saved")
