"""The training program: the compiled step and the loop around it.

Reads top to bottom: the per-device `train_step` (the family's phases: critics first, then the
generators against the updated critics, all optimizer states in one program), `make_step` (its
data-parallel compilation), and `train_and_evaluate` (data, mesh, state, checkpoints, the loop,
validation, evaluation). Which networks train and how is the model family's business
(`uagan_jax.families`); nothing here asks which family it runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from uagan_jax import checkpoint, distributed, evaluate, families, parallel, tensorboard, visualize
from uagan_jax import workdir as workdir_lib
from uagan_jax import config as config_lib
from uagan_jax.data import augment, input_pipeline
from uagan_jax.errors import UserError
from uagan_jax.train_state import (AUGMENT_STREAM, Networks, StepInputs, TrainState,
                                   build_networks, init_state, stream)
from uagan_jax.train_utils import (Interrupted, MetricsLog, StopRequested, TrainingDiverged,
                                   format_duration, non_finite)
from uagan_jax.validation import TranslationPanel, Validation

# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------


def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *,
               networks: Networks, config: ml_collections.ConfigDict,
               with_gradients: bool = False) -> tuple[TrainState, dict[str, jax.Array]]:
  """One min-max update of all networks, as the program each device runs on its shard.

  The family's phases (`families.<name>.train_phases`): critics first (SegAN's C and StarGAN's D
  ascend their objectives), then generators (S and G descend theirs against the *updated*
  critics), all optimizer states in one compiled program.

  Args:
    state: the replicated train state.
    batch: this device's shard: image [b,H,W,1], regions [b,H,W,3], modality [b].
    key: this step's key (``fold_in(base_key, step)``), the same on every device.
    networks: modules (with ``bn_axis_name="data"``) and optimizers.
    config: the run's config.
    with_gradients: also return the device-averaged gradients under ``metrics["gradients"]``
      (for tests of the data-parallel arithmetic).

  Returns:
    The new state and a dict of scalar metrics averaged over devices.
  """
  image, regions, modality = batch["image"], batch["regions"], batch["modality"]
  local_batch = image.shape[0]
  # One key per example, from its global index: the same randomness on 1 device or 8.
  example_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(parallel.example_index(local_batch))
  if config.data.augment:
    image, regions = augment_training_batch(image, regions, example_keys, config=config)
  inputs = StepInputs(image=image, regions=regions, modality=modality, example_keys=example_keys,
                      unaugmented_image=batch["image"])
  family = families.implementation(config.model.name)
  new_nets, metrics, gradients = family.train_phases(state, inputs, networks=networks,
                                                     config=config)
  metrics = parallel.mean_over_devices(metrics)
  if with_gradients:
    metrics["gradients"] = gradients
  return state.replace(step=state.step + 1, nets=new_nets), metrics


def augment_training_batch(image: jax.Array, regions: jax.Array, example_keys: jax.Array, *,
                           config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """The step's augmentation of a batch (``data.augment``; each example by its own key), then,
  with ``data.clip_augmented``, the image clipped back into the range preprocessing gives."""
  image, regions = augment.augment_batch(
      image, regions, stream(example_keys, AUGMENT_STREAM),
      intensity_scale=config.data.intensity_scale, intensity_shift=config.data.intensity_shift,
      augmentations=config.data.augmentations.to_dict())
  if config.data.clip_augmented:
    image = jnp.clip(image, -config.data.clip, config.data.clip)
  return image, regions


def make_step(config: ml_collections.ConfigDict, mesh, *, donate: bool = True,
              with_gradients: bool = False) -> Callable:
  """The compiled data-parallel step for ``config`` on ``mesh``."""
  networks = build_networks(config)
  step_fn = functools.partial(train_step, networks=networks, config=config,
                              with_gradients=with_gradients)
  return parallel.compile_step(step_fn, mesh=mesh, mode=config.train.parallel_mode, donate=donate)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, *, workdir: pathlib.Path,
                       data_dir: pathlib.Path, cache_dir: pathlib.Path | None = None,
                       log: Callable[[str], None] = print,
                       evaluate_after: bool = True, recipe: str | None = None,
                       overrides=()) -> TrainState:
  """Trains ``config`` on the data in ``data_dir``, checkpointing and logging into ``workdir``.

  The data folder is prepared into ``cache_dir`` first (default: `cache.default_location`;
  cases already prepared and unchanged are reused), and training reads its slices from there.
  Resumes from the newest checkpoint in ``workdir`` if there is one. Writes ``config.json`` (the
  resolved config), ``splits.json`` (cases per split, the protocol, the modalities of each
  training case and those that got training slices), ``metrics.jsonl``, ``checkpoints/``, with
  ``train.validate_every`` also ``validation.jsonl`` and ``checkpoints_best/``, and at the end
  ``figures/training_curves.png``, and with ``train.tensorboard`` ``tensorboard/`` (the same
  values and panels as TensorBoard events, `uagan_jax.tensorboard`); then evaluates the held-out
  split (see `uagan_jax.evaluate`), or says in one line that it has no cases (a one-case data set trains all the same).

  ``recipe`` and ``overrides`` (the ``--config`` spec and its ``--config.KEY=VALUE``s) are
  recorded in ``run.json`` when the run starts, so that a workdir names the run it holds: a run
  of another model family is refused before any data is read.

  Holds ``<workdir>/.lock`` throughout (`workdir.WorkdirLock`): a second run on the same workdir
  is refused while this one lives.

  Returns:
    The final train state.

  Raises:
    Interrupted: SIGTERM or SIGINT stopped the run (after saving a checkpoint).
    TrainingDiverged: a logged loss or the state due to be saved is not finite (nothing
      non-finite is saved).
  """
  workdir_lib.refuse_url(workdir)
  workdir = pathlib.Path(workdir)
  if not distributed.is_main():
    # The processes of one run share its workdir: process 0 holds the lock for all of them.
    return _train_locked(config, workdir=workdir, data_dir=data_dir, cache_dir=cache_dir,
                         log=log, evaluate_after=evaluate_after, recipe=recipe,
                         overrides=overrides)
  with workdir_lib.WorkdirLock(workdir, log=log):
    return _train_locked(config, workdir=workdir, data_dir=data_dir, cache_dir=cache_dir,
                         log=log, evaluate_after=evaluate_after, recipe=recipe,
                         overrides=overrides)


def _train_locked(config: ml_collections.ConfigDict, *, workdir: pathlib.Path,
                  data_dir: pathlib.Path, cache_dir: pathlib.Path | None,
                  log: Callable[[str], None], evaluate_after: bool, recipe: str | None,
                  overrides) -> TrainState:
  """`train_and_evaluate` with the workdir's lock held."""
  family = families.get(config.model.name)
  workdir_lib.check_same_family(workdir, family=family.name, recipe=recipe)
  # Several processes (`uagan_jax.distributed`): every one runs this function in step; process 0
  # alone logs and writes files, all join the checkpoints.
  main = distributed.is_main()
  if not main:
    log = lambda _: None  # process 0 speaks for the run
  distributed.check_same_config(config_lib.to_json(config))
  parallel.check_mode(config.train.parallel_mode)

  # Data ------------------------------------------------------------------------------------------
  data = input_pipeline.find_training_data(config, data_dir)
  splits = data.splits
  contributes = {"unpaired": "each training case contributes one modality (data.protocol "
                             "unpaired)",
                 "all": "each training case contributes every modality (data.protocol all)"}
  log(f"data: {len(data.cases)} {data.layout} cases in {data_dir}: {len(splits['train'])} train, "
      f"{len(splits['val'])} val, {len(splits['test'])} test; {contributes[data.protocol]}")
  validates = config.train.validate_every > 0 and family.segments
  # TensorBoard's translation panels of the first val case, at the validation steps.
  draws_translations = (config.train.tensorboard and config.train.validate_every > 0
                        and family.translates and bool(splits["val"]))
  if config.train.validate_every and not validates:
    log(f"validation: {family.name} does not segment; train.validate_every "
        + ("schedules the TensorBoard translation panels only" if draws_translations
           else "is ignored"))
  if validates and not splits["val"]:
    # A recipe's default (the :demo recipes validate) must not stop a run on a small data set.
    log(f"validation: the val split is empty (data.val_fraction={config.data.val_fraction}, "
        f"{len(data.cases)} cases); train.validate_every={config.train.validate_every} is ignored")
    validates = False

  # Mesh, state, checkpoints ----------------------------------------------------------------------
  mesh = parallel.make_mesh(config.train.num_devices)
  devices = mesh.devices.size
  if config.train.batch_size % devices:
    raise UserError(f"config train.batch_size={config.train.batch_size}: not divisible by the "
                    f"{devices} devices in use (set train.num_devices or the batch size)")
  place = (functools.partial(parallel.shard_batch, mesh=mesh)
           if config.train.parallel_mode == "shard_map" else lambda batch: batch)
  # Process 0 prepares the data cache first; the others then reuse it (or, on a node of their
  # own, prepare their own): two processes never write the same case folder at once.
  if not main:
    distributed.wait_for_all("cache_prepared")
  train_input = input_pipeline.TrainInput(config, data, cache_dir=cache_dir, place=place, log=log,
                                          rows=parallel.process_rows(mesh, config.train.batch_size))
  if main:
    distributed.wait_for_all("cache_prepared")
  untrained = _untrained_modalities_warning(config, data, train_input.modality_counts)
  if untrained:
    log(untrained)
  state = init_state(config, mesh)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints = checkpoint.Checkpointer(workdir / "checkpoints", every=config.train.checkpoint_every,
                                        keep=config.train.keep_checkpoints)
  # Unreadable checkpoints newer than the newest readable one are moved aside, so that the
  # replayed steps can be saved again.
  try:
    restored = checkpoints.restore_newest(state, log=log, set_aside=True)
  except UserError as e:
    held = workdir_lib.held_run(workdir)
    raise UserError(f"{e} ({workdir} holds {held})" if held else str(e)) from None
  if restored is not None:
    state, latest = restored
    log(f"resumed from {checkpoints.directory / str(latest)}")
  # Written only now: a run that cannot resume (say, a changed config) must not overwrite the
  # record of the run whose checkpoints are in this workdir.
  if main:
    workdir_lib.atomic_write_text(workdir / "config.json", config_lib.to_json(config))
    workdir_lib.write_run_record(workdir, recipe=recipe, overrides=overrides)
    workdir_lib.atomic_write_text(workdir / "splits.json", json.dumps(
        _splits_record(data, data_dir, train_input), indent=2))
  start = int(jax.device_get(state.step))
  metrics_log = MetricsLog(workdir / "metrics.jsonl", resume_step=start) if main else None
  # Process 0's TensorBoard log; closed by the loop's `with` on every way out of it.
  events = (tensorboard.EventLog(workdir / tensorboard.DIRECTORY, resume_step=start)
            if main and config.train.tensorboard else None)
  validation = None
  if validates:
    val_ids = splits["val"][:config.eval.val_max_cases or None]
    validation = Validation(config, workdir=workdir, cases=data.cases_of(val_ids),
                            resume_step=start, log=log, events=events)
  translation_panel = None
  if draws_translations and events is not None:
    translation_panel = TranslationPanel(config, data.cases_of(splits["val"][:1])[0])
  base_key = jax.random.wrap_key_data(jax.device_get(state.rng))
  step_fn = make_step(config, mesh)

  # Loop ------------------------------------------------------------------------------------------
  total = config.train.steps
  log(f"training {config.model.name} on {devices} {mesh.devices.flat[0].platform} device(s)"
      + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "") + ", "
      f"parallel mode {config.train.parallel_mode}, global batch {config.train.batch_size}: "
      f"steps {start}..{total}")
  window_start, window_steps = None, 0
  # With several processes a stop request is agreed on at log steps only (see StopRequested).
  with StopRequested(distributed.any_process if jax.process_count() > 1 else None) as stop, \
      (events or contextlib.nullcontext()):
    for step, batch in train_input.batches(start):
      state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
      done = step + 1
      window_steps += 1
      logs = done % config.train.log_every == 0 or done == total
      if logs:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        if window_start is None:  # the first window includes compilation: no rate yet
          rate_text = "compiling"
        else:
          rate = (window_steps) / max(now - window_start, 1e-9)
          rate_text = (f"{rate:.2f} steps/s, {rate * config.train.batch_size:.1f} img/s, "
                       f"ETA {format_duration((total - done) / rate)}")
        window_start, window_steps = now, 0
        bad = non_finite(values)
        if bad:
          checkpoints.close()
          if validation is not None:
            validation.close()
          raise TrainingDiverged(
              f"step {done}: non-finite {', '.join(bad)}; last checkpoint: "
              f"{checkpoints.latest_step()} in {checkpoints.directory}")
        if metrics_log is not None:
          metrics_log.write({"step": done, **values})
        if events is not None:
          events.scalars(done, values)
          events.flush()
        losses_text = "  ".join(f"{k} {v:.4f}" for k, v in values.items() if "norm" not in k)
        log(f"step {done}/{total}  {losses_text}  [{rate_text}]")
      try:  # the state is checked finite on every step that saves, whatever log_every is
        checkpoints.save(done, state, force=done == total)
      except checkpoint.NonFiniteState as e:
        checkpoints.close()
        if validation is not None:
          validation.close()
        raise TrainingDiverged(f"{e} in the state due to be checkpointed (not saved); last "
                               f"checkpoint: {checkpoints.latest_step()} in "
                               f"{checkpoints.directory}") from None
      if validation is not None and validation.due(done):
        seconds = validation(done, state)
        if window_start is not None:  # steps/s and the ETA count training steps only
          window_start += seconds
      if translation_panel is not None and (done % config.train.validate_every == 0
                                            or done == total):
        started = time.time()
        events.image(done, "panels/translation",
                     translation_panel(distributed.local_copy(state), f"step {done}"))
        events.flush()
        if window_start is not None:
          window_start += time.time() - started
      if stop.should_stop(sync_point=logs):
        if checkpoints.latest_step() != done:
          checkpoints.save(done, state, force=True)
        checkpoints.close()
        if validation is not None:
          validation.close()
        log(f"stopped at step {done}; checkpoint saved, run the same command to resume")
        # A process stopped because another one got the signal exits as if it got SIGTERM: the
        # scheduler stopped the run, and requeues it on 143.
        signum = stop.signum or signal.SIGTERM
        raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at step {done}; "
                          "checkpoint saved")
  if total <= start:
    log(f"nothing to train: the checkpoint is at step {start} and train.steps is {total}")
  checkpoints.close()
  if not main:  # process 0 alone writes the summaries, the curves and the evaluation
    if validation is not None:
      validation.close()
    distributed.wait_for_all("evaluated")
    return state
  log(f"checkpoints in {checkpoints.directory}, metrics in {workdir / 'metrics.jsonl'}")
  if validation is not None:
    validation.close()
    if validation.best_step is not None:
      log(f"best checkpoint (val Dice {validation.best:.3f}, step {validation.best_step}) in "
          f"{validation.checkpoints.directory}, validation rows in {validation.rows.path}")
  curves = visualize.training_curves(workdir / "metrics.jsonl", workdir / "validation.jsonl",
                                     workdir / "figures" / "training_curves.png")
  if curves is not None:
    log(f"training curves in {curves}")

  if evaluate_after and not splits[config.eval.split]:
    # Training succeeded; an empty held-out split is the data's size, not a failure of the run.
    log(f"evaluation skipped: the {config.eval.split} split has no cases ({len(data.cases)} "
        f"cases, data.test_fraction={config.data.test_fraction}, data.val_fraction="
        f"{config.data.val_fraction}); score other cases with uagan-jax evaluate --workdir "
        f"{workdir} --data DIR")
  elif evaluate_after:
    evaluate.evaluate_split(config, workdir=workdir, data_dir=data_dir,
                            state=distributed.local_copy(state), curves=False, log=log,
                            # The data preparation above named each input file's problems.
                            input_notes=False)
  distributed.wait_for_all("evaluated")
  return state


def _splits_record(data: input_pipeline.TrainingData, data_dir: pathlib.Path,
                   train_input: input_pipeline.TrainInput) -> dict:
  """What ``splits.json`` holds: the data folder, the cases of each split, the protocol, what
  each training case contributes (``train_modality`` under unpaired, the key older workdirs
  have; ``train_modalities`` under all) and the modalities that got training slices
  (``trained_modalities``: what predict and translate accept); with ``data.folds`` K > 0 also
  ``folds`` (K) and ``fold`` (which one), by which ``evaluate --cross-validation`` tells the
  folds of one split apart (a plain split's record has neither, as before the keys existed)."""
  record = {"data": str(pathlib.Path(data_dir).absolute()), "layout": data.layout, **data.splits,
            "protocol": data.protocol}
  if data.folds:
    record.update(folds=data.folds, fold=data.fold)
  if data.protocol == "unpaired":
    record["train_modality"] = data.assignment
  else:
    record["train_modalities"] = {case_id: list(names)
                                  for case_id, names in data.train_modalities.items()}
  record["trained_modalities"] = list(train_input.trained_modalities)
  return record


def _untrained_modalities_warning(config: ml_collections.ConfigDict,
                                  data: input_pipeline.TrainingData,
                                  counts: dict[str, int]) -> str | None:
  """One line naming the modalities of ``data.modalities`` that got no training slice, and why;
  None when every one trains."""
  missing = [m for m, n in counts.items() if n == 0]
  if not missing:
    return None
  contributors = {m: sum(m in names for names in data.train_modalities.values()) for m in missing}
  no_case = [m for m in missing if not contributors[m]]
  no_slice = [m for m in missing if contributors[m]]
  train_cases = len(data.train_modalities)
  reasons = []
  if no_case and data.protocol == "unpaired":
    reasons.append(f"no training case contributes {', '.join(no_case)}: data.protocol unpaired "
                   f"gives each of the {train_cases} training case(s) one modality, and "
                   "data.protocol=all trains every modality of every case")
  elif no_case:
    reasons.append(f"no training case has an image of {', '.join(no_case)}")
  if no_slice:
    reasons.append(f"the training cases of {', '.join(no_slice)} have no slice with brain and "
                   f"tumour in view, and data.tumour_free_fraction="
                   f"{config.data.tumour_free_fraction} kept none")
  return (f"warning: no training slices of {', '.join(missing)} ({'; '.join(reasons)}); the model "
          "is untrained on them, and predict and translate refuse them")
