"""`config.model.attention_impl`: the resolution rules, and clear errors for impossible paths."""

import itertools
import time

import jax
import pytest

from diffvit_jax import config_lib
from diffvit_jax.errors import ConfigError
from diffvit_jax.models import attention_impl, stats


def model(arch="vit", **overrides):
  fields = dict(arch=arch, width=256, depth=2, num_heads=8, mlp_dim=512)  # head size 32
  fields.update(overrides)
  return config_lib.model_config(**fields)


@pytest.mark.parametrize("backend, overrides, impl", [
    ("cpu", {}, "xla"),
    ("cpu", dict(attn_dropout=0.1), "einsum"),
    ("gpu", dict(dtype="bfloat16"), "cudnn"),
    ("gpu", {}, "xla"),  # float32: cuDNN's flash attention takes 16-bit inputs only
    ("gpu", dict(dtype="bfloat16", attn_dropout=0.1), "einsum"),
    ("gpu", dict(dtype="bfloat16", width=1280), "xla"),  # head size 160 > 128
    ("gpu", dict(dtype="bfloat16", width=200), "xla"),  # head size 25, not a multiple of 8
    ("tpu", dict(dtype="bfloat16"), "xla"),
])
def test_auto_rules(backend, overrides, impl):
  resolved = attention_impl.resolve(model(**overrides), backend)
  assert resolved.impl == impl
  assert resolved.requested == "auto" and resolved.backend == backend
  assert resolved.reason.startswith("auto")


def test_diffvit2_cudnn_head_size_is_the_pair_size():
  # diffvit2's heads are 2d = 2 * width / num_heads: 64 is fine, 2 * 96 = 192 is not.
  assert attention_impl.resolve(model("diffvit2", dtype="bfloat16"), "gpu").impl == "cudnn"
  wide = model("diffvit2", dtype="bfloat16", width=768)
  assert attention_impl.resolve(wide, "gpu").impl == "xla"
  with pytest.raises(ConfigError, match="multiples of 8 up to 128 .*this model has 192"):
    attention_impl.resolve(_with(wide, attention_impl="cudnn"), "gpu")


def _with(config, **fields):
  config = config.copy_and_resolve_references()
  config.update(fields)
  return config


@pytest.mark.parametrize("backend, overrides, why", [
    ("cpu", dict(dtype="bfloat16"), "needs an NVIDIA GPU"),
    ("gpu", {}, "16-bit"),
    ("gpu", dict(dtype="bfloat16", attn_dropout=0.1), "attention-probability dropout"),
])
def test_cudnn_that_cannot_run_is_a_config_error(backend, overrides, why):
  with pytest.raises(ConfigError, match=why) as error:
    attention_impl.resolve(model(attention_impl="cudnn", **overrides), backend)
  assert "attention_impl='cudnn' cannot run here" in str(error.value)


CUDA = lambda major, minor: attention_impl.DeviceInfo("gpu", "cuda", (major, minor))


@pytest.mark.parametrize("device, impl, why", [
    (CUDA(9, 0), "cudnn", "cuDNN can run"),
    (CUDA(8, 0), "cudnn", "cuDNN can run"),
    (CUDA(7, 5), "xla", "compute capability 8.0 or more (Ampere or newer); this one is 7.5"),
    (attention_impl.DeviceInfo("gpu", "rocm"), "xla", "this GPU is 'rocm'"),
    (attention_impl.DeviceInfo("cpu"), "xla", "JAX's backend here is 'cpu'"),
])
def test_auto_reads_the_device(device, impl, why):
  resolved = attention_impl.resolve(model(dtype="bfloat16"), device=device)
  assert (resolved.impl, resolved.backend) == (impl, device.platform)
  assert why in resolved.reason


def test_cudnn_on_a_pre_ampere_gpu_is_a_config_error():
  with pytest.raises(ConfigError, match="compute capability 8.0 or more.*this one is 7.5"):
    attention_impl.resolve(model(attention_impl="cudnn", dtype="bfloat16"), device=CUDA(7, 5))


class _FakeClient:
  def __init__(self, platform_version):
    self.platform_version = platform_version


class _FakeDevice:
  def __init__(self, platform, platform_version, **attributes):
    self.platform, self.client = platform, _FakeClient(platform_version)
    self.__dict__.update(attributes)


def test_device_info_of_a_jax_device():
  # JAX's own cuDNN checks tell CUDA from ROCm by the client's platform_version.
  of = attention_impl.DeviceInfo.of
  assert of(_FakeDevice("gpu", "cuda 12080", compute_capability="8.6")) == CUDA(8, 6)
  assert of(_FakeDevice("gpu", "rocm 60300", compute_capability="gfx90a")) == (
      attention_impl.DeviceInfo("gpu", "rocm"))
  assert of(jax.devices("cpu")[0]) == attention_impl.DeviceInfo("cpu")


def test_explicit_paths():
  assert attention_impl.resolve(model(attention_impl="einsum"), "gpu").impl == "einsum"
  assert attention_impl.resolve(model(attention_impl="xla"), "cpu").impl == "xla"
  with pytest.raises(ConfigError, match="dropout"):
    attention_impl.resolve(model(attention_impl="xla", attn_dropout=0.1), "cpu")


def test_chunk_budget_default_by_backend_and_override():
  assert attention_impl.resolve(model(), "cpu").chunk_mib == 256
  assert attention_impl.resolve(model(), "gpu").chunk_mib == 1024
  assert attention_impl.resolve(model(attention_chunk_mib=64), "cpu").chunk_mib == 64


def test_unknown_impl_is_rejected_by_the_schema():
  with pytest.raises(ConfigError, match="attention_impl"):
    config_lib.validate_model(model(attention_impl="fused"))


# JAX's own cuDNN checks, asked by lowering for 'cuda' (the CUDA plugin is part of the test
# set-up: these tests do not skip without it, they fail).
CAPABILITIES = ((8, 0), (8, 9), (9, 0))
DTYPES = ("bfloat16", "float16", "float32")
TOKENS = (16, 17, 64, 65, None)  # None: the forward pass only
# Head sizes across 8..256 and past it, with the limits (128, 256) and non-multiples of 8.
HEADS = (8, 16, 24, 64, 120, 128, 136, 192, 248, 256, 264, 4, 12, 100, 250)
EVERY_HEAD = tuple(range(8, 257, 8)) + (4, 12, 100, 250, 260)


def _ask(head: int, tokens, dtype: str, capability):
  training = tokens is not None
  asked, message = attention_impl.ask_jax(
      (head, head), tokens if training else attention_impl.FORWARD_TOKENS, dtype, capability,
      training)
  assert asked, f"JAX could not be asked (is the CUDA plugin installed?): {message}"
  return message


def test_own_rule_equals_jax_over_a_grid():
  # The project's copy of JAX's rules (used where JAX has no CUDA plugin) says no exactly
  # where JAX's checks do: token parity x head size x dtype x compute capability, training
  # and forward-only; every multiple of 8 up to 256 at one token count.
  start = time.monotonic()
  grid = set(itertools.product(HEADS, TOKENS, DTYPES, CAPABILITIES))
  grid |= set(itertools.product(EVERY_HEAD, (64,), ("bfloat16",), CAPABILITIES))
  disagree = []
  for head, tokens, dtype, capability in sorted(grid, key=str):
    theirs = _ask(head, tokens, dtype, capability)
    ours = attention_impl.own_rule((head, head), tokens, dtype, capability)
    if (ours is None) != (theirs is None):
      disagree.append(dict(head=head, tokens=tokens, dtype=dtype, capability=capability,
                           ours=ours, jax=theirs))
  assert not disagree, disagree
  # Both parities, both verdicts and the capability-gated sizes are in the grid.
  assert _ask(64, 65, "bfloat16", (9, 0)) and _ask(64, 64, "bfloat16", (9, 0)) is None
  assert _ask(256, 64, "bfloat16", (9, 0)) is None and _ask(256, 64, "bfloat16", (8, 9))
  assert _ask(64, None, "bfloat16", (8, 0)) is None and _ask(64, 17, "float16", (8, 0))
  print(f"{len(grid)} cases in {time.monotonic() - start:.1f} s")


def test_jax_capability_makes_jax_answer_for_the_target():
  from jax._src.cudnn import fused_attention_stablehlo as fused

  before = (fused.check_compute_capability, fused.is_cuda_compute_capability_equal)
  with attention_impl.jax_capability("9.0"):
    assert fused.check_compute_capability("9.0") and fused.check_compute_capability("8.0")
    assert not fused.check_compute_capability("10.0")
    assert fused.is_cuda_compute_capability_equal("9.0")
    with attention_impl.jax_capability((8, 9)):  # nests
      assert not fused.check_compute_capability("9.0")
    assert fused.check_compute_capability("9.0")
  assert (fused.check_compute_capability, fused.is_cuda_compute_capability_equal) == before
  with attention_impl.jax_capability(None):  # nothing patched
    assert fused.check_compute_capability is before[0]


def _seed_like(arch="vit", **overrides):
  # The seed protocol's shape: 64x64 images, 8x8 patches, a class token -> 65 tokens.
  fields = dict(arch=arch, width=256, depth=2, num_heads=8, mlp_dim=512, patch_size=8,
                pool="cls", dtype="bfloat16")
  fields.update(overrides)
  config = config_lib.model_config(**fields)
  return config, stats.num_tokens(config, 64)


@pytest.mark.parametrize("arch", ["vit", "diffvit", "diffvit2"])
def test_odd_token_count_rules_cudnn_out_for_training(arch):
  config, tokens = _seed_like(arch)
  assert tokens == 65
  hopper = CUDA(9, 0)
  resolved = attention_impl.resolve(config, device=hopper, tokens=tokens)
  assert resolved.impl == "xla"
  assert ("JAX's cuDNN attention backward needs an even token count and this model has 65"
          in resolved.reason)
  assert "JAX's cuDNN checks" in resolved.reason  # JAX answered, not our copy
  with pytest.raises(ConfigError, match="even token count and this model has 65"):
    attention_impl.resolve(_with(config, attention_impl="cudnn"), device=hopper, tokens=tokens)
  # Forward only (tokens not known): the backward's rule does not apply.
  assert attention_impl.resolve(config, device=hopper).impl == "cudnn"
  # Even tokens (no class token: 64 patches) train on cuDNN.
  even, tokens = _seed_like(arch, pool="gap")
  assert tokens == 64
  resolved = attention_impl.resolve(even, device=hopper, tokens=tokens)
  assert resolved.impl == "cudnn" and "training at 64 tokens" in resolved.reason


def test_head_size_256_needs_hopper():
  # diffvit at head size 128 runs one cuDNN call at 2d = 256: Hopper only (JAX's rule).
  config, _ = _seed_like("diffvit", width=1024, num_heads=8, pool="gap")
  assert attention_impl.resolve(config, device=CUDA(9, 0), tokens=64).impl == "cudnn"
  resolved = attention_impl.resolve(config, device=CUDA(8, 9), tokens=64)
  assert resolved.impl == "xla" and "up to 128" in resolved.reason
  # A GPU of unknown capability is planned as the least one cuDNN runs on (8.0).
  resolved = attention_impl.resolve(config, "gpu", tokens=64)
  assert resolved.impl == "xla" and "8.0 assumed" in resolved.reason


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_attention_dropout_rules_cudnn_out(capability):
  config, _ = _seed_like(pool="gap", attn_dropout=0.1)
  resolved = attention_impl.resolve(config, device=CUDA(*capability), tokens=64)
  assert resolved.impl == "einsum"
  assert attention_impl.cudnn_problem(config, CUDA(*capability), 64) == (
      "it has no attention-probability dropout and config.model.attn_dropout > 0")


def test_without_the_cuda_plugin_the_own_rule_answers(monkeypatch):
  # No cuDNN for JAX to report (no CUDA plugin): check_cudnn_version raises RuntimeError,
  # and the project's copy of the rules answers, saying so.
  from jax._src.cudnn import fused_attention_stablehlo as fused

  attention_impl.ask_jax.cache_clear()
  monkeypatch.setattr(fused, "cuda_versions", None)
  try:
    config, tokens = _seed_like()
    resolved = attention_impl.resolve(config, device=CUDA(9, 0), tokens=tokens)
    assert resolved.impl == "xla" and "even token count" in resolved.reason
    assert "the project's own rule (JAX cannot be asked here: cuDNN is not detected" in (
        resolved.reason)
    even, tokens = _seed_like(pool="gap")
    assert attention_impl.resolve(even, device=CUDA(9, 0), tokens=tokens).impl == "cudnn"
  finally:
    attention_impl.ask_jax.cache_clear()  # later tests ask JAX again
