"""`uagan_jax/train.py`: the compiled step (traced once, data-parallel arithmetic, both
parallel modes, each family's phases) and the training loop (bit-for-bit reproducibility from a
seed, resume-after-interruption equality, SIGTERM)."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from uagan_jax import checkpoint, parallel, train, train_state

from conftest import ROOT, TEST_CONFIG, load_test_config, random_train_batch, run_cli


# --- The step ----------------------------------------------------------------------------------


GLOBAL_BATCH = 8


def _batch(seed=0, size=32):
  return random_train_batch(GLOBAL_BATCH, size, seed)


def _run(config, devices, steps):
  """``steps`` steps on the same global batch; returns (host state, metrics of every step)."""
  mesh = parallel.make_mesh(devices)
  state = train_state.init_state(config, mesh)
  step = train.make_step(config, mesh, with_gradients=True)
  batch = _batch()
  if config.train.parallel_mode == "shard_map":
    batch = parallel.shard_batch(batch, mesh)
  history = []
  for t in range(steps):
    state, metrics = step(state, batch, jax.random.fold_in(state.base_key, t))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


@functools.lru_cache(maxsize=None)
def _cached_run(overrides: tuple[str, ...], devices: int):
  """Three steps of the test config with ``overrides``; shared by the tests (compiles are slow).

  An override ``variant=NAME`` selects ``configs/test.py:NAME``.
  """
  variant = [o.split("=", 1)[1] for o in overrides if o.startswith("variant=")]
  overrides = [o for o in overrides if not o.startswith("variant=")]
  return _run(load_test_config(*overrides, variant=variant[0] if variant else ""), devices, steps=3)


def test_step_is_traced_once(monkeypatch):
  traces = []
  original = train.train_step

  # Named as the step it wraps, and on 4 devices: the program is then the one
  # test_four_devices_match_one_device[shard_map] runs, compiled once for both (the test run's
  # compilation cache); tracing, which this counts, happens in each all the same.
  @functools.wraps(original)
  def counting_step(*args, **kwargs):
    traces.append(1)  # runs only while JAX traces the Python function
    return original(*args, **kwargs)

  monkeypatch.setattr(train, "train_step", counting_step)
  state, _ = _run(load_test_config(), devices=4, steps=4)
  assert int(state.step) == 4
  assert len(traces) == 1


def _relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)


# Every scanner-shift transform on every example (data/augment.py): the 1-vs-4-device check
# then also covers the per-example keys of each transform.
AUGMENTATIONS_ON = tuple(f"--config.data.augmentations.{name}_p=1.0" for name in (
    "rotation", "scale", "elastic", "bias", "noise", "blur", "brightness", "contrast",
    "low_resolution", "gamma"))


@pytest.mark.parametrize("overrides", [
    (),
    ("--config.train.parallel_mode=pmap",),
    ("--config.loss.critic_constraint=gradient_penalty", "--config.model.critic_norm=none"),
    ("variant=uagan",),
    # pmap is checked on segan and uagan on shard_map in CI; the pair of them (about a minute of
    # compiling on 2 cores) is a slow test.
    pytest.param(("variant=uagan", "--config.train.parallel_mode=pmap"), marks=pytest.mark.slow),
    AUGMENTATIONS_ON,
], ids=["shard_map", "pmap", "gradient_penalty", "uagan", "uagan_pmap", "augmentations"])
def test_four_devices_match_one_device(overrides):
  """Same global batch on 1 and 4 devices: same losses and gradients, same parameters.

  Tolerances. Losses and gradients differ only by the order of floating-point sums across
  shards: 1e-5 relative is ~100x float32 rounding and far below any real error (a device-count
  scaling of the gradient is a factor of 4; unsynchronised BatchNorm changes losses at the
  1e-2 level). Parameters are compared after 3 Adam steps: Adam is invariant to gradient scale, so
  parameters alone could not catch a mis-scaled gradient (the gradient check does), but any
  difference in the update direction moves a parameter by a sizeable fraction of a step (~lr =
  2e-4). Rounding moves them by ~1e-8; 1% of one step (2e-6) separates the two.
  """
  one_state, one = _cached_run(overrides, 1)
  four_state, four = _cached_run(overrides, 4)
  translation = any(o == "variant=uagan" for o in overrides)
  for name in one[0]:
    if name == "gradients":
      continue
    # The generator's Adam update norm sums the rounding-noise steps described at the end (the
    # gradients themselves are checked at 1e-5 below).
    tolerance = 1e-3 if translation and name == "gen/update_norm" else 1e-5
    assert _relative_error(one[0][name], four[0][name]) < tolerance, name
  assert set(one[0]["gradients"]) >= {"critic"}
  for net in one[0]["gradients"]:
    # Each network's whole gradient (all parameters as one vector) to 1e-5 relative; each
    # parameter array to 1e-4 (a small bias array collects more rounding relative to its size).
    flat_one = np.concatenate([np.ravel(g) for g in jax.tree.leaves(one[0]["gradients"][net])])
    flat_four = np.concatenate([np.ravel(g) for g in jax.tree.leaves(four[0]["gradients"][net])])
    assert _relative_error(flat_one, flat_four) < 1e-5, net
    # The check can fail: the summed-then-averaged bug would give 4x these gradients.
    assert _relative_error(flat_one, 4 * flat_four) > 1.0
    grads_one = jax.tree_util.tree_leaves_with_path(one[0]["gradients"][net])
    grads_four = jax.tree.leaves(four[0]["gradients"][net])
    for (path, g1), g4 in zip(grads_one, grads_four):
      assert _relative_error(g1, g4) < 1e-4, (net, jax.tree_util.keystr(path))
  lr = max(load_test_config().optim.segmentor_lr, load_test_config().optim.generator_lr)
  assert int(one_state.step) == int(four_state.step) == 3
  if not translation:
    for a, b in zip(jax.tree.leaves(one_state.nets), jax.tree.leaves(four_state.nets)):
      if a.dtype.kind == "f":
        assert np.all(np.abs(a - b) <= 0.01 * lr + 1e-5 * np.abs(a).max())
    return
  # In the translation stream the target one-hot planes are constant over space, so the
  # InstanceNorm after the first conv cancels their contribution except near the borders: some
  # gradients are truly zero up to rounding, and Adam turns that rounding noise into full +-lr
  # steps, whatever the device count. Those parameters may differ by up to steps x lr; everything
  # else must agree to 1% of a step. The later gradients see those few moved parameters, so
  # Adam's moments agree only to ~1e-3 relative (a device-count bug moves them by O(1)).
  for role in one_state.nets:
    one_net, four_net = one_state.nets[role], four_state.nets[role]
    for a, b in zip(jax.tree.leaves((one_net.params, one_net.batch_stats)),
                    jax.tree.leaves((four_net.params, four_net.batch_stats))):
      close = np.abs(a - b) <= 0.01 * lr + 1e-5 * np.abs(a).max()
      assert close.mean() >= 0.95, role
      assert np.all(np.abs(a - b) <= 3 * lr * 1.01), role
    moments_one = [np.ravel(x) for x in jax.tree.leaves(one_net.opt_state) if x.dtype.kind == "f"]
    moments_four = [np.ravel(x) for x in jax.tree.leaves(four_net.opt_state) if x.dtype.kind == "f"]
    assert _relative_error(np.concatenate(moments_one), np.concatenate(moments_four)) < 1e-2, role


def test_augmentations_reach_the_step():
  """The step trains on the augmented batch: other losses than without the transforms."""
  _, plain = _cached_run((), 1)
  _, augmented = _cached_run(AUGMENTATIONS_ON, 1)
  assert plain[0]["seg/dice"] != augmented[0]["seg/dice"]


def test_both_modes_give_the_same_numbers():
  _, shard = _cached_run((), 4)
  _, pmap = _cached_run(("--config.train.parallel_mode=pmap",), 4)
  for step in range(3):
    for name in shard[step]:
      if name != "gradients":
        assert _relative_error(shard[step][name], pmap[step][name]) < 1e-5, (step, name)


def test_unet_trains_the_segmentor_only():
  config = load_test_config("--config.model.name=unet", "--config.loss.bce_weight=1.0")
  state, history = _run(config, devices=2, steps=2)
  metrics = history[-1]
  assert set(state.nets) == {"segmentor"}
  assert "seg/adversarial" not in metrics and "critic/l1" not in metrics
  assert np.isfinite(metrics["seg/total"])


def test_uagan_step_updates_all_four_networks_and_ramps_the_shape_loss():
  state, history = _cached_run(("variant=uagan",), 1)
  assert set(state.nets) == {"unified", "critic", "discriminator"}
  for name in ("disc/wgan", "disc/gradient_penalty", "disc/cls", "critic/l1", "gen/wgan",
               "gen/cls", "gen/cycle", "seg/dice", "seg/shape"):
    assert np.isfinite(history[-1][name]), name
  # configs/test.py:uagan ramps the shape weight over 2 steps: 0, 0.5, 1.
  assert [float(h["seg/shape_weight"]) for h in history] == [0.0, 0.5, 1.0]
  initial = jax.device_get(train_state.init_state(load_test_config(variant="uagan"), parallel.make_mesh(1)))
  for role in state.nets:
    before = jax.tree.leaves(initial.nets[role].params)
    after = jax.tree.leaves(state.nets[role].params)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), role


def test_stargan_n_critic_updates_the_generator_every_nth_step():
  config = load_test_config("--config.train.n_critic=2", variant="stargan")
  mesh = parallel.make_mesh(1)
  state = train_state.init_state(config, mesh)
  step = train.make_step(config, mesh, donate=False)
  batch = parallel.shard_batch(_batch(), mesh)
  params = [jax.device_get(state.nets)]
  for t in range(4):
    state, _ = step(state, batch, jax.random.fold_in(state.base_key, t))
    params.append(jax.device_get(state.nets))
  changed = lambda role, t: any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(params[t][role].params), jax.tree.leaves(params[t + 1][role].params)))
  assert [changed("generator", t) for t in range(4)] == [False, True, False, True]
  assert all(changed("discriminator", t) for t in range(4))


def _metric_names(config) -> set[str]:
  """The names of the metrics one step of ``config`` (1 device) returns, by tracing it."""
  mesh = parallel.make_mesh(1)
  step = train.make_step(config, mesh, donate=False)
  _, metrics = jax.eval_shape(step, train_state.abstract_state(config),
                              parallel.shard_batch(_batch(), mesh), jax.random.key(0))
  return set(metrics)


@pytest.mark.parametrize("variant", ["stargan", "uagan"])
def test_identity_loss_is_g_of_the_image_for_its_own_modality(variant):
  """gen/identity = mean |x - G(x, source)| with the step's parameters; absent at weight 0."""
  config = load_test_config("--config.loss.identity_weight=2.0", "--config.data.augment=false",
                            variant=variant)
  mesh = parallel.make_mesh(1)
  state = train_state.init_state(config, mesh)
  initial = jax.device_get(state)
  batch = _batch()
  step = train.make_step(config, mesh, donate=False)
  _, metrics = step(state, parallel.shard_batch(batch, mesh), jax.random.fold_in(state.base_key, 0))
  networks = train_state.build_networks(config, bn_axis_name=None)
  real = batch["image"] / config.data.clip
  # The reference G(x, source) as one jitted program (op by op, every primitive is compiled on
  # its own: dozens of compiles).
  if variant == "stargan":
    same = jax.jit(lambda params, x, modality: networks["generator"].apply(
        {"params": params}, x, modality))(initial.nets["generator"].params, real,
                                          batch["modality"])
  else:
    net = initial.nets["unified"]
    (same, _), _ = jax.jit(lambda params, batch_stats, image, modality, x: networks["unified"].apply(
        {"params": params, "batch_stats": batch_stats}, image, modality, modality, train=True,
        translation_input=x, mutable=["batch_stats"]))(
            net.params, net.batch_stats, batch["image"], batch["modality"], real)
  expected = float(np.mean(np.abs(real - np.asarray(same))))
  assert expected > 1e-3  # the initial G does not copy exactly, so the value is informative
  assert float(metrics["gen/identity"]) == pytest.approx(expected, rel=1e-5)
  # At weight 0 (the variant's default) the step has no gen/identity: the names of its metrics,
  # from tracing the step (jax.eval_shape), which fixes them, without compiling it.
  without = _metric_names(load_test_config("--config.data.augment=false", variant=variant))
  assert "gen/identity" not in without and "gen/cycle" in without


def test_per_modality_discriminator_judges_real_by_source_and_translation_by_target():
  """disc/wgan = -mean D_source(x) + mean D_target(G(x, target)), by hand.

  With data.modalities = (t1, t2) and every example a T1, every target is T2: scoring the
  translation with its source's map (or one map for all) would give another number.
  """
  config = load_test_config("--config.model.discriminator_per_modality=true",
                            "--config.data.augment=false", "--config.data.modalities=('t1','t2')",
                            variant="stargan")
  mesh = parallel.make_mesh(1)
  state = train_state.init_state(config, mesh)
  initial = jax.device_get(state)
  batch = dict(_batch(), modality=np.zeros(GLOBAL_BATCH, np.int32))
  step = train.make_step(config, mesh, donate=False)
  _, metrics = step(state, parallel.shard_batch(batch, mesh), jax.random.fold_in(state.base_key, 0))
  networks = train_state.build_networks(config, bn_axis_name=None)
  real = batch["image"] / config.data.clip
  t1, t2 = np.zeros(GLOBAL_BATCH, np.int32), np.full(GLOBAL_BATCH, 2, np.int32)
  # The references as jitted programs (op by op, every primitive compiles on its own).
  fake = jax.jit(lambda params, x, modality: networks["generator"].apply(
      {"params": params}, x, modality))(initial.nets["generator"].params, real, t2)
  judge = jax.jit(lambda params, x, modality: networks["discriminator"].apply(
      {"params": params}, x, modality)[0])
  disc = lambda x, modality: np.asarray(judge(initial.nets["discriminator"].params, x, modality))
  expected = -disc(real, t1).mean() + disc(fake, t2).mean()
  assert float(metrics["disc/wgan"]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
  # The check can fail: the translation judged as its source gives another number.
  assert abs(expected - (-disc(real, t1).mean() + disc(fake, t1).mean())) > 1e-3


# --- The loop: reproducibility and resume ------------------------------------------------------


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


def _cli_train(data, workdir, steps, variant="", *, capsys=None):
  """``uagan-jax train``: a separate process, as a preempted-and-restarted job would be; given
  ``capsys``, the same command line in this process (for the runs that are not the restarted
  one: a process start less each)."""
  spec = f"{TEST_CONFIG}:{variant}" if variant else TEST_CONFIG
  argv = ["train", "--config", spec, "--data", str(data), "--workdir", str(workdir), "--no-eval",
          f"--config.train.steps={steps}", "--config.train.checkpoint_every=2",
          "--config.train.keep_checkpoints=5"]
  if capsys is not None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err[-3000:]
    return out
  result = subprocess.run([sys.executable, "-m", "uagan_jax", *argv], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ), timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _final_state(workdir: pathlib.Path, step: int, variant=""):
  config = load_test_config(variant=variant)
  checkpoints = checkpoint.Checkpointer(workdir / "checkpoints", every=1, keep=100)
  assert step in checkpoints.all_steps()
  state = checkpoints.restore(step, train_state.abstract_state(config))  # shapes only: no compile
  checkpoints.close()
  return jax.device_get(state)


@pytest.mark.parametrize("variant", ["", "uagan"], ids=["segan", "uagan"])
def test_resumed_run_equals_uninterrupted_run(capsys, synth_data, tmp_path, variant):
  n = 2
  # The uninterrupted run and the first half of the other: the same command in this process.
  _cli_train(synth_data, tmp_path / "straight", 2 * n, variant, capsys=capsys)
  _cli_train(synth_data, tmp_path / "resumed", n, variant, capsys=capsys)
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


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(capsys, synth_data, tmp_path):
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
  assert process.returncode == 143, err[-2000:]  # 128 + SIGTERM: "preempted, requeue me"
  assert "received SIGTERM" in err
  stopped = [line for line in out.splitlines() if "stopped at step" in line]
  assert stopped, out[-2000:]
  step = int(stopped[0].split("stopped at step ")[1].split(";")[0])
  assert step >= 3
  assert (workdir / "checkpoints" / str(step)).is_dir()  # saved although 1000 was not reached
  rows = [json.loads(r)["step"] for r in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows == list(range(1, step + 1))
  # The stopped process is gone; the run resumes from what it saved (in this process).
  log = _cli_train(synth_data, workdir, step + 2, capsys=capsys)
  assert f"steps {step}..{step + 2}" in log


# --- Modalities without training slices -------------------------------------------------------


def _training_data(protocol, train_modalities):
  from uagan_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.TrainingData(
      data_dir=pathlib.Path("data"), cases=[],
      splits={"train": sorted(train_modalities), "val": [], "test": []}, protocol=protocol,
      train_modalities=train_modalities)


def test_the_untrained_modalities_warning_names_them_and_why():
  config = load_test_config()
  every = {"t1": 5, "t1ce": 3, "t2": 1, "flair": 2}
  data = _training_data("unpaired", {"a": ("t2",), "b": ("t1",)})
  assert train._untrained_modalities_warning(config, data, every) is None
  # Unpaired, two cases: two modalities have no case at all.
  warning = train._untrained_modalities_warning(config, data, {**every, "t1ce": 0, "flair": 0})
  assert warning == (
      "warning: no training slices of t1ce, flair (no training case contributes t1ce, flair: "
      "data.protocol unpaired gives each of the 2 training case(s) one modality, and "
      "data.protocol=all trains every modality of every case); the model is untrained on them, "
      "and predict and translate refuse them")
  # All: a modality whose cases gave no slice (no tumour in view, none tumour-free kept).
  data = _training_data("all", {"a": ("t1", "t1ce", "t2", "flair")})
  warning = train._untrained_modalities_warning(config, data, {**every, "t2": 0})
  assert warning.startswith("warning: no training slices of t2 (the training cases of t2 have no "
                            "slice with brain and tumour in view, and data.tumour_free_fraction="
                            f"{config.data.tumour_free_fraction} kept none)")
  assert "\n" not in warning
