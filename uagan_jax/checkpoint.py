"""Orbax checkpoints of the whole train state: periodic, keep-last-K, resumed automatically.

The state pytree (`train.TrainState`) is everything a run needs to continue: parameters, batch
statistics, optimizer states, the step and the base key. Sampling is a pure function of (seed,
step), so no data-iterator state is needed: a resumed run continues with exactly the batches and
keys an uninterrupted run would have used.

The same class keeps the best checkpoint by a validation score (``best_metric``): the score is
stored with the checkpoint, so a resumed run knows the best so far.

Trust: a state is saved only if all of it is finite (`all_finite`, one jitted reduction fetched
only on steps that save), so a diverged run never rotates good checkpoints out. Each checkpoint
carries a SHA-256 digest of the host copy of its state (the ``digest`` item, written in the same
atomic commit); `Checkpointer.restore` recomputes it, so a bit flipped in a data file that
TensorStore still decodes is caught as well as the files it cannot read. `restore_newest` falls
back from an unreadable checkpoint to the newest readable one.

Part of a checkpoint: the digest item also holds a SHA-256 per leaf (``leaves``), so
`Checkpointer.restore_part` reads only some subtrees (inference: the one network that does the
job, not the optimizer states or the critics) and verifies every leaf it read against its own
digest. A checkpoint written before leaf digests existed cannot be verified in part
(`NoLeafDigests`): it is restored whole.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from uagan_jax import workdir as workdir_lib
from uagan_jax.errors import UserError
from uagan_jax.train_utils import TrainingDiverged


def _save_replicated_arrays_whole() -> None:
  """Orbax's jax.Array handler without replica-parallel saving.

  By default Orbax splits each replicated array into one slice per replica so that the devices
  write in parallel, and cuts those slices with a small compiled program per array shape: on a
  CPU host that costs seconds per save (a configs/test.py:uagan state on 4 devices: the first
  save 6.2 s -> 1.8 s, later ones 1.1 s -> 0.7 s), for a train state of at most a few hundred
  MB. Without it, the first replica writes each array whole: the same files, the same values.
  """
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # Orbax warns that it replaces its default handler
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  finally:
    absl_logger.setLevel(level)


_save_replicated_arrays_whole()


class NonFiniteState(TrainingDiverged):
  """A state due to be saved holds NaN or infinity; it is not saved."""


class CheckpointUnreadable(Exception):
  """A checkpoint on disk cannot be restored (missing or damaged files, a wrong digest)."""


class NoLeafDigests(Exception):
  """A checkpoint without per-leaf digests: a part of it cannot be verified; restore it whole."""


@jax.jit
def all_finite(tree) -> jax.Array:
  """One boolean: whether every floating-point leaf of ``tree`` is free of NaN and infinity."""
  flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
           if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def first_non_finite(tree) -> str | None:
  """The path of the first leaf of ``tree`` holding NaN or infinity (read on the host; only
  called once `all_finite` said there is one), e.g. ``nets/segmentor/batch_stats/.../var``."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    value = np.asarray(jax.device_get(leaf))
    if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
      return _path_name(path)
  return None


def state_digest(tree) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (of the host copy)."""
  return _digests(tree, leaves=False)[0]


def leaf_digests(tree) -> dict[str, str]:
  """Each leaf's path -> SHA-256 over its path, dtype, shape and bytes (of the host copy)."""
  return _digests(tree, leaves=True)[1]


def _digests(tree, *, leaves: bool) -> tuple[str, dict[str, str]]:
  """(`state_digest`, `leaf_digests` or {}) in one pass over the host copy."""
  whole, each = hashlib.sha256(), {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    value = np.ascontiguousarray(jax.device_get(leaf))
    name = _path_name(path)
    header = f"{name}|{value.dtype.str}|{value.shape}|".encode()
    data = value.tobytes()
    whole.update(header)
    whole.update(data)
    if leaves:
      each[name] = hashlib.sha256(header + data).hexdigest()
  return whole.hexdigest(), each


class Checkpointer:
  """Saves every ``every`` steps (and when forced), keeps the newest ``keep``.

  Saves are asynchronous: the training loop goes on while a checkpoint is written. `close` waits
  for the last one.
  """

  def __init__(self, directory: pathlib.Path | str, *, every: int, keep: int,
               best_metric: str | None = None):
    """Opens (or creates) ``directory``.

    Args:
      directory: the checkpoint folder (one subfolder per step).
      every: save only steps that are multiples of ``every`` (unless forced).
      keep: how many checkpoints to keep.
      best_metric: keep the ``keep`` checkpoints with the highest ``metrics[best_metric]``
        (passed to `save`) instead of the newest ones; the metrics are stored with each
        checkpoint and read back by `metrics`.
    """
    self.directory = pathlib.Path(directory).absolute()
    best = ({} if best_metric is None else
            {"best_fn": lambda metrics: metrics[best_metric], "best_mode": "max"})
    self._manager = ocp.CheckpointManager(
        self.directory,
        # Naming the item's handler up front lets a new process read the metadata of checkpoints
        # it has not written (needed to check them before restoring).
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "digest": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, create=True,
            # With several processes each save synchronises them at barriers named by an
            # operation count; two checkpointers saving at one step (the periodic and the best)
            # would meet at the same names from background threads. The folder's name keeps
            # their barriers apart.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=self.directory.name),
            **best))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, *, force: bool = False, metrics: dict | None = None) -> bool:
    """Saves ``state`` as ``step`` if due (or ``force``); returns whether a save started.

    ``metrics`` (a flat dict of floats) is stored with the checkpoint; required when the
    checkpointer keeps the best checkpoints.

    Raises:
      NonFiniteState: the state holds NaN or infinity (named leaf); nothing is saved, so the
        newest checkpoint stays the last good one.
      UserError: the disk is full or read-only (the previous checkpoint is left intact).
    """
    if not (force or self._manager.should_save(step)):
      return False
    if not bool(all_finite(state)):  # the one host round trip, on saving steps only
      raise NonFiniteState(f"step {step}: non-finite {first_non_finite(state)}")
    digest, leaves = _digests(state, leaves=True)
    try:
      # force: the decision is taken above, so that only a checked state is ever saved.
      return self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          digest=ocp.args.JsonSave({"sha256": digest, "leaves": leaves})),
                                force=True, metrics=metrics)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from None

  def _write_error(self, error: Exception) -> UserError:
    """A failed (possibly asynchronous) write as one line naming the folder and the problem."""
    cause = error
    while cause is not None and not isinstance(cause, OSError):
      cause = cause.__cause__ or cause.__context__
    if cause is not None:
      return workdir_lib.disk_error(self.directory, cause, doing="saving a checkpoint")
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return UserError(f"{self.directory}: saving a checkpoint failed ({first_line}); the previous "
                     "checkpoint is intact, run the same command to resume")

  def metrics(self, step: int) -> dict | None:
    """The metrics saved with ``step`` (None if none were)."""
    return self._manager.metrics(step)

  def restore(self, step: int, like):
    """Restores ``step`` into the structure, shapes, dtypes and shardings of ``like``.

    Raises:
      UserError: the checkpoint's arrays do not match ``like`` (usually: the config changed the
        networks since the checkpoint was written). Checked on the metadata first, so a mismatch
        never starts Orbax's asynchronous reads.
      CheckpointUnreadable: files missing or damaged, or the restored state does not match the
        digest saved with it.
    """
    self._check_fits(step, like, part=False)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    # Orbax's item metadata of a JSON item is None whether it exists or not: look at the folder
    # (checkpoints written before the digest existed have none and are restored unchecked).
    has_digest = (self.directory / str(step) / "digest").is_dir()
    args = {"state": ocp.args.StandardRestore(abstract)}
    if has_digest:
      args["digest"] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointUnreadable(f"its data cannot be read: {_first_line(e)}") from None
    if has_digest and state_digest(restored.state) != (restored.digest or {}).get("sha256"):
      raise CheckpointUnreadable("its data does not match the digest saved with it (changed on "
                                 "disk since it was written)")
    return restored.state

  def restore_part(self, step: int, like):
    """Restores only the leaves of ``like``, verifying each against its digest.

    Args:
      step: The checkpoint.
      like: Some subtrees of the saved state as nested dicts under their names in it, e.g.
        ``{"nets": {"segmentor": {"params": ..., "batch_stats": ...}}}`` for a `TrainState`;
        shapes, dtypes and shardings as in `restore`.

    Returns:
      ``like``'s structure with the stored values.

    Raises:
      UserError: as `restore`, for the leaves of ``like`` (one missing from the checkpoint too).
      CheckpointUnreadable: files missing or damaged, or a leaf read does not match its digest.
      NoLeafDigests: the checkpoint has no per-leaf digests (written before they existed).
    """
    self._check_fits(step, like, part=True)
    digests = self._digests(step)
    if "leaves" not in digests:
      raise NoLeafDigests(f"{self.directory / str(step)}: no per-leaf digests")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      restored = ocp.PyTreeCheckpointer().restore(
          self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
              item=abstract, partial_restore=True,
              restore_args=jax.tree.map(lambda leaf: ocp.ArrayRestoreArgs(
                  sharding=leaf.sharding, dtype=leaf.dtype), abstract)))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointUnreadable(f"its data cannot be read: {_first_line(e)}") from None
    for name, digest in leaf_digests(restored).items():
      if digest != digests["leaves"].get(name):
        raise CheckpointUnreadable(f"its data does not match the digest saved with it ('{name}' "
                                   "changed on disk since it was written)")
    return restored

  def _digests(self, step: int) -> dict:
    """The digest item of ``step`` ({} for a checkpoint written before digests existed)."""
    if not (self.directory / str(step) / "digest").is_dir():
      return {}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          digest=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointUnreadable(f"its digest cannot be read: {_first_line(e)}") from None
    return restored.digest or {}

  def _check_fits(self, step: int, like, *, part: bool) -> None:
    """UserError unless the stored arrays have ``like``'s shapes (every stored array one of
    ``like``'s too, unless ``part``); read from the metadata, before any data is."""
    try:
      items = self._manager.item_metadata(step)
      stored = {_path_name(path): tuple(meta.shape) for path, meta in
                jax.tree_util.tree_leaves_with_path(items["state"])}
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointUnreadable(f"its files cannot be read: {_first_line(e)}") from None
    expected = {_path_name(path): tuple(leaf.shape) for path, leaf in
                jax.tree_util.tree_leaves_with_path(like)}
    for name in sorted(set(expected) if part else set(stored) | set(expected)):
      if stored.get(name) != expected.get(name):
        raise UserError(
            f"{self.directory / str(step)}: checkpoint does not fit the current config: '{name}' "
            f"is {_describe(stored.get(name))} there but {_describe(expected.get(name))} now; "
            "use the config the run was started with, or a new --workdir")

  def restore_newest(self, like, *, log: Callable[[str], None], set_aside: bool = False,
                     part: bool = False):
    """The newest checkpoint that can be restored: ``(state, step)``, or None if there is none.

    Each unreadable checkpoint newer than it is reported in one line through ``log``.

    Args:
      like: as in `restore`.
      log: where the notes go.
      set_aside: move unreadable checkpoints out of the folder (into ``<folder>_unreadable/``),
        so that training can save those steps again (training does; read-only commands do not).
      part: restore only ``like``'s subtrees (`restore_part`); `NoLeafDigests` is raised as it
        is, at the first checkpoint without them.

    Raises:
      UserError: checkpoints exist but none can be restored (naming the folder), or none fits
        the current config.
    """
    problems = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore_part(step, like) if part else self.restore(step, like)
      except (CheckpointUnreadable, UserError) as e:
        problems.append((step, e))
        continue
      for bad_step, problem in problems:
        where = self.directory / str(bad_step)
        if set_aside:
          aside = self.directory.parent / f"{self.directory.name}_unreadable" / str(bad_step)
          aside.parent.mkdir(exist_ok=True)
          where.rename(aside)
          self._manager.reload()
        log(f"{where}: checkpoint unreadable ({problem}); "
            f"{'moved to ' + str(aside) + ', ' if set_aside else ''}"
            f"using the one of step {step} instead")
      return state, step
    if not problems:
      return None
    if all(isinstance(e, UserError) for _, e in problems):
      raise problems[0][1]  # every one is of another config: say so, not "unreadable"
    raise UserError(f"{self.directory}: no readable checkpoint ("
                    + "; ".join(f"step {s}: {e}" for s, e in problems) + ")")

  def close(self) -> None:
    """Waits for the last save to finish (only then is it on disk) and releases the manager.

    Raises:
      UserError: the last asynchronous save failed (disk full, read-only, ...).
    """
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from None
    finally:
      self._manager.close()


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def _describe(shape) -> str:
  return "absent" if shape is None else f"shape {shape}"


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__

