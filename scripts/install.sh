#!/usr/bin/env bash
# Sets up HepatoQuant on a fresh machine: a virtual environment in .venv with both distributions installed
# (editable) and the test tools. Used by `make`, CI (.ci/run) and the Dockerfile, so all three install the
# same way. Re-running it is cheap: pip skips what is already installed.
#
#   --test-tools   also what the QuPath scripts' tests need: the Debian packages groovy (2.4), Gson and a Java
#                  runtime (through apt-get as root or with sudo), and Groovy 4.0.26, the Groovy of QuPath 0.5 /
#                  0.6, as the jar that the npm package npm-groovy-lint 18.0.0 bundles (checked by its sha256;
#                  in .tools/); and QuPath 0.6.0's own core, headless, from ../shared/qupath-kit (its install.sh:
#                  Debian jars, a Java 21 runtime from PyPI) in .tools/qupath-kit/, so that the tests read our GeoJSON,
#                  projects and Groovy scripts with QuPath's real classes. `make test` and CI pass it; the Dockerfile
#                  does not (the server needs neither Groovy nor QuPath).
set -euo pipefail
cd "$(dirname "$0")/.."

TEST_TOOLS=0
for arg in "$@"; do
  case "$arg" in
    --test-tools) TEST_TOOLS=1 ;;
    *) echo "install.sh: unknown option $arg (known: --test-tools)" >&2; exit 2 ;;
  esac
done

if [ "$TEST_TOOLS" = 1 ]; then
  packages=""
  { command -v groovy >/dev/null && groovy --version >/dev/null 2>&1; } || packages="default-jre-headless groovy"
  [ -f /usr/share/java/gson.jar ] || packages="$packages libgoogle-gson-java"
  command -v npm >/dev/null || packages="$packages npm"
  if [ -n "$packages" ]; then
    if [ "$(id -u)" = 0 ]; then apt=(apt-get); elif command -v sudo >/dev/null; then apt=(sudo apt-get); else
      echo "install.sh: the tests need the Debian packages$packages; install them as root (apt-get install$packages)" >&2
      exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    "${apt[@]}" install -y -q --no-install-recommends $packages >/dev/null \
      || { "${apt[@]}" update -q >/dev/null && "${apt[@]}" install -y -q --no-install-recommends $packages >/dev/null; }
  fi
  groovy --version

  GROOVY4_JAR=.tools/groovy-4.0.26.jar
  GROOVY4_SHA256=ae3196ed31fa11e8506f9c40a6b34fdaff06a8eeda78a8a6ebaeb1a2a0ad35dc
  if ! echo "$GROOVY4_SHA256  $GROOVY4_JAR" | sha256sum --check --status 2>/dev/null; then
    download=$(mktemp -d)
    (cd "$download" && npm pack --silent npm-groovy-lint@18.0.0 >/dev/null)
    tar -xzf "$download/npm-groovy-lint-18.0.0.tgz" -C "$download" package/lib/java/groovy/lib/groovy-4.0.26.jar
    mkdir -p .tools
    mv "$download/package/lib/java/groovy/lib/groovy-4.0.26.jar" "$GROOVY4_JAR"
    rm -rf "$download"
    echo "$GROOVY4_SHA256  $GROOVY4_JAR" | sha256sum --check --status \
      || { echo "install.sh: $GROOVY4_JAR does not have the expected sha256; deleted" >&2; rm -f "$GROOVY4_JAR"; exit 1; }
  fi
  echo "Groovy 4.0.26 for the tests: $GROOVY4_JAR"
fi

VENV="${HEPATOQUANT_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=24"
# torch first, pinned, so no other requirement can pull a different multi-GB build.
"$VENV/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install --quiet -e "./python_client[qupath]" -e "./server[test,ray]"
"$VENV/bin/hepatoquant" --version

if [ "$TEST_TOOLS" = 1 ]; then
  KIT=../shared/qupath-kit
  if [ -f "$KIT/install.sh" ]; then
    # The kit takes our sha256-checked Groovy 4 jar instead of fetching it again; paquo comes from the client's
    # [qupath] extra (installed above), the kit's tools run in this venv.
    GROOVY4_JAR="$PWD/$GROOVY4_JAR" PYTHON="$VENV/bin/python" bash "$KIT/install.sh" .tools/qupath-kit
    echo "QuPath 0.6.0 core for the tests: .tools/qupath-kit (source .tools/qupath-kit/env.sh)"
  elif [ "${CI:-}" = true ]; then
    echo "install.sh: $KIT is missing; CI needs ../shared beside the clone (QuPath's own code for the tests)" >&2
    exit 1
  else
    echo "install.sh: $KIT is absent: the tests that need QuPath's own code will skip" >&2
  fi
fi
