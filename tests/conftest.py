"""Shared fixtures: synthetic MSD datasets on disk, a real MRI volume, and a bundle's code on the import path.
The test helpers (paths, tiny settings, bundle runs in process and through the CLI) are in helpers.py."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from types import ModuleType

import pytest
from helpers import REPO, in_bundle, load_module

@pytest.fixture
def bundle_on_path():
    """``use(bundle)`` makes ``bundle``'s ``scripts`` package the one imported, as ``monai.bundle run`` does in the
    bundle folder, until the test ends (or the next ``use``); through ``helpers.in_bundle``."""
    with ExitStack() as stack:

        def use(bundle: Path) -> Path:
            stack.close()
            return stack.enter_context(in_bundle(bundle))

        yield use


@pytest.fixture(scope="session")
def make_dataset_module() -> ModuleType:
    return load_module(REPO / "scripts" / "make_dataset.py", "make_dataset_tool")


@pytest.fixture(scope="session")
def synthetic_dataset(make_dataset_module, tmp_path_factory) -> Path:
    """7 synthetic cases of 32^3 with 3 classes: 4 training, 2 validation, 1 test."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    info = make_dataset_module.make_dataset("synthetic", out, num_cases=7, size=32, num_classes=3, seed=1)
    return info.path


@pytest.fixture(scope="session")
def semi_dataset(make_dataset_module, tmp_path_factory) -> Path:
    """The synthetic dataset with unlabeled images (SemSim): 7 cases of 32^3, 3 classes, 4 training of which the
    first 2 keep their label, 2 validation, 1 test."""
    out = tmp_path_factory.mktemp("data") / "semi"
    info = make_dataset_module.make_dataset("synthetic", out, num_cases=7, size=32, num_classes=3, seed=1, labeled=2)
    return info.path


@pytest.fixture(scope="session")
def dataset_for(synthetic_dataset, semi_dataset):
    """``dataset_for(method)``: the synthetic dataset, with unlabeled images where the method needs them."""
    return lambda method: semi_dataset if method.needs_unlabeled else synthetic_dataset


@pytest.fixture(scope="session")
def real_volume(make_dataset_module, tmp_path_factory) -> Path:
    """A real T1 MRI on disk: the held-out slab of the tissue dataset (MNI ICBM152 2009a, 197 x 233 x 38 at 1 mm),
    from the local cache or PyPI. Where it cannot be fetched, make_dataset writes synthetic NIfTI volumes instead
    (and says so on stdout); the test slab is then one of those."""
    info = make_dataset_module.make_dataset("tissue", tmp_path_factory.mktemp("data") / "tissue")
    return next((info.path / "imagesTs").glob("*.nii.gz"))
