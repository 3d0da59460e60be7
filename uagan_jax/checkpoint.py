"""Orbax checkpoints of the whole train state: periodic, keep-last-K, resumed automatically.

The state pytree (`train.TrainState`) is everything a run needs to continue: parameters, batch
statistics, optimizer states, the step and the base key. Sampling is a pure function of (seed,
step), so no data-iterator state is needed: a resumed run continues with exactly the batches and
keys an uninterrupted run would have used.

The same class keeps the best checkpoint by a validation score (``best_metric``): the score is
stored with the checkpoint, so a resumed run knows the best so far.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from uagan_jax.errors import UserError


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
        item_handlers={"state": ocp.StandardCheckpointHandler()},
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
    """
    return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                              force=force, metrics=metrics)

  def metrics(self, step: int) -> dict | None:
    """The metrics saved with ``step`` (None if none were)."""
    return self._manager.metrics(step)

  def restore(self, step: int, like):
    """Restores ``step`` into the structure, shapes, dtypes and shardings of ``like``.

    Raises:
      UserError: the checkpoint's arrays do not match ``like`` (usually: the config changed the
        networks since the checkpoint was written). Checked on the metadata first, so a mismatch
        never starts Orbax's asynchronous reads.
    """
    stored = {_path_name(path): tuple(meta.shape) for path, meta in
              jax.tree_util.tree_leaves_with_path(self._manager.item_metadata(step)["state"])}
    expected = {_path_name(path): tuple(leaf.shape) for path, leaf in
                jax.tree_util.tree_leaves_with_path(like)}
    for name in sorted(set(stored) | set(expected)):
      if stored.get(name) != expected.get(name):
        raise UserError(
            f"{self.directory / str(step)}: checkpoint does not fit the current config: '{name}' "
            f"is {_describe(stored.get(name))} there but {_describe(expected.get(name))} now; "
            "use the config the run was started with, or a new --workdir")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored.state

  def close(self) -> None:
    self._manager.wait_until_finished()
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
