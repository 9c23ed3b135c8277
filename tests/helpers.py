"""Test helpers: the repository's paths and methods (from the registry), tiny settings, a bundle run in this process
through ``monai.bundle.ConfigWorkflow`` (as the model zoo's unit tests run bundles) or through the real CLI, and the
export checks. Imported by the tests as ``from helpers import ...``; the fixtures live in conftest.py."""

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
# The repository's tools import each other as top-level modules, as they do when run as scripts/<tool>.py.
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

from bundle_env import bundle_imports, bundle_module  # noqa: E402,F401  (bundle_module: for the tests)
from method_registry import Method, all_methods  # noqa: E402

BUNDLES = REPO / "bundles"
METHODS: tuple[Method, ...] = all_methods()
ALL_BUNDLES = sorted(m.bundle_dir for m in METHODS)
VAE_BUNDLE = BUNDLES / "segresnet_vae_segmentation"
SELFREG_BUNDLE = BUNDLES / "selfreg_segmentation"
# MONAI's published model-zoo metadata schema (MONAI-extra-test-data 0.8.1), kept here so the check runs offline.
SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"
# Tiny backbones: the crop each takes (SwinUNETR needs sizes divisible by 32 and more than one voxel at its
# bottleneck in training: 64 x 32 x 32, 2 x 1 x 1 there; a 64^3 crop costs SemSim's SwinUNETR run 5x the time), the
# bundle overrides that shrink it, and the same network built directly.
BACKBONE_ROI = {"segresnet": "[32,32,32]", "unet": "[32,32,32]", "swinunetr": "[64,32,32]"}
SMALL_BACKBONES = {
    "segresnet": ["--backbones#segresnet#init_filters", "8"],
    # four strides (the configs' default): ReSeg's three levels need an encoder and a decoder map of equal shape each
    "unet": ["--backbones#unet#channels", "[4,8,16,32,64]"],
    "swinunetr": ["--backbones#swinunetr#feature_size", "12"],
}
# Tiny data settings of every bundle run in the tests (32^3 synthetic volumes).
# "--iterations_per_epoch 0": an epoch is one pass over the few tiny cases, not the recipe's fixed count.
TINY = ["--spacing", "[1.5,1.5,1.5]", "--num_workers", "0", "--progress_bar", "False", "--iterations_per_epoch", "0"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]


def method_params(methods: Sequence[Method] = METHODS) -> list:
    """``methods`` as pytest parameters named after the methods."""
    return [pytest.param(m, id=m.name) for m in methods]


def small_backbone(name: str) -> torch.nn.Module:
    """The plain MONAI network that ``SMALL_BACKBONES[name]`` makes of the bundles' ``backbones`` (3 classes)."""
    from monai.networks import nets

    if name == "segresnet":
        return nets.SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3)
    if name == "unet":
        return nets.UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16, 32, 64),
                         strides=(2, 2, 2, 2), num_res_units=2, norm="instance")
    return nets.SwinUNETR(spatial_dims=3, in_channels=1, out_channels=3, feature_size=12)


def small_run_cli(method: Method, backbone: str = "segresnet") -> list[str]:
    """Command-line overrides of a tiny run of ``method`` on ``backbone``: the tiny data settings, the backbone at
    its smallest crop and size, and the registry's ``small_run`` for the method's own parts."""
    return ["--backbone", backbone, "--roi_size", BACKBONE_ROI[backbone], *SMALL_BACKBONES[backbone], *TINY,
            *method.small_run]


def overrides_from_cli(args: Sequence[str]) -> dict[str, Any]:
    """Command-line overrides such as ``SMALL_BACKBONES[name]`` (``["--key", "value", ...]``) as the keyword arguments
    of ``monai.bundle``'s Python functions, values read as Python literals as ``python -m monai.bundle`` reads them."""

    def value(text: str) -> Any:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):  # a bare word such as a backbone name
            return text

    return {key.removeprefix("--"): value(text) for key, text in zip(args[::2], args[1::2])}


def small_run(method: Method, backbone: str = "segresnet") -> dict[str, Any]:
    """``small_run_cli`` as ConfigWorkflow overrides."""
    return overrides_from_cli(small_run_cli(method, backbone))


def load_module(path: Path, name: str | None = None) -> ModuleType:
    """Import one file without relative imports (a tool, or a template module) under a unique name."""
    name = name or "_".join(path.with_suffix("").parts[-3:])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Within the block, the bundle's ``scripts`` package is the one imported, and ``sys.path`` is restored after it.
in_bundle = bundle_imports


def bundle_scripts_module(bundle: Path, name: str) -> ModuleType:
    """``scripts.<name>`` of one bundle, imported through ``bundle_imports``. The module object stays usable after
    the block; modules of one bundle that must share classes are imported in one ``in_bundle`` block instead."""
    import importlib

    with in_bundle(bundle):
        return importlib.import_module(f"scripts.{name}")


def workflow(bundle: Path, configs: Sequence[str], workflow_type: str | None, run_id: str = "run",
             initialize: bool = True, **overrides: Any):
    """The bundle's ``configs`` (names under configs/, or relative paths such as "configs/train.json") as one
    ``ConfigWorkflow`` with ``overrides``, as ``python -m monai.bundle run`` builds it; initialized unless asked
    not to. Call it inside ``in_bundle(bundle)``. Logging is left to the test process (no logging.conf)."""
    from monai.bundle import ConfigWorkflow

    files = [str(bundle / "configs" / Path(c).name) for c in configs]
    flow = ConfigWorkflow(config_file=files, meta_file=str(bundle / "configs/metadata.json"), logging_file=False,
                          workflow_type=workflow_type, run_id=run_id, **overrides)
    if initialize:
        flow.initialize()
    return flow


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
    nothing method-specific (feature taps, fusion modules, a teacher, a DDP wrapper) was saved with it, so the
    exports that test_export.py and test_bundle_conventions.py check on the bundles' ``network_def`` apply to it."""
    small_backbone(backbone).load_state_dict(torch.load(checkpoint, weights_only=True), strict=True)


def assert_predictions_match_inputs(images: Sequence[Path], out: Path, num_classes: int = 3) -> None:
    """One ``<name>_seg.nii.gz`` per input image in ``out``, with the input's shape and affine, holding labels."""
    import nibabel as nib
    import numpy as np

    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == sorted(
        p.name.replace(".nii.gz", "_seg.nii.gz") for p in images)
    for image_path in images:
        image = nib.load(image_path)
        pred = nib.load(out / image_path.name.replace(".nii.gz", "_seg.nii.gz"))
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj))) <= set(range(num_classes))


# Exported models must match eager PyTorch within these (rtol, atol) of torch.testing.assert_close: |exported - eager|
# <= atol + rtol * |eager| per voxel and class logit. Measured on the real-volume windows, logits up to 4-11:
# TorchScript 0 (the same CPU kernels), ONNX Runtime up to 8.2e-5 (its own kernels), so ONNX gets a 10x margin.
EXPORT_TOLERANCE = {"torchscript": (1e-4, 1e-4), "onnx": (1e-3, 1e-3)}
EXPORT_SUFFIX = {"torchscript": ".ts", "onnx": ".onnx"}


def bundle_input_window(bundle: Path, image: Path, shape: Sequence[int]) -> torch.Tensor:
    """``image`` through the bundle's own inference preprocessing (inference.json ``preprocessing``: orientation,
    spacing, intensity normalisation), cut to a centred window of ``shape``, zero-padded where the volume is thinner:
    what the sliding-window inferer feeds the network, with a batch axis. Call it inside ``in_bundle(bundle)``."""
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
    (``use_trace``, ``converter_kwargs``). Call it inside ``in_bundle(bundle)``: ``network_def`` may name its code.
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


def run_bundle(bundle: Path, config_files: Sequence[str], *overrides: str, run_id: str | None = None,
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


def refusal_in_process(bundle: Path, configs: Sequence[str], run_id: str, never_built: str, **overrides: Any) -> str:
    """Run the bundle's workflow in this process as ``monai.bundle run`` does, expecting a refusal; return the text
    of the refusal and of its causes. ``never_built``: the config id (trainer, evaluator) that must not have been
    built. Call it inside ``in_bundle(bundle)``."""
    flow = workflow(bundle, configs, None, run_id=run_id, initialize=False, **overrides)

    def initialize_and_run() -> None:
        flow.initialize()
        flow.run()

    with pytest.raises(Exception) as err:
        initialize_and_run()
    assert never_built not in flow.parser.ref_resolver.resolved_content, f"{never_built} was built"
    messages, error = [], err.value
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    return "\n".join(messages)
