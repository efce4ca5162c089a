"""Per-example training augmentation on uint8 [h, w, 3] images: crops, flip, RandAugment.

Everything draws from the `np.random.Generator` it is given (grain derives
one per example from the pipeline seed and the example's position), so a
seed fixes every augmentation. Mixup and CutMix mix pairs of examples and
live in the jitted train step instead.
"""

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# Geometric RandAugment ops fill uncovered pixels with mid-gray, as the
# reference implementation does, rather than black.
_FILL = (128, 128, 128)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize to size x size (antialiased when shrinking)."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop: random area fraction and aspect ratio, resized to size x size."""
  height, width = image.shape[:2]
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      break
  else:  # Rare (extreme aspect of the image itself): the largest central crop in range.
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, int(round(width / aspect))) if width / height < aspect else (
        int(round(height * aspect)), height)
    w, h = min(w, width), min(h, height)
    top, left = (height - h) // 2, (width - w) // 2
  # One resampling step straight from the crop box to the output size.
  return np.asarray(Image.fromarray(image).resize(
      (size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))


def pad_crop(image: np.ndarray, size: int, rng: np.random.Generator,
             pad_fraction: float = 0.125) -> np.ndarray:
  """Resize to size x size, reflect-pad by size/8 and crop size x size back at random.

  Reflection rather than zeros so that black borders do not become a cue.
  """
  image = resize(image, size)
  pad = max(1, int(round(size * pad_fraction)))
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
  top, left = rng.integers(0, 2 * pad + 1, size=2)
  return padded[top:top + size, left:left + size]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Left-right flip with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


# RandAugment (Cubuk et al. 2020). Each op maps a PIL image and a level in
# [0, 1] (magnitude / 10) to a PIL image; `sign` is +1 or -1 for ops whose
# direction is random.


def _identity(img, level, sign):
  return img


def _autocontrast(img, level, sign):
  return ImageOps.autocontrast(img)


def _equalize(img, level, sign):
  return ImageOps.equalize(img)


def _rotate(img, level, sign):
  return img.rotate(sign * 30.0 * level, resample=Image.BILINEAR, fillcolor=_FILL)


def _solarize(img, level, sign):
  return ImageOps.solarize(img, threshold=256 - int(256 * level))


def _posterize(img, level, sign):
  return ImageOps.posterize(img, bits=max(1, 8 - int(4 * level)))


def _enhancer(enhance_cls):
  def op(img, level, sign):
    return enhance_cls(img).enhance(1.0 + sign * 0.9 * level)
  return op


def _affine(img, coefficients):
  return img.transform(img.size, Image.AFFINE, coefficients, resample=Image.BILINEAR,
                       fillcolor=_FILL)


def _shear_x(img, level, sign):
  return _affine(img, (1, sign * 0.3 * level, 0, 0, 1, 0))


def _shear_y(img, level, sign):
  return _affine(img, (1, 0, 0, sign * 0.3 * level, 1, 0))


def _translate_x(img, level, sign):
  return _affine(img, (1, 0, sign * 0.45 * level * img.size[0], 0, 1, 0))


def _translate_y(img, level, sign):
  return _affine(img, (1, 0, 0, 0, 1, sign * 0.45 * level * img.size[1]))


RANDAUGMENT_OPS = {
    "identity": _identity,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "rotate": _rotate,
    "solarize": _solarize,
    "posterize": _posterize,
    "color": _enhancer(ImageEnhance.Color),
    "contrast": _enhancer(ImageEnhance.Contrast),
    "brightness": _enhancer(ImageEnhance.Brightness),
    "sharpness": _enhancer(ImageEnhance.Sharpness),
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
}
_OP_NAMES = tuple(RANDAUGMENT_OPS)


def randaugment(image: np.ndarray, rng: np.random.Generator, num_layers: int = 2,
                magnitude: float = 9, apply_prob: float = 0.5) -> np.ndarray:
  """`num_layers` ops drawn uniformly, each applied with `apply_prob` at `magnitude` (0..10).

  Applying each op only with probability 1/2 (and a random sign) follows the
  RandAugment used by DeiT/timm for ViTs trained on small data.
  """
  if num_layers <= 0:
    return image
  level = min(max(magnitude / 10.0, 0.0), 1.0)
  img = Image.fromarray(image)
  for _ in range(num_layers):
    name = _OP_NAMES[int(rng.integers(len(_OP_NAMES)))]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if rng.random() < apply_prob:
      img = RANDAUGMENT_OPS[name](img, level, sign)
  return np.asarray(img)
