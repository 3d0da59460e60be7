"""Several processes, one program: joining them, who does what, and agreeing on things.

Every process runs the same training command (one per GPU, one per TPU VM worker, or several on
one machine). `initialize` joins them with `jax.distributed.initialize`; from then on
``jax.devices()`` lists every process's devices and the step runs over all of them. Each
process loads only its rows of the global batch (`parallel.process_rows`); all join the Orbax
saves and restores; process 0 alone writes logs, JSON rows, figures and reports (`is_main`).

Collectives must run in the same order on every process, or the processes hang. What could
differ between them is agreed on explicitly and cheaply: the resolved config (`check_same_config`,
once, at start), a stop request (`any_process`, at log steps), a validation score
(`broadcast_from_main`); long waits for process 0 alone (preparing the data cache, the final
evaluation) use the coordination service's barrier, which has a timeout (`wait_for_all`).

With one process (no ``--distributed``) every function here is a no-op or a constant.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading

import jax
import numpy as np

from uagan_jax.errors import UserError

# How long the other processes wait for process 0 at a barrier (preparing the data cache, the
# final evaluation): longer than any of those takes, short enough that a lost process 0 ends the
# job rather than holding its nodes for ever.
BARRIER_TIMEOUT_S = 6 * 3600
# JAX's own join timeout is set this much later than ours, so ours always fires first.
_JAX_TIMEOUT_MARGIN_S = 30


def initialize(*, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
  """Joins the processes of one run (``jax.distributed.initialize``); call before any JAX work.

  Args:
    coordinator: ``HOST:PORT`` of process 0's coordination service; None: auto-detected (SLURM,
      Open MPI, TPU VM) or ``$JAX_COORDINATOR_ADDRESS``.
    num_processes: how many processes; None: auto-detected.
    process_id: this process's index, 0 .. num_processes - 1; None: auto-detected.
    timeout_s: how long to wait for all processes to join before giving up.

  Raises:
    UserError: the arguments are incomplete or out of range, or the processes did not all join
      within ``timeout_s`` (one line, on every process that waited).
  """
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise UserError("--coordinator, --num-processes and --process-id go together: give all three "
                    "or none (then --distributed detects them from SLURM, Open MPI or a TPU VM)")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise UserError(f"--process-id {process_id}: must be in 0..{num_processes - 1} "
                    f"(--num-processes {num_processes})")
  where = coordinator or "the auto-detected coordinator"
  # A coordinator that cannot be reached, or a process that never comes, makes JAX's client abort
  # the process from C++ at its timeout (a stack trace, exit 134). A watchdog a little earlier
  # turns that into the one-line error every other problem gets.
  joined = threading.Event()

  def give_up():
    if not joined.is_set():
      print(f"error: --distributed: the processes did not all join at {where} within "
            f"{timeout_s} s (is the coordinator's host reachable, its port free, and every "
            "process started?)", file=sys.stderr, flush=True)
      os._exit(2)  # pylint: disable=protected-access

  watchdog = threading.Timer(timeout_s, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id,
                               initialization_timeout=timeout_s + _JAX_TIMEOUT_MARGIN_S)
  except Exception as e:  # pylint: disable=broad-except
    # Nothing detected (ValueError) or the service refused us: the run cannot start.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"--distributed: could not join the processes at {where} "
                    f"({first[:300]})") from None
  finally:
    joined.set()
    watchdog.cancel()


def is_main() -> bool:
  """Whether this process writes the run's files and logs (process 0)."""
  return jax.process_index() == 0


def process_count() -> int:
  return jax.process_count()


def config_hash(config_json: str) -> str:
  """A short fingerprint of a resolved config (its JSON)."""
  return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def check_same_config(config_json: str) -> None:
  """Raises on every process if the processes resolved different configs.

  One small all-gather of the config's fingerprint, at start: processes that train different
  programs would otherwise hang in their first collective or, worse, silently average
  gradients of different models.
  """
  if jax.process_count() == 1:
    return
  digest = config_hash(config_json)
  words = np.frombuffer(bytes.fromhex(digest), np.uint32).astype(np.int32)
  gathered = np.asarray(_allgather(words))
  hashes = [np.asarray(row, np.int32).astype(np.uint32).tobytes().hex() for row in gathered]
  different = [i for i, h in enumerate(hashes) if h != hashes[0]]
  if different:
    raise UserError(f"processes started with different configs: resolved config hash {hashes[0]} "
                    f"on process 0 but {hashes[different[0]]} on process {different[0]}; start "
                    "every process with the same --config and --config.* overrides")


def any_process(flag: bool) -> bool:
  """Whether ``flag`` is set on any process (one tiny all-gather; every process must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(_allgather(np.asarray([int(bool(flag))], np.int32))))


def broadcast_from_main(value: float) -> float:
  """Process 0's ``value`` on every process, bit for bit (every process must call it)."""
  if jax.process_count() == 1:
    return float(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # As the two 32-bit halves of the float64: without jax_enable_x64 a float64 would be cut to
  # float32 on the way, and process 0 compares the exact value.
  words = np.asarray([value], np.float64).view(np.int32)
  received = np.asarray(multihost_utils.broadcast_one_to_all(words), np.int32)
  return float(received.view(np.float64)[0])


def wait_for_all(name: str, *, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
  """Blocks until every process reached the barrier ``name`` (the coordination service's, with a
  timeout, not a device collective: process 0 may spend a long time getting there)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  try:
    jax_distributed.global_state.client.wait_at_barrier(f"uagan_jax_{name}", timeout_s * 1000)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"process {jax.process_index()}: the other processes did not reach "
                    f"'{name}' within {timeout_s} s ({first[:300]})") from None


def local_copy(tree):
  """A host copy of a fully replicated tree (this process's replica): for work one process does
  alone (validation, evaluation) on a state whose arrays span every process's devices."""
  if jax.process_count() == 1:
    return tree

  def one(leaf):
    if isinstance(leaf, jax.Array):
      if not leaf.is_fully_replicated:
        raise ValueError(f"local_copy: an array of shape {leaf.shape} is not fully replicated")
      return np.asarray(leaf.addressable_data(0))
    return leaf
  return jax.tree.map(one, tree)


def _allgather(value: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(value)
