"""Shared fixtures. Four virtual CPU devices, so the data-parallel tests run on any machine.

The device count must be fixed before JAX starts, hence at import time of this file.
"""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_CONFIG = str(ROOT / "configs" / "test.py")
# The real UPENN-GBM case lives beside the checkout, never inside it.
REAL_CASE = ROOT.parent / "shared" / "data" / "upenn_gbm_00003_11"
SYNTH_SHAPE = (32, 32, 32)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> pathlib.Path:
  """Eight small synthetic BraTS-2021-layout cases (read-only: copy before corrupting)."""
  from uagan_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp("synth") / "data"
  synthetic.write_dataset(out, cases=8, seed=0, shape=SYNTH_SHAPE)
  return out


def load_test_config(*overrides: str, variant: str = ""):
  """configs/test.py[:variant] with ``--config.a.b=value`` overrides."""
  from uagan_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  spec = f"{TEST_CONFIG}:{variant}" if variant else TEST_CONFIG
  return config_lib.load_config(spec, list(overrides))
