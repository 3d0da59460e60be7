"""Shared fixtures. Four virtual CPU devices, so the data-parallel tests run on any machine.

The device count must be fixed before JAX starts, hence at import time of this file.
"""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the training processes they start) compile the same tiny programs; a
# compilation cache for this test run (fresh each run, inherited by subprocesses) compiles each
# once. A cached executable is the compiled program itself, so results are unchanged.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="uagan_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
# The suite compiles hundreds of small XLA programs and runs each a few times, so compiling is
# most of its time. At XLA:CPU's LLVM optimisation level 0 they compile about 40% faster
# (docs/PERFORMANCE.md, "The test suite"). The programs (their HLO: what is computed, fused and
# laid out) are those users run; only their machine code is less optimised, which can move the
# last bit of a float, and every comparison the tests make is between results of this one run.
# Inherited by subprocesses. UAGAN_JAX_TEST_XLA_DEFAULT=1 runs the suite at XLA's default level.
if ("xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")
    and not os.environ.get("UAGAN_JAX_TEST_XLA_DEFAULT")):
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
# Training prepares its data into a cache (uagan_jax/data/cache.py); the tests' caches live and
# die with the test run, never in the user's ~/.cache (inherited by subprocesses too).
if "UAGAN_JAX_CACHE" not in os.environ:
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ["UAGAN_JAX_CACHE"] = tempfile.mkdtemp(prefix="uagan_jax_test_data_cache_")
  atexit.register(shutil.rmtree, os.environ["UAGAN_JAX_CACHE"], ignore_errors=True)

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEST_CONFIG = str(ROOT / "configs" / "test.py")
# The real UPENN-GBM case lives beside the checkout, never inside it.
REAL_CASE = ROOT.parent / "shared" / "data" / "upenn_gbm_00003_11"
SYNTH_SHAPE = (32, 32, 32)


# The files that take longest, longest first (docs/PERFORMANCE.md, "The test suite", per file).
# pytest-xdist's --dist loadfile hands files to its workers in collection order; collected
# alphabetically, the longest file (test_train.py) comes near the end, and a long file handed out
# last keeps one worker busy while the other has nothing left. Longest first (the classic
# longest-processing-time rule), the short files fill in at the end. Only the order of whole
# files changes; within a file the tests keep theirs.
LONGEST_FILES_FIRST = ("test_train.py", "test_distributed.py", "test_cli.py",
                       "test_strided_conv.py", "test_faults.py", "test_predict.py",
                       "test_models_uagan.py", "test_families.py", "test_models_segan.py",
                       "test_mixed_precision.py", "test_tensorboard.py", "test_validation.py",
                       "test_study.py", "test_input_checks.py", "test_evaluate.py",
                       "test_train_state.py", "test_augment.py", "test_models_stargan.py",
                       "test_model_file.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


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


def random_train_batch(batch: int = 8, size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
  """A seeded random train-step batch: normal images, region maps ~30% on, modality ids."""
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(batch, size, size, 1)).astype(np.float32),
          "regions": (rng.random((batch, size, size, 3)) > 0.7).astype(np.float32),
          "modality": rng.integers(0, 4, batch).astype(np.int32)}


def one_step_on_two_devices(*overrides: str, variant: str = ""):
  """``(nets, metrics)`` after one configs/test.py[:variant] step (augmentation off, with
  ``overrides``) on a 2-device mesh from `random_train_batch`: for comparing implementations."""
  import jax  # pylint: disable=g-import-not-at-top
  from uagan_jax import parallel, train, train_state  # pylint: disable=g-import-not-at-top
  config = load_test_config("--config.data.augment=false", "--config.train.num_devices=2",
                            *overrides, variant=variant)
  mesh = parallel.make_mesh(2)
  state = train_state.init_state(config, mesh)
  step = train.make_step(config, mesh, donate=False)
  state, metrics = step(state, parallel.shard_batch(random_train_batch(), mesh),
                        jax.random.fold_in(state.base_key, 0))
  return jax.device_get((state.nets, metrics))


def assert_steps_agree(result, reference):
  """Two `one_step_on_two_devices` results equal to rounding: the metrics to 1e-4, the
  parameters to a few learning rates (after one Adam step a parameter moves by about the learning
  rate whatever its gradient's size, so rounding in a gradient near zero can flip a step's sign)."""
  import jax  # pylint: disable=g-import-not-at-top
  (nets, metrics), (nets_ref, metrics_ref) = result, reference
  assert set(metrics) == set(metrics_ref)
  for name in metrics_ref:
    np.testing.assert_allclose(metrics[name], metrics_ref[name], rtol=1e-4, atol=1e-6,
                               err_msg=name)
  assert jax.tree.structure(nets) == jax.tree.structure(nets_ref)
  for a, b in zip(jax.tree.leaves(nets), jax.tree.leaves(nets_ref)):
    np.testing.assert_allclose(a, b, rtol=0, atol=3e-3)


def assert_one_line_error(code, err, *needles):
  """What a user must see on bad input: exit 2, one ``error: ...`` line naming each needle."""
  assert code == 2
  assert "Traceback" not in err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith("error: ")
  for needle in needles:
    assert str(needle) in lines[0], lines[0]


def write_random_workdir(path, config, *, seed=0):
  """A training workdir (config.json + one checkpoint) with seeded random weights."""
  # pylint: disable=g-import-not-at-top
  import functools
  import jax
  from uagan_jax import checkpoint
  from uagan_jax import config as config_lib
  from uagan_jax import train_state
  # pylint: enable=g-import-not-at-top
  path.mkdir(parents=True)
  (path / "config.json").write_text(config_lib.to_json(config))
  abstract = jax.eval_shape(functools.partial(train_state.create_train_state, config,
                                              train_state.build_networks(config)))
  rng = np.random.default_rng(seed)

  def fill(key_path, leaf):
    names = [str(getattr(k, "name", getattr(k, "key", ""))) for k in key_path]
    if len(names) > 2 and names[2] == "params":  # nets/<role>/params/...
      return rng.normal(0.0, 0.1, leaf.shape).astype(leaf.dtype)
    if names[-1] == "var":  # BatchNorm running variances
      return np.ones(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  state = jax.device_put(jax.tree_util.tree_map_with_path(fill, abstract), jax.devices()[0])
  checkpoints = checkpoint.Checkpointer(path / "checkpoints", every=1, keep=1)
  checkpoints.save(1, state, force=True)
  checkpoints.close()
  return path


def run_cli(capsys, *argv):
  """Runs the command line in-process: (exit code, stdout, stderr)."""
  # pylint: disable=g-import-not-at-top
  from uagan_jax import cli
  code = cli.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


@pytest.fixture(scope="module")
def case_dir(synth_data):
  """The first synthetic case folder."""
  return sorted(p for p in synth_data.iterdir() if p.is_dir())[0]
