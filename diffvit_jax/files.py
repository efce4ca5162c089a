"""Files written whole or not at all: a reader (or a rerun after a kill) never sees half a file."""

import json
import os
from collections.abc import Callable


def write_atomically(path: str, write: Callable[[str], None], *, suffix: str = ".tmp") -> None:
  """`write(tmp)` then rename tmp to `path` (atomic on one file system)."""
  tmp = path + suffix
  write(tmp)
  os.replace(tmp, path)


def write_json(path: str, data) -> None:
  """`data` as indented, key-sorted JSON at `path`, atomically."""

  def dump(tmp: str) -> None:
    with open(tmp, "w") as f:
      json.dump(data, f, indent=2, sort_keys=True)

  write_atomically(path, dump)


def write_text(path: str, text: str, *, suffix: str = ".tmp") -> None:
  """`text` at `path`, atomically (`suffix`: of the temporary file beside it)."""

  def dump(tmp: str) -> None:
    with open(tmp, "w") as f:
      f.write(text)

  write_atomically(path, dump, suffix=suffix)
