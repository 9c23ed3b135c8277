# Generated from scripts/bundle_common/backbones.py by scripts/sync_bundle_common.py: edit that file, not this copy.
"""Checks on MONAI backbones that fail late and obscurely when their input size is wrong."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks import nets


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The backbone inside a DistributedDataParallel wrapper (its module names and type are the backbone's)."""
    if isinstance(network, torch.nn.parallel.DistributedDataParallel):
        return network.module
    return network


def required_divisor(network: torch.nn.Module) -> int:
    """The number every spatial size of a training crop or sliding window must be divisible by.

    SegResNet halves the resolution len(blocks_down) - 1 times; UNet divides by the product of its strides;
    SwinUNETR by 2**5 (patch size 2 and four merges). Other networks: 1 (no check).
    """
    network = unwrap(network)
    if isinstance(network, nets.SwinUNETR):
        return 32
    if isinstance(network, nets.SegResNet):
        return 2 ** (len(network.blocks_down) - 1)
    if isinstance(network, nets.UNet):
        return math.prod(int(s) for s in network.strides)
    return 1


def check_roi_size(network: torch.nn.Module, roi_size: Sequence[int]) -> tuple[int, ...]:
    """Refuse a crop/window size the backbone cannot take, before any data is loaded. Returns the size."""
    size = tuple(int(s) for s in roi_size)
    divisor = required_divisor(network)
    bad = [s for s in size if s % divisor]
    if bad:
        raise ValueError(
            f"roi_size {list(size)} does not suit {type(network).__name__}: every size must be divisible by "
            f"{divisor}; set --roi_size to e.g. {[max(divisor, round(s / divisor) * divisor) for s in size]}"
        )
    return size
