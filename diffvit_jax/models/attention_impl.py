"""Which attention computation runs: `config.model.attention_impl`, resolved once per run.

  'einsum'  explicit probabilities and plain autodiff; the only path that sows
            attention maps and supports attention-probability dropout.
  'xla'     XLA ops with a flash-attention-style backward pass, over batch
            chunks of at most `attention_chunk_mib` of float32 probabilities.
            DiffViT forms (A1 - lambda A2) before its single value product.
  'cudnn'   cuDNN's fused flash attention via `jax.nn.dot_product_attention`:
            NVIDIA GPU, bfloat16, q/k/v head sizes multiples of 8 up to 128,
            no attention dropout. DiffViT runs it as two calls, one per half of v.
  'auto'    'cudnn' where it can run; else 'einsum' when attention dropout is
            on; else 'xla'.

`resolve` applies these rules before anything is traced, and a path that
cannot run here is a ConfigError saying why, never a silent fallback. The
result is logged at start and written to run_info.json under 'attention'.
"""

import dataclasses

from diffvit_jax.errors import ConfigError
from diffvit_jax.models import registry

IMPLS = ("auto", "einsum", "xla", "cudnn")
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


def cudnn_problem(model_config, backend: str) -> str | None:
  """Why cuDNN's flash attention cannot run this model here, or None if it can."""
  if backend != "gpu":
    return f"it needs an NVIDIA GPU and JAX's backend here is {backend!r}"
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


def resolve(model_config, backend: str | None = None) -> Resolved:
  """The concrete path for `model_config` on `backend` (default: JAX's default backend)."""
  if backend is None:
    import jax

    backend = jax.default_backend()
  requested = model_config.attention_impl
  chunk = model_config.attention_chunk_mib or DEFAULT_CHUNK_MIB.get(
      backend, DEFAULT_CHUNK_MIB_ELSEWHERE)
  fail = lambda why: ConfigError(
      f"config.model.attention_impl={requested!r} cannot run here: {why}. Use "
      "attention_impl='auto' to let the rules in diffvit_jax/models/attention_impl.py choose.")
  if requested not in IMPLS:
    raise ConfigError(f"config.model.attention_impl={requested!r} is not one of {IMPLS}.")
  problem = cudnn_problem(model_config, backend)
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
