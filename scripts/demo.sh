#!/usr/bin/env bash
# Set up, then train the SegResNet-VAE bundle briefly on real MRI, infer a held-out volume and evaluate it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
exec "$repo/.venv/bin/python" "$repo/scripts/demo.py" "$@"
