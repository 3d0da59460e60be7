"""Fault injection: what kill -9, damaged checkpoints, divergence, a second trainer, a full disk
and the scheduler's signals do to a run (`uagan_jax/checkpoint.py`, `uagan_jax/workdir.py`,
`uagan_jax/train.py`). Each fault ends in a resumable run or one ``error:`` line, never in a
traceback, a lost good checkpoint or a kept bad one."""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from uagan_jax import checkpoint, inference, train, train_state
from uagan_jax import workdir as workdir_lib
from uagan_jax.errors import UserError
from uagan_jax.train_utils import TrainingDiverged

from conftest import ROOT, TEST_CONFIG, assert_one_line_error, load_test_config, run_cli

STEPS = 4  # checkpoints at 2 and 4 (test config: checkpoint_every=2)


def _train(data, workdir, *overrides, log=None):
  config = load_test_config(*overrides)
  return train.train_and_evaluate(config, workdir=workdir, data_dir=data,
                                  log=log or (lambda message: None), evaluate_after=False)


def _popen(data, workdir, *overrides):
  command = [sys.executable, "-m", "uagan_jax", "train", "--config", TEST_CONFIG, "--data",
             str(data), "--workdir", str(workdir), "--no-eval", *overrides]
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT, env=dict(os.environ))


def _wait_for_line(process, needle):
  for line in process.stdout:
    if needle in line:
      return line
  raise AssertionError(f"{needle!r} never printed: {process.stderr.read()[-2000:]}")


def _restore(workdir, step, name="checkpoints"):
  checkpoints = checkpoint.Checkpointer(workdir / name, every=1, keep=100)
  try:
    # The restore target is shapes only (no initialisation program compiled and run per call).
    return jax.device_get(checkpoints.restore(step, train_state.abstract_state(load_test_config())))
  finally:
    checkpoints.close()


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _steps(path):
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory):
  """A finished 4-step run (checkpoints 2 and 4; read-only: copy before damaging)."""
  workdir = tmp_path_factory.mktemp("trained") / "w"
  _train(synth_data, workdir, f"--config.train.steps={STEPS}",
         "--config.train.keep_checkpoints=5")
  return workdir


# --- kill -9 -------------------------------------------------------------------------------------


def test_kill_9_at_random_moments_then_resume_equals_the_uninterrupted_run(synth_data, trained,
                                                                          tmp_path):
  steps = ("--config.train.steps=4", "--config.train.keep_checkpoints=5")
  rng = np.random.default_rng(0)  # seeded moments: after compilation, mid-step or mid-save
  workdir = tmp_path / "w"
  for after in ("training segan", "step 1/"):  # mid-compilation, then mid-steps or mid-save
    process = _popen(synth_data, workdir, *steps)
    try:
      _wait_for_line(process, after)
      time.sleep(rng.uniform(0.0, 1.0))
    finally:
      process.kill()  # SIGKILL: no handler, no cleanup, the lock left behind
      process.communicate()
  process = _popen(synth_data, workdir, *steps)
  out, err = process.communicate(timeout=600)
  assert process.returncode == 0, err[-3000:]
  assert (workdir / "metrics.jsonl").read_text() == (trained / "metrics.jsonl").read_text()
  assert _leaves_equal(_restore(workdir, STEPS), _restore(trained, STEPS))
  assert "Traceback" not in err


# --- Damaged checkpoints ---------------------------------------------------------------------------


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  # The data of the finished checkpoint (ocdbt.process_*/ hold what each process wrote before
  # the merge into it; restore reads this one).
  files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(path):
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _flip_bit(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


CORRUPTIONS = {
    "data_truncated": lambda step: _truncate(_largest_data_file(step)),
    "data_zeroed": lambda step: _largest_data_file(step).write_bytes(
        bytes(_largest_data_file(step).stat().st_size)),
    "data_deleted": lambda step: _largest_data_file(step).unlink(),
    "data_bit_flipped": lambda step: _flip_bit(_largest_data_file(step)),
    "metadata_truncated": lambda step: _truncate(step / "state" / "_METADATA"),
    "state_deleted": lambda step: shutil.rmtree(step / "state"),
}


@pytest.fixture
def damaged(trained, tmp_path, request):
  """A copy of the trained workdir whose newest checkpoint (4) is damaged as the test asks."""
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  CORRUPTIONS[request.param](workdir / "checkpoints" / str(STEPS))
  return workdir


@pytest.mark.parametrize("damaged", sorted(CORRUPTIONS), indirect=True)
def test_a_damaged_checkpoint_is_reported_and_the_one_before_used(damaged):
  # load_state serves evaluate, predict and translate alike.
  notes = []
  state, step = inference.load_state(load_test_config(), damaged, log=notes.append)
  assert step == 2
  assert len(notes) == 1
  assert str(damaged / "checkpoints" / str(STEPS)) in notes[0]
  assert "unreadable" in notes[0] and "step 2 instead" in notes[0]
  assert _leaves_equal(jax.device_get(state), _restore(damaged, 2))
  assert (damaged / "checkpoints" / str(STEPS)).exists()  # read-only commands move nothing


@pytest.mark.parametrize("damaged", ["data_bit_flipped"], indirect=True)
def test_evaluate_falls_back_with_one_warning_line(capsys, damaged, synth_data):
  code, out, err = run_cli(capsys, "evaluate", "--workdir", damaged, "--data", synth_data)
  assert code == 0, err
  assert "Traceback" not in err
  warnings = [line for line in err.splitlines() if line.strip()]
  assert len(warnings) == 1 and warnings[0].startswith("warning: "), err
  assert str(damaged / "checkpoints" / str(STEPS)) in warnings[0] and "step 2" in warnings[0]
  assert "Dice WT" in out


@pytest.mark.parametrize("damaged", ["data_bit_flipped", "metadata_truncated"], indirect=True)
def test_train_resumes_from_the_newest_readable_checkpoint(damaged, synth_data, trained):
  log = []
  _train(synth_data, damaged, f"--config.train.steps={STEPS}",
         "--config.train.keep_checkpoints=5", log=log.append)
  aside = damaged / "checkpoints_unreadable" / str(STEPS)
  assert any("unreadable" in line and str(aside) in line for line in log), log
  assert f"resumed from {damaged / 'checkpoints' / '2'}" in log
  assert aside.is_dir()  # kept for inspection, out of the way of the replayed save
  # The replayed steps save 4 again, equal to the undamaged run's.
  assert _leaves_equal(_restore(damaged, STEPS), _restore(trained, STEPS))
  assert (damaged / "metrics.jsonl").read_text() == (trained / "metrics.jsonl").read_text()


def test_no_readable_checkpoint_is_one_line_naming_the_folder(capsys, trained, tmp_path,
                                                              synth_data):
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  steps = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert "2" in steps and str(STEPS) in steps
  for step in steps:
    CORRUPTIONS["state_deleted"](workdir / "checkpoints" / step)
  code, _, err = run_cli(capsys, "evaluate", "--workdir", workdir, "--data", synth_data)
  assert_one_line_error(code, err, workdir / "checkpoints", "no readable checkpoint",
                        *(f"step {step}:" for step in steps))


def test_a_checkpoint_that_changed_on_disk_fails_its_digest(tmp_path):
  # A change TensorStore cannot see (valid data, other values), as a stand-in for a bit flip
  # in data it does not checksum: the digest saved with the checkpoint no longer matches.
  state = {"w": np.arange(4, dtype=np.float32)}
  checkpoints = checkpoint.Checkpointer(tmp_path / "c", every=1, keep=5)
  checkpoints.save(1, state)
  checkpoints.save(2, state)
  checkpoints.close()
  digest_file = tmp_path / "c" / "2" / "digest" / "metadata"
  digest_file.write_text(json.dumps({"sha256": "0" * 64}))
  checkpoints = checkpoint.Checkpointer(tmp_path / "c", every=1, keep=5)
  with pytest.raises(checkpoint.CheckpointUnreadable, match="does not match the digest"):
    checkpoints.restore(2, state)
  notes = []
  restored, step = checkpoints.restore_newest(state, log=notes.append)
  checkpoints.close()
  assert step == 1 and np.array_equal(restored["w"], state["w"])
  assert len(notes) == 1 and "does not match the digest" in notes[0]


# --- Divergence ------------------------------------------------------------------------------------


def test_a_non_finite_state_is_never_saved_and_good_checkpoints_stay(tmp_path):
  state = {"params": {"w": np.ones(3, np.float32)}, "step": np.int32(0)}
  checkpoints = checkpoint.Checkpointer(tmp_path / "c", every=2, keep=2)
  assert checkpoints.save(2, state)
  bad = {"params": {"w": np.array([1.0, np.inf, 1.0], np.float32)}, "step": np.int32(4)}
  assert not checkpoints.save(3, bad)  # not due: not even checked
  for step in (4, 6):  # would rotate 2 out, were they saved
    with pytest.raises(checkpoint.NonFiniteState, match=f"step {step}: non-finite params/w"):
      checkpoints.save(step, bad)
  checkpoints.close()
  assert checkpoints.all_steps() == [2]


@pytest.mark.parametrize("overrides", [
    # Logged every 10 steps, saved every 2: the check runs on the saving steps too.
    ("--config.train.log_every=10", "--config.optim.segmentor_lr=1e8",
     "--config.optim.critic_lr=1e8"),
], ids=["lr1e8_log10_save2"])
def test_divergence_stops_before_a_bad_checkpoint(synth_data, tmp_path, overrides):
  workdir = tmp_path / "w"
  with pytest.raises(TrainingDiverged, match=r"step \d+: non-finite nets/") as info:
    _train(synth_data, workdir, "--config.train.steps=20", "--config.train.checkpoint_every=2",
           "--config.train.keep_checkpoints=2", *overrides)
  diverged = int(str(info.value).split("step ")[1].split(":")[0])
  checkpoints = checkpoint.Checkpointer(workdir / "checkpoints", every=1, keep=100)
  steps = checkpoints.all_steps()
  checkpoints.close()
  assert all(step < diverged for step in steps)
  for step in steps:  # the kept ones are finite, all of them
    assert bool(checkpoint.all_finite(_restore(workdir, step)))


# --- One run per workdir ---------------------------------------------------------------------------


def test_a_second_trainer_is_refused_and_sigint_exits_130(capsys, synth_data, tmp_path):
  workdir = tmp_path / "w"
  first = _popen(synth_data, workdir, "--config.train.steps=100000",
                 "--config.train.checkpoint_every=1000")
  try:
    _wait_for_line(first, "step 1/")
    code, _, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", synth_data,
                           "--workdir", workdir, "--no-eval")
    assert_one_line_error(code, err, workdir, "in use by another training run",
                          f"process {first.pid}", os.uname().nodename)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=300)
  finally:
    first.kill()
  assert first.returncode == 130, err[-2000:]
  assert "stopped by SIGINT" in err and "Traceback" not in err
  step = int(out.split("stopped at step ")[1].split(";")[0])
  assert (workdir / "checkpoints" / str(step)).is_dir()
  assert _steps(workdir / "metrics.jsonl") == list(range(1, step + 1))


def _hold_lock(workdir, then):
  """A separate process that takes the workdir's lock, then runs the Python in ``then``."""
  script = ("import pathlib, sys, time\nfrom uagan_jax.workdir import WorkdirLock\n"
            f"lock = WorkdirLock(pathlib.Path({str(workdir)!r}))\nlock.acquire()\n"
            "print('locked', flush=True)\n" + then)
  process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert process.stdout.readline().strip() == "locked"
  return process


def test_lock_of_a_live_run_is_refused_and_of_a_killed_run_taken_over(tmp_path):
  holder = _hold_lock(tmp_path, "time.sleep(60)")
  try:
    with pytest.raises(UserError, match=f"in use by another training run \\(process "
                                        f"{holder.pid} on host "):
      workdir_lib.WorkdirLock(tmp_path).acquire()
  finally:
    holder.kill()  # kill -9: the lock file still names it, the kernel released its flock
    holder.wait()
  notes = []
  with workdir_lib.WorkdirLock(tmp_path, log=notes.append):
    assert len(notes) == 1 and f"taking over the lock left by process {holder.pid}" in notes[0]
  with workdir_lib.WorkdirLock(tmp_path, log=notes.append):  # a clean release leaves no holder
    assert len(notes) == 1


def test_lock_kept_by_an_orphan_of_a_killed_run_is_stale(tmp_path):
  # The dead holder's child inherited the lock's descriptor, so the flock outlives the holder:
  # the file names a pid that is gone, so the lock is stale and replaced.
  holder = _hold_lock(tmp_path, "import subprocess\nchild = subprocess.Popen(['sleep', '60'], "
                      "pass_fds=(lock._fd,))\nprint(child.pid, flush=True)\ntime.sleep(60)")
  orphan = int(holder.stdout.readline())
  holder.kill()
  holder.wait()
  try:
    notes = []
    with workdir_lib.WorkdirLock(tmp_path, log=notes.append):
      assert any(f"process {holder.pid}" in note and "no longer running" in note
                 for note in notes), notes
  finally:
    os.kill(orphan, signal.SIGKILL)


# --- Full or read-only disk ------------------------------------------------------------------------


def _enospc(*args, **kwargs):
  del args, kwargs
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["checkpoint", "metrics", "png"])
def test_a_full_disk_is_one_line_and_the_run_resumes(capsys, monkeypatch, synth_data, trained,
                                                     tmp_path, where):
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))
  (workdir / "metrics.jsonl").write_text(
      "".join(line + "\n" for line in (trained / "metrics.jsonl").read_text().splitlines()[:2]))
  extra = ["--config.train.steps=4", "--config.train.keep_checkpoints=5"]
  if where == "checkpoint":
    monkeypatch.setattr("orbax.checkpoint.CheckpointManager.save", _enospc)
    needle = workdir / "checkpoints"
  elif where == "metrics":
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up as a row is appended to metrics.jsonl
      if os.readlink(f"/proc/self/fd/{fd}").endswith("/metrics.jsonl"):
        _enospc()
      real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    needle = workdir / "metrics.jsonl"
  else:
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", _enospc)
    needle = workdir / "figures" / "training_curves.png"
  code, _, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", synth_data,
                         "--workdir", workdir, "--no-eval", *extra)
  assert_one_line_error(code, err, needle, "no space left on the device")
  assert 2 in checkpoint.Checkpointer(workdir / "checkpoints", every=1, keep=100).all_steps()
  monkeypatch.undo()
  code, _, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", synth_data,
                         "--workdir", workdir, "--no-eval", *extra)
  assert code == 0, err
  assert (workdir / "metrics.jsonl").read_text() == (trained / "metrics.jsonl").read_text()
  assert _leaves_equal(_restore(workdir, STEPS), _restore(trained, STEPS))


@pytest.fixture
def small_tmpfs(tmp_path):
  """A 16 MiB tmpfs (needs root; skipped elsewhere): a disk that really fills up."""
  mount = tmp_path / "tmpfs"
  mount.mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
  yield mount
  subprocess.run(["umount", str(mount)], check=False)


def test_a_really_full_disk_keeps_the_checkpoint_and_the_run_resumes(capsys, small_tmpfs,
                                                                     synth_data, trained):
  workdir = small_tmpfs / "w"
  extra = ["--no-eval", "--config.train.keep_checkpoints=5"]
  code, _, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", synth_data,
                         "--workdir", workdir, "--config.train.steps=2", *extra)
  assert code == 0, err
  filler = small_tmpfs / "filler"
  try:  # fill the disk to the last byte
    with open(filler, "wb") as f:
      while True:
        f.write(bytes(4096))
        f.flush()
  except OSError as e:
    assert e.errno == errno.ENOSPC
  code, _, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", synth_data,
                         "--workdir", workdir, f"--config.train.steps={STEPS}", *extra)
  assert_one_line_error(code, err, small_tmpfs, "no space left on the device")
  filler.unlink()
  code, _, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", synth_data,
                         "--workdir", workdir, f"--config.train.steps={STEPS}", *extra)
  assert code == 0, err
  assert (workdir / "metrics.jsonl").read_text() == (trained / "metrics.jsonl").read_text()
  assert _leaves_equal(_restore(workdir, STEPS), _restore(trained, STEPS))


def test_a_bucket_url_as_workdir_is_refused_before_anything_is_written(capsys, synth_data,
                                                                      tmp_path, monkeypatch):
  # pathlib would turn gs://bucket/run into a local folder gs:/bucket/run: train into it, unseen.
  monkeypatch.chdir(tmp_path)
  code, _, err = run_cli(capsys, "train", "--config", TEST_CONFIG, "--data", synth_data,
                         "--workdir", "gs://bucket/run", "--no-eval")
  assert_one_line_error(code, err, "workdir gs://bucket/run", "a URL (gs://...) is not a folder",
                        "file system every process sees")
  assert list(tmp_path.iterdir()) == []
  for local in ("runs/x", "/abs/x", "c:/x", "data:2/x"):  # a drive letter or a colon in a name
    workdir_lib.refuse_url(local)
