#!/usr/bin/env bash
# Sets up HepatoQuant on a fresh machine: a virtual environment in .venv with both distributions installed
# (editable) and the test tools. Used by `make`, CI (.ci/run) and the Dockerfile, so all three install the
# same way. Re-running it is cheap: pip skips what is already installed.
#
#   --test-tools   also the Debian packages the tests need (groovy 2.4, Gson and a Java runtime, for the QuPath
#                  scripts' tests), through apt-get as root or with sudo; `make test` and CI pass it, the
#                  Dockerfile does not (the server image needs no Groovy).
set -euo pipefail
cd "$(dirname "$0")/.."

TEST_TOOLS=0
for arg in "$@"; do
  case "$arg" in
    --test-tools) TEST_TOOLS=1 ;;
    *) echo "install.sh: unknown option $arg (known: --test-tools)" >&2; exit 2 ;;
  esac
done

if [ "$TEST_TOOLS" = 1 ] && ! { command -v groovy >/dev/null && [ -f /usr/share/java/gson.jar ] && groovy --version >/dev/null 2>&1; }; then
  packages="default-jre-headless groovy libgoogle-gson-java"
  if [ "$(id -u)" = 0 ]; then apt=(apt-get); elif command -v sudo >/dev/null; then apt=(sudo apt-get); else
    echo "install.sh: the tests need the Debian packages $packages; install them as root (apt-get install $packages)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  "${apt[@]}" install -y -q --no-install-recommends $packages >/dev/null \
    || { "${apt[@]}" update -q >/dev/null && "${apt[@]}" install -y -q --no-install-recommends $packages >/dev/null; }
  groovy --version
fi
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
