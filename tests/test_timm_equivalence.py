"""Our ViT / DiffViT equal timm's VisionTransformer (attn_layer 'attn' / 'diff'), weights ported.

timm is the independent reference: the logits of the same config, weights
ported with `convert.from_timm`, agree to float32 tolerance. timm's init is
perturbed first (noise on every tensor, norm scales and lambdas included) so
that a transposed kernel, a missing bias or a wrong lambda_init shows.
"""

import jax
import numpy as np
import pytest

from diffvit_jax import config_lib
from diffvit_jax.errors import ConfigError
from diffvit_jax.interop import convert
from diffvit_jax.models import build_model, lambda_init, posemb
from diffvit_jax.models.vit import stochastic_depth_rates

torch = pytest.importorskip("torch")
vision_transformer = pytest.importorskip("timm.models.vision_transformer")

IMAGE = 16
TOLERANCE = 1e-4


def small_config(arch, **overrides):
  fields = dict(arch=arch, width=48, depth=2, num_heads=4, mlp_dim=96, patch_size=4,
                num_classes=7)
  fields.update(overrides)
  return config_lib.model_config(**fields)


def timm_model(config, seed=0):
  """timm's model for `config`, eval mode, every parameter perturbed."""
  torch.manual_seed(seed)
  model = vision_transformer.VisionTransformer(**convert.timm_kwargs(config, IMAGE)).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      # Larger noise on the lambda vectors: their init (std 0.1) keeps lambda ~ lambda_init.
      param.add_((0.5 if "lambda" in name else 0.1) * torch.randn_like(param))
  return model


def compare(config, model):
  images = np.random.default_rng(0).standard_normal((3, IMAGE, IMAGE, 3)).astype(np.float32)
  with torch.no_grad():
    expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  params = convert.from_timm(model.state_dict(), config)
  # 'xla' has no attention-probability dropout, so a config with one cannot name it.
  for impl in ("einsum", "auto" if config.attn_dropout else "xla"):
    config.attention_impl = impl
    ours = jax.jit(build_model(config).apply)({"params": params}, images)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOLERANCE, rtol=0)
  assert np.abs(expected).max() > 0.1  # a signal, not zeros


CASES = {
    # (pool, norm, attn_bias, depth, posemb)
    "cls-rmsnorm-nobias-d2": dict(pool="cls", norm="rmsnorm", attn_bias=False, depth=2),
    "gap-layernorm-bias-d3": dict(pool="gap", norm="layernorm", attn_bias=True, depth=3),
    "cls-layernorm-bias-d3": dict(pool="cls", norm="layernorm", attn_bias=True, depth=3),
    "gap-rmsnorm-nobias-d2-sincos": dict(pool="gap", norm="rmsnorm", attn_bias=False, depth=2,
                                         posemb="sincos2d"),
    # Dropout settings must not act in eval mode, in either model.
    "cls-rmsnorm-bias-d2-dropout": dict(pool="cls", norm="rmsnorm", attn_bias=True, depth=2,
                                        dropout=0.1, attn_dropout=0.1, stoch_depth=0.1),
}


@pytest.mark.parametrize("arch", ["vit", "diffvit"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_timm(arch, case):
  config = small_config(arch, **CASES[case])
  model = timm_model(config)
  if config.posemb == "sincos2d":
    # timm has no sin-cos option: give its learned pos_embed our fixed table.
    with torch.no_grad():
      model.pos_embed.copy_(_sincos_pos_embed(config))
  compare(config, model)


def _sincos_pos_embed(config):
  """Our sin-cos table in timm's layout: [1, T, D], zeros for the class token."""
  table = posemb.sincos_2d(IMAGE // config.patch_size, IMAGE // config.patch_size, config.width)
  return torch.from_numpy(np.pad(table, [(int(config.pool == "cls"), 0), (0, 0)])[None])


def test_timm_model_matches_our_structure():
  """The timm model really is differential with H = num_heads // 2 pairs and our lambda_init."""
  config = small_config("diffvit", depth=3, stoch_depth=0.1)
  model = timm_model(config)
  for i, block in enumerate(model.blocks):
    assert type(block.attn).__name__ == "DiffAttention"
    assert block.attn.num_heads == config.num_heads // 2
    assert block.attn.head_dim == config.width // config.num_heads
    assert block.attn.lambda_init == pytest.approx(lambda_init(i + 1))
    assert block.mlp.fc1.out_features == config.mlp_dim
  timm_rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
  np.testing.assert_allclose(stochastic_depth_rates(0.1, 3), timm_rates, atol=1e-7)


@pytest.mark.parametrize("arch, overrides", [
    ("vit", dict(pool="cls", norm="rmsnorm", attn_bias=False)),
    ("diffvit", dict(pool="gap", norm="layernorm", attn_bias=True)),
])
def test_round_trip_to_timm_and_back(arch, overrides):
  config = small_config(arch, **overrides)
  state = timm_model(config).state_dict()
  params = convert.from_timm(state, config)
  back = convert.to_timm(params, config)
  assert back.keys() == state.keys()
  for key, value in state.items():
    assert torch.equal(back[key], value), key
  # And the ported tree is exactly the tree our model initialises.
  shapes = jax.eval_shape(build_model(config).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, IMAGE, IMAGE, 3), np.float32))["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, params)


def test_mismatched_config_is_a_config_error():
  state = timm_model(small_config("vit", attn_bias=True)).state_dict()
  with pytest.raises(ConfigError):
    convert.from_timm(state, small_config("vit", attn_bias=False))
  with pytest.raises(ConfigError, match="diffvit2"):
    convert.timm_kwargs(small_config("diffvit2"), IMAGE)
