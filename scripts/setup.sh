#!/usr/bin/env bash
# Create .venv (once) and install the project into it.
# torch==2.13.0 goes first: on machines with a local CPU wheel it installs in seconds, while an
# unpinned torch would pull gigabytes of CUDA packages. A venv that already has a torch keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
log=.venv/setup.log
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
{
  .venv/bin/python -m pip install --upgrade pip
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install torch==2.13.0
  .venv/bin/python -m pip install -e ".[test]"
} >"$log" 2>&1 || { cat "$log"; echo "set-up failed (log above, also in $log)" >&2; exit 1; }
