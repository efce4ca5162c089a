"""Which attention computation runs: `config.model.attention_impl`, resolved once per run.

  'einsum'  explicit probabilities and plain autodiff; the only path that sows
            attention maps and supports attention-probability dropout.
  'xla'     XLA ops with a flash-attention-style backward pass, over batch
            chunks of at most `attention_chunk_mib` of float32 probabilities.
            DiffViT forms (A1 - lambda A2) before its single value product.
  'cudnn'   cuDNN's fused flash attention via `jax.nn.dot_product_attention`:
            NVIDIA GPU (CUDA, not ROCm) of compute capability 8.0 or more
            (cuDNN's attention needs Ampere or newer) and no attention dropout
            (our rules); 16-bit inputs, head sizes multiples of 8 up to 128
            (256 from compute capability 9.0) and, for training, an even token
            count (JAX's rules: asked by lowering for 'cuda', the project's copy
            where JAX has no CUDA plugin). DiffViT runs it as one call at head
            size 2d (q/k zero-padded, `attention_ops.differential_cudnn`).
  'auto'    'cudnn' where it can run; else 'einsum' when attention dropout is
            on; else 'xla'.
"""

import contextlib
import dataclasses
import functools
import threading

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


# The compute capability the rules assume for a CUDA GPU whose capability is not known (a
# backend named without a device): the least cuDNN's attention runs on, so nothing is allowed
# that an Ampere GPU would refuse.
ASSUMED_CAPABILITY = (8, 0)
FUSED_DTYPES = ("bfloat16", "float16")  # what JAX's cuDNN attention takes (fp8 aside)
FORWARD_TOKENS = 16  # the token count of the forward-only question (no forward rule reads it)


def _capability(capability) -> tuple[int, int]:
  """(major, minor) from '9.0', (9, 0) or 9.0."""
  parts = str(capability).split(".") if not isinstance(capability, tuple) else capability
  major, minor = (tuple(int(part) for part in parts) + (0,))[:2]
  return major, minor


_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def jax_capability(capability):
  """JAX's cuDNN checks answer for a GPU of `capability` ('9.0' or (9, 0)) meanwhile.

  JAX gates some cuDNN limits (head size 256, MLA, packed layouts) on the compute
  capability of its *default backend*, which is the CPU when lowering for a GPU that is
  not here. Lowering for a target GPU (the rules below, the deviceless GPU rehearsal) runs
  its trace under this. It patches two private functions of
  `jax._src.cudnn.fused_attention_stablehlo` for the duration; where a JAX version lacks
  them nothing is patched. `capability` None patches nothing. One patch at a time per
  process (a lock; nesting in one thread is fine).
  """
  if capability is None:
    yield
    return
  target = _capability(capability)
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fused
  except ImportError:
    yield
    return
  patches = {
      "check_compute_capability": lambda wanted: target >= _capability(wanted),
      "is_cuda_compute_capability_equal": lambda wanted: target == _capability(wanted),
  }
  with _PATCH_LOCK:
    saved = {name: getattr(fused, name) for name in patches if hasattr(fused, name)}
    for name in saved:
      setattr(fused, name, patches[name])
    try:
      yield
    finally:
      for name, original in saved.items():
        setattr(fused, name, original)


@functools.cache
def ask_jax(head_dims: tuple[int, int], tokens: int, dtype: str,
            capability: tuple[int, int], training: bool) -> tuple[bool, str | None]:
  """(asked, JAX's refusal or None): lower cuDNN attention for 'cuda' and see if JAX objects.

  One example [1, tokens, 1, head size] of q/k (`head_dims[0]`) and v (`head_dims[1]`) in
  `dtype`; `training` lowers its gradient (the backward has rules of its own). JAX's cuDNN
  checks run at this point, in Python, with no GPU. `asked` is False where JAX cannot be
  asked (no CUDA plugin or cuDNN: RuntimeError), the message then says why.
  """
  import jax
  import jax.numpy as jnp

  qk, v = head_dims
  q = jax.ShapeDtypeStruct((1, tokens, 1, qk), jnp.dtype(dtype))
  value = jax.ShapeDtypeStruct((1, tokens, 1, v), jnp.dtype(dtype))

  def attend(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return out.astype(jnp.float32).sum()

  step = jax.grad(attend, argnums=(0, 1, 2)) if training else attend
  try:
    with jax_capability(capability):
      jax.jit(step).trace(q, q, value).lower(lowering_platforms=("cuda",))
  except (NotImplementedError, ValueError, TypeError) as e:  # JAX's refusal
    return True, str(e).strip() or type(e).__name__
  except RuntimeError as e:  # no CUDA plugin / cuDNN: JAX cannot answer here
    return False, str(e)
  return True, None


def own_rule(head_dims: tuple[int, int], tokens: int | None, dtype: str,
             capability: tuple[int, int]) -> str | None:
  """The project's copy of JAX's cuDNN attention checks, for where JAX cannot be asked.

  `tokens` None: the forward pass only (the sequence rule is the backward's). A test proves
  it equal to JAX's answer over a grid of token counts, head sizes, dtypes and compute
  capabilities (tests/test_attention_impl.py).
  """
  if dtype not in FUSED_DTYPES:
    return (f"it takes 16-bit inputs (bfloat16 or float16) and config.model.dtype is "
            f"{dtype!r} (set --config.model.dtype=bfloat16)")
  qk, v = head_dims
  if qk != v:
    return f"it needs equal q/k and v head sizes, and this model has {qk} and {v}"
  limit = 256 if capability >= (9, 0) else 128  # JAX allows 256 from Hopper on
  if qk % 8 or qk > limit:
    return (f"it needs head sizes that are multiples of 8 up to {limit} on compute "
            f"capability {'.'.join(map(str, capability))} (256 from 9.0), and this model "
            f"has {qk}")
  if tokens is not None and tokens % 2:
    return (f"JAX's cuDNN attention backward needs an even token count and this model "
            f"has {tokens}")
  return None


def fused_problem(head_dims: tuple[int, int], tokens: int | None, dtype: str,
                  capability: tuple[int, int]) -> tuple[str | None, str]:
  """(why cuDNN attention cannot run these shapes, or None; who answered).

  JAX answers where it can (its checks at lowering, for training when `tokens` is known,
  else the forward pass); else the project's own rule. Where JAX refuses and our rule
  knows why, the reason is ours in plain words with JAX's message after it.
  """
  training = tokens is not None
  asked, message = ask_jax(tuple(head_dims), tokens if training else FORWARD_TOKENS,
                           dtype, tuple(capability), training)
  ours = own_rule(head_dims, tokens, dtype, capability)
  if not asked:
    return ours, f"the project's own rule (JAX cannot be asked here: {message})"
  who = "JAX's cuDNN checks"
  if message is None:
    return None, who
  if ours is None:
    return f"JAX's cuDNN checks refuse it: {message}", who
  return f"{ours} (JAX: {message!r})", who


def cudnn_problem(model_config, device: DeviceInfo | str, tokens: int | None = None) -> str | None:
  """Why cuDNN's flash attention cannot run this model on `device`, or None if it can.

  `tokens`: the sequence length the blocks see (`stats.num_tokens`); None where it is not
  known (evaluation-only builds), then only the forward pass is asked about. The checks of
  the kernel's shapes and dtype are JAX's (`fused_problem`); NVIDIA/CUDA, compute
  capability 8.0+ and no attention dropout are ours alone.
  """
  return _cudnn_check(model_config, device, tokens)[0]


OURS = "the project's rule"  # what answered a check JAX does not make (device, dropout)


def _cudnn_check(model_config, device: DeviceInfo | str,
                 tokens: int | None) -> tuple[str | None, str]:
  """(`cudnn_problem`'s answer, what answered it, in words)."""
  if isinstance(device, str):
    device = DeviceInfo.nominal(device)
  if device.platform != "gpu":
    return f"it needs an NVIDIA GPU and JAX's backend here is {device.platform!r}", OURS
  if device.vendor != "cuda":
    return (f"it needs an NVIDIA GPU (CUDA) and this GPU is {device.vendor or 'not CUDA'!r}",
            OURS)
  capability = device.compute_capability
  if capability is not None and capability < CUDNN_MIN_COMPUTE_CAPABILITY:
    return ("it needs an NVIDIA GPU of compute capability 8.0 or more (Ampere or newer); "
            f"this one is {'.'.join(map(str, capability))}"), OURS
  if model_config.attn_dropout > 0:
    return "it has no attention-probability dropout and config.model.attn_dropout > 0", OURS
  head_dims = registry.kind(model_config.arch).fused_head_dims(model_config)
  problem, who = fused_problem(head_dims, tokens, model_config.dtype,
                               capability or ASSUMED_CAPABILITY)
  where = (f"compute capability {'.'.join(map(str, capability))}" if capability else
           f"compute capability {'.'.join(map(str, ASSUMED_CAPABILITY))} assumed")
  form = f"training at {tokens} tokens" if tokens is not None else "forward pass only"
  return problem, f"{who}; {where}; {form}"


def resolve(model_config, backend: str | None = None, device: DeviceInfo | None = None, *,
            tokens: int | None = None) -> Resolved:
  """The concrete path for `model_config` on `device`.

  Default: this process's first device; a `backend` named alone (planning, tests) stands
  for `DeviceInfo.nominal(backend)`. `tokens`: the sequence length the blocks see
  (`stats.num_tokens(config.model, config.data.image_size)`); training passes it, so that
  the backward's rules apply (JAX's cuDNN backward needs an even count). None: not known,
  the forward pass only.

  `resolve` applies these rules before anything is traced, and a path that
  cannot run here is a ConfigError saying why, never a silent fallback. The
  device is read as a `DeviceInfo` (tests construct one). The result is logged
  at start and written to run_info.json under 'attention'; its reason says which rule
  answered (JAX's own checks or the project's copy of them).
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
  if requested == "xla":
    if model_config.attn_dropout > 0:
      raise fail("it has no attention-probability dropout and config.model.attn_dropout > 0 "
                 "(use 'einsum')")
    return Resolved("xla", chunk, requested, backend, "requested")
  if requested == "einsum":
    return Resolved("einsum", chunk, requested, backend, "requested")
  problem, answered = _cudnn_check(model_config, device, tokens)
  if requested == "cudnn":
    if problem:
      raise fail(f"{problem} [{answered}]")
    return Resolved("cudnn", chunk, requested, backend, f"requested [{answered}]")
  if problem is None:
    return Resolved("cudnn", chunk, requested, backend,
                    f"auto: cuDNN can run this model here [{answered}]")
  if model_config.attn_dropout > 0:
    return Resolved("einsum", chunk, requested, backend,
                    "auto: attention dropout needs explicit probabilities")
  return Resolved("xla", chunk, requested, backend, f"auto: not cuDNN ({problem}) [{answered}]")
