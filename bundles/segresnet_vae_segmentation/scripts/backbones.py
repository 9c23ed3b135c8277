# Generated from bundles/template/scripts/backbones.py by scripts/generate_bundles.py: edit those, not this file.
"""The bundles' backbones, and checks on them that otherwise fail late and obscurely: an unknown backbone name, a
crop or window size the backbone cannot take, a checkpoint saved from another network."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from monai.networks import nets

from .checkpoints import UntrustedCheckpointError, load_weights

# The backbones the method code knows (feature taps, divisors, encoder stages): the keys of the configs' "backbones".
BACKBONES = ("segresnet", "unet", "swinunetr")
# Keys named in a refusal; the counts of all are given.
_LISTED_KEYS = 5


def select_backbone(
    networks: Mapping[str, torch.nn.Module | Callable[..., torch.nn.Module]], name: str, settings: Mapping | None = None
) -> torch.nn.Module:
    """The network of the configs' ``backbones`` that ``--backbone`` names; the others are disabled in the config,
    so ``networks`` holds at most this one. Refuses a name the bundles do not know, with the known ones.

    The configs build each backbone with ``_mode_: callable``, a ``functools.partial`` of its constructor and
    arguments (so that training can record them with the model, ``scripts/settings.py``); it is called here, with
    ``settings`` (the arguments recorded with a trained model) over the config's arguments."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: set --backbone to one of {', '.join(BACKBONES)}")
    if name not in networks:
        raise ValueError(f"backbone {name!r} has no entry in the config's 'backbones': restore backbones#{name}")
    network = networks[name]
    if isinstance(network, torch.nn.Module):
        return network
    return network(**dict(settings or {}))


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


def _first(keys: Sequence[str]) -> str:
    listed = ", ".join(keys[:_LISTED_KEYS])
    return f"{listed} and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else listed


def check_checkpoint(network: torch.nn.Module, path: str) -> str:
    """Refuse a checkpoint that is missing, unreadable, or saved from another network than ``network`` (other
    backbone, sizes, classes or channels), naming the file and the mismatched keys, before any data is loaded.

    The checkpoint is a state dict, or ``{"model": state_dict, ...}`` (a training checkpoint), as MONAI's
    CheckpointLoader and MONAI Label accept. Returns ``path``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: train the bundle first (run id 'training'), or set --bundle_root / "
            "--ckpt_dir to the run that has models/model.pt"
        )
    try:
        state = load_weights(path, map_location="cpu")
    except UntrustedCheckpointError:
        raise  # its own message says why the file is refused
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise ValueError(f"checkpoint {path} cannot be read as a PyTorch state dict ({type(e).__name__}: {e})") from e
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    expected = unwrap(network).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [
        f"{key} {list(state[key].shape)} (network {list(value.shape)})"
        for key, value in expected.items()
        if key in state and hasattr(state[key], "shape") and tuple(state[key].shape) != tuple(value.shape)
    ]
    if missing or unexpected or reshaped:
        kinds = ((missing, "missing keys"), (unexpected, "unexpected keys"), (reshaped, "keys of another shape"))
        found = [f"{len(keys)} {what}: {_first(keys)}" for keys, what in kinds if keys]
        raise ValueError(
            f"checkpoint {path} does not fit this {type(unwrap(network)).__name__}: it was saved from another "
            f"network. {'; '.join(found)}. Use the checkpoint of this network, or the --backbone and network "
            "settings (backbones#..., class names, in_channels, spatial_dims) it was trained with"
        )
    return path
