"""Bit-for-bit reproducibility from a seed, and resume-after-interruption equality."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from uagan_jax import checkpoint, parallel, train, train_state, train_utils

from conftest import ROOT, TEST_CONFIG, load_test_config


def _train(config, data, workdir):
  return jax.device_get(train.train_and_evaluate(config, workdir=workdir, data_dir=data,
                                                 log=lambda _: None, evaluate_after=False))


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_same_seed_same_bits_other_seed_differs(synth_data, tmp_path):
  config = load_test_config("--config.train.steps=5")  # checkpoint_every=2, keep_checkpoints=2
  first = _train(config, synth_data, tmp_path / "a")
  second = _train(config, synth_data, tmp_path / "b")
  assert int(first.step) == 5
  # Saved every 2 steps and at the end (2, 4, 5); only the newest 2 are kept.
  assert sorted(int(p.name) for p in (tmp_path / "a" / "checkpoints").iterdir()
                if p.name.isdigit()) == [4, 5]
  assert _leaves_equal(first.nets, second.nets)  # bit-identical, not merely close
  assert (tmp_path / "a" / "metrics.jsonl").read_text() == \
      (tmp_path / "b" / "metrics.jsonl").read_text()
  other = _train(load_test_config("--config.train.steps=5", "--config.seed=1"), synth_data,
                 tmp_path / "c")
  assert not _leaves_equal(first.nets["segmentor"].params, other.nets["segmentor"].params)


def _cli_train(data, workdir, steps, variant=""):
  """A separate process, as a preempted-and-restarted job would be."""
  spec = f"{TEST_CONFIG}:{variant}" if variant else TEST_CONFIG
  command = [sys.executable, "-m", "uagan_jax", "train", "--config", spec, "--data",
             str(data), "--workdir", str(workdir), "--no-eval", f"--config.train.steps={steps}",
             "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=5"]
  result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ),
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _final_state(workdir: pathlib.Path, step: int, variant=""):
  config = load_test_config(variant=variant)
  checkpoints = checkpoint.Checkpointer(workdir / "checkpoints", every=1, keep=100)
  assert step in checkpoints.all_steps()
  state = checkpoints.restore(step, train_state.init_state(config, parallel.make_mesh(1)))
  checkpoints.close()
  return jax.device_get(state)


@pytest.mark.parametrize("variant", ["", "uagan"], ids=["segan", "uagan"])
def test_resumed_run_equals_uninterrupted_run(synth_data, tmp_path, variant):
  n = 2
  _cli_train(synth_data, tmp_path / "straight", 2 * n, variant)
  _cli_train(synth_data, tmp_path / "resumed", n, variant)
  # A new process picks up at step n.
  log = _cli_train(synth_data, tmp_path / "resumed", 2 * n, variant)
  assert f"resumed from {tmp_path / 'resumed' / 'checkpoints' / str(n)}" in log
  assert f"steps {n}..{2 * n}" in log
  straight = _final_state(tmp_path / "straight", 2 * n, variant)
  resumed = _final_state(tmp_path / "resumed", 2 * n, variant)
  assert _leaves_equal(straight, resumed)  # params, batch stats, optimizer states, step, key
  rows = lambda w: (w / "metrics.jsonl").read_text().splitlines()
  assert rows(tmp_path / "straight") == rows(tmp_path / "resumed")
  assert [json.loads(r)["step"] for r in rows(tmp_path / "resumed")] == list(range(1, 2 * n + 1))


def test_metrics_log_drops_rows_past_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6))
                  + '{"step": 6, "lo')  # a line cut short by the crash
  log = train_utils.MetricsLog(path, resume_step=3)
  assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [1, 2, 3]
  log.write({"step": 4, "loss": 0.5})
  assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(synth_data, tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "w"
  command = [sys.executable, "-m", "uagan_jax", "train", "--config", TEST_CONFIG, "--data",
             str(synth_data), "--workdir", str(workdir), "--no-eval",
             "--config.train.steps=100000", "--config.train.checkpoint_every=1000"]
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT, env=dict(os.environ))
  try:
    for line in process.stdout:
      if "step 3/" in line:  # compiled and running
        process.send_signal(signal.SIGTERM)
        break
    out, err = process.communicate(timeout=300)
  finally:
    process.kill()
  assert process.returncode == 0, err[-2000:]
  assert "received SIGTERM" in err
  stopped = [line for line in out.splitlines() if "stopped at step" in line]
  assert stopped, out[-2000:]
  step = int(stopped[0].split("stopped at step ")[1].split(";")[0])
  assert step >= 3
  assert (workdir / "checkpoints" / str(step)).is_dir()  # saved although 1000 was not reached
  rows = [json.loads(r)["step"] for r in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows == list(range(1, step + 1))
  log = _cli_train(synth_data, workdir, step + 2)
  assert f"steps {step}..{step + 2}" in log
