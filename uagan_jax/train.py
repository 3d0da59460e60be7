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

from uagan_jax import checkpoint, evaluate, losses, parallel, visualize
from uagan_jax import config as config_lib
from uagan_jax.data import MODALITIES, REGIONS, augment, dataset, readers
from uagan_jax.errors import UserError
from uagan_jax.models import stargan, uagan
from uagan_jax.models.segan import Critic, Segmentor, mask_image

# ------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Networks:
  """The modules and optimizers of one model family; static, so it is bound, not traced.

  Roles: ``segmentor`` S and ``critic`` C (SegAN), ``generator`` G and ``discriminator`` D
  (StarGAN), ``unified`` (UAGAN's fused S + G, `models.uagan.UnifiedNet`). A family uses a subset.
  """
  optimizers: dict[str, optax.GradientTransformation]
  segmentor: Segmentor | None = None
  critic: Critic | None = None
  generator: stargan.Generator | None = None
  discriminator: stargan.Discriminator | None = None
  unified: uagan.UnifiedNet | None = None


# Which networks each model family trains (DESIGN.md).
FAMILY_ROLES = {
    "unet": ("segmentor",),
    "segan": ("segmentor", "critic"),
    "stargan": ("generator", "discriminator"),
    "uagan": ("unified", "critic", "discriminator"),
}


def build_networks(config: ml_collections.ConfigDict, *, bn_axis_name: str | None = parallel.AXIS
                   ) -> Networks:
  """Modules and optimizers for ``config.model.name``.

  Args:
    config: the run's config.
    bn_axis_name: axis for cross-device BatchNorm statistics: ``"data"`` inside the step,
      ``None`` for initialisation and inference outside any mapped context.
  """
  dtype = jnp.dtype(config.model.dtype)
  m = config.model
  roles = FAMILY_ROLES[m.name]
  modules, optimizers = {}, {}
  if "segmentor" in roles:
    modules["segmentor"] = Segmentor(features=tuple(m.segmentor_features), num_regions=3,
                                     num_modalities=len(MODALITIES), bn_axis_name=bn_axis_name,
                                     dtype=dtype)
    optimizers["segmentor"] = _adam(config, config.optim.segmentor_lr)
  if "critic" in roles:
    modules["critic"] = Critic(features=tuple(m.critic_features), norm=m.critic_norm,
                               bn_axis_name=bn_axis_name, dtype=dtype)
    optimizers["critic"] = _adam(config, config.optim.critic_lr)
  if "generator" in roles:
    modules["generator"] = stargan.Generator(base_features=m.generator_features,
                                             num_residual=m.generator_residual_blocks,
                                             num_modalities=len(MODALITIES),
                                             norm=m.generator_norm,
                                             output=m.generator_output, dtype=dtype)
    optimizers["generator"] = _adam(config, config.optim.generator_lr)
  if "discriminator" in roles:
    modules["discriminator"] = stargan.Discriminator(base_features=m.discriminator_features,
                                                     num_layers=m.discriminator_layers,
                                                     num_modalities=len(MODALITIES),
                                                     per_modality_scores=m.discriminator_per_modality,
                                                     dtype=dtype)
    optimizers["discriminator"] = _adam(config, config.optim.discriminator_lr)
  if "unified" in roles:
    modules["unified"] = uagan.UnifiedNet(
        seg_features=tuple(m.segmentor_features), gen_features=m.generator_features,
        num_residual=m.generator_residual_blocks, num_modalities=len(MODALITIES), fuse=m.fuse,
        fuse_reverse=m.fuse_reverse, fuse_reverse_stop_gradient=m.fuse_reverse_stop_gradient,
        gen_norm=m.generator_norm,
        gen_output=m.generator_output, gen_pair_heads=m.generator_pair_heads,
        bn_axis_name=bn_axis_name, dtype=dtype)
    # One module, two learning rates: the translation stream's parameters (and the gates that
    # feed it) follow the generator's, the rest the segmentor's.
    optimizers["unified"] = optax.multi_transform(
        {"generator": _adam(config, config.optim.generator_lr),
         "segmentor": _adam(config, config.optim.segmentor_lr)},
        lambda params: {name: jax.tree.map(lambda _, n=name: _unified_stream(n), subtree)
                        for name, subtree in params.items()})
  return Networks(optimizers=optimizers, **modules)


def _unified_stream(top_level_name: str) -> str:
  return ("generator" if top_level_name.startswith(("gen_", "fuse_seg_to_gen"))
          else "segmentor")


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
  height, width = config.data.image_size
  image = jnp.zeros((1, height, width, 1), jnp.float32)
  modality = jnp.zeros((1,), jnp.int32)
  example_inputs = {
      "segmentor": lambda: (image, modality),
      "critic": lambda: (jnp.zeros((1, height, width, 3)),),
      "generator": lambda: (image, modality),
      "discriminator": lambda: ((image, modality) if networks.discriminator.per_modality_scores
                                else (image,)),
      "unified": lambda: (image, modality, modality),
  }
  roles = FAMILY_ROLES[config.model.name]
  keys = jax.random.split(init_key, max(2, len(roles)))
  nets = {}
  for key, role in zip(keys, roles):
    module = getattr(networks, role)
    kwargs = {"train": False} if role in ("segmentor", "unified") else {}
    variables = unmapped_module(module).init(key, *example_inputs[role](), **kwargs)
    # The critic's BatchNorm uses the current batch only; its running averages are never read.
    batch_stats = variables.get("batch_stats", {}) if role != "critic" else {}
    nets[role] = NetState(params=variables["params"], batch_stats=batch_stats,
                          opt_state=networks.optimizers[role].init(variables["params"]))
  return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(base_key), nets=nets)


def unmapped_module(module: nn.Module) -> nn.Module:
  """The same module without a BatchNorm axis, for use outside the data-parallel step."""
  return module.clone(bn_axis_name=None) if hasattr(module, "bn_axis_name") else module


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------

# Independent random streams derived from each example's key.
_AUGMENT_STREAM, _PENALTY_STREAM, _TARGET_STREAM, _DISC_PENALTY_STREAM = 1, 2, 3, 4


def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *,
               networks: Networks, config: ml_collections.ConfigDict,
               with_gradients: bool = False) -> tuple[TrainState, dict[str, jax.Array]]:
  """One min-max update of all networks, as the program each device runs on its shard.

  Critics' phase first (SegAN's C and StarGAN's D ascend their objectives), then generators'
  phase (S and G descend theirs against the *updated* critics), all optimizer states in one
  compiled program. The generators' forward pass is taken once, with its VJP kept: their
  parameters do not change between the phases, so reusing it is exact and saves work.

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
        image, regions, _stream(example_keys, _AUGMENT_STREAM),
        intensity_scale=config.data.intensity_scale, intensity_shift=config.data.intensity_shift)
  inputs = _Inputs(image=image, regions=regions, modality=modality, example_keys=example_keys)
  if networks.generator is not None or networks.unified is not None:
    new_nets, metrics, gradients = _translation_phases(state, inputs, networks=networks,
                                                       config=config)
  else:
    new_nets, metrics, gradients = _segmentation_phases(state, inputs, networks=networks,
                                                        config=config)
  metrics = parallel.mean_over_devices(metrics)
  if with_gradients:
    metrics["gradients"] = gradients
  return state.replace(step=state.step + 1, nets=new_nets), metrics


@struct.dataclass
class _Inputs:
  image: jax.Array  # [b, H, W, 1] z-scored (and augmented)
  regions: jax.Array  # [b, H, W, 3]
  modality: jax.Array  # [b] source modality ids
  example_keys: jax.Array  # [b] one key per example


def _stream(example_keys: jax.Array, stream: int) -> jax.Array:
  return jax.vmap(lambda k: jax.random.fold_in(k, stream))(example_keys)


def _critic_features(networks: Networks, params, masked: jax.Array) -> list[jax.Array]:
  # Batch statistics are those of the current batch only; nothing is kept between steps.
  features, _ = networks.critic.apply({"params": params}, masked, mutable=["batch_stats"])
  return features


def _update_critic(critic_state: NetState, inputs: _Inputs, probs: jax.Array, *,
                   networks: Networks, config) -> tuple[NetState, dict, dict]:
  """SegAN's critic ascends the multi-scale L1 between prediction- and truth-masked images."""
  masked_true = mask_image(inputs.image, inputs.regions)
  masked_pred = mask_image(inputs.image, jax.lax.stop_gradient(probs))
  scale_weights = tuple(config.loss.scale_weights) or None

  def objective(params):
    l1 = losses.multiscale_l1(features_a=_critic_features(networks, params, masked_pred),
                              features_b=_critic_features(networks, params, masked_true),
                              scale_weights=scale_weights)
    value, aux = -l1, {"critic/l1": l1}  # the critic maximises the distance
    if config.loss.critic_constraint == "gradient_penalty":
      alpha = jax.vmap(jax.random.uniform)(_stream(inputs.example_keys, _PENALTY_STREAM))

      def score(x):  # per-example sum of the per-scale mean features: the critic's scalar
        return sum(jnp.mean(f, axis=tuple(range(1, f.ndim)))
                   for f in _critic_features(networks, params, x)[1:])

      penalty = losses.gradient_penalty(critic_fn=score, real=masked_true, fake=masked_pred,
                                        alpha=alpha)
      value = value + config.loss.gp_weight * penalty
      aux["critic/gradient_penalty"] = penalty
    return value, aux

  grads, metrics = jax.grad(objective, has_aux=True)(parallel.per_device(critic_state.params))
  grads = parallel.mean_over_devices(grads)
  new_state, norms = _apply_gradients(
      critic_state, grads, networks.optimizers["critic"],
      clip_limit=config.loss.clip_limit if config.loss.critic_constraint == "clip" else None)
  metrics.update({f"critic/{k}": v for k, v in norms.items()})
  return new_state, metrics, grads


def _segmentation_terms(logits: jax.Array, inputs: _Inputs, critic_params, *,
                        networks: Networks, config) -> tuple[jax.Array, dict]:
  """The segmentor's objective: Dice + BCE (+ multi-scale L1 against the critic, if any)."""
  probs = jax.nn.sigmoid(logits)
  terms = {"seg/dice": losses.soft_dice_loss(probs=probs, targets=inputs.regions),
           "seg/bce": losses.binary_cross_entropy(logits=logits, targets=inputs.regions)}
  total = config.loss.dice_weight * terms["seg/dice"] + config.loss.bce_weight * terms["seg/bce"]
  if critic_params is not None:
    terms["seg/adversarial"] = losses.multiscale_l1(
        features_a=_critic_features(networks, critic_params, mask_image(inputs.image, probs)),
        features_b=_critic_features(networks, critic_params,
                                    mask_image(inputs.image, inputs.regions)),
        scale_weights=tuple(config.loss.scale_weights) or None)
    total = total + config.loss.adversarial_weight * terms["seg/adversarial"]
  return total, terms


def _segmentation_phases(state: TrainState, inputs: _Inputs, *, networks: Networks, config):
  """unet and segan: (C ascends), then S descends."""
  seg_state = state.nets["segmentor"]

  def segment(params):
    logits, new_vars = networks.segmentor.apply(
        {"params": params, "batch_stats": seg_state.batch_stats}, inputs.image, inputs.modality,
        train=True, mutable=["batch_stats"])
    return logits, new_vars["batch_stats"]

  logits, segment_vjp, seg_batch_stats = jax.vjp(segment, parallel.per_device(seg_state.params),
                                                 has_aux=True)
  new_nets, metrics, gradients = dict(state.nets), {}, {}
  critic_params = None
  if networks.critic is not None:
    new_nets["critic"], critic_metrics, gradients["critic"] = _update_critic(
        state.nets["critic"], inputs, jax.nn.sigmoid(logits), networks=networks, config=config)
    metrics.update(critic_metrics)
    critic_params = new_nets["critic"].params

  def objective(logits):
    total, terms = _segmentation_terms(logits, inputs, critic_params, networks=networks,
                                       config=config)
    return total, {**terms, "seg/total": total}

  logit_grads, seg_terms = jax.grad(objective, has_aux=True)(logits)
  (seg_grads,) = segment_vjp(logit_grads)
  seg_grads = gradients["segmentor"] = parallel.mean_over_devices(seg_grads)
  new_nets["segmentor"], norms = _apply_gradients(
      seg_state.replace(batch_stats=seg_batch_stats), seg_grads, networks.optimizers["segmentor"])
  metrics.update(seg_terms)
  metrics.update({f"seg/{k}": v for k, v in norms.items()})
  return new_nets, metrics, gradients


def _target_modalities(inputs: _Inputs, config) -> jax.Array:
  """A random target per example, uniform over the configured modalities other than its own."""
  allowed = jnp.asarray([MODALITIES.index(m) for m in config.data.modalities], jnp.int32)
  count = len(config.data.modalities)
  if count == 1:
    return inputs.modality
  position = jnp.zeros(len(MODALITIES), jnp.int32).at[allowed].set(jnp.arange(count))
  offsets = jax.vmap(lambda k: jax.random.randint(k, (), 1, count))(
      _stream(inputs.example_keys, _TARGET_STREAM))
  return allowed[(position[inputs.modality] + offsets) % count]


def _translation_phases(state: TrainState, inputs: _Inputs, *, networks: Networks, config):
  """stargan and uagan: D (and C) ascend, then G (and S, fused in uagan) descend.

  The generator maps the image, scaled into tanh's [-1, 1] by the z-score clip, to a random other
  modality and back (cycle). In uagan the same network segments the source image (conditioned on
  its modality) and, on the second pass, the translated image (conditioned on the target): the
  shape loss asks the latter to match the source's ground truth.
  """
  clip = config.data.clip
  real = inputs.image / clip
  source, target = inputs.modality, _target_modalities(inputs, config)
  unified = networks.unified is not None
  role = "unified" if unified else "generator"
  gen_state = state.nets[role]
  with_identity = config.loss.identity_weight > 0

  def generate(params):
    if unified:
      variables = {"params": params, "batch_stats": gen_state.batch_stats}
      (fake, logits), new_vars = networks.unified.apply(
          variables, inputs.image, source, target, train=True, translation_input=real,
          mutable=["batch_stats"])
      # Second pass: back to the source modality (cycle), and the translated image segmented as
      # the target modality (shape loss). Its batch statistics (of generated images) are not kept.
      (reconstructed, fake_logits), _ = networks.unified.apply(
          variables, fake * clip, target, source, train=True, translation_input=fake,
          mutable=["batch_stats"])
      outputs = {"fake": fake, "reconstructed": reconstructed, "logits": logits,
                 "fake_logits": fake_logits}
      if with_identity:
        # Asked for its own modality, G should copy. Only the translation is used, so XLA drops
        # this pass's segmentation stream (without fuse_reverse the translation does not need it).
        (outputs["same_domain"], _), _ = networks.unified.apply(
            variables, inputs.image, source, source, train=True, translation_input=real,
            mutable=["batch_stats"])
      return outputs, new_vars["batch_stats"]
    fake = networks.generator.apply({"params": params}, real, target)
    reconstructed = networks.generator.apply({"params": params}, fake, source)
    outputs = {"fake": fake, "reconstructed": reconstructed}
    if with_identity:
      outputs["same_domain"] = networks.generator.apply({"params": params}, real, source)
    return outputs, gen_state.batch_stats

  outputs, generate_vjp, gen_batch_stats = jax.vjp(generate, parallel.per_device(gen_state.params),
                                                   has_aux=True)
  new_nets, metrics, gradients = dict(state.nets), {}, {}

  # Critics' phase ------------------------------------------------------------------------------
  disc_state = state.nets["discriminator"]
  per_modality_scores = networks.discriminator.per_modality_scores

  def discriminate(params, x, modality):
    """D's (src, cls_logits); with per-modality scores, src judges x as that modality."""
    return networks.discriminator.apply({"params": params}, x,
                                        modality if per_modality_scores else None)

  def disc_objective(params):
    real_src, real_cls = discriminate(params, real, source)
    fake_src, _ = discriminate(params, jax.lax.stop_gradient(outputs["fake"]), target)
    # The interpolates lie between each real image and its translation; with per-modality scores
    # the penalty is on the score that judges the translation, the target's.
    per_example = lambda x: jnp.mean(discriminate(params, x, target)[0], axis=(1, 2, 3))
    alpha = jax.vmap(jax.random.uniform)(_stream(inputs.example_keys, _DISC_PENALTY_STREAM))
    terms = {"disc/wgan": losses.wgan_critic_loss(real_scores=real_src, fake_scores=fake_src),
             "disc/gradient_penalty": losses.gradient_penalty(
                 critic_fn=per_example, real=real, fake=outputs["fake"], alpha=alpha),
             "disc/cls": losses.modality_classification_loss(logits=real_cls, labels=source)}
    total = (terms["disc/wgan"] + config.loss.discriminator_gp_weight * terms["disc/gradient_penalty"]
             + config.loss.cls_weight * terms["disc/cls"])
    return total, {**terms, "disc/total": total}

  disc_grads, disc_terms = jax.grad(disc_objective, has_aux=True)(
      parallel.per_device(disc_state.params))
  disc_grads = gradients["discriminator"] = parallel.mean_over_devices(disc_grads)
  new_nets["discriminator"], norms = _apply_gradients(disc_state, disc_grads,
                                                      networks.optimizers["discriminator"])
  metrics.update(disc_terms)
  metrics.update({f"disc/{k}": v for k, v in norms.items()})
  critic_params = None
  if networks.critic is not None:
    new_nets["critic"], critic_metrics, gradients["critic"] = _update_critic(
        state.nets["critic"], inputs, jax.nn.sigmoid(outputs["logits"]), networks=networks,
        config=config)
    metrics.update(critic_metrics)
    critic_params = new_nets["critic"].params

  # Generators' phase ---------------------------------------------------------------------------
  def objective(outputs):
    fake_src, fake_cls = discriminate(new_nets["discriminator"].params, outputs["fake"], target)
    terms = {"gen/wgan": losses.wgan_generator_loss(fake_scores=fake_src),
             "gen/cls": losses.modality_classification_loss(logits=fake_cls, labels=target),
             "gen/cycle": losses.cycle_loss(original=real, reconstructed=outputs["reconstructed"])}
    total = (config.loss.gan_weight * terms["gen/wgan"] + config.loss.cls_weight * terms["gen/cls"]
             + config.loss.cycle_weight * terms["gen/cycle"])
    if with_identity:
      terms["gen/identity"] = losses.identity_loss(original=real,
                                                   same_domain=outputs["same_domain"])
      total = total + config.loss.identity_weight * terms["gen/identity"]
    if unified:
      seg_total, seg_terms = _segmentation_terms(outputs["logits"], inputs, critic_params,
                                                 networks=networks, config=config)
      terms.update(seg_terms)
      terms["seg/shape"] = losses.shape_loss(logits_translated=outputs["fake_logits"],
                                             targets=inputs.regions)
      terms["seg/shape_weight"] = losses.ramp_weight(
          state.step, max_weight=config.loss.shape_weight,
          ramp_steps=config.loss.shape_ramp_steps)
      total = total + seg_total + terms["seg/shape_weight"] * terms["seg/shape"]
    return total, {**terms, "gen/total": total}

  output_grads, gen_terms = jax.grad(objective, has_aux=True)(outputs)
  metrics.update(gen_terms)

  def update_generators(_):
    (grads,) = generate_vjp(output_grads)
    grads = parallel.mean_over_devices(grads)
    new_state, norms = _apply_gradients(gen_state.replace(batch_stats=gen_batch_stats), grads,
                                        networks.optimizers[role])
    return new_state, norms, grads

  if config.train.n_critic == 1:
    new_nets[role], norms, gradients[role] = update_generators(None)
  else:
    # The generators learn every n_critic-th step (StarGAN); critics every step. Both branches
    # are compiled into the one program; the predicate is the same on every device.
    def keep(_):
      zeros = jax.tree.map(jnp.zeros_like, gen_state.params)
      return (gen_state, {"grad_norm": jnp.zeros(()), "update_norm": jnp.zeros(()),
                          "param_norm": optax.tree.norm(gen_state.params)}, zeros)
    new_nets[role], norms, gradients[role] = jax.lax.cond(
        state.step % config.train.n_critic == config.train.n_critic - 1, update_generators, keep,
        None)
  metrics.update({f"gen/{k}": v for k, v in norms.items()})
  return new_nets, metrics, gradients


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


def abstract_state(config: ml_collections.ConfigDict) -> TrainState:
  """Shapes, dtypes and one-device shardings of the train state, without computing it.

  A restore target for Orbax: `jax.eval_shape` gives it in well under a second, where running
  the initialisers (`init_state`) costs tens of seconds of XLA compilation on a CPU.
  """
  abstract = jax.eval_shape(functools.partial(create_train_state, config, build_networks(config)))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      abstract)


def init_state(config: ml_collections.ConfigDict, mesh) -> TrainState:
  """The initial state, created by one jitted program directly in its replicated placement."""
  networks = build_networks(config)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(create_train_state, config, networks), out_shardings=sharding)()


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


class MetricsLog:
  """``metrics.jsonl``: one JSON object per logged step, ``{"step": t, "<loss>": value, ...}``
  (and ``validation.jsonl``, the same way).

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


class _Validation:
  """Validation during training: every ``train.validate_every`` steps and at the last step, Dice
  on the val split (`evaluate.Validator`) as a row of ``validation.jsonl``; the checkpoint with the
  highest mean Dice is kept in ``checkpoints_best/``, its score stored with it.

  It only reads the state, so training takes the same path, bit for bit, with or without it.
  Resuming stays equal to an uninterrupted run: rows past the restored step are dropped (as in
  `MetricsLog`) and written again by the replayed steps; the best score so far is read from the
  best checkpoint, which is kept even when it is newer than the restored step (the replayed steps
  reach the same state and score, and an equal score never replaces it).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, workdir: pathlib.Path, cases,
               resume_step: int, log: Callable[[str], None]):
    self.every = config.train.validate_every
    self.last = config.train.steps
    self.log = log
    self.validator = evaluate.Validator(config, cases)
    self.rows = MetricsLog(workdir / "validation.jsonl", resume_step=resume_step)
    self.checkpoints = checkpoint.Checkpointer(workdir / evaluate.CHECKPOINT_DIRS["best"], every=1,
                                               keep=1, best_metric="dice_mean")
    self.best_step = self.checkpoints.latest_step()
    self.best = -math.inf
    if self.best_step is not None:
      self.best = (self.checkpoints.metrics(self.best_step) or {}).get("dice_mean", -math.inf)

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.last

  def __call__(self, step: int, state: TrainState) -> float:
    """Validates ``state`` (after ``step`` steps); returns the seconds it took."""
    started = time.time()
    row = {"step": step, **self.validator(state)}
    score = row["dice/mean"]
    if score > self.best and step != self.best_step:  # a replayed step's best is there already
      self.checkpoints.save(step, state, force=True, metrics={"dice_mean": score})
      self.best, self.best_step = score, step
    self.rows.write(row)
    regions = "  ".join(f"{r} {row[f'dice/{r}']:.3f}" for r in REGIONS)
    self.log(f"validation step {step}: Dice {regions} (mean over modalities, {row['cases']} val "
             f"cases); mean {score:.3f}, best {self.best:.3f} at step {self.best_step} "
             f"[{time.time() - started:.1f} s]")
    return time.time() - started

  def close(self) -> None:
    self.checkpoints.close()


def train_and_evaluate(config: ml_collections.ConfigDict, *, workdir: pathlib.Path,
                       data_dir: pathlib.Path, log: Callable[[str], None] = print,
                       evaluate_after: bool = True) -> TrainState:
  """Trains ``config`` on the data in ``data_dir``, checkpointing and logging into ``workdir``.

  Resumes from the newest checkpoint in ``workdir`` if there is one. Writes ``config.json`` (the
  resolved config), ``splits.json`` (cases per split, modality per training case),
  ``metrics.jsonl``, ``checkpoints/``, with ``train.validate_every`` also ``validation.jsonl``
  and ``checkpoints_best/``, and at the end ``figures/training_curves.png``; then evaluates the
  held-out split (see `uagan_jax.evaluate`).

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
  validates = config.train.validate_every > 0 and config.model.name != "stargan"
  if config.train.validate_every and not validates:
    log("validation: stargan does not segment; train.validate_every is ignored")
  if validates and not splits["val"]:
    # A recipe's default (the :demo recipes validate) must not stop a run on a small data set.
    log(f"validation: the val split is empty (data.val_fraction={config.data.val_fraction}, "
        f"{len(cases)} cases); train.validate_every={config.train.validate_every} is ignored")
    validates = False
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
  validation = None
  if validates:
    val_cases = {c.case_id: c for c in cases}
    val_ids = splits["val"][:config.eval.val_max_cases or None]
    validation = _Validation(config, workdir=workdir, cases=[val_cases[i] for i in val_ids],
                             resume_step=start, log=log)
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
          if validation is not None:
            validation.close()
          raise TrainingDiverged(
              f"step {done}: non-finite {', '.join(bad)}; last checkpoint: "
              f"{checkpoints.latest_step()} in {checkpoints.directory}")
        metrics_log.write({"step": done, **values})
        losses_text = "  ".join(f"{k} {v:.4f}" for k, v in values.items() if "norm" not in k)
        log(f"step {done}/{total}  {losses_text}  [{rate_text}]")
      checkpoints.save(done, state, force=done == total)
      if validation is not None and validation.due(done):
        seconds = validation(done, state)
        if window_start is not None:  # steps/s and the ETA count training steps only
          window_start += seconds
      if stop.requested:
        if checkpoints.latest_step() != done:
          checkpoints.save(done, state, force=True)
        checkpoints.close()
        if validation is not None:
          validation.close()
        log(f"stopped at step {done}; checkpoint saved, run the same command to resume")
        return state
  if total <= start:
    log(f"nothing to train: the checkpoint is at step {start} and train.steps is {total}")
  checkpoints.close()
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

  if evaluate_after:
    evaluate.evaluate_split(config, workdir=workdir, data_dir=data_dir, state=state, curves=False,
                            log=log)
  return state
