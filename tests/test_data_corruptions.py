"""Tiny-ImageNet-C corruptions: valid images, seeded, distortion growing with severity."""

import data_fakes
import numpy as np
import pytest

from diffvit_jax.data import corruptions
from diffvit_jax.errors import ConfigError

REQUIRED = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur",
            "contrast", "pixelate", "jpeg_compression")
IMAGES = [data_fakes.natural_image(np.random.default_rng(seed)) for seed in range(4)]


def _distortion(name: str, severity: int) -> float:
  """Mean absolute change over the test images, each with its own fixed seed."""
  total = 0.0
  for i, image in enumerate(IMAGES):
    out = corruptions.apply(image, name, severity, np.random.default_rng(i))
    total += np.abs(out.astype(np.float64) - image).mean()
  return total / len(IMAGES)


def test_the_required_corruptions_exist():
  assert set(REQUIRED) <= set(corruptions.CORRUPTIONS)
  assert set(REQUIRED) <= set(corruptions.PUBLISHED_CORRUPTIONS)


@pytest.mark.parametrize("name", sorted(corruptions.CORRUPTIONS))
def test_each_severity_changes_the_image_more(name):
  distortions = []
  for severity in corruptions.SEVERITIES:
    out = corruptions.apply(IMAGES[0], name, severity, np.random.default_rng(0))
    assert out.shape == IMAGES[0].shape and out.dtype == np.uint8
    assert not np.array_equal(out, IMAGES[0]), (name, severity)
    distortions.append(_distortion(name, severity))
  assert all(np.diff(distortions) > 0), (name, distortions)


@pytest.mark.parametrize("name", sorted(corruptions.CORRUPTIONS))
def test_corruptions_are_seeded_and_keep_odd_shapes(name):
  image = data_fakes.natural_image(np.random.default_rng(9), size=48)[:, :40]
  a = corruptions.apply(image, name, 3, np.random.default_rng(1))
  b = corruptions.apply(image, name, 3, np.random.default_rng(1))
  np.testing.assert_array_equal(a, b)
  assert a.shape == image.shape


def test_apply_checks_its_arguments():
  image = IMAGES[0]
  assert corruptions.apply(image, "", 0, np.random.default_rng(0)) is image
  with pytest.raises(ConfigError, match="not a corruption"):
    corruptions.apply(image, "snowstorm", 1, np.random.default_rng(0))
  with pytest.raises(ConfigError, match="1..5"):
    corruptions.apply(image, "contrast", 6, np.random.default_rng(0))


def test_evaluation_draws_are_fixed_per_example():
  a = corruptions.example_rng("shot_noise", 2, index=7).random(3)
  b = corruptions.example_rng("shot_noise", 2, index=7).random(3)
  c = corruptions.example_rng("shot_noise", 2, index=8).random(3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
