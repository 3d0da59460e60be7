"""The training program: state, the compiled min-max step, and the loop around it.

Reads top to bottom: networks from the config, the state pytree, the per-device `train_step`
(critic phase, then segmentor phase, in one program), state creation, and `train_and_evaluate`
(data, mesh, checkpoints, logging, evaluation).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from uagan_jax import checkpoint, evaluate, losses, parallel
from uagan_jax import config as config_lib
from uagan_jax.data import MODALITIES, augment, dataset, readers
from uagan_jax.errors import UserError
from uagan_jax.models.segan import Critic, Segmentor, mask_image

# ------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Networks:
  """The modules and optimizers of one model family; static, so it is bound, not traced."""
  segmentor: Segmentor
  critic: Critic | None
  optimizers: dict[str, optax.GradientTransformation]


def build_networks(config: ml_collections.ConfigDict, *, bn_axis_name: str | None = parallel.AXIS
                   ) -> Networks:
  """Modules and optimizers for ``config.model.name``.

  Args:
    config: the run's config.
    bn_axis_name: axis for cross-device BatchNorm statistics: ``"data"`` inside the step,
      ``None`` for initialisation and inference outside any mapped context.
  """
  dtype = jnp.dtype(config.model.dtype)
  segmentor = Segmentor(features=tuple(config.model.segmentor_features),
                        num_regions=3, num_modalities=len(MODALITIES),
                        bn_axis_name=bn_axis_name, dtype=dtype)
  optimizers = {"segmentor": _adam(config, config.optim.segmentor_lr)}
  critic = None
  if config.model.name == "segan":
    critic = Critic(features=tuple(config.model.critic_features), norm=config.model.critic_norm,
                    bn_axis_name=bn_axis_name, dtype=dtype)
    optimizers["critic"] = _adam(config, config.optim.critic_lr)
  return Networks(segmentor=segmentor, critic=critic, optimizers=optimizers)


def _adam(config, lr: float) -> optax.GradientTransformation:
  if config.optim.decay_every:
    lr = optax.exponential_decay(lr, transition_steps=config.optim.decay_every,
                                 decay_rate=config.optim.decay_rate, staircase=True)
  return optax.adam(lr, b1=config.optim.b1, b2=config.optim.b2)


# ------------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------------


@struct.dataclass
class NetState:
  params: dict
  batch_stats: dict
  opt_state: optax.OptState


@struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (what a checkpoint holds).

  ``rng`` is the raw key data of the base key (a plain uint32 array, so checkpoints need no key
  type); step ``t`` uses ``fold_in(key, t)``.
  """
  step: jax.Array
  rng: jax.Array
  nets: dict[str, NetState]

  @property
  def base_key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


def create_train_state(config: ml_collections.ConfigDict, networks: Networks) -> TrainState:
  """Initialises every network from ``config.seed`` (pure: jit it with output shardings)."""
  base_key = jax.random.key(config.seed)
  init_key = jax.random.fold_in(base_key, -1 & 0xFFFFFFFF)  # never a training step's key
  seg_key, critic_key = jax.random.split(init_key)
  height, width = config.data.image_size
  image = jnp.zeros((1, height, width, 1), jnp.float32)
  modality = jnp.zeros((1,), jnp.int32)
  seg_vars = unmapped_module(networks.segmentor).init(seg_key, image, modality, train=False)
  nets = {"segmentor": NetState(
      params=seg_vars["params"], batch_stats=seg_vars["batch_stats"],
      opt_state=networks.optimizers["segmentor"].init(seg_vars["params"]))}
  if networks.critic is not None:
    critic_vars = unmapped_module(networks.critic).init(critic_key, jnp.zeros((1, height, width, 3)))
    nets["critic"] = NetState(params=critic_vars["params"], batch_stats={},
                              opt_state=networks.optimizers["critic"].init(critic_vars["params"]))
  return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(base_key), nets=nets)


def unmapped_module(module: nn.Module) -> nn.Module:
  """The same module without a BatchNorm axis, for use outside the data-parallel step."""
  return module.clone(bn_axis_name=None)


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------

# Independent random streams derived from each example's key.
_AUGMENT_STREAM, _PENALTY_STREAM = 1, 2


def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *,
               networks: Networks, config: ml_collections.ConfigDict,
               with_gradients: bool = False) -> tuple[TrainState, dict[str, jax.Array]]:
  """One min-max update of all networks, as the program each device runs on its shard.

  SegAN's alternating game, in one compiled program: the segmentor's forward pass is taken once
  (with its VJP kept); the critic ascends the multi-scale L1 loss between the image masked by the
  prediction and by the truth; then the segmentor descends the same loss measured by the
  *updated* critic (plus Dice/BCE). Segmentor parameters do not change between the phases, so
  reusing its forward pass is exact and saves a third of the segmentor's work.

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
    image, regions = augment.augment_batch(
        image, regions, jax.vmap(lambda k: jax.random.fold_in(k, _AUGMENT_STREAM))(example_keys),
        intensity_scale=config.data.intensity_scale, intensity_shift=config.data.intensity_shift)
  seg_state = state.nets["segmentor"]
  metrics, gradients = {}, {}

  def segment(params):
    logits, new_vars = networks.segmentor.apply(
        {"params": params, "batch_stats": seg_state.batch_stats}, image, modality, train=True,
        mutable=["batch_stats"])
    return logits, new_vars["batch_stats"]

  logits, segment_vjp, seg_batch_stats = jax.vjp(segment, parallel.per_device(seg_state.params),
                                                 has_aux=True)
  probs = jax.nn.sigmoid(logits)
  new_nets = dict(state.nets)

  # Critics' phase ------------------------------------------------------------------------------
  if networks.critic is not None:
    critic_state = state.nets["critic"]
    masked_true = mask_image(image, regions)
    masked_pred = mask_image(image, jax.lax.stop_gradient(probs))
    scale_weights = tuple(config.loss.scale_weights) or None

    def critic_features(params, masked):
      # Batch statistics are those of the current batch only; nothing is kept between steps.
      features, _ = networks.critic.apply({"params": params}, masked, mutable=["batch_stats"])
      return features

    def critic_objective(params):
      l1 = losses.multiscale_l1(features_a=critic_features(params, masked_pred),
                                features_b=critic_features(params, masked_true),
                                scale_weights=scale_weights)
      objective = -l1  # the critic maximises the distance between the two masked images
      aux = {"critic/l1": l1}
      if config.loss.critic_constraint == "gradient_penalty":
        alpha = jax.vmap(jax.random.uniform)(
            jax.vmap(lambda k: jax.random.fold_in(k, _PENALTY_STREAM))(example_keys))

        def score(x):  # per-example sum of the per-scale mean features: the critic's scalar
          return sum(jnp.mean(f, axis=tuple(range(1, f.ndim))) for f in critic_features(params, x)[1:])

        penalty = losses.gradient_penalty(critic_fn=score, real=masked_true, fake=masked_pred,
                                          alpha=alpha)
        objective = objective + config.loss.gp_weight * penalty
        aux["critic/gradient_penalty"] = penalty
      return objective, aux

    critic_grads, critic_aux = jax.grad(critic_objective, has_aux=True)(
        parallel.per_device(critic_state.params))
    critic_grads = gradients["critic"] = parallel.mean_over_devices(critic_grads)
    new_nets["critic"], norms = _apply_gradients(
        critic_state, critic_grads, networks.optimizers["critic"],
        clip_limit=config.loss.clip_limit if config.loss.critic_constraint == "clip" else None)
    metrics.update(critic_aux)
    metrics.update({f"critic/{k}": v for k, v in norms.items()})
    updated_critic_params = new_nets["critic"].params

  # Generators' phase ---------------------------------------------------------------------------
  def segmentor_objective(logits):
    probs = jax.nn.sigmoid(logits)
    terms = {"seg/dice": losses.soft_dice_loss(probs=probs, targets=regions),
             "seg/bce": losses.binary_cross_entropy(logits=logits, targets=regions)}
    total = config.loss.dice_weight * terms["seg/dice"] + config.loss.bce_weight * terms["seg/bce"]
    if networks.critic is not None:
      terms["seg/adversarial"] = losses.multiscale_l1(
          features_a=critic_features(updated_critic_params, mask_image(image, probs)),
          features_b=critic_features(updated_critic_params, masked_true),
          scale_weights=scale_weights)
      total = total + config.loss.adversarial_weight * terms["seg/adversarial"]
    terms["seg/total"] = total
    return total, terms

  logit_grads, seg_terms = jax.grad(segmentor_objective, has_aux=True)(logits)
  (seg_grads,) = segment_vjp(logit_grads)
  seg_grads = gradients["segmentor"] = parallel.mean_over_devices(seg_grads)
  new_nets["segmentor"], norms = _apply_gradients(
      seg_state.replace(batch_stats=seg_batch_stats), seg_grads, networks.optimizers["segmentor"])
  metrics.update(seg_terms)
  metrics.update({f"seg/{k}": v for k, v in norms.items()})

  metrics = parallel.mean_over_devices(metrics)
  if with_gradients:
    metrics["gradients"] = gradients
  new_state = state.replace(step=state.step + 1, nets=new_nets)
  return new_state, metrics


def _apply_gradients(net: NetState, grads, optimizer: optax.GradientTransformation, *,
                     clip_limit: float | None = None) -> tuple[NetState, dict[str, jax.Array]]:
  updates, opt_state = optimizer.update(grads, net.opt_state, net.params)
  params = optax.apply_updates(net.params, updates)
  if clip_limit is not None:
    params = losses.clip_weights(params, limit=clip_limit)
  norms = {"grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
           "param_norm": optax.tree.norm(params)}
  return net.replace(params=params, opt_state=opt_state), norms


def make_step(config: ml_collections.ConfigDict, mesh, *, donate: bool = True,
              with_gradients: bool = False) -> Callable:
  """The compiled data-parallel step for ``config`` on ``mesh``."""
  networks = build_networks(config)
  step_fn = functools.partial(train_step, networks=networks, config=config,
                              with_gradients=with_gradients)
  return parallel.compile_step(step_fn, mesh=mesh, mode=config.train.parallel_mode, donate=donate)


def init_state(config: ml_collections.ConfigDict, mesh) -> TrainState:
  """The initial state, created by one jitted program directly in its replicated placement."""
  networks = build_networks(config)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(create_train_state, config, networks), out_shardings=sharding)()


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


class MetricsLog:
  """``metrics.jsonl``: one JSON object per logged step, ``{"step": t, "<loss>": value, ...}``.

  On resume, rows past the restored step (logged after the last checkpoint by the interrupted
  run) are dropped, so a resumed run's file equals the uninterrupted run's, row for row.
  """

  def __init__(self, path: pathlib.Path, *, resume_step: int):
    self.path = path
    kept = []
    if path.exists():
      for line in path.read_text().splitlines():
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          break  # a line cut short by a crash ends the usable log
        if row.get("step", math.inf) > resume_step:
          break
        kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)

  def write(self, row: dict) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")


def _prefetch(produce: Callable[[int], dict], steps: range, depth: int = 2):
  """Yields ``produce(step)`` for each step, computed ``depth`` steps ahead in a thread.

  Batches are a pure function of the step, so running ahead changes nothing but the wait.
  """
  buffer: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def worker():
    try:
      for step in steps:
        if stop.is_set():
          return
        buffer.put((step, produce(step), None))
    except BaseException as e:  # pylint: disable=broad-except
      buffer.put((None, None, e))

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    for _ in steps:
      step, item, error = buffer.get()
      if error is not None:
        raise error
      yield step, item
  finally:
    stop.set()


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class _StopRequested:
  """SIGTERM/SIGINT set a flag; the loop checkpoints and exits cleanly at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    print(f"received {signal.Signals(signum).name}: saving a checkpoint and stopping",
          file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class TrainingDiverged(Exception):
  """A logged loss became NaN or infinite."""


def train_and_evaluate(config: ml_collections.ConfigDict, *, workdir: pathlib.Path,
                       data_dir: pathlib.Path, log: Callable[[str], None] = print,
                       evaluate_after: bool = True) -> TrainState:
  """Trains ``config`` on the data in ``data_dir``, checkpointing and logging into ``workdir``.

  Resumes from the newest checkpoint in ``workdir`` if there is one. Writes ``config.json`` (the
  resolved config), ``splits.json`` (cases per split, modality per training case),
  ``metrics.jsonl`` and ``checkpoints/``; then evaluates the held-out split (see
  `uagan_jax.evaluate`).

  Returns:
    The final train state.
  """
  workdir = pathlib.Path(workdir)

  # Data ------------------------------------------------------------------------------------------
  cases = readers.find_cases(data_dir)
  splits = dataset.split_cases([c.case_id for c in cases], seed=config.seed,
                               val_fraction=config.data.val_fraction,
                               test_fraction=config.data.test_fraction)
  assignment = dataset.assign_modalities(splits["train"], seed=config.seed,
                                         modalities=config.data.modalities)
  log(f"data: {len(cases)} {cases[0].layout} cases in {data_dir}: {len(splits['train'])} train, "
      f"{len(splits['val'])} val, {len(splits['test'])} test; each training case contributes one "
      "modality (unpaired)")
  train_cases = [c for c in cases if c.case_id in assignment]
  started = time.time()

  def progress(done, total, case_id):
    if done == total or done % max(1, total // 10) == 0:
      log(f"  loaded {done}/{total} training cases ({case_id}), {time.time() - started:.0f} s")

  slices = dataset.build_slice_set(train_cases, assignment=assignment,
                                   size=tuple(config.data.image_size), clip=config.data.clip,
                                   tumour_free_fraction=config.data.tumour_free_fraction,
                                   seed=config.seed, progress=progress)
  counts = np.bincount(slices.modality, minlength=len(MODALITIES))
  log(f"training slices: {len(slices)} ("
      + ", ".join(f"{m} {n}" for m, n in zip(MODALITIES, counts) if n) + ")")

  # Mesh, state, checkpoints ----------------------------------------------------------------------
  mesh = parallel.make_mesh(config.train.num_devices)
  devices = mesh.devices.size
  if config.train.batch_size % devices:
    raise UserError(f"config train.batch_size={config.train.batch_size}: not divisible by the "
                    f"{devices} devices in use (set train.num_devices or the batch size)")
  state = init_state(config, mesh)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints = checkpoint.Checkpointer(workdir / "checkpoints", every=config.train.checkpoint_every,
                                        keep=config.train.keep_checkpoints)
  latest = checkpoints.latest_step()
  if latest is not None:
    state = checkpoints.restore(latest, state)
    log(f"resumed from {checkpoints.directory / str(latest)}")
  # Written only now: a run that cannot resume (say, a changed config) must not overwrite the
  # record of the run whose checkpoints are in this workdir.
  (workdir / "config.json").write_text(config_lib.to_json(config))
  (workdir / "splits.json").write_text(json.dumps(
      {"data": str(pathlib.Path(data_dir).absolute()), "layout": cases[0].layout, **splits,
       "train_modality": assignment}, indent=2))
  start = int(jax.device_get(state.step))
  metrics_log = MetricsLog(workdir / "metrics.jsonl", resume_step=start)
  base_key = jax.random.wrap_key_data(jax.device_get(state.rng))
  step_fn = make_step(config, mesh)
  place = (functools.partial(parallel.shard_batch, mesh=mesh)
           if config.train.parallel_mode == "shard_map" else lambda batch: batch)

  def produce(step):
    return place(dataset.get_batch(slices, seed=config.seed, step=step,
                                   batch_size=config.train.batch_size))

  # Loop ------------------------------------------------------------------------------------------
  total = config.train.steps
  log(f"training {config.model.name} on {devices} {mesh.devices.flat[0].platform} device(s), "
      f"parallel mode {config.train.parallel_mode}, global batch {config.train.batch_size}: "
      f"steps {start}..{total}")
  window_start, window_steps = None, 0
  with _StopRequested() as stop:
    for step, batch in _prefetch(produce, range(start, total)):
      state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
      done = step + 1
      window_steps += 1
      if done % config.train.log_every == 0 or done == total:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        if window_start is None:  # the first window includes compilation: no rate yet
          rate_text = "compiling"
        else:
          rate = (window_steps) / max(now - window_start, 1e-9)
          rate_text = (f"{rate:.2f} steps/s, {rate * config.train.batch_size:.1f} img/s, "
                       f"ETA {_format_duration((total - done) / rate)}")
        window_start, window_steps = now, 0
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
          checkpoints.close()
          raise TrainingDiverged(
              f"step {done}: non-finite {', '.join(bad)}; last checkpoint: "
              f"{checkpoints.latest_step()} in {checkpoints.directory}")
        metrics_log.write({"step": done, **values})
        losses_text = "  ".join(f"{k} {v:.4f}" for k, v in values.items() if "norm" not in k)
        log(f"step {done}/{total}  {losses_text}  [{rate_text}]")
      checkpoints.save(done, state, force=done == total)
      if stop.requested:
        if checkpoints.latest_step() != done:
          checkpoints.save(done, state, force=True)
        checkpoints.close()
        log(f"stopped at step {done}; checkpoint saved, run the same command to resume")
        return state
  if total <= start:
    log(f"nothing to train: the checkpoint is at step {start} and train.steps is {total}")
  checkpoints.close()
  log(f"checkpoints in {checkpoints.directory}, metrics in {workdir / 'metrics.jsonl'}")

  if evaluate_after:
    evaluate.evaluate_split(config, workdir=workdir, data_dir=data_dir, state=state, log=log)
  return state
