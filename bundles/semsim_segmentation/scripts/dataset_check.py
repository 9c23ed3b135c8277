# Generated from bundles/template/scripts/dataset_check.py by scripts/generate_bundles.py: edit those, not this file.
"""Refuse bad input before any compute is spent.

Every image (and label) is read once with MONAI's readers (ITK or nibabel) and checked for the problems that
otherwise surface hours into training, as an obscure error deep in a transform, or never:

- a datalist entry without ``image`` or ``label``; a missing, truncated, corrupt or non-image file;
- an image whose channel count or number of spatial dimensions is not the network's (a 2D image for a 3D network,
  a 4D multi-channel volume for a one-channel network), NaN/Inf intensities, a constant (blank) image, a voxel
  size of 0 in a NIfTI header;
- a label of several channels, with non-integer values or values outside the declared classes, whose shape or
  affine differs from its image's;
- fewer training cases than training processes.

Training checks image/label pairs and unlabelled images (:func:`check_dataset`), evaluation its labelled cases
(:func:`check_evaluation_cases`), inference its images only (:func:`check_images`). All problems are reported
together, each with the file it concerns. A volume smaller than the training crop is not a problem: the bundles'
transforms pad it to the crop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from monai.transforms import LoadImage
from nibabel.openers import ImageOpener

# More lines than this would bury the summary; the count of the rest is given instead.
MAX_LISTED_PROBLEMS = 50
_NIFTI = (".nii", ".nii.gz")


class DatasetError(ValueError):
    """The input cannot be used; the message lists every problem found, one per line."""


def _loader() -> LoadImage:
    return LoadImage(image_only=True, ensure_channel_first=True, dtype=None)


def _load(path: str, loader: LoadImage, context: str = "") -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """The array (channel first), its affine, and None; or None, None and the problem, which ends in ``context``
    (e.g. " (the label of image.nii.gz)")."""
    if not os.path.exists(path):
        return None, None, f"{path}: file does not exist{context}"
    try:
        img = loader(path)
    except Exception as e:  # the readers raise many types; the message is what the user needs
        return (
            None,
            None,
            (
                f"{path}: cannot be read{context}: a truncated or corrupt file, or not an image MONAI reads (NIfTI, "
                f"NRRD, MHA/MHD, a DICOM series folder) ({type(e).__name__}: {str(e)[:300]})"
            ),
        )
    return img.numpy(), np.asarray(img.affine), None


def _zero_voxel_size(path: str, spatial_dims: int) -> str | None:
    """The problem of a NIfTI file whose header gives a voxel size of 0 and no sform: nibabel silently reads such a
    size as 1 mm, so the loaded affine hides it. (ITK refuses a zero spacing itself: "cannot be read".)"""
    if not path.lower().endswith(_NIFTI):
        return None
    header = nib.load(path).header
    if header.get_sform(coded=True)[1] > 0:
        return None  # the affine comes from the sform, not from the voxel sizes
    with ImageOpener(path) as f:
        raw = type(header).from_fileobj(f, check=False)
    sizes = [float(s) for s in raw["pixdim"][1 : 1 + spatial_dims]]
    if 0.0 not in sizes:
        return None
    return (
        f"{path}: the header's voxel size {sizes} has a zero (nibabel reads it as 1 mm, so resampling to --spacing "
        "would distort the volume): write the file again with its true voxel size"
    )


def _image_problems(
    path: str, image: np.ndarray, in_channels: int, spatial_dims: int, slice_wise: bool = False
) -> list[str]:
    problems = []
    if slice_wise and image.ndim - 1 != 3:
        problems.append(
            f"{path}: has {image.ndim - 1} spatial dimension(s) (shape {list(image.shape[1:])}), but this run segments "
            "3D volumes slice by slice with the 2D network (its first image is 3D): give 3D volumes only, and the "
            "2D images in a run of their own"
        )
    elif not slice_wise and image.ndim - 1 != spatial_dims:
        problems.append(
            f"{path}: has {image.ndim - 1} spatial dimension(s) (shape {list(image.shape[1:])}), the network is "
            f"{spatial_dims}D: give {spatial_dims}D images or set --spatial_dims {image.ndim - 1} (with --roi_size, "
            "--spacing and --orientation of that many entries)"
        )
    elif (problem := _zero_voxel_size(path, image.ndim - 1)) is not None:
        problems.append(problem)
    if image.shape[0] != in_channels:
        problems.append(
            f"{path}: has {image.shape[0]} channel(s), the network expects {in_channels}: set --in_channels "
            f"{image.shape[0]} or give {in_channels}-channel images (a 4D NIfTI's last axis is its channels)"
        )
    finite = np.isfinite(image)
    if not finite.all():
        problems.append(f"{path}: contains NaN or Inf intensities ({int((~finite).sum())} voxels)")
    else:
        flat = image.reshape(image.shape[0], -1)
        constant = [c for c in range(image.shape[0]) if flat.shape[1] and flat[c].min() == flat[c].max()]
        for c in constant:
            where = f"channel {c} of {image.shape[0]}" if image.shape[0] > 1 else "every voxel"
            problems.append(
                f"{path}: {where} has the same intensity {flat[c, 0].item()}: a blank volume, with nothing to "
                "segment; remove it from the datalist or export it again"
            )
    return problems


def _check_image(
    path: str, in_channels: int, spatial_dims: int, loader: LoadImage, context: str = "", slice_wise: bool = False
) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """Read one image and check it; returns it, its affine and the problems."""
    image, affine, error = _load(path, loader, context)
    if image is None:
        return None, None, [error]
    return image, affine, _image_problems(path, image, in_channels, spatial_dims, slice_wise)


def _label_problems(path: str, label: np.ndarray, num_classes: int) -> list[str]:
    problems = []
    if label.shape[0] != 1:
        problems.append(
            f"{path}: label has {label.shape[0]} channels: a label is one channel of class indices "
            f"0..{num_classes - 1} (one-hot or multi-channel labels are not supported)"
        )
    values = np.unique(label)
    if not np.isfinite(values).all():
        return [*problems, f"{path}: label contains NaN or Inf values"]
    fractional = values[values != np.round(values)]
    if fractional.size:
        problems.append(
            f"{path}: label values {fractional[:10].tolist()} are not integers: a label holds class indices (was it "
            "resampled with linear interpolation, or saved as probabilities?); resample labels with nearest neighbour"
        )
    integral = values[values == np.round(values)]
    bad = integral[(integral < 0) | (integral >= num_classes)]
    if bad.size:
        problems.append(
            f"{path}: label values {bad[:10].tolist()} are outside the {num_classes} declared classes "
            f"0..{num_classes - 1}: fix the label, or the datalist's 'labels' / --class_names"
        )
    return problems


def _check_pair(
    item: dict,
    num_classes: int,
    in_channels: int,
    spatial_dims: int,
    loader: LoadImage,
    where: str,
    slice_wise: bool = False,
) -> list[str]:
    """Problems of one ``{"image", "label"}`` entry; ``where`` names it in the datalist ("training case 3")."""
    missing = [key for key in ("image", "label") if key not in item]
    if missing:
        keys = " or ".join(repr(key) for key in missing)
        return [f"{where} has no {keys} ({item}): every case needs 'image' and 'label'"]
    image_path, label_path = str(item["image"]), str(item["label"])
    image, image_affine, problems = _check_image(
        image_path, in_channels, spatial_dims, loader, f" (the image of label {label_path})", slice_wise
    )
    label, label_affine, label_error = _load(label_path, loader, f" (the label of image {image_path})")
    if label_error:
        return [*problems, label_error]
    problems.extend(_label_problems(label_path, label, num_classes))
    if image is not None:
        if image.shape[1:] != label.shape[1:]:
            problems.append(
                f"{label_path}: spatial shape {label.shape[1:]} differs from its image {image_path} {image.shape[1:]}"
            )
        elif not np.allclose(image_affine, label_affine, atol=1e-3):
            problems.append(f"{label_path}: affine differs from its image {image_path}")
    return problems


def _raise(problems: list[str], what: str) -> None:
    if not problems:
        return
    listed = problems[:MAX_LISTED_PROBLEMS]
    if len(problems) > len(listed):
        listed.append(f"... and {len(problems) - len(listed)} more")
    raise DatasetError(f"{what}; fix or remove these and run again:\n  - " + "\n  - ".join(listed))


def check_dataset(
    training: Sequence[dict],
    validation: Sequence[dict],
    num_classes: int = 2,
    in_channels: int = 1,
    world_size: int = 1,
    unlabeled: Sequence[dict] = (),
    spatial_dims: int = 3,
    datalist: str | None = None,
) -> int:
    """Check every ``{"image", "label"}`` pair and every unlabelled image; raise :class:`DatasetError` listing all
    problems.

    Args:
        training, validation: datalist items (paths already resolved).
        num_classes: label values must be integers in ``0..num_classes-1``.
        in_channels: channels each image must have after channel-first loading.
        world_size: number of training processes; each needs at least one training and one validation case.
        unlabeled: ``{"image"}`` items for semi-supervised training, checked as images.
        spatial_dims: spatial dimensions every image must have (the network's).
        datalist: the datalist file the items come from, named in the message.

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
    loader = _loader()
    for split, items in (("training", training), ("validation", validation)):
        for index, item in enumerate(items):
            problems.extend(_check_pair(item, num_classes, in_channels, spatial_dims, loader, f"{split} case {index}"))
    for item in unlabeled:
        problems.extend(_check_image(str(item["image"]), in_channels, spatial_dims, loader, " (an unlabeled image)")[2])
    _raise(problems, f"the dataset{f' of {datalist}' if datalist else ''} cannot be used for training")
    return len(training) + len(validation) + len(unlabeled)


def check_evaluation_cases(
    items: Sequence[dict],
    num_classes: int = 2,
    in_channels: int = 1,
    spatial_dims: int = 3,
    datalist: str | None = None,
    slice_wise: bool = False,
) -> int:
    """Check the ``{"image", "label"}`` cases to evaluate as :func:`check_dataset` checks training pairs; raise
    :class:`DatasetError` listing all problems. ``slice_wise``: a 2D network segments them as 3D volumes slice by
    slice (``scripts.slices``), so they must be 3D. Returns the number of cases."""
    loader = _loader()
    problems = [
        problem
        for index, item in enumerate(items)
        for problem in _check_pair(
            item, num_classes, in_channels, spatial_dims, loader, f"evaluation case {index}", slice_wise
        )
    ]
    _raise(problems, f"the cases to evaluate{f' from {datalist}' if datalist else ''} cannot be used")
    return len(items)


def check_images(
    items: Sequence[dict], in_channels: int = 1, spatial_dims: int = 3, key: str = "image", slice_wise: bool = False
) -> int:
    """Check the images to segment (inference: no labels); raise :class:`DatasetError` listing all problems.
    ``slice_wise`` as in :func:`check_evaluation_cases`. Returns the number of images."""
    loader = _loader()
    problems = [
        problem
        for item in items
        for problem in _check_image(str(item[key]), in_channels, spatial_dims, loader, "", slice_wise)[2]
    ]
    _raise(problems, "the images to segment cannot be used")
    return len(items)
