"""Where examples come from: one random-access source per (data set, split).

A source has `len()`, `source[i] -> {'image': uint8 [h, w, 3] RGB, 'label': int}`
and `class_names`, and pickles cheaply (grain sends it to worker processes).
`data.source` picks the data set:

  tiny_imagenet    the TFDS build of this package (array_record, read without TensorFlow)
  tiny_imagenet_c  the same, but corrupted evaluations read the published
                   Tiny-ImageNet-C files (<manual_dir>/Tiny-ImageNet-C/<corruption>/<severity>/)
  image_folder     <data.dir>/<split>/<class>/<image>
  digits           scikit-learn's bundled 8x8 digits
  cluttered_digits those digits at random places among fragments of others (data.clutter)
"""

import dataclasses
import functools
import json
import os
import pathlib
import zipfile

from diffvit_jax.data import cluttered_digits, digits, image_folder, images
from diffvit_jax.errors import ConfigError, DataError

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_C_URL = "https://zenodo.org/record/2536630"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train: int
  num_eval: int
  class_names: list[str]


def _tiny_imagenet(data, split: str):
  return TinyImagenetSource(tiny_imagenet_builder_dir(data), split)


def _image_folder(data, split: str):
  if not data.dir:
    raise ConfigError("config.data.dir is empty; data.source='image_folder' reads "
                      "<data.dir>/<split>/<class>/<image>.")
  root = pathlib.Path(data.dir).expanduser()
  return image_folder.load(root, split, _image_folder_classes(root, data),
                           on_bad_image=data.on_bad_image)


def _digits(data, split: str):
  return digits.DigitsSource(split, data.image_size)


def _cluttered_digits(data, split: str):
  c = data.clutter
  return cluttered_digits.ClutteredDigitsSource(
      split, data.image_size, c.fragments, c.digit_scale, c.fragment_size, c.seed)


# `data.source` -> (data config, split name) -> source. The config schema takes its
# choices from here: a new data set is a module plus one entry.
SOURCES = {
    "tiny_imagenet": _tiny_imagenet,
    "tiny_imagenet_c": _tiny_imagenet,  # corrupted evaluations read the published files
    "image_folder": _image_folder,
    "digits": _digits,
    "cluttered_digits": _cluttered_digits,
}
# Checks of a source's own config fields, run by config validation before any work.
CHECKS = {"cluttered_digits": cluttered_digits.check}


def check_source(data) -> None:
  if data.source not in SOURCES:
    raise ConfigError(f"config.data.source: {data.source!r} is not one of "
                      f"{', '.join(map(repr, SOURCES))}.")
  if data.source in CHECKS:
    CHECKS[data.source](data)


def get_source(data, split: str):
  """The source of `split` (a split name of the data set, e.g. data.train_split)."""
  check_source(data)
  return SOURCES[data.source](data, split)


def get_published_corrupted_source(data, corruption: str, severity: int):
  """The published Tiny-ImageNet-C images of one corruption and severity."""
  root = _manual_dir(data) / "Tiny-ImageNet-C"
  split_dir = root / corruption / str(severity)
  if not split_dir.is_dir():
    raise DataError(
        f"data.source='tiny_imagenet_c' evaluates on the published Tiny-ImageNet-C files, but "
        f"{split_dir} does not exist. Download Tiny-ImageNet-C from {TINY_IMAGENET_C_URL} and "
        f"extract it into {root.parent} (giving {root}/<corruption>/<severity>/<wnid>/*.JPEG), "
        "or set data.source='tiny_imagenet' to generate the corruption instead.")
  wnids = image_folder.class_folders(split_dir)
  class_names = get_source(data, data.eval_split).class_names
  expected = tiny_imagenet_wnids(data)
  missing = sorted(set(expected) - set(wnids))
  unexpected = sorted(set(wnids) - set(expected))
  if missing or unexpected:
    raise DataError(
        f"The class folders of {split_dir} are not Tiny ImageNet's {len(expected)} wnids "
        f"(wnids.txt): {len(missing)} missing ({_some(missing)}), {len(unexpected)} not "
        f"Tiny ImageNet classes ({_some(unexpected)}). This is not a complete Tiny-ImageNet-C "
        f"folder; download Tiny-ImageNet-C from {TINY_IMAGENET_C_URL} again.")
  # Labels are sorted-wnid indices, as in the TFDS build.
  source = image_folder.load(split_dir.parent, split_dir.name, wnids, on_bad_image="error")
  source.class_names = class_names
  return source


def _some(names: list[str], limit: int = 5) -> str:
  return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "") if names else "none"


def tiny_imagenet_wnids(data) -> list[str]:
  """Tiny ImageNet's class wnids (its wnids.txt), sorted: from the build, else the archive."""
  builder_dir = pathlib.Path(tiny_imagenet_builder_dir(data))
  metadata = builder_dir / "metadata.json"
  if metadata.exists():
    try:
      return sorted(json.loads(metadata.read_text())["wnids"])
    except (ValueError, KeyError) as e:
      raise DataError(f"{metadata} has no list of wnids ({e}): rebuild Tiny ImageNet with "
                      "python -m diffvit_jax.data.build tiny_imagenet.") from e
  # Builds made before the wnids were recorded: the archive they were built from.
  manual = _manual_dir(data)
  for candidate in (manual / "tiny-imagenet-200" / "wnids.txt", manual / "wnids.txt"):
    if candidate.exists():
      return sorted(line.strip() for line in candidate.read_text().splitlines() if line.strip())
  archive = manual / "tiny-imagenet-200.zip"
  if archive.exists():
    try:
      with zipfile.ZipFile(archive) as zf:
        text = zf.read("tiny-imagenet-200/wnids.txt").decode()
      return sorted(line.strip() for line in text.splitlines() if line.strip())
    except (zipfile.BadZipFile, KeyError) as e:
      raise DataError(f"Cannot read tiny-imagenet-200/wnids.txt from {archive} ({e}).") from e
  raise DataError(
      f"Checking the Tiny-ImageNet-C folders needs Tiny ImageNet's wnids.txt, which the build "
      f"in {builder_dir} does not record (it predates that). Rebuild it with python -m "
      "diffvit_jax.data.build tiny_imagenet, or put tiny-imagenet-200.zip (or its extracted "
      f"tiny-imagenet-200/ folder) into {manual}.")


def get_dataset_info(data) -> DatasetInfo:
  check_source(data)
  train = get_source(data, data.train_split)
  num_eval = len(get_source(data, data.eval_split))
  return DatasetInfo(num_classes=len(train.class_names), num_train=len(train),
                     num_eval=num_eval, class_names=list(train.class_names))


# Tiny ImageNet (TFDS, array_record).


class TinyImagenetSource:
  """A split of the TFDS build, opened lazily in whichever process reads it."""

  def __init__(self, builder_dir: str, split: str):
    self._builder_dir = builder_dir
    self._split = split
    info = _builder(builder_dir).info
    try:
      self._len = info.splits[split].num_examples
    except KeyError as e:
      raise DataError(f"Tiny ImageNet in {builder_dir} has splits {list(info.splits)}, not "
                      f"{split!r}; check data.train_split / data.eval_split.") from e
    self.class_names = list(info.features["label"].names)
    self._records = None

  def __getstate__(self):
    # The open ArrayRecord readers stay behind; each worker opens its own.
    return {**self.__dict__, "_records": None}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    if self._records is None:
      import tensorflow_datasets as tfds  # Reading array_record does not import TensorFlow.

      self._records = _builder(self._builder_dir).as_data_source(
          self._split, decoders={"image": tfds.decode.SkipDecoding()})
    record = self._records[index]
    return {"image": images.decode(record["image"]), "label": int(record["label"])}


def tfds_data_dir(data) -> pathlib.Path:
  return pathlib.Path(
      data.dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def tiny_imagenet_builder_dir(data) -> str:
  """`<data_dir>/tiny_imagenet/<latest version>`, or a DataError saying how to build it."""
  data_dir = tfds_data_dir(data)
  versions = sorted(
      (p for p in (data_dir / "tiny_imagenet").glob("*") if (p / "dataset_info.json").exists()),
      key=lambda p: tuple(int(n) if n.isdigit() else -1 for n in p.name.split(".")))
  if not versions:
    manual = data.manual_dir or f"{data_dir}/downloads/manual"
    raise DataError(
        f"Tiny ImageNet is not built in {data_dir} (no tiny_imagenet/<version>/"
        "dataset_info.json). Build it once with\n"
        f"  python -m diffvit_jax.data.prepare tiny_imagenet --data_dir {data_dir}"
        f"{' --manual_dir ' + data.manual_dir if data.manual_dir else ''}\n"
        f"which downloads {TINY_IMAGENET_URL} (248 MB); without internet access, put "
        f"tiny-imagenet-200.zip (or its extracted tiny-imagenet-200/ folder) into {manual} "
        "first. Then point data.dir at that data_dir.")
  _check_array_record(versions[-1])
  return str(versions[-1])


def _check_array_record(builder_dir: pathlib.Path) -> None:
  info = json.loads((builder_dir / "dataset_info.json").read_text())
  file_format = info.get("fileFormat", "tfrecord")
  if file_format != "array_record":
    raise DataError(f"{builder_dir} was written as {file_format}, which needs TensorFlow to "
                    "read; rebuild it with `python -m diffvit_jax.data.prepare tiny_imagenet "
                    f"--data_dir {builder_dir.parent.parent} --overwrite` (array_record).")


@functools.lru_cache(maxsize=4)
def _builder(builder_dir: str):
  import tensorflow_datasets as tfds

  return tfds.builder_from_directory(builder_dir)


def _manual_dir(data) -> pathlib.Path:
  if data.manual_dir:
    return pathlib.Path(data.manual_dir).expanduser()
  return tfds_data_dir(data) / "downloads" / "manual"


def _image_folder_classes(root: pathlib.Path, data) -> list[str]:
  """Class names from the training split's folders (so that labels agree across splits)."""
  for split in (data.train_split, data.eval_split):
    if (root / split).is_dir():
      return image_folder.class_folders(root / split)
  raise DataError(f"data.source='image_folder' needs {root}/{data.train_split}/<class>/<image> "
                  f"(and {root}/{data.eval_split}/...), but neither split folder exists; set "
                  "data.dir to the folder that holds them.")
