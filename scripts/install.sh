#!/usr/bin/env bash
# Sets up HepatoQuant on a fresh machine: a virtual environment in .venv with both distributions installed
# (editable) and the test tools. Used by `make`, CI (.ci/run) and the Dockerfile, so all three install the
# same way. Re-running it is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HEPATOQUANT_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=24"
# torch first, pinned, so no other requirement can pull a different multi-GB build.
"$VENV/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install --quiet -e "./python_client[qupath]" -e "./server[test]"
"$VENV/bin/hepatoquant" --version
