"""Tiny-ImageNet-C corruptions against the published generator's steps.

The reference is `make_tinyimagenet_c.py` (hendrycks/robustness). Its formulas
are re-evaluated here independently of diffvit_jax.data.corruptions: the
noises' output distributions are computed exactly from the distribution of
the noise and compared with samples; the deterministic corruptions are
compared with small re-statements of the generator's code written in this file
(where the generator needs OpenCV or ImageMagick, from their definitions).
The final JPEG save is switched off except where it is the subject.
"""

import colorsys
import io
import math

import data_fakes
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
from PIL import Image

from diffvit_jax.data import corruptions
from diffvit_jax.errors import ConfigError

IMAGES = [data_fakes.natural_image(np.random.default_rng(seed)) for seed in range(3)]
GRAY = np.full((128, 128, 3), 128, np.uint8)  # 49152 noise samples per call


def _corrupt(image, name, severity, seed=0, save_jpeg=False):
  return corruptions.apply(image, name, severity, np.random.default_rng(seed),
                           save_jpeg=save_jpeg)


def _truncate(x):
  """The generator's np.uint8(np.clip(x, 0, 1) * 255)."""
  return np.uint8(np.clip(x, 0, 1) * 255)


def _assert_close(actual, expected, max_diff=1, min_equal=0.95):
  """Equal up to float rounding before truncation, which moves a value by one level where
  the exact result is a whole number (flat regions); rounding instead of truncating would
  move half of all values."""
  diff = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
  assert diff.max() <= max_diff, diff.max()
  assert (diff == 0).mean() >= min_equal, (diff == 0).mean()


# --- The benchmark's list ---------------------------------------------------------------------

def test_every_benchmark_corruption_but_frost_is_generated():
  assert len(corruptions.BENCHMARK_CORRUPTIONS) == 15
  generated = set(corruptions.BENCHMARK_CORRUPTIONS) - {"frost"}
  assert generated <= set(corruptions.CORRUPTIONS)
  assert set(corruptions.CORRUPTIONS) - generated == set(corruptions.EXTRA_CORRUPTIONS)
  with pytest.raises(ConfigError, match="frost photographs.*tiny_imagenet_c"):
    corruptions.check("frost", 1)


@pytest.mark.parametrize("name", sorted(corruptions.CORRUPTIONS))
def test_corruptions_are_seeded_and_keep_any_shape(name):
  for image in (data_fakes.natural_image(np.random.default_rng(9), size=48)[:, :40],
                IMAGES[0][:8, :8]):
    a = corruptions.apply(image, name, 5, np.random.default_rng(1))
    b = corruptions.apply(image, name, 5, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == image.shape and a.dtype == np.uint8


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                                  "motion_blur", "zoom_blur", "contrast", "pixelate",
                                  "jpeg_compression", "fog", "snow"])
def test_distortion_grows_with_severity(name):
  # (glass blur and elastic transform are not monotonic in the generator either.)
  change = [np.mean([np.abs(_corrupt(im, name, s, seed=i).astype(float) - im).mean()
                     for i, im in enumerate(IMAGES)]) for s in corruptions.SEVERITIES]
  assert all(np.diff(change) > 0), change


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


# --- Noise: sample statistics against the exact output distribution ---------------------------

def _gaussian_output_pmf(mean, std):
  """P(np.uint8(clip(mean + N(0, std), 0, 1) * 255) = k), k = 0..255."""
  edges = (np.arange(1, 256) / 255 - mean) / std  # out >= k  <=>  x >= k / 255
  cdf = scipy.stats.norm.cdf(edges)
  return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


def _shot_output_pmf(x, photons):
  counts = np.arange(0, 20 * photons)
  values = np.uint8(np.clip(counts / photons, 0, 1) * 255)
  return np.bincount(values, scipy.stats.poisson.pmf(counts, x * photons), minlength=256)


def _check_samples(samples, pmf, parameter_std):
  levels = np.arange(256)
  mean = (pmf * levels).sum()
  std = math.sqrt((pmf * (levels - mean) ** 2).sum())
  n = samples.size
  assert samples.mean() == pytest.approx(mean, abs=5 * std / math.sqrt(n))
  assert samples.std() == pytest.approx(std, abs=5 * std / math.sqrt(2 * n))
  # And the difference has the generator's spread (up to truncation and clipping).
  assert samples.std() == pytest.approx(parameter_std, rel=0.03)


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_gaussian_noise_statistics(severity):
  scale = (0.04, 0.08, 0.12, 0.15, 0.18)[severity - 1]
  samples = _corrupt(GRAY, "gaussian_noise", severity).astype(float)
  _check_samples(samples, _gaussian_output_pmf(128 / 255, scale), 255 * scale)


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_speckle_noise_statistics(severity):
  scale = (0.15, 0.2, 0.25, 0.3, 0.35)[severity - 1]
  x = 128 / 255
  samples = _corrupt(GRAY, "speckle_noise", severity).astype(float)
  _check_samples(samples, _gaussian_output_pmf(x, x * scale), 255 * x * scale)


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_shot_noise_statistics(severity):
  photons = (250, 100, 50, 30, 15)[severity - 1]
  x = 128 / 255
  samples = _corrupt(GRAY, "shot_noise", severity).astype(float)
  _check_samples(samples, _shot_output_pmf(x, photons), 255 * math.sqrt(x / photons))


def test_noise_is_truncated_not_rounded():
  # At severity 1 a +0.5 shift of the mean is ten standard errors.
  samples = _corrupt(GRAY, "gaussian_noise", 1).astype(float)
  assert samples.mean() - 128 == pytest.approx(-0.5, abs=0.15)


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_impulse_noise_statistics(severity):
  amount = (0.01, 0.02, 0.05, 0.08, 0.14)[severity - 1]
  out = _corrupt(GRAY, "impulse_noise", severity)
  assert set(np.unique(out)) <= {0, 128, 255}
  n = out.size
  for value in (0, 255):  # Each value is hit with probability amount, salt or pepper evenly.
    p = amount / 2
    assert (out == value).sum() == pytest.approx(n * p, abs=5 * math.sqrt(n * p * (1 - p)))


def test_the_final_jpeg_save_changes_the_noise():
  plain = _corrupt(GRAY, "gaussian_noise", 3).astype(float)
  saved = _corrupt(GRAY, "gaussian_noise", 3, save_jpeg=True)
  expected = Image.open(io.BytesIO(_jpeg_bytes(plain.astype(np.uint8), 85)))
  np.testing.assert_array_equal(saved, np.asarray(expected.convert("RGB")))
  assert abs(saved.astype(float).std() / plain.std() - 1) > 0.1


def _jpeg_bytes(image, quality):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


# --- Deterministic corruptions against re-statements of the generator ------------------------

@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_contrast(severity):
  c = [.4, .3, .2, .1, 0.05][severity - 1]
  for image in IMAGES:
    x = np.array(image) / 255.
    means = np.mean(x, axis=(0, 1), keepdims=True)
    np.testing.assert_array_equal(_corrupt(image, "contrast", severity),
                                  _truncate((x - means) * c + means))


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_brightness(severity):
  c = [.1, .2, .3, .4, .5][severity - 1]
  image = IMAGES[severity % 3]
  expected = np.empty(image.shape)
  for index in np.ndindex(image.shape[:2]):
    h, s, v = colorsys.rgb_to_hsv(*(image[index] / 255.))
    expected[index] = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
  _assert_close(_corrupt(image, "brightness", severity), _truncate(expected))


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_pixelate(severity):
  c = [0.9, 0.8, 0.7, 0.6, 0.5][severity - 1]
  for image in IMAGES:
    small = Image.fromarray(image).resize((int(64 * c), int(64 * c)), Image.BOX)
    np.testing.assert_array_equal(_corrupt(image, "pixelate", severity),
                                  np.asarray(small.resize((64, 64), Image.BOX)))


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_jpeg_compression(severity):
  quality = [65, 58, 50, 40, 25][severity - 1]
  image = IMAGES[0]
  expected = np.asarray(Image.open(io.BytesIO(_jpeg_bytes(image, quality))).convert("RGB"))
  np.testing.assert_array_equal(_corrupt(image, "jpeg_compression", severity), expected)


def _filter_edge(x, kernel_1d):
  """Separable correlation of [h, w, c] with edge-repeating borders, by explicit shifts."""
  r = len(kernel_1d) // 2
  for axis in (0, 1):
    pad = [(0, 0)] * 3
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode="edge")
    x = sum(w * np.take(padded, np.arange(i, i + x.shape[axis]), axis=axis)
            for i, w in enumerate(kernel_1d))
  return x


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_gaussian_blur(severity):
  sigma = [.5, .75, 1, 1.25, 1.5][severity - 1]
  r = int(4 * sigma + 0.5)  # skimage -> scipy: truncate=4
  taps = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
  expected = _truncate(_filter_edge(IMAGES[0] / 255., taps / taps.sum()))
  _assert_close(_corrupt(IMAGES[0], "gaussian_blur", severity), expected)


def _reflect101(x, r):
  return np.pad(x, r, mode="reflect")  # numpy's 'reflect' does not repeat the edge: OpenCV's 101


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_defocus_blur(severity):
  radius, alias = [(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)][severity - 1]
  grid = np.arange(-8, 9)
  xx, yy = np.meshgrid(grid, grid)
  disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
  disk /= disk.sum()
  g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * alias**2))
  g /= g.sum()
  padded = _reflect101(disk, 1)
  kernel = sum(g[i] * g[j] * padded[i:i + 17, j:j + 17] for i in range(3) for j in range(3))
  x = IMAGES[1] / 255.
  expected = np.zeros_like(x)
  for c in range(3):
    padded = _reflect101(x[..., c], 8)
    for i in range(17):
      for j in range(17):
        expected[..., c] += kernel[i, j] * padded[i:i + 64, j:j + 64]
  _assert_close(_corrupt(IMAGES[1], "defocus_blur", severity), _truncate(expected))


def _generator_clipped_zoom(img, zoom_factor):
  h = img.shape[0]
  ch = int(np.ceil(h / zoom_factor))
  top = (h - ch) // 2
  img = scipy.ndimage.zoom(img[top:top + ch, top:top + ch], (zoom_factor, zoom_factor, 1), order=1)
  trim_top = (img.shape[0] - h) // 2
  return img[trim_top:trim_top + h, trim_top:trim_top + h]


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_zoom_blur(severity):
  top = [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1]
  x = (np.array(IMAGES[2]) / 255.).astype(np.float32)
  out = np.zeros_like(x)
  factors = np.arange(1, top, 0.01)
  for factor in factors:
    out += _generator_clipped_zoom(x, factor)
  expected = _truncate((x + out) / (len(factors) + 1))
  np.testing.assert_array_equal(_corrupt(IMAGES[2], "zoom_blur", severity), expected)


def _magick_motion_blur(image, radius, sigma, angle):
  """ImageMagick's MotionBlurImage from its definition, one output pixel at a time."""
  width = 2 * math.ceil(radius) + 1
  k = np.exp(-np.arange(width) ** 2 / (2 * sigma**2))
  k /= k.sum()
  steps = [(math.ceil(i * math.cos(math.radians(angle)) - 0.5),
            math.ceil(i * math.sin(math.radians(angle)) - 0.5)) for i in range(width)]
  h, w = image.shape[:2]
  out = np.zeros(image.shape)
  for row in range(h):
    for col in range(w):
      for weight, (dx, dy) in zip(k, steps, strict=True):
        out[row, col] += weight * image[min(max(row + dy, 0), h - 1), min(max(col + dx, 0), w - 1)]
  return np.floor(out + 0.5).astype(np.uint8)


@pytest.mark.parametrize("angle", [0.0, 31.0, -44.0, 90.0, -120.0])
def test_magick_motion_blur(angle):
  image = IMAGES[0][:24, :24]
  np.testing.assert_array_equal(corruptions.magick_motion_blur(image, 10, 2, angle),
                                _magick_motion_blur(image, 10, 2, angle))


def test_motion_blur_streaks_away_from_the_angle():
  # ImageMagick reads pixels ahead along the angle, so a dot streaks backwards:
  # for angles in [-45, 45] the streak lies left of the dot, never right.
  dot = np.zeros((64, 64, 3), np.uint8)
  dot[32, 40] = 255
  for seed in range(5):
    out = _corrupt(dot, "motion_blur", 3, seed=seed)
    lit = np.argwhere(out[..., 0] > 0)
    assert lit[:, 1].max() == 40 and lit[:, 1].min() <= 36, seed


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_snow(severity):
  c = [(0.1, 0.2, 1, 0.6, 8, 3, 0.8), (0.1, 0.2, 1, 0.5, 10, 4, 0.8),
       (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65),
       (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6)][severity - 1]
  image = IMAGES[severity % 3][:32, :32]  # Square: the generator's clipped_zoom assumes it.
  rng = np.random.default_rng(5)
  x = np.array(image, dtype=np.float32) / 255.
  snow_layer = rng.normal(size=x.shape[:2], loc=c[0], scale=c[1])
  snow_layer = _generator_clipped_zoom(snow_layer[..., np.newaxis], c[2])
  snow_layer[snow_layer < c[3]] = 0
  snow_layer = (np.clip(snow_layer.squeeze(), 0, 1) * 255).astype(np.uint8)
  snow_layer = _magick_motion_blur(snow_layer, c[4], c[5], rng.uniform(-135, -45)) / 255.
  snow_layer = snow_layer[..., np.newaxis]
  gray = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., np.newaxis]
  x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
  expected = _truncate(x + snow_layer + np.rot90(snow_layer, k=2))
  _assert_close(_corrupt(image, "snow", severity, seed=5), expected)


def _generator_glass_blur(x, c, rng):
  gaussian = lambda a: scipy.ndimage.gaussian_filter(a, (c[0], c[0], 0), mode="nearest")  # noqa: E731
  x = np.uint8(gaussian(np.array(x) / 255.) * 255)
  for _ in range(c[2]):
    positions = [(h, w) for h in range(64 - c[1], c[1], -1) for w in range(64 - c[1], c[1], -1)]
    offsets = rng.integers(-c[1], c[1], size=(len(positions), 2))
    for (h, w), (dx, dy) in zip(positions, offsets, strict=True):
      h_prime, w_prime = h + dy, w + dx
      x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]  # The generator's "swap".
  return _truncate(gaussian(x / 255.))


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_glass_blur(severity):
  c = [(0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)][severity - 1]
  expected = _generator_glass_blur(IMAGES[0], c, np.random.default_rng(3))
  np.testing.assert_array_equal(_corrupt(IMAGES[0], "glass_blur", severity, seed=3), expected)


def _generator_plasma_fractal(rng, mapsize=64, wibbledecay=3):
  maparray = np.empty((mapsize, mapsize), dtype=np.float64)
  maparray[0, 0] = 0
  stepsize = mapsize
  wibble = 100

  def wibbledmean(array, wibble):
    return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

  while stepsize >= 2:
    cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
    squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
    squareaccum += np.roll(squareaccum, shift=-1, axis=1)
    maparray[stepsize // 2:mapsize:stepsize, stepsize // 2:mapsize:stepsize] = \
        wibbledmean(squareaccum, wibble)
    drgrid = maparray[stepsize // 2:mapsize:stepsize, stepsize // 2:mapsize:stepsize]
    ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
    ltsum = drgrid + np.roll(drgrid, 1, axis=0) + (ulgrid + np.roll(ulgrid, -1, axis=1))
    maparray[0:mapsize:stepsize, stepsize // 2:mapsize:stepsize] = wibbledmean(ltsum, wibble)
    ttsum = drgrid + np.roll(drgrid, 1, axis=1) + (ulgrid + np.roll(ulgrid, -1, axis=0))
    maparray[stepsize // 2:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum, wibble)
    stepsize //= 2
    wibble /= wibbledecay
  maparray -= maparray.min()
  return maparray / maparray.max()


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_fog(severity):
  c = [(.4, 3), (.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)][severity - 1]
  x = np.array(IMAGES[1]) / 255.
  max_val = x.max()
  x += c[0] * _generator_plasma_fractal(np.random.default_rng(4), wibbledecay=c[1])[..., None]
  _assert_close(_corrupt(IMAGES[1], "fog", severity, seed=4),
                _truncate(x * max_val / (max_val + c[0])))


def test_affine_warp_follows_opencv_conventions():
  # warpAffine(src, M) puts src's point p at M p: a move of (+2, +1) in (x, y)
  # shifts columns by 2 and rows by 1, borders reflected without the edge.
  x = IMAGES[0].astype(np.float32)
  src = np.float32([[53, 53], [53, 11], [11, 11]])
  np.testing.assert_allclose(corruptions._warp_affine_reflect101(x, src, src), x, atol=1e-4)
  moved = corruptions._warp_affine_reflect101(x, src, src + np.float32([2, 1]))
  expected = np.pad(x, ((1, 0), (2, 0), (0, 0)), mode="reflect")[:64, :64]
  np.testing.assert_allclose(moved, expected, atol=1e-3)


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_elastic_transform(severity):
  c = [(64 * 0, 64 * 0, 64 * 0.08), (64 * 0.05, 64 * 0.3, 64 * 0.06),
       (64 * 0.1, 64 * 0.08, 64 * 0.06), (64 * 0.1, 64 * 0.03, 64 * 0.03),
       (64 * 0.16, 64 * 0.03, 64 * 0.02)][severity - 1]
  rng = np.random.default_rng(6)
  image = np.array(IMAGES[2], dtype=np.float32) / 255.
  shape = image.shape
  pts1 = np.float32([[53, 53], [53, 11], [11, 11]])  # centre 32 +- 64 // 3
  pts2 = pts1 + rng.uniform(-c[2], c[2], size=pts1.shape).astype(np.float32)
  image = corruptions._warp_affine_reflect101(image, pts1, pts2)
  smooth = lambda a: scipy.ndimage.gaussian_filter(a, c[1], mode="reflect", truncate=3)  # noqa: E731
  dx = (smooth(rng.uniform(-1, 1, size=shape[:2])) * c[0]).astype(np.float32)[..., np.newaxis]
  dy = (smooth(rng.uniform(-1, 1, size=shape[:2])) * c[0]).astype(np.float32)[..., np.newaxis]
  x, y, z = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
  indices = np.reshape(y + dy, (-1, 1)), np.reshape(x + dx, (-1, 1)), np.reshape(z, (-1, 1))
  warped = scipy.ndimage.map_coordinates(image, indices, order=1, mode="reflect").reshape(shape)
  np.testing.assert_array_equal(_corrupt(IMAGES[2], "elastic_transform", severity, seed=6),
                                _truncate(warped))
