"""The PyTorch twins of benchmarks/compare_torch.py match the project's Flax networks.

Runs only where the optional extra is installed (``pip install -e '.[torch]'``); CI skips it.
Per family, at the test config's sizes and with each option the recipes use, every role's
parameter count and output shapes equal the Flax network's, and one twin step runs and moves
every network's parameters.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import TEST_CONFIG  # pylint: disable=g-import-not-at-top,wrong-import-position

from uagan_jax import config as config_lib  # pylint: disable=wrong-import-position
from uagan_jax import families, train_state  # pylint: disable=wrong-import-position

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import torch_twins  # pylint: disable=g-import-not-at-top,wrong-import-position

CASES = {
    "segan": ("", []),
    "unet": ("unet", []),
    "stargan": ("stargan", []),
    "stargan_published": ("stargan", ["--config.model.generator_norm=instance",
                                      "--config.model.generator_output=tanh",
                                      "--config.model.discriminator_per_modality=false"]),
    "uagan": ("uagan", []),
    "uagan_recipe": ("uagan", ["--config.model.generator_pair_heads=true",
                               "--config.model.fuse_reverse_stop_gradient=true",
                               "--config.model.generator_output=residual"]),
    "uagan_no_fuse": ("uagan", ["--config.model.fuse=false", "--config.model.fuse_reverse=false",
                                "--config.model.fuse_reverse_stop_gradient=false"]),
    "segan_deeper": ("", ["--config.model.segmentor_features=(4,8,16)",
                          "--config.model.critic_features=(4,8,16)"]),
}


def load(case: str):
  variant, overrides = CASES[case]
  return config_lib.load_config(TEST_CONFIG + (f":{variant}" if variant else ""), overrides)


def flax_variables(config):
  """Every role's initialised variables (the project's own initialisation)."""
  networks = train_state.build_networks(config, bn_axis_name=None)
  state = train_state.create_train_state(config, networks)
  return networks, {role: {"params": net.params, "batch_stats": net.batch_stats}
                    for role, net in state.nets.items()}


def count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def inputs(config, batch: int = 2):
  height, width = config.data.image_size
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (batch, height, width, 1)).astype(np.float32)
  regions = (rng.random((batch, height, width, 3)) > 0.7).astype(np.float32)
  source = np.array([0, 3][:batch] + [1] * max(0, batch - 2), np.int32)
  target = (source + 1) % 4
  return image, regions, source, target


def nchw(array) -> tuple[int, ...]:
  """A Flax NHWC output's shape as PyTorch's NCHW."""
  shape = tuple(array.shape)
  return (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else shape


def tensor(array):
  array = np.asarray(array)
  if array.ndim == 4:
    array = array.transpose(0, 3, 1, 2)
  return torch.from_numpy(np.ascontiguousarray(array))


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_counts_equal(case):
  config = load(case)
  _, variables = flax_variables(config)
  twins = torch_twins.build_networks(config)
  assert sorted(twins) == sorted(families.get(config.model.name).roles)
  for role, module in twins.items():
    flax_count = count(variables[role]["params"])
    torch_count = sum(p.numel() for p in module.parameters())
    assert torch_count == flax_count, (role, torch_count, flax_count)


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_shapes_equal(case):
  config = load(case)
  networks, variables = flax_variables(config)
  twins = torch_twins.build_networks(config)
  image, regions, source, target = inputs(config)
  per_modality = config.model.discriminator_per_modality
  for role, module in twins.items():
    module.train()
    flax_module, flax_vars = networks[role], variables[role]
    if role == "segmentor":
      flax_out = flax_module.apply(flax_vars, image, source, train=False)
      torch_out = module(tensor(image), tensor(source))
    elif role == "critic":
      masked = image * regions
      flax_out, _ = flax_module.apply(flax_vars, masked, mutable=["batch_stats"])
      torch_out = module(tensor(masked))
    elif role == "generator":
      flax_out = flax_module.apply(flax_vars, image, target)
      torch_out = module(tensor(image), tensor(target))
    elif role == "discriminator":
      modality = target if per_modality else None
      flax_out = flax_module.apply(flax_vars, image, modality)
      torch_out = module(tensor(image), None if modality is None else tensor(modality))
    else:  # unified
      flax_out = flax_module.apply(flax_vars, image, source, target, train=False)
      torch_out = module(tensor(image), tensor(source), tensor(target))
    flax_shapes = [nchw(x) for x in jax.tree.leaves(flax_out)]
    torch_shapes = [tuple(t.shape) for t in jax.tree.leaves(
        torch_out, is_leaf=lambda x: isinstance(x, torch.Tensor))]
    assert torch_shapes == flax_shapes, role


@pytest.mark.parametrize("case", ["segan", "unet", "stargan", "uagan"])
def test_twin_step_moves_every_network(case):
  config = load(case)
  twin = torch_twins.TorchStep(config)
  image, regions, source, _ = inputs(config, batch=4)
  batch = {"image": tensor(image), "regions": tensor(regions),
           "modality": torch.from_numpy(source).long()}
  before = {role: [p.detach().clone() for p in net.parameters()]
            for role, net in twin.nets.items()}
  for _ in range(config.train.n_critic):  # the generators learn on the n_critic-th step
    twin.step(batch)
  for role, net in twin.nets.items():
    moved = sum(not torch.equal(a, b) for a, b in zip(before[role], net.parameters()))
    assert moved > 0, role
    for p in net.parameters():
      assert torch.isfinite(p).all(), role
