"""Every recipe in configs/ trains from the command line, on synthetic data and on the real case.

Slow (the demo-sized networks compile for a while on a CPU): `bash launch/test.sh -m slow`.
"""

import pytest

from uagan_jax import cli, families

from conftest import REAL_CASE, ROOT

# One recipe per model family: configs/<family>.py.
RECIPES = list(families.names())


def _train(data, workdir, recipe, *extra):
  return cli.main(["train", "--config", f"{ROOT / 'configs' / recipe}.py:demo", "--data", str(data),
                   "--workdir", str(workdir), "--config.train.steps=2", "--config.train.log_every=1",
                   "--config.eval.max_cases=1", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_and_evaluates_on_synthetic_data(recipe, synth_data, tmp_path, capsys):
  assert _train(synth_data, tmp_path / "w", recipe) == 0
  out = capsys.readouterr().out
  assert "step 2/2" in out
  family = families.get(recipe)
  assert ("Segmentation of 1 test cases" in out) == family.segments
  assert ("Translation on 1 test cases" in out) == family.translates


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_on_the_real_case(recipe, tmp_path, capsys):
  if not REAL_CASE.is_dir():
    pytest.skip(f"the real UPENN-GBM case is not at {REAL_CASE}")
  # One case: it is the training set, nothing is held out, so no evaluation. 240x240 slices are
  # centre-cropped to the demo's 96x96 (a smoke test of the real header, intensities and labels).
  assert _train(REAL_CASE, tmp_path / "w", recipe, "--no-eval") == 0
  out = capsys.readouterr().out
  assert "1 upenn cases" in out and "step 2/2" in out
