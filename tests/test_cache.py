"""The prepared-data cache: exact slices, staleness, interruption, corruption, flat memory."""

import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest

from uagan_jax.data import MODALITIES, cache, dataset, input_pipeline, preprocess, readers
from uagan_jax.errors import UserError

from conftest import TEST_CONFIG, assert_one_line_error, load_test_config, run_cli


@pytest.fixture
def data(synth_data, tmp_path):
  """A private copy of the synthetic data (these tests change and corrupt files)."""
  copy = tmp_path / "data"
  shutil.copytree(synth_data, copy)
  return copy


def _prepared(data, cache_dir, **kwargs):
  lines = []
  cache.prepare(data, cache_dir, workers=1, log=lines.append, **kwargs)
  return lines


def test_a_cached_slice_is_exactly_the_direct_read(data, tmp_path):
  _prepared(data, tmp_path / "cache")
  for case in readers.find_cases(data)[:3]:
    cached = cache.open_case(tmp_path / "cache", case)
    volume = readers.load_case(case)
    regions = readers.labels_to_regions(volume.label, convention=case.label_convention)
    for size in ((32, 32), (24, 40), (48, 16)):  # the same, cropped, padded and both
      for modality in MODALITIES:
        slices, region_slices, has_brain, _ = preprocess.volume_to_slices(
            volume.images[modality], regions, size=size, clip=5.0)
        np.testing.assert_array_equal(cached.has_brain(modality), has_brain)
        for z in range(slices.shape[0]):
          got = cached.image_slice(modality, z, size=size, clip=5.0)
          assert got.dtype == np.float32
          np.testing.assert_array_equal(got, slices[z])  # bit for bit, not to a tolerance
      tumour = region_slices.any(axis=(1, 2, 3))
      np.testing.assert_array_equal(cached.tumour_in_view(size=size), tumour)
      for z in range(region_slices.shape[0]):
        label = cached.label_slice(z, size=size)
        np.testing.assert_array_equal(
            readers.labels_to_regions(label, convention=case.label_convention),
            region_slices[z].astype(bool))


def test_the_cache_is_compact_and_holds_only_the_brain_box(data, tmp_path):
  _prepared(data, tmp_path / "cache")
  case = readers.find_cases(data)[0]
  folder = tmp_path / "cache" / "cases" / case.case_id
  meta = json.loads((folder / "meta.json").read_text())
  (x0, x1), (y0, y1) = meta["box"]
  stored = np.load(folder / "flair.npy")
  assert stored.shape == (meta["shape"][2], x1 - x0, y1 - y0)
  assert stored.dtype in (np.int16, np.float32)
  assert np.load(folder / "label.npy").dtype == np.uint8


def test_prepare_reuses_fresh_cases_and_refreshes_changed_ones(data, tmp_path):
  lines = _prepared(data, tmp_path / "cache")
  assert "preparing 8 of 8 cases" in lines[0] and "8 not prepared" in lines[0]
  assert (tmp_path / "cache" / "manifest.json").is_file()
  assert "all 8 cases prepared and up to date" in _prepared(data, tmp_path / "cache")[0]
  cases = readers.find_cases(data)
  # A source rewritten (new bytes and mtime) is prepared again, and only that case.
  flair = cases[2].images["flair"]
  before = flair.stat()
  flair.write_bytes(flair.read_bytes())
  os.utime(flair, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
  lines = _prepared(data, tmp_path / "cache")
  assert "preparing 1 of 8 cases" in lines[0] and "changed since it was prepared" in lines[0]
  # A stale case is never read as it is.
  flair.touch()
  os.utime(flair, ns=(before.st_atime_ns, before.st_mtime_ns + 2 * 10**9))
  with pytest.raises(UserError, match="changed since it was prepared"):
    cache.open_case(tmp_path / "cache", cases[2])
  # Another cache format version is prepared again.
  meta_path = tmp_path / "cache" / "cases" / cases[0].case_id / "meta.json"
  meta = json.loads(meta_path.read_text())
  meta["format_version"] = 0
  meta_path.write_text(json.dumps(meta))
  lines = _prepared(data, tmp_path / "cache")
  assert "preparing 2 of 8 cases" in lines[0] and "cache format 0" in lines[0]


def test_an_interrupted_prepare_resumes_where_it_stopped(data, tmp_path, monkeypatch):
  real_prepare_case = cache.prepare_case
  done = []

  def dies_after_three(case, cases_dir, **kwargs):
    if len(done) == 3:
      raise KeyboardInterrupt  # as if killed between cases
    done.append(real_prepare_case(case, cases_dir, **kwargs))
    return done[-1]

  monkeypatch.setattr(cache, "prepare_case", dies_after_three)
  with pytest.raises(KeyboardInterrupt):
    _prepared(data, tmp_path / "cache")
  monkeypatch.setattr(cache, "prepare_case", real_prepare_case)
  folders = sorted(p.name for p in (tmp_path / "cache" / "cases").iterdir())
  assert folders == sorted(done)  # whole cases only: no partial folder left behind
  lines = _prepared(data, tmp_path / "cache")
  assert "preparing 5 of 8 cases" in lines[0]


def test_a_case_killed_mid_write_leaves_no_case_folder(data, tmp_path, monkeypatch):
  case = readers.find_cases(data)[0]
  real_save = np.save
  calls = []

  def dies_on_second_file(path, array):
    calls.append(path)
    if len(calls) == 2:
      raise OSError(28, "No space left on device", str(path))
    real_save(path, array)

  monkeypatch.setattr(np, "save", dies_on_second_file)
  with pytest.raises(UserError, match="No space left on device"):
    cache.prepare_case(case, tmp_path / "cases")
  assert not (tmp_path / "cases" / case.case_id).exists()
  assert not list((tmp_path / "cases").iterdir())  # the partial folder is removed too


def test_corrupt_or_truncated_cache_files_are_named_never_read(data, tmp_path):
  _prepared(data, tmp_path / "cache")
  case = readers.find_cases(data)[1]
  cached = cache.open_case(tmp_path / "cache", case)
  path = cached.folder / "t2.npy"
  z = int(cached.meta["modalities"]["t2"]["has_brain"][len(cached.meta["modalities"]["t2"]
                                                           ["has_brain"]) // 2])
  raw = bytearray(path.read_bytes())
  # One flipped bit in the middle of a brain slice: the checksum catches it.
  stored = np.load(path, mmap_mode="r")
  offset = len(raw) - stored.nbytes + z * stored[0].nbytes + stored[0].nbytes // 2
  del stored
  raw[offset] ^= 0x10
  path.write_bytes(bytes(raw))
  with pytest.raises(UserError, match=f"{path}: corrupt cache file .slice {z} fails"):
    cached.image_slice("t2", z, size=(32, 32), clip=5.0)
  # Truncated: cut off the last slices.
  path.write_bytes(bytes(raw[:len(raw) // 2]))
  with pytest.raises(UserError, match=f"{path}: truncated or corrupt cache file"):
    cached.image_slice("t2", z, size=(32, 32), clip=5.0)
  # A missing file is found when the case is opened.
  path.unlink()
  with pytest.raises(UserError, match=f"{path}: missing from the cache"):
    cache.open_case(tmp_path / "cache", case)


def test_the_training_batches_through_the_cache_are_the_direct_reads(data, tmp_path):
  config = load_test_config()
  training = input_pipeline.find_training_data(config, data)
  train_input = input_pipeline.TrainInput(config, training, cache_dir=tmp_path / "cache",
                                          log=lambda _: None)
  index = train_input.index
  batch = train_input.batch(5)
  chosen = dataset.batch_indices(seed=config.seed, step=5, batch_size=config.train.batch_size,
                                 num_examples=len(index))
  by_id = {c.case_id: c for c in training.cases}
  size = tuple(config.data.image_size)
  for b, i in enumerate(chosen):
    case = by_id[index.case_ids[index.case_index[i]]]
    modality = MODALITIES[index.modality[i]]
    assert modality == training.assignment[case.case_id]  # the unpaired protocol
    volume = readers.load_case(case, modalities=(modality,))
    regions = readers.labels_to_regions(volume.label, convention=case.label_convention)
    slices, region_slices, _, _ = preprocess.volume_to_slices(
        volume.images[modality], regions, size=size, clip=config.data.clip)
    np.testing.assert_array_equal(batch["image"][b, ..., 0], slices[index.z[i]])
    np.testing.assert_array_equal(batch["regions"][b], region_slices[index.z[i]])
  assert batch["image"].dtype == batch["regions"].dtype == np.float32
  assert batch["modality"].dtype == np.int32


def test_memory_does_not_grow_with_the_number_of_cases(tmp_path):
  """The peak Python/numpy heap of setting up the input and reading batches, for 4 and for 16
  training cases. The in-memory slice set this replaced held every training slice, so each case
  added its slices' bytes; through the cache a case adds only its index entries and metadata."""
  from uagan_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  config = load_test_config("--config.data.test_fraction=0.0", "--config.data.val_fraction=0.0")
  peaks = {}
  for cases in (4, 16):
    data = tmp_path / f"data{cases}"
    synthetic.write_dataset(data, cases=cases, seed=3, shape=(64, 64, 48))
    training = input_pipeline.find_training_data(config, data)
    cache.prepare(data, tmp_path / f"cache{cases}", workers=1, log=lambda _: None)
    tracemalloc.start()
    train_input = input_pipeline.TrainInput(config, training, cache_dir=tmp_path / f"cache{cases}",
                                            log=lambda _: None)
    for step in range(4):
      train_input.batch(step)
    peaks[cases] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(train_input.index) > 3 * cases  # the slices are there, on disk
    # What the in-memory set held per case: float32 images and uint8 regions of its slices.
    slice_bytes = len(train_input.index) * np.prod(config.data.image_size) * (4 + 3) / cases
  per_case = (peaks[16] - peaks[4]) / 12
  assert per_case < 0.1 * slice_bytes, (peaks, slice_bytes)


def test_prepare_command(data, tmp_path, capsys):
  code, out, err = run_cli(capsys, "prepare", "--data", data, "--out", tmp_path / "c",
                           "--workers", "2")
  assert code == 0, err
  assert "with 2 workers" in out and "prepared 8/8 cases" in out and "ETA" in out
  assert len(list((tmp_path / "c" / "cases").iterdir())) == 8
  code, out, _ = run_cli(capsys, "prepare", "--data", data, "--out", tmp_path / "c")
  assert code == 0 and "all 8 cases prepared and up to date" in out


def test_prepare_errors_are_one_line_and_keep_what_was_prepared(data, tmp_path, capsys):
  cases = readers.find_cases(data)
  bad = cases[5].images["t1ce"]
  bad.write_bytes(bad.read_bytes()[:200])  # a truncated NIfTI
  code, _, err = run_cli(capsys, "prepare", "--data", data, "--out", tmp_path / "c",
                         "--workers", "1")
  assert_one_line_error(code, err, str(bad), "truncated or corrupt")
  kept = sorted(p.name for p in (tmp_path / "c" / "cases").iterdir())
  assert kept == [c.case_id for c in cases[:5]]
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  code, _, err = run_cli(capsys, "prepare", "--data", data, "--out", blocker / "c")
  assert_one_line_error(code, err, str(blocker / "c"), "cannot create the cache folder")


@pytest.mark.parametrize("layout", readers.LAYOUTS)
def test_every_layout_is_cached_exactly(layout, tmp_path):
  """BraTS 2018-2021, BraTS 2023, UPENN-GBM and MSD (4D images, a permuted affine, a test case
  without a label): each case's cached slices equal the direct read."""
  from test_readers import write_dataset  # pylint: disable=g-import-not-at-top
  write_dataset(tmp_path / "data", layout)
  cases = readers.find_cases(tmp_path / "data")
  cache.prepare(tmp_path / "data", tmp_path / "cache", workers=1, log=lambda _: None)
  for case in cases:
    cached = cache.open_case(tmp_path / "cache", case)
    volume = readers.load_case(case)
    for modality in MODALITIES:
      slices, _, has_brain, _ = preprocess.volume_to_slices(volume.images[modality], None,
                                                            size=(8, 8), clip=3.0)
      np.testing.assert_array_equal(cached.has_brain(modality), has_brain)
      for z in range(slices.shape[0]):
        np.testing.assert_array_equal(cached.image_slice(modality, z, size=(8, 8), clip=3.0),
                                      slices[z])
    if volume.label is None:
      assert cached.meta["label"] is None
    else:
      for z in range(volume.label.shape[2]):
        expected, _ = preprocess.center_crop_or_pad(volume.label[:, :, z], size=(8, 8))
        np.testing.assert_array_equal(cached.label_slice(z, size=(8, 8)), expected)


def test_train_builds_its_cache_then_reuses_it(synth_data, tmp_path, capsys):
  argv = ["train", "--config", TEST_CONFIG, "--data", synth_data, "--cache", tmp_path / "cache",
          "--no-eval", "--config.train.steps=1"]
  code, out, err = run_cli(capsys, *argv, "--workdir", tmp_path / "w1")
  assert code == 0, err
  assert "preparing 8 of 8 cases" in out and f"read from the cache {tmp_path / 'cache'}" in out
  code, out, err = run_cli(capsys, *argv, "--workdir", tmp_path / "w2")
  assert code == 0, err
  assert "all 8 cases prepared and up to date" in out
  assert (tmp_path / "w1" / "metrics.jsonl").read_text() == (
      tmp_path / "w2" / "metrics.jsonl").read_text()


def test_train_on_a_corrupt_cache_stops_with_one_line_naming_the_file(synth_data, tmp_path,
                                                                      capsys):
  cache.prepare(synth_data, tmp_path / "cache", workers=1, log=lambda _: None)
  for path in sorted((tmp_path / "cache" / "cases").glob("*/*.npy")):
    if path.name == "label.npy":
      continue
    stored = np.load(path, mmap_mode="r")
    header, per_slice, count = path.stat().st_size - stored.nbytes, stored[0].nbytes, len(stored)
    del stored
    raw = bytearray(path.read_bytes())
    for z in range(count):  # one flipped bit in every slice: every batch would be wrong
      raw[header + z * per_slice + per_slice // 2] ^= 0x01
    path.write_bytes(bytes(raw))
  code, _, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", synth_data,
                         "--cache", tmp_path / "cache", "--workdir", tmp_path / "w", "--no-eval")
  assert_one_line_error(code, err, str(tmp_path / "cache" / "cases"), "corrupt cache file",
                        "fails its checksum")
  assert not (tmp_path / "w" / "metrics.jsonl").read_text()  # no step ran on a wrong batch


def _meta(cache_dir, case):
  return json.loads((cache_dir / "cases" / case.case_id / "meta.json").read_text())


def test_a_case_at_another_spacing_is_resampled_to_the_training_spacing(tmp_path):
  from uagan_jax.data import resample, synthetic  # pylint: disable=g-import-not-at-top
  synthetic.write_dataset(tmp_path / "data", cases=1, seed=3, shape=(32, 32, 32), spacing=2.0)
  case = readers.find_cases(tmp_path / "data")[0]
  lines = _prepared(tmp_path / "data", tmp_path / "cache", spacing=(1.0, 1.0, 1.0))
  assert any("resampled 1 of the 1 case to the training spacing 1x1x1 mm" in line
             for line in lines), lines
  meta = _meta(tmp_path / "cache", case)
  assert meta["spacing"] == [1.0, 1.0, 1.0] and meta["source_spacing"] == [2.0, 2.0, 2.0]
  assert meta["shape"] == [64, 64, 64]
  # What the cache holds is the resampler's result for the images and the label, bit for bit.
  volume = readers.load_case(case)
  cached = cache.open_case(tmp_path / "cache", case)
  size = (64, 64)
  label = resample.labels_to_shape(volume.label, (64, 64, 64))
  regions = readers.labels_to_regions(label, convention=case.label_convention)
  for modality in MODALITIES:
    expected = resample.image_to_spacing(volume.images[modality], (2.0,) * 3, (1.0,) * 3)
    slices, region_slices, _, _ = preprocess.volume_to_slices(expected, regions, size=size,
                                                              clip=5.0)
    for z in range(0, 64, 3):
      np.testing.assert_array_equal(cached.image_slice(modality, z, size=size, clip=5.0),
                                    slices[z])
      np.testing.assert_array_equal(
          readers.labels_to_regions(cached.label_slice(z, size=size),
                                    convention=case.label_convention),
          region_slices[z].astype(bool))


def test_the_training_spacing_decides_whether_a_prepared_case_is_reused(tmp_path):
  from uagan_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  synthetic.write_dataset(tmp_path / "data", cases=1, seed=3, shape=(32, 32, 32), spacing=2.0)
  case = readers.find_cases(tmp_path / "data")[0]
  cache_dir = tmp_path / "cache"
  _prepared(tmp_path / "data", cache_dir)  # its own spacing
  assert _meta(cache_dir, case)["spacing"] == [2.0, 2.0, 2.0]
  # At its own spacing (within the tolerance) it is reused, at another it is prepared again.
  assert any("its one case prepared and up to date" in line
             for line in _prepared(tmp_path / "data", cache_dir, spacing=(2.01, 2.0, 2.0)))
  lines = _prepared(tmp_path / "data", cache_dir, spacing=(1.0, 1.0, 1.0))
  assert any("prepared at another voxel spacing" in line for line in lines), lines
  assert _meta(cache_dir, case)["spacing"] == [1.0, 1.0, 1.0]
  assert any("its one case prepared and up to date" in line
             for line in _prepared(tmp_path / "data", cache_dir, spacing=(1.0, 1.0, 1.0)))
  lines = _prepared(tmp_path / "data", cache_dir, spacing=(2.0, 2.0, 2.0))
  assert any("prepared at another voxel spacing" in line for line in lines), lines
  assert _meta(cache_dir, case)["spacing"] == [2.0, 2.0, 2.0]


def test_prepare_spacing_flag(tmp_path, capsys):
  from uagan_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  synthetic.write_dataset(tmp_path / "data", cases=1, seed=3, shape=(32, 32, 32), spacing=2.0)
  code, _, err = run_cli(capsys, "prepare", "--data", tmp_path / "data", "--out",
                         tmp_path / "c", "--workers", "1", "--spacing", "1")
  assert code == 0, err
  case = readers.find_cases(tmp_path / "data")[0]
  assert _meta(tmp_path / "c", case)["spacing"] == [1.0, 1.0, 1.0]
  code, _, err = run_cli(capsys, "prepare", "--data", tmp_path / "data", "--out", tmp_path / "c",
                         "--spacing", "1", "2")
  assert_one_line_error(code, err, "--spacing 1.0 2.0: give one or three positive numbers")
