"""Whether DiffViT beats ViT: the paired difference over seeds, its t-interval, a reading.

Runs of the two architectures with the same seed share their data order and
augmentation draws (the seed drives both), so the comparison pairs them by
seed: the per-seed differences d_1..d_n have mean m and sample standard
deviation s, and the two-sided 95% paired t-interval is

    m ± t_{0.975, n-1} * s / sqrt(n).

The t quantile is computed here (no SciPy dependency): the Student t CDF for
an integer number of degrees of freedom has a closed form in the angle
theta = atan(t / sqrt(df)) (Abramowitz & Stegun 26.7.3-4), inverted by
bisection. With fewer than `MIN_SEEDS` pairs the interval is either undefined
(one pair) or so wide and so dependent on the normality assumption (two pairs:
t_{0.975, 1} = 12.7) that the report states no conclusion instead.
"""

import dataclasses
import math

import numpy as np

CONFIDENCE = 0.95
MIN_SEEDS = 3


def _t_central_probability(t: float, df: int) -> float:
  """P(|T| <= t) for Student's t with `df` (integer >= 1) degrees of freedom, t >= 0."""
  theta = math.atan(t / math.sqrt(df))
  c2 = math.cos(theta) ** 2
  if df % 2 == 1:
    # 2/pi [theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3))]
    series, term = 0.0, 1.0
    for k in range(1, (df - 1) // 2 + 1):
      series += term
      term *= c2 * (2 * k) / (2 * k + 1)
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
  # sin [1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)]
  series, term = 0.0, 1.0
  for k in range(1, df // 2 + 1):
    series += term
    term *= c2 * (2 * k - 1) / (2 * k)
  return math.sin(theta) * series


def t_quantile(probability: float, df: int) -> float:
  """The `probability` quantile (> 0.5) of Student's t with `df` degrees of freedom."""
  if not 0.5 < probability < 1 or df < 1 or int(df) != df:
    raise ValueError(f"t_quantile needs 0.5 < probability < 1 and an integer df >= 1, got "
                     f"{probability}, {df}.")
  central = 2 * probability - 1  # P(|T| <= q)
  low, high = 0.0, 1.0
  while _t_central_probability(high, df) < central:
    high *= 2
  for _ in range(200):
    mid = (low + high) / 2
    if _t_central_probability(mid, df) < central:
      low = mid
    else:
      high = mid
    if high - low < 1e-12 * high:
      break
  return (low + high) / 2


@dataclasses.dataclass(frozen=True)
class PairedInterval:
  """Mean of the per-seed differences and its two-sided t-interval (NaN below 2 pairs)."""

  n: int
  mean: float
  std: float  # sample std (ddof 1) of the per-seed differences
  low: float
  high: float
  confidence: float = CONFIDENCE

  @property
  def conclusive(self) -> bool:
    return self.n >= MIN_SEEDS


def paired_interval(differences, confidence: float = CONFIDENCE) -> PairedInterval:
  """The paired t-interval of per-seed differences (model minus baseline, one per seed)."""
  d = np.asarray(differences, np.float64)
  n = len(d)
  if n == 0:
    return PairedInterval(0, math.nan, math.nan, math.nan, math.nan, confidence)
  mean = float(d.mean())
  if n < 2:
    return PairedInterval(n, mean, math.nan, math.nan, math.nan, confidence)
  std = float(d.std(ddof=1))
  half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
  return PairedInterval(n, mean, std, mean - half, mean + half, confidence)


def reading(interval: PairedInterval, model: str, *, higher_is_better: bool = True) -> str:
  """One line: '<model> better', '<model> worse', no detectable difference, or no conclusion."""
  n = interval.n
  if not interval.conclusive:
    return (f"no conclusion possible: {n} paired seed{'' if n == 1 else 's'} "
            f"(at least {MIN_SEEDS} needed)")
  if interval.low > 0 or interval.high < 0:
    better = (interval.low > 0) == higher_is_better
    return f"{model} {'better' if better else 'worse'} ({n} seeds)"
  return f"no detectable difference at {n} seeds"
