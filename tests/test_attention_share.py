"""The attention share on target / clutter / empty patches (evaluation/attention_share.py)."""

import jax
import numpy as np
import pytest

from diffvit_jax import config_lib, models
from diffvit_jax.evaluation import attention_share
from diffvit_jax.models import registry


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_uniform_attention_shares_the_patch_fractions_and_enriches_nothing():
  kinds = np.array([[0, 0, 1, 2], [2, 2, 1, 1]])
  maps = np.full((2, 3, 4, 4), 0.25)
  per = attention_share.image_shares(maps, kinds)
  np.testing.assert_allclose(per["share"], [[0.5, 0.25, 0.25], [0.0, 0.5, 0.5]])
  np.testing.assert_allclose(per["share"], per["fraction"])
  summary = attention_share.summarise([per])
  assert summary["enrichment"][1] == pytest.approx(1.0)
  assert summary["enrichment"][0] == pytest.approx(1.0)  # over the one image with empty patches
  assert summary["negative"] == 0.0


def test_attention_on_the_target_alone_is_all_target():
  kinds = np.array([[0, 1, 2, 2]])
  maps = np.zeros((1, 2, 4, 4))
  maps[..., 2:] = 0.5
  summary = attention_share.summarise([attention_share.image_shares(maps, kinds)])
  assert summary["share"] == pytest.approx([0.0, 0.0, 1.0])
  assert summary["enrichment"][2] == pytest.approx(2.0)
  assert summary["enrichment"][0] == pytest.approx(0.0)


def test_a_differential_map_is_divided_by_its_row_sum_and_keeps_its_negative_entries():
  rng = np.random.default_rng(0)
  a1, a2 = _softmax(rng.normal(size=(2, 2, 5, 5))), _softmax(3 * rng.normal(size=(2, 2, 5, 5)))
  for lam in (np.float32(0.6), rng.uniform(0.2, 0.7, size=(2, 2, 5))):  # V1 scalar, V2 per token
    lam_b = lam[..., None] if np.ndim(lam) else lam
    layer = dict(attn1=a1, attn2=a2, diff=a1 - lam_b * a2, **{"lambda": lam})
    effective = attention_share.effective_map(layer)
    np.testing.assert_allclose(effective.sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(effective * (1 - lam_b), layer["diff"], atol=1e-12)
  per = attention_share.image_shares(effective, np.array([[0, 1, 2, 2, 1]] * 2))
  np.testing.assert_allclose(per["share"].sum(-1), 1.0, atol=1e-12)
  assert (per["negative"] < 0).all()  # A2 peaks where A1 does not: mass is taken away


@pytest.mark.parametrize("arch", list(registry.ARCHS))
def test_every_kinds_sown_maps_give_rows_summing_to_one(arch):
  """From the model's own sown maps (the einsum path), every attention kind."""
  config = config_lib.model_config(arch=arch, width=16, depth=2, num_heads=4, mlp_dim=32,
                                   patch_size=4, num_classes=10, pool="gap")
  model = models.build_model(config)
  images = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
  params = model.init(jax.random.key(1), images, train=False)["params"]
  layers = models.attention_maps(config, params, images)
  assert len(layers) == 2
  for layer in layers:
    effective = attention_share.effective_map(layer)
    assert effective.shape[0] == 3 and effective.shape[-1] == 4
    np.testing.assert_allclose(effective.sum(-1), 1.0, atol=1e-4)
