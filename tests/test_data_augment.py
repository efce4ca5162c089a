"""Crops, flip and RandAugment: shapes, seeding, and RandAugment equal to timm's.

timm (a test dependency) is the reference: each op at fixed magnitudes, signs
and filters gives the same pixels as timm's `AugmentOp`, a policy string
builds the same policy as timm's `rand_augment_transform`, and the random
choices (op, application, magnitude noise, sign, filter) have timm's
distribution, checked over many seeded draws at five standard errors.
"""

import math

import data_fakes
import numpy as np
import pytest
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data import create_transform

from diffvit_jax import config_lib
from diffvit_jax.data import augment, preprocess
from diffvit_jax.errors import ConfigError

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


def _test_image(size=64, seed=0):
  """A diagonal gradient plus noise, spanning about 20..220: both sides of the
  solarize thresholds, and room for autocontrast to stretch."""
  yy, xx = np.mgrid[0:size, 0:size]
  ramp = 40 + np.stack([xx, yy, (xx + yy) / 2], -1) * (160.0 / (size - 1))
  noise = np.random.default_rng(seed).normal(0.0, 6.0, (size, size, 3))
  return np.clip(ramp + noise, 0, 255).astype(np.uint8)


DEIT_FILL = augment.fill_from_mean((0.485, 0.456, 0.406))
ALL_OPS = sorted(set(augment.RAND_OPS) | set(augment.RAND_INCREASING_OPS))


def test_op_lists_are_timms():
  assert augment.RAND_INCREASING_OPS == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
  assert augment.RAND_OPS == tuple(timm_aa._RAND_TRANSFORMS)


def test_fill_is_what_deit_gives_timm():
  transform = create_transform(64, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                               mean=(0.485, 0.456, 0.406))
  rand_augment = next(t for t in transform.transforms
                      if isinstance(t, timm_aa.RandAugment))
  assert {op.kwargs["fillcolor"] for op in rand_augment.ops} == {DEIT_FILL}
  assert DEIT_FILL == (124, 116, 104)
  # The pipeline takes it from data.mean.
  data = config_lib.data_config(randaugment="rand-m9-mstd0.5-inc1", mean=(0.485, 0.456, 0.406))
  assert preprocess.TrainPreprocess.from_config(data).randaugment.fill == DEIT_FILL


@pytest.mark.parametrize("name", ALL_OPS)
def test_op_equals_timms(name, monkeypatch):
  image = Image.fromarray(_test_image())
  filters = (Image.BILINEAR, Image.BICUBIC) if name in augment.GEOMETRIC_OPS else (None,)
  changed = 0
  for negate in (False, True):
    # timm draws the sign in `_randomly_negate`; fixing it makes its op deterministic.
    monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v, negate=negate: -v if negate else v)
    for magnitude in (0, 2.6, 5, 7.3, 9, 10):
      for resample in filters:
        hparams = dict(translate_const=28, img_mean=DEIT_FILL,
                       interpolation=resample or Image.BICUBIC)
        reference = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
        ours = np.asarray(augment.apply_op(image, name, magnitude, negate, DEIT_FILL,
                                           resample))
        try:
          expected = np.asarray(reference(image))
        except ValueError as error:
          # Pillow >= 13 refuses to keep 0 bits, which timm asks for at magnitude 10
          # (increasing) or below 2.5 (not); older Pillow, as DeiT ran, gave black.
          assert name.startswith("Posterize") and "bits" in str(error), error
          assert (magnitude == 10) == (name == "PosterizeIncreasing")
          expected = np.zeros_like(ours)
        np.testing.assert_array_equal(ours, expected, err_msg=f"{name} m={magnitude} "
                                      f"negate={negate} resample={resample}")
        changed += not np.array_equal(ours, np.asarray(image))
  assert changed  # Every op visibly changes the image at some magnitude.


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-n3-m7",
                                    "rand-m10-n1-p0.3-inc1", "rand-mstd101-m6",
                                    "rand-m15-mmax20-inc1", "rand"])
def test_policy_string_builds_timms_policy(policy):
  ours = augment.parse_randaugment(policy, fill=DEIT_FILL)
  theirs = timm_aa.rand_augment_transform(policy, dict(translate_const=28, img_mean=DEIT_FILL))
  assert ours.num_layers == theirs.num_layers
  assert ours.ops == tuple(op.name for op in theirs.ops)
  op = theirs.ops[0]
  assert (ours.prob, ours.magnitude, ours.magnitude_std) == (op.prob, op.magnitude,
                                                             op.magnitude_std)
  assert ours.magnitude_max == (op.magnitude_max or 10)


@pytest.mark.parametrize("policy", ["rand-m9-x3", "auto-m9", "rand-m9.5", "rand-inc2",
                                    "rand-p1.5", "rand-m9-m8", "rand-tweights", "rand-m",
                                    "rand-mmax0", "v0"])
def test_bad_policy_strings_name_the_field(policy):
  with pytest.raises(ConfigError, match=r"config\.data\.randaugment: .*rand-m9-mstd0\.5-inc1"):
    augment.parse_randaugment(policy)
  config = config_lib.base_config()
  config.data.randaugment = policy
  config.train.steps = 1
  with pytest.raises(ConfigError, match=r"config\.data\.randaugment"):
    config_lib.validate(config, num_devices=1)


def test_empty_policy_is_off():
  assert augment.parse_randaugment("") is None


def _record_draws(monkeypatch, policy, num_images, image_size=4):
  """Runs the policy on `num_images` tiny images, recording each op instead of applying it."""
  applied = []

  def record(img, name, magnitude, negate, fill, resample):
    applied[-1].append((name, magnitude, negate, resample))
    return img

  monkeypatch.setattr(augment, "apply_op", record)
  image = _test_image(image_size)
  for seed in range(num_images):
    applied.append([])
    policy(image, np.random.default_rng(seed))
  return applied


def _within(observed, expected, standard_error, what):
  assert abs(observed - expected) <= 5 * standard_error, (
      f"{what}: observed {observed:.4f}, expected {expected:.4f} +- {5 * standard_error:.4f}")


def test_deit_policy_draw_statistics(monkeypatch):
  policy = augment.parse_randaugment("rand-m9-mstd0.5-inc1", fill=DEIT_FILL)
  assert (policy.num_layers, policy.prob, policy.magnitude, policy.magnitude_std) == (
      2, 0.5, 9, 0.5)
  num_images = 20_000
  applied = _record_draws(monkeypatch, policy, num_images)
  per_image = np.array([len(ops) for ops in applied])
  # Two layers, each applied with probability 1/2: Binomial(2, 1/2) ops per image.
  _within(per_image.mean(), 1.0, math.sqrt(0.5 / num_images), "ops per image")
  for count, p in ((0, 0.25), (1, 0.5), (2, 0.25)):
    _within((per_image == count).mean(), p, math.sqrt(p * (1 - p) / num_images),
            f"P({count} ops)")
  draws = [draw for ops in applied for draw in ops]
  names = [name for name, *_ in draws]
  n = len(draws)
  p = 1 / len(augment.RAND_INCREASING_OPS)
  assert set(names) == set(augment.RAND_INCREASING_OPS)
  for name in augment.RAND_INCREASING_OPS:
    _within(names.count(name) / n, p, math.sqrt(p * (1 - p) / n), f"frequency of {name}")
  # Magnitudes: N(9, 0.5) clipped to [0, 10].
  magnitudes = np.array([m for _, m, *_ in draws])
  assert magnitudes.min() >= 0.0 and magnitudes.max() == 10.0

  def normal_cdf(x):
    return 0.5 * (1 + math.erf((x - 9.0) / (0.5 * math.sqrt(2))))

  for threshold in (8.0, 8.5, 9.0, 9.5):
    q = normal_cdf(threshold)
    _within((magnitudes < threshold).mean(), q, math.sqrt(q * (1 - q) / n), f"P(m < {threshold})")
  clipped = 1 - normal_cdf(10.0)
  _within((magnitudes == 10.0).mean(), clipped, math.sqrt(clipped * (1 - clipped) / n),
          "P(m clipped to 10)")
  # E[min(X, 10)] for X ~ N(9, 0.5): mu Phi(a) - sigma phi(a) + 10 (1 - Phi(a)), a = 2.
  pdf = math.exp(-2.0) / math.sqrt(2 * math.pi)
  expected_mean = 9.0 * (1 - clipped) - 0.5 * pdf + 10.0 * clipped
  _within(magnitudes.mean(), expected_mean, 0.5 / math.sqrt(n), "mean magnitude")
  negated = np.array([negate for _, _, negate, _ in draws])
  _within(negated.mean(), 0.5, math.sqrt(0.25 / n), "P(negative sign)")
  filters = [resample for name, *_, resample in draws if name in augment.GEOMETRIC_OPS]
  assert None not in filters
  _within(filters.count(Image.BICUBIC) / len(filters), 0.5, math.sqrt(0.25 / len(filters)),
          "P(bicubic)")


def test_uniform_magnitude_and_fixed_filter(monkeypatch):
  policy = augment.parse_randaugment("rand-m6-mstd101-p1", interpolation="bicubic")
  draws = [d for ops in _record_draws(monkeypatch, policy, 2000) for d in ops]
  assert len(draws) == 4000  # p1: both layers always apply.
  magnitudes = np.array([m for _, m, *_ in draws])
  assert magnitudes.min() >= 0 and magnitudes.max() <= 6
  _within(magnitudes.mean(), 3.0, 6 / math.sqrt(12 * len(draws)), "mean uniform magnitude")
  assert {r for name, *_, r in draws if name in augment.GEOMETRIC_OPS} == {Image.BICUBIC}


def test_randaugment_is_seeded_and_changes_images():
  image = _test_image(96)
  policy = augment.parse_randaugment("rand-m9-mstd0.5-inc1", fill=DEIT_FILL)
  a = policy(image, np.random.default_rng(5))
  np.testing.assert_array_equal(a, policy(image, np.random.default_rng(5)))
  assert a.shape == image.shape and a.dtype == np.uint8
  changed = [not np.array_equal(policy(image, np.random.default_rng(s)), image)
             for s in range(200)]
  # No op is the identity at magnitude ~9, so an image is unchanged only when no
  # layer applied: probability 1/4.
  _within(1 - np.mean(changed), 0.25, math.sqrt(0.25 * 0.75 / 200), "P(unchanged)")
  assert augment.parse_randaugment("rand-n0")(image, np.random.default_rng(0)) is image
