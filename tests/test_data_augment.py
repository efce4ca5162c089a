"""Crops, flip and RandAugment: shapes, dtypes, seeding."""

import data_fakes
import numpy as np
import pytest

from diffvit_jax.data import augment

IMAGE = data_fakes.natural_image(np.random.default_rng(0), size=64)


def test_random_resized_crop_is_seeded_and_sized():
  a = augment.random_resized_crop(IMAGE, 96, np.random.default_rng(1), scale=(0.35, 1.0))
  b = augment.random_resized_crop(IMAGE, 96, np.random.default_rng(1), scale=(0.35, 1.0))
  c = augment.random_resized_crop(IMAGE, 96, np.random.default_rng(2), scale=(0.35, 1.0))
  assert a.shape == (96, 96, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # A scale of exactly 1 with aspect 1 is the whole image, resized.
  whole = augment.random_resized_crop(IMAGE, 96, np.random.default_rng(0), scale=(1.0, 1.0),
                                      ratio=(1.0, 1.0))
  np.testing.assert_array_equal(whole, augment.resize(IMAGE, 96))


def test_random_resized_crop_handles_extreme_shapes():
  strip = IMAGE[:4]
  out = augment.random_resized_crop(strip, 32, np.random.default_rng(0), scale=(0.9, 1.0))
  assert out.shape == (32, 32, 3)


def test_pad_crop_shifts_by_at_most_the_padding():
  out = augment.pad_crop(IMAGE, 64, np.random.default_rng(3))
  assert out.shape == (64, 64, 3)
  shifted = [augment.pad_crop(IMAGE, 64, np.random.default_rng(s)) for s in range(20)]
  assert any(not np.array_equal(s, IMAGE) for s in shifted)
  # The centre 48x48 of the input is inside every crop (padding is 8).
  for s in shifted:
    assert any(np.array_equal(s[dy:dy + 48, dx:dx + 48], IMAGE[8:56, 8:56])
               for dy in range(17) for dx in range(17))


def test_flip_happens_about_half_the_time():
  flips = [not np.array_equal(augment.random_flip(IMAGE, np.random.default_rng(s)), IMAGE)
           for s in range(200)]
  assert 70 < sum(flips) < 130


@pytest.mark.parametrize("name", sorted(augment.RANDAUGMENT_OPS))
def test_each_randaugment_op(name):
  from PIL import Image

  op = augment.RANDAUGMENT_OPS[name]
  out = np.asarray(op(Image.fromarray(augment.resize(IMAGE, 96)), 0.9, -1.0))
  assert out.shape == (96, 96, 3) and out.dtype == np.uint8


def test_randaugment_is_seeded():
  image = augment.resize(IMAGE, 96)
  a = augment.randaugment(image, np.random.default_rng(5), num_layers=2, magnitude=9)
  b = augment.randaugment(image, np.random.default_rng(5), num_layers=2, magnitude=9)
  np.testing.assert_array_equal(a, b)
  assert augment.randaugment(image, np.random.default_rng(5), num_layers=0) is image
  changed = [not np.array_equal(
      augment.randaugment(image, np.random.default_rng(s), 2, 9), image) for s in range(20)]
  assert sum(changed) > 10
