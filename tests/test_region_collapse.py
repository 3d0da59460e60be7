"""benchmarks/region_collapse.py: per-run means and the (run, modality, region) below a floor."""

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import region_collapse  # pylint: disable=wrong-import-position


def _row(arm, seed, case, modality, wt, tc, et, test_set="test"):
  return {"arm": arm, "seed": seed, "case": case, "modality": modality, "test_set": test_set,
          "dice_WT": wt, "dice_TC": tc, "dice_ET": et}


ROWS = [_row("a", 0, "c1", "t1", 0.8, 0.6, 0.4), _row("a", 0, "c2", "t1", 0.6, 0.0, 0.02),
        _row("a", 1, "c1", "t1", 0.7, 0.01, 0.0), _row("a", 1, "c2", "t1", 0.9, 0.03, 0.04),
        _row("a", 0, "x1", "t1", 0.0, 0.0, 0.0, test_set="shifted")]


def test_each_run_is_averaged_alone_and_a_dead_seed_is_named():
  means = region_collapse.run_means(ROWS, test_set="test")
  assert means[("a", 0, "t1")] == pytest.approx({"WT": 0.7, "TC": 0.3, "ET": 0.21})
  assert means[("a", 1, "t1")] == pytest.approx({"WT": 0.8, "TC": 0.02, "ET": 0.02})
  # Over both seeds TC averages 0.16, above the floor; seed 1 alone is dead.
  low = region_collapse.below(means, floor=0.05)
  assert [(key, region) for key, region, _ in low] == [(("a", 1, "t1"), "TC"),
                                                       (("a", 1, "t1"), "ET")]


def test_the_command_prints_the_runs_below_the_floor(tmp_path, capsys):
  path = tmp_path / "study.json"
  path.write_text(json.dumps({"rows": ROWS}))
  assert region_collapse.main([str(path)]) == 0
  out = capsys.readouterr().out
  assert "below 0.05: 2 of 6 (run, modality, region)" in out
  assert "a seed 1 t1 TC: 0.020" in out
  assert region_collapse.main([str(path), "--test-set", "nowhere"]) == 2
  assert "no rows for test set 'nowhere'" in capsys.readouterr().err
