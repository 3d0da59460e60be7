"""`uagan_jax/parallel.py` in one process with four CPU devices: the mesh, each process's rows
of the global batch, placing them, and what several processes refuse (process count faked)."""

import jax
import numpy as np
import pytest

from uagan_jax import parallel
from uagan_jax.errors import UserError


def test_one_process_holds_every_row():
  mesh = parallel.make_mesh(4)
  assert parallel.process_rows(mesh, 8) == slice(0, 8)
  assert parallel.process_rows(parallel.make_mesh(2), 6) == slice(0, 6)


def test_a_batch_the_devices_do_not_divide_is_refused():
  with pytest.raises(UserError, match=r"train.batch_size=6: not divisible by the 4 devices"):
    parallel.process_rows(parallel.make_mesh(4), 6)
  with pytest.raises(UserError, match="does not split evenly over 4 devices"):
    parallel.shard_batch({"image": np.zeros((6, 2), np.float32)}, parallel.make_mesh(4))


def test_shard_batch_puts_one_block_of_rows_on_each_device():
  mesh = parallel.make_mesh(4)
  batch = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
           "modality": np.arange(8, dtype=np.int32)}
  placed = parallel.shard_batch(batch, mesh)
  for name, value in batch.items():
    assert placed[name].shape == value.shape
    np.testing.assert_array_equal(np.asarray(placed[name]), value)
    for shard in placed[name].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
      assert shard.data.shape[0] == 2


def test_several_processes_refuse_pmap_and_a_partial_mesh(monkeypatch):
  parallel.check_mode("pmap")  # one process: fine
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  parallel.check_mode("shard_map")
  with pytest.raises(UserError, match=r"parallel_mode=pmap: not supported with 2 processes"):
    parallel.check_mode("pmap")
  with pytest.raises(UserError, match=r"train.num_devices=2: with 2 processes"):
    parallel.make_mesh(2)
