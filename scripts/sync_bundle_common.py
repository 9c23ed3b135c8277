"""Copy the canonical shared bundle code into every bundle.

Bundles must run on their own once zipped, so each carries a copy of ``scripts/bundle_common/*.py`` in its own
``scripts/``. This tool writes those copies (with a header naming the original); ``--check`` only reports drift
and exits 1, which the tests use.

    python scripts/sync_bundle_common.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMON = REPO / "scripts" / "bundle_common"
HEADER = "# Generated from scripts/bundle_common/{name} by scripts/sync_bundle_common.py: edit that file, not this copy.\n"


def bundles() -> list[Path]:
    return sorted(p for p in (REPO / "bundles").glob("*_segmentation") if p.is_dir())


def expected_copies() -> dict[Path, str]:
    """Each bundle's copy path -> the text it must have."""
    sources = sorted(COMMON.glob("*.py"))
    return {
        bundle / "scripts" / src.name: HEADER.format(name=src.name) + src.read_text()
        for bundle in bundles()
        for src in sources
    }


def drifted() -> list[Path]:
    return [path for path, text in expected_copies().items() if not path.is_file() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report copies that differ; write nothing")
    args = parser.parse_args(argv)
    stale = drifted()
    if args.check:
        for path in stale:
            print(f"out of date: {path.relative_to(REPO)} (run python scripts/sync_bundle_common.py)")
        return 1 if stale else 0
    for path, text in expected_copies().items():
        if path in stale:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
