"""Any `<root>/<split>/<class>/.../<image>` tree as a source; class names = sorted folder names.

Every file is decoded once when the folder is first scanned, so that a
corrupt or truncated image is found here, named and skipped (or reported as
an error), instead of crashing a worker process hours into training.
"""

import concurrent.futures
import functools
import logging
import os
import pathlib
import warnings

import numpy as np

from diffvit_jax.data import images
from diffvit_jax.errors import DataError

# Bad files listed by name in the warning; beyond that, only counted.
_MAX_NAMED = 20


class ImageFolderSource:
  """Random access to (image, label) pairs of one split; picklable for grain workers."""

  def __init__(self, files: list[str], labels: list[int], class_names: list[str]):
    self.files = files
    self.labels = np.asarray(labels, np.int32)
    self.class_names = class_names

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    path = self.files[index]
    try:
      image = images.read(path)
    except (OSError, ValueError) as e:  # The file changed since it was scanned.
      raise DataError(f"Cannot decode {path} ({e}); it decoded when the folder was scanned, so "
                      "it changed since: fix or remove it and restart.") from e
    return {"image": image, "label": int(self.labels[index])}


def class_folders(split_dir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def load(root: os.PathLike, split: str, class_names: list[str] | None = None,
         on_bad_image: str = "skip") -> ImageFolderSource:
  """Scans `<root>/<split>`; labels index `class_names` (default: this split's folders)."""
  split_dir = pathlib.Path(root) / split
  if not split_dir.is_dir():
    raise DataError(f"There is no folder {split_dir}: an image_folder data set needs "
                    f"<data.dir>/<split>/<class>/<image> (data.dir={str(root)!r}, "
                    f"split={split!r}).")
  return _load_cached(str(split_dir.resolve()), tuple(class_names or class_folders(split_dir)),
                      on_bad_image)


@functools.lru_cache(maxsize=16)
def _load_cached(split_dir: str, class_names: tuple[str, ...],
                 on_bad_image: str) -> ImageFolderSource:
  # Cached: dataset info, the train and the eval iterators all ask for the same scan.
  split_path = pathlib.Path(split_dir)
  unknown = sorted(set(class_folders(split_path)) - set(class_names))
  if unknown:
    raise DataError(f"{split_dir} has class folders {unknown[:5]} that the training split does "
                    "not have; every evaluation class must also be a training class.")
  candidates, labels = [], []
  for label, name in enumerate(class_names):
    class_dir = split_path / name
    if not class_dir.is_dir():
      continue  # A class absent from this split (e.g. a small validation split).
    for path in sorted(class_dir.rglob("*")):
      if path.suffix.lower() in images.IMAGE_EXTENSIONS and path.is_file():
        candidates.append(str(path))
        labels.append(label)
  if not candidates:
    raise DataError(f"{split_dir} holds no images ({', '.join(images.IMAGE_EXTENSIONS)}) in "
                    "class folders; expected <split>/<class>/<image>.")
  errors = _find_undecodable(candidates)
  if errors:
    _report_bad(split_dir, errors, on_bad_image, len(candidates))
    kept = [i for i, path in enumerate(candidates) if path not in errors]
    candidates = [candidates[i] for i in kept]
    labels = [labels[i] for i in kept]
  if not candidates:
    raise DataError(f"None of the images in {split_dir} could be decoded.")
  return ImageFolderSource(candidates, labels, list(class_names))


def _find_undecodable(paths: list[str]) -> dict[str, str]:
  """path -> error message, for the files PIL cannot fully decode."""

  def error_of(path):
    try:
      images.read(path)
    except Exception as e:  # PIL raises a zoo of types for bad data.
      return f"{type(e).__name__}: {e}"
    return None

  # Threads: PIL decodes outside the GIL.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    results = pool.map(error_of, paths, chunksize=64)
    return {path: err for path, err in zip(paths, results, strict=True) if err is not None}


def _report_bad(split_dir: str, errors: dict[str, str], on_bad_image: str, total: int) -> None:
  listing = "; ".join(f"{path} ({err})" for path, err in list(errors.items())[:_MAX_NAMED])
  more = f" and {len(errors) - _MAX_NAMED} more" if len(errors) > _MAX_NAMED else ""
  if on_bad_image == "error":
    raise DataError(f"{len(errors)} of {total} images in {split_dir} cannot be decoded: "
                    f"{listing}{more}. Fix or remove them, or set data.on_bad_image='skip' to "
                    "train without them.")
  message = (f"Skipping {len(errors)} of {total} images in {split_dir} that cannot be decoded "
             f"(data.on_bad_image='skip'): {listing}{more}.")
  logging.warning(message)
  warnings.warn(message, stacklevel=3)
