#!/usr/bin/env bash
# Create .venv (once) and install requirements.txt into it. Sourced by demo.sh and test.sh.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [ ! -x "$repo/.venv/bin/python" ]; then
    "$python" -m venv "$repo/.venv"
fi
# torch's CPU build; GPU users install the CUDA build of the same version first (see README).
"$repo/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$repo/requirements.txt"
