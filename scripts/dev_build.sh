#!/usr/bin/env bash
# Rebuild fastkd._C into a virtual environment (editable install). Serialised with a lock so that
# several shells working in the same tree never build into the same directory at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec 9>/tmp/fastkd-build.lock
flock 9
"$PY" -m pip install -q --no-build-isolation --no-deps -e . "$@"
