"""Shared fixtures: the repository, synthetic MSD datasets on disk, and running a bundle through its real CLI."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BUNDLES = REPO / "bundles"
VAE_BUNDLE = BUNDLES / "segresnet_vae_segmentation"
SELFREG_BUNDLE = BUNDLES / "selfreg_segmentation"
ALL_BUNDLES = sorted(p for p in BUNDLES.glob("*_segmentation") if p.is_dir())
# MONAI's published model-zoo metadata schema (MONAI-extra-test-data 0.8.1), kept here so the check runs offline.
SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"
# Tiny backbones for CLI tests: the crop each takes (SwinUNETR needs sizes divisible by 32 and more than one voxel
# at its bottleneck in training: 64^3), the bundle overrides that shrink it, and the same network built directly.
BACKBONE_ROI = {"segresnet": "[32,32,32]", "unet": "[32,32,32]", "swinunetr": "[64,64,64]"}
SMALL_BACKBONES = {
    "segresnet": ["--backbones#segresnet#init_filters", "8"],
    "unet": ["--backbones#unet#channels", "[8,16,32,64]", "--backbones#unet#strides", "[2,2,2]"],
    "swinunetr": ["--backbones#swinunetr#feature_size", "12"],
}


def small_backbone(name: str) -> torch.nn.Module:
    """The plain MONAI network that ``SMALL_BACKBONES[name]`` makes of the bundles' ``backbones`` (3 classes)."""
    from monai.networks import nets

    if name == "segresnet":
        return nets.SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3)
    if name == "unet":
        return nets.UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32, 64), strides=(2, 2, 2),
                         num_res_units=2, norm="instance")
    return nets.SwinUNETR(spatial_dims=3, in_channels=1, out_channels=3, feature_size=12)


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


def central_slices(dataset: Path, out: Path) -> Path:
    """A 3D MSD dataset's central axial slices as 2D NIfTI files under ``out``: same names, same dataset.json."""
    import nibabel as nib
    import numpy as np

    out.mkdir(parents=True)
    shutil.copy(dataset / "dataset.json", out / "dataset.json")
    for path in dataset.glob("*/*.nii.gz"):
        volume = nib.load(path)
        (out / path.parent.name).mkdir(exist_ok=True)
        slice_2d = np.asarray(volume.dataobj)[:, :, volume.shape[2] // 2]
        nib.save(nib.Nifti1Image(slice_2d, volume.affine), out / path.parent.name / path.name)
    return out


def assert_export_matches_eager(bundle: Path, checkpoint: Path, eager: torch.nn.Module, size: int, out: Path,
                                *overrides: str, trace: bool = False) -> None:
    """``monai.bundle ckpt_export`` of ``checkpoint`` with the bundle's inference.json (plus ``overrides``) gives a
    TorchScript model without hooks whose output on a random (1, 1, size, size, size) input matches ``eager``
    (the plain backbone, which must load ``checkpoint`` strictly: nothing method-specific was saved with it)."""
    eager.load_state_dict(torch.load(checkpoint, weights_only=True), strict=True)
    eager.eval()
    shape = [1, 1, size, size, size]
    trace_args = ["--use_trace", "True", "--input_shape", str(shape).replace(" ", "")] if trace else []
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "--net_id", "network_def",
                           "--filepath", str(out), "--ckpt_file", str(checkpoint), "--meta_file",
                           "configs/metadata.json", "--config_file", "configs/inference.json", "--bundle_root", ".",
                           *overrides, *trace_args], cwd=bundle, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripted = torch.jit.load(str(out)).eval()
    assert "hook" not in str(scripted.graph).lower()
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), rtol=1e-4, atol=1e-4)


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


@pytest.fixture(scope="session")
def semi_dataset(make_dataset_module, tmp_path_factory) -> Path:
    """The synthetic dataset with unlabeled images (SemSim): 7 cases of 32^3, 3 classes, 4 training of which the
    first 2 keep their label, 2 validation, 1 test."""
    out = tmp_path_factory.mktemp("data") / "semi"
    info = make_dataset_module.make_dataset("synthetic", out, num_cases=7, size=32, num_classes=3, seed=1, labeled=2)
    return info.path
