"""Which attention computation runs: `config.model.attention_impl`, resolved once per run.

  'einsum'  explicit probabilities and plain autodiff; the only path that sows
            attention maps and supports attention-probability dropout.
  'xla'     XLA ops with a flash-attention-style backward pass, over batch
            chunks of at most `attention_chunk_mib` of float32 probabilities.
            DiffViT forms (A1 - lambda A2) before its single value product.
  'cudnn'   cuDNN's fused flash attention via `jax.nn.dot_product_attention`:
            NVIDIA GPU (CUDA, not ROCm) of compute capability 8.0 or more
            (cuDNN's attention needs Ampere or newer), bfloat16, q/k/v head
            sizes multiples of 8 up to 128, no attention dropout. DiffViT runs
            it as one call at head size 2d (q/k zero-padded, `attention_ops.differential_cudnn`).
  'auto'    'cudnn' where it can run; else 'einsum' when attention dropout is
            on; else 'xla'.
"""

import dataclasses

from diffvit_jax.errors import ConfigError
from diffvit_jax.models import registry

PATHS = ("einsum", "xla", "cudnn")  # what runs (models/attention_ops.py)
IMPLS = ("auto", *PATHS)  # what config.model.attention_impl may say
# Default chunk budget of the 'xla' path: bounds transient memory on the CPU (host RAM),
# larger elsewhere.
DEFAULT_CHUNK_MIB = {"cpu": 256}
DEFAULT_CHUNK_MIB_ELSEWHERE = 1024


@dataclasses.dataclass(frozen=True)
class Resolved:
  impl: str  # 'einsum' | 'xla' | 'cudnn'
  chunk_mib: int
  requested: str
  backend: str
  reason: str

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


# cuDNN's flash attention needs SM 8.0 (Ampere) or newer (NVIDIA's cuDNN attention support
# matrix); JAX tells CUDA from ROCm by the client's platform_version, as its own cuDNN checks do.
CUDNN_MIN_COMPUTE_CAPABILITY = (8, 0)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
  """What the rules read of a device: JAX platform, GPU vendor, CUDA compute capability."""

  platform: str  # JAX's backend name: 'cpu' | 'gpu' | 'tpu' | ...
  vendor: str = ""  # for 'gpu': 'cuda' | 'rocm' (from the client's platform_version)
  compute_capability: tuple[int, int] | None = None  # CUDA only; None where not known

  @classmethod
  def of(cls, device) -> "DeviceInfo":
    """From a `jax.Device` (CUDA devices carry `compute_capability`, e.g. '9.0')."""
    version = str(getattr(device.client, "platform_version", "")).lower()
    vendor = "cuda" if "cuda" in version else "rocm" if "rocm" in version else ""
    capability = getattr(device, "compute_capability", None) if vendor == "cuda" else None
    if capability is not None:
      capability = tuple(int(part) for part in str(capability).split(".")[:2])
    return cls(device.platform, vendor, capability)

  @classmethod
  def nominal(cls, backend: str) -> "DeviceInfo":
    """A backend named without a device: 'gpu' stands for a CUDA GPU of unknown capability."""
    return cls(backend, "cuda" if backend == "gpu" else "")


def local_device() -> DeviceInfo:
  """This process's first device (on JAX's default backend)."""
  import jax

  return DeviceInfo.of(jax.devices()[0])


def cudnn_problem(model_config, device: DeviceInfo | str) -> str | None:
  """Why cuDNN's flash attention cannot run this model on `device`, or None if it can."""
  if isinstance(device, str):
    device = DeviceInfo.nominal(device)
  if device.platform != "gpu":
    return f"it needs an NVIDIA GPU and JAX's backend here is {device.platform!r}"
  if device.vendor != "cuda":
    return f"it needs an NVIDIA GPU (CUDA) and this GPU is {device.vendor or 'not CUDA'!r}"
  capability = device.compute_capability
  if capability is not None and capability < CUDNN_MIN_COMPUTE_CAPABILITY:
    return ("it needs an NVIDIA GPU of compute capability 8.0 or more (Ampere or newer); "
            f"this one is {'.'.join(map(str, capability))}")
  if model_config.dtype != "bfloat16":
    return (f"it takes 16-bit inputs and config.model.dtype is {model_config.dtype!r} "
            "(set --config.model.dtype=bfloat16)")
  qk, v = registry.kind(model_config.arch).fused_head_dims(model_config)
  for size in (qk, v):
    if size % 8 or size > 128:
      return f"it needs head sizes that are multiples of 8 up to 128, and this model has {size}"
  if model_config.attn_dropout > 0:
    return "it has no attention-probability dropout and config.model.attn_dropout > 0"
  return None


def resolve(model_config, backend: str | None = None,
            device: DeviceInfo | None = None) -> Resolved:
  """The concrete path for `model_config` on `device`.

  Default: this process's first device; a `backend` named alone (planning, tests) stands
  for `DeviceInfo.nominal(backend)`.

  `resolve` applies these rules before anything is traced, and a path that
  cannot run here is a ConfigError saying why, never a silent fallback. The
  device is read as a `DeviceInfo` (tests construct one). The result is logged
  at start and written to run_info.json under 'attention'.
  """
  if device is None:
    device = DeviceInfo.nominal(backend) if backend is not None else local_device()
  backend = device.platform
  requested = model_config.attention_impl
  chunk = model_config.attention_chunk_mib or DEFAULT_CHUNK_MIB.get(
      backend, DEFAULT_CHUNK_MIB_ELSEWHERE)
  fail = lambda why: ConfigError(
      f"config.model.attention_impl={requested!r} cannot run here: {why}. Use "
      "attention_impl='auto' to let the rules in diffvit_jax/models/attention_impl.py choose.")
  problem = cudnn_problem(model_config, device)
  if requested == "cudnn":
    if problem:
      raise fail(problem)
    return Resolved("cudnn", chunk, requested, backend, "requested")
  if requested == "xla":
    if model_config.attn_dropout > 0:
      raise fail("it has no attention-probability dropout and config.model.attn_dropout > 0 "
                 "(use 'einsum')")
    return Resolved("xla", chunk, requested, backend, "requested")
  if requested == "einsum":
    return Resolved("einsum", chunk, requested, backend, "requested")
  if problem is None:
    return Resolved("cudnn", chunk, requested, backend, "auto: cuDNN can run this model here")
  if model_config.attn_dropout > 0:
    return Resolved("einsum", chunk, requested, backend,
                    "auto: attention dropout needs explicit probabilities")
  return Resolved("xla", chunk, requested, backend, f"auto: not cuDNN ({problem})")
