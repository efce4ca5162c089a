"""The fused CPU attention kernel (C++ through the XLA FFI) against plain softmax attention."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffvit_jax import config_lib
from diffvit_jax.kernels import cpu_attention
from diffvit_jax.models import attention, build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def normal(seed, *shape, std=1.0):
  return jnp.asarray(std * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def reference(q, k, v, lam, scale, num_maps):
  """sum_m c_m softmax(scale q[o M + m] k[kh]^T) v[vh] with einsums, at full precision."""
  batch, tokens, q_heads, _ = q.shape
  out_heads = q_heads // num_maps
  k = jnp.repeat(k, q_heads // k.shape[2], axis=2)
  v = jnp.repeat(v, out_heads // v.shape[2], axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, precision="highest") * scale
  probs = jax.nn.softmax(logits, axis=-1).reshape(batch, out_heads, num_maps, tokens, -1)
  mixed = probs[:, :, 0] - lam * probs[:, :, 1] if num_maps == 2 else probs[:, :, 0]
  return jnp.einsum("bots,bsod->btod", mixed, v, precision="highest")


def value_and_grads(fn, args, cotangent):
  loss = lambda *a: jnp.sum(fn(*a) * cotangent)
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)


def test_kernel_is_built_here():
  # CI machines have a C++ compiler: the models must not silently fall back to XLA there.
  assert cpu_attention.available()


# (batch, tokens, q heads, k heads, v heads, qk dim, v dim, maps): classic, grouped queries
# (DiffViT v2), differential pairs (value heads of 2d); token counts and head sizes that
# are not multiples of the kernel's 16 lanes or 32-row blocks exercise its padding.
LAYOUTS = [
    (2, 65, 4, 4, 4, 32, 32, 1),    # seed protocol: 64 patches + class token
    (3, 50, 4, 2, 2, 16, 16, 1),    # grouped queries, as DifferentialAttentionV2
    (2, 37, 6, 6, 3, 8, 16, 2),     # differential, head size 8 (padded to 16)
    (1, 100, 10, 10, 5, 32, 64, 2),  # differential, several query blocks
    (2, 7, 2, 2, 2, 20, 12, 1),     # fewer tokens than one block, odd head sizes
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "x".join(map(str, layout)))
def test_kernel_matches_softmax_attention_with_gradients(layout):
  batch, tokens, q_heads, k_heads, v_heads, qk_dim, v_dim, maps = layout
  q = normal(0, batch, tokens, q_heads, qk_dim, std=2.0)  # peaked rows test the max shift
  k, v = normal(1, batch, tokens, k_heads, qk_dim), normal(2, batch, tokens, v_heads, v_dim)
  lam, scale = jnp.float32(0.37), qk_dim**-0.5
  cotangent = normal(3, batch, tokens, q_heads // maps, v_dim)
  got = value_and_grads(lambda *a: cpu_attention.attention(*a, scale, maps), (q, k, v, lam),
                        cotangent)
  want = value_and_grads(lambda *a: reference(*a, scale, maps), (q, k, v, lam), cotangent)
  out = jax.jit(lambda *a: cpu_attention.attention(*a, scale, maps))(q, k, v, lam)
  np.testing.assert_allclose(out, reference(q, k, v, lam, scale, maps), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got[0], want[0], atol=1e-4)  # a sum of ~1e4 terms of size ~1
  for name, g, w in zip(("dq", "dk", "dv", "dlambda"), got[1], want[1], strict=True):
    np.testing.assert_allclose(g, w, atol=2e-5 * float(jnp.max(jnp.abs(w))) + 1e-7,
                               err_msg=name)
  if maps == 1:
    assert float(got[1][3]) == 0.0


def test_kernel_is_deterministic():
  # Tasks run on whichever pool thread claims them; results must not depend on that
  # (resumed runs are compared bit for bit).
  q, k, v = normal(0, 4, 65, 4, 32), normal(1, 4, 65, 4, 32), normal(2, 4, 65, 2, 64)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      cpu_attention.attention(q, k, v, jnp.float32(0.5), 0.2, 2) ** 2), argnums=(0, 1, 2)))
  first = grads(q, k, v)
  for _ in range(3):
    for a, b in zip(first, grads(q, k, v), strict=True):
      np.testing.assert_array_equal(a, b)


def test_large_logits_do_not_overflow():
  # Rows whose logits are all far below (or above) zero: the row maximum must be subtracted.
  q = jnp.full((1, 20, 2, 16), 30.0, jnp.float32)
  k = jnp.concatenate([normal(1, 1, 20, 2, 16), -normal(1, 1, 20, 2, 16)], axis=-1)[..., :16]
  v = normal(2, 1, 20, 2, 16)
  for sign in (1.0, -1.0):
    out = cpu_attention.attention(sign * q, k, v, jnp.float32(0), 1.0, 1)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out, reference(sign * q, k, v, 0.0, 1.0, 1), atol=1e-5)


@pytest.mark.parametrize("arch", ["vit", "diffvit", "diffvit2"])
def test_models_take_the_kernel_and_match_the_einsum_path(arch):
  model_config = config_lib.model_config(arch=arch, patch_size=4, width=64, depth=2,
                                         num_heads=4, mlp_dim=128, num_classes=5)
  fused = build.build_model(model_config)
  model_config.attention_impl = "einsum"
  plain = build.build_model(model_config)
  images = normal(0, 2, 16, 16, 3)
  params = fused.init(jax.random.PRNGKey(0), images)
  hlo = jax.jit(lambda p: fused.apply(p, images)).lower(params).as_text()
  assert "diffvit_cpu_attention_fwd" in hlo
  loss = lambda model: lambda p: jnp.sum(model.apply(p, images) ** 2)
  got = jax.jit(jax.value_and_grad(loss(fused)))(params)
  want = jax.jit(jax.value_and_grad(loss(plain)))(params)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_disabled_kernel_falls_back_to_xla_attention():
  script = ("from diffvit_jax.kernels import cpu_attention\n"
            "from diffvit_jax.models import attention\n"
            "import jax, jax.numpy as jnp\n"
            "q = jnp.ones((1, 8, 2, 16))\n"
            "hlo = jax.jit(lambda q: attention.fused_attention(q, q, q, 0.25)).lower(q).as_text()\n"
            "print(cpu_attention.available(), 'diffvit_cpu_attention' in hlo)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", DIFFVIT_CPU_ATTENTION="0")
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["False", "False"]


def test_missing_compiler_warns_and_falls_back(tmp_path):
  script = ("from diffvit_jax.kernels import cpu_attention\n"
            "print(cpu_attention.available())\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", CXX=str(tmp_path / "no-such-compiler"),
             DIFFVIT_KERNEL_CACHE=str(tmp_path / "cache"))
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "False"
  assert "fused CPU attention kernel is unavailable" in result.stderr
  assert "no-such-compiler" in result.stderr


def test_compiled_library_is_cached(tmp_path, monkeypatch):
  monkeypatch.setenv(cpu_attention.CACHE_ENV, str(tmp_path))
  first = cpu_attention._compile(tmp_path)
  stamp = first.stat().st_mtime_ns
  assert cpu_attention._compile(tmp_path) == first
  assert first.stat().st_mtime_ns == stamp  # not rebuilt
  assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files left


def test_compiler_failure_is_reported_and_leaves_nothing_behind(tmp_path, monkeypatch):
  monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
  with pytest.raises(RuntimeError, match="false failed"):
    cpu_attention._compile(tmp_path)
  assert list(tmp_path.iterdir()) == []


def test_xla_path_is_kept_for_sharded_computations(monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  q = jnp.ones((1, 8, 2, 16))
  assert not cpu_attention.usable(q, q, q)
  hlo = jax.jit(lambda q: attention.fused_attention(q, q, q, 0.25)).lower(q).as_text()
  assert "diffvit_cpu_attention" not in hlo
