# Generated from bundles/template/scripts/feature_taps.py by scripts/generate_bundles.py: edit those, not this file.
"""Forward hooks that read a backbone's intermediate features without changing its code, parameters or output,
and the parameter-free resizing used to compare two such features."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F

from .backbones import unwrap


class FeatureTaps:
    """Keep the outputs of named modules of ``network`` from its forward passes.

    By default (``training_only``) a hook stores only when its module is in training mode and autograd is on, so
    that validation and inference with the same network do no extra work; a frozen teacher run in eval mode under
    ``no_grad`` needs ``training_only=False``. Outputs are stored as plain tensors (MetaTensor metadata would be
    sliced along with the channels), channels first. ``pop()`` returns the features of the last forward pass and
    forgets them; ``remove()`` detaches the hooks.

    Args:
        network: the backbone; a DistributedDataParallel wrapper is unwrapped.
        names: module names from ``network.named_modules()``.
        channels_last: those of ``names`` whose output is (B, *S, C), e.g. Swin blocks; permuted to (B, C, *S).
        training_only: store only in training mode with autograd on.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        names: Sequence[str],
        channels_last: Collection[str] = (),
        training_only: bool = True,
    ) -> None:
        network = unwrap(network)
        modules = dict(network.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise ValueError(
                f"feature taps {missing} are not modules of {type(network).__name__}; "
                "names come from network.named_modules()"
            )
        self.names = list(dict.fromkeys(names))
        self.training_only = training_only
        self._channels_last = frozenset(channels_last)
        self._features: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.names]

    def _hook(self, name: str):
        channels_last = name in self._channels_last

        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not self.training_only or (module.training and torch.is_grad_enabled()):
                feature = output.as_subclass(torch.Tensor)
                self._features[name] = torch.movedim(feature, -1, 1) if channels_last else feature

        return hook

    def pop(self, strict: bool = True) -> dict[str, torch.Tensor]:
        """The stored features by module name; with ``strict``, refuse if a tapped module did not run."""
        features, self._features = self._features, {}
        missing = [name for name in self.names if name not in features]
        if strict and missing:
            needs = "a training-mode forward pass with autograd" if self.training_only else "a forward pass"
            raise RuntimeError(f"no features from {missing}: the taps need {needs} first")
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def pool_to_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, *S) adaptive-average-pooled to spatial ``size`` (1, 2 or 3 dims); returned as is when already there."""
    if list(x.shape[2:]) == list(size):
        return x
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(size)]
    return pool(x, size)
