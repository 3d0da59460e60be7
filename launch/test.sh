#!/usr/bin/env bash
# The tests: set up .venv with the test extra and run pytest. Slow and GPU checks are deselected
# unless asked for:  bash launch/test.sh -m slow   (extra args go to pytest; the last -m wins).
# The files are spread over one pytest-xdist worker per core, at most 4 (TEST_WORKERS=N to
# choose, 0 for one process): most of a test's time is XLA compiling on one thread, and each
# file stays on one worker so its module fixtures are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_setup.sh test
cores=$(nproc 2>/dev/null || echo 1)
workers=${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
exec .venv/bin/python -m pytest -m "not slow and not gpu" -n "$workers" --dist loadfile "$@"
