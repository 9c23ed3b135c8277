"""Shared fixtures: the repository, synthetic MSD datasets on disk, and running a bundle through its real CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
BUNDLES = REPO / "bundles"
VAE_BUNDLE = BUNDLES / "segresnet_vae_segmentation"
SELFREG_BUNDLE = BUNDLES / "selfreg_segmentation"
ALL_BUNDLES = sorted(p for p in BUNDLES.glob("*_segmentation") if p.is_dir())
# MONAI's published model-zoo metadata schema (MONAI-extra-test-data 0.8.1), kept here so the check runs offline.
SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"
# The repository's tools import each other as top-level modules, as they do when run as scripts/<tool>.py.
sys.path.insert(0, str(REPO / "scripts"))


def load_module(path: Path, name: str | None = None) -> ModuleType:
    """Import one file under a unique name, so that every bundle's ``scripts`` can be tested in one process."""
    name = name or "_".join(path.with_suffix("").parts[-3:])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def bundle_module(bundle: Path, name: str) -> ModuleType:
    """Import ``scripts.<name>`` of one bundle as a package under a name unique to the bundle, so that several
    bundles' ``scripts`` (and their relative imports) coexist in one test process."""
    package = f"{bundle.name}_scripts"
    if package not in sys.modules:
        init = bundle / "scripts" / "__init__.py"
        spec = importlib.util.spec_from_file_location(package, init, submodule_search_locations=[str(init.parent)])
        sys.modules[package] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[package])
    return importlib.import_module(f"{package}.{name}")


@pytest.fixture
def bundle_on_path(monkeypatch):
    """Put a bundle folder first on ``sys.path``, as ``monai.bundle run`` does, with no other bundle's ``scripts``
    package cached."""

    def purge():
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]

    def use(bundle: Path) -> Path:
        purge()
        monkeypatch.syspath_prepend(str(bundle))
        return bundle

    yield use
    purge()


def run_bundle(bundle: Path, config_files: list[str], *overrides: str, run_id: str | None = None,
               check: bool = True, timeout: int = 600, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` in the bundle folder, as a user runs it; output captured as text."""
    configs = config_files[0] if len(config_files) == 1 else "[" + ",".join(f"'{c}'" for c in config_files) + "]"
    cmd = [*(launcher or [sys.executable]), "-m", "monai.bundle", "run", *([run_id] if run_id else []),
           "--config_file", configs, "--meta_file", "configs/metadata.json",
           "--logging_file", "configs/logging.conf", *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def make_dataset_module() -> ModuleType:
    return load_module(REPO / "scripts" / "make_dataset.py", "make_dataset_tool")


@pytest.fixture(scope="session")
def synthetic_dataset(make_dataset_module, tmp_path_factory) -> Path:
    """7 synthetic cases of 32^3 with 3 classes: 4 training, 2 validation, 1 test."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    info = make_dataset_module.make_dataset("synthetic", out, num_cases=7, size=32, num_classes=3, seed=1)
    return info.path
