# Generated from bundles/template/scripts/intensity.py by scripts/generate_bundles.py: edit those, not this file.
"""MR intensity normalisation: z-scoring with the statistics of the head, found by Otsu's threshold.

Z-scoring over the whole image ties a tissue's value to how much of the field of view the head fills: on the MNI
tissue slabs grey matter lands at z = 2.9, 2.0, 1.1 and 1.0 on the four slabs (the head fills 10-39 % of each), so
a model trained on two slabs sees the held-out slab's tissue two standard deviations away. Over the voxels above
the image's Otsu threshold (the head, whether the background is zero or noise) grey matter lands at -0.7 to 0.0
and white matter at 0.9 to 1.3 on the same slabs, and the brain of the three ``brain`` heads (two zero
backgrounds, ROBEX's noise) at -0.4 to 0.1. nnU-Net's alternative, the non-zero voxels, fails on noise
backgrounds (``scripts/plan.py``).
"""

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

ZSCORE_REGIONS = ("foreground", "image")


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape): the upper edge of the histogram bin (of ``bins`` between the
    minimum and maximum) that maximises the between-class variance of the values at or below it and those above.
    A constant input returns its value."""
    flat = values.detach().flatten().double()
    low, high = float(flat.min()), float(flat.max())
    if high <= low:
        return low
    counts = torch.histc(flat, bins=bins, min=low, max=high)
    width = (high - low) / bins
    centres = low + (torch.arange(bins, dtype=torch.float64) + 0.5) * width
    below = counts.cumsum(0)
    above = below[-1] - below
    sum_below = (counts * centres).cumsum(0)
    mean_below = sum_below / below.clamp_min(1)
    mean_above = (sum_below[-1] - sum_below) / above.clamp_min(1)
    between = below * above * (mean_below - mean_above) ** 2
    return low + (int(between.argmax()) + 1) * width


class ForegroundZScored(MapTransform):
    """Z-score every channel of ``keys`` (channel-first, any spatial rank) with the mean and standard deviation of
    its voxels above the channel's Otsu threshold (``over="foreground"``), or of all its voxels (``over="image"``,
    MONAI's ``NormalizeIntensity`` without ``nonzero``: what models trained before 0.5.0 expect). Every voxel is
    shifted and scaled, background included. A channel whose region has no spread is only shifted."""

    def __init__(self, keys: KeysCollection, over: str = "foreground", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if over not in ZSCORE_REGIONS:
            raise ValueError(f"the z-score region must be one of {ZSCORE_REGIONS}, got {over!r}")
        self.over = over

    def _statistics(self, channel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        region = channel.flatten()
        if self.over == "foreground":
            above = region[region > otsu_threshold(region)]
            region = above if above.numel() > 1 else region
        std = region.std()
        return region.mean(), torch.where(std > 0, std, torch.ones_like(std))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key].float()
            stats = [self._statistics(image[c]) for c in range(image.shape[0])]
            shape = (-1,) + (1,) * (image.ndim - 1)
            mean = torch.stack([m for m, _ in stats]).reshape(shape)
            std = torch.stack([s for _, s in stats]).reshape(shape)
            d[key] = (image - mean) / std
        return d
