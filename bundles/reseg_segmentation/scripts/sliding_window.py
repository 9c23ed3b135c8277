# Generated from bundles/template/scripts/sliding_window.py by scripts/generate_bundles.py: edit those, not this file.
"""Where the sliding-window inference keeps its stitched output, chosen from the volume size and the free memory.

MONAI's :class:`~monai.inferers.SlidingWindowInferer` runs the network on windows on ``sw_device`` and adds them into
the stitched output (one float per class and voxel, plus a count map) on ``device``; with ``buffer_steps`` it first
stitches that many rows of windows along ``buffer_dim`` on ``sw_device`` and copies each finished slab once.
:func:`choose_stitching` picks these three for the largest image of a run (read from the file headers, at the
planned spacing): the output stays on the network's device when it fits there, else it is stitched in host memory
with a buffer as large as the device holds. ``None`` is MONAI's default, the input's device (where the evaluator
put it: the network's), so the common case behaves exactly as an inferer without these arguments, under any
caller that places the input itself (MONAI Label). The configs read the choice through the ids ``sw_device``,
``stitch_device`` and ``buffer_steps``; a command-line override of an id replaces it, so it wins.

On a CPU-only machine both devices are the host: the choice changes nothing, and what lowers the peak is fewer
classes or a coarser spacing (docs/large_data.md measures it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import torch

from .memory import free_memory, host_available_memory

logger = logging.getLogger(__name__)

FLOAT_BYTES = 4
# Copies of the stitched output alive at the peak of one image: the stitched logits (plus their count map), their
# softmax (postprocessing's Activationsd) and the copy Invertd resamples back to the image's grid.
OUTPUT_COPIES = 3
# Inference memory per window voxel on the network's device (SegResNet with 16 filters: activations without
# gradients, a quarter of the plan's 2 KiB per voxel for a training step).
WINDOW_BYTES_PER_VOXEL = 512
# Share of the free memory a choice may plan to use (the rest: the allocator's fragmentation, other processes).
MEMORY_SHARE = 0.8


def stitching_for(
    shape: Sequence[int],
    num_classes: int,
    roi_size: Sequence[int],
    sw_batch_size: int,
    overlap: float,
    device: torch.device | str,
    device_free: int,
    host_free: int,
) -> dict[str, Any]:
    """The stitching of one volume of spatial ``shape`` (the network's input grid) into ``num_classes`` outputs.

    Args:
        shape: spatial shape of the largest image, e.g. ``(512, 512, 600)``.
        roi_size, sw_batch_size, overlap: the sliding window (``roi_size`` of the same length as ``shape``).
        device: where the network runs.
        device_free, host_free: free bytes on ``device`` and on the host.

    Returns:
        ``{"sw_device", "device", "buffer_steps", "output_gb", "why"}``: the first three are the arguments of
        ``SlidingWindowInferer`` (``device`` is where the output is stitched, None: the input's device;
        ``buffer_steps`` None is unbuffered).
    """
    device = torch.device(device)
    voxels = math.prod(shape)
    output = OUTPUT_COPIES * (num_classes + 1) * voxels * FLOAT_BYTES
    # the input (on the network's device already: the evaluator moves it there) and the windows in flight
    windows = voxels * FLOAT_BYTES + sw_batch_size * math.prod(roi_size) * WINDOW_BYTES_PER_VOXEL
    choice = {"sw_device": None, "device": None, "buffer_steps": None, "output_gb": round(output / 2**30, 3)}
    if device.type == "cpu":
        choice["why"] = f"the network runs on the CPU: the output ({choice['output_gb']} GB) is in host memory"
    elif output + windows <= MEMORY_SHARE * device_free:
        choice["why"] = f"the output ({choice['output_gb']} GB) fits {device}'s free memory"
    else:
        # A buffer of k window rows along the last axis: (k - 1) strides plus one window, the whole other extent.
        stride = max(1, int(roi_size[-1] * (1 - overlap)))
        rows = max(1, math.ceil((shape[-1] - roi_size[-1]) / stride) + 1)
        row_bytes = num_classes * math.prod(shape[:-1]) * stride * FLOAT_BYTES
        first_row = num_classes * math.prod(shape[:-1]) * roi_size[-1] * FLOAT_BYTES
        spare = MEMORY_SHARE * device_free - windows - first_row
        steps = min(rows, 1 + int(spare // row_bytes)) if spare >= 0 else 0
        choice["device"] = torch.device("cpu")
        choice["buffer_steps"] = steps or None
        choice["why"] = (
            f"the output ({choice['output_gb']} GB) does not fit {device}'s free memory "
            f"({device_free / 2**30:.2f} GB): stitched on the CPU, {steps or 'no'} window rows buffered on {device}"
        )
    on_host = device.type == "cpu" or choice["device"] is not None
    if on_host and output > host_free:
        logger.warning(
            f"sliding window: a volume of {list(shape)} voxels x {num_classes} classes needs about "
            f"{choice['output_gb']} GB of host memory, {host_free / 2**30:.2f} GB are available: the run may be "
            "killed; infer at a coarser --spacing, or free memory"
        )
    return choice


def _header_shape(path: str, spacing: Sequence[float]) -> list[int]:
    """The spatial shape of the image at ``path`` resampled to ``spacing`` (its header only, no voxel read)."""
    header = nib.load(path).header
    dims = len(spacing)
    shape, zooms = header.get_data_shape()[:dims], header.get_zooms()[:dims]
    return [max(1, math.ceil(n * z / s)) for n, z, s in zip(shape, zooms, spacing)]


def choose_stitching(
    images: Sequence[Mapping | str],
    spacing: Sequence[float],
    num_classes: int,
    roi_size: Sequence[int],
    sw_batch_size: int,
    overlap: float,
    device: torch.device | str,
    image_key: str = "image",
) -> dict[str, Any]:
    """:func:`stitching_for` the largest of ``images`` (datalist items or paths; a multi-channel item's first
    file) at ``spacing``, with the free memory of ``device`` and of the host now. Logged."""
    shapes = []
    for item in images:
        path = item[image_key] if isinstance(item, Mapping) else item
        path = path[0] if isinstance(path, (list, tuple)) else path
        try:
            shapes.append(_header_shape(str(path), spacing))
        except (OSError, nib.filebasedimages.ImageFileError) as e:  # not NIfTI: the loader reads it, or refuses it
            logger.warning(f"sliding window: no NIfTI header in {path} ({e}); the stitching is chosen without it")
    if not shapes:
        return {"sw_device": None, "device": None, "buffer_steps": None}
    largest = max(shapes, key=math.prod)
    roi = [min(r, s) for r, s in zip(roi_size, largest)] if len(roi_size) == len(largest) else list(roi_size)
    host = host_available_memory()
    choice = stitching_for(largest, num_classes, roi, sw_batch_size, overlap, device, free_memory(device), host)
    logger.info(f"sliding window for the largest image ({largest} voxels): {choice['why']}")
    return choice
