# Sourced by the launch scripts: creates .venv with Python >= 3.11 and installs the project.
# Usage: source launch/_setup.sh [EXTRAS]   e.g. "test"
set -euo pipefail
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: $PYTHON is not Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
extras=${1:-}
spec="."
[ -n "$extras" ] && spec=".[$extras]"
echo "installing uagan_jax${extras:+[$extras]} into .venv (the first time downloads ~700 MB: jax, jaxlib, ...)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23.1"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
