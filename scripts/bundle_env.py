"""Import one bundle's code in this process, as ``python -m monai.bundle run`` does in the bundle folder.

Every model-zoo bundle keeps its code in a package named ``scripts``, and its configs name it
(``scripts.selfreg.SelfRegLoss``). This repository's tools live in a folder also called ``scripts/``, which is not
a package: the tools import each other as top-level modules (``import make_dataset``), never as ``scripts.*``.
So the only ``scripts`` package a process ever imports is a bundle's, and :func:`bundle_imports` is the one place
that chooses which: the tests, the benchmark and the packaging tool all go through it. Unit tests of a
bundle's modules import them under a package name of the bundle's own with :func:`bundle_module`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

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
    saved_path = list(sys.path)  # restored whole: ConfigWorkflow.run puts the bundle folder on sys.path again
    sys.path.insert(0, str(bundle))
    try:
        yield bundle
    finally:
        sys.path[:] = saved_path
        forget_bundle_package()


def bundle_module(bundle: Path, name: str) -> ModuleType:
    """``scripts.<name>`` of ``bundle`` imported as ``<bundle name>_scripts.<name>``: a package name of its own, so
    that unit tests hold several bundles' modules at once, and a module's relative imports (``from .backbones import
    ...``) resolve inside its own bundle whenever they run. Config targets (``scripts.x.Y``) need
    :func:`bundle_imports` instead."""
    bundle = Path(bundle).resolve()
    package = f"{bundle.name}_{PACKAGE}"
    if package not in sys.modules:
        init = bundle / PACKAGE / "__init__.py"
        spec = importlib.util.spec_from_file_location(package, init, submodule_search_locations=[str(init.parent)])
        sys.modules[package] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[package])
    return importlib.import_module(f"{package}.{name}")
