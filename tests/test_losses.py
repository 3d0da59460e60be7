"""Each loss against a value computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uagan_jax import losses


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
