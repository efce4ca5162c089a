"""Session-wide test settings.

Much of the suite's time is XLA compiling the same few digits programs again in
every process that trains one (the subprocess runs of `diffvit_jax.main`, the
multi-process runs, the GPU check's dry run). JAX's persistent compilation cache,
in one directory for the whole session (xdist workers and the processes they start
inherit it through the environment), compiles each distinct program once. A cache
hit is the same executable a fresh compile would give, so no test sees other
numbers; a run's own settings (the GPU check sets its own directory) still win.
"""

import os
import shutil
import tempfile

# The suite runs on the CPU. The test extra carries JAX's CUDA plugin (the GPU rehearsal
# compiles for GPUs without one); without this its start-up on a machine with no GPU fails
# and JAX refuses the GPU topologies.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def pytest_configure(config):
  # The controller (or a run without xdist) makes the directory; workers inherit it.
  if "PYTEST_XDIST_WORKER" in os.environ or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  directory = tempfile.mkdtemp(prefix="diffvit_jax_tests_xla_cache_")
  config._diffvit_xla_cache = directory
  os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
  for name, value in _CACHE_ENV.items():
    os.environ.setdefault(name, value)


def pytest_unconfigure(config):
  directory = getattr(config, "_diffvit_xla_cache", None)
  if directory:
    shutil.rmtree(directory, ignore_errors=True)
