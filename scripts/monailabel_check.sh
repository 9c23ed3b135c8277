#!/usr/bin/env bash
# Check every bundle in MONAI Label 0.8.5's stock monaibundle sample app: /info, /infer and /train against a live
# server on real MRI (scripts/monailabel_check.py says what exactly). Arguments go to that script:
#   bash scripts/monailabel_check.sh [--workdir DIR] [--data-cache DIR] [--keep]
#
# MONAI Label needs an environment of its own, .venv-monailabel/ (created here once, about 12 minutes and 7.5 GB;
# reused while requirements-monailabel.txt is unchanged): it pins numpy<2 (through numpymaxflow and pydicom-seg),
# and its torchvision import needs a CUDA build of torch, which also runs on a CPU-only machine.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv-monailabel"
requirements="$repo/requirements-monailabel.txt"
stamp="$venv/.installed-requirements.sha256"
wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    python="$(command -v python3.11 || command -v python3)"
    if [ "$("$python" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" != True ]; then
        echo "monailabel_check.sh: $python is not Python 3.11, which requirements-monailabel.txt is pinned for" >&2
        exit 1
    fi
    start=$SECONDS
    echo "[monailabel_check] installing $venv from $requirements (about 12 minutes, 7.5 GB; once)"
    [ -x "$venv/bin/pip" ] || "$python" -m venv "$venv"
    # PIP_CONFIG_FILE=/dev/null and an empty PIP_FIND_LINKS drop a machine-wide wheel folder that would supply the
    # CPU-only torch; PyPI's torch 2.13.0 is the CUDA build that torchvision 0.28.0 needs. PIP_CONSTRAINT (not -c)
    # also pins the isolated build of the sam2 source package (to torch 2.13.0), and SAM2_BUILD_CUDA=0 builds it
    # without CUDA extensions.
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT="$requirements" SAM2_BUILD_CUDA=0 \
        "$venv/bin/pip" install --disable-pip-version-check -r "$requirements"
    "$venv/bin/pip" check
    echo "$wanted" > "$stamp"
    echo "[monailabel_check] environment ready in $((SECONDS - start)) s"
fi

exec "$venv/bin/python" "$repo/scripts/monailabel_check.py" "$@"
