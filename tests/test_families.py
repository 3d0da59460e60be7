"""Model families as plug-ins: the table, the registry, and a fifth family defined here only.

The toy family below is one class and one `families.register` call, written in this file; it
trains, validates, evaluates and predicts through the public entry points (the command line), so
adding a family needs no edit anywhere else.
"""

import ast
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import optax
import pytest

from uagan_jax import config as config_lib
from uagan_jax import families, losses, parallel, train_state
from uagan_jax.errors import UserError
from uagan_jax.families import shared
from uagan_jax.families import uagan as uagan_family

from conftest import (ROOT, TEST_CONFIG, assert_one_line_error, load_test_config,
                      random_train_batch, run_cli)

FAMILY_NAMES = ("unet", "segan", "stargan", "uagan")


def test_the_table_says_what_each_family_does():
  assert families.names()[:4] == FAMILY_NAMES
  assert families.with_capability(segments=True)[:3] == ("unet", "segan", "uagan")
  assert families.with_capability(translates=True)[:2] == ("stargan", "uagan")
  assert families.get("uagan").roles == ("unified", "critic", "discriminator")
  with pytest.raises(UserError, match="unknown model family.*known: unet, segan, stargan, uagan"):
    families.get("cyclegan")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_module_gives_what_its_table_entry_promises(name):
  entry = families.get(name)
  module = families.implementation(name)
  for function in ("build_networks", "init_specs", "train_phases"):
    assert callable(getattr(module, function))
  assert hasattr(module, "segment_fn") == entry.segments
  assert hasattr(module, "translate_fn") == entry.translates
  config = load_test_config(variant="" if name == "segan" else name)
  networks = train_state.build_networks(config)
  assert tuple(networks.modules) == entry.roles
  assert tuple(networks.optimizers) == entry.roles


# Modules that run whatever family a config names: none of them may name one.
GENERIC_MODULES = ("train.py", "train_state.py", "train_utils.py", "inference.py", "evaluate.py",
                   "validation.py", "predict.py", "postprocess.py", "translate.py", "volume_io.py",
                   "checkpoint.py", "parallel.py", "data/input_pipeline.py")


@pytest.mark.parametrize("module", GENERIC_MODULES)
def test_generic_code_never_names_a_family(module):
  tree = ast.parse((ROOT / "uagan_jax" / module).read_text())
  named = [node.value for node in ast.walk(tree)
           if isinstance(node, ast.Constant) and node.value in FAMILY_NAMES]
  assert not named, f"{module} names {named}"


def test_importing_predict_does_not_import_the_trainer():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys, uagan_jax.predict, uagan_jax.translate, uagan_jax.evaluate; "
          "assert 'uagan_jax.train' not in sys.modules, 'predict imports the trainer'")
  subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# A fifth family, in this file only.
# ------------------------------------------------------------------------------------------------


class _ToyNet(nn.Module):
  """One 3x3 conv on the image and the modality's one-hot planes: three region logits."""

  @nn.compact
  def __call__(self, image, modality, *, train):
    del train
    planes = jax.nn.one_hot(modality, 4)[:, None, None, :] * jnp.ones_like(image)
    return nn.Conv(3, (3, 3), name="conv")(jnp.concatenate([image, planes], axis=-1))


class ToyFamily:
  """The family protocol (docs/ARCHITECTURE.md): a segmentor trained by BCE with plain SGD."""
  SEGMENTATION_ROLE = "segmentor"

  @staticmethod
  def build_networks(config, *, bn_axis_name):
    del config, bn_axis_name
    return train_state.Networks(modules={"segmentor": _ToyNet()},
                                optimizers={"segmentor": optax.sgd(0.5)})

  @staticmethod
  def init_specs(config, networks):
    del networks
    return {"segmentor": train_state.InitSpec(args=shared.example_image(config),
                                              kwargs={"train": False})}

  @staticmethod
  def train_phases(state, inputs, *, networks, config):
    del config
    net = state.nets["segmentor"]

    def loss(params):
      logits = networks["segmentor"].apply({"params": params}, inputs.image, inputs.modality,
                                           train=True)
      return losses.binary_cross_entropy(logits=logits, targets=inputs.regions)

    value, grads = jax.value_and_grad(loss)(parallel.per_device(net.params))
    grads = parallel.mean_over_devices(grads)
    new_net, norms = shared.apply_gradients(net, grads, networks.optimizers["segmentor"])
    return ({"segmentor": new_net}, {"toy/bce": value, **{f"toy/{k}": v for k, v in norms.items()}},
            {"segmentor": grads})

  @staticmethod
  def segment_fn(networks, config):
    del config
    module = networks["segmentor"]
    return lambda variables, images, modality: jax.nn.sigmoid(
        module.apply(variables, images, modality, train=False))


def _refuse_big_images(config):
  if config.data.image_size[0] > 64:
    raise UserError(f"config data.image_size={tuple(config.data.image_size)}: toy needs <= 64")


@pytest.fixture
def toy_family():
  families.register(families.Family(
      name="toy", roles=("segmentor",), segments=True, translates=False,
      summary="a one-conv segmentor (tests only)", implementation=ToyFamily,
      checks=(_refuse_big_images,)))
  yield "toy"
  families.unregister("toy")
  assert "toy" not in families.names()


def test_a_family_registered_in_a_test_trains_evaluates_and_predicts(toy_family, synth_data,
                                                                     case_dir, tmp_path, capsys):
  workdir = tmp_path / "toy_run"
  code, out, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", synth_data,
                           "--workdir", workdir, f"--config.model.name={toy_family}",
                           "--config.train.validate_every=2", "--config.data.val_fraction=0.25")
  assert code == 0, err
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows] == [1, 2, 3, 4]
  assert rows[-1]["toy/bce"] < rows[0]["toy/bce"]  # SGD on BCE: the loss goes down
  assert (workdir / "validation.jsonl").is_file() and (workdir / "checkpoints_best").is_dir()
  summary = json.loads((workdir / "eval_test" / "summary.json").read_text())
  assert set(summary["segmentation"]["flair"]) == {"WT", "TC", "ET"}
  assert "Dice WT" in out

  code, _, err = run_cli(capsys, "evaluate", "--workdir", workdir, "--data", synth_data,
                         "--split", "val")
  assert code == 0, err
  assert (workdir / "eval_val_tta" / "metrics.csv").is_file()  # TTA: the default

  output = tmp_path / "toy_seg.nii.gz"
  code, out, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", case_dir,
                           "--modality", "flair", "--output", output)
  assert code == 0, err
  source = nib.load(next(case_dir.glob("*_flair.nii.gz")))
  written = nib.load(output)
  assert written.shape == source.shape
  np.testing.assert_array_equal(written.affine, source.affine)

  code, _, err = run_cli(capsys, "translate", "--workdir", workdir, "--input", case_dir,
                         "--source", "flair", "--target", "t1", "--output", tmp_path / "t.nii.gz")
  assert_one_line_error(code, err, "model family toy does not translate")


def test_a_family_brings_its_config_checks(toy_family):
  config_lib.validate(load_test_config(f"--config.model.name={toy_family}"))
  with pytest.raises(UserError, match="toy needs <= 64"):
    load_test_config(f"--config.model.name={toy_family}", "--config.data.image_size=(128, 128)")


# ------------------------------------------------------------------------------------------------
# The unified network's two learning rates.
# ------------------------------------------------------------------------------------------------

# Top-level UnifiedNet parameters by stream: the translation stream and the gate that feeds it
# follow the generator's learning rate, the segmentation stream and its gate the segmentor's. The
# segmentation stream's BatchNorm layers carry flax's automatic names (renaming them would orphan
# every checkpoint); only that stream has BatchNorm (the translation stream's norms are gen_*).
EXPECTED_STREAM = {"gen_": "generator", "fuse_seg_to_gen": "generator",
                   "seg_": "segmentor", "fuse_gen_to_seg": "segmentor", "BatchNorm_": "segmentor"}


def test_the_unified_optimizer_gives_each_parameter_its_streams_learning_rate():
  config = load_test_config("--config.optim.generator_lr=0.001", "--config.optim.segmentor_lr=0.1",
                            variant="uagan")
  networks = train_state.build_networks(config, bn_axis_name=None)
  state = jax.jit(lambda: train_state.create_train_state(config, networks))()
  params = state.nets["unified"].params
  optimizer = networks.optimizers["unified"]
  # Adam's first update of a gradient of ones is -lr (to its epsilon) for every element.
  updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), optimizer.init(params),
                                params)
  lr = {"generator": 0.001, "segmentor": 0.1}
  seen = set()
  for name, subtree in params.items():
    prefixes = [p for p in EXPECTED_STREAM if name.startswith(p)]
    assert len(prefixes) == 1, f"parameter {name} belongs to no stream the test knows"
    stream = EXPECTED_STREAM[prefixes[0]]
    assert uagan_family.param_stream(name) == stream
    for leaf in jax.tree.leaves(updates[name]):
      np.testing.assert_allclose(np.asarray(leaf), -lr[stream], rtol=1e-5)
    seen.add(prefixes[0])
  assert seen == set(EXPECTED_STREAM)  # the test config has both gates


# ------------------------------------------------------------------------------------------------
# The papers' keys (configs/*.py:paper) leave today's step alone at their defaults.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["", "uagan"])
def test_recipe_keys_at_their_defaults_leave_the_step_bit_identical(variant):
  """A step of configs/test.py with the keys' defaults equals one where each new key is set to a
  value that must not matter: the weighted cross-entropy at weight 0 (with other class weights),
  the linear schedule's bounds unused by the staircase, region weights () and the shape loss's
  and the L1's default forms named explicitly."""
  from uagan_jax import train  # pylint: disable=g-import-not-at-top
  neutral = ("--config.loss.ce_weight=0", "--config.loss.ce_class_weights=(0.02, 0.98)",
             "--config.optim.schedule=staircase", "--config.optim.decay_start=1",
             "--config.optim.decay_end=2", "--config.optim.decay_final_fraction=0.5",
             "--config.loss.region_weights=()", "--config.loss.shape_loss=bce_dice",
             "--config.loss.scale_pooling=per_scale")
  batch = random_train_batch()
  results = []
  for overrides in ((), neutral):
    config = load_test_config("--config.data.augment=false", *overrides, variant=variant)
    mesh = parallel.make_mesh(1)
    state = train_state.init_state(config, mesh)
    step = train.make_step(config, mesh, donate=False)
    state, metrics = step(state, parallel.shard_batch(batch, mesh),
                          jax.random.fold_in(state.base_key, 0))
    results.append(jax.device_get((state.nets, metrics)))
  (nets_a, metrics_a), (nets_b, metrics_b) = results
  assert set(metrics_a) == set(metrics_b)
  for name in metrics_a:
    np.testing.assert_array_equal(metrics_a[name], metrics_b[name], err_msg=name)
  for a, b in zip(jax.tree.leaves(nets_a), jax.tree.leaves(nets_b)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# What StarGAN's D judges as real (data.augment_discriminator_real)
# ------------------------------------------------------------------------------------------------

# Spatial and intensity augmentation both drawn for every example (the jitter is the base's 0.1).
ROTATE = ("--config.data.augmentations.rotation_p=1.0",)
INTENSITY = ("--config.data.augmentations.brightness_p=1.0",
             "--config.data.augmentations.gamma_p=1.0", "--config.data.augmentations.bias_p=1.0")
NO_INTENSITY = ("--config.data.intensity_scale=0.0", "--config.data.intensity_shift=0.0")


@pytest.fixture(scope="module")
def real_images_of_a_step():
  """``images(*overrides) -> (D's real, G's real input, the batch / clip)``: one configs/test.py
  :stargan step from `random_train_batch`, as `train.train_step` augments it, with a stand-in
  family's phases that return what `shared.discriminator_real` gives and what G would see."""
  from uagan_jax import train  # pylint: disable=g-import-not-at-top
  batch = random_train_batch()
  mesh = parallel.make_mesh(1)
  state = train_state.init_state(load_test_config(variant="stargan"), mesh)

  def train_phases(state, inputs, *, networks, config):
    del networks
    return state.nets, {"discriminator": shared.discriminator_real(inputs, config),
                        "generator": inputs.image / config.data.clip}, {}

  def images(*overrides):
    config = load_test_config(*overrides, variant="stargan")
    step = train.make_step(config, mesh, donate=False)
    stand_in = type("StandIn", (), {"train_phases": staticmethod(train_phases)})
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(families, "implementation", lambda name: stand_in)
      _, metrics = step(state, parallel.shard_batch(batch, mesh),
                        jax.random.fold_in(state.base_key, 0))
    metrics = jax.device_get(metrics)
    return metrics["discriminator"], metrics["generator"], batch["image"] / config.data.clip

  return images


def test_by_default_the_discriminator_judges_the_augmented_images_the_generator_translates(
    real_images_of_a_step):
  config = load_test_config(variant="stargan")
  assert config.data.augment_discriminator_real  # the default: the behaviour before the key
  disc, gen, _ = real_images_of_a_step(*ROTATE, *INTENSITY)
  np.testing.assert_array_equal(disc, gen)
  # By construction: the very array G's phase scales (the step's program is unchanged).
  image = jnp.ones((2, 4, 4, 1))
  inputs = train_state.StepInputs(image=image, regions=jnp.zeros((2, 4, 4, 3)),
                                  modality=jnp.zeros(2, jnp.int32),
                                  example_keys=jax.random.split(jax.random.key(0), 2))
  real = image / config.data.clip
  assert shared.discriminator_real(inputs, config, real=real) is real


def test_the_key_shows_the_discriminator_the_same_slices_without_intensity_augmentation(
    real_images_of_a_step):
  disc, gen, raw = real_images_of_a_step(*ROTATE, *INTENSITY,
                                         "--config.data.augment_discriminator_real=false")
  assert not np.allclose(disc, gen)  # G still gets the intensity augmentation, D not
  # D's images are the step's own rotations of the batch with no intensity change: those G gets
  # when the config has no intensity augmentation at all.
  _, spatial_only, _ = real_images_of_a_step(*ROTATE, *NO_INTENSITY)
  # Two programs fuse the interpolation differently and round apart (up to 1.5e-6 at the tests'
  # LLVM level 0, tests/conftest.py); an intensity transform moves values by orders more.
  np.testing.assert_allclose(disc, spatial_only, rtol=1e-5, atol=1e-5)
  assert not np.allclose(disc, raw)  # rotated, as G's input is
  np.testing.assert_array_equal(disc == 0, gen == 0)  # the same brain, the same geometry
  # Without data.augment there is nothing to take off: D sees the batch as G does.
  config = load_test_config("--config.data.augment=false",
                            "--config.data.augment_discriminator_real=false", variant="stargan")
  image = jnp.asarray(raw)
  inputs = train_state.StepInputs(image=image * config.data.clip,
                                  regions=jnp.zeros((8, 32, 32, 3)),
                                  modality=jnp.zeros(8, jnp.int32),
                                  example_keys=jax.random.split(jax.random.key(0), 8))
  np.testing.assert_array_equal(shared.discriminator_real(inputs, config),
                                inputs.image / config.data.clip)
