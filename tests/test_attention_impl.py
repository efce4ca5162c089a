"""`config.model.attention_impl`: the resolution rules, and clear errors for impossible paths."""

import jax
import pytest

from diffvit_jax import config_lib
from diffvit_jax.errors import ConfigError
from diffvit_jax.models import attention_impl


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
  with pytest.raises(ConfigError, match="multiples of 8 up to 128, and this model has 192"):
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
