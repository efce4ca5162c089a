"""The precision policy: which dtype each class of tensor uses, from `config.model.dtype`.

  tensor class                                  dtype
  parameters, optimizer state, gradients        float32
  matmul / conv inputs, block activations       compute dtype (`model.dtype`)
  matmul accumulation                           float32 (XLA / cuDNN accumulate in f32)
  the residual stream (block outputs added)     float32, as under PyTorch's autocast
  attention logits, softmax and its statistics  float32
  norm statistics (LayerNorm, RMSNorm)          float32 (output in the compute dtype)
  lambda (exp / sigmoid) and its projection     float32
  the differential subtraction, by path:
    'einsum', 'xla': (A1 - lambda A2) formed    float32, rounded once to the compute dtype
      before the single value product
    'cudnn': A1 v and A2 v, one fused call      cuDNN returns both in the compute dtype;
      (q/k zero-padded to 2d), then subtracted  A1 v - lambda A2 v in float32
  differential head norm and its scale          float32
  pooling, head, logits, loss                   float32

The models follow this table (vit.py, the attention modules, attention_ops.py);
tests/test_precision.py checks it on the traced train step of every registered
arch, and each differential path's error against float32 at near-uniform
attention (bfloat16: ~0.3% on 'einsum'/'xla', ~1.2% on the cuDNN form, whose
two rounded products nearly cancel). The resolved policy is logged at start
and written to run_info.json under 'precision'.
"""

import dataclasses

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Policy:
  compute: str  # matmul inputs and activations
  params: str = "float32"
  optimizer_state: str = "float32"
  gradients: str = "float32"
  accumulation: str = "float32"
  softmax: str = "float32"
  norm_statistics: str = "float32"
  differential_lambda: str = "float32"
  residual_stream: str = "float32"
  logits_and_loss: str = "float32"

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  def describe(self) -> str:
    return (f"compute {self.compute} (matmul inputs, block activations); float32 parameters, "
            "optimizer state, gradients, residual stream, softmax, norm statistics, lambda, "
            "logits and loss")


def policy(model_config) -> Policy:
  """The policy of `config.model` (its `dtype` is the compute dtype)."""
  if model_config.dtype not in COMPUTE_DTYPES:
    raise ValueError(f"config.model.dtype={model_config.dtype!r} is not one of "
                     f"{COMPUTE_DTYPES}.")
  return Policy(compute=model_config.dtype)
