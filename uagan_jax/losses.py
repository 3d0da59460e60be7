"""Every loss of the model family as a pure, keyword-only function.

Conventions shared by all functions here:
  * arrays are NHWC; region maps have one channel per region (WT, TC, ET);
  * a loss returns a scalar mean over the examples it is given. Inside the data-parallel step
    each device calls it on its shard and the step averages across devices, so equal shard sizes
    give the global-batch mean exactly;
  * nothing here draws random numbers: where a loss needs them (the gradient penalty's
    interpolation weights) the caller passes them in, so every function is deterministic and can
    be tested against values computed by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax


def multiscale_l1(*, features_a: Sequence[jax.Array], features_b: Sequence[jax.Array],
                  scale_weights: Sequence[float] | None = None,
                  pooling: str = "per_scale") -> jax.Array:
  """SegAN's multi-scale L1 loss (Xue et al. 2018, eq. 2-3).

  ``l_mae(f(x), f(x')) = 1/L * sum_i w_i * mean |f_i(x) - f_i(x')|``, where ``f_i`` is the critic's
  feature map at scale ``i``. The first "scale" is the critic's input itself (the image masked by
  the predicted or the true region maps), so pixel-level differences count as well as the
  hierarchical ones. With ``pooling="per_scale"`` each scale is a mean over its elements (and the
  batch), so a scale with many elements does not drown the others; ``scale_weights`` (default
  all 1) reweights them.

  ``pooling="concatenated"`` is SegAN's code instead (YuanXue1993/SegAN net.py, ``NetC.forward``
  and train.py's ``torch.mean(torch.abs(result - target_G))``): every scale, times its weight, is
  flattened into one vector and the loss is the mean over all its elements,
  ``sum_i w_i * sum |f_i(x) - f_i(x')| / sum_i n_i``, so each scale counts by its element count.

  Args:
    features_a: per-scale arrays [B, ...] from the critic applied to ``image * predicted_map``.
    features_b: the same scales from the critic applied to ``image * true_map``.
    scale_weights: optional weight per scale.
    pooling: ``"per_scale"`` (mean per scale, then over scales) or ``"concatenated"`` (one mean
      over the elements of every scale).

  Returns:
    The scalar loss.
  """
  if len(features_a) != len(features_b):
    raise ValueError(f"{len(features_a)} scales against {len(features_b)}")
  if scale_weights is None:
    scale_weights = (1.0,) * len(features_a)
  if len(scale_weights) != len(features_a):
    raise ValueError(f"{len(scale_weights)} scale weights for {len(features_a)} scales")
  if pooling == "concatenated":
    total = sum(w * jnp.sum(jnp.abs(a - b)) for w, a, b in zip(scale_weights, features_a, features_b))
    return total / sum(a.size for a in features_a)
  if pooling != "per_scale":
    raise ValueError(f"unknown pooling {pooling!r}")
  per_scale = [w * jnp.mean(jnp.abs(a - b)) for w, a, b in zip(scale_weights, features_a, features_b)]
  return sum(per_scale) / len(per_scale)


def _region_mean(per_region: jax.Array, region_weights: Sequence[float]) -> jax.Array:
  """The mean over the leading axes of ``per_region`` [..., R], weighted over its last axis."""
  weights = jnp.asarray(region_weights, per_region.dtype)
  per_region = jnp.mean(per_region.reshape(-1, per_region.shape[-1]), axis=0)
  return jnp.sum(weights * per_region) / jnp.sum(weights)


def soft_dice_loss(*, probs: jax.Array, targets: jax.Array, smooth: float = 1.0,
                   region_weights: Sequence[float] | None = None,
                   reduction: str = "per_example", axis_name: str | None = None,
                   groups: jax.Array | None = None, num_groups: int = 0) -> jax.Array:
  """1 - soft Dice per region, averaged over regions (and examples, ``reduction="per_example"``).

  ``dice = (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)``, the sums taken

  * ``"per_example"``: over each example's spatial axes, then the Dice averaged over examples.
    The ``smooth`` term makes an empty target with an empty prediction score 1 (loss 0) instead
    of 0/0. It also means that on a slice without the region any false positive costs nearly the
    whole Dice, so where most slices lack a region (tumour core, enhancing tumour) switching that
    region's output off everywhere can *lower* the loss: docs/EXPERIMENTS.md measured the
    tumour-core channels of the demo models switching off for whole modalities this way.
  * ``"batch"``: over the batch and the spatial axes together, one Dice per region (nnU-Net's
    ``batch_dice``): a slice without the region only adds its false positives to a Dice the
    batch's other slices earn, so an empty output is never rewarded while any slice of the batch
    holds the region. With ``axis_name`` (inside the data-parallel step) the sums are also taken
    over the devices of that axis, so the loss is the global batch's on any number of devices.
  * ``"present"``: a Dice per example, as ``"per_example"``, averaged over only the examples
    whose target holds the region (a region no example holds adds 0): each slice with the region
    weighs the same, as per example, and a slice without it, where any output scores nearly 0 or
    1, is left to the cross-entropy. With ``axis_name`` the mean is over the devices' examples.
  * ``"modality_batch"``: ``"batch"`` within each group of examples (``groups``: the source
    modality of each), then the mean over the groups the global batch holds: a batch Dice per
    modality, so one modality's misses cannot hide behind the others' hits in a batch that
    mixes modalities (uagan trains every modality in one batch). With ``axis_name`` the sums run
    over the devices too.

  Args:
    probs: [B, H, W, R] predicted probabilities in [0, 1].
    targets: [B, H, W, R] binary maps.
    smooth: additive smoothing, in voxels.
    region_weights: optional weight per region R: the loss is the weighted mean over regions of
      the per-region mean over examples (a weight 0 leaves that region untrained). None: the
      plain mean over examples and regions.
    reduction: "per_example", "batch", "present" or "modality_batch", as above.
    axis_name: the mapped axis to sum over (all but ``"per_example"``); None outside a mapped
      function (or for the local batch alone).
    groups: [B] integer group of each example (``"modality_batch"`` only), in [0, num_groups).
    num_groups: how many groups there are (``"modality_batch"`` only).

  Returns:
    Scalar loss in [0, 1].
  """
  if reduction in ("per_example", "present", "modality_batch"):
    axes = tuple(range(1, probs.ndim - 1))
  elif reduction == "batch":
    axes = tuple(range(probs.ndim - 1))
  else:
    raise ValueError(f"unknown reduction {reduction!r} "
                     "(known: per_example, batch, present, modality_batch)")
  intersection = jnp.sum(probs * targets, axis=axes)
  total = jnp.sum(probs, axis=axes) + jnp.sum(targets, axis=axes)
  if reduction == "modality_batch":
    if groups is None or num_groups < 1:
      raise ValueError("reduction 'modality_batch' needs groups and num_groups")
    member = jax.nn.one_hot(groups, num_groups, dtype=intersection.dtype)  # [B, G]
    intersection, total = member.T @ intersection, member.T @ total  # [G, R]
    count = jnp.sum(member, axis=0)  # [G]
    if axis_name is not None:
      intersection, total, count = jax.lax.psum((intersection, total, count), axis_name)
    held = (count > 0).astype(intersection.dtype)[:, None]
    dice = (2.0 * intersection + smooth) / (total + smooth)
    dice = jnp.sum(held * dice, axis=0) / jnp.sum(held)  # [R]: the mean over held groups
    if region_weights is not None:
      return 1.0 - _region_mean(dice, region_weights)
    return 1.0 - jnp.mean(dice)
  if reduction == "batch" and axis_name is not None:
    intersection, total = jax.lax.psum((intersection, total), axis_name)
  dice = (2.0 * intersection + smooth) / (total + smooth)
  if reduction == "present":
    held = (jnp.sum(targets, axis=axes) > 0).astype(dice.dtype)  # [B, R]
    held_dice, count = jnp.sum(held * dice, axis=0), jnp.sum(held, axis=0)
    if axis_name is not None:
      held_dice, count = jax.lax.psum((held_dice, count), axis_name)
    # 1 - this is the loss: a region no example holds has loss 0 (and no gradient).
    dice = jnp.where(count > 0, held_dice / jnp.maximum(count, 1.0), 1.0)
  if region_weights is not None:
    return 1.0 - _region_mean(dice, region_weights)
  return 1.0 - jnp.mean(dice)


def binary_cross_entropy(*, logits: jax.Array, targets: jax.Array,
                         region_weights: Sequence[float] | None = None) -> jax.Array:
  """Mean sigmoid binary cross-entropy, from logits for numerical stability.

  ``region_weights`` (optional, one per region on the last axis): the weighted mean over regions
  of the per-region mean; None: the plain mean over every element.
  """
  per_element = optax.sigmoid_binary_cross_entropy(logits, targets)
  if region_weights is not None:
    return _region_mean(per_element, region_weights)
  return jnp.mean(per_element)


def class_weighted_cross_entropy(*, logits: jax.Array, targets: jax.Array,
                                 class_weights: Sequence[float],
                                 region_weights: Sequence[float] | None = None) -> jax.Array:
  """Class-weighted cross-entropy of binary maps, normalised by the total weight (UAGAN's S loss).

  Each element's negative log-likelihood ``-log p(t)`` (sigmoid of its logit) is weighted by
  ``class_weights[1]`` where the target is 1 (tumour) and ``class_weights[0]`` where it is 0
  (background), times its region's weight; the loss is ``sum(w * nll) / sum(w)``. A sigmoid of
  logit z is the two-class softmax of (0, z), so on one region this is exactly PyTorch's
  ``F.cross_entropy(outputs, targets, weight=class_weights)`` with mean reduction, which UAGAN's
  code trains with (mangoyuan/UAGAN train_uagan.py:164, weights [0.02, 0.98] at :179).

  Unlike the other losses here it is a ratio of sums: inside the data-parallel step each device
  normalises by its own shard's weight, so with several devices the step's mean of the shards'
  ratios is not exactly the global-batch ratio (it is with one device).

  Args:
    logits: [B, H, W, R] logits, one binary map per region.
    targets: [B, H, W, R] binary maps.
    class_weights: (background weight, tumour weight), non-negative.
    region_weights: optional weight per region R (None: every region 1).

  Returns:
    Scalar loss.
  """
  background, tumour = class_weights
  weights = background + (tumour - background) * targets
  if region_weights is not None:
    weights = weights * jnp.asarray(region_weights, weights.dtype)
  nll = optax.sigmoid_binary_cross_entropy(logits, targets)
  return jnp.sum(weights * nll) / jnp.sum(weights)


def clip_weights(params, *, limit: float):
  """WGAN weight clipping (as in the SegAN code): every critic parameter into [-limit, limit]."""
  return jax.tree.map(lambda p: jnp.clip(p, -limit, limit), params)


def gradient_penalty(*, critic_fn: Callable[[jax.Array], jax.Array], real: jax.Array,
                     fake: jax.Array, alpha: jax.Array, target_norm: float = 1.0) -> jax.Array:
  """WGAN-GP penalty (Gulrajani et al. 2017): ``mean((||grad critic(x_hat)||_2 - 1)^2)``.

  ``x_hat = alpha * real + (1 - alpha) * fake`` per example. ``critic_fn`` maps a batch [B, ...] to
  one scalar per example [B]; the gradient norm is taken per example over all its other axes.

  Args:
    critic_fn: batch -> [B] scores; must treat examples independently (no batch statistics).
    real: [B, ...] real inputs.
    fake: [B, ...] generated inputs (gradients are not propagated into them).
    alpha: [B] interpolation weights in [0, 1], drawn by the caller.
    target_norm: the Lipschitz constant the penalty pulls the gradient norm towards.

  Returns:
    Scalar penalty.
  """
  alpha = alpha.reshape((-1,) + (1,) * (real.ndim - 1))
  x_hat = alpha * real + (1.0 - alpha) * jax.lax.stop_gradient(fake)
  grads = jax.grad(lambda x: jnp.sum(critic_fn(x)))(x_hat)
  norms = jnp.sqrt(jnp.sum(grads.reshape(grads.shape[0], -1) ** 2, axis=-1) + 1e-12)
  return jnp.mean((norms - target_norm) ** 2)


def wgan_critic_loss(*, real_scores: jax.Array, fake_scores: jax.Array) -> jax.Array:
  """WGAN critic loss ``mean(D(fake)) - mean(D(real))``, which the critic minimises.

  Minimising it maximises the critic's estimate of the Wasserstein distance between the real and
  the generated distribution. The two means are taken separately, so the score arrays may differ
  in batch size; a PatchGAN map counts every patch as one score.

  Args:
    real_scores: critic scores of real inputs, any shape.
    fake_scores: critic scores of generated inputs, any shape.

  Returns:
    Scalar loss (unbounded; add `gradient_penalty` to keep the critic Lipschitz).
  """
  return jnp.mean(fake_scores) - jnp.mean(real_scores)


def wgan_generator_loss(*, fake_scores: jax.Array) -> jax.Array:
  """WGAN generator loss ``-mean(D(fake))``: the generator raises the critic's score of fakes."""
  return -jnp.mean(fake_scores)


def modality_classification_loss(*, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """StarGAN's domain classification loss, as a mean softmax cross-entropy.

  StarGAN uses a sigmoid binary cross-entropy per attribute, because a CelebA face can have
  several attributes at once. Here a domain is exactly one MRI modality, so the labels are
  mutually exclusive and the softmax cross-entropy over modalities is the right likelihood.

  Args:
    logits: [B, M] modality logits (the discriminator's ``cls`` head).
    labels: [B] integer modality ids in [0, M).

  Returns:
    Scalar loss, averaged over the batch.
  """
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def cycle_loss(*, original: jax.Array, reconstructed: jax.Array) -> jax.Array:
  """StarGAN's reconstruction loss ``mean |x - G(G(x, c_target), c_source)|`` (L1, per element)."""
  return jnp.mean(jnp.abs(original - reconstructed))


def identity_loss(*, original: jax.Array, same_domain: jax.Array) -> jax.Array:
  """CycleGAN's identity-mapping loss ``mean |x - G(x, c_source)|`` (L1, per element).

  Asked for the modality it already is, G should return its input (Zhu et al. 2017, sec. 5.2).
  Unpaired training has no other term that penalises changing what needs no change, so without it
  G may redraw the texture and noise of a near-identical pair (T1 to T1ce) and end up further from
  the truth than the source itself.
  """
  return jnp.mean(jnp.abs(original - same_domain))


def shape_loss(*, logits_translated: jax.Array, targets: jax.Array,
               region_weights: Sequence[float] | None = None,
               dice_reduction: str = "per_example", axis_name: str | None = None,
               groups: jax.Array | None = None, num_groups: int = 0) -> jax.Array:
  """UAGAN's shape consistency loss: the translated image must keep the source's tumour.

  The segmentor's output on ``G(x, c_target)`` is compared with the ground truth of the *source*
  image ``x``: translation may change the contrast but not the anatomy. The loss is the
  segmentation loss itself, mean sigmoid binary cross-entropy plus soft Dice, so the generator
  gets the same per-pixel and per-region gradients as the segmentor does.

  Args:
    logits_translated: [B, H, W, R] segmentor logits on the translated images.
    targets: [B, H, W, R] binary region maps of the source images.
    region_weights: optional weight per region, as for `soft_dice_loss`.
    dice_reduction, axis_name, groups, num_groups: `soft_dice_loss`'s ``reduction``,
      ``axis_name``, ``groups`` and ``num_groups``.

  Returns:
    Scalar loss: `binary_cross_entropy` + `soft_dice_loss`.
  """
  return (binary_cross_entropy(logits=logits_translated, targets=targets,
                               region_weights=region_weights)
          + soft_dice_loss(probs=jax.nn.sigmoid(logits_translated), targets=targets,
                           region_weights=region_weights, reduction=dice_reduction,
                           axis_name=axis_name, groups=groups, num_groups=num_groups))


def ramp_weight(step: jax.Array | int, *, max_weight: float, ramp_steps: int) -> jax.Array:
  """A loss weight that grows linearly from 0 at step 0 to ``max_weight`` at ``ramp_steps``.

  Used to switch auxiliary losses on gradually, once the networks they depend on produce
  something meaningful. ``step`` may be a traced integer (inside `jax.jit`); ``ramp_steps`` is
  static. Steps before 0 give 0 and steps past the ramp give ``max_weight``.

  Args:
    step: the current training step.
    max_weight: the weight at and after the end of the ramp.
    ramp_steps: length of the ramp; 0 (or less) gives ``max_weight`` from the first step.

  Returns:
    Scalar float32 weight.
  """
  if ramp_steps <= 0:
    return jnp.asarray(max_weight, jnp.float32)
  fraction = jnp.clip(jnp.asarray(step, jnp.float32) / ramp_steps, 0.0, 1.0)
  return max_weight * fraction
