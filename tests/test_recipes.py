"""Every recipe in configs/ trains from the command line, on synthetic data and on the real case;
the papers' recipes (`:paper`) hold the numbers their sources give and train at tiny sizes.

The demo-sized runs are slow (the networks compile for a while on a CPU):
`bash launch/test.sh -m slow`.
"""

import json
import re

import pytest

from uagan_jax import cli, families
from uagan_jax import config as config_lib
from uagan_jax.errors import UserError

from conftest import REAL_CASE, ROOT, TEST_CONFIG, assert_one_line_error, run_cli

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
  assert ("Segmentation of 1 test case," in out) == family.segments
  assert ("Translation on 1 test case," in out) == family.translates


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


# ------------------------------------------------------------------------------------------------
# The papers' recipes: configs/uagan.py:paper (mangoyuan/UAGAN) and configs/segan.py:paper
# (YuanXue1993/SegAN).
# ------------------------------------------------------------------------------------------------

PAPER_RECIPES = ("uagan", "segan")

# The numbers the issue names for each official run, as the config must hold them.
PAPER_NUMBERS = {
    "uagan": {"data.image_size": (128, 128), "train.batch_size": 8, "loss.ce_weight": 100.0,
              "loss.ce_class_weights": (0.02, 0.98), "loss.shape_weight": 100.0,
              "loss.shape_loss": "weighted_ce", "loss.cycle_weight": 10.0,
              "loss.discriminator_gp_weight": 10.0, "optim.b1": 0.0, "optim.schedule": "linear",
              "data.modalities": ("t1ce", "t2", "flair"), "loss.region_weights": (1.0, 0.0, 0.0),
              "loss.dice_weight": 0.0, "loss.bce_weight": 0.0, "loss.adversarial_weight": 0.0},
    "segan": {"loss.scale_weights": (1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 4.0),
              "loss.critic_constraint": "clip", "loss.clip_limit": 0.05,
              "optim.segmentor_lr": 2e-4, "optim.critic_lr": 2e-4, "optim.b1": 0.5,
              "optim.schedule": "staircase", "optim.decay_rate": 0.5},
}


def _paper(recipe):
  return config_lib.load_config(f"{ROOT / 'configs' / recipe}.py:paper")


def _key(config, dotted):
  group, name = dotted.split(".")
  value = config[group][name]
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _paper_branch_assignments(recipe):
  """``(key, value source, comment)`` for each ``c.a.b = value  # comment`` of the paper branch,
  with ``steps_per_epoch`` as the branch defines it."""
  source = (ROOT / "configs" / f"{recipe}.py").read_text()
  branch = source[source.index('variant == "paper"'):source.index("elif variant:")]
  steps = int(re.search(r"steps_per_epoch = ([\d_]+)", branch).group(1))
  rows = []
  for line in branch.splitlines():
    match = re.match(r"\s*c\.(\w+\.\w+) = (.+?)(?:\s+#\s*(.*))?$", line)
    if match:
      rows.append((match.group(1), match.group(2), match.group(3) or "", steps))
  return rows


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_paper_recipe_loads_validates_and_names_its_family(recipe):
  config = _paper(recipe)
  assert config.model.name == recipe
  config_lib.validate(config)


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_paper_recipe_holds_the_numbers_of_the_official_code(recipe):
  config = _paper(recipe)
  for key, expected in PAPER_NUMBERS[recipe].items():
    assert _key(config, key) == expected, key


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_every_number_of_a_paper_recipe_is_cited_and_is_what_the_config_holds(recipe):
  config = _paper(recipe)
  rows = _paper_branch_assignments(recipe)
  assert len(rows) >= 10
  for key, value_source, comment, steps in rows:
    value = eval(value_source, {"steps_per_epoch": steps})  # pylint: disable=eval-used
    assert _key(config, key) == (tuple(value) if isinstance(value, (list, tuple)) else value), key
    # Each comment cites a file of the official code; a line without one is the second of a
    # pair that the line above cites.
    if comment:
      assert re.search(r"[\w/]+\.(py|sh)\b", comment), (key, comment)


def test_segan_paper_halves_the_rate_every_25_epochs_of_brats2021():
  config = _paper("segan")
  # 876 training cases x 62 slices / batch 36 (configs/segan.py's docstring), rounded up.
  assert config.optim.decay_every == 25 * -(-876 * 62 // 36)
  assert config.train.batch_size == 36


def test_uagan_paper_epochs_are_those_of_brats2021():
  config = _paper("uagan")
  epoch = -(-876 * 147 // 8)
  assert (config.train.steps, config.optim.decay_start, config.optim.decay_end,
          config.loss.shape_ramp_steps) == (100 * epoch, 60 * epoch, 100 * epoch, 60 * epoch)
  assert config.optim.decay_final_fraction == pytest.approx(1e-6 / 1e-4)


@pytest.mark.parametrize("recipe", ["uagan", "segan", "unet", "stargan"])
def test_unknown_variant_names_the_known_ones(recipe):
  with pytest.raises(UserError, match="unknown variant 'papr'") as error:
    config_lib.load_config(f"{ROOT / 'configs' / recipe}.py:papr")
  known = "demo, study, paper" if recipe in PAPER_RECIPES else "demo, study"
  assert f"known: {known})" in str(error.value)


@pytest.mark.parametrize("recipe", ["uagan", "segan", "unet", "stargan"])
def test_demo_and_study_budgets_decay_the_learning_rate(recipe):
  """:demo and :study share the demo's networks and slices; their learning rate is constant for
  the first third of the run, then falls linearly to a tenth at its last step (the change that
  kept TC/ET, docs/EXPERIMENTS.md); :study is 1,200 steps of 8 slices, unvalidated."""
  demo = config_lib.load_config(f"{ROOT / 'configs' / recipe}.py:demo")
  study = config_lib.load_config(f"{ROOT / 'configs' / recipe}.py:study")
  for config, start in ((demo, 200), (study, 300)):
    assert config.optim.schedule == "linear"
    assert (config.optim.decay_start, config.optim.decay_end) == (start, config.train.steps)
    assert config.optim.decay_final_fraction == pytest.approx(0.1)
    assert config.data.clip_augmented
  assert (demo.train.steps, demo.train.batch_size) == (600, 16)
  assert (study.train.steps, study.train.batch_size, study.train.validate_every) == (1200, 8, 0)
  assert study.model.to_dict() == demo.model.to_dict()
  assert study.data.image_size == demo.data.image_size
  if recipe == "uagan":  # the shape loss ramps over the whole demo, the study's first 400 steps
    assert (demo.loss.shape_ramp_steps, study.loss.shape_ramp_steps) == (600, 400)


@pytest.mark.parametrize("recipe", ["uagan", "segan", "unet", "stargan"])
def test_only_uagan_pools_its_dice_over_the_batch(recipe):
  """uagan's Dice per slice switched TC/ET off (docs/EXPERIMENTS.md, "Training that keeps every
  region"): its recipes pool over the batch, the others keep a Dice per slice; the old
  behaviour is one override away."""
  expected = "batch" if recipe == "uagan" else "per_example"
  for variant in ("", ":demo", ":study"):
    path = f"{ROOT / 'configs' / recipe}.py{variant}"
    assert config_lib.load_config(path).loss.dice_reduction == expected, variant
    old = config_lib.load_config(path, ["--config.loss.dice_reduction=per_example"])
    assert old.loss.dice_reduction == "per_example"


# Tiny sizes (configs/test.py's) for the smoke runs of the paper recipes.
TINY = ("--config.model.segmentor_features=(4, 8)", "--config.model.generator_features=4",
        "--config.model.generator_residual_blocks=1", "--config.model.discriminator_features=4",
        "--config.model.discriminator_layers=3", "--config.data.image_size=(32, 32)",
        "--config.train.batch_size=8", "--config.train.steps=3", "--config.train.log_every=1",
        "--config.train.checkpoint_every=3", "--config.eval.max_cases=1",
        "--config.eval.batch_size=16", "--config.eval.panels=1")


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 40 s on 2 cores; the segan variant trains the same new keys in CI
def test_uagan_paper_trains_at_tiny_sizes(synth_data, tmp_path, capsys):
  workdir = tmp_path / "w"
  # The linear decay starts at step 1 and ends at 3; the shape ramp takes 2 steps.
  code, out, err = run_cli(capsys, "train", "--config", f"{ROOT / 'configs' / 'uagan.py'}:paper",
                           "--data", synth_data, "--workdir", workdir, *TINY,
                           "--config.model.critic_features=(4, 8)", "--config.optim.decay_start=1",
                           "--config.optim.decay_end=3", "--config.loss.shape_ramp_steps=2")
  assert code == 0, err
  rows = _metrics(workdir)
  assert [row["step"] for row in rows] == [1, 2, 3]
  for row in rows:
    assert row["seg/weighted_ce"] > 0 and row["seg/shape"] > 0
  assert "Segmentation of 1 test case," in out


def test_segan_paper_trains_at_tiny_sizes(synth_data, tmp_path, capsys):
  workdir = tmp_path / "w"
  code, out, err = run_cli(capsys, "train", "--config", f"{ROOT / 'configs' / 'segan.py'}:paper",
                           "--data", synth_data, "--workdir", workdir, *TINY,
                           "--config.model.critic_features=(4, 4, 4, 4, 4, 4)",
                           # Six stride-2 blocks need 64x64 (at 32x32 the last two see 1x1 maps
                           # and the critic's batch-normalised features are not finite).
                           "--config.data.image_size=(64, 64)", "--config.optim.decay_every=2")
  assert code == 0, err
  rows = _metrics(workdir)
  assert [row["step"] for row in rows] == [1, 2, 3]
  assert all(row["seg/adversarial"] > 0 and "seg/weighted_ce" not in row for row in rows)
  assert "Segmentation of 1 test case," in out


@pytest.mark.parametrize("override,needles", [
    ("--config.loss.scale_weights=(1, 2)", ["loss.scale_weights", "give 3 weights"]),
    ("--config.loss.scale_pooling=sum", ["loss.scale_pooling", "per_scale or concatenated"]),
    ("--config.loss.shape_loss=dice", ["loss.shape_loss", "bce_dice or weighted_ce"]),
    ("--config.loss.ce_class_weights=(1, 2, 3)", ["loss.ce_class_weights", "two"]),
    ("--config.loss.region_weights=(0, 0, 0)", ["loss.region_weights", "not all 0"]),
    ("--config.loss.ce_weight=-1", ["loss.ce_weight", ">= 0"]),
    ("--config.optim.schedule=cosine", ["optim.schedule", "staircase or linear"]),
    ("--config.optim.schedule=linear", ["optim.decay_start", "decay_start < decay_end"]),
])
def test_bad_recipe_keys_stop_with_one_line(override, needles, synth_data, tmp_path, capsys):
  code, _, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", synth_data,
                         "--workdir", tmp_path / "w", override)
  assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize("recipe", ["uagan", "segan"])
def test_paper_recipes_train_without_the_full_recipes_augmentation(recipe):
  """The papers' runs had no scanner-shift augmentation; the full recipes have it."""
  from uagan_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  base = config_lib.base_config().data.augmentations.to_dict()
  path = ROOT / "configs" / f"{recipe}.py"
  full = config_lib.load_config(str(path)).data.augmentations.to_dict()
  paper = config_lib.load_config(f"{path}:paper").data.augmentations.to_dict()
  assert paper == base and full != base
