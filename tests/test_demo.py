"""The README's main job, shortened: scripts/demo.py --quick end to end on the real (or fallback) volumes."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
from helpers import REPO


def test_demo_quick_writes_prediction_overlay_and_dice(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REPO / "scripts/demo.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "real MRI" in proc.stdout or "synthetic" in proc.stdout  # it says which data it used
    assert "Dice" in proc.stdout
    predictions = list(out.rglob("*_seg.nii.gz"))
    assert len(predictions) == 1
    assert len(nib.load(predictions[0]).shape) == 3
    overlay = next(out.rglob("overlay.png"))
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and overlay.stat().st_size > 10_000
