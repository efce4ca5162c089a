"""Per-example training augmentation on uint8 [h, w, 3] images: crops, flip, RandAugment.

Everything draws from the `np.random.Generator` it is given (grain derives
one per example from the pipeline seed and the example's position), so a
seed fixes every augmentation. Mixup and CutMix mix pairs of examples and
live in the jitted train step instead.
"""

import dataclasses
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from diffvit_jax.errors import ConfigError


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


# RandAugment (Cubuk et al. 2020) as timm's `rand_augment_transform` runs it,
# so that a timm policy string such as DeiT's 'rand-m9-mstd0.5-inc1' means the
# same augmentation here: the same op lists, the same magnitude -> argument
# mappings, the same magnitude noise and per-op probability. Magnitudes are on
# timm's 0..10 scale, where 10 is each op's full strength.

_FULL_MAGNITUDE = 10.0
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
INTERPOLATIONS = ("random", *_RESAMPLE)


def _signed(value, negate: bool):
  return -value if negate else value


# Magnitude (after noise and clipping) and a random sign -> the op's argument.
# The arithmetic is written in timm's order so that integer truncations agree
# at every magnitude, noisy ones included.


def _no_argument(magnitude, negate):
  return None


def _rotate_degrees(magnitude, negate):
  return _signed((magnitude / _FULL_MAGNITUDE) * 30.0, negate)


def _shear_factor(magnitude, negate):
  return _signed((magnitude / _FULL_MAGNITUDE) * 0.3, negate)


def _translate_fraction(magnitude, negate):
  # timm's rand policies translate by a fraction of the image (translate_pct
  # 0.45), not by its absolute translate_const, which they never read.
  return _signed((magnitude / _FULL_MAGNITUDE) * 0.45, negate)


def _posterize_bits(magnitude, negate):
  """Keeps 0 (at magnitude 0) to 4 bits: the TPU EfficientNet mapping, harsher when weaker."""
  return int((magnitude / _FULL_MAGNITUDE) * 4)


def _posterize_increasing_bits(magnitude, negate):
  """Keeps 4 bits at magnitude 0 down to none at 10."""
  return 4 - _posterize_bits(magnitude, negate)


def _solarize_threshold(magnitude, negate):
  return min(256, int((magnitude / _FULL_MAGNITUDE) * 256))


def _solarize_increasing_threshold(magnitude, negate):
  """256 (nothing inverted) at magnitude 0 down to 0 (everything inverted) at 10."""
  return 256 - _solarize_threshold(magnitude, negate)


def _solarize_addend(magnitude, negate):
  return min(128, int((magnitude / _FULL_MAGNITUDE) * 110))


def _enhance_factor(magnitude, negate):
  """0.1 .. 1.9 with magnitude; 1 (no change) sits at magnitude 5."""
  return (magnitude / _FULL_MAGNITUDE) * 1.8 + 0.1


def _enhance_increasing_factor(magnitude, negate):
  """1 (no change) at magnitude 0, moving to 1 +- 0.9 at 10 in a random direction."""
  return max(0.1, 1.0 + _signed((magnitude / _FULL_MAGNITUDE) * 0.9, negate))


# The ops themselves: (PIL image, argument) -> PIL image. Geometric ones also
# take the fill of uncovered pixels and the resampling filter.


def _posterize(img, bits):
  """Keeps the top `bits` bits of every channel; 0 bits is a black image.

  Our own table rather than ImageOps.posterize, which since Pillow 13 refuses
  0 bits: timm's PosterizeIncreasing asks for 0 at magnitude 10 (2% of draws
  at m9 with mstd 0.5) and got black from the Pillow releases DeiT ran on.
  """
  if bits >= 8:
    return img
  mask = 0xFF & ~(2 ** (8 - bits) - 1)
  return img.point([value & mask for value in range(256)] * len(img.getbands()))


def _solarize_add(img, addend):
  """Brightens pixels below 128 by `addend` (saturating at 255); the rest stay."""
  table = [min(255, value + addend) if value < 128 else value for value in range(256)]
  return img.point(table * len(img.getbands()))


def _enhance(enhancer_class):
  def op(img, factor):
    return enhancer_class(img).enhance(factor)
  return op


def _rotate(img, degrees, fill, resample):
  return img.rotate(degrees, resample=resample, fillcolor=fill)


def _affine(img, coefficients, fill, resample):
  return img.transform(img.size, Image.AFFINE, coefficients, resample=resample, fillcolor=fill)


def _shear_x(img, factor, fill, resample):
  return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def _shear_y(img, factor, fill, resample):
  return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def _translate_x(img, fraction, fill, resample):
  return _affine(img, (1, 0, fraction * img.size[0], 0, 1, 0), fill, resample)


def _translate_y(img, fraction, fill, resample):
  return _affine(img, (1, 0, 0, 0, 1, fraction * img.size[1]), fill, resample)


# timm's op names -> (magnitude -> argument, op).
_PIXEL_OPS = {
    "AutoContrast": (_no_argument, lambda img, _: ImageOps.autocontrast(img)),
    "Equalize": (_no_argument, lambda img, _: ImageOps.equalize(img)),
    "Invert": (_no_argument, lambda img, _: ImageOps.invert(img)),
    "Posterize": (_posterize_bits, _posterize),
    "PosterizeIncreasing": (_posterize_increasing_bits, _posterize),
    "Solarize": (_solarize_threshold, ImageOps.solarize),
    "SolarizeIncreasing": (_solarize_increasing_threshold, ImageOps.solarize),
    "SolarizeAdd": (_solarize_addend, _solarize_add),
    "Color": (_enhance_factor, _enhance(ImageEnhance.Color)),
    "ColorIncreasing": (_enhance_increasing_factor, _enhance(ImageEnhance.Color)),
    "Contrast": (_enhance_factor, _enhance(ImageEnhance.Contrast)),
    "ContrastIncreasing": (_enhance_increasing_factor, _enhance(ImageEnhance.Contrast)),
    "Brightness": (_enhance_factor, _enhance(ImageEnhance.Brightness)),
    "BrightnessIncreasing": (_enhance_increasing_factor, _enhance(ImageEnhance.Brightness)),
    "Sharpness": (_enhance_factor, _enhance(ImageEnhance.Sharpness)),
    "SharpnessIncreasing": (_enhance_increasing_factor, _enhance(ImageEnhance.Sharpness)),
}
_GEOMETRIC_OPS = {
    "Rotate": (_rotate_degrees, _rotate),
    "ShearX": (_shear_factor, _shear_x),
    "ShearY": (_shear_factor, _shear_y),
    "TranslateXRel": (_translate_fraction, _translate_x),
    "TranslateYRel": (_translate_fraction, _translate_y),
}

# timm's _RAND_TRANSFORMS (inc0) and _RAND_INCREASING_TRANSFORMS (inc1), in its order.
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
            "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
            "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                       "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                       "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
GEOMETRIC_OPS = tuple(_GEOMETRIC_OPS)


def apply_op(img: Image.Image, name: str, magnitude: float, negate: bool = False,
             fill: tuple[int, ...] = (128, 128, 128),
             resample: int = Image.BICUBIC) -> Image.Image:
  """One op at a given (already noised and clipped) magnitude; `negate` flips signed ops."""
  if name in _GEOMETRIC_OPS:
    argument, op = _GEOMETRIC_OPS[name]
    return op(img, argument(magnitude, negate), fill, resample)
  argument, op = _PIXEL_OPS[name]
  return op(img, argument(magnitude, negate))


def fill_from_mean(mean) -> tuple[int, ...]:
  """The fill DeiT gives timm (`img_mean`): the normalisation mean as uint8."""
  return tuple(min(255, round(255 * x)) for x in mean)


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """`num_layers` ops drawn uniformly with replacement, each applied with `prob`.

  Each applied op draws its magnitude from N(magnitude, magnitude_std) (or
  uniformly from [0, magnitude] when magnitude_std is inf), clipped to
  [0, magnitude_max], then a random sign for signed ops and, for geometric
  ops, a resampling filter: bilinear or bicubic at random as timm's default
  ('random'), or a fixed one (DeiT's training script fixes bicubic through its
  --train-interpolation).
  """

  num_layers: int = 2
  magnitude: int = 10
  magnitude_std: float = 0.0
  magnitude_max: float = _FULL_MAGNITUDE
  prob: float = 0.5
  increasing: bool = False
  fill: tuple[int, ...] = (128, 128, 128)
  interpolation: str = "random"

  @property
  def ops(self) -> tuple[str, ...]:
    return RAND_INCREASING_OPS if self.increasing else RAND_OPS

  def draw_magnitude(self, rng: np.random.Generator) -> float:
    magnitude = float(self.magnitude)
    if self.magnitude_std == math.inf:
      magnitude = rng.uniform(0.0, magnitude)
    elif self.magnitude_std > 0:
      magnitude = rng.normal(magnitude, self.magnitude_std)
    return min(max(magnitude, 0.0), self.magnitude_max)

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if self.num_layers <= 0:
      return image
    ops = self.ops
    img = Image.fromarray(image)
    for _ in range(self.num_layers):
      name = ops[int(rng.integers(len(ops)))]
      if rng.random() >= self.prob:
        continue
      magnitude = self.draw_magnitude(rng)
      negate = bool(rng.random() < 0.5)
      resample = None
      if name in _GEOMETRIC_OPS:
        choice = (self.interpolation if self.interpolation != "random"
                  else ("bilinear", "bicubic")[int(rng.integers(2))])
        resample = _RESAMPLE[choice]
      img = apply_op(img, name, magnitude, negate, self.fill, resample)
    return np.asarray(img)


_POLICY_KEYS = {"m": "magnitude", "n": "num_layers", "p": "prob", "mstd": "magnitude_std",
                "mmax": "magnitude_max", "inc": "increasing"}


def parse_randaugment(policy: str, *, fill: tuple[int, ...] = (128, 128, 128),
                      interpolation: str = "random",
                      field: str = "data.randaugment") -> RandAugment | None:
  """A timm policy string ('rand-m9-mstd0.5-inc1') -> RandAugment; '' -> None (off).

  Sections after 'rand' (any order): m<int> magnitude 0..10 (default 10),
  n<int> layers (2), p<float> per-op probability (0.5), mstd<float> magnitude
  noise std (0; above 100 means uniform in [0, m]), mmax<int> magnitude clip
  (10), inc<0|1> the increasing op variants (0). timm's defaults throughout.
  """
  def fail(why):
    raise ConfigError(
        f"config.{field}: {policy!r} is not a RandAugment policy this code runs ({why}). Use a "
        "timm-style string 'rand-<section>-...' with sections m<int> (magnitude 0..10), n<int> "
        "(layers), p<float> (probability per op), mstd<float> (magnitude noise), mmax<int> "
        "(magnitude clip) and inc<0|1> (increasing ops), e.g. 'rand-m9-mstd0.5-inc1' as in "
        "DeiT, or '' for no RandAugment.")

  if not isinstance(policy, str):
    fail("not a string")
  if not policy:
    return None
  head, *sections = policy.split("-")
  if head != "rand":
    fail("it must start with 'rand'")
  values = {}
  for section in sections:
    match = re.fullmatch(r"([a-z]+)(\d[\d.]*)", section)
    if not match or match.group(1) not in _POLICY_KEYS:
      fail(f"unknown section {section!r}")
    key, text = match.groups()
    if key in values:
      fail(f"{key!r} is given twice")
    try:
      values[key] = int(text) if key in ("m", "n", "mmax", "inc") else float(text)
    except ValueError:
      fail(f"{text!r} is not a valid value for {key!r}")
  if "inc" in values and values["inc"] not in (0, 1):
    fail("inc must be 0 or 1")
  if "p" in values and not 0.0 <= values["p"] <= 1.0:
    fail("p must be in [0, 1]")
  if "mmax" in values and values["mmax"] < 1:
    fail("mmax must be at least 1")
  if values.get("mstd", 0.0) > 100:
    values["mstd"] = math.inf
  if interpolation not in INTERPOLATIONS:
    raise ConfigError(f"RandAugment interpolation {interpolation!r} is not one of "
                      f"{INTERPOLATIONS}.")
  kwargs = {_POLICY_KEYS[key]: value for key, value in values.items()}
  if "increasing" in kwargs:
    kwargs["increasing"] = bool(kwargs["increasing"])
  if "magnitude_max" in kwargs:
    kwargs["magnitude_max"] = float(kwargs["magnitude_max"])
  return RandAugment(**kwargs, fill=tuple(fill), interpolation=interpolation)
