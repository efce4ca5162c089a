"""Position embeddings: learned (a parameter) or fixed 2-D sin-cos (a constant)."""

import numpy as np

POSEMBS = ("learn", "sincos2d")


def sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """big_vision's `posemb_sincos_2d`: [grid_h * grid_w, width], row-major over the grid.

  A quarter of the channels each for sin(x), cos(x), sin(y), cos(y), with
  frequencies 1 / temperature^(i / (width/4 - 1)).
  """
  if width % 4:
    raise ValueError(f"sincos2d needs a width divisible by 4, got {width}.")
  y, x = np.mgrid[:grid_h, :grid_w]
  omega = np.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1.0 / temperature**omega
  y = np.einsum("m,d->md", y.reshape(-1), omega)
  x = np.einsum("m,d->md", x.reshape(-1), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)
