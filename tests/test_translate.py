"""``uagan-jax translate``: geometry and header of the output, intensities, determinism, errors.

Training even the tiny test models costs about a minute of XLA compilation on two CPU cores
(most of it `train_state.init_state`), so the fast tests translate with checkpoints written directly:
the train state's exact structure (`jax.eval_shape` of `train_state.create_train_state`) filled with
seeded random weights, saved by the same `Checkpointer` as training. What is checked here (the
grid, the header, the intensity mapping) does not depend on the weights. The ``slow`` test runs
the real thing: ``uagan-jax train`` and then ``uagan-jax translate``.
"""

import json
import os
import shutil

import jax
import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations

from uagan_jax import cli, translate
from uagan_jax.data import MODALITIES
from uagan_jax.errors import UserError

from conftest import (REAL_CASE, TEST_CONFIG, assert_one_line_error, load_test_config,
                      write_random_workdir, run_cli)

REAL_T1 = REAL_CASE / "UPENN-GBM-00003_11_T1.nii.gz"


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """Workdirs by name: uagan, stargan, uagan_t1_t2 (trained on t1 and t2 only), segan."""
  root = tmp_path_factory.mktemp("translate_work")
  out = {name: write_random_workdir(root / name, load_test_config(variant=name))
         for name in ("uagan", "stargan")}
  config = load_test_config(variant="uagan")
  with config.unlocked():
    config.data.modalities = ("t1", "t2")
  out["uagan_t1_t2"] = write_random_workdir(root / "uagan_t1_t2", config)
  # The family is refused before any checkpoint is read, so the config alone is the workdir.
  segan = root / "segan"
  segan.mkdir()
  from uagan_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  (segan / "config.json").write_text(config_lib.to_json(load_test_config()))
  out["segan"] = segan
  return out


def _translate(capsys, workdir, source_file, output, source="t1", target="flair"):
  code, out, err = run_cli(capsys, "translate", "--workdir", workdir, "--input", source_file,
                            "--source", source, "--target", target, "--output", output)
  assert code == 0, err
  return out


def _assert_same_grid(output_path, input_path):
  """The output has the input's shape, affine, qform/sform (codes too) and header geometry."""
  out, ref = nib.load(output_path), nib.load(input_path)
  assert out.shape == ref.shape
  np.testing.assert_array_equal(out.affine, ref.affine)
  for getter in ("get_qform", "get_sform"):
    got, got_code = getattr(out, getter)(coded=True)
    want, want_code = getattr(ref, getter)(coded=True)
    assert int(got_code) == int(want_code), getter
    if want is not None:
      np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_array_equal(out.header["dim"], ref.header["dim"])
  np.testing.assert_allclose(out.header["pixdim"][:4], ref.header["pixdim"][:4])
  assert out.header.get_xyzt_units() == ref.header.get_xyzt_units()
  assert out.get_data_dtype() == np.float32


def _assert_intensities(output_path, input_path):
  """Background exactly 0, brain voxels inside the input's brain range."""
  data = np.asanyarray(nib.load(output_path).dataobj)
  source = np.asanyarray(nib.load(input_path).dataobj).astype(np.float32)
  assert data.dtype == np.float32
  assert np.all(data[source == 0] == 0)
  brain = source[source != 0]
  assert data[source != 0].min() >= brain.min() and data[source != 0].max() <= brain.max()
  return data


def test_restore_intensities_undoes_the_zscore_with_the_input_statistics():
  image = np.array([0.0, 2.0, 4.0, 6.0], np.float32).reshape(1, 1, 4)
  # Brain 2, 4, 6: mean 4, std sqrt(8/3).
  std = np.sqrt(8.0 / 3.0)
  translated = np.array([3.0, 1.0, -0.5, 9.0], np.float32).reshape(1, 1, 4)
  restored = translate.restore_intensities(translated, image)
  assert restored.dtype == np.float32
  # Background 0 whatever the network said; z 9 clips to the brain maximum 6.
  np.testing.assert_allclose(restored.ravel(), [0.0, 4.0 + std, 4.0 - 0.5 * std, 6.0],
                             rtol=1e-6)
  np.testing.assert_array_equal(translate.restore_intensities(translated, np.zeros_like(image)), 0)


def test_translate_case_file(capsys, workdirs, case_dir, tmp_path):
  source_file = case_dir / f"{case_dir.name}_t1.nii.gz"
  output = tmp_path / "new" / "folder" / "flair.nii.gz"
  out = _translate(capsys, workdirs["uagan"], source_file, output)
  assert output.is_file()
  assert f"loading {source_file}" in out and "translating " in out and str(output) in out
  assert "wrote " in out and " s\n" in out
  _assert_same_grid(output, source_file)
  first = _assert_intensities(output, source_file)
  assert np.any(first != 0)
  # No temporary file is left beside the output.
  assert [p.name for p in output.parent.iterdir()] == ["flair.nii.gz"]

  again = tmp_path / "again.nii.gz"
  _translate(capsys, workdirs["uagan"], source_file, again)
  assert np.asanyarray(nib.load(again).dataobj).tobytes() == first.tobytes()
  assert again.read_bytes() == output.read_bytes()  # the whole file, gzip header included


def test_stargan_translates_a_case_folder(capsys, workdirs, case_dir, tmp_path):
  output = tmp_path / "t2.nii"
  _translate(capsys, workdirs["stargan"], case_dir, output, source="T1", target="t2")
  source_file = case_dir / f"{case_dir.name}_t1.nii.gz"
  _assert_same_grid(output, source_file)
  _assert_intensities(output, source_file)


def test_output_is_written_on_the_grid_of_a_reoriented_input(capsys, workdirs, case_dir,
                                                             tmp_path):
  original = nib.load(case_dir / f"{case_dir.name}_t1.nii.gz")
  assert nib.aff2axcodes(original.affine) == ("L", "P", "S")
  # Not a cube, axes permuted and flipped: shape and affine differ from the canonical ones.
  cropped = original.slicer[:, 1:31, 2:30]
  ornt = orientations.ornt_transform(orientations.io_orientation(cropped.affine),
                                     orientations.axcodes2ornt("SAL"))
  permuted = cropped.as_reoriented(ornt)
  canonical = nib.as_closest_canonical(permuted)
  assert permuted.shape == (28, 30, 32) and nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
  paths = {}
  for name, image in (("sal", permuted), ("ras", canonical)):
    paths[name] = tmp_path / f"{name}_t1.nii.gz"
    nib.save(image, paths[name])
    _translate(capsys, workdirs["uagan"], paths[name], tmp_path / f"{name}_flair.nii.gz")
    _assert_same_grid(tmp_path / f"{name}_flair.nii.gz", paths[name])
    _assert_intensities(tmp_path / f"{name}_flair.nii.gz", paths[name])
  # The same voxels in another storage order translate to the same values.
  sal = nib.as_closest_canonical(nib.load(tmp_path / "sal_flair.nii.gz"))
  ras = nib.load(tmp_path / "ras_flair.nii.gz")
  np.testing.assert_array_equal(np.asanyarray(sal.dataobj), np.asanyarray(ras.dataobj))


@pytest.mark.skipif(not REAL_T1.is_file(), reason=f"real UPENN-GBM case absent ({REAL_T1})")
def test_real_upenn_case_keeps_its_geometry(capsys, workdirs, tmp_path):
  output = tmp_path / "UPENN-GBM-00003_11_FLAIR_from_T1.nii.gz"
  out = _translate(capsys, workdirs["uagan"], REAL_T1, output)
  assert "resampling" not in out  # 1 mm, as the model
  ref, got = nib.load(REAL_T1), nib.load(output)
  assert got.shape == ref.shape == (240, 240, 155)
  np.testing.assert_array_equal(got.affine, ref.affine)
  assert int(got.get_qform(coded=True)[1]) == int(ref.get_qform(coded=True)[1]) == 1
  assert int(got.get_sform(coded=True)[1]) == int(ref.get_sform(coded=True)[1])
  _assert_same_grid(output, REAL_T1)
  _assert_intensities(output, REAL_T1)


def test_bad_inputs_end_in_one_line(capsys, workdirs, case_dir, synth_data, tmp_path):
  source_file = case_dir / f"{case_dir.name}_t1.nii.gz"
  output = tmp_path / "out.nii.gz"

  def run(workdir=workdirs["uagan"], input_path=source_file, source="t1", target="flair",
          output_path=output):
    return run_cli(capsys, "translate", "--workdir", workdir, "--input", input_path,
                    "--source", source, "--target", target, "--output", output_path)

  code, _, err = run(workdir=workdirs["segan"])
  assert_one_line_error(code, err, workdirs["segan"], "segan does not translate")
  code, _, err = run(source="pd")
  assert_one_line_error(code, err, "--source", "'pd'", "unknown modality", ", ".join(MODALITIES))
  code, _, err = run(target="t1gd")
  assert_one_line_error(code, err, "--target", "'t1gd'", "unknown modality")
  code, _, err = run(input_path=tmp_path / "missing_t1.nii.gz")
  assert_one_line_error(code, err, tmp_path / "missing_t1.nii.gz", "no such file")
  code, _, err = run(input_path=synth_data)
  assert_one_line_error(code, err, synth_data, "8 cases")
  code, _, err = run(workdir=workdirs["uagan_t1_t2"])
  assert_one_line_error(code, err, "--target flair", "trained on t1, t2 only")
  code, _, err = run(workdir=tmp_path)
  assert_one_line_error(code, err, tmp_path / "config.json", "not found")
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  shutil.copy(workdirs["uagan"] / "config.json", untrained)
  code, _, err = run(workdir=untrained)
  assert_one_line_error(code, err, untrained / "checkpoints", "no checkpoints")
  code, _, err = run(output_path=tmp_path / "out.png")
  assert_one_line_error(code, err, "out.png", ".nii.gz")

  # The input itself, also under another spelling of its path: refused, and left untouched.
  before = source_file.read_bytes()
  for spelling in (source_file, case_dir / ".." / case_dir.name / source_file.name):
    code, _, err = run(output_path=spelling)
    assert_one_line_error(code, err, spelling, "is the input file")
  assert source_file.read_bytes() == before
  assert not output.exists()


def test_pair_heads_refuse_a_modality_into_itself_unless_the_identity_loss_trained_it(tmp_path):
  pair_heads = ("--config.model.generator_pair_heads=true",)  # as in configs/test.py:uagan
  config = load_test_config(*pair_heads, variant="uagan")
  translate.check_pair(config, "t1", "flair", workdir=tmp_path)
  with pytest.raises(UserError, match=r"both t1: .* trained no t1 -> t1 head \(loss.identity_weight 0\)"):
    translate.check_pair(config, "t1", "t1", workdir=tmp_path)
  # The identity loss trains the X -> X heads; one shared head is trained by every pair.
  translate.check_pair(load_test_config(*pair_heads, "--config.loss.identity_weight=1.0",
                                        variant="uagan"), "t1", "t1", workdir=tmp_path)
  translate.check_pair(load_test_config("--config.model.generator_pair_heads=false",
                                        variant="uagan"), "t1", "t1", workdir=tmp_path)


def test_a_failed_write_leaves_no_file(capsys, workdirs, case_dir, tmp_path, monkeypatch):
  output = tmp_path / "out" / "flair.nii.gz"

  def fail(*_):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(UserError, match="cannot write.*disk full"):
    translate.translate_file(case_dir / f"{case_dir.name}_t1.nii.gz", output, source="t1",
                             target="flair", workdir=workdirs["uagan"], log=lambda _: None)
  assert list(output.parent.iterdir()) == []


def test_one_loaded_model_translates_many_files(workdirs, case_dir, tmp_path):
  translator = translate.load_translator(workdirs["uagan"])
  assert translator.step == 1 and translator.modalities == MODALITIES
  for modality in ("t1", "t2"):
    result = translate.translate_file(case_dir / f"{case_dir.name}_{modality}.nii.gz",
                                      tmp_path / f"{modality}_to_t1ce.nii.gz", source=modality,
                                      target="t1ce", translator=translator, log=lambda _: None)
    assert result.output.is_file() and result.target == "t1ce" and result.slices > 0
    assert not result.resampled


def _replace_the_network(monkeypatch, translation):
  """Every SliceTranslator answers ``translation(slices)``: the geometry is then checked against a
  known answer."""
  monkeypatch.setattr(translate.inference.SliceTranslator, "__call__",
                      lambda self, slices, source_id, target_id: translation(slices))


@pytest.mark.skipif(not REAL_T1.is_file(), reason=f"real UPENN-GBM case absent ({REAL_T1})")
def test_every_brain_voxel_of_the_real_case_is_translated(capsys, workdirs, tmp_path,
                                                          monkeypatch):
  """The 240x240 slices' whole brain goes through a 32x32 model (a translation to z = 1 marks
  what the network saw; a voxel it did not see would keep z = 0, the brain's mean)."""
  _replace_the_network(monkeypatch, lambda slices: np.ones_like(slices))
  _translate(capsys, workdirs["uagan"], REAL_T1, tmp_path / "out.nii.gz")
  image = np.asanyarray(nib.load(REAL_T1).dataobj).astype(np.float64)
  brain = image != 0
  mean_plus_std = image[brain].mean() + image[brain].std()
  got = np.asanyarray(nib.load(tmp_path / "out.nii.gz").dataobj)
  np.testing.assert_allclose(got[brain], mean_plus_std, rtol=1e-5)
  assert not np.any(got[~brain])


@pytest.mark.parametrize("spacing", [(0.9, 0.9, 0.9), (1.0, 1.0, 3.0)])
def test_another_spacing_is_resampled_to_the_models_and_back(capsys, workdirs, case_dir, tmp_path,
                                                              monkeypatch, spacing):
  """A 1 mm model on a case resampled to ``spacing``: an identity network gives the input back,
  on its grid, up to the blur of two linear resamplings."""
  from uagan_jax.data import resample, synthetic  # pylint: disable=g-import-not-at-top
  t1 = np.asanyarray(nib.load(case_dir / f"{case_dir.name}_t1.nii.gz").dataobj)
  image = resample.image_to_spacing(t1, (1.0, 1.0, 1.0), spacing)
  affine = synthetic.brats_affine(image.shape, spacing)
  nifti = nib.Nifti1Image(image, affine)
  nifti.set_qform(affine, code=1)
  nifti.set_sform(affine, code=1)
  nib.save(nifti, tmp_path / "t1.nii.gz")
  _replace_the_network(monkeypatch, lambda slices: slices)
  out = _translate(capsys, workdirs["uagan"], tmp_path / "t1.nii.gz", tmp_path / "out.nii.gz")
  assert f"resampling from {'x'.join(f'{v:g}' for v in spacing)} mm to the model's 1x1x1 mm" in out
  _assert_same_grid(tmp_path / "out.nii.gz", tmp_path / "t1.nii.gz")
  got = np.asanyarray(nib.load(tmp_path / "out.nii.gz").dataobj)
  brain = image != 0
  assert not np.any(got[~brain])
  assert np.corrcoef(got[brain], image[brain])[0, 1] > 0.9
  # Shifted by two voxels, the input agrees less: the threshold above can fail.
  assert np.corrcoef(np.roll(got, 2, axis=0)[brain], image[brain])[0, 1] < 0.9


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["uagan", "stargan"])
def test_trained_model_end_to_end(capsys, synth_data, case_dir, tmp_path, variant):
  """The real workflow: ``uagan-jax train`` two steps, then ``uagan-jax translate``."""
  workdir = tmp_path / "work"
  assert cli.main(["train", "--config", f"{TEST_CONFIG}:{variant}", "--data", str(synth_data),
                   "--workdir", str(workdir), "--config.train.steps=2", "--no-eval"]) == 0
  capsys.readouterr()
  source_file = case_dir / f"{case_dir.name}_t1.nii.gz"
  output = tmp_path / "flair.nii.gz"
  out = _translate(capsys, workdir, source_file, output)
  assert "checkpoint step 2" in out
  _assert_same_grid(output, source_file)
  _assert_intensities(output, source_file)
  # inference.load_state restores into an abstract state (eval_shape); the same checkpoint
  # restored into an initialised state must give the same arrays.
  # pylint: disable=g-import-not-at-top
  from uagan_jax import checkpoint, inference, parallel, train_state
  # pylint: enable=g-import-not-at-top
  config = load_test_config("--config.train.steps=2", variant=variant)
  got, got_step = inference.load_state(config, workdir)
  checkpoints = checkpoint.Checkpointer(workdir / "checkpoints", every=1, keep=100)
  expected = checkpoints.restore(2, train_state.init_state(config, parallel.make_mesh(1)))
  checkpoints.close()
  assert got_step == 2
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_trained_segan_does_not_translate(capsys, synth_data, case_dir, tmp_path):
  workdir = tmp_path / "work"
  assert cli.main(["train", "--config", TEST_CONFIG, "--data", str(synth_data), "--workdir",
                   str(workdir), "--config.train.steps=1", "--no-eval"]) == 0
  capsys.readouterr()
  code, _, err = run_cli(capsys, "translate", "--workdir", workdir, "--input",
                          case_dir / f"{case_dir.name}_t1.nii.gz", "--source", "t1", "--target",
                          "flair", "--output", tmp_path / "out.nii.gz")
  assert_one_line_error(code, err, "segan does not translate")
  shutil.rmtree(workdir)


def _write_splits(workdir, **record):
  (workdir / "splits.json").write_text(json.dumps({"train": ["a", "b"], "val": [], "test": [],
                                                   **record}))


def test_a_modality_training_never_saw_is_refused_as_source_and_as_target(capsys, case_dir,
                                                                          tmp_path):
  """What training saw (splits.json trained_modalities) decides, not config data.modalities: a
  target the discriminator never saw as real is as untrained as an unseen source."""
  workdir = write_random_workdir(tmp_path / "w", load_test_config(variant="uagan"))
  _write_splits(workdir, protocol="unpaired", train_modality={"a": "t1", "b": "t2"},
                trained_modalities=["t1", "t2"])
  assert translate.load_translator(workdir).modalities == ("t1", "t2")
  t1 = case_dir / f"{case_dir.name}_t1.nii.gz"
  code, _, err = run_cli(capsys, "translate", "--workdir", workdir, "--input", t1, "--source",
                         "t1", "--target", "flair", "--output", tmp_path / "o.nii.gz")
  assert_one_line_error(code, err, "--target flair", "trained on t1, t2 only", "splits.json",
                        "unpaired", "discriminator never saw a real flair image")
  flair = case_dir / f"{case_dir.name}_flair.nii.gz"
  code, _, err = run_cli(capsys, "translate", "--workdir", workdir, "--input", flair, "--source",
                         "flair", "--target", "t1", "--output", tmp_path / "o.nii.gz")
  assert_one_line_error(code, err, "--source flair", "trained on t1, t2 only")
  assert "discriminator" not in err
  assert not (tmp_path / "o.nii.gz").exists()


def test_trained_modalities_of_a_workdir_older_than_the_record(tmp_path):
  """splits.json without trained_modalities: the modalities its train_modality assigned;
  without splits.json: config data.modalities."""
  workdir = write_random_workdir(tmp_path / "w", load_test_config(variant="stargan"))
  assert translate.load_translator(workdir).modalities == MODALITIES
  _write_splits(workdir, train_modality={"a": "t2", "b": "t1ce"})
  assert translate.load_translator(workdir).modalities == ("t1ce", "t2")
