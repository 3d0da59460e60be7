"""Model families: what each one is, in a table that imports no JAX, and the registry.

A family is one module (``uagan_jax/families/<name>.py``) that builds its networks and optimizers,
gives the example inputs that initialise them, runs its phases of the training step and, where it
does them, segments and translates (the protocol is spelt out in docs/ARCHITECTURE.md). This
package holds what the rest of the code asks about a family without building one: its roles (the
networks it trains, in initialisation order), whether it segments and translates, its config
checks. Config validation, the command line's help, the tests and the benchmarks read this table;
the loop, the step, inference, evaluation, predict and translate ask the family's module, never
its name.

Adding a family is one module plus one `register` call (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from uagan_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Family:
  """What a model family is, without building it.

  Attributes:
    name: ``config.model.name``.
    roles: The networks it trains, in initialisation order (keys of ``TrainState.nets``).
    segments: Whether it has a segmentation network (evaluate, validation, ``predict``).
    translates: Whether it has a translation network (``translate``, translation metrics).
    summary: One line for the command line's help.
    implementation: The module that builds and trains it: an import path (loaded on first use,
      so that this table stays free of JAX) or the module itself.
    checks: Functions ``check(config)`` that raise `UserError` for a config this family cannot
      run (called by `uagan_jax.config.validate` after the generic checks).
  """
  name: str
  roles: tuple[str, ...]
  segments: bool
  translates: bool
  summary: str
  implementation: str | ModuleType | Any
  checks: tuple[Callable[[Any], None], ...] = ()


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
  """Adds ``family`` to the table (a name registered again is replaced); returns it."""
  _REGISTRY[family.name] = family
  return family


def unregister(name: str) -> None:
  """Removes a family from the table (for tests that register a toy one)."""
  _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
  """Every registered family name, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> Family:
  """The family called ``name``; a `UserError` naming the known ones otherwise."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise UserError(f"config model.name={name!r}: unknown model family (known: "
                    f"{', '.join(_REGISTRY)})") from None


def with_capability(*, segments: bool | None = None,
                    translates: bool | None = None) -> tuple[str, ...]:
  """The names of the families that segment (``segments=True``) and/or translate."""
  return tuple(f.name for f in _REGISTRY.values()
               if (segments is None or f.segments == segments)
               and (translates is None or f.translates == translates))


def implementation(name: str) -> ModuleType | Any:
  """The module that builds and trains family ``name`` (imported on first use)."""
  impl = get(name).implementation
  return importlib.import_module(impl) if isinstance(impl, str) else impl


# ------------------------------------------------------------------------------------------------
# Config checks that belong to one family or a few (the generic ones are in config.validate).
# ------------------------------------------------------------------------------------------------


def _needs(config, key: str, families: Sequence[str], why: str) -> None:
  """UserError if the option ``key`` is switched on for a family outside ``families``."""
  group, option = key.split(".")
  if config[group][option] and config.model.name not in families:
    wanted = (f"={families[0]!r}" if len(families) == 1
              else " " + " or ".join(repr(f) for f in families))
    raise UserError(f"config {key}=true needs model.name{wanted} (got "
                    f"{config.model.name!r}): {why}")


def _check_uagan(config) -> None:
  if len(config.model.segmentor_features) < 2:
    raise UserError("config model.segmentor_features: uagan needs at least two levels")


def check_options_of_other_families(config) -> None:
  """Options that only one family reads, refused for the others (so no flag is ignored)."""
  _needs(config, "model.generator_pair_heads", ("uagan",),
         "only the unified network is told the source modality")
  if config.model.fuse_reverse_stop_gradient and not (config.model.name == "uagan"
                                                      and config.model.fuse
                                                      and config.model.fuse_reverse):
    raise UserError("config model.fuse_reverse_stop_gradient=true needs model.name='uagan' with "
                    "model.fuse=true and model.fuse_reverse=true (it changes the reverse gate)")
  _needs(config, "model.discriminator_per_modality", ("stargan", "uagan"),
         "only they have a discriminator")


register(Family(
    name="unet", roles=("segmentor",), segments=True, translates=False,
    summary="the segmentor alone, Dice + BCE (the U-Net-style baseline)",
    implementation="uagan_jax.families.unet"))
register(Family(
    name="segan", roles=("segmentor", "critic"), segments=True, translates=False,
    summary="SegAN: segmentor S + multi-scale L1 critic C, min-max",
    implementation="uagan_jax.families.segan"))
register(Family(
    name="stargan", roles=("generator", "discriminator"), segments=False, translates=True,
    summary="StarGAN: any-to-any modality translation, G + D (WGAN-GP, classes, cycle)",
    implementation="uagan_jax.families.stargan"))
register(Family(
    name="uagan", roles=("unified", "critic", "discriminator"), segments=True, translates=True,
    summary="UAGAN: translation and segmentation streams fused by attention, + C and D",
    implementation="uagan_jax.families.uagan", checks=(_check_uagan,)))
