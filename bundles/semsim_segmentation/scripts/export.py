# Generated from bundles/template/scripts/export.py by scripts/generate_bundles.py: edit those, not this file.
"""The trained network as a ``torch.export`` program (``models/model.pt2``) that takes any window size the backbone
can take within stated bounds, and that program in place of the eager network at inference.

:func:`export_network` (``configs/export.json``, run id ``export``) exports the network of ``inference.json``
(``network_def``, built from the settings recorded with the model) holding the weights of ``models/model.pt``. The
batch size and every spatial size are dynamic: a spatial size is any multiple of the backbone's divisor
(:func:`scripts.backbones.required_divisor`) from 2 divisors up to ``max_size``. The file is written only once the
reloaded program (``torch.export.load``) matches the eager network on a window of the recorded ``roi_size``, and an
existing file is replaced only with ``overwrite``. The bounds travel inside the ``.pt2`` (:data:`BOUNDS_FILE`).

:func:`load_program` (``inference.json``, ``--network_program models/model.pt2``) reloads it as an
:class:`ExportedNetwork`, refusing a sliding window outside the bounds before any data is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import torch
from monai.networks import nets

from .backbones import required_divisor
from .checkpoints import load_weights
from .safe_io import replacing

# The export bounds, stored as an extra file inside the .pt2 archive.
BOUNDS_FILE = "bounds.json"
# The smallest spatial size, in divisors: torch.export specializes a size of 1, so a program exported with a bound of
# one divisor still refuses it (measured: SegResNet's, with a guard that the bottleneck is not one voxel); UNet's
# instance norm refuses a one-voxel bottleneck anyway. The bounds state what the program takes.
MIN_DIVISORS = 2
# Eager and reloaded program must agree within this (torch.testing.assert_close's rtol and atol, per logit).
TOLERANCE = 1e-4
# Backbones whose program would not take other sizes than the example's, and why (measured: docs/export.md).
FIXED_SIZE = {
    nets.SwinUNETR: (
        "MONAI 1.6.1's SwinUNETR cannot be exported with dynamic sizes: its BasicLayer.forward pads to whole windows "
        "with int(np.ceil(size / 7)), a plain Python number that torch.export fixes to the example's window count "
        "(the program then fails at other sizes with 'Guard failed: math.ceil(...) == ...'), and the export takes "
        "minutes. Export it at the sliding-window size with TorchScript tracing (ckpt_export --use_trace True) or "
        "ONNX (onnx_export), or choose --backbone segresnet or unet"
    )
}


def spatial_bounds(divisor: int, max_size: int) -> tuple[int, int]:
    """The smallest and largest spatial size of the program: multiples of ``divisor``. Refuses a ``max_size`` below
    the smallest size."""
    low, high = MIN_DIVISORS * divisor, max_size // divisor * divisor
    if high < low:
        raise ValueError(
            f"export_max_size {max_size} is below the smallest size the network takes ({low}, {MIN_DIVISORS} x its "
            f"divisor {divisor}): set --export_max_size to at least {low}"
        )
    return low, high


def dynamic_shapes(spatial_dims: int, divisor: int, max_size: int, max_batch: int) -> tuple[dict, ...]:
    """``torch.export`` dynamic shapes of the one input ``[batch, channels, *spatial]``: the batch from 1 to
    ``max_batch``, each spatial size ``divisor * n`` with n from :data:`MIN_DIVISORS` to ``max_size // divisor``."""
    low, high = spatial_bounds(divisor, max_size)
    dims = {0: torch.export.Dim("batch", min=1, max=max_batch)}
    for axis in range(spatial_dims):
        dims[2 + axis] = divisor * torch.export.Dim(f"size{axis}", min=low // divisor, max=high // divisor)
    return (dims,)


def check_window(bounds: Mapping, path: str, roi_size: Sequence[int], sw_batch_size: int, in_channels: int) -> None:
    """Refuse a sliding window the program ``path`` cannot take: ``roi_size`` off its spatial sizes, more windows at
    once than its largest batch, other input channels. ``bounds``: the program's :data:`BOUNDS_FILE`."""
    divisor, low, high = bounds["divisor"], bounds["min_size"], bounds["max_size"]
    problems = []
    if len(roi_size) != bounds["spatial_dims"]:
        problems.append(f"roi_size {list(roi_size)} has {len(roi_size)} axes, the program {bounds['spatial_dims']}")
    elif any(s % divisor or not low <= s <= high for s in roi_size):
        problems.append(f"roi_size {list(roi_size)} is not made of multiples of {divisor} from {low} to {high}")
    if sw_batch_size > bounds["max_batch"]:
        problems.append(f"sw_batch_size {sw_batch_size} is above the program's largest batch {bounds['max_batch']}")
    if in_channels != bounds["in_channels"]:
        problems.append(f"in_channels {in_channels} differs from the program's {bounds['in_channels']}")
    if problems:
        raise ValueError(
            f"{path} cannot run this sliding window: {'; '.join(problems)}. Change --roi_size / --sw_batch_size, or "
            "export again with larger bounds (run id 'export', --export_max_size / --export_max_batch)"
        )


def _weights(path: str) -> dict:
    state = load_weights(path, map_location="cpu")
    return state["model"] if isinstance(state.get("model"), Mapping) else state


def export_network(
    network: torch.nn.Module,
    weights: str,
    path: str,
    roi_size: Sequence[int],
    sw_batch_size: int,
    in_channels: int,
    device: torch.device | str = "cpu",
    max_size: int = 256,
    max_batch: int = 64,
    overwrite: bool = False,
) -> str:
    """Export ``network`` holding the state dict ``weights`` (``models/model.pt``) to ``path`` (``model.pt2``) with
    dynamic batch and spatial sizes (:func:`dynamic_shapes`), on ``device`` (the program runs on that device type).

    The program is checked before it is kept: reloaded from its temporary file with ``torch.export.load``, it must
    match the eager network within :data:`TOLERANCE` on a random window ``[1, in_channels, *roi_size]``, else
    nothing is written. ``roi_size`` and ``sw_batch_size`` (the inference window) must lie within the bounds. An
    existing ``path`` is refused unless ``overwrite``; a backbone of :data:`FIXED_SIZE` (SwinUNETR) is refused, with
    the reason. Returns ``path``."""
    reason = next((why for kind, why in FIXED_SIZE.items() if isinstance(network, kind)), None)
    if reason:
        raise ValueError(f"{path} is not written: {reason}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path} exists and is not overwritten: remove it, set --export_file to another path, or pass "
            "--overwrite True to replace it"
        )
    network.load_state_dict(_weights(weights))
    network = network.to(device).eval()
    divisor, spatial_dims = required_divisor(network), len(roi_size)
    low, high = spatial_bounds(divisor, max_size)
    bounds = {
        "divisor": divisor,
        "min_size": low,
        "max_size": high,
        "max_batch": max_batch,
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "device": torch.device(device).type,
        "torch": torch.__version__,
    }
    check_window(bounds, path, roi_size, sw_batch_size, in_channels)
    # batch 2 and two divisors per axis: torch.export would specialize an example size of 1
    example = torch.randn(2, in_channels, *[low] * spatial_dims, device=device)
    with torch.no_grad():
        program = torch.export.export(
            network, (example,), dynamic_shapes=dynamic_shapes(spatial_dims, divisor, max_size, max_batch)
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path, suffix=".pt2") as partial:
        torch.export.save(program, partial, extra_files={BOUNDS_FILE: json.dumps(bounds)})
        window = torch.randn(1, in_channels, *roi_size, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            expected, actual = network(window), torch.export.load(partial).module()(window)
        try:
            torch.testing.assert_close(actual, expected, rtol=TOLERANCE, atol=TOLERANCE)
        except AssertionError as e:
            raise RuntimeError(
                f"the program exported to {path} does not match the eager network, so nothing was written: {e}"
            ) from e
    return path


class ExportedNetwork(torch.nn.Module):
    """A reloaded ``torch.export`` program in place of the eager network: ``forward(x)`` takes
    ``[batch, in_channels, *spatial]`` within the program's bounds and returns the logits ``[batch, classes,
    *spatial]``.

    The program was exported in eval mode and torch refuses ``eval()``/``train()`` on it, so this module stays in
    eval mode and refuses training. ``load_state_dict`` does not change the program: it checks that the weights
    given (``models/model.pt``, which inference.json loads into its network) are the ones exported, so that a
    model retrained after its export is never run through a stale program."""

    def __init__(self, program: torch.nn.Module, path: str) -> None:
        super().__init__()
        self.program = program
        self.path = path
        self.training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedNetwork:
        if mode:
            raise RuntimeError(f"{self.path} is an exported program and cannot be trained: train the eager network")
        return self

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):
        exported = self.program.state_dict()
        differ = sorted(set(exported) ^ set(state_dict)) if strict else []
        differ += [
            k for k in exported if k in state_dict and not torch.equal(exported[k], state_dict[k].to(exported[k]))
        ]
        if differ:
            raise ValueError(
                f"the weights loaded into {self.path} are not the ones it was exported with ({len(differ)} tensors "
                f"differ, e.g. {differ[0]}): export the model again (run id 'export', --overwrite True), or drop "
                "--network_program to run the eager network"
            )
        return self.program.load_state_dict(state_dict, strict=strict)  # the same values: changes nothing


def load_program(
    path: str, device: torch.device | str, roi_size: Sequence[int], sw_batch_size: int, in_channels: int
) -> ExportedNetwork:
    """The program ``path`` (written by :func:`export_network`) as a network for the sliding-window inferer, after
    checking that it was exported for ``device``'s type and takes the window (:func:`check_window`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: export the trained model first (python -m monai.bundle run export "
            "--config_file \"['configs/inference.json','configs/export.json']\"), or drop --network_program"
        )
    extra = {BOUNDS_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    if not extra[BOUNDS_FILE]:
        raise ValueError(f"{path} has no {BOUNDS_FILE}: it was not written by this bundle's export (run id 'export')")
    bounds = json.loads(extra[BOUNDS_FILE])
    if bounds["device"] != torch.device(device).type:
        raise ValueError(
            f"{path} was exported on {bounds['device']} and inference runs on {torch.device(device).type}: export "
            f"again with --device {torch.device(device).type}, or run inference with --device {bounds['device']}"
        )
    check_window(bounds, path, roi_size, sw_batch_size, in_channels)
    return ExportedNetwork(program.module(), path)
