"""Dice conventions and the volume round trip of inference."""

import numpy as np

from uagan_jax import evaluate


def _masks(*regions):
  return np.stack([np.asarray(r, bool) for r in regions], axis=-1)


def test_dice_hand_computed_and_brats_empty_rules():
  truth = _masks([1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0])
  pred = _masks([1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0])
  dice = evaluate.dice_per_region(pred, truth)
  # WT: 2*1/(2+2) = 0.5; TC: both empty -> 1; ET: truth only -> 0.
  np.testing.assert_allclose(dice, [0.5, 1.0, 0.0])
  np.testing.assert_allclose(evaluate.dice_per_region(truth, truth), [1, 1, 1])


def test_format_table_means_per_modality():
  rows = [{"case": "a", "modality": "t1", "dice_WT": 1.0, "dice_TC": 0.5, "dice_ET": 0.0},
          {"case": "b", "modality": "t1", "dice_WT": 0.0, "dice_TC": 0.5, "dice_ET": 1.0}]
  table = evaluate.format_table(rows, ["t1"], title="t")
  assert "0.500 ± 0.500" in table and "0.500 ± 0.000" in table
