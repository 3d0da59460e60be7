"""`uagan_jax/data/input_pipeline.py`: the split of a data folder, and the training batches that
the loop sees (in step order, a pure function of (seed, step), placed, errors passed on)."""

import hashlib

import numpy as np
import pytest

from uagan_jax.data import MODALITIES, dataset, input_pipeline, readers

from conftest import load_test_config


def _assert_batches_equal(a, b):
  assert set(a) == set(b) == {"image", "regions", "modality"}
  for name in a:
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


@pytest.mark.parametrize("seed", [0, 1])
def test_find_training_data_splits_and_assigns_with_the_config_seed(synth_data, seed):
  config = load_test_config(f"--config.seed={seed}")
  data = input_pipeline.find_training_data(config, synth_data)
  ids = [c.case_id for c in readers.find_cases(synth_data)]
  assert [c.case_id for c in data.cases] == ids
  expected_splits = dataset.split_cases(ids, seed=seed, val_fraction=config.data.val_fraction,
                                        test_fraction=config.data.test_fraction)
  assert data.splits == expected_splits
  assert data.assignment == dataset.assign_modalities(expected_splits["train"], seed=seed,
                                                      modalities=config.data.modalities)
  assert sorted(data.assignment) == sorted(data.splits["train"])
  assert data.data_dir == synth_data
  assert data.layout == data.cases[0].layout
  test_ids = data.splits["test"]
  assert test_ids and [c.case_id for c in data.cases_of(test_ids)] == test_ids


def test_find_training_data_depends_on_the_seed(synth_data):
  first = input_pipeline.find_training_data(load_test_config(), synth_data)
  other = input_pipeline.find_training_data(load_test_config("--config.seed=1"), synth_data)
  assert (first.splits, first.assignment) != (other.splits, other.assignment)


@pytest.fixture(scope="module")
def config():
  return load_test_config()  # train.steps=4, train.batch_size=8, 32x32 slices


@pytest.fixture(scope="module")
def training_data(config, synth_data):
  return input_pipeline.find_training_data(config, synth_data)


@pytest.fixture(scope="module")
def train_input(config, training_data):
  return input_pipeline.TrainInput(config, training_data, log=lambda _: None)


def test_train_input_logs_its_slice_count(config, training_data):
  messages = []
  input_pipeline.TrainInput(config, training_data, log=messages.append)
  counts = [m for m in messages if m.startswith("training slices: ")]
  assert len(counts) == 1 and int(counts[0].split()[2]) > 0, messages


def test_batch_holds_the_configured_shapes_and_values(config, train_input):
  batch_size, (height, width) = config.train.batch_size, config.data.image_size
  for step in range(config.train.steps):
    batch = train_input.batch(step)
    assert set(batch) == {"image", "regions", "modality"}
    assert batch["image"].shape == (batch_size, height, width, 1)
    assert batch["image"].dtype == np.float32
    assert np.all(np.isfinite(batch["image"]))
    assert np.all(np.abs(batch["image"]) <= config.data.clip)
    assert batch["regions"].shape == (batch_size, height, width, 3)
    assert set(np.unique(batch["regions"])) <= {0.0, 1.0}
    assert batch["modality"].shape == (batch_size,)
    assert batch["modality"].dtype == np.int32
    assert set(batch["modality"].tolist()) <= {MODALITIES.index(m) for m in config.data.modalities}
  # Different steps sample different batches, so the equalities below say something.
  assert not np.array_equal(train_input.batch(0)["image"], train_input.batch(1)["image"])


def test_batches_yield_every_step_in_order_each_equal_to_batch(config, train_input):
  yielded = list(train_input.batches(0))
  assert [step for step, _ in yielded] == list(range(config.train.steps))
  for step, batch in yielded:
    _assert_batches_equal(batch, train_input.batch(step))
  assert list(train_input.batches(config.train.steps)) == []  # nothing left to do


def test_batches_are_a_pure_function_of_seed_and_step(config, training_data, train_input):
  again = input_pipeline.TrainInput(config, training_data, log=lambda _: None)
  for (step_a, a), (step_b, b) in zip(train_input.batches(0), again.batches(0), strict=True):
    assert step_a == step_b
    _assert_batches_equal(a, b)
  # Another seed, another sample.
  other_config = load_test_config("--config.seed=1")
  other = input_pipeline.TrainInput(other_config, training_data, log=lambda _: None)
  assert not np.array_equal(other.batch(0)["image"], train_input.batch(0)["image"])


def test_resumed_batches_equal_the_uninterrupted_ones(config, train_input):
  straight = dict(train_input.batches(0))
  resumed = list(train_input.batches(2))
  assert [step for step, _ in resumed] == list(range(2, config.train.steps))
  for step, batch in resumed:
    _assert_batches_equal(batch, straight[step])


def test_place_is_applied_to_every_batch(config, training_data):
  host_batches = []

  def place(batch):
    host_batches.append(batch)
    return {"placed": True, **batch}

  train_input = input_pipeline.TrainInput(config, training_data, place=place,
                                          log=lambda _: None)
  yielded = list(train_input.batches(1))
  assert [step for step, _ in yielded] == list(range(1, config.train.steps))
  # place saw each step's host batch once (in whatever order batches are produced ahead); the
  # loop gets what place returned.
  assert len(host_batches) == len(yielded)
  for step, batch in yielded:
    assert batch.pop("placed") is True
    _assert_batches_equal(batch, train_input.batch(step))
    assert sum(np.array_equal(h["image"], batch["image"]) for h in host_batches) == 1, step


class _PlaceFailed(Exception):
  pass


def test_an_error_while_producing_a_batch_reaches_the_consumer(config, training_data,
                                                              train_input):
  step_1 = train_input.batch(1)["image"]  # batches are a pure function of (seed, step)

  def place(batch):
    if np.array_equal(batch["image"], step_1):
      raise _PlaceFailed("cannot place step 1")
    return batch

  failing = input_pipeline.TrainInput(config, training_data, place=place, log=lambda _: None)
  batches = failing.batches(0)
  step, batch = next(batches)
  assert step == 0
  _assert_batches_equal(batch, train_input.batch(0))
  with pytest.raises(_PlaceFailed, match="cannot place step 1"):
    next(batches)


# ------------------------------------------------------------------------------------------------
# data.protocol: unpaired (UAGAN's, the default) unchanged; all (every modality of every case).
# ------------------------------------------------------------------------------------------------

# What the code gave before data.protocol existed (commit b0abf65), for configs/test.py on the
# session's synthetic data (8 cases, seed 0, 32^3): the slice index and the batches of steps 0-3.
_UNPAIRED_INDEX_SHA256 = "06f1926c52eabdecee82076ee6c58f32a5b9b7d684fdee7a10c3f464a00a0eba"
_UNPAIRED_BATCH_SHA256 = (
    "4e8dceabcc34140bcf478811e3db1c8541f64b29e75a5d5b3d00605a6772512b",
    "ff88eda72225e67511c49fed2f859d3fce50ec95c53bea720dcc45209548f56f",
    "7205973c3cda7e1eed618dbf5021b7ec7fe3171b7cab9f4ae6342f3dd18d0e4f",
    "18d6917b220cc7b38c9dc1c201f1264956bf5b442347b504c3bccaaaff4829ec",
)


def _sha256(*arrays) -> str:
  digest = hashlib.sha256()
  for array in arrays:
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def test_unpaired_is_the_default_and_its_batches_are_bit_identical_to_before(config, train_input):
  assert config.data.protocol == "unpaired"
  index = train_input.index
  assert _sha256(index.case_index, index.z, index.modality) == _UNPAIRED_INDEX_SHA256
  for step, expected in enumerate(_UNPAIRED_BATCH_SHA256):
    batch = train_input.batch(step)
    assert _sha256(batch["image"], batch["regions"], batch["modality"]) == expected, step


@pytest.fixture(scope="module")
def all_config():
  return load_test_config("--config.data.protocol=all")


@pytest.fixture(scope="module")
def all_data(all_config, synth_data):
  return input_pipeline.find_training_data(all_config, synth_data)


@pytest.fixture(scope="module")
def all_input(all_config, all_data):
  return input_pipeline.TrainInput(all_config, all_data, log=lambda _: None)


def test_all_protocol_gives_every_training_case_every_modality(config, training_data, all_data):
  assert all_data.protocol == "all" and training_data.protocol == "unpaired"
  assert all_data.splits == training_data.splits  # the protocol changes what trains, not the split
  assert all_data.train_modalities == {case_id: MODALITIES for case_id in all_data.splits["train"]}
  assert training_data.train_modalities == {
      case_id: (name,) for case_id, name in training_data.assignment.items()}
  with pytest.raises(ValueError, match="train_modalities"):
    _ = all_data.assignment  # no one modality per case to give


def test_all_protocol_indexes_every_case_and_modality(all_data, all_input, train_input):
  index = all_input.index
  pairs = {(index.case_ids[c], MODALITIES[m]) for c, m in zip(index.case_index, index.modality)}
  assert pairs == {(case_id, m) for case_id in all_data.splits["train"] for m in MODALITIES}
  assert all(n > 0 for n in all_input.modality_counts.values())
  assert all_input.trained_modalities == MODALITIES
  # The unpaired index is the part of it each case's assigned modality gives.
  unpaired = train_input.index
  assert len(index) > len(unpaired)
  unpaired_slices = {(unpaired.case_ids[c], int(z), int(m))
                     for c, z, m in zip(unpaired.case_index, unpaired.z, unpaired.modality)}
  all_slices = {(index.case_ids[c], int(z), int(m))
                for c, z, m in zip(index.case_index, index.z, index.modality)}
  assert unpaired_slices < all_slices


def test_all_protocol_batches_are_a_pure_function_of_seed_and_step_and_resume(
    all_config, all_data, all_input, train_input):
  again = input_pipeline.TrainInput(all_config, all_data, log=lambda _: None)
  straight = dict(all_input.batches(0))
  for step, batch in again.batches(0):
    _assert_batches_equal(batch, straight[step])
  resumed = list(all_input.batches(2))
  assert [step for step, _ in resumed] == list(range(2, all_config.train.steps))
  for step, batch in resumed:
    _assert_batches_equal(batch, straight[step])
  assert not np.array_equal(all_input.batch(0)["image"], train_input.batch(0)["image"])
  other_config = load_test_config("--config.data.protocol=all", "--config.seed=1")
  other = input_pipeline.TrainInput(other_config,
                                    input_pipeline.find_training_data(other_config, all_data.data_dir),
                                    log=lambda _: None)
  assert not np.array_equal(other.batch(0)["image"], all_input.batch(0)["image"])


def test_modality_counts_name_the_modalities_without_training_slices(synth_data):
  """One training case under the unpaired protocol trains one modality; the others get 0."""
  config = load_test_config("--config.data.test_fraction=0.0")
  data = input_pipeline.find_training_data(config, synth_data)
  one = input_pipeline.TrainingData(
      data_dir=data.data_dir, cases=data.cases, splits={"train": data.splits["train"][:1],
                                                         "val": [], "test": []},
      protocol="unpaired",
      train_modalities={data.splits["train"][0]: ("t2",)})
  single = input_pipeline.TrainInput(config, one, log=lambda _: None)
  assert single.modality_counts == {"t1": 0, "t1ce": 0, "t2": len(single.index), "flair": 0}
  assert single.trained_modalities == ("t2",)


def test_find_training_data_with_folds_trains_the_fold_and_keeps_the_test_split(synth_data):
  plain = input_pipeline.find_training_data(load_test_config(), synth_data)
  ids = [c.case_id for c in plain.cases]
  assert (plain.folds, plain.fold) == (0, 0)
  vals = []
  for fold in range(3):
    config = load_test_config("--config.data.folds=3", f"--config.data.fold={fold}")
    data = input_pipeline.find_training_data(config, synth_data)
    assert data.splits == dataset.split_fold(ids, seed=config.seed,
                                             test_fraction=config.data.test_fraction, folds=3,
                                             fold=fold)
    assert data.splits["test"] == plain.splits["test"]
    assert (data.folds, data.fold) == (3, fold)
    assert sorted(data.train_modalities) == data.splits["train"]  # what trains is the fold's
    vals += data.splits["val"]
  assert sorted(vals) == sorted(set(ids) - set(plain.splits["test"]))
