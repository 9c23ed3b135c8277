# Generated from bundles/template/scripts/slices.py by scripts/generate_bundles.py: edit those, not this file.
"""A 2-D network on 3-D volumes: whether a run segments its images slice by slice, and the volumes' geometry then.

A network trained on 2-D slices (``spatial_dims`` 2, the protocol SemSim follows on ACDC) segments a 3-D volume
slice by slice with MONAI's ``SliceInferer`` over the volume's last spatial axis (its ``spatial_dim`` 2 in the
configs). The volume is oriented with the model's 2-D orientation plus the axis it leaves out, placed last ("RA" ->
"RAS": axial slices), and resampled in plane only, so every slice is what training saw; inference.json's
``Invertd`` puts the 3-D segmentation back on the input's grid.
"""

from collections.abc import Sequence

from monai.transforms import LoadImage

_AXIS_CODES = ("RL", "AP", "SI")


def spatial_rank(path: str) -> int | None:
    """Spatial dimensions of the image at ``path`` after channel-first loading (a 4-D NIfTI's last axis is its
    channels, as the bundles load it); None when it cannot be read, which ``dataset_check`` reports by name."""
    try:
        return LoadImage(image_only=True, ensure_channel_first=True)(path).ndim - 1
    except Exception:  # any reader's error: the dataset check names the file and the problem
        return None


def slice_wise(items: Sequence[dict], spatial_dims: int, key: str = "image") -> bool:
    """True when a 2-D network is given 3-D images, so the run infers slice by slice. The first readable image
    decides; ``dataset_check`` then refuses images of the other rank by name. False without readable items."""
    if spatial_dims != 2:
        return False
    ranks = (spatial_rank(str(item[key])) for item in items)
    return next((rank for rank in ranks if rank is not None), None) == 3


def volume_axcodes(axcodes: str) -> str:
    """The 2-D orientation ``axcodes`` ("RA") with the axis it leaves out appended ("RAS"), as the slice axis.

    Raises:
        ValueError: ``axcodes`` is not two codes of different axes (R/L, A/P, S/I).
    """
    used = [next((pair for pair in _AXIS_CODES if code.upper() in pair), None) for code in axcodes]
    if len(axcodes) != 2 or None in used or used[0] == used[1]:
        raise ValueError(
            f"orientation {axcodes!r} of the 2-D model is not two codes of different axes (R/L, A/P, S/I, e.g. 'RA'):"
            " set --orientation to the one it was trained with"
        )
    left_out = next(pair for pair in _AXIS_CODES if pair not in used)
    return axcodes + left_out[0]


def image_geometry(orientation: str, spacing: Sequence[float], slice_wise: bool) -> dict:
    """The ``orientation`` and ``spacing`` the images are resampled to: the model's own, or for slice-wise
    inference the 3-D volume's (:func:`volume_axcodes`, and spacing 0 on the slice axis, which ``Spacingd`` and the
    HD95 metric read as each volume's own slice spacing)."""
    if not slice_wise:
        return {"orientation": orientation, "spacing": list(spacing)}
    return {"orientation": volume_axcodes(orientation), "spacing": [*spacing, 0.0]}
