"""The pieces the families' training phases are made of.

Networks: builders for each role's module and optimizer (`segmentor`, `critic`, `generator`,
`discriminator`) and their initialisation inputs. Phases: the critic's update (SegAN), the
segmentation terms, the segmentation phases (unet, segan), the discriminator's update (StarGAN),
the translation terms, and the generators' update behind the ``n_critic`` gate. A family module
composes them; `uagan_jax.train.train_step` calls the family's ``train_phases`` and knows none
of this.

Every phase is part of the per-device program (see `uagan_jax.parallel`): gradients are taken
with respect to `parallel.per_device` copies of the replicated parameters and averaged with
`parallel.mean_over_devices`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from uagan_jax import losses, parallel
from uagan_jax.data import MODALITIES, augment
from uagan_jax.models import stargan
from uagan_jax.models.segan import Critic, Segmentor, mask_image
from uagan_jax.train_state import (AUGMENT_STREAM, DISC_PENALTY_STREAM, PENALTY_STREAM,
                                   TARGET_STREAM, InitSpec, NetState, StepInputs, TrainState,
                                   stream)


# ------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------


def learning_rate(config: ml_collections.ConfigDict, lr: float) -> float | optax.Schedule:
  """``lr`` under the config's schedule (``optim.schedule``), on the absolute step.

  "staircase": ``lr * decay_rate ** (step // decay_every)``, the constant ``lr`` itself when
  ``decay_every`` is 0. "linear": ``lr`` until ``decay_start``, then linearly down to
  ``lr * decay_final_fraction`` at ``decay_end``, constant after (UAGAN's code, mangoyuan/UAGAN
  train_uagan.py:297-303, lowers it once an epoch over the last ``decay_epoch`` epochs; this
  lowers it every step).
  """
  o = config.optim
  if o.schedule == "linear":
    return optax.linear_schedule(init_value=lr, end_value=lr * o.decay_final_fraction,
                                 transition_steps=o.decay_end - o.decay_start,
                                 transition_begin=o.decay_start)
  if o.decay_every:
    return optax.exponential_decay(lr, transition_steps=o.decay_every, decay_rate=o.decay_rate,
                                   staircase=True)
  return lr


def adam(config: ml_collections.ConfigDict, lr: float) -> optax.GradientTransformation:
  """Adam with the config's betas and learning-rate schedule (`learning_rate`)."""
  return optax.adam(learning_rate(config, lr), b1=config.optim.b1, b2=config.optim.b2)


def segmentor(config, *, bn_axis_name) -> Segmentor:
  m = config.model
  return Segmentor(features=tuple(m.segmentor_features), num_regions=3,
                   num_modalities=len(MODALITIES), bn_axis_name=bn_axis_name,
                   dtype=jnp.dtype(m.dtype), strided_conv=m.strided_conv, resize=m.resize)


def critic(config, *, bn_axis_name) -> Critic:
  m = config.model
  return Critic(features=tuple(m.critic_features), norm=m.critic_norm, bn_axis_name=bn_axis_name,
                dtype=jnp.dtype(m.dtype), strided_conv=m.strided_conv)


def generator(config) -> stargan.Generator:
  m = config.model
  return stargan.Generator(base_features=m.generator_features,
                           num_residual=m.generator_residual_blocks,
                           num_modalities=len(MODALITIES), norm=m.generator_norm,
                           output=m.generator_output, dtype=jnp.dtype(m.dtype),
                           strided_conv=m.strided_conv)


def discriminator(config) -> stargan.Discriminator:
  m = config.model
  return stargan.Discriminator(base_features=m.discriminator_features,
                               num_layers=m.discriminator_layers, num_modalities=len(MODALITIES),
                               per_modality_scores=m.discriminator_per_modality,
                               dtype=jnp.dtype(m.dtype), strided_conv=m.strided_conv)


def example_image(config) -> tuple[jax.Array, jax.Array]:
  """A one-example zero image [1, H, W, 1] and modality id [1], to initialise networks with."""
  height, width = config.data.image_size
  return jnp.zeros((1, height, width, 1), jnp.float32), jnp.zeros((1,), jnp.int32)


def critic_init_spec(config) -> InitSpec:
  # The critic's BatchNorm uses the current batch only; its running averages are never read.
  height, width = config.data.image_size
  return InitSpec(args=(jnp.zeros((1, height, width, 3)),), keep_batch_stats=False)


def discriminator_init_spec(config, module: stargan.Discriminator) -> InitSpec:
  image, modality = example_image(config)
  return InitSpec(args=(image, modality) if module.per_modality_scores else (image,))


# ------------------------------------------------------------------------------------------------
# Updates
# ------------------------------------------------------------------------------------------------


def apply_gradients(net: NetState, grads, optimizer: optax.GradientTransformation, *,
                    clip_limit: float | None = None) -> tuple[NetState, dict[str, jax.Array]]:
  """One optimizer update (then weight clipping, if asked); the gradient, update, param norms."""
  updates, opt_state = optimizer.update(grads, net.opt_state, net.params)
  params = optax.apply_updates(net.params, updates)
  if clip_limit is not None:
    params = losses.clip_weights(params, limit=clip_limit)
  norms = {"grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
           "param_norm": optax.tree.norm(params)}
  return net.replace(params=params, opt_state=opt_state), norms


def critic_features(critic_module: Critic, params, masked: jax.Array) -> list[jax.Array]:
  # Batch statistics are those of the current batch only; nothing is kept between steps.
  features, _ = critic_module.apply({"params": params}, masked, mutable=["batch_stats"])
  return features


def update_critic(critic_state: NetState, inputs: StepInputs, probs: jax.Array, *, networks,
                  config) -> tuple[NetState, dict, dict]:
  """SegAN's critic ascends the multi-scale L1 between prediction- and truth-masked images."""
  critic_module = networks["critic"]
  masked_true = mask_image(inputs.image, inputs.regions)
  masked_pred = mask_image(inputs.image, jax.lax.stop_gradient(probs))
  scale_weights = tuple(config.loss.scale_weights) or None

  def objective(params):
    l1 = losses.multiscale_l1(features_a=critic_features(critic_module, params, masked_pred),
                              features_b=critic_features(critic_module, params, masked_true),
                              scale_weights=scale_weights, pooling=config.loss.scale_pooling)
    value, aux = -l1, {"critic/l1": l1}  # the critic maximises the distance
    if config.loss.critic_constraint == "gradient_penalty":
      alpha = jax.vmap(jax.random.uniform)(stream(inputs.example_keys, PENALTY_STREAM))

      def score(x):  # per-example sum of the per-scale mean features: the critic's scalar
        return sum(jnp.mean(f, axis=tuple(range(1, f.ndim)))
                   for f in critic_features(critic_module, params, x)[1:])

      penalty = losses.gradient_penalty(critic_fn=score, real=masked_true, fake=masked_pred,
                                        alpha=alpha)
      value = value + config.loss.gp_weight * penalty
      aux["critic/gradient_penalty"] = penalty
    return value, aux

  grads, metrics = jax.grad(objective, has_aux=True)(parallel.per_device(critic_state.params))
  grads = parallel.mean_over_devices(grads)
  new_state, norms = apply_gradients(
      critic_state, grads, networks.optimizers["critic"],
      clip_limit=config.loss.clip_limit if config.loss.critic_constraint == "clip" else None)
  metrics.update({f"critic/{k}": v for k, v in norms.items()})
  return new_state, metrics, grads


def segmentation_terms(logits: jax.Array, inputs: StepInputs, critic_params, *, networks,
                       config) -> tuple[jax.Array, dict]:
  """The segmentor's objective: Dice + BCE (+ class-weighted cross-entropy, with
  ``loss.ce_weight``) (+ multi-scale L1 against the critic, if any); ``loss.region_weights``
  weights the regions in all but the multi-scale L1."""
  probs = jax.nn.sigmoid(logits)
  region_weights = tuple(config.loss.region_weights) or None
  terms = {"seg/dice": losses.soft_dice_loss(probs=probs, targets=inputs.regions,
                                             region_weights=region_weights,
                                             reduction=config.loss.dice_reduction,
                                             axis_name=parallel.AXIS,
                                             groups=inputs.modality,
                                             num_groups=len(MODALITIES)),
           "seg/bce": losses.binary_cross_entropy(logits=logits, targets=inputs.regions,
                                                  region_weights=region_weights)}
  total = config.loss.dice_weight * terms["seg/dice"] + config.loss.bce_weight * terms["seg/bce"]
  if config.loss.ce_weight > 0:
    terms["seg/weighted_ce"] = losses.class_weighted_cross_entropy(
        logits=logits, targets=inputs.regions, class_weights=tuple(config.loss.ce_class_weights),
        region_weights=region_weights)
    total = total + config.loss.ce_weight * terms["seg/weighted_ce"]
  if critic_params is not None:
    critic_module = networks["critic"]
    terms["seg/adversarial"] = losses.multiscale_l1(
        features_a=critic_features(critic_module, critic_params, mask_image(inputs.image, probs)),
        features_b=critic_features(critic_module, critic_params,
                                   mask_image(inputs.image, inputs.regions)),
        scale_weights=tuple(config.loss.scale_weights) or None, pooling=config.loss.scale_pooling)
    total = total + config.loss.adversarial_weight * terms["seg/adversarial"]
  return total, terms


def segmentation_phases(state: TrainState, inputs: StepInputs, *, networks, config,
                        with_critic: bool):
  """unet and segan: (C ascends, with ``with_critic``), then S descends.

  S's forward pass is taken once, with its VJP kept: its parameters do not change while C
  updates, so reusing it is exact and saves work.
  """
  seg_state = state.nets["segmentor"]

  def segment(params):
    logits, new_vars = networks["segmentor"].apply(
        {"params": params, "batch_stats": seg_state.batch_stats}, inputs.image, inputs.modality,
        train=True, mutable=["batch_stats"])
    return logits, new_vars["batch_stats"]

  logits, segment_vjp, seg_batch_stats = jax.vjp(segment, parallel.per_device(seg_state.params),
                                                 has_aux=True)
  new_nets, metrics, gradients = dict(state.nets), {}, {}
  critic_params = None
  if with_critic:
    new_nets["critic"], critic_metrics, gradients["critic"] = update_critic(
        state.nets["critic"], inputs, jax.nn.sigmoid(logits), networks=networks, config=config)
    metrics.update(critic_metrics)
    critic_params = new_nets["critic"].params

  def objective(logits):
    total, terms = segmentation_terms(logits, inputs, critic_params, networks=networks,
                                      config=config)
    return total, {**terms, "seg/total": total}

  logit_grads, seg_terms = jax.grad(objective, has_aux=True)(logits)
  (seg_grads,) = segment_vjp(logit_grads)
  seg_grads = gradients["segmentor"] = parallel.mean_over_devices(seg_grads)
  new_nets["segmentor"], norms = apply_gradients(
      seg_state.replace(batch_stats=seg_batch_stats), seg_grads, networks.optimizers["segmentor"])
  metrics.update(seg_terms)
  metrics.update({f"seg/{k}": v for k, v in norms.items()})
  return new_nets, metrics, gradients


# ------------------------------------------------------------------------------------------------
# Translation (stargan, uagan)
# ------------------------------------------------------------------------------------------------


def target_modalities(inputs: StepInputs, config) -> jax.Array:
  """A random target per example, uniform over the configured modalities other than its own."""
  allowed = jnp.asarray([MODALITIES.index(m) for m in config.data.modalities], jnp.int32)
  count = len(config.data.modalities)
  if count == 1:
    return inputs.modality
  position = jnp.zeros(len(MODALITIES), jnp.int32).at[allowed].set(jnp.arange(count))
  offsets = jax.vmap(lambda k: jax.random.randint(k, (), 1, count))(
      stream(inputs.example_keys, TARGET_STREAM))
  return allowed[(position[inputs.modality] + offsets) % count]


def discriminate_fn(networks) -> Callable:
  """``discriminate(params, x, modality) -> (src, cls_logits)``; with per-modality scores, src
  judges x as that modality."""
  disc = networks["discriminator"]

  def discriminate(params, x, modality):
    return disc.apply({"params": params}, x, modality if disc.per_modality_scores else None)

  return discriminate


def discriminator_real(inputs: StepInputs, config, *, real: jax.Array | None = None
                       ) -> jax.Array:
  """The real images D judges, scaled into tanh's [-1, 1] by the z-score clip as G's input is.

  With ``data.augment_discriminator_real`` (the default), or without ``data.augment``, they are
  the images G translates, ``inputs.image / clip`` (``real``, returned as it is, when given):
  augmented, intensity changes and all. Without it, they are the same slices with the flips and
  spatial transforms alone (the step's own draws, `uagan_jax.train.train_step`'s, so the geometry
  is the one G's input has), no intensity change: D learns what stored scans look like, not that
  augmented intensities (which may lie past the clip, where G's tanh cannot follow) are real.
  """
  if config.data.augment_discriminator_real or not config.data.augment:
    return inputs.image / config.data.clip if real is None else real
  if inputs.unaugmented_image is None:
    raise ValueError("data.augment_discriminator_real=false needs StepInputs.unaugmented_image")
  settings = {**config.data.augmentations.to_dict(),
              **{f"{name}_p": 0.0 for name in augment.INTENSITY_TRANSFORMS}}
  raw = inputs.unaugmented_image
  # The same call as the step's (and so the same flips and warps), less every intensity change:
  # a jitter of U(0, 0) is x * 1 + 0, exact; the region maps are not needed.
  image, _ = augment.augment_batch(raw, jnp.zeros_like(raw), stream(inputs.example_keys,
                                                                    AUGMENT_STREAM),
                                   intensity_scale=0.0, intensity_shift=0.0,
                                   augmentations=settings)
  return image / config.data.clip


def update_discriminator(disc_state: NetState, inputs: StepInputs, real: jax.Array, fake: jax.Array,
                         target: jax.Array, *, networks, config) -> tuple[NetState, dict, dict]:
  """StarGAN's D ascends: WGAN-GP on real vs translated images, + classification of the real.

  ``real`` is what D judges as real (`discriminator_real`), ``fake`` G's translations."""
  source = inputs.modality
  discriminate = discriminate_fn(networks)

  def disc_objective(params):
    real_src, real_cls = discriminate(params, real, source)
    fake_src, _ = discriminate(params, jax.lax.stop_gradient(fake), target)
    # The interpolates lie between each real image and its translation; with per-modality scores
    # the penalty is on the score that judges the translation, the target's.
    per_example = lambda x: jnp.mean(discriminate(params, x, target)[0], axis=(1, 2, 3))
    alpha = jax.vmap(jax.random.uniform)(stream(inputs.example_keys, DISC_PENALTY_STREAM))
    terms = {"disc/wgan": losses.wgan_critic_loss(real_scores=real_src, fake_scores=fake_src),
             "disc/gradient_penalty": losses.gradient_penalty(
                 critic_fn=per_example, real=real, fake=fake, alpha=alpha),
             "disc/cls": losses.modality_classification_loss(logits=real_cls, labels=source)}
    total = (terms["disc/wgan"] + config.loss.discriminator_gp_weight * terms["disc/gradient_penalty"]
             + config.loss.cls_weight * terms["disc/cls"])
    return total, {**terms, "disc/total": total}

  disc_grads, metrics = jax.grad(disc_objective, has_aux=True)(
      parallel.per_device(disc_state.params))
  disc_grads = parallel.mean_over_devices(disc_grads)
  new_state, norms = apply_gradients(disc_state, disc_grads, networks.optimizers["discriminator"])
  metrics.update({f"disc/{k}": v for k, v in norms.items()})
  return new_state, metrics, disc_grads


def translation_terms(outputs: dict, real: jax.Array, target: jax.Array, disc_params, *,
                      networks, config) -> tuple[jax.Array, dict]:
  """G's objective: WGAN against the updated D, classification as the target, cycle (+ identity).

  ``outputs`` holds ``fake`` (G(real, target)), ``reconstructed`` (G(fake, source)) and, with
  ``loss.identity_weight``, ``same_domain`` (G(real, source)).
  """
  fake_src, fake_cls = discriminate_fn(networks)(disc_params, outputs["fake"], target)
  terms = {"gen/wgan": losses.wgan_generator_loss(fake_scores=fake_src),
           "gen/cls": losses.modality_classification_loss(logits=fake_cls, labels=target),
           "gen/cycle": losses.cycle_loss(original=real, reconstructed=outputs["reconstructed"])}
  total = (config.loss.gan_weight * terms["gen/wgan"] + config.loss.cls_weight * terms["gen/cls"]
           + config.loss.cycle_weight * terms["gen/cycle"])
  if config.loss.identity_weight > 0:
    terms["gen/identity"] = losses.identity_loss(original=real, same_domain=outputs["same_domain"])
    total = total + config.loss.identity_weight * terms["gen/identity"]
  return total, terms


def update_generator(state: TrainState, role: str, generate_vjp: Callable, output_grads,
                     batch_stats, *, networks, config) -> tuple[NetState, dict, dict]:
  """The generator's (or unified network's) update, every ``train.n_critic``-th step.

  Args:
    state: the state before the step (its ``step`` decides the n_critic gate).
    role: the network to update.
    generate_vjp: the VJP of its forward pass, kept from the critics' phase.
    output_grads: the objective's gradients with respect to that pass's outputs.
    batch_stats: the forward pass's new BatchNorm statistics.
  """
  gen_state = state.nets[role]

  def update(_):
    (grads,) = generate_vjp(output_grads)
    grads = parallel.mean_over_devices(grads)
    new_state, norms = apply_gradients(gen_state.replace(batch_stats=batch_stats), grads,
                                       networks.optimizers[role])
    return new_state, norms, grads

  if config.train.n_critic == 1:
    return update(None)
  # The generators learn every n_critic-th step (StarGAN); critics every step. Both branches are
  # compiled into the one program; the predicate is the same on every device.
  def keep(_):
    zeros = jax.tree.map(jnp.zeros_like, gen_state.params)
    return (gen_state, {"grad_norm": jnp.zeros(()), "update_norm": jnp.zeros(()),
                        "param_norm": optax.tree.norm(gen_state.params)}, zeros)
  return jax.lax.cond(state.step % config.train.n_critic == config.train.n_critic - 1, update,
                      keep, None)


def translation_phases(state: TrainState, inputs: StepInputs, *, role: str, generate: Callable,
                       networks, config, update_other_critics: Callable | None = None,
                       extend_objective: Callable | None = None):
  """stargan and uagan: D (and the family's other critics) ascend, then ``role`` descends.

  ``role``'s forward pass is taken once, its VJP kept: its parameters do not change while the
  critics update, so reusing it is exact and saves work.

  Args:
    state, inputs: as for every family's ``train_phases``.
    role: the network that translates ("generator" or "unified").
    generate: ``generate(params, batch_stats, real, source, target) -> (outputs, batch_stats)``:
      ``outputs`` holds ``fake`` = G(real, target), ``reconstructed`` = G(fake, source), with
      ``loss.identity_weight`` ``same_domain`` = G(real, source), and whatever the family's hooks
      read. ``real`` is the image scaled into tanh's [-1, 1] by the z-score clip. D's real
      images are `discriminator_real`'s: these, or without ``data.augment_discriminator_real``
      the same slices before any intensity augmentation.
    update_other_critics: ``(new_nets, outputs) -> (metrics, gradients)``, after D's update:
      updates the family's other critics in ``new_nets`` in place.
    extend_objective: ``(outputs, total, terms, new_nets) -> total``: adds the family's terms
      to the translation objective (and to ``terms``).
  """
  real = inputs.image / config.data.clip
  source, target = inputs.modality, target_modalities(inputs, config)
  gen_state = state.nets[role]
  outputs, generate_vjp, gen_batch_stats = jax.vjp(
      lambda params: generate(params, gen_state.batch_stats, real, source, target),
      parallel.per_device(gen_state.params), has_aux=True)
  new_nets, metrics, gradients = dict(state.nets), {}, {}

  # Critics' phase ------------------------------------------------------------------------------
  new_nets["discriminator"], disc_metrics, gradients["discriminator"] = update_discriminator(
      state.nets["discriminator"], inputs, discriminator_real(inputs, config, real=real),
      outputs["fake"], target, networks=networks, config=config)
  metrics.update(disc_metrics)
  if update_other_critics is not None:
    critic_metrics, critic_gradients = update_other_critics(new_nets, outputs)
    metrics.update(critic_metrics)
    gradients.update(critic_gradients)

  # Generators' phase ---------------------------------------------------------------------------
  def objective(outputs):
    total, terms = translation_terms(outputs, real, target, new_nets["discriminator"].params,
                                     networks=networks, config=config)
    if extend_objective is not None:
      total = extend_objective(outputs, total, terms, new_nets)
    return total, {**terms, "gen/total": total}

  output_grads, gen_terms = jax.grad(objective, has_aux=True)(outputs)
  metrics.update(gen_terms)
  new_nets[role], norms, gradients[role] = update_generator(
      state, role, generate_vjp, output_grads, gen_batch_stats, networks=networks, config=config)
  metrics.update({f"gen/{k}": v for k, v in norms.items()})
  return new_nets, metrics, gradients
