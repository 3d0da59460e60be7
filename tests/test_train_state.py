"""`uagan_jax/train_state.py`: the initial state from the seed, its abstract twin (the restore
target), the roles each family trains, and the per-example random streams."""

import functools

import jax
import numpy as np
import pytest

from uagan_jax import families, parallel, train_state

from conftest import ROOT, TEST_CONFIG, load_test_config

# configs/test.py's variants and the family each one trains.
VARIANTS = {"": "segan", "unet": "unet", "stargan": "stargan", "uagan": "uagan"}
VARIANT_IDS = [variant or "segan" for variant in VARIANTS]


@functools.lru_cache(maxsize=None)
def _initial(variant: str, seed: int = 0):
  """The real initial state (host arrays) of configs/test.py[:variant] with ``seed``."""
  config = load_test_config(f"--config.seed={seed}", variant=variant)
  return jax.device_get(train_state.init_state(config, parallel.make_mesh(1)))


def _leaves_equal(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
      np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_abstract_state_has_the_real_states_structure_shapes_and_dtypes(variant):
  abstract = train_state.abstract_state(load_test_config(variant=variant))
  real = _initial(variant)
  assert jax.tree.structure(abstract) == jax.tree.structure(real)
  abstract_leaves = jax.tree_util.tree_leaves_with_path(abstract)
  for (path, a), r in zip(abstract_leaves, jax.tree.leaves(real), strict=True):
    where = jax.tree_util.keystr(path)
    assert isinstance(a, jax.ShapeDtypeStruct), where
    assert (a.shape, a.dtype) == (np.shape(r), np.asarray(r).dtype), where
    # A one-device restore target.
    assert a.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0]), where


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_the_states_roles_are_the_familys_roles(variant):
  config = load_test_config(variant=variant)
  assert config.model.name == VARIANTS[variant]
  roles = families.get(config.model.name).roles
  state = _initial(variant)
  assert len(state.nets) == len(roles) and set(state.nets) == set(roles)
  for role in roles:
    assert jax.tree.leaves(state.nets[role].params), role  # every role has parameters
    assert jax.tree.leaves(state.nets[role].opt_state), role
  assert int(state.step) == 0


def test_create_train_state_is_a_pure_function_of_the_seed():
  first = _initial("")
  config = load_test_config()
  again = _initial.__wrapped__("")  # a second, uncached computation
  assert _leaves_equal(first, again)  # bit-identical, not merely close
  other = _initial("", seed=1)
  assert jax.tree.structure(other) == jax.tree.structure(first)
  assert not np.array_equal(first.rng, other.rng)
  for role in first.nets:
    assert not _leaves_equal(first.nets[role].params, other.nets[role].params), role
  # The base key is the seed's key.
  np.testing.assert_array_equal(first.rng, jax.random.key_data(jax.random.key(config.seed)))


@pytest.mark.parametrize("variant", ["", "uagan"], ids=["segan", "uagan"])
def test_the_critic_keeps_no_batch_stats(variant):
  """The critic's BatchNorm normalises with the current batch only: no running averages kept."""
  config = load_test_config(variant=variant)
  assert config.model.critic_norm == "batch"
  state = _initial(variant)
  assert state.nets["critic"].batch_stats == {}
  # Its module does have BatchNorm statistics, so the state really drops them...
  networks = train_state.build_networks(config, bn_axis_name=None)
  spec = families.implementation(config.model.name).init_specs(config, networks)["critic"]
  variables = jax.eval_shape(lambda key: networks["critic"].init(key, *spec.args, **spec.kwargs),
                             jax.random.key(0))
  assert jax.tree.leaves(variables["batch_stats"])
  # ...while the segmenting network keeps its own.
  segmenting = "segmentor" if "segmentor" in state.nets else "unified"
  assert jax.tree.leaves(state.nets[segmenting].batch_stats)


def test_stream_gives_each_tag_its_own_keys():
  example_keys = jax.random.split(jax.random.key(0), 4)
  tags = (train_state.AUGMENT_STREAM, train_state.PENALTY_STREAM, train_state.TARGET_STREAM,
          train_state.DISC_PENALTY_STREAM)
  assert len(set(tags)) == len(tags)
  data = {tag: np.asarray(jax.random.key_data(train_state.stream(example_keys, tag)))
          for tag in tags}
  for tag, keys in data.items():
    assert keys.shape == np.asarray(jax.random.key_data(example_keys)).shape
    # Deterministic, one key per example, each the example's key folded with the tag.
    np.testing.assert_array_equal(
        keys, jax.random.key_data(train_state.stream(example_keys, tag)))
    assert len({k.tobytes() for k in keys}) == len(keys)
    for i, key in enumerate(example_keys):
      np.testing.assert_array_equal(keys[i], jax.random.key_data(jax.random.fold_in(key, tag)))
  # No key is shared between two streams (nor with the examples' own keys).
  all_keys = [k.tobytes() for keys in data.values() for k in keys]
  all_keys += [k.tobytes() for k in np.asarray(jax.random.key_data(example_keys))]
  assert len(set(all_keys)) == len(all_keys)


# XLA's default LLVM optimisation level, named: the tests run at 0 (tests/conftest.py), and the
# reference here must be what users get.
XLA_DEFAULT_LEVEL = {"xla_backend_optimization_level": 3}


def _init_at_both_levels(spec):
  """The initial state compiled as `init_state` compiles it and at XLA's default level."""
  from uagan_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(spec, [])
  mesh = parallel.make_mesh(0)
  fast = train_state.init_state(config, mesh)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  default = jax.jit(functools.partial(train_state.create_train_state, config,
                                      train_state.build_networks(config)),
                    out_shardings=sharding).lower().compile(compiler_options=XLA_DEFAULT_LEVEL)()
  return fast, default


@pytest.mark.parametrize("variant", ["unet", ""], ids=["unet", "segan"])
def test_the_init_program_at_its_lower_optimisation_level_gives_the_same_bits(variant):
  """`init_state` compiles at LLVM level 1 (several times faster): the same initial state, to
  the bit, as the default level."""
  fast, default = _init_at_both_levels(f"{TEST_CONFIG}:{variant}" if variant else TEST_CONFIG)
  assert _leaves_equal(fast, default)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [f"configs/{family}.py{variant}" for family in
                                  ("unet", "segan", "stargan", "uagan")
                                  for variant in ("", ":demo")] + ["configs/test.py:stargan",
                                                                   "configs/test.py:uagan"])
def test_every_recipes_init_program_gives_the_same_bits_at_the_lower_level(spec):
  fast, default = _init_at_both_levels(str(ROOT / spec))
  assert _leaves_equal(fast, default)
