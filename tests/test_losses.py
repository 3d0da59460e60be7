"""Each loss of `uagan_jax/losses.py` against a value computed by hand: the segmentation and
critic losses (SegAN), then the adversarial, classification, cycle, identity and shape losses
(StarGAN / UAGAN) and the shape-loss ramp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uagan_jax import losses
from uagan_jax.models.stargan import Discriminator


def test_multiscale_l1_hand_computed():
  # Scale 0 (the masked input): |[1,2,3,4] - 1| = [0,1,2,3], mean 1.5.
  # Scale 1: |[0,0] - [2,-2]| = [2,2], mean 2.  Mean over scales: 1.75.
  a = [jnp.array([[1.0, 2.0, 3.0, 4.0]]), jnp.array([[0.0, 0.0]])]
  b = [jnp.ones((1, 4)), jnp.array([[2.0, -2.0]])]
  assert float(losses.multiscale_l1(features_a=a, features_b=b)) == pytest.approx(1.75)
  # Weights (1, 0.5): (1.5 + 0.5 * 2) / 2 = 1.25.
  assert float(losses.multiscale_l1(features_a=a, features_b=b, scale_weights=(1.0, 0.5))) == \
      pytest.approx(1.25)
  # Symmetric, and zero for identical features.
  assert float(losses.multiscale_l1(features_a=b, features_b=a)) == pytest.approx(1.75)
  assert float(losses.multiscale_l1(features_a=a, features_b=a)) == 0.0


def test_multiscale_l1_rejects_mismatched_scales():
  with pytest.raises(ValueError):
    losses.multiscale_l1(features_a=[jnp.ones(2)], features_b=[jnp.ones(2), jnp.ones(2)])


def _maps(values):
  """[H*W] values -> a [1, 1, len, 1] map (one example, one region)."""
  return jnp.asarray(values, jnp.float32).reshape(1, 1, -1, 1)


@pytest.mark.parametrize("probs,targets,expected", [
    ([1, 1, 0, 0], [1, 0, 1, 0], 1 - (2 * 1 + 1) / (4 + 1)),  # half overlap: 0.4
    ([1, 1], [1, 1], 0.0),                                     # perfect
    ([1, 0], [0, 1], 1 - 1 / 3),                               # no overlap
    ([0, 0, 0], [0, 0, 0], 0.0),                               # both empty: Dice 1, no NaN
    ([0.5, 0.5], [1, 0], 1 - (2 * 0.5 + 1) / (1 + 1 + 1)),     # soft probabilities
])
def test_soft_dice_loss_hand_computed(probs, targets, expected):
  loss = losses.soft_dice_loss(probs=_maps(probs), targets=_maps(targets))
  assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_soft_dice_loss_averages_examples_and_regions_and_has_finite_gradient():
  probs = jnp.stack([_maps([1, 1])[0], _maps([0, 0])[0]])             # 2 examples
  targets = jnp.stack([_maps([1, 0])[0], _maps([0, 0])[0]])
  # Example 0: (2*1+1)/(3+1) = 0.75; example 1 (empty): 1.  Loss = 1 - 0.875.
  assert float(losses.soft_dice_loss(probs=probs, targets=targets)) == pytest.approx(0.125)
  grad = jax.grad(lambda p: losses.soft_dice_loss(probs=p, targets=jnp.zeros_like(p)))(
      jnp.zeros((1, 2, 2, 3)))
  assert np.all(np.isfinite(grad))


def test_batch_dice_pools_the_batch_and_never_rewards_an_empty_output():
  # Example 0 holds the region (2 of 4 pixels), examples 1 and 2 do not (as most slices lack TC).
  targets = jnp.stack([_maps([1, 1, 0, 0])[0], _maps([0, 0, 0, 0])[0], _maps([0, 0, 0, 0])[0]])
  empty = jnp.zeros_like(targets)
  # Found exactly on example 0, with one false-positive pixel on each of examples 1 and 2.
  found = jnp.stack([_maps([1, 1, 0, 0])[0], _maps([1, 0, 0, 0])[0], _maps([0, 1, 0, 0])[0]])
  # Per example (smooth 1): the detection scores (5/5 + 1/2 + 1/2) / 3 = 2/3, switching the
  # region off everywhere (1/3 + 1 + 1) / 3 = 7/9: the loss prefers the empty output.
  per_example = lambda p: float(losses.soft_dice_loss(probs=p, targets=targets))
  assert per_example(found) == pytest.approx(1 - 2 / 3)
  assert per_example(empty) == pytest.approx(1 - 7 / 9)
  # Batch Dice: one Dice over the batch, (2*2 + 1) / (4 + 2 + 1) = 5/7 for the detection, 1/3
  # for the empty output: the detection wins by far.
  batch = lambda p: float(losses.soft_dice_loss(probs=p, targets=targets, reduction="batch"))
  assert batch(found) == pytest.approx(1 - 5 / 7)
  assert batch(empty) == pytest.approx(1 - 1 / 3)
  with pytest.raises(ValueError, match="reduction"):
    losses.soft_dice_loss(probs=found, targets=targets, reduction="mean")


def test_modality_batch_dice_is_a_batch_dice_per_modality():
  # Examples 0 and 1 are modality 3, example 2 modality 0; 4 groups, 2 of them held.
  targets = jnp.stack([_maps([1, 1, 0, 0])[0], _maps([0, 0, 0, 0])[0], _maps([1, 1, 1, 0])[0]])
  groups = jnp.array([3, 3, 0])
  dice = lambda p: float(losses.soft_dice_loss(probs=p, targets=targets, groups=groups,
                                               num_groups=4, reduction="modality_batch"))
  # Modality 3 found exactly with one false positive on example 1: (2*2 + 1) / (2 + 1 + 2 + 1)
  # = 5/6; modality 0 missed entirely: 1 / (3 + 1) = 1/4. Mean over the two held: 13/24.
  found_missed = jnp.stack([targets[0], _maps([1, 0, 0, 0])[0], jnp.zeros_like(targets[2])])
  assert dice(found_missed) == pytest.approx(1 - (5 / 6 + 1 / 4) / 2)
  # Pooled over the whole batch, modality 0's miss costs less: (2*2 + 1) / (3 + 5 + 1) = 5/9.
  assert float(losses.soft_dice_loss(probs=found_missed, targets=targets, reduction="batch")) \
      == pytest.approx(1 - 5 / 9)
  # Everything found: loss 0; one group alone is the batch Dice of its examples.
  assert dice(targets) == pytest.approx(0.0)
  one = float(losses.soft_dice_loss(probs=found_missed[:2], targets=targets[:2],
                                    groups=groups[:2], num_groups=4, reduction="modality_batch"))
  assert one == pytest.approx(float(losses.soft_dice_loss(
      probs=found_missed[:2], targets=targets[:2], reduction="batch")))
  # Region weights weight the per-region means, as for the other reductions: a second region,
  # found everywhere, with weight 3 against 1 for the first.
  two = lambda x: jnp.concatenate([x, targets], axis=-1)
  weighted = float(losses.soft_dice_loss(probs=two(found_missed), targets=two(targets),
                                         groups=groups, num_groups=4, reduction="modality_batch",
                                         region_weights=(1.0, 3.0)))
  assert weighted == pytest.approx((1 - (5 / 6 + 1 / 4) / 2) / 4)
  with pytest.raises(ValueError, match="groups"):
    losses.soft_dice_loss(probs=targets, targets=targets, reduction="modality_batch")


def test_modality_batch_dice_over_devices_is_the_global_batch_dice():
  """With axis_name the per-modality sums run over the devices: loss and gradient on 2
  devices are the whole batch's (a modality on one device only still counts once)."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from uagan_jax import parallel  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  probs = jnp.asarray(rng.random((4, 3, 3, 3)), jnp.float32)
  targets = jnp.asarray(rng.random((4, 3, 3, 3)) > 0.6, jnp.float32)
  groups = jnp.array([0, 2, 2, 3])
  whole = lambda p: losses.soft_dice_loss(probs=p, targets=targets, groups=groups, num_groups=4,
                                          reduction="modality_batch")
  mesh = parallel.make_mesh(2)

  def per_device(p, t, g):
    return jax.value_and_grad(lambda q: losses.soft_dice_loss(
        probs=q, targets=t, groups=g, num_groups=4, reduction="modality_batch",
        axis_name=parallel.AXIS))(p)
  value, grad = jax.jit(jax.shard_map(per_device, mesh=mesh,
                                      in_specs=(P("data"), P("data"), P("data")),
                                      out_specs=(P(), P("data"))))(probs, targets, groups)
  np.testing.assert_allclose(value, whole(probs), rtol=1e-6)
  np.testing.assert_allclose(grad, jax.grad(whole)(probs), rtol=1e-5, atol=1e-7)
  assert abs(float(whole(probs)) - float(losses.soft_dice_loss(
      probs=probs, targets=targets, reduction="batch"))) > 1e-4


def test_present_dice_averages_only_the_examples_that_hold_the_region():
  # The batch of the test above: example 0 holds the region, examples 1 and 2 do not.
  targets = jnp.stack([_maps([1, 1, 0, 0])[0], _maps([0, 0, 0, 0])[0], _maps([0, 0, 0, 0])[0]])
  found = jnp.stack([_maps([1, 1, 0, 0])[0], _maps([1, 0, 0, 0])[0], _maps([0, 1, 0, 0])[0]])
  half = jnp.stack([_maps([1, 0, 0, 0])[0], _maps([1, 1, 1, 1])[0], _maps([0, 0, 0, 0])[0]])
  present = lambda p, t=targets: float(losses.soft_dice_loss(probs=p, targets=t,
                                                             reduction="present"))
  # Only example 0 counts: the detection's Dice there is 5/5, the empty output's 1/3 and a half
  # detection's (2 + 1) / (1 + 2 + 1) = 3/4, whatever the other examples' false positives.
  assert present(found) == pytest.approx(0.0)
  assert present(jnp.zeros_like(targets)) == pytest.approx(1 - 1 / 3)
  assert present(half) == pytest.approx(1 - 3 / 4)
  # Two holders average (example 1 now holds the region: all 4 pixels predicted, Dice
  # (2*2 + 1) / (4 + 2 + 1) = 5/7); a region no example holds adds loss 0 and no gradient.
  two = jnp.stack([targets[0], targets[0], targets[2]])
  assert present(half, two) == pytest.approx(1 - (3 / 4 + 5 / 7) / 2)
  none = jnp.zeros_like(targets)
  assert present(found, none) == 0.0
  grad = jax.grad(lambda p: losses.soft_dice_loss(probs=p, targets=none, reduction="present"))(
      found)
  np.testing.assert_array_equal(grad, 0.0)


def test_present_dice_over_devices_is_the_global_batch_mean():
  """With axis_name, the mean over the holding examples of all devices (2 devices, one holder
  on one of them, three on the other: not the mean of the two devices' means)."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from uagan_jax import parallel  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  probs = jnp.asarray(rng.random((4, 3, 3, 2)), jnp.float32)
  targets = np.zeros((4, 3, 3, 2), np.float32)
  targets[1, 1, 1, 0] = targets[2, 0, :, 0] = targets[3, :, 2, 0] = targets[2, 1, 1, 1] = 1.0
  targets = jnp.asarray(targets)
  whole = lambda p: losses.soft_dice_loss(probs=p, targets=targets, reduction="present")
  mesh = parallel.make_mesh(2)

  def per_device(p, t):
    return jax.value_and_grad(lambda q: losses.soft_dice_loss(
        probs=q, targets=t, reduction="present", axis_name=parallel.AXIS))(p)
  value, grad = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")),
                                      out_specs=(P(), P("data"))))(probs, targets)
  np.testing.assert_allclose(value, whole(probs), rtol=1e-6)
  np.testing.assert_allclose(grad, jax.grad(whole)(probs), rtol=1e-5, atol=1e-7)


def test_batch_dice_over_devices_is_the_global_batch_dice():
  """With axis_name the sums run over the devices too: the loss and its gradient on 2 devices
  are those of the whole batch on one (the step averages per-device gradients: x 2 / 2)."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from uagan_jax import parallel  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  probs = jnp.asarray(rng.random((4, 3, 3, 3)), jnp.float32)
  targets = jnp.asarray(rng.random((4, 3, 3, 3)) > 0.6, jnp.float32)
  whole = lambda p: losses.soft_dice_loss(probs=p, targets=targets, reduction="batch")
  mesh = parallel.make_mesh(2)

  def per_device(p, t):
    value, grad = jax.value_and_grad(lambda q: losses.soft_dice_loss(
        probs=q, targets=t, reduction="batch", axis_name=parallel.AXIS))(p)
    return value, grad
  value, grad = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")),
                                      out_specs=(P(), P("data"))))(probs, targets)
  np.testing.assert_allclose(value, whole(probs), rtol=1e-6)
  np.testing.assert_allclose(grad, jax.grad(whole)(probs), rtol=1e-5, atol=1e-7)
  # Without the axis each device would pool its own half only: another loss.
  local = jax.jit(jax.shard_map(
      lambda p, t: jax.lax.pmean(losses.soft_dice_loss(probs=p, targets=t, reduction="batch"),
                                 parallel.AXIS),
      mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P()))(probs, targets)
  assert abs(float(local) - float(whole(probs))) > 1e-4


def test_binary_cross_entropy_hand_computed():
  # logits [0, 2], targets [1, 0]: (log 2 + log(1 + e^2)) / 2.
  expected = (np.log(2.0) + np.log1p(np.exp(2.0))) / 2
  loss = losses.binary_cross_entropy(logits=jnp.array([0.0, 2.0]), targets=jnp.array([1.0, 0.0]))
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  # Extreme logits stay finite (computed from logits, not from saturated probabilities).
  assert np.isfinite(float(losses.binary_cross_entropy(logits=jnp.array([-200.0]),
                                                       targets=jnp.array([1.0]))))


def test_clip_weights():
  params = {"a": jnp.array([-1.0, 0.01, 2.0]), "b": {"c": jnp.array([0.049, -0.06])}}
  clipped = losses.clip_weights(params, limit=0.05)
  np.testing.assert_allclose(clipped["a"], [-0.05, 0.01, 0.05])
  np.testing.assert_allclose(clipped["b"]["c"], [0.049, -0.05])


def test_gradient_penalty_linear_critic_known_norm():
  # f(x) = <w, x> has gradient w everywhere: ||w|| = 5, penalty (5 - 1)^2 = 16 for any alpha.
  w = jnp.array([3.0, 4.0])
  real = jnp.array([[1.0, 2.0], [5.0, -1.0]])
  fake = jnp.zeros_like(real)
  for alpha in ([0.0, 1.0], [0.3, 0.7]):
    penalty = losses.gradient_penalty(critic_fn=lambda x: x @ w, real=real, fake=fake,
                                      alpha=jnp.array(alpha))
    assert float(penalty) == pytest.approx(16.0, rel=1e-5)


def test_gradient_penalty_quadratic_critic_depends_on_interpolate():
  # f(x) = ||x||^2 / 2 has gradient x: at alpha=1 the interpolate is real=[3,4] (norm 5 ->
  # 16); at alpha=0.5 it is [1.5,2] (norm 2.5 -> 2.25). Mean 9.125.
  real = jnp.array([[3.0, 4.0], [3.0, 4.0]])
  fake = jnp.zeros_like(real)
  penalty = losses.gradient_penalty(critic_fn=lambda x: 0.5 * jnp.sum(x * x, axis=-1), real=real,
                                    fake=fake, alpha=jnp.array([1.0, 0.5]))
  assert float(penalty) == pytest.approx(9.125, rel=1e-5)


# --- StarGAN / UAGAN losses --------------------------------------------------------------------


def test_wgan_critic_and_generator_losses_hand_computed():
  # mean(real) = (1 + 2 + 3) / 3 = 2; mean(fake) = (0.5 + 1.5) / 2 = 1.  Critic: 1 - 2 = -1.
  real = jnp.array([1.0, 2.0, 3.0])
  fake = jnp.array([[0.5], [1.5]])
  assert float(losses.wgan_critic_loss(real_scores=real, fake_scores=fake)) == pytest.approx(-1.0)
  # Generator: -mean(fake) = -1.
  assert float(losses.wgan_generator_loss(fake_scores=fake)) == pytest.approx(-1.0)
  # A PatchGAN map counts every patch: mean of [[1, 2], [3, 6]] = 3, so the generator loss is -3.
  patches = jnp.array([[1.0, 2.0], [3.0, 6.0]]).reshape(1, 2, 2, 1)
  assert float(losses.wgan_generator_loss(fake_scores=patches)) == pytest.approx(-3.0)
  # Equal distributions of scores: the critic loss is 0.
  assert float(losses.wgan_critic_loss(real_scores=real, fake_scores=real)) == 0.0


def test_wgan_critic_loss_gradient_pushes_real_up_and_fake_down():
  # d/d real_i = -1/3 and d/d fake_j = +1/2: descending raises real scores, lowers fake ones.
  g_real, g_fake = jax.grad(
      lambda r, f: losses.wgan_critic_loss(real_scores=r, fake_scores=f), argnums=(0, 1))(
          jnp.zeros(3), jnp.zeros(2))
  np.testing.assert_allclose(g_real, [-1 / 3] * 3, rtol=1e-6)
  np.testing.assert_allclose(g_fake, [0.5] * 2, rtol=1e-6)


def test_modality_classification_loss_hand_computed():
  # Logits [1, 0, 0, 0]: softmax = [e, 1, 1, 1] / (e + 3).
  #   Label 0: -log(e / (e + 3)) = log(e + 3) - 1.   Label 1: -log(1 / (e + 3)) = log(e + 3).
  logits = jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
  labels = jnp.array([0, 1])
  expected = (np.log(np.e + 3) - 1 + np.log(np.e + 3)) / 2
  assert float(losses.modality_classification_loss(logits=logits, labels=labels)) == \
      pytest.approx(expected, rel=1e-6)
  # Uniform logits: log(4) whatever the label.
  assert float(losses.modality_classification_loss(logits=jnp.zeros((3, 4)),
                                                   labels=jnp.array([0, 2, 3]))) == \
      pytest.approx(np.log(4.0), rel=1e-6)


def test_modality_classification_loss_one_hot_like_logits():
  # A confident correct logit costs ~0 (log(1 + 3 e^-50)); a confident wrong one costs ~50
  # (log(e^50 + 3) - 0), and stays finite.
  logits = jnp.array([[50.0, 0.0, 0.0, 0.0]])
  right = losses.modality_classification_loss(logits=logits, labels=jnp.array([0]))
  wrong = losses.modality_classification_loss(logits=logits, labels=jnp.array([2]))
  assert float(right) == pytest.approx(0.0, abs=1e-6)
  assert float(wrong) == pytest.approx(50.0, rel=1e-6)


def test_cycle_loss_hand_computed_and_zero_for_identical():
  # |[1, -1] - [0, 1]| = [1, 2], mean 1.5.
  original = jnp.array([[1.0, -1.0]])
  assert float(losses.cycle_loss(original=original, reconstructed=jnp.array([[0.0, 1.0]]))) == \
      pytest.approx(1.5)
  image = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32)
  assert float(losses.cycle_loss(original=image, reconstructed=image)) == 0.0


def test_identity_loss_hand_computed_and_zero_for_a_copy():
  # |[0.5, -0.5, 0] - [0, 0, 0.3]| = [0.5, 0.5, 0.3], mean 1.3 / 3.
  original = jnp.array([[0.5, -0.5, 0.0]])
  assert float(losses.identity_loss(original=original, same_domain=jnp.array([[0.0, 0.0, 0.3]]))) \
      == pytest.approx(1.3 / 3)
  image = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 1)), jnp.float32)
  assert float(losses.identity_loss(original=image, same_domain=image)) == 0.0


def test_shape_loss_hand_computed():
  # One example, one region, two pixels: logits [0, 0], targets [1, 0].
  #   BCE: log 2 per pixel, mean log 2.
  #   Dice: probs [0.5, 0.5], (2 * 0.5 + 1) / (1 + 1 + 1) = 2/3, loss 1/3.
  logits = jnp.zeros((1, 1, 2, 1))
  targets = jnp.array([1.0, 0.0]).reshape(1, 1, 2, 1)
  assert float(losses.shape_loss(logits_translated=logits, targets=targets)) == \
      pytest.approx(np.log(2.0) + 1 / 3, rel=1e-6)


def test_shape_loss_orders_perfect_uncertain_opposite():
  targets = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)) > 0.5, jnp.float32)
  score = lambda logits: float(losses.shape_loss(logits_translated=logits, targets=targets))
  perfect = score(20.0 * (2 * targets - 1))
  uncertain = score(jnp.zeros_like(targets))
  opposite = score(-20.0 * (2 * targets - 1))
  assert perfect == pytest.approx(0.0, abs=1e-6)
  assert perfect < uncertain < opposite
  # The opposite prediction: BCE ~20 per pixel, Dice of disjoint maps ~1.
  assert opposite == pytest.approx(21.0, rel=1e-2)


@pytest.mark.parametrize("step,expected", [
    (0, 0.0),      # start of the ramp
    (25, 0.5),     # a quarter of 2.0
    (50, 1.0),     # midway
    (100, 2.0),    # end
    (1000, 2.0),   # beyond: held at max
    (-5, 0.0),     # before the start: never negative
])
def test_ramp_weight(step, expected):
  assert float(losses.ramp_weight(step, max_weight=2.0, ramp_steps=100)) == pytest.approx(expected)


def test_ramp_weight_zero_steps_is_max_at_once():
  assert float(losses.ramp_weight(0, max_weight=3.0, ramp_steps=0)) == 3.0
  assert float(losses.ramp_weight(jnp.array(7), max_weight=3.0, ramp_steps=0)) == 3.0


def test_ramp_weight_under_jit_with_traced_step():
  ramp = jax.jit(lambda step: losses.ramp_weight(step, max_weight=2.0, ramp_steps=100))
  for step, expected in [(0, 0.0), (50, 1.0), (100, 2.0), (150, 2.0)]:
    weight = ramp(jnp.array(step, jnp.int32))
    assert weight.dtype == jnp.float32 and weight.shape == ()
    assert float(weight) == pytest.approx(expected)


def test_gradient_penalty_on_stargan_discriminator_src_head():
  model = Discriminator(base_features=4, num_layers=3)
  rng = np.random.default_rng(0)
  real, fake = (jnp.asarray(rng.standard_normal((3, 32, 32, 1)), jnp.float32) for _ in range(2))
  alpha = jnp.asarray(rng.uniform(size=3), jnp.float32)
  # An "rbg" key: XLA on CPU compiles threefry's rounds for every parameter slowly.
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), real)

  def critic_fn(x):
    src, _ = model.apply(variables, x)
    return jnp.sum(src, axis=(1, 2, 3))  # one score per example, as the penalty requires

  penalty_fn = jax.jit(lambda r, f, a: losses.gradient_penalty(critic_fn=critic_fn, real=r,
                                                               fake=f, alpha=a))
  penalty = penalty_fn(real, fake, alpha)
  assert penalty.shape == ()
  assert np.isfinite(float(penalty)) and float(penalty) >= 0.0
  # No normalisation in the discriminator, so examples are independent: the batch penalty is the
  # mean of the per-example penalties.
  singles = jax.vmap(lambda r, f, a: penalty_fn(r[None], f[None], a[None]))(real, fake, alpha)
  assert float(penalty) == pytest.approx(float(jnp.mean(singles)), rel=1e-4)
  assert not np.allclose(singles, singles[0])  # the examples really differ


# ------------------------------------------------------------------------------------------------
# The papers' recipes (configs/*.py:paper): SegAN's concatenated L1, UAGAN's weighted cross-entropy,
# per-region weights, the learning-rate schedules.
# ------------------------------------------------------------------------------------------------


def test_multiscale_l1_concatenated_pools_every_element_as_segans_code():
  # Scale 0: |[1,1] - [0,0]| sums to 2 over 2 elements; scale 1: |[3] - [0]| = 3 over 1 element.
  # Weights (1, 2): concatenated (1 * 2 + 2 * 3) / 3 = 8/3; per scale (1 * 1 + 2 * 3) / 2 = 3.5.
  a = [jnp.array([[1.0, 1.0]]), jnp.array([[3.0]])]
  b = [jnp.zeros((1, 2)), jnp.zeros((1, 1))]
  assert float(losses.multiscale_l1(features_a=a, features_b=b, scale_weights=(1.0, 2.0),
                                    pooling="concatenated")) == pytest.approx(8 / 3)
  assert float(losses.multiscale_l1(features_a=a, features_b=b, scale_weights=(1.0, 2.0))) == \
      pytest.approx(3.5)
  with pytest.raises(ValueError, match="pooling"):
    losses.multiscale_l1(features_a=a, features_b=b, pooling="sum")


def test_class_weighted_cross_entropy_hand_computed():
  # Two pixels with logit ln 3 (p = 0.75): a tumour one (nll -ln 0.75) and a background one
  # (nll -ln 0.25 = ln 4). Weights (0.02, 0.98) sum to 1 over the two: 0.98 * -ln 0.75 + 0.02 ln 4.
  logits = _maps([np.log(3.0), np.log(3.0)])
  targets = _maps([1.0, 0.0])
  expected = 0.98 * -np.log(0.75) + 0.02 * np.log(4.0)
  value = losses.class_weighted_cross_entropy(logits=logits, targets=targets,
                                              class_weights=(0.02, 0.98))
  assert float(value) == pytest.approx(expected, rel=1e-6)
  # Equal class weights: the plain mean binary cross-entropy.
  assert float(losses.class_weighted_cross_entropy(
      logits=logits, targets=targets, class_weights=(1.0, 1.0))) == pytest.approx(
          float(losses.binary_cross_entropy(logits=logits, targets=targets)), rel=1e-6)


def test_class_weighted_cross_entropy_equals_two_class_softmax_cross_entropy():
  # UAGAN's code: F.cross_entropy(outputs [B,2,H,W], targets, weight) = sum w_y nll / sum w_y.
  # A sigmoid of z is the softmax of (0, z), so the two agree.
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 3, 3, 1)).astype(np.float32)
  t = (rng.random((2, 3, 3, 1)) > 0.5).astype(np.float32)
  w = np.array([0.02, 0.98])
  two_class = np.concatenate([np.zeros_like(z), z], axis=-1)
  log_softmax = two_class - np.log(np.exp(two_class).sum(-1, keepdims=True))
  labels = t[..., 0].astype(int)
  nll = -np.take_along_axis(log_softmax, labels[..., None], -1)[..., 0]
  expected = (w[labels] * nll).sum() / w[labels].sum()
  value = losses.class_weighted_cross_entropy(logits=jnp.asarray(z), targets=jnp.asarray(t),
                                              class_weights=tuple(w))
  assert float(value) == pytest.approx(expected, rel=1e-5)


def test_region_weights_train_only_the_weighted_regions():
  # Three regions, one pixel each: WT perfect, TC and ET wrong.
  probs = jnp.asarray([1.0, 1.0, 0.0]).reshape(1, 1, 1, 3)
  targets = jnp.asarray([1.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
  # Dice per region: WT (2 + 1) / (2 + 1) = 1, TC 1 / (1 + 1) = 0.5, ET 1 / (1 + 1) = 0.5.
  assert float(losses.soft_dice_loss(probs=probs, targets=targets)) == pytest.approx(1 - 2 / 3)
  assert float(losses.soft_dice_loss(probs=probs, targets=targets,
                                     region_weights=(1.0, 0.0, 0.0))) == pytest.approx(0.0)
  assert float(losses.soft_dice_loss(probs=probs, targets=targets,
                                     region_weights=(1.0, 1.0, 0.0))) == pytest.approx(0.25)
  logits = jnp.asarray([0.0, 2.0, -1.0]).reshape(1, 1, 1, 3)
  per_region = [np.log(2.0), np.log1p(np.exp(2.0)), np.log1p(np.exp(1.0))]
  assert float(losses.binary_cross_entropy(logits=logits, targets=targets,
                                           region_weights=(1.0, 0.0, 0.0))) == \
      pytest.approx(per_region[0], rel=1e-6)
  assert float(losses.binary_cross_entropy(logits=logits, targets=targets,
                                           region_weights=(1.0, 0.0, 3.0))) == \
      pytest.approx((per_region[0] + 3 * per_region[2]) / 4, rel=1e-6)
  # Gradients reach only the weighted region.
  grads = jax.grad(lambda x: losses.class_weighted_cross_entropy(
      logits=x, targets=targets, class_weights=(0.02, 0.98), region_weights=(1.0, 0.0, 0.0)))(logits)
  assert float(grads[..., 0].squeeze()) != 0.0
  assert np.all(np.asarray(grads[..., 1:]) == 0.0)
  # The shape loss takes them too: BCE + Dice of WT alone.
  assert float(losses.shape_loss(logits_translated=logits, targets=targets,
                                 region_weights=(1.0, 0.0, 0.0))) == pytest.approx(
      per_region[0] + 1 - (2 * 0.5 + 1) / (0.5 + 1 + 1), rel=1e-6)


def test_staircase_schedule_is_todays_decay():
  from uagan_jax.families import shared  # pylint: disable=g-import-not-at-top
  from conftest import load_test_config  # pylint: disable=g-import-not-at-top
  config = load_test_config("--config.optim.decay_every=10", "--config.optim.decay_rate=0.5")
  assert config.optim.schedule == "staircase"  # the default
  schedule = shared.learning_rate(config, 2e-4)
  for step in (0, 9, 10, 11, 25, 1000):
    assert float(schedule(step)) == pytest.approx(2e-4 * 0.5 ** (step // 10), rel=1e-6)
  # The optax function the trainer built before the schedule key existed, bit for bit.
  before = __import__("optax").exponential_decay(2e-4, transition_steps=10, decay_rate=0.5,
                                                 staircase=True)
  for step in (0, 9, 10, 11, 25, 1000):
    assert float(schedule(step)) == float(before(step))
  # decay_every 0: the constant itself, as before.
  assert shared.learning_rate(load_test_config(), 2e-4) == 2e-4


def test_linear_schedule_hand_computed():
  from uagan_jax.families import shared  # pylint: disable=g-import-not-at-top
  from conftest import load_test_config  # pylint: disable=g-import-not-at-top
  config = load_test_config("--config.optim.schedule=linear", "--config.optim.decay_start=60",
                            "--config.optim.decay_end=100",
                            "--config.optim.decay_final_fraction=0.01")
  schedule = shared.learning_rate(config, 1e-4)
  # Constant to step 60, then down by (1e-4 - 1e-6) / 40 a step, 1e-6 from step 100 on.
  for step, expected in ((0, 1e-4), (60, 1e-4), (70, 1e-4 - 10 * 99e-6 / 40),
                         (80, (1e-4 + 1e-6) / 2), (100, 1e-6), (500, 1e-6)):
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
