"""The embedded default data set: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).

Bundled with scikit-learn, so the quickstart runs without a download. The
train/validation split is stratified 80/20 with a fixed seed (1,437 / 360),
the same on every machine; 0..16 intensities become 0..255 gray, upsampled
bilinearly to the model's input size.
"""

import functools
import threading

import numpy as np
from PIL import Image

from diffvit_jax.errors import DataError

SPLITS = ("train", "validation")
CLASS_NAMES = [str(d) for d in range(10)]
_VALIDATION_FRACTION = 0.2
_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def split_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  # Imported here: scikit-learn takes a second to import, and only this source needs it.
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  train_x, val_x, train_y, val_y = train_test_split(
      pixels, digits.target.astype(np.int32), test_size=_VALIDATION_FRACTION,
      random_state=_SPLIT_SEED, stratify=digits.target)
  return {"train": (train_x, train_y), "validation": (val_x, val_y)}


class DigitsSource:
  """One split, upsampled once per process on first access (the 8x8 originals are what gets
  pickled to workers); an example is then a read-only view, no per-example PIL call."""

  class_names = CLASS_NAMES

  def __init__(self, split: str, image_size: int):
    if split not in SPLITS:
      raise DataError(f"The digits data set has splits {SPLITS}, not {split!r}; set "
                      "data.train_split / data.eval_split accordingly.")
    self._pixels, self._labels = split_arrays()[split]
    self._image_size = image_size
    self._images = None
    self._lock = threading.Lock()

  def __getstate__(self):
    return {**self.__dict__, "_images": None, "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def _upsampled(self) -> np.ndarray:
    if self._images is not None:  # every example after the first: no lock on the hot path
      return self._images
    with self._lock:  # grain's reader threads arrive together at the first batch
      if self._images is None:
        size = (self._image_size, self._image_size)
        images = np.stack([np.asarray(Image.fromarray(gray).resize(size, Image.BILINEAR)
                                      .convert("RGB")) for gray in self._pixels])
        images.flags.writeable = False
        self._images = images
    return self._images

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self._upsampled()[index], "label": int(self._labels[index])}
