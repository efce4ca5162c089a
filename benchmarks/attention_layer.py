r"""One attention layer, forward + backward: our paths against torch's fused SDPA, and its parts.

  .venv/bin/python benchmarks/attention_layer.py                      # digits 32x32 shape
  .venv/bin/python benchmarks/attention_layer.py --shape=32,65,10,32  # seed 10m
  .venv/bin/python benchmarks/attention_layer.py --parts              # + each product alone

--shape is batch, tokens, heads, head size. Timed: the 'einsum' and 'xla'
paths of `models/attention_ops.py` (jitted, fwd+bwd through `jax.vjp`) and
`torch.nn.functional.scaled_dot_product_attention` (fwd+bwd), medians over
--repeats. --parts times the pieces XLA runs as separate ops on
[B, N, T, S] probabilities, and torch's matmul / exp on the same tensors, to show
where the time goes (RESULTS.md, "JAX against timm ... Why 256 tokens misses").
"""

import os
import sys
import time

from absl import app, flags

_SHAPE = flags.DEFINE_list("shape", ["128", "256", "4", "16"], "batch, tokens, heads, head size")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls; the median is reported.")
_PARTS = flags.DEFINE_bool("parts", False, "Also time the separate products and the exp.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere


def _median_ms(fn, repeats: int) -> float:
  import statistics

  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return round(1e3 * statistics.median(times), 1)


def main(argv):
  del argv
  from diffvit_jax import cpu_runtime

  cpu_runtime.apply_cpu_defaults()
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from diffvit_jax.models import attention_ops

  batch, tokens, heads, head = (int(v) for v in _SHAPE.value)
  scale = head**-0.5
  rng = np.random.default_rng(0)
  q, k, v, dout = (rng.standard_normal((batch, tokens, heads, head), dtype=np.float32)
                   for _ in range(4))
  jq, jk, jv, jdout = (jnp.asarray(a) for a in (q, k, v, dout))
  paths = {
      impl: lambda q, k, v, impl=impl: attention_ops.attention(q, k, v, scale=scale, impl=impl)
      for impl in ("einsum", "xla")
  }
  ready = jax.block_until_ready
  print(f"shape B={batch} T={tokens} N={heads} h={head}, XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}, load {os.getloadavg()}")
  for name, fn in paths.items():
    forward = jax.jit(fn)
    both = jax.jit(lambda q, k, v, d, fn=fn: jax.vjp(fn, q, k, v)[1](d))
    print(f"jax {name:7s} fwd {_median_ms(lambda f=forward: ready(f(jq, jk, jv)), _REPEATS.value)}"
          f" ms, fwd+bwd "
          f"{_median_ms(lambda f=both: ready(f(jq, jk, jv, jdout)), _REPEATS.value)} ms")

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  heads_major = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1, 3)))
  tq, tk, tv = (heads_major(a).requires_grad_(True) for a in (q, k, v))
  tdout = heads_major(dout)
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def torch_forward():
    with torch.no_grad():
      sdpa(tq, tk, tv)

  def torch_both():
    sdpa(tq, tk, tv).backward(tdout)

  print(f"torch sdpa fwd {_median_ms(torch_forward, _REPEATS.value)} ms, fwd+bwd "
        f"{_median_ms(torch_both, _REPEATS.value)} ms")

  if _PARTS.value:
    hq, hk = (jnp.transpose(a, (0, 2, 1, 3)) for a in (jq, jk))
    probs = jax.nn.softmax(jnp.einsum("bnth,bnsh->bnts", hq, hk) * scale, -1)
    hdout = jnp.transpose(jdout, (0, 2, 1, 3))
    parts = {
        "q k^T   bnth,bnsh->bnts": (lambda a, b: jnp.einsum("bnth,bnsh->bnts", a, b), hq, hk),
        "p v     bnts,bnsh->bnth": (lambda a, b: jnp.einsum("bnts,bnsh->bnth", a, b), probs, hk),
        "p^T do  bnts,bnth->bnsh": (lambda a, b: jnp.einsum("bnts,bnth->bnsh", a, b), probs,
                                    hdout),
        "exp(p - row max)": (lambda a, b: jnp.exp(a - b), probs, probs[..., :1]),
    }
    for name, (fn, a, b) in parts.items():
      f = jax.jit(fn)
      print(f"jax {name}: {_median_ms(lambda f=f, a=a, b=b: ready(f(a, b)), _REPEATS.value)} ms")
    tprobs = torch.from_numpy(np.asarray(probs))
    tk_detached = tk.detach()
    print(f"torch p k: {_median_ms(lambda: tprobs @ tk_detached, _REPEATS.value)} ms, "
          f"p^T do: {_median_ms(lambda: tprobs.transpose(-1, -2) @ tdout, _REPEATS.value)} ms, "
          f"exp: {_median_ms(lambda: torch.exp(tprobs), _REPEATS.value)} ms")


if __name__ == "__main__":
  app.run(main)
