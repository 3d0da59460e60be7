"""``python -m uagan_jax`` is the ``uagan-jax`` command."""

import sys

from uagan_jax.cli import main

if __name__ == "__main__":  # not when a spawned worker process imports its parent's main module
  sys.exit(main())
