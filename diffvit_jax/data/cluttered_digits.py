"""Cluttered translated digits (Mnih et al. 2014): a digit at a random place among fragments.

Each embedded 8x8 digit, upscaled `digit_scale` times (bilinear), lands at a uniform random
position of a black `image_size` canvas; `fragments` crops (`fragment_size` square, with ink)
of other digits of the same split land at uniform positions whose boxes do not overlap the
digit's box (fragments may overlap each other; pixels combine by max). The label is the
digit's class. Training draws new placements every time an example is read (`draw`, with
the pipeline's per-example generator); validation is fixed: example i is placed with
`seed` and i. Every pixel has a kind: target ink, clutter ink or empty (ink: >= INK of 255);
a patch's kind is target if it holds target ink, else clutter if it holds clutter ink, else
empty (`patch_kinds`), which is what the attention-share measurement reads.

Its fields are `config.data.clutter` (`default_config`), recorded with every run.
"""

import functools

import ml_collections
import numpy as np
from PIL import Image

from diffvit_jax.data import digits
from diffvit_jax.errors import ConfigError

KINDS = ("empty", "clutter", "target")  # pixel / patch kind codes 0, 1, 2
INK = 64  # of 255: a pixel with at least this much ink counts as ink
_CROP_TRIES = 20  # fragments: crops drawn until one has ink
_PLACE_TRIES = 32  # fragment positions drawn, the first that misses the digit's box kept


def default_config() -> ml_collections.ConfigDict:
  """`config.data.clutter`: read when data.source='cluttered_digits'."""
  return ml_collections.ConfigDict(dict(
      fragments=0,  # clutter fragments per image
      digit_scale=3,  # the 8x8 digit is upscaled to 8 * digit_scale pixels
      fragment_size=8,  # side of a fragment, in canvas pixels
      seed=0,  # placement seed of the validation set (fixed across runs)
  ))


def check(data) -> None:
  """ConfigError naming the field when the canvas cannot hold the digit beside a fragment."""
  c = data.clutter
  for field in ("digit_scale", "fragment_size"):
    if isinstance(c[field], bool) or not isinstance(c[field], int) or c[field] < 1:
      raise ConfigError(f"config.data.clutter.{field}: must be a positive integer, got "
                        f"{c[field]!r}.")
  if isinstance(c.fragments, bool) or not isinstance(c.fragments, int) or c.fragments < 0:
    raise ConfigError(f"config.data.clutter.fragments: must be an integer >= 0, got "
                      f"{c.fragments!r}.")
  digit = 8 * c.digit_scale
  if c.fragment_size > digit:
    raise ConfigError(f"config.data.clutter.fragment_size={c.fragment_size} is larger than the "
                      f"upscaled digit ({digit} pixels) it is cropped from.")
  if data.image_size < digit + c.fragment_size:
    raise ConfigError(
        f"config.data.image_size={data.image_size}: a canvas for cluttered digits must be at "
        f"least the digit ({digit}) plus one fragment ({c.fragment_size}) wide, so that a "
        f"fragment fits beside the digit; use image_size >= {digit + c.fragment_size}.")


@functools.lru_cache(maxsize=4)
def _upscaled(split: str, scale: int) -> np.ndarray:
  """The split's digits as uint8 gray [N, 8 scale, 8 scale] (read-only)."""
  pixels, _ = digits.split_arrays()[split]
  size = (8 * scale, 8 * scale)
  out = np.stack([np.asarray(Image.fromarray(p).resize(size, Image.BILINEAR)) for p in pixels])
  out.flags.writeable = False
  return out


@functools.lru_cache(maxsize=4)
def _crop_ink(split: str, scale: int, frag: int) -> np.ndarray:
  ink = np.pad((_upscaled(split, scale) >= INK).astype(np.int32), ((0, 0), (1, 0), (1, 0)))
  table = ink.cumsum(axis=1).cumsum(axis=2)  # summed-area table
  return (table[:, frag:, frag:] - table[:, :-frag, frag:] - table[:, frag:, :-frag]
          + table[:, :-frag, :-frag])


class ClutteredDigitsSource:
  """One split of cluttered digits; pickles as its settings (the upscaled digits are module
  caches, built once per process on first use)."""

  class_names = digits.CLASS_NAMES

  def __init__(self, split: str, image_size: int, fragments: int, digit_scale: int = 3,
               fragment_size: int = 8, seed: int = 0):
    if split not in digits.SPLITS:
      raise ConfigError(f"The cluttered digits have splits {digits.SPLITS}, not {split!r}; "
                        "set data.train_split / data.eval_split accordingly.")
    self.split, self.image_size, self.fragments = split, image_size, fragments
    self.digit_scale, self.fragment_size, self.seed = digit_scale, fragment_size, seed
    self._labels = digits.split_arrays()[split][1]

  def __len__(self) -> int:
    return len(self._labels)

  def _digits(self) -> np.ndarray:
    return _upscaled(self.split, self.digit_scale)

  def compose(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(gray canvas uint8 [S, S], pixel kinds uint8 [S, S]) of example `index` drawn by `rng`."""
    ups = self._digits()
    size, digit, frag = self.image_size, ups.shape[1], self.fragment_size
    canvas = np.zeros((size, size), np.uint8)
    kinds = np.zeros((size, size), np.uint8)
    ty, tx = (int(v) for v in rng.integers(0, size - digit + 1, size=2))
    n = self.fragments
    # All draws at once (a few vectorised calls, not a Python loop of them per fragment).
    others = rng.integers(len(ups) - 1, size=n)
    others += others >= index  # another digit than the target
    corners = rng.integers(0, digit - frag + 1, size=(n, _CROP_TRIES, 2))
    ink = self._crop_ink()[others[:, None], corners[..., 0], corners[..., 1]]  # [n, tries]
    inky = ink >= 0.1 * frag * frag  # the first crop with >= 10% ink, else the inkiest
    pick = np.where(inky.any(axis=1), inky.argmax(axis=1), ink.argmax(axis=1))
    places = rng.integers(0, size - frag + 1, size=(n, _PLACE_TRIES, 2))
    free = self._misses_digit(places[..., 0], places[..., 1], ty, tx)  # [n, tries]
    corner = places[np.arange(n), free.argmax(axis=1)]  # the first free try of each
    for j in np.flatnonzero(~free.any(axis=1)):  # rare: none of the tries missed the digit
      corner[j] = self._any_free_place(ty, tx, rng)
    # Every fragment's pixels at once: [n, frag, frag] crops, pasted by max at their places.
    offsets = np.arange(frag)
    rows = (corners[np.arange(n), pick, 0][:, None] + offsets)[:, :, None]
    cols = (corners[np.arange(n), pick, 1][:, None] + offsets)[:, None, :]
    crops = ups[others[:, None, None], rows, cols]
    ys = (corner[:, 0, None] + offsets)[:, :, None]
    xs = (corner[:, 1, None] + offsets)[:, None, :]
    flat = np.broadcast_to(ys * size + xs, crops.shape).ravel()
    np.maximum.at(canvas.reshape(-1), flat, crops.ravel())
    kinds.reshape(-1)[flat[crops.ravel() >= INK]] = 1
    canvas[ty:ty + digit, tx:tx + digit] = ups[index]
    kinds[ty:ty + digit, tx:tx + digit][ups[index] >= INK] = 2
    return canvas, kinds

  def _crop_ink(self) -> np.ndarray:
    """[N, c, c]: ink pixels of each digit's fragment-sized crop at each corner (c = its count)."""
    return _crop_ink(self.split, self.digit_scale, self.fragment_size)

  def _misses_digit(self, y, x, ty: int, tx: int):
    """Whether a fragment with corner (y, x) misses the digit's box at (ty, tx)."""
    frag, digit = self.fragment_size, 8 * self.digit_scale
    return (y + frag <= ty) | (y >= ty + digit) | (x + frag <= tx) | (x >= tx + digit)

  def _any_free_place(self, ty: int, tx: int, rng) -> np.ndarray:
    """A corner drawn from all those whose fragment misses the digit (some exist: check())."""
    ys, xs = np.meshgrid(*[np.arange(self.image_size - self.fragment_size + 1)] * 2,
                         indexing="ij")
    valid = np.flatnonzero(self._misses_digit(ys, xs, ty, tx))
    k = int(valid[rng.integers(len(valid))])
    return np.array([ys.flat[k], xs.flat[k]])

  def _example(self, index: int, canvas: np.ndarray) -> dict:
    return {"image": np.repeat(canvas[:, :, None], 3, axis=2),
            "label": int(self._labels[index])}

  def _fixed_rng(self, index: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, index])

  def __getitem__(self, index: int) -> dict:
    """Example `index`, placed with `seed` and `index` (the fixed validation set)."""
    return self._example(index, self.compose(index, self._fixed_rng(index))[0])

  def draw(self, index: int, rng: np.random.Generator) -> dict:
    """Example `index` at new positions drawn by `rng` (training: new every epoch)."""
    return self._example(index, self.compose(index, rng)[0])

  def patch_kinds(self, index: int, patch_size: int) -> np.ndarray:
    """Kinds of example `index`'s patches (as __getitem__ places it), uint8 [S/p, S/p]."""
    kinds = self.compose(index, self._fixed_rng(index))[1]
    grid = self.image_size // patch_size
    return kinds.reshape(grid, patch_size, grid, patch_size).max(axis=(1, 3))
