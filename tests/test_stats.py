"""uagan_jax/stats.py: the study's statistics against hand-computed values and scipy."""

import math
import warnings

import numpy as np
import pytest
import scipy.stats

from uagan_jax import stats

# ------------------------------------------------------------------------------------------------
# Wilcoxon signed-rank
# ------------------------------------------------------------------------------------------------


def _scipy_p(d, correction=False):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # scipy warns on small samples and ties
    return float(scipy.stats.wilcoxon(d, correction=correction).pvalue)


@pytest.mark.parametrize("differences, p", [
    # Exact: ranks 1 2 3 all positive, R+ = 6 of the 8 equally likely sign sets: P(R+ >= 6) = 1/8.
    ([1.0, 2.0, 3.0], 2 / 8),
    # Ranks 1 2 3 4, R+ = 1 + 3 + 4 = 8; sets of {1, 2, 3, 4} summing to >= 8: {1,3,4}, {2,3,4},
    # {1,2,3,4}, so P(R+ >= 8) = 3/16 (and P(R+ <= 8) = 13/16).
    ([1.0, -2.0, 3.0, 4.0], 2 * 3 / 16),
    # A tie: ranks 1.5 1.5 3, R+ = 6 = the largest of the 8 sign flips' sums: 1/8.
    ([1.0, 1.0, 2.0], 2 / 8),
    # A zero is dropped: ranks 1 2 of the others, R+ = 3, the largest of 4 sign flips' sums.
    ([0.0, 1.0, 2.0], 2 / 4),
    # One difference: R+ is 0 or 1 with probability 1/2 each; two-sided 1.
    ([5.0], 1.0),
    # Symmetric: R+ = 1.5 = its mean.
    ([1.0, -1.0], 1.0),
])
def test_wilcoxon_hand_computed(differences, p):
  assert stats.wilcoxon_signed_rank(differences=differences) == pytest.approx(p, abs=1e-12)
  if len(differences) > 1 or differences[0] != 0:
    assert stats.wilcoxon_signed_rank(differences=differences) == pytest.approx(
        _scipy_p(differences), abs=1e-12)


def test_wilcoxon_normal_approximation_by_hand():
  # 60 differences 1..60 with alternating signs, no ties: the normal approximation. R+ = the sum
  # of the odd ranks = 900; mean 60*61/4 = 915; variance 60*61*121/24 = 18452.5.
  d = np.array([k if k % 2 else -k for k in range(1, 61)], dtype=float)
  z = (900 - 915) / math.sqrt(18452.5)
  expected = math.erfc(abs(z) / math.sqrt(2))
  assert stats.wilcoxon_signed_rank(differences=d) == pytest.approx(expected, rel=1e-12)
  corrected = math.erfc((abs(z) - 0.5 / math.sqrt(18452.5)) / math.sqrt(2))
  assert stats.wilcoxon_signed_rank(differences=d, continuity=True) == pytest.approx(
      corrected, rel=1e-12)


@pytest.mark.parametrize("kind", ["continuous", "ties", "integers", "zeros_and_ties"])
def test_wilcoxon_matches_scipy_defaults(kind):
  # Each of scipy's branches: exact (<= 50, no ties or zeros), sign flips (<= 13 with ties or
  # zeros; scipy's permutation test is slow, hence few of them), normal approximation.
  rng = np.random.default_rng(7)
  for n in (2, 3, 5, 8, 13, 14, 20, 35, 50, 51, 80, 200):
    for _ in range(2):
      d = {"continuous": lambda: rng.normal(0.3, 1, n),
           "ties": lambda: np.round(rng.normal(0.2, 1, n), 1),
           "integers": lambda: rng.integers(-3, 4, n).astype(float),
           "zeros_and_ties": lambda: np.round(rng.normal(0, 0.3, n))}[kind]()
      if not d.any():
        continue  # all zero: see test_wilcoxon_all_zero
      # The continuity correction changes the normal approximation only.
      for correction in ((False, True) if n > 13 or kind == "continuous" else (False,)):
        assert stats.wilcoxon_signed_rank(differences=d, continuity=correction) == \
            pytest.approx(_scipy_p(d, correction), rel=1e-9, abs=1e-12), (kind, n, d)


def test_wilcoxon_all_zero_is_1_empty_is_nan():
  # Identical arms: no evidence of a difference, p = 1 at any size (scipy: 1 up to 13 values,
  # NaN from 14 on, its normal approximation's 0/0).
  for n in (1, 3, 13):
    assert stats.wilcoxon_signed_rank(differences=np.zeros(n)) == 1.0
  assert _scipy_p(np.zeros(5)) == 1.0
  assert stats.wilcoxon_signed_rank(differences=np.zeros(20)) == 1.0
  assert math.isnan(_scipy_p(np.zeros(20)))
  assert math.isnan(stats.wilcoxon_signed_rank(differences=[]))
  with pytest.raises(ValueError):
    stats.wilcoxon_signed_rank(differences=[1.0, float("nan")])


# ------------------------------------------------------------------------------------------------
# Summary over seeds, bootstrap
# ------------------------------------------------------------------------------------------------


def test_seed_summary_by_hand():
  summary = stats.seed_summary(values=[[1.0, 2.0, 3.0], [4.0, 5.0]])
  assert summary["seed_means"] == [2.0, 4.5]
  assert summary["mean"] == pytest.approx(3.25)
  assert summary["sd"] == pytest.approx(2.5 / math.sqrt(2))  # ddof=1 of (2, 4.5)
  assert (summary["n_seeds"], summary["n_values"]) == (2, 5)
  one = stats.seed_summary(values=[[1.0, 3.0]])
  assert one["mean"] == 2.0 and math.isnan(one["sd"])  # one seed: no spread over seeds
  with pytest.raises(ValueError):
    stats.seed_summary(values=[[1.0], []])


def test_bootstrap_one_case_one_seed_and_constant_values():
  for crossed in (True, False):
    assert stats.bootstrap_interval(values=[[0.7]], crossed=crossed) == (0.7, 0.7)
    assert stats.bootstrap_interval(values=[[2.0, 2.0], [2.0, 2.0]],
                                    crossed=crossed) == pytest.approx((2.0, 2.0))


def test_bootstrap_two_values_by_hand():
  # Two cases 0 and 1 under one seed: a replicate's mean is 0, 0.5 or 1 with probabilities 1/4,
  # 1/2, 1/4, so the 2.5% and 97.5% quantiles are 0 and 1. The same for one case under two
  # seeds 0 and 1 (crossed: the seeds are drawn as the cases are).
  assert stats.bootstrap_interval(values=[[0.0, 1.0]], crossed=True) == (0.0, 1.0)
  assert stats.bootstrap_interval(values=[[0.0], [1.0]], crossed=True) == (0.0, 1.0)
  assert stats.bootstrap_interval(values=[[0.0], [1.0]], crossed=False) == (0.0, 1.0)
  # At level 0.4 the quantiles 0.3 and 0.7 fall on the middle value.
  assert stats.bootstrap_interval(values=[[0.0, 1.0]], crossed=True, level=0.4) == (0.5, 0.5)


def test_bootstrap_one_seed_matches_scipy_percentile_bootstrap():
  # With one seed, both designs are the ordinary percentile bootstrap of the mean over cases:
  # scipy's, up to the Monte Carlo error of the quantiles.
  values = np.random.default_rng(3).normal(0.8, 0.1, 30)
  reference = scipy.stats.bootstrap((values,), np.mean, n_resamples=20_000, method="percentile",
                                    confidence_level=0.95, rng=np.random.default_rng(0))
  low, high = reference.confidence_interval
  for crossed in (True, False):
    ours = stats.bootstrap_interval(values=[values], crossed=crossed, resamples=20_000)
    assert ours == pytest.approx((low, high), abs=0.05 * (high - low))


def test_bootstrap_designs_differ_as_they_should():
  # Every seed scores the same cases and the case is what varies: the crossed bootstrap keeps a
  # case's value under every seed (the case mean's spread, sd/sqrt(n)); the nested one treats
  # the seeds' cases as independent samples and gives an interval about sqrt(seeds) narrower.
  case_values = np.random.default_rng(4).normal(0, 1, 40)
  grid = [case_values + 0.01 * seed for seed in range(4)]
  crossed = stats.bootstrap_interval(values=grid, crossed=True, resamples=4000)
  nested = stats.bootstrap_interval(values=grid, crossed=False, resamples=4000)
  width = lambda interval: interval[1] - interval[0]
  assert width(crossed) == pytest.approx(2 * 1.96 * case_values.std() / math.sqrt(40), rel=0.2)
  assert width(crossed) / width(nested) == pytest.approx(2.0, rel=0.25)
  # Seeded: the same interval twice, another with another seed.
  assert stats.bootstrap_interval(values=grid, crossed=True, resamples=500, seed=1) == \
      stats.bootstrap_interval(values=grid, crossed=True, resamples=500, seed=1)
  assert stats.bootstrap_interval(values=grid, crossed=True, resamples=500, seed=1) != \
      stats.bootstrap_interval(values=grid, crossed=True, resamples=500, seed=2)
  with pytest.raises(ValueError):
    stats.bootstrap_interval(values=[[1.0, 2.0], [1.0]], crossed=True)
  with pytest.raises(ValueError):
    stats.bootstrap_interval(values=grid, crossed=True, level=1.0)


def test_bootstrap_seeds_add_their_spread():
  # One case per seed, crossed: only the seeds vary, and the interval spans their mean's spread.
  seed_values = [[0.0], [1.0], [2.0], [3.0], [4.0]]
  low, high = stats.bootstrap_interval(values=seed_values, crossed=True, resamples=20_000)
  assert low == pytest.approx(0.8, abs=0.25) and high == pytest.approx(3.2, abs=0.25)


def test_paired_differences_and_identical_arms():
  a = {("c1", 0): 0.9, ("c2", 0): 0.8, ("c1", 1): 0.7, ("c3", 1): 0.5}
  b = {("c1", 0): 0.5, ("c2", 0): 0.8, ("c1", 1): 0.9, ("c4", 1): 0.1}
  assert stats.paired_differences(a=a, b=b) == pytest.approx(
      {("c1", 0): 0.4, ("c1", 1): -0.2, ("c2", 0): 0.0})
  same = stats.paired_differences(a=a, b=a)
  assert set(same.values()) == {0.0}
  assert stats.wilcoxon_signed_rank(differences=list(same.values())) == 1.0
  assert stats.bootstrap_interval(values=[list(same.values())], crossed=True) == (0.0, 0.0)
