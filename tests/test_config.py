"""Config files, variants and command-line overrides."""

import re

import pytest

from uagan_jax import config as config_lib
from uagan_jax import families
from uagan_jax import study as study_lib
from uagan_jax.errors import UserError

from conftest import ROOT, load_test_config

RECIPES = sorted(p for p in (ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_names_its_family_and_steps(path):
  config = config_lib.load_config(str(path))
  assert config.model.name in families.names()
  assert config.train.steps >= 1
  assert "uagan-jax" in path.read_text()  # the docstring holds the command that runs it


def test_overrides_are_typed():
  config = load_test_config("--config.train.steps=7", "--config.optim.segmentor_lr=0.5",
                            "--config.model.segmentor_features=8,16",
                            "--config.data.modalities=('flair',)", "--config.model.name", "unet")
  assert config.train.steps == 7 and isinstance(config.train.steps, int)
  assert config.optim.segmentor_lr == 0.5
  assert tuple(config.model.segmentor_features) == (8, 16)
  assert tuple(config.data.modalities) == ("flair",)
  assert config.model.name == "unet"


def test_config_is_locked():
  config = load_test_config()
  with pytest.raises(AttributeError):
    config.train.new_key = 1


@pytest.mark.parametrize("override,needle", [
    ("--config.train.stpes=3", "did you mean 'train.steps'"),
    ("--config.nothing=3", "unknown config key 'nothing'"),
    ("--config.train.steps=3.5", "train.steps"),
    ("--config.model.name=gan", "unknown model family"),
    ("--config.model.generator_norm=batch", "model.generator_norm='batch': unknown"),
    ("--config.model.generator_output=skip", "model.generator_output='skip': unknown"),
    ("--config.data.modalities=('pd',)", "data.modalities"),
    ("--config.train.batch_size=0", "train.batch_size"),
    ("--config.loss.identity_weight=-1.0", "loss.identity_weight=-1.0: must be >= 0"),
    ("--config.model.generator_pair_heads=true",
     "generator_pair_heads=true needs model.name='uagan'"),
    ("--config.model.discriminator_per_modality=true",
     "discriminator_per_modality=true needs model.name 'stargan' or 'uagan'"),
    ("--config.model.fuse_reverse_stop_gradient=true",
     "fuse_reverse_stop_gradient=true needs model.name='uagan' with model.fuse=true and "
     "model.fuse_reverse=true"),
])
def test_bad_overrides_are_user_errors(override, needle):
  with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    load_test_config(override)


def test_resolved_config_round_trips_through_json(tmp_path):
  config = load_test_config("--config.model.segmentor_features=(4, 8)")
  path = tmp_path / "config.json"
  path.write_text(config_lib.to_json(config))
  loaded = config_lib.from_json_file(path)
  assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize("override,needle", [
    ("--config.optim.segmentor_lr=nan", "optim.segmentor_lr=nan: must be finite and > 0"),
    ("--config.optim.critic_lr=0.0", "optim.critic_lr=0.0: must be finite and > 0"),
    ("--config.optim.generator_lr=inf", "optim.generator_lr=inf: must be finite and > 0"),
    ("--config.loss.dice_weight=-1.0", "loss.dice_weight=-1.0: must be finite and >= 0"),
    ("--config.loss.cycle_weight=nan", "loss.cycle_weight=nan: must be finite and >= 0"),
    ("--config.loss.clip_limit=0.0", "loss.clip_limit=0.0: must be finite and > 0"),
    ("--config.data.val_fraction=1.0", "data.val_fraction=1.0: must be in [0, 1)"),
    ("--config.optim.b2=1.0", "optim.b2=1.0: must be in [0, 1)"),
    ("--config.data.test_fraction=0.9", "must be < 1, to leave cases to train on"),
    ("--config.data.folds=1", "data.folds=1: must be 0 (no cross-validation) or an integer >= 2"),
    ("--config.data.folds=-2", "data.folds=-2: must be 0"),
    ("--config.data.fold=1", "data.fold=1: must be an integer in 0..0 (data.folds=0: no folds)"),
    ("--config.data.fold=-1", "data.fold=-1: must be an integer in 0..0"),
])
def test_impossible_numbers_are_rejected(override, needle):
  with pytest.raises(UserError, match=re.escape(needle)):
    load_test_config(override, "--config.data.val_fraction=0.2" if "test_fraction" in override
                     else "--config.seed=0")


def test_fold_must_be_one_of_the_folds():
  assert load_test_config("--config.data.folds=5", "--config.data.fold=4").data.fold == 4
  with pytest.raises(UserError, match=re.escape("data.fold=5: must be an integer in 0..4 "
                                                "(data.folds=5)")):
    load_test_config("--config.data.folds=5", "--config.data.fold=5")
  assert load_test_config().data.folds == 0  # off by default


def test_a_config_json_from_before_a_changed_default_keeps_the_old_value(tmp_path):
  """data.clip_augmented came with a new default; a run whose config.json predates it trained
  unclipped, and reading it back (to resume, evaluate or export) must say so, not today's
  default. A config.json that has the key keeps its own."""
  import json  # pylint: disable=g-import-not-at-top
  fresh = config_lib.load_config(str(ROOT / "configs" / "unet.py"), [])
  assert fresh.data.clip_augmented is True
  raw = json.loads(config_lib.to_json(fresh))
  assert config_lib.from_json_text(json.dumps(raw), name="new").data.clip_augmented is True
  del raw["data"]["clip_augmented"]
  (tmp_path / "config.json").write_text(json.dumps(raw))
  assert config_lib.from_json_file(tmp_path / "config.json").data.clip_augmented is False
  assert set(config_lib.KEYS_BEFORE_THEY_EXISTED) == {"data.clip_augmented"}


def test_dice_reduction_is_checked():
  with pytest.raises(UserError, match="loss.dice_reduction"):
    config_lib.load_config(str(ROOT / "configs" / "unet.py"), ["--config.loss.dice_reduction=mean"])


def test_the_cpu_budget_is_the_demo_or_the_study_and_nothing_else():
  demo, study = config_lib.base_config(), config_lib.base_config()
  config_lib.apply_cpu_budget(demo, "demo")
  config_lib.apply_cpu_budget(study, "study")
  assert (demo.train.steps, demo.train.batch_size) == (600, 16)
  assert (study.train.steps, study.train.batch_size) == (1200, 8)
  with pytest.raises(ValueError, match="not 'paper'"):
    config_lib.apply_cpu_budget(config_lib.base_config(), "paper")


@pytest.mark.parametrize("family", ["unet", "segan", "uagan"])
def test_the_cpu_budgets_peak_rate_is_3e_4_and_the_first_budget_one_override_away(family):
  """The CPU budgets train S and C at a peak of 3e-4 (G and D at 5e-4);
  `study.FIRST_BUDGET_OVERRIDES` gives back the first studies' 400 steps at 1e-3."""
  recipe = str(ROOT / "configs" / f"{family}.py")
  demo, study = (config_lib.load_config(f"{recipe}:{variant}", []) for variant in ("demo", "study"))
  for variant, config in (("demo", demo), ("study", study)):
    assert (config.optim.segmentor_lr, config.optim.critic_lr) == (3e-4, 3e-4), variant
    assert (config.optim.generator_lr, config.optim.discriminator_lr) == (5e-4, 5e-4), variant
  first = config_lib.load_config(f"{recipe}:study", list(study_lib.FIRST_BUDGET_OVERRIDES))
  assert (first.train.steps, first.optim.decay_start, first.optim.decay_end,
          first.train.checkpoint_every) == (400, 100, 400, 400)
  assert (first.optim.segmentor_lr, first.optim.critic_lr) == (1e-3, 1e-3)
  # The override changes those six keys only (uagan's shape ramp is 400 steps at either budget).
  changed = {("train", "steps"), ("optim", "decay_start"), ("optim", "decay_end"),
             ("train", "checkpoint_every"), ("optim", "segmentor_lr"), ("optim", "critic_lr")}
  for group, key in changed:
    first[group][key] = study[group][key]
  assert config_lib.to_json(first) == config_lib.to_json(study)
