"""Per-example train / eval preprocessing, as grain transforms, on uint8 images.

Normalisation is not here: the jitted steps do it on the device (`data.normalise`).

Frozen dataclasses of plain values (not the ConfigDict), so that they pickle
small and identically into every worker process.
"""

import dataclasses

import grain
import numpy as np

from diffvit_jax.data import augment, corruptions
from diffvit_jax.errors import ConfigError

CROPS = ("none", "random_resized", "pad_crop")


@dataclasses.dataclass(frozen=True)
class TrainPreprocess(grain.transforms.RandomMap):
  """Corruption (optional, at the native size), crop/resize to `image_size`, flip, RandAugment."""

  image_size: int
  crop: str = "none"
  crop_scale_min: float = 0.35
  flip: bool = False
  randaugment: augment.RandAugment | None = None
  corruption: str = ""
  severity: int = 0
  corruption_jpeg: bool = True

  @classmethod
  def from_config(cls, data) -> "TrainPreprocess":
    if data.crop not in CROPS:
      raise ConfigError(f"config.data.crop: {data.crop!r} is not one of {CROPS}.")
    if not 0.0 < data.crop_scale_min <= 1.0:
      raise ConfigError(f"config.data.crop_scale_min: must be in (0, 1], got "
                        f"{data.crop_scale_min!r}.")
    if data.train_corruption:
      corruptions.check(data.train_corruption, data.train_severity, "data.train_corruption")
    return cls(image_size=data.image_size, crop=data.crop, crop_scale_min=data.crop_scale_min,
               flip=bool(data.flip),
               randaugment=augment.parse_randaugment(
                   data.randaugment, fill=augment.fill_from_mean(data.mean),
                   interpolation=data.randaugment_interpolation),
               corruption=data.train_corruption, severity=data.train_severity,
               corruption_jpeg=bool(data.corruption_jpeg))

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image = element["image"]
    if self.corruption:
      # At the data set's own resolution, where the Tiny-ImageNet-C constants apply.
      image = corruptions.apply(image, self.corruption, self.severity, rng,
                                save_jpeg=self.corruption_jpeg)
    if self.crop == "random_resized":
      image = augment.random_resized_crop(image, self.image_size, rng,
                                          scale=(self.crop_scale_min, 1.0))
    elif self.crop == "pad_crop":
      image = augment.pad_crop(image, self.image_size, rng)
    else:
      image = augment.resize(image, self.image_size)
    if self.flip:
      image = augment.random_flip(image, rng)
    if self.randaugment is not None:
      image = self.randaugment(image, rng)
    return {"image": np.ascontiguousarray(image), "label": np.int32(element["label"])}


@dataclasses.dataclass(frozen=True)
class EvalPreprocess(grain.transforms.Map):
  """Deterministic: optional corruption seeded by the example's index, then resize.

  Padding elements (mask 0, no image) become black images.
  """

  image_size: int
  corruption: str = ""
  severity: int = 0
  corruption_jpeg: bool = True  # The generator's final quality-85 JPEG save.

  def map(self, element: dict) -> dict:
    if element["image"] is None:
      image = np.zeros((self.image_size, self.image_size, 3), np.uint8)
    else:
      image = element["image"]
      if self.corruption:
        rng = corruptions.example_rng(self.corruption, self.severity, element["index"])
        image = corruptions.apply(image, self.corruption, self.severity, rng,
                                  save_jpeg=self.corruption_jpeg)
      image = augment.resize(image, self.image_size)
    return {"image": np.ascontiguousarray(image), "label": np.int32(element["label"]),
            "mask": np.float32(element["mask"])}
