"""The statistics of ``uagan-jax study``: pure numpy functions, no state, no I/O.

A study scores every arm (a recipe and its overrides) trained with several seeds on the same
test cases. Its numbers, per arm, test set, metric, region and modality, come from here:

* `seed_summary`: each seed's mean over its cases, then the mean and the standard deviation
  (ddof=1) of those seed means: how much the result moves with the seed.
* `bootstrap_interval`: a percentile bootstrap interval of the same mean, resampling both
  sources of variation, the cases and the seeds (two levels). Where every seed scored the same
  cases (an external test set; the study's ``crossed`` design) each replicate draws the cases
  with replacement, then the seeds with replacement, independently, and takes the mean of the
  drawn cases x drawn seeds grid, so a hard case stays hard under every seed. Where the seeds
  scored different cases (the held-out split is drawn by ``config.seed``: the ``nested``
  design) a replicate draws the seeds with replacement, then within each drawn seed its cases
  with replacement.
* `paired_differences`: arm A minus arm B per (case, seed), both trained with that seed and
  scored on that case; the same summary and interval then apply to the differences.
* `wilcoxon_signed_rank`: the two-sided p-value of the Wilcoxon signed-rank test, as
  ``scipy.stats.wilcoxon`` computes it with its defaults (see there for the one departure).

Every random draw comes from a `numpy.random.Generator` seeded by the caller, so a study's
intervals are the same on every run of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# scipy.stats.wilcoxon's method="auto" thresholds (scipy 1.17): above this many differences the
# normal approximation; at or below it the exact null distribution when there are no ties or
# zeros, else ...
_WILCOXON_EXACT_MAX = 50
# ... the exact sign-flip (permutation) distribution when there are at most this many (2**13
# flips: scipy's default 9,999 resamples enumerate them all), else the normal approximation.
_WILCOXON_FLIPS_MAX = 13


def _per_seed(values: Sequence[Sequence[float]]) -> list[np.ndarray]:
  groups = [np.asarray(group, dtype=np.float64).reshape(-1) for group in values]
  if not groups or any(group.size == 0 for group in groups):
    raise ValueError("need at least one seed, each with at least one value")
  return groups


def seed_summary(*, values: Sequence[Sequence[float]]) -> dict:
  """The mean over seeds of each seed's mean over its cases, and their standard deviation.

  Args:
    values: one sequence per seed, its cases' values (the seeds may have different cases).

  Returns:
    ``{"mean", "sd", "seed_means", "n_seeds", "n_values"}``: ``sd`` is the sample standard
    deviation (ddof=1) of the seed means, NaN with one seed (one seed says nothing about the
    spread over seeds).
  """
  groups = _per_seed(values)
  means = np.array([group.mean() for group in groups])
  return {"mean": float(means.mean()),
          "sd": float(means.std(ddof=1)) if means.size > 1 else math.nan,
          "seed_means": [float(m) for m in means], "n_seeds": len(groups),
          "n_values": int(sum(group.size for group in groups))}


def bootstrap_interval(*, values: Sequence[Sequence[float]], crossed: bool,
                       resamples: int = 10_000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
  """A two-level percentile bootstrap interval of `seed_summary`'s mean (cases and seeds).

  Each of ``resamples`` replicates draws (with replacement) as many seeds and cases as there
  are, and computes the mean over the drawn seeds of each one's mean over its drawn cases; the
  interval is the ((1 - level) / 2, (1 + level) / 2) quantiles of the replicates (numpy's linear
  interpolation). With one case and one seed it is that value twice.

  Args:
    values: one sequence per seed, its cases' values.
    crossed: the seeds scored the same cases, in the same order (so ``values`` is a cases x
      seeds grid): a replicate draws the case rows once for all seeds, then the seed columns.
      False: each seed's cases are its own sample: a replicate draws the seeds, then within each
      drawn seed its cases (a seed drawn twice gets two independent draws).
    resamples: the number of bootstrap replicates.
    level: the interval's coverage, in (0, 1).
    seed: seeds the `numpy.random.Generator`.

  Returns:
    ``(low, high)``.
  """
  if not 0 < level < 1:
    raise ValueError(f"level {level}: must be in (0, 1)")
  if resamples < 1:
    raise ValueError(f"resamples {resamples}: must be at least 1")
  groups = _per_seed(values)
  rng = np.random.default_rng(seed)
  seeds = len(groups)
  if crossed:
    if len({group.size for group in groups}) != 1:
      raise ValueError("crossed: every seed must have the same number of cases")
    grid = np.stack(groups, axis=1)  # cases x seeds
    cases = grid.shape[0]
    # How often each case (row) and each seed (column) is drawn; the mean of the drawn grid is
    # then case_counts @ grid @ seed_counts / (cases * seeds), without building the grid.
    case_counts = _draw_counts(rng, resamples, cases)
    seed_counts = _draw_counts(rng, resamples, seeds)
    replicates = np.einsum("bi,ij,bj->b", case_counts, grid, seed_counts) / (cases * seeds)
  else:
    drawn = rng.integers(0, seeds, size=(resamples, seeds))
    replicates = np.zeros(resamples)
    for slot in range(seeds):
      for index, group in enumerate(groups):
        rows = np.flatnonzero(drawn[:, slot] == index)
        if rows.size:
          counts = _draw_counts(rng, rows.size, group.size)
          replicates[rows] += counts @ group / group.size
    replicates /= seeds
  low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
  return float(low), float(high)


def _draw_counts(rng: np.random.Generator, replicates: int, n: int) -> np.ndarray:
  """(replicates, n): how many times each of n items is drawn in n draws with replacement."""
  if n == 1:
    return np.ones((replicates, 1))
  return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)


def paired_differences(*, a: dict, b: dict) -> dict:
  """Arm A minus arm B on the (case, seed) pairs both scored.

  Args:
    a: ``{(case, seed): value}`` of arm A.
    b: the same of arm B.

  Returns:
    ``{(case, seed): a - b}`` over the keys of both, in sorted order.
  """
  return {key: float(a[key]) - float(b[key]) for key in sorted(set(a) & set(b))}


def wilcoxon_signed_rank(*, differences: Sequence[float], continuity: bool = False) -> float:
  """The two-sided p-value of the Wilcoxon signed-rank test that the differences centre on 0.

  As ``scipy.stats.wilcoxon(differences)`` with its defaults (``zero_method="wilcox"``,
  ``correction=False``, ``method="auto"``; scipy 1.17): zero differences are dropped and the
  others ranked by absolute value (ties get the average rank); the statistic is the sum of the
  ranks of the positive differences. With at most 50 differences and neither ties nor zeros the
  p-value is the exact one of the statistic's null distribution; with ties or zeros and at most
  13 differences, the exact one of the sign-flip distribution (every sign assignment, as scipy's
  permutation test enumerates them); otherwise the normal approximation with the tie correction
  of the variance (and with ``continuity``, the 0.5 continuity correction, scipy's
  ``correction=True``).

  One departure from scipy: when every difference is 0 (identical arms) the p-value is 1 at any
  number of differences (scipy gives 1 up to 13 of them and NaN beyond).

  Args:
    differences: the paired differences (A - B); NaNs are not allowed.
    continuity: apply the continuity correction in the normal approximation.

  Returns:
    The p-value; NaN for no differences at all.
  """
  d = np.asarray(differences, dtype=np.float64).reshape(-1)
  if np.isnan(d).any():
    raise ValueError("differences: NaN is not allowed")
  total = d.size
  if total == 0:
    return math.nan
  nonzero = d[d != 0]
  n = nonzero.size
  if n == 0:
    return 1.0
  ranks, tie_sizes = _average_ranks(np.abs(nonzero))
  r_plus = float(ranks[nonzero > 0].sum())
  has_ties = bool((tie_sizes > 1).any())
  zeros = total - n
  if total <= _WILCOXON_EXACT_MAX and not has_ties and not zeros:
    null = _signed_rank_distribution(n)  # P(R+ = k), k = 0 .. n(n+1)/2
    cdf = null[:int(math.ceil(r_plus)) + 1].sum()
    sf = null[int(math.floor(r_plus)):].sum()
    return float(min(1.0, 2 * min(cdf, sf)))
  if total <= _WILCOXON_FLIPS_MAX:
    # Every assignment of signs to the nonzero differences (a zero's sign changes nothing).
    signs = (np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1
    null = signs @ ranks
    gamma = abs(r_plus) * np.finfo(np.float64).eps * 100  # scipy's float tolerance
    less = np.mean(null <= r_plus + gamma)
    greater = np.mean(null >= r_plus - gamma)
    return float(min(1.0, 2 * min(less, greater)))
  mean = n * (n + 1) / 4
  variance = (n * (n + 1) * (2 * n + 1) - np.sum(tie_sizes ** 3 - tie_sizes) / 2) / 24
  se = math.sqrt(variance)
  z = (r_plus - mean) / se
  if continuity:
    z -= math.copysign(0.5, z) / se if z else 0.0
  return float(min(1.0, math.erfc(abs(z) / math.sqrt(2))))


def _average_ranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ranks 1..n of ``values`` (ties get their average rank) and the size of each tie group."""
  order = np.argsort(values, kind="stable")
  ordered = values[order]
  starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
  sizes = np.diff(np.r_[starts, ordered.size])
  average = starts + (sizes + 1) / 2  # the mean of the ranks starts+1 .. starts+size
  ranks = np.empty(values.size)
  ranks[order] = np.repeat(average, sizes)
  return ranks, sizes.astype(np.float64)


def _signed_rank_distribution(n: int) -> np.ndarray:
  """P(R+ = k) under the null for ranks 1..n without ties: each rank in R+ with probability 1/2.

  The number of subsets of {1..n} summing to k, built one rank at a time, over 2**n.
  """
  counts = np.zeros(n * (n + 1) // 2 + 1)
  counts[0] = 1.0
  for rank in range(1, n + 1):
    counts[rank:] = counts[rank:] + counts[:-rank].copy()
  return counts / 2.0 ** n
