#!/usr/bin/env bash
# Build a zeroc-ice 3.6.5 wheel for Python >= 3.11 (needed by omero-py, the
# optional `omero` extra). PyPI only has an sdist that no longer compiles on
# 3.11; two small source patches fix it:
#   * src/eval.h was merged into Python.h in 3.11 -> provide an empty one;
#   * PyThreadState_GET()->frame is gone -> PyEval_GetFrame().
# Needs a C++ compiler, libssl-dev and libbz2-dev; ~13 min on two cores.
# The wheel is cached in $WHEELHOUSE, so this runs once per machine.
set -euo pipefail
PY=$(command -v "${PY:-python3}" || echo "${PY:-python3}")
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
WHEELHOUSE=${WHEELHOUSE:-$HOME/.cache/fiji-bridge/wheelhouse}
mkdir -p "$WHEELHOUSE"
if ls "$WHEELHOUSE"/zeroc_ice-3.6.5-*.whl >/dev/null 2>&1; then
  echo "zeroc-ice wheel cached in $WHEELHOUSE"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$PY" -m pip download --quiet --no-deps --no-binary :all: zeroc-ice==3.6.5 -d .
tar xzf zeroc-ice-3.6.5.tar.gz
cd zeroc-ice-3.6.5
: > src/eval.h
sed -i 's/PyThreadState_GET()->frame/PyEval_GetFrame()/' src/Util.cpp
echo "building zeroc-ice 3.6.5 (takes ~13 minutes on two cores)..."
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation . -w "$WHEELHOUSE" 2>&1 | tail -5 || \
  "$PY" -m pip wheel --quiet --no-deps . -w "$WHEELHOUSE"
ls "$WHEELHOUSE"/zeroc_ice-3.6.5-*.whl
