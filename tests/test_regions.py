"""`regions.nest`: the one rule that makes the thresholded WT/TC/ET maps nested."""

import itertools

import numpy as np
import pytest

from uagan_jax import regions
from uagan_jax.data import readers

# Every combination of the three channels at one voxel.
ALL = np.array(list(itertools.product([False, True], repeat=3)), bool)  # (8, 3)


def _is_nested(masks):
  return bool(np.all(masks[..., 0] >= masks[..., 1]) and np.all(masks[..., 1] >= masks[..., 2]))


@pytest.mark.parametrize("rule", sorted(regions.RULES))
def test_every_combination_comes_out_nested_and_nested_input_is_kept(rule):
  nested = regions.nest(ALL, rule=rule)
  assert nested.dtype == bool and nested.shape == ALL.shape
  assert _is_nested(nested)
  already = np.array([_is_nested(row) for row in ALL])
  np.testing.assert_array_equal(nested[already], ALL[already])


def test_inner_wins_by_hand():
  # (WT, TC, ET) -> expected, for the inconsistent voxels.
  cases = {(0, 0, 1): (1, 1, 1), (0, 1, 0): (1, 1, 0), (1, 0, 1): (1, 1, 1), (0, 1, 1): (1, 1, 1)}
  for given, expected in cases.items():
    got = regions.nest(np.array([given], bool), rule="inner_wins")[0]
    assert tuple(got.astype(int)) == expected, given


def test_outer_gates_by_hand():
  cases = {(0, 0, 1): (0, 0, 0), (0, 1, 0): (0, 0, 0), (1, 0, 1): (1, 0, 0), (0, 1, 1): (0, 0, 0),
           (1, 1, 1): (1, 1, 1)}
  for given, expected in cases.items():
    got = regions.nest(np.array([given], bool), rule="outer_gates")[0]
    assert tuple(got.astype(int)) == expected, given


@pytest.mark.parametrize("rule", sorted(regions.RULES))
@pytest.mark.parametrize("convention", sorted(readers.LABEL_CONVENTIONS))
def test_the_label_map_of_nested_regions_reads_back_as_the_same_regions(rule, convention):
  """What predict writes (regions_to_labels of the nested maps) is what evaluate scores."""
  masks = np.random.default_rng(0).random((6, 5, 4, 3)) > 0.6
  nested = regions.nest(masks, rule=rule)
  labels = readers.regions_to_labels(nested, convention=convention)
  np.testing.assert_array_equal(readers.labels_to_regions(labels, convention=convention), nested)


def test_inner_wins_is_the_label_conversion_of_the_raw_maps():
  """inner_wins keeps every file predict wrote before the rule existed: the label map of the raw
  maps equals the label map of the nested ones."""
  masks = np.random.default_rng(1).random((7, 6, 3)) > 0.5
  np.testing.assert_array_equal(
      readers.regions_to_labels(masks, convention="brats"),
      readers.regions_to_labels(regions.nest(masks, rule="inner_wins"), convention="brats"))


def test_bad_input_is_refused():
  with pytest.raises(ValueError, match="boolean"):
    regions.nest(np.zeros((2, 3), np.float32), rule="inner_wins")
  with pytest.raises(ValueError, match="3 channels"):
    regions.nest(np.zeros((2, 4), bool), rule="inner_wins")
  with pytest.raises(ValueError, match="unknown nesting rule"):
    regions.nest(np.zeros((2, 3), bool), rule="union")
