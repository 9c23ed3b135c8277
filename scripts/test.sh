#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest tests "$@"
