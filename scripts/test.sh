#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only): one test process per core, each file's tests in one process
# (its fixtures are built once), one torch thread per process so the two do not oversubscribe the cores.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"
workers="${TEST_WORKERS:-$(nproc)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$repo/.venv/bin/python" -m pytest tests -n "$workers" --dist loadfile "$@"
