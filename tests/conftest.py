"""Shared fixtures: the repository, synthetic MSD datasets on disk, and running a bundle through its real CLI."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

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


def assert_plain_backbone_checkpoint(checkpoint: Path, backbone: str) -> None:
    """``checkpoint`` (a trained run's models/model.pt) loads strictly into the plain ``small_backbone(backbone)``:
    nothing method-specific (feature taps, fusion modules, a teacher) was saved with it, so the exports that
    test_export.py and test_bundle_conventions.py check on the bundles' ``network_def`` apply to it."""
    small_backbone(backbone).load_state_dict(torch.load(checkpoint, weights_only=True), strict=True)


# Exported models must match eager PyTorch within these (rtol, atol) of torch.testing.assert_close: |exported - eager|
# <= atol + rtol * |eager| per voxel and class logit. Measured on the real-volume windows, logits up to 4-11:
# TorchScript 0 (the same CPU kernels), ONNX Runtime up to 8.2e-5 (its own kernels), so ONNX gets a 10x margin.
EXPORT_TOLERANCE = {"torchscript": (1e-4, 1e-4), "onnx": (1e-3, 1e-3)}
EXPORT_SUFFIX = {"torchscript": ".ts", "onnx": ".onnx"}


def overrides_from_cli(args: Sequence[str]) -> dict[str, Any]:
    """Command-line overrides such as ``SMALL_BACKBONES[name]`` (``["--key", "value", ...]``) as the keyword arguments
    of ``monai.bundle``'s Python functions, values read as Python literals as ``python -m monai.bundle`` reads them."""

    def value(text: str) -> Any:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):  # a bare word such as a backbone name
            return text

    return {key.removeprefix("--"): value(text) for key, text in zip(args[::2], args[1::2])}


@pytest.fixture(scope="session")
def real_volume(make_dataset_module, tmp_path_factory) -> Path:
    """A real T1 MRI on disk: the held-out slab of the tissue dataset (MNI ICBM152 2009a, 197 x 233 x 38 at 1 mm),
    from the local cache or PyPI. Where it cannot be fetched, make_dataset writes synthetic NIfTI volumes instead
    (and says so on stdout); the test slab is then one of those."""
    info = make_dataset_module.make_dataset("tissue", tmp_path_factory.mktemp("data") / "tissue")
    return next((info.path / "imagesTs").glob("*.nii.gz"))


def bundle_input_window(bundle: Path, image: Path, shape: Sequence[int]) -> torch.Tensor:
    """``image`` through the bundle's own inference preprocessing (inference.json ``preprocessing``: orientation,
    spacing, intensity normalisation), cut to a centred window of ``shape``, zero-padded where the volume is thinner:
    what the sliding-window inferer feeds the network, with a batch axis. The bundle must be on ``sys.path``."""
    from monai.bundle import ConfigParser
    from monai.transforms import ResizeWithPadOrCrop
    from monai.utils import convert_to_tensor

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    preprocessed = parser.get_parsed_content("preprocessing")({"image": str(image)})["image"]
    window = ResizeWithPadOrCrop(list(shape))(preprocessed)
    return convert_to_tensor(window, dtype=torch.float32, track_meta=False)[None]


def export_bundle_network(bundle: Path, fmt: str, out_dir: Path, input_shape: Sequence[int],
                          overrides: dict[str, Any], **export_args: Any) -> tuple[torch.nn.Module, Path]:
    """Export the bundle's ``network_def`` (inference.json plus ``overrides``) to ``fmt`` ("torchscript" or "onnx")
    with ``monai.bundle.ckpt_export`` / ``onnx_export``, the functions that ``python -m monai.bundle ckpt_export`` /
    ``onnx_export`` run, from a checkpoint of seeded weights (as the model zoo's CI makes one for its TorchScript
    check). ``input_shape`` is the traced / ONNX input; ``export_args`` are further arguments of the export function
    (``use_trace``, ``converter_kwargs``). The bundle must be on ``sys.path``: ``network_def`` may name its own code.
    Returns the eager network (holding the checkpoint's weights, in eval mode) and the exported file."""
    from monai.bundle import ConfigParser, ckpt_export, onnx_export

    config, meta = str(bundle / "configs/inference.json"), str(bundle / "configs/metadata.json")
    parser = ConfigParser()
    parser.read_config(config)
    parser.update(overrides)
    torch.manual_seed(0)
    eager = parser.get_parsed_content("network_def").eval()
    checkpoint = out_dir / "model.pt"
    torch.save(eager.state_dict(), checkpoint)
    exported = out_dir / f"model{EXPORT_SUFFIX[fmt]}"
    export = ckpt_export if fmt == "torchscript" else onnx_export
    export(net_id="network_def", filepath=str(exported), ckpt_file=str(checkpoint), meta_file=meta,
           config_file=config, bundle_root=str(bundle), input_shape=list(input_shape), **export_args, **overrides)
    return eager, exported


def run_exported(exported: Path, x: torch.Tensor) -> torch.Tensor:
    """An exported model's output on ``x``: TorchScript reloaded with ``torch.jit.load``, ONNX run by ONNX Runtime."""
    if exported.suffix == EXPORT_SUFFIX["torchscript"]:
        with torch.no_grad():
            return torch.jit.load(str(exported)).eval()(x)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(output)


def assert_export_matches_eager(eager: torch.nn.Module, exported: Path, x: torch.Tensor) -> None:
    """The reloaded export's output on ``x`` equals the eager network's within its format's EXPORT_TOLERANCE."""
    with torch.no_grad():
        expected = eager(x)
    fmt = next(f for f, suffix in EXPORT_SUFFIX.items() if exported.suffix == suffix)
    rtol, atol = EXPORT_TOLERANCE[fmt]
    torch.testing.assert_close(run_exported(exported, x), expected, rtol=rtol, atol=atol)


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
