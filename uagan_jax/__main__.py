"""``python -m uagan_jax`` is the ``uagan-jax`` command."""

import sys

from uagan_jax.cli import main

sys.exit(main())
