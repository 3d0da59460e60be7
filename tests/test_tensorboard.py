"""TensorBoard event files (`uagan_jax.tensorboard`): read back without TensorFlow, they hold
every metrics.jsonl and validation.jsonl value at its step, the panels as PNG images; turning
them off changes no training number; a resumed run's events replace those past its checkpoint.

Event files are TFRecord files: per record a uint64 length, its masked CRC32C (uint32), the
serialized `Event`, the data's masked CRC32C.
"""

import io
import json
import shutil
import struct

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from uagan_jax import cli, tensorboard
from uagan_jax import validation as validation_lib
from uagan_jax.errors import UserError

from conftest import TEST_CONFIG

STEPS = 4
# 2 of the 8 cases validate, every 2 steps (configs/test.py has no val split).
VALIDATE = ("--config.data.val_fraction=0.25", "--config.train.validate_every=2")


def _train(data, workdir, *extra, variant=""):
  config = f"{TEST_CONFIG}:{variant}" if variant else TEST_CONFIG
  code = cli.main(["train", "--config", config, "--data", str(data), "--workdir", str(workdir),
                   "--no-eval", f"--config.train.steps={STEPS}", *VALIDATE, *extra])
  assert code == 0


def read_events(path) -> list[event_pb2.Event]:
  """The events of one file, every record's CRCs checked."""
  data = path.read_bytes()
  events, offset = [], 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
    assert header_crc == masked_crc32c(header), (path, offset)
    record = data[offset + 12:offset + 12 + length]
    (record_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
    assert record_crc == masked_crc32c(record), (path, offset)
    events.append(event_pb2.Event.FromString(record))
    offset += 16 + length
  return events


def event_files(workdir) -> list:
  """The run's event files, in the order TensorBoard reads them (by name)."""
  folder = workdir / tensorboard.DIRECTORY
  return sorted(p for p in folder.iterdir() if ".tfevents." in p.name) if folder.exists() else []


def shown(workdir, *, texts: dict | None = None) -> tuple[dict, dict]:
  """(scalars {tag: {step: value}}, images {tag: {step: Image proto}}) as TensorBoard shows
  them: files in name order, a ``SessionLog.START`` at step s discarding what earlier events
  logged at steps >= s (its purge of orphaned data). Texts go into ``texts`` ({tag: {step:
  str}}), if given."""
  scalars, images, texts = {}, {}, {} if texts is None else texts
  for path in event_files(workdir):
    for event in read_events(path):
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        for series in (*scalars.values(), *images.values(), *texts.values()):
          for step in [s for s in series if s >= event.step]:
            del series[step]
      for value in event.summary.value:
        if value.HasField("image"):
          images.setdefault(value.tag, {})[event.step] = value.image
        elif value.metadata.plugin_data.plugin_name == "text":
          texts.setdefault(value.tag, {})[event.step] = value.tensor.string_val[0].decode()
        else:
          assert value.HasField("simple_value"), value
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars, images


def _jsonl(path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_scalars_are_the_rows(scalars: dict, rows: list[dict], prefix: str = "") -> None:
  """Every value of every row, and nothing else, under ``prefix + name`` at the row's step
  (but the validation rows' number of cases, a count: no curve)."""
  tags = {tag: series for tag, series in scalars.items() if tag.startswith(prefix)
          and (prefix or not tag.startswith("validation/"))}
  skipped = ("step", "cases") if prefix == "validation/" else ("step",)
  expected = {prefix + k for row in rows for k in row if k not in skipped}
  assert set(tags) == expected
  for row in rows:
    for name, value in row.items():
      if name not in skipped:
        assert tags[prefix + name][row["step"]] == pytest.approx(value, rel=1e-6, abs=1e-7)
  for series in tags.values():
    assert sorted(series) == [row["step"] for row in rows]


def _assert_png(image, step, tag) -> np.ndarray:
  pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
  assert pixels.shape == (image.height, image.width, 3), (tag, step)
  assert pixels.shape[0] > 100 and pixels.shape[1] > 100
  assert pixels.std() > 10  # a drawn panel, not a blank image
  return pixels


@pytest.fixture(scope="module")
def segan_run(synth_data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("segan") / "w"
  _train(synth_data, workdir)
  return workdir


def test_events_hold_every_logged_value_validation_dice_and_panels(segan_run):
  files = event_files(segan_run)
  assert len(files) == 1
  texts = {}
  scalars, images = shown(segan_run, texts=texts)
  _assert_scalars_are_the_rows(scalars, _jsonl(segan_run / "metrics.jsonl"))
  validation = _jsonl(segan_run / "validation.jsonl")
  assert [row["step"] for row in validation] == [2, 4]
  _assert_scalars_are_the_rows(scalars, validation, prefix="validation/")
  assert {"validation/dice/WT", "validation/dice/mean", "validation/dice/flair/ET"} <= set(scalars)
  # The number of val cases is a count, not a curve: one text at the first validation step.
  assert all(row["cases"] == 2 for row in validation)
  assert "validation/cases" not in scalars
  assert not [tag for tag in scalars if "cases" in tag]
  assert texts == {"validation/cases/text_summary": {2: validation_lib.describe_cases(2)}}
  assert texts["validation/cases/text_summary"][2].startswith("2 val cases: ")
  assert set(images) == {"panels/segmentation"}  # segan does not translate
  assert sorted(images["panels/segmentation"]) == [2, 4]
  for step, image in images["panels/segmentation"].items():
    _assert_png(image, step, "panels/segmentation")


def test_turned_off_writes_no_events_and_trains_bit_identically(segan_run, synth_data, tmp_path):
  workdir = tmp_path / "w"
  _train(synth_data, workdir, "--config.train.tensorboard=False")
  assert not (workdir / tensorboard.DIRECTORY).exists()
  for name in ("metrics.jsonl", "validation.jsonl"):
    assert (workdir / name).read_bytes() == (segan_run / name).read_bytes(), name


def test_resume_discards_the_events_past_the_restored_step(segan_run, synth_data, tmp_path):
  """A run killed after logging step 4 but before its checkpoint (removed here) resumes from
  step 2 and logs 3 and 4 again: TensorBoard shows each step once, the replayed run's."""
  workdir = tmp_path / "w"
  shutil.copytree(segan_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))
  _train(synth_data, workdir)
  first, second = event_files(workdir)
  assert first.read_bytes() == event_files(segan_run)[0].read_bytes()  # the old file is kept
  starts = [e for e in read_events(second) if e.HasField("session_log")]
  assert [(e.step, e.session_log.status) for e in starts] == [(3, event_pb2.SessionLog.START)]
  # Without the purge, steps 3 and 4 would be there twice.
  logged = [e.step for path in (first, second) for e in read_events(path)
            if any(v.tag == "seg/dice" for v in e.summary.value)]
  assert logged == [1, 2, 3, 4, 3, 4]
  scalars, images = shown(workdir)
  rows = _jsonl(workdir / "metrics.jsonl")
  assert rows == _jsonl(segan_run / "metrics.jsonl")
  _assert_scalars_are_the_rows(scalars, rows)
  _assert_scalars_are_the_rows(scalars, _jsonl(workdir / "validation.jsonl"), prefix="validation/")
  assert sorted(images["panels/segmentation"]) == [2, 4]


def test_a_translating_family_logs_translation_panels(synth_data, tmp_path):
  """stargan does not segment: no validation, but the translation panel at the validation
  steps."""
  workdir = tmp_path / "w"
  _train(synth_data, workdir, variant="stargan")
  scalars, images = shown(workdir)
  _assert_scalars_are_the_rows(scalars, _jsonl(workdir / "metrics.jsonl"))
  assert not [tag for tag in scalars if tag.startswith("validation/")]
  assert set(images) == {"panels/translation"}
  assert sorted(images["panels/translation"]) == [2, 4]
  for step, image in images["panels/translation"].items():
    _assert_png(image, step, "panels/translation")


def test_event_files_opened_in_the_same_second_do_not_overwrite_each_other(tmp_path):
  with tensorboard.EventLog(tmp_path, resume_step=0) as first:
    first.scalars(1, {"loss": 0.5})
    first.flush()
  with tensorboard.EventLog(tmp_path, resume_step=1) as second:
    second.scalars(2, {"loss": 0.25})
  files = sorted(p for p in tmp_path.iterdir() if ".tfevents." in p.name)
  assert files == [first.path, second.path]
  steps = [[e.step for e in read_events(p) if e.summary.value] for p in files]
  assert steps == [[1], [2]]


def test_a_bad_image_or_folder_is_refused(tmp_path):
  with tensorboard.EventLog(tmp_path / "tb", resume_step=0) as events:
    with pytest.raises(ValueError, match="uint8"):
      events.image(1, "panel", np.zeros((8, 8, 3), np.float32))
  (tmp_path / "file").write_text("not a folder")
  with pytest.raises(UserError, match="TensorBoard"):
    tensorboard.EventLog(tmp_path / "file" / "tb", resume_step=0)
