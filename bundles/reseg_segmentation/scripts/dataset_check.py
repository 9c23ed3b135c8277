# Generated from scripts/bundle_common/dataset_check.py by scripts/sync_bundle_common.py: edit that file, not this copy.
"""Refuse a bad dataset before any compute is spent.

Every image/label pair is read once with MONAI's readers (ITK or nibabel) and checked for the problems that
otherwise surface hours into training, or never: a missing or unreadable file, image/label shape or affine
mismatch, label values outside the declared classes, NaN/Inf intensities, a channel count that differs from the
network's, and fewer training cases than training processes. Unlabelled images (semi-supervised training) are
checked the same way, without a label. All problems are reported together, each with the file it concerns.
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


def _check_image(
    path: str, in_channels: int, loader: LoadImage
) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """Read one image and check its channel count and intensities; returns it, its affine and the problems."""
    image, affine, error = _load(path, loader)
    if image is None:
        return None, None, [error]
    problems = []
    if image.shape[0] != in_channels:
        problems.append(f"{path}: has {image.shape[0]} channel(s), the network expects {in_channels}")
    if not np.isfinite(image).all():
        problems.append(f"{path}: contains NaN or Inf intensities")
    return image, affine, problems


def _check_pair(item: dict, num_classes: int, in_channels: int, loader: LoadImage) -> tuple[int | None, list[str]]:
    """Problems of one image/label pair, and the image's number of spatial dimensions (None when unreadable)."""
    image_path, label_path = str(item["image"]), str(item["label"])
    image, image_affine, problems = _check_image(image_path, in_channels, loader)
    label, label_affine, label_error = _load(label_path, loader)
    if label_error:
        problems.append(label_error)
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
    return (None if image is None else image.ndim - 1), problems


def check_dataset(
    training: Sequence[dict],
    validation: Sequence[dict],
    num_classes: int = 2,
    in_channels: int = 1,
    world_size: int = 1,
    unlabeled: Sequence[dict] = (),
) -> int:
    """Check every ``{"image", "label"}`` pair and every unlabelled image; raise :class:`DatasetError` listing all
    problems.

    Args:
        training, validation: datalist items (paths already resolved).
        num_classes: label values must lie in ``0..num_classes-1``.
        in_channels: channels each image must have after channel-first loading.
        world_size: number of training processes; each needs at least one training and one validation case.
        unlabeled: ``{"image"}`` items for semi-supervised training; each image must be readable, finite, have
            ``in_channels`` channels and as many spatial dimensions as the labelled images.

    Returns:
        the number of items checked (pairs and unlabelled images).
    """
    problems = []
    for split, items in (("training", training), ("validation", validation)):
        if len(items) < world_size:
            problems.append(
                f"the dataset has {len(items)} {split} case(s), fewer than the {world_size} training processes: "
                "each process needs at least one; add cases or start fewer processes"
            )
    loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=None)
    pairs = [_check_pair(item, num_classes, in_channels, loader) for item in [*training, *validation]]
    problems.extend(problem for _, found in pairs for problem in found)
    labeled_dims = {dims for dims, _ in pairs if dims is not None}
    for item in unlabeled:
        path = str(item["image"])
        image, _, image_problems = _check_image(path, in_channels, loader)
        problems.extend(image_problems)
        if image is not None and labeled_dims and image.ndim - 1 not in labeled_dims:
            problems.append(
                f"{path}: has {image.ndim - 1} spatial dimension(s), the labelled images have "
                f"{' or '.join(map(str, sorted(labeled_dims)))}"
            )
    if problems:
        raise DatasetError("the dataset cannot be used for training:\n  - " + "\n  - ".join(problems))
    return len(training) + len(validation) + len(unlabeled)
