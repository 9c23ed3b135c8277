"""Import one bundle's code in this process, as ``python -m monai.bundle run`` does in the bundle folder.

Every model-zoo bundle keeps its code in a package named ``scripts``, and its configs name it
(``scripts.selfreg.SelfRegLoss``). This repository's tools live in a folder also called ``scripts/``, which is not
a package: the tools import each other as top-level modules (``import make_dataset``), never as ``scripts.*``.
So the only ``scripts`` package a process ever imports is a bundle's, and :func:`bundle_imports` is the one place
that chooses which: the tests, the benchmark and the packaging tool all go through it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PACKAGE = "scripts"


def forget_bundle_package() -> None:
    """Drop any bundle's ``scripts`` package (and its modules) from the import cache."""
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]


@contextmanager
def bundle_imports(bundle: Path) -> Iterator[Path]:
    """Within the block, ``import scripts`` (and config targets such as ``scripts.data.split_datalist``) resolve to
    ``bundle``'s own package; before and after, no bundle's package is cached. Yields the bundle folder."""
    bundle = Path(bundle).resolve()
    if not (bundle / PACKAGE / "__init__.py").is_file():
        raise FileNotFoundError(f"{bundle} has no {PACKAGE}/__init__.py: not a bundle folder")
    forget_bundle_package()
    sys.path.insert(0, str(bundle))
    try:
        yield bundle
    finally:
        if str(bundle) in sys.path:
            sys.path.remove(str(bundle))
        forget_bundle_package()
