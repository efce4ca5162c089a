"""Whether DiffViT beats ViT: the statistics of the verdict, all from `scipy.stats`.

Runs of the two architectures with the same seed share their data order and
augmentation draws, so they are paired by seed: the per-seed differences
d_1..d_n (model minus baseline) have mean m and sample SD s.

- Primary endpoint: final validation top-1. Its two-sided paired t-test
  (H0: mean difference 0) is adjusted by Holm's step-down over the sizes of a
  protocol (one family); everything else is secondary and descriptive.
- Equivalence: TOST against a margin +-delta (two one-sided t-tests at 5%;
  equivalent when both reject, i.e. the 90% t-interval lies inside +-delta).
- Power: the minimum detectable effect at 80% power and 5% two-sided for the
  seeds used, and the seeds needed to detect delta, from the noncentral t
  (the paired t-test's exact power at the observed s; the normal limit where
  scipy's noncentral t is not finite, at large noncentrality).
- Per image: McNemar's exact test on the discordant images of one seed, and
  an interval for the mean per-image difference that respects the design:
  every seed is scored on the same validation images, so seeds and images are
  crossed, and the interval comes from the two-way random-effects variance of
  the grand mean (seeds, images, their interaction) with Satterthwaite's
  degrees of freedom (`crossed_interval`). A bootstrap of seeds and shared
  images was tried instead and undercovers at 3-5 seeds (benchmarks/RESULTS.md),
  so it is not printed.
- Secondary, descriptive: the pooled effect over the planned sizes and its
  trend with size (`contrast`), the probability of improvement with a
  bootstrap interval, the per-seed correlation of the two architectures.

Degenerate cases get a stated reading, never "better": fewer than
`MIN_SEEDS` pairs, no spread across seeds (the t statistic is undefined),
non-finite values.
"""

import dataclasses
import math

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
POWER = 0.8
MIN_SEEDS = 3
# Points of top-1 (as a fraction) within which the two attentions count as equivalent.
DEFAULT_EQUIVALENCE_MARGIN = 0.01
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
_MAX_SEEDS = 10_000  # seeds_needed gives up (inf) beyond this


@dataclasses.dataclass(frozen=True)
class PairedInterval:
  """Mean of the per-seed differences and its two-sided t-interval (NaN where undefined)."""

  n: int
  mean: float
  std: float  # sample std (ddof 1) of the per-seed differences
  low: float
  high: float
  confidence: float = CONFIDENCE

  @property
  def conclusive(self) -> bool:
    return self.n >= MIN_SEEDS


def status(differences) -> str:
  """'ok', or why no test applies: 'nonfinite', 'too_few' (< MIN_SEEDS), 'no_spread'."""
  d = np.asarray(differences, np.float64)
  if not np.all(np.isfinite(d)):
    return "nonfinite"
  if len(d) < MIN_SEEDS:
    return "too_few"
  # Metrics are logged as float32: equal values read back may differ in the 7th digit.
  if np.ptp(d) <= 1e-6 * max(1.0, float(np.abs(d).max())):
    return "no_spread"
  return "ok"


def paired_interval(differences, confidence: float = CONFIDENCE) -> PairedInterval:
  """The paired t-interval of per-seed differences; NaN bounds below 2 pairs or at 0 spread."""
  d = np.asarray(differences, np.float64)
  n = len(d)
  if n == 0:
    return PairedInterval(0, math.nan, math.nan, math.nan, math.nan, confidence)
  mean = float(d.mean())
  std = float(d.std(ddof=1)) if n > 1 else math.nan
  if n < 2 or not math.isfinite(std) or std == 0 or status(d) == "no_spread":
    return PairedInterval(n, mean, std, math.nan, math.nan, confidence)
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
  return PairedInterval(n, mean, std, mean - half, mean + half, confidence)


def paired_t_p(differences) -> float:
  """Two-sided p of the paired t-test of mean 0; NaN unless `status` is 'ok' or 'too_few' >= 2."""
  d = np.asarray(differences, np.float64)
  if len(d) < 2 or status(d) in ("nonfinite", "no_spread"):
    return math.nan
  return float(stats.ttest_1samp(d, 0.0).pvalue)


def tost_p(differences, margin: float) -> float:
  """p of TOST (H0: |mean| >= margin): the larger of the two one-sided t-test p-values."""
  d = np.asarray(differences, np.float64)
  if len(d) < 2 or status(d) in ("nonfinite", "no_spread") or not margin > 0:
    return math.nan
  lower = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
  upper = stats.ttest_1samp(d, margin, alternative="less").pvalue
  return float(max(lower, upper))


def holm(p_values) -> list[float]:
  """Holm's step-down adjusted p-values; a NaN p counts in the family as p = 1 and stays NaN."""
  p = np.asarray(p_values, np.float64)
  m = len(p)
  filled = np.where(np.isnan(p), 1.0, p)
  order = np.argsort(filled, kind="stable")
  adjusted = np.empty(m)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * filled[i]))
    adjusted[i] = running
  return [math.nan if math.isnan(p[i]) else float(adjusted[i]) for i in range(m)]


def power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
  """Power of the two-sided paired t-test at level `alpha` for a true mean difference `effect`."""
  if n < 2 or not sd > 0:
    return math.nan
  df = n - 1
  critical = stats.t.ppf(1 - alpha / 2, df)
  nc = effect * math.sqrt(n) / sd
  value = stats.nct.sf(critical, df, nc) + stats.nct.cdf(-critical, df, nc)
  if not np.isfinite(value):  # scipy's nct fails at large noncentrality: the normal limit
    value = stats.norm.sf(critical - nc) + stats.norm.cdf(-critical - nc)
  return float(min(1.0, value))


def min_detectable_effect(sd: float, n: int, alpha: float = ALPHA,
                          target: float = POWER) -> float:
  """The mean difference the paired t-test detects with power `target` at n seeds and SD sd."""
  if n < 2 or not (math.isfinite(sd) and sd > 0):
    return math.nan
  high = sd
  while power(high, sd, n, alpha) < target:
    high *= 2
  return float(optimize.brentq(lambda e: power(e, sd, n, alpha) - target, 0.0, high,
                               xtol=1e-12 * sd))


def seeds_needed(effect: float, sd: float, alpha: float = ALPHA, target: float = POWER) -> float:
  """The fewest paired seeds (>= 2) that detect `effect` with power `target`; inf beyond 10k."""
  if not (math.isfinite(sd) and sd > 0 and effect > 0):
    return math.nan
  low, high = 2, 2
  while power(effect, sd, high, alpha) < target:
    if high >= _MAX_SEEDS:
      return math.inf
    low, high = high, min(2 * high, _MAX_SEEDS)
  while low < high:  # power grows with n: the first n that reaches the target
    mid = (low + high) // 2
    if power(effect, sd, mid, alpha) >= target:
      high = mid
    else:
      low = mid + 1
  return float(high)


@dataclasses.dataclass(frozen=True)
class McNemar:
  """One seed's images: how many only the model / only the baseline got right, exact p."""

  images: int
  model_only: int
  baseline_only: int
  p: float


def mcnemar(baseline_correct, model_correct) -> McNemar:
  """McNemar's exact test: the discordant images, binomial(b + c, 1/2), two-sided."""
  base = np.asarray(baseline_correct, bool)
  mine = np.asarray(model_correct, bool)
  b = int(np.sum(mine & ~base))
  c = int(np.sum(base & ~mine))
  p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
  return McNemar(len(base), b, c, p)


def crossed_interval(differences, confidence: float = CONFIDENCE):
  """(mean, low, high, df) of the mean per-image difference, seeds crossed with images.

  `differences`: [..., seeds, images] of model minus baseline correctness
  (-1, 0, +1), every seed on the same images (leading axes: independent
  studies, as a simulation passes them). The grand mean's variance under
  the two-way random-effects model d_si = mu + a_s + b_i + e_si is
  (MS_seeds + MS_images - MS_residual) / (seeds * images), from the ANOVA
  mean squares; its degrees of freedom are Satterthwaite's, so the interval
  is the paired t-interval when seed noise dominates and the normal one over
  images when the images do. NaN below 2 seeds or 2 images.
  """
  d = np.asarray(differences, np.float64)
  n, m = d.shape[-2:]
  grand = d.mean(axis=(-2, -1))
  if n < 2 or m < 2:
    nan = np.full(grand.shape, np.nan)
    return grand, nan, nan, nan
  rows, cols = d.mean(axis=-1), d.mean(axis=-2)
  ms_seeds = m * ((rows - grand[..., None]) ** 2).sum(-1) / (n - 1)
  ms_images = n * ((cols - grand[..., None]) ** 2).sum(-1) / (m - 1)
  residual = d - rows[..., :, None] - cols[..., None, :] + grand[..., None, None]
  ms_residual = (residual ** 2).sum(axis=(-2, -1)) / ((n - 1) * (m - 1))
  # The combination estimates images * var(a) + seeds * var(b) + var(e) >= var(e): it is
  # never taken below the residual mean square, which estimates var(e).
  total = np.maximum(ms_seeds + ms_images - ms_residual, ms_residual)
  with np.errstate(divide="ignore", invalid="ignore"):
    df = total ** 2 / (ms_seeds ** 2 / (n - 1) + ms_images ** 2 / (m - 1)
                       + ms_residual ** 2 / ((n - 1) * (m - 1)))
    half = stats.t.ppf(0.5 + confidence / 2, df) * np.sqrt(total / (n * m))
  half = np.where(total > 0, half, np.nan)
  return grand, grand - half, grand + half, df


def sd_interval(sd: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
  """The chi-square confidence interval of a normal SD estimated from n values (n - 1 df)."""
  if n < 2 or not (math.isfinite(sd) and sd > 0):
    return math.nan, math.nan
  df = n - 1
  tail = (1 - confidence) / 2
  return (sd * math.sqrt(df / stats.chi2.ppf(1 - tail, df)),
          sd * math.sqrt(df / stats.chi2.ppf(tail, df)))


def seeds_needed_range(effect: float, sd: float, n: int, alpha: float = ALPHA,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
  """`seeds_needed` at the two ends of the SD's confidence interval (n - 1 df)."""
  low, high = sd_interval(sd, n, confidence)
  return seeds_needed(effect, low, alpha), seeds_needed(effect, high, alpha)


# --- Secondary readings: descriptive, never a verdict ----------------------------------------

@dataclasses.dataclass(frozen=True)
class Contrast:
  """sum_k w_k m_k over independent per-size means m_k, its t-interval (Welch-Satterthwaite)."""

  estimate: float
  se: float
  df: float
  low: float
  high: float


def contrast(weights, means, variances, dfs, confidence: float = CONFIDENCE) -> Contrast:
  """A linear combination of independent means with variances v_k on dfs_k degrees of freedom.

  The pooled effect over sizes is weights 1/K (each planned size counts once);
  the trend is the least-squares slope against log10(parameters).
  """
  w, m, v, f = (np.asarray(x, np.float64) for x in (weights, means, variances, dfs))
  terms = w ** 2 * v
  se2 = float(terms.sum())
  estimate = float((w * m).sum())
  if not (np.all(np.isfinite(terms)) and se2 > 0 and np.all(f > 0)):
    return Contrast(estimate, math.nan, math.nan, math.nan, math.nan)
  df = se2 ** 2 / float((terms ** 2 / f).sum())
  half = float(stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(se2)
  return Contrast(estimate, math.sqrt(se2), df, estimate - half, estimate + half)


def slope_weights(x) -> np.ndarray:
  """Weights c_k with sum_k c_k y_k the least-squares slope of y on x."""
  x = np.asarray(x, np.float64)
  centred = x - x.mean()
  return centred / (centred ** 2).sum()


def prob_improvement(model, baseline) -> float:
  """P(model > baseline) over all pairs of one run of each, ties counted half."""
  x = np.asarray(model, np.float64)[:, None]
  y = np.asarray(baseline, np.float64)[None, :]
  return float(np.mean((x > y) + 0.5 * (x == y)))


def prob_improvement_interval(groups, *, resamples: int = BOOTSTRAP_RESAMPLES,
                              seed: int = BOOTSTRAP_SEED,
                              confidence: float = CONFIDENCE) -> tuple[float, float, float]:
  """(mean over sizes of P(model > baseline), percentile bootstrap interval).

  `groups`: per size, (model values, baseline values). Each resample redraws
  the runs of each architecture of each size with replacement (stratified).
  """
  rng = np.random.default_rng(seed)
  point = float(np.mean([prob_improvement(m, b) for m, b in groups]))
  draws = np.zeros(resamples)
  for model, baseline in groups:
    x, y = np.asarray(model, np.float64), np.asarray(baseline, np.float64)
    xs = x[rng.integers(0, len(x), (resamples, len(x)))][:, :, None]
    ys = y[rng.integers(0, len(y), (resamples, len(y)))][:, None, :]
    draws += ((xs > ys) + 0.5 * (xs == ys)).mean(axis=(1, 2))
  draws /= len(groups)
  tail = (1 - confidence) / 2
  low, high = np.quantile(draws, [tail, 1 - tail])
  return point, float(low), float(high)


def unpaired_half_width(model, baseline, confidence: float = CONFIDENCE) -> float:
  """Half-width of Welch's t-interval of mean(model) - mean(baseline), ignoring the pairing."""
  x, y = np.asarray(model, np.float64), np.asarray(baseline, np.float64)
  if len(x) < 2 or len(y) < 2:
    return math.nan
  vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
  if not vx + vy > 0:
    return math.nan
  df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
  return float(stats.t.ppf(0.5 + confidence / 2, df) * math.sqrt(vx + vy))


def correlation(model, baseline) -> float:
  """Pearson's r of the two architectures' per-seed values (NaN without spread)."""
  x, y = np.asarray(model, np.float64), np.asarray(baseline, np.float64)
  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return math.nan
  return float(np.corrcoef(x, y)[0, 1])


@dataclasses.dataclass
class Primary:
  """The primary endpoint of one comparison: tests, power, and (once the family is known) Holm."""

  differences: list[float]
  interval: PairedInterval
  status: str
  p: float
  tost_p: float
  margin: float
  mde: float
  seeds_needed: float
  seeds_needed_low: float = math.nan  # seeds_needed at the ends of the SD's 95% interval
  seeds_needed_high: float = math.nan
  alpha: float = ALPHA
  p_holm: float = math.nan

  @property
  def p_for_family(self) -> float:
    """The p that enters Holm: NaN (counted as p = 1) unless the test applies."""
    return self.p if self.status == "ok" else math.nan

  @property
  def equivalent(self) -> bool:
    return self.status == "ok" and self.tost_p < self.alpha

  @property
  def significant(self) -> bool:
    return self.status == "ok" and self.p_holm < self.alpha


def primary(differences, margin: float = DEFAULT_EQUIVALENCE_MARGIN,
            alpha: float = ALPHA) -> Primary:
  """The primary endpoint's tests of per-seed differences; `p_holm` is set by the family."""
  d = [float(x) for x in differences]
  interval = paired_interval(d)
  state = status(d)
  testable = state == "ok"  # MDE and seeds needed only where the test itself applies
  low, high = (seeds_needed_range(margin, interval.std, len(d), alpha) if testable
               else (math.nan, math.nan))
  return Primary(differences=d, interval=interval, status=state, p=paired_t_p(d),
                 tost_p=tost_p(d, margin), margin=margin,
                 mde=min_detectable_effect(interval.std, len(d), alpha) if testable else math.nan,
                 seeds_needed=seeds_needed(margin, interval.std, alpha) if testable else math.nan,
                 seeds_needed_low=low, seeds_needed_high=high, alpha=alpha)


def _pp(value: float) -> str:
  return f"{100 * value:+.2f} pp"


def degenerate_reading(state: str, differences) -> str:
  """The stated reading of a comparison no test applies to ('' when `state` is 'ok')."""
  n = len(differences)
  if state == "nonfinite":
    return "not computed: a per-seed value is not finite"
  if state == "too_few":
    return (f"no conclusion possible: {n} paired seed{'' if n == 1 else 's'} "
            f"(at least {MIN_SEEDS} needed)")
  if state == "no_spread":
    return (f"no reading: no spread across the {n} seeds (every difference "
            f"{_pp(differences[0])}), so the t-test is undefined; see the per-image evidence")
  return ""


def primary_reading(result: Primary, model: str) -> str:
  """Better / worse (Holm-adjusted), equivalent within the margin (TOST), or inconclusive."""
  if result.status != "ok":
    return degenerate_reading(result.status, result.differences)
  n, margin = result.interval.n, 100 * result.margin
  if result.significant:
    better = result.interval.mean > 0
    text = f"{model} {'better' if better else 'worse'} ({n} seeds, Holm p = {result.p_holm:.3g})"
    if result.equivalent:
      text += f", by less than ±{margin:.2f} pp (TOST p = {result.tost_p:.3g})"
    return text
  if result.equivalent:
    return f"equivalent within ±{margin:.2f} pp ({n} seeds, TOST p = {result.tost_p:.3g})"
  return (f"inconclusive at {n} seeds: no significant difference (Holm p = "
          f"{result.p_holm:.3g}) and no equivalence within ±{margin:.2f} pp (TOST p = "
          f"{result.tost_p:.3g})")


def secondary_reading(differences, *, lower_name: str = "lower") -> str:
  """Descriptive only: whether the 95% t-interval excludes 0 (no test is claimed)."""
  state = status(differences)
  if state != "ok":
    return degenerate_reading(state, list(differences))
  interval = paired_interval(differences)
  if interval.low > 0 or interval.high < 0:
    side = "higher" if interval.low > 0 else lower_name
    return f"descriptive: interval excludes 0 ({side})"
  return "descriptive: interval includes 0"
