"""Common corruptions of Tiny-ImageNet-C (Hendrycks & Dietterich, ICLR 2019), severities 1-5.

Each corruption maps a uint8 [h, w, 3] image, a severity in 1..5 and a
`np.random.Generator` to a uint8 image of the same shape. The per-severity
constants are the ones published for the 64x64 Tiny-ImageNet-C (smaller than
ImageNet-C's, which are for 224x224); the implementations are numpy / scipy /
PIL re-statements of the published operations (ImageMagick's motion blur and
OpenCV's filters included), so generated images follow the published ones in
kind and strength but are not bit-identical to them (which were also saved as
JPEG afterwards). To evaluate on the published files instead, use
`config.data.source = 'tiny_imagenet_c'`.
"""

import io
import math
import zlib

import numpy as np
import scipy.ndimage
from PIL import Image

from diffvit_jax.errors import ConfigError

# The folder names of the published Tiny-ImageNet-C (readable with
# data.source='tiny_imagenet_c' even where CORRUPTIONS cannot generate them).
PUBLISHED_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)


def _float(image: np.ndarray) -> np.ndarray:
  return image.astype(np.float32) / 255.0


def _uint8(x: np.ndarray) -> np.ndarray:
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# Noise.


def gaussian_noise(image, severity, rng):
  scale = (0.04, 0.08, 0.12, 0.15, 0.18)[severity - 1]
  x = _float(image)
  return _uint8(x + rng.normal(scale=scale, size=x.shape))


def shot_noise(image, severity, rng):
  photons = (250, 100, 50, 30, 15)[severity - 1]
  return _uint8(rng.poisson(_float(image) * photons) / photons)


def impulse_noise(image, severity, rng):
  """Salt and pepper on a fraction `amount` of the values (each channel on its own)."""
  amount = (0.01, 0.02, 0.05, 0.08, 0.14)[severity - 1]
  x = image.copy()
  hit = rng.random(x.shape) < amount
  salt = rng.random(x.shape) < 0.5
  x[hit & salt] = 255
  x[hit & ~salt] = 0
  return x


def speckle_noise(image, severity, rng):
  scale = (0.15, 0.2, 0.25, 0.3, 0.35)[severity - 1]
  x = _float(image)
  return _uint8(x + x * rng.normal(scale=scale, size=x.shape))


# Blur.


def gaussian_blur(image, severity, rng):
  sigma = (0.5, 0.75, 1.0, 1.25, 1.5)[severity - 1]
  return _uint8(scipy.ndimage.gaussian_filter(_float(image), sigma=(sigma, sigma, 0),
                                              mode="nearest"))


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
  """A normalised disk on a 17x17 grid (wider for radius > 8), softened by a 3-tap Gaussian."""
  half = 8 if radius <= 8 else int(math.ceil(radius))
  coords = np.arange(-half, half + 1)
  yy, xx = np.meshgrid(coords, coords, indexing="ij")
  disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
  disk /= disk.sum()
  taps = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur**2))
  taps /= taps.sum()
  for axis in (0, 1):
    disk = scipy.ndimage.convolve1d(disk, taps, axis=axis, mode="mirror")
  return disk


def defocus_blur(image, severity, rng):
  radius, alias_blur = ((0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1))[severity - 1]
  kernel = _disk_kernel(radius, alias_blur)
  x = _float(image)
  out = np.stack([scipy.ndimage.convolve(x[..., c], kernel, mode="mirror")
                  for c in range(x.shape[-1])], axis=-1)
  return _uint8(out)


def _shift_edge(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """x moved by (dy, dx) pixels, uncovered pixels repeating the edge."""
  h, w = x.shape[:2]
  pad_y, pad_x = abs(dy), abs(dx)
  padded = np.pad(x, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="edge")
  return padded[pad_y - dy:pad_y - dy + h, pad_x - dx:pad_x - dx + w]


def motion_blur(image, severity, rng):
  """ImageMagick's one-sided motion blur (radius, sigma) at a random angle in [-45, 45]."""
  radius, sigma = ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3))[severity - 1]
  width = 2 * radius + 1
  weights = np.exp(-np.arange(width) ** 2 / (2 * sigma**2))
  weights /= weights.sum()
  angle = np.deg2rad(rng.uniform(-45, 45))
  x = _float(image)
  out = np.zeros_like(x)
  for i, weight in enumerate(weights):
    dy, dx = int(round(i * math.sin(angle))), int(round(i * math.cos(angle)))
    if abs(dy) >= x.shape[0] or abs(dx) >= x.shape[1]:
      break  # The motion left the image; the remaining weights are negligible.
    out += weight * _shift_edge(x, dy, dx)
  return _uint8(out)


def _central_zoom(x: np.ndarray, factor: float) -> np.ndarray:
  """Zoom into the centre by `factor`, keeping the size."""
  h, w = x.shape[:2]
  ch, cw = int(math.ceil(h / factor)), int(math.ceil(w / factor))
  top, left = (h - ch) // 2, (w - cw) // 2
  zoomed = scipy.ndimage.zoom(x[top:top + ch, left:left + cw], (h / ch, w / cw, 1), order=1)
  return zoomed[:h, :w]


def zoom_blur(image, severity, rng):
  top = (1.06, 1.11, 1.16, 1.21, 1.26)[severity - 1]
  factors = np.arange(1.0, top, 0.01)
  x = _float(image)
  out = x.copy()
  for factor in factors:
    out += _central_zoom(x, factor)
  return _uint8(out / (len(factors) + 1))


# Digital and weather-like.


def contrast(image, severity, rng):
  factor = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
  x = _float(image)
  means = x.mean(axis=(0, 1), keepdims=True)
  return _uint8((x - means) * factor + means)


def brightness(image, severity, rng):
  """Adds c to the HSV value channel: hue and saturation fixed means RGB scales with V."""
  shift = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
  x = _float(image)
  value = x.max(axis=-1, keepdims=True)
  new_value = np.clip(value + shift, 0.0, 1.0)
  scaled = x * (new_value / np.maximum(value, 1e-12))
  return _uint8(np.where(value > 0, scaled, new_value))


def pixelate(image, severity, rng):
  factor = (0.9, 0.8, 0.7, 0.6, 0.5)[severity - 1]
  h, w = image.shape[:2]
  small = Image.fromarray(image).resize((int(w * factor), int(h * factor)), Image.BOX)
  return np.asarray(small.resize((w, h), Image.BOX))


def jpeg_compression(image, severity, rng):
  quality = (65, 58, 50, 40, 25)[severity - 1]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
  with Image.open(buffer) as decoded:
    return np.asarray(decoded.convert("RGB"))


CORRUPTIONS = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}


def check(name: str, severity: int, field: str = "data.eval_corruption") -> None:
  """Raises ConfigError unless `name` is a known corruption and severity is 1..5."""
  if name not in CORRUPTIONS:
    raise ConfigError(f"config.{field}: {name!r} is not a corruption this code can generate; "
                      f"choose one of {', '.join(CORRUPTIONS)}.")
  if severity not in SEVERITIES:
    raise ConfigError(f"config.{field.replace('corruption', 'severity')}: severity must be "
                      f"1..5 for corruption {name!r}, got {severity!r}.")


def apply(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
  """`CORRUPTIONS[name]` at `severity`; the empty name leaves the image as it is."""
  if not name:
    return image
  check(name, severity)
  return CORRUPTIONS[name](image, severity, rng)


def example_rng(name: str, severity: int, index: int, seed: int = 0) -> np.random.Generator:
  """The generator for example `index` of a corrupted evaluation set: one fixed draw per example."""
  return np.random.default_rng((seed, zlib.crc32(name.encode()), severity, index))
