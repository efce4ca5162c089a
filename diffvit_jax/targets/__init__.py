"""NVIDIA GPUs to compile for on a machine without one: one `<name>.txtpb` per target.

Each file is XLA's `GpuTargetConfigProto` as text, written from the vendor's data sheet.
`devices(name)` gives abstract devices of that GPU (`jax.experimental.topologies`), which
`jax.jit(...).lower(...).compile()` compiles for as it would on the device: real sm_XY code,
XLA's GPU memory analysis. It needs JAX's CUDA plugin of the installed jax
(`./launch.sh setup test` installs it) and, without a GPU, `JAX_PLATFORMS=cpu`. What such a
compile cannot tell: cuDNN builds no graph, GEMMs are not autotuned, workspaces are not sized.
"""

import dataclasses
import functools
import os
import pathlib
import re

from diffvit_jax.errors import UserError
from diffvit_jax.models import attention_impl

HERE = pathlib.Path(__file__).parent
NAMES = tuple(sorted(path.stem for path in HERE.glob("*.txtpb")))
# XLA's client takes this share of a GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says
# otherwise: what `memory_stats()['bytes_limit']` then reports, and so what the plan gets.
DEFAULT_MEM_FRACTION = 0.75
# Options of a compile for a target: XLA cannot autotune without the GPU, and untuned it
# sends GEMMs to Triton at default tiles; cuBLAS (what autotuning picks for most of these
# GEMMs, and whose workspace the plan should count) compiles 2-5x faster here.
DEVICELESS_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # the file's stem: 'h100', 'a100', 'rtx4090'
  device_kind: str  # as `jax.Device.device_kind` reads on that GPU
  compute_capability: tuple[int, int]
  memory_bytes: int  # the whole device's
  memory_bandwidth: float  # bytes/s
  text: str  # the GpuTargetConfigProto text

  @property
  def device_info(self) -> attention_impl.DeviceInfo:
    return attention_impl.DeviceInfo("gpu", "cuda", self.compute_capability)

  def device_memory(self) -> tuple[int, str]:
    """(bytes XLA's client would give the runs, where that number comes from)."""
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))
    return (int(fraction * self.memory_bytes),
            f"target {self.name}: {fraction:.0%} of {self.memory_bytes / 2**30:.1f} GiB")

  def peak_flops(self, dtype: str) -> float | None:
    from diffvit_jax.tools import bench

    return bench.peak_flops_per_device(self.device_kind, dtype)


def _field(text: str, name: str, path: pathlib.Path) -> str:
  match = re.search(rf"^\s*{name}:\s*(\S+)", text, re.MULTILINE)
  if not match:
    raise UserError(f"The GPU target file {path} has no field {name!r}.")
  return match.group(1).strip('"')


@functools.cache
def load(name: str) -> Target:
  """The target `name` (one of NAMES); an unknown name is one error listing them."""
  path = HERE / f"{name}.txtpb"
  if name not in NAMES:
    raise UserError(f"Unknown GPU target {name!r}: the targets are {', '.join(NAMES)} "
                    f"(files in {HERE}).")
  text = path.read_text()
  capability = re.search(r"cuda_compute_capability\s*\{\s*major:\s*(\d+)\s+minor:\s*(\d+)",
                         text)
  kind = re.search(r'device_description_str:\s*"([^"]+)"', text)
  if not capability or not kind:
    raise UserError(f"The GPU target file {path} needs cuda_compute_capability {{major minor}} "
                    "and device_description_str.")
  return Target(name=name, device_kind=kind.group(1),
                compute_capability=(int(capability.group(1)), int(capability.group(2))),
                memory_bytes=int(_field(text, "device_memory_size", path)),
                memory_bandwidth=float(_field(text, "memory_bandwidth", path)), text=text)


def parse(names: str) -> tuple[Target, ...]:
  """'h100,rtx4090' -> their targets."""
  return tuple(load(name.strip()) for name in names.split(",") if name.strip())


@functools.cache
def devices(name: str) -> tuple:
  """One abstract device of target `name` (a 1x1x1 topology): compile for it, never run."""
  import jax
  from jax.experimental import topologies

  target = load(name)
  try:
    topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                            target_config=target.text)
  except Exception as e:  # noqa: BLE001 - jaxlib's errors for a refused topology vary
    lines = str(e).strip().splitlines()
    raise UserError(
        f"JAX cannot compile for GPU target {name!r} here: {lines[0] if lines else e!r}. A "
        "deviceless GPU compile needs JAX's CUDA plugin of the installed jax (./launch.sh setup "
        "test installs it) and, on a machine without a GPU, JAX_PLATFORMS=cpu; a field this "
        f"jaxlib does not know must be removed from {HERE / (name + '.txtpb')}. jax "
        f"{jax.__version__}, JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r}.") from None
  return tuple(topology.devices)


def cuda_env_problem() -> str | None:
  """Why this environment's JAX CUDA plugin would load another CUDA's libraries, or None.

  torch (the test extra) brings the CUDA 13 wheels (nvidia-cudnn-cu13, ...), and
  jax[cuda12]'s wheels write the same library paths: a venv holds one CUDA major only, and
  the plugin must find the cuDNN of its own build's major, at least its build's version.
  """
  import importlib.metadata as metadata

  installed = {dist.metadata["Name"].lower() for dist in metadata.distributions()}
  plugins = sorted(m for m in ("12", "13") if f"jax-cuda{m}-plugin" in installed)
  cudnn = sorted(m for m in ("12", "13") if f"nvidia-cudnn-cu{m}" in installed)
  if not plugins:
    return None
  if len(plugins) > 1 or len(cudnn) > 1 or cudnn != plugins:
    return (f"this environment mixes CUDA builds: JAX's CUDA plugin(s) for CUDA "
            f"{'+'.join(plugins)} and cuDNN wheel(s) for CUDA {'+'.join(cudnn) or 'none'}; "
            "they share library paths, so one overwrites the other")
  from jax._src.lib import cuda_versions

  if cuda_versions is None:
    return f"JAX's CUDA {plugins[0]} plugin is installed but jaxlib does not load it"
  loaded, built = cuda_versions.cudnn_get_version(), cuda_versions.cudnn_build_version()
  if loaded // 10000 != built // 10000 or loaded < built:
    return (f"JAX's CUDA plugin was built against cuDNN {built} and loads cuDNN {loaded}: "
            "it needs the same major version, at least as new")
  return None
