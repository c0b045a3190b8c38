#!/usr/bin/env bash
# Regenerates the Python gRPC stubs from protos/ into hepatoquant_client (committed; never edited by hand).
# The proto path is mapped under hepatoquant_client/_generated so that the generated imports name our client
# package, not the server's `hepatoquant` package. tests/test_protos.py runs this into a temporary folder and
# fails on any difference with the committed stubs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-python_client/src}"
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m grpc_tools.protoc \
  "--proto_path=hepatoquant_client/_generated=protos" \
  "--python_out=$OUT" "--pyi_out=$OUT" "--grpc_python_out=$OUT" \
  protos/hepatoquant/v1/hepatoquant.proto
for dir in "$OUT/hepatoquant_client/_generated" "$OUT/hepatoquant_client/_generated/hepatoquant" \
           "$OUT/hepatoquant_client/_generated/hepatoquant/v1"; do
  [ -f "$dir/__init__.py" ] || : > "$dir/__init__.py"
done
