#!/usr/bin/env bash
# Create .venv (once) and install the project into it.
# torch==2.13.0 goes first: on machines with a local CPU wheel it installs in seconds, while an
# unpinned torch would pull gigabytes of CUDA packages. A venv that already has a torch keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[test]"
