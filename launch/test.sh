#!/usr/bin/env bash
# The tests: set up .venv with the test extra and run pytest. Slow and GPU checks are deselected
# unless asked for:  bash launch/test.sh -m slow   (extra args go to pytest; the last -m wins).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_setup.sh test
exec .venv/bin/python -m pytest -m "not slow and not gpu" "$@"
