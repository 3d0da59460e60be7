"""JAX's persistent compilation cache for the commands: a program compiled once is read back.

XLA compiles every jitted program (the segmentor over a batch of slices, the train step) when a
process first runs it: seconds on a CPU, paid again by every ``uagan-jax predict``. With the
persistent cache a later process loads the compiled executable from disk instead. A cached
executable is the compiled program itself, so every number stays as it was.

Where it lives:

* ``$JAX_COMPILATION_CACHE_DIR`` (JAX's own variable) set: JAX's settings are left as they are;
* else ``$UAGAN_JAX_COMPILATION_CACHE``: a folder, or ``off`` for no persistent cache;
* else ``~/.cache/uagan_jax/jax`` (`DEFAULT_LOCATION`).

Every program is cached, however small or quick to compile (JAX by default skips programs that
compile in under a second, most of the inference programs here). The cache is never pruned;
deleting the folder is always safe (the next run compiles again).
"""

from __future__ import annotations

import os
import pathlib

ENV = "UAGAN_JAX_COMPILATION_CACHE"
# JAX's own variable: a user (or the tests) who set it has configured the cache already.
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"
DEFAULT_LOCATION = pathlib.Path.home() / ".cache" / "uagan_jax" / "jax"
# Values of $UAGAN_JAX_COMPILATION_CACHE that turn the persistent cache off.
OFF = ("off", "none", "0", "false", "no")


def location() -> pathlib.Path | None:
  """The folder `enable` uses: None where the cache is off or JAX's own variable configures it."""
  if os.environ.get(JAX_ENV):
    return None
  value = os.environ.get(ENV, "").strip()
  if value.lower() in OFF:
    return None
  return pathlib.Path(value).expanduser() if value else DEFAULT_LOCATION


def enable() -> pathlib.Path | None:
  """Points JAX's persistent compilation cache at `location` (before the first compilation).

  Returns:
    The folder, or None where `location` is None (off, or set through JAX's own variable).
  """
  import jax  # pylint: disable=g-import-not-at-top
  folder = location()
  if folder is None:
    return None
  jax.config.update("jax_compilation_cache_dir", str(folder))
  # Cache every program: the inference programs compile in under JAX's default 1 s threshold
  # each, yet together they are most of a prediction's start-up.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return folder
