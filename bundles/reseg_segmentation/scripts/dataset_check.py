# Generated from scripts/bundle_common/dataset_check.py by scripts/sync_bundle_common.py: edit that file, not this copy.
"""Refuse a bad dataset before any compute is spent.

Every image/label pair is read once with MONAI's readers (ITK or nibabel) and checked for the problems that
otherwise surface hours into training, or never: a missing or unreadable file, image/label shape or affine
mismatch, label values outside the declared classes, NaN/Inf intensities, a channel count that differs from the
network's, and fewer training cases than training processes. All problems are reported together, each with the
file it concerns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from monai.transforms import LoadImage


class DatasetError(ValueError):
    """The dataset cannot be trained on; the message lists every problem found, one per line."""


def _load(path: str, loader: LoadImage) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    if not os.path.exists(path):
        return None, None, f"{path}: file does not exist"
    try:
        img = loader(path)
    except Exception as e:  # the readers raise many types; the message is what the user needs
        return None, None, f"{path}: cannot be read ({type(e).__name__}: {e})"
    return img.numpy(), np.asarray(img.affine), None


def _check_pair(item: dict, num_classes: int, in_channels: int, loader: LoadImage) -> list[str]:
    image_path, label_path = str(item["image"]), str(item["label"])
    image, image_affine, image_error = _load(image_path, loader)
    label, label_affine, label_error = _load(label_path, loader)
    problems = [e for e in (image_error, label_error) if e]
    if image is not None:
        if image.shape[0] != in_channels:
            problems.append(f"{image_path}: has {image.shape[0]} channel(s), the network expects {in_channels}")
        if not np.isfinite(image).all():
            problems.append(f"{image_path}: contains NaN or Inf intensities")
    if label is not None:
        values = np.unique(label)
        bad = values[(values < 0) | (values >= num_classes) | (values != np.round(values))]
        if bad.size:
            problems.append(
                f"{label_path}: label values {bad[:10].tolist()} are outside the {num_classes} declared classes "
                f"0..{num_classes - 1}"
            )
    if image is not None and label is not None:
        if image.shape[1:] != label.shape[1:]:
            problems.append(
                f"{label_path}: spatial shape {label.shape[1:]} differs from its image {image_path} {image.shape[1:]}"
            )
        elif not np.allclose(image_affine, label_affine, atol=1e-3):
            problems.append(f"{label_path}: affine differs from its image {image_path}")
    return problems


def check_dataset(
    training: Sequence[dict],
    validation: Sequence[dict],
    num_classes: int = 2,
    in_channels: int = 1,
    world_size: int = 1,
) -> int:
    """Check every ``{"image", "label"}`` pair; raise :class:`DatasetError` listing all problems.

    Args:
        training, validation: datalist items (paths already resolved).
        num_classes: label values must lie in ``0..num_classes-1``.
        in_channels: channels each image must have after channel-first loading.
        world_size: number of training processes; each needs at least one training and one validation case.

    Returns:
        the number of pairs checked.
    """
    problems = []
    for split, items in (("training", training), ("validation", validation)):
        if len(items) < world_size:
            problems.append(
                f"the dataset has {len(items)} {split} case(s), fewer than the {world_size} training processes: "
                "each process needs at least one; add cases or start fewer processes"
            )
    loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=None)
    for item in [*training, *validation]:
        problems.extend(_check_pair(item, num_classes, in_channels, loader))
    if problems:
        raise DatasetError("the dataset cannot be used for training:\n  - " + "\n  - ".join(problems))
    return len(training) + len(validation)
