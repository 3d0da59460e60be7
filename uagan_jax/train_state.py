"""The train state: one pytree with every network's parameters, statistics and optimizer state.

Also what a step's phases take besides the state: `StepInputs` and the per-example random streams.

A model family (`uagan_jax.families`) says which networks it trains; this module builds them
(`build_networks`), initialises them from the seed (`create_train_state`), and gives the state's
shapes without computing it (`abstract_state`, the restore target of a checkpoint). The state's
layout is what checkpoints store: ``TrainState(step, rng, nets={role: NetState})``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from uagan_jax import families, parallel


@dataclasses.dataclass(frozen=True)
class InitSpec:
  """How one network is initialised: ``module.init(key, *args, **kwargs)``.

  ``keep_batch_stats=False`` for a network whose BatchNorm normalises with the current batch
  only (SegAN's critic): its running averages are never read, so the state does not carry them.
  """
  args: tuple
  kwargs: Mapping = dataclasses.field(default_factory=dict)
  keep_batch_stats: bool = True


@dataclasses.dataclass(frozen=True)
class Networks:
  """The modules and optimizers of one model family, by role; static, so bound, not traced.

  Roles: ``segmentor`` S and ``critic`` C (SegAN), ``generator`` G and ``discriminator`` D
  (StarGAN), ``unified`` (UAGAN's fused S + G, `models.uagan.UnifiedNet`); a family uses the
  roles its `families.Family` entry lists, in that order.
  """
  modules: Mapping[str, nn.Module]
  optimizers: Mapping[str, optax.GradientTransformation]

  def __getitem__(self, role: str) -> nn.Module:
    return self.modules[role]

  def __contains__(self, role: str) -> bool:
    return role in self.modules


def build_networks(config: ml_collections.ConfigDict, *,
                   bn_axis_name: str | None = parallel.AXIS) -> Networks:
  """Modules and optimizers for ``config.model.name``, from its family module.

  Args:
    config: the run's config.
    bn_axis_name: axis for cross-device BatchNorm statistics: ``"data"`` inside the step,
      ``None`` for initialisation and inference outside any mapped context.
  """
  family = families.implementation(config.model.name)
  return family.build_networks(config, bn_axis_name=bn_axis_name)


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


# Independent random streams derived from each example's key: `stream(example_keys, TAG)`.
AUGMENT_STREAM, PENALTY_STREAM, TARGET_STREAM, DISC_PENALTY_STREAM = 1, 2, 3, 4


@struct.dataclass
class StepInputs:
  """One device's shard of the batch, as a family's training phases see it."""
  image: jax.Array  # [b, H, W, 1] z-scored (and augmented)
  regions: jax.Array  # [b, H, W, 3]
  modality: jax.Array  # [b] source modality ids
  example_keys: jax.Array  # [b] one key per example, from its global index
  # [b, H, W, 1] the batch as read, before data.augment (for data.augment_discriminator_real);
  # a family that does not read it leaves the step's program as it was.
  unaugmented_image: jax.Array | None = None


def stream(example_keys: jax.Array, tag: int) -> jax.Array:
  """Per-example keys of one random stream (one of the ``*_STREAM`` tags)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, tag))(example_keys)


def unmapped_module(module: nn.Module) -> nn.Module:
  """The same module without a BatchNorm axis, for use outside the data-parallel step."""
  return module.clone(bn_axis_name=None) if hasattr(module, "bn_axis_name") else module


def create_train_state(config: ml_collections.ConfigDict, networks: Networks) -> TrainState:
  """Initialises every network from ``config.seed`` (pure: jit it with output shardings)."""
  base_key = jax.random.key(config.seed)
  init_key = jax.random.fold_in(base_key, -1 & 0xFFFFFFFF)  # never a training step's key
  roles = families.get(config.model.name).roles
  specs = families.implementation(config.model.name).init_specs(config, networks)
  keys = jax.random.split(init_key, max(2, len(roles)))
  nets = {}
  for key, role in zip(keys, roles):
    spec = specs[role]
    variables = unmapped_module(networks[role]).init(key, *spec.args, **spec.kwargs)
    batch_stats = variables.get("batch_stats", {}) if spec.keep_batch_stats else {}
    nets[role] = NetState(params=variables["params"], batch_stats=batch_stats,
                          opt_state=networks.optimizers[role].init(variables["params"]))
  return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(base_key), nets=nets)


def abstract_state(config: ml_collections.ConfigDict) -> TrainState:
  """Shapes, dtypes and one-device shardings of the train state, without computing it.

  A restore target for Orbax: `jax.eval_shape` gives it in well under a second, where running
  the initialisers (`init_state`) costs tens of seconds of XLA compilation on a CPU.
  """
  abstract = jax.eval_shape(functools.partial(create_train_state, config, build_networks(config)))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      abstract)


def abstract_variables(config: ml_collections.ConfigDict, role: str) -> dict:
  """``{"params", "batch_stats"}`` of one role's network as the train state holds them: shapes,
  dtypes and one-device shardings, tracing that network's initialiser alone (a restore target
  for part of a checkpoint, `checkpoint.Checkpointer.restore_part`)."""
  networks = build_networks(config)
  spec = families.implementation(config.model.name).init_specs(config, networks)[role]

  def variables(key):
    initial = unmapped_module(networks[role]).init(key, *spec.args, **spec.kwargs)
    return {"params": initial["params"],
            "batch_stats": initial.get("batch_stats", {}) if spec.keep_batch_stats else {}}

  abstract = jax.eval_shape(variables, jax.random.key(config.seed))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      abstract)


# XLA options for the initialisation program only. It runs once, so only its compile time counts:
# at LLVM optimisation level 1 it compiles 4-8x faster than at the default (uagan's test config
# 26 s -> 4.5 s on 2 cores), and its values are bit-identical (it is random-number generation
# and elementwise maps; checked for every recipe and variant, tests/test_train_state.py). Level 0
# is not: it changes the last bit of some initial weights.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init_state(config: ml_collections.ConfigDict, mesh) -> TrainState:
  """The initial state, created by one jitted program directly in its replicated placement."""
  networks = build_networks(config)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  initialise = jax.jit(functools.partial(create_train_state, config, networks),
                       out_shardings=sharding)
  return initialise.lower().compile(compiler_options=INIT_COMPILER_OPTIONS)()
