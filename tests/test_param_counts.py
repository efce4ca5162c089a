"""Sizes of the six Tiny ImageNet models, from the real parameter trees (jax.eval_shape only).

The study this project reproduces compared ViTs with 1.7-1.85x the parameters
of its DiffViTs; here every model is within 3% of its nominal size and each
ViT/DiffViT pair within 0.5% of each other, in both protocols.
"""

import importlib.util
import os

import jax
import numpy as np
import pytest

from diffvit_jax import config_lib
from diffvit_jax.models import stats


def _load_configs():
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "tiny_imagenet.py")
  spec = importlib.util.spec_from_file_location("tiny_imagenet_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tiny_imagenet = _load_configs()

SIZES = tuple(config_lib.MODEL_SIZES)
NOMINAL = {"10m": 10e6, "20m": 20e6, "30m": 30e6}


def count(arch, size, protocol):
  config = tiny_imagenet.get_config(f"{arch}_{size},{protocol}")
  return stats.count_params(config.model, config.data.image_size)


@pytest.mark.parametrize("protocol", tiny_imagenet.PROTOCOLS)
@pytest.mark.parametrize("size", SIZES)
def test_models_have_their_nominal_size_and_pairs_match(size, protocol):
  vit = count("vit", size, protocol)["total"]
  diffvit = count("diffvit", size, protocol)["total"]
  for arch, total in (("vit", vit), ("diffvit", diffvit)):
    assert abs(total / NOMINAL[size] - 1) < 0.03, (arch, size, protocol, total)
  assert abs(diffvit / vit - 1) < 0.005, (size, protocol, vit, diffvit)


def test_non_embedding_excludes_exactly_the_embedding():
  config = tiny_imagenet.get_config("vit_10m,seed")  # pool='cls', learned posemb
  m = config.model
  counts = stats.count_params(m, config.data.image_size)
  tokens = stats.num_tokens(m, config.data.image_size)
  assert tokens == (64 // 8)**2 + 1
  embedding = (m.patch_size**2 * 3 * m.width + m.width) + tokens * m.width + m.width
  assert counts["total"] - counts["non_embedding"] == embedding


def test_vit_block_count_by_hand():
  """An independent count of the classic ViT: q/k/v/out, MLP, two LayerNorms per block."""
  config = tiny_imagenet.get_config("vit_20m")  # v2: gap, learned posemb, biases, LayerNorm
  m, tokens = config.model, stats.num_tokens(config.model, config.data.image_size)
  d = m.width
  block = 4 * (d * d + d) + (d * m.mlp_dim + m.mlp_dim) + (m.mlp_dim * d + d) + 2 * 2 * d
  expected = (m.patch_size**2 * 3 * d + d) + tokens * d + m.depth * block + 2 * d + (
      d * m.num_classes + m.num_classes)
  assert stats.count_params(m, config.data.image_size)["total"] == expected


@pytest.mark.parametrize("protocol", tiny_imagenet.PROTOCOLS)
def test_diffvit2_extra_params_match_the_closed_form(protocol):
  # Per layer, diffvit2's query projection is D -> 2D instead of D -> D (D*D weights, plus D
  # biases with attn_bias) and it adds W_lambda, D -> H pairs without bias.
  for size in SIZES:
    config = tiny_imagenet.get_config(f"diffvit2_{size},{protocol}")
    m = config.model
    per_layer = m.width * m.width + (m.width if m.attn_bias else 0) + m.width * (m.num_heads // 2)
    assert stats.extra_params_vs_baseline(m, config.data.image_size) == m.depth * per_layer
    vit = tiny_imagenet.get_config(f"vit_{size},{protocol}")
    assert stats.extra_params_vs_baseline(vit.model, vit.data.image_size) == 0


def test_counts_allocate_nothing(monkeypatch):
  """count_params goes through eval_shape: a real init would be a bug (and slow)."""
  def no_init(*args, **kwargs):
    raise AssertionError("count_params must not initialise parameters")

  monkeypatch.setattr(jax.random, "normal", no_init)
  monkeypatch.setattr(jax.random, "truncated_normal", no_init)
  config = tiny_imagenet.get_config("diffvit_30m")
  assert stats.count_params(config.model, config.data.image_size)["total"] > 0


def test_gflops_formula():
  config = tiny_imagenet.get_config("vit_10m")
  m, size = config.model, config.data.image_size
  n, t = stats.count_params(m, size)["non_embedding"], stats.num_tokens(m, size)
  assert stats.gflops_per_image(m, size) == pytest.approx(
      (6 * n * t + 12 * m.depth * t**2 * m.width) / 1e9)
  m.arch = "diffvit2"  # query-key product twice as wide
  n = stats.count_params(m, size)["non_embedding"]
  assert stats.gflops_per_image(m, size) == pytest.approx(
      (6 * n * t + 18 * m.depth * t**2 * m.width) / 1e9)
  assert np.isfinite(stats.gflops_per_image(m, size))
