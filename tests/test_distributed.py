"""Several processes, one run (`uagan_jax.distributed`): 2 processes x 2 CPU devices (gloo
collectives over loopback) train like 1 process x 4 devices; checkpoints cross between the two;
the SLURM script's command under srun's variables; a stop signal to one process; bad
combinations end with one line on every process.

Each process compiles the tiny step of configs/test.py (the test run's compilation cache is
shared, so the second run of a topology is quicker).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from uagan_jax import checkpoint, train_state

from conftest import ROOT, TEST_CONFIG, load_test_config

STEPS = 4
# The equality runs validate (2 of the 8 cases) every 2 steps and evaluate the test cases at the
# end: process 0 alone does both, on its replica of the state.
VALIDATE = ("--config.data.val_fraction=0.25", "--config.train.validate_every=2")
TIMEOUT_S = 600


def _free_port(low: int = 20000, high: int = 60000) -> int:
  for port in np.random.default_rng(os.getpid() + int(time.time())).integers(low, high, 200):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", int(port)))
      except OSError:
        continue
      return int(port)
  raise RuntimeError("no free port")


def _train_argv(data, workdir, steps, *extra, evaluate=False):
  return [sys.executable, "-m", "uagan_jax", "train", "--config", TEST_CONFIG, "--data", str(data),
          "--workdir", str(workdir), *([] if evaluate else ["--no-eval"]),
          f"--config.train.steps={steps}", "--config.train.keep_checkpoints=5", *map(str, extra)]


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=str(ROOT))
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _one_process(data, workdir, steps, *extra, evaluate=False):
  result = subprocess.run(_train_argv(data, workdir, steps, *extra, evaluate=evaluate),
                          capture_output=True,
                          text=True, cwd=ROOT, env=_env(4), timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _start(commands, envs):
  return [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env=e) for c, e in zip(commands, envs)]


def _finish(processes, timeout=TIMEOUT_S):
  """(exit code, stdout, stderr) of each process; kills them all on a timeout (a hang)."""
  deadline = time.time() + timeout
  results = []
  try:
    for p in processes:
      out, err = p.communicate(timeout=max(1, deadline - time.time()))
      results.append((p.returncode, out, err))
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  return results


def _two_processes(data, workdir, steps, *extra):
  """2 processes x 2 devices with the explicit flags."""
  port = _free_port()
  flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
  return _finish(_start([_train_argv(data, workdir, steps, *flags, "--process-id", i, *extra)
                         for i in range(2)], [_env(2), _env(2)]))


def _slurm_env(task: int, ntasks: int = 2) -> dict:
  """The variables srun sets for task ``task`` of a one-node job step (those jax's SlurmCluster
  reads, and the usual others), with a job id whose derived coordinator port is free."""
  port = _free_port(65535 - 2**12 + 1, 65535)
  job_id = 1_000_000 * 4096 + (port - (65535 - 2**12 + 1))  # SlurmCluster: id % 4096 + 61440
  return {"SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_NTASKS": ntasks,
          "SLURM_NPROCS": ntasks, "SLURM_PROCID": task, "SLURM_LOCALID": task, "SLURM_NODEID": 0,
          "SLURM_STEP_NODELIST": "localhost", "SLURM_NODELIST": "localhost",
          "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NUM_NODES": 1, "SLURM_JOB_NUM_NODES": 1,
          "SLURM_STEP_NUM_TASKS": ntasks, "SLURM_CPUS_ON_NODE": 2, "SLURM_STEP_ID": 0}


def _slurm_processes(data, workdir, steps, *extra, evaluate=False):
  """Runs launch/slurm.sbatch's training command as srun would run it: one task per process."""
  common = _slurm_env(0)
  envs = []
  for task in range(2):
    env = _env(2, **{**common, **{k: v for k, v in _slurm_env(task).items()
                                  if k in ("SLURM_PROCID", "SLURM_LOCALID")}})
    env.update(UAGAN_JAX_SOURCE_ONLY="1", PYTHON=sys.executable, CONFIG=TEST_CONFIG,
               DATA=str(data), WORKDIR=str(workdir), BATCH_SIZE="8")
    envs.append(env)
  script = ("source launch/slurm.sbatch && train_command \"$@\"")
  argv = ["bash", "-c", script, "slurm", *([] if evaluate else ["--no-eval"]),
          f"--config.train.steps={steps}",
          "--config.train.keep_checkpoints=5", *map(str, extra)]
  return _finish(_start([argv, argv], envs))


def _jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_close_numbers(a, b, path="") -> None:
  """The same structure; numbers to 1e-5 relative (validation and evaluation threshold the
  predictions, and parameters within rounding do not move a 32x32 prediction across 0.5)."""
  if isinstance(a, dict):
    assert set(a) == set(b), path
    for key in a:
      _assert_close_numbers(a[key], b[key], f"{path}/{key}")
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_close_numbers(x, y, f"{path}[{i}]")
  elif isinstance(a, float) and not isinstance(b, str):
    assert b == pytest.approx(a, rel=1e-5, abs=1e-7, nan_ok=True), path
  else:
    assert a == b, path


def _without_workdirs(summary: dict) -> dict:
  """An evaluation's summary.json without the paths of the models it names (two runs' differ)."""
  for model in summary.get("models", ()):
    model.pop("workdir")
  return summary


def _rows(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _state(workdir, step):
  checkpoints = checkpoint.Checkpointer(workdir / "checkpoints", every=1, keep=100)
  assert step in checkpoints.all_steps(), checkpoints.all_steps()
  # The restore target is shapes only (no initialisation program compiled and run per call).
  state = checkpoints.restore(step, train_state.abstract_state(load_test_config()))
  checkpoints.close()
  return jax.device_get(state)


def _assert_same_training(a, b, steps):
  """metrics.jsonl rows to 1e-5 relative; parameters as tests/test_train.py's 4-device test
  (1% of one Adam step, lr = 2e-4, plus 1e-5 of the array's scale: the summation order of the
  cross-process collectives differs, nothing else may)."""
  rows_a, rows_b = _rows(a), _rows(b)
  assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == list(range(1, steps + 1))
  for row_a, row_b in zip(rows_a, rows_b):
    assert set(row_a) == set(row_b)
    for name in row_a:
      assert row_b[name] == pytest.approx(row_a[name], rel=1e-5, abs=1e-7), (row_a["step"], name)
  state_a, state_b = _state(a, steps), _state(b, steps)
  lr = max(load_test_config().optim.segmentor_lr, load_test_config().optim.critic_lr)
  assert int(state_a.step) == int(state_b.step) == steps
  for x, y in zip(jax.tree.leaves(state_a.nets), jax.tree.leaves(state_b.nets)):
    if x.dtype.kind == "f":
      assert np.all(np.abs(x - y) <= 0.01 * lr + 1e-5 * np.abs(x).max())
  np.testing.assert_array_equal(state_a.rng, state_b.rng)


def _assert_process_zero_wrote(results, workdir, steps):
  """Every process exited 0; process 0 logged the steps, process 1 nothing of the run."""
  for i, (code, _, err) in enumerate(results):
    assert code == 0, (i, err[-3000:])
  assert f"step {steps}/{steps}" in results[0][1]
  assert "in 2 processes" in results[0][1]
  assert "step " not in results[1][1] and "training " not in results[1][1], results[1][1][-2000:]
  assert {p.name for p in workdir.iterdir()} >= {"config.json", "splits.json", "metrics.jsonl",
                                                  "checkpoints"}


@pytest.fixture(scope="module")
def one_process_run(synth_data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one") / "w"
  _one_process(synth_data, workdir, STEPS, *VALIDATE, evaluate=True)
  return workdir


@pytest.fixture(scope="module")
def slurm_run(synth_data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("slurm") / "w"
  return workdir, _slurm_processes(synth_data, workdir, STEPS, *VALIDATE, evaluate=True)


def test_slurm_script_under_srun_variables_trains_like_one_process(one_process_run, slurm_run):
  """launch/slurm.sbatch's command, 2 tasks with srun's variables and --distributed alone (the
  auto-detection path): the same rows and parameters as 1 process x 4 devices."""
  workdir, results = slurm_run
  _assert_process_zero_wrote(results, workdir, STEPS)
  # Process 0 alone writes TensorBoard events: one file, though both processes share the workdir.
  assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
  # Can fail: processes loading the same rows (or each the whole batch) give other losses.
  _assert_same_training(one_process_run, workdir, STEPS)
  # Validation and the evaluation (process 0, its replica of the state): the same numbers.
  for name in ("validation.jsonl", "eval_test/summary.json", "eval_test/metrics.csv"):
    assert (workdir / name).is_file(), name
  _assert_close_numbers(_jsonl(one_process_run / "validation.jsonl"),
                        _jsonl(workdir / "validation.jsonl"))
  _assert_close_numbers(*(_without_workdirs(json.loads((run / "eval_test" / "summary.json")
                                                      .read_text()))
                          for run in (one_process_run, workdir)))
  best = lambda w: sorted(p.name for p in (w / "checkpoints_best").iterdir() if p.name.isdigit())
  assert best(workdir) == best(one_process_run) and best(workdir)


def test_checkpoints_cross_between_one_and_two_processes(synth_data, one_process_run, slurm_run,
                                                         tmp_path):
  """The 2-process run's checkpoint resumes in 1 process, the 1-process run's in 2 processes
  (explicit --coordinator/--num-processes/--process-id): both reach the same step 6."""
  two_then_one, one_then_two = tmp_path / "two_then_one", tmp_path / "one_then_two"
  shutil.copytree(slurm_run[0], two_then_one)
  shutil.copytree(one_process_run, one_then_two)
  log = _one_process(synth_data, two_then_one, STEPS + 2, *VALIDATE)
  assert f"resumed from {two_then_one / 'checkpoints' / str(STEPS)}" in log
  results = _two_processes(synth_data, one_then_two, STEPS + 2, *VALIDATE)
  _assert_process_zero_wrote(results, one_then_two, STEPS + 2)
  assert f"resumed from {one_then_two / 'checkpoints' / str(STEPS)}" in results[0][1]
  _assert_same_training(two_then_one, one_then_two, STEPS + 2)
  _assert_close_numbers(_jsonl(two_then_one / "validation.jsonl"),
                        _jsonl(one_then_two / "validation.jsonl"))


def test_sigterm_to_one_process_stops_both_at_the_same_step(synth_data, tmp_path):
  """SIGTERM to process 1 only: both leave the loop at the same log step (agreed there by an
  all-gather of the stop flag), both exit 143 (a scheduler's stop, as a SIGTERM to one process
  exits: uagan_jax.train_utils.Interrupted), one checkpoint of that step; nothing hangs."""
  workdir = tmp_path / "w"
  port = _free_port()
  flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
           "--config.train.log_every=2", "--config.train.checkpoint_every=1000"]
  processes = _start([_train_argv(synth_data, workdir, 100000, *flags, "--process-id", i)
                      for i in range(2)], [_env(2), _env(2)])
  try:
    for line in processes[0].stdout:
      if "step 4/" in line:  # compiled and running
        processes[1].send_signal(signal.SIGTERM)
        break
  finally:
    results = _finish(processes, timeout=300)
  for i, (code, _, err) in enumerate(results):
    assert code == 143, (i, err[-3000:])
  assert "received SIGTERM" in results[1][2] and "received SIGTERM" not in results[0][2]
  stopped = [line for line in results[0][1].splitlines() if "stopped at step" in line]
  assert stopped, results[0][1][-2000:]
  step = int(stopped[0].split("stopped at step ")[1].split(";")[0])
  assert step >= 4 and step % 2 == 0  # the first log step whose agreement saw the signal
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  # One checkpoint of the stop (Orbax's policy also keeps step 1, the first of a fresh run).
  assert saved[-1] == step and set(saved[:-1]) <= {1}, saved
  assert [r["step"] for r in _rows(workdir)] == list(range(2, step + 1, 2))


@pytest.mark.parametrize("case", ["batch", "config", "pmap"])
def test_bad_combination_ends_every_process_with_one_line(synth_data, tmp_path, case):
  """A global batch the 4 devices do not divide, processes started with different configs,
  pmap with 2 processes: on every process one ``error:`` line naming it, exit 2, nothing
  written, no hang."""
  port = _free_port()
  extra = {"batch": [["--config.train.batch_size=6"]] * 2,
           "config": [[], ["--config.seed=1"]],
           "pmap": [["--config.train.parallel_mode=pmap"]] * 2}[case]
  needle = {"batch": "train.batch_size=6", "config": "different configs",
            "pmap": "parallel_mode=pmap"}[case]
  workdir = tmp_path / "w"
  results = _finish(_start(
      [_train_argv(synth_data, workdir, STEPS, "--coordinator", f"127.0.0.1:{port}",
                   "--num-processes", 2, "--process-id", i, *extra[i]) for i in range(2)],
      [_env(2), _env(2)]), timeout=300)
  for code, _, err in results:
    assert code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], err[-2000:]
    assert "Traceback" not in err
  assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()


def test_unreachable_coordinator_ends_with_one_line(synth_data, tmp_path):
  """Process 1 of 2 whose coordinator never answers: one line after --distributed-timeout, exit 2
  (not JAX's abort with a C++ stack trace at its own timeout)."""
  port = _free_port()
  started = time.time()
  result = subprocess.run(
      _train_argv(synth_data, tmp_path / "w", STEPS, "--coordinator", f"127.0.0.1:{port}",
                  "--num-processes", 2, "--process-id", 1, "--distributed-timeout", 2),
      capture_output=True, text=True, cwd=ROOT, env=_env(2), timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("error: --distributed:") and f"127.0.0.1:{port}" in lines[-1]
  assert "within 2 s" in lines[-1]
  assert not any(line.startswith("error: ") for line in lines[:-1])
  assert time.time() - started < 90
  assert not (tmp_path / "w").exists()


def test_explicit_flags_are_all_or_none(synth_data, tmp_path):
  result = subprocess.run(
      _train_argv(synth_data, tmp_path / "w", STEPS, "--coordinator", "127.0.0.1:1234"),
      capture_output=True, text=True, cwd=ROOT, env=_env(2), timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: --coordinator, --num-processes")


# --- In one process: the pieces ------------------------------------------------------------------


def test_each_process_reads_only_its_rows_of_the_same_global_batch(synth_data):
  """TrainInput with ``rows`` reads exactly those rows of the global batch of step t (what a
  process loads), and only those."""
  from uagan_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config = load_test_config()
  data = input_pipeline.find_training_data(config, synth_data)
  whole = input_pipeline.TrainInput(config, data, log=lambda _: None)
  halves = [input_pipeline.TrainInput(config, data, log=lambda _: None, rows=slice(a, a + 4))
            for a in (0, 4)]
  reads = []
  original = whole.cases[0].__class__.image_slice

  def counting(self, *args, **kwargs):
    reads.append(1)
    return original(self, *args, **kwargs)

  for step in (0, 3):
    full = whole.batch(step)
    for half, start in zip(halves, (0, 4)):
      part = half.batch(step)
      for name in full:
        np.testing.assert_array_equal(part[name], full[name][start:start + 4])
  halves[0].cases[0].__class__.image_slice = counting
  try:
    halves[0].batch(5)
  finally:
    halves[0].cases[0].__class__.image_slice = original
  assert len(reads) == 4


def test_stop_is_agreed_at_sync_points_only():
  from uagan_jax.train_utils import StopRequested  # pylint: disable=g-import-not-at-top
  asked = []

  def any_process(flag):
    asked.append(flag)
    return True  # another process got the signal

  alone = StopRequested()
  assert not alone.should_stop(sync_point=False)
  alone.requested = True
  assert alone.should_stop(sync_point=False)  # one process: at the next step
  several = StopRequested(any_process)
  assert not several.should_stop(sync_point=False) and asked == []  # no collective between
  assert several.should_stop(sync_point=True) and asked == [False]


def test_config_hash_names_the_resolved_config():
  from uagan_jax import config as config_lib, distributed  # pylint: disable=g-import-not-at-top
  a = distributed.config_hash(config_lib.to_json(load_test_config()))
  assert a == distributed.config_hash(config_lib.to_json(load_test_config()))
  assert a != distributed.config_hash(config_lib.to_json(load_test_config("--config.seed=1")))
  distributed.check_same_config(config_lib.to_json(load_test_config()))  # one process: no-op


@pytest.mark.parametrize("script", ["train_gpu.sh", "slurm.sbatch", "tpu_vm.sh"])
def test_launch_scripts_parse_and_document_the_gpu_settings(script):
  path = ROOT / "launch" / script
  assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
  text = path.read_text()
  assert "--edit here" not in text and "# --- edit here" in text  # the one block a user edits
  if script != "tpu_vm.sh":
    assert "--xla_gpu_deterministic_ops=true" in text and "XLA_PYTHON_CLIENT_MEM_FRACTION" in text
  else:
    assert "--worker=all" in text and "--distributed" in text


def test_tpu_script_without_a_command_prints_its_usage():
  result = subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh")], capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 2 and "usage: bash launch/tpu_vm.sh setup|train" in result.stderr
