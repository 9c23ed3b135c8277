"""make_dataset's 2D task (tissue2d), the protocol SemSim uses on ACDC: the tissue task's training and validation
slabs cut into axial 2D slices, K labelled training slices spread evenly and the rest unlabelled in the layout of
``--labeled`` (so the semi-supervised split finds them), the test slab kept as a 3D volume. On the real MNI volume
where it is cached or fetchable; otherwise both tasks fall back to the same synthetic volumes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import BUNDLES, bundle_scripts_module


@pytest.fixture(scope="module")
def tasks(make_dataset_module, tmp_path_factory) -> tuple[Path, Path]:
    """The tissue task and its 2D protocol with 3 labelled slices."""
    root = tmp_path_factory.mktemp("data")
    volumes = make_dataset_module.make_dataset("tissue", root / "tissue").path
    return volumes, make_dataset_module.make_dataset("tissue2d", root / "tissue2d", labeled=3).path


def stacked(dataset: Path, entries: list[dict], key: str) -> np.ndarray:
    return np.stack([np.asarray(nib.load(dataset / e[key]).dataobj) for e in entries], axis=-1)


def test_slices_restack_into_the_tissue_slabs(tasks):
    """Validation slices stack back into the validation slab, each slice's affine placing it where it was in the
    volume; the test slab is the same volume with its label."""
    volumes, slices = tasks
    meta3d, meta2d = (json.loads((d / "dataset.json").read_text()) for d in tasks)
    assert (meta3d["tensorImageSize"], meta2d["tensorImageSize"]) == ("3D", "2D")
    slab = nib.load(volumes / meta3d["validation"][0]["image"])
    for key in ("image", "label"):
        expected = np.asarray(nib.load(volumes / meta3d["validation"][0][key]).dataobj)
        np.testing.assert_array_equal(stacked(slices, meta2d["validation"], key), expected)
    for z, entry in enumerate(meta2d["validation"]):
        one = nib.load(slices / entry["image"])
        assert one.ndim == 2
        np.testing.assert_allclose(one.affine @ [0, 0, 0, 1], slab.affine @ [0, 0, z, 1])
    assert meta2d["test"] == meta3d["test"]
    for folder in ("imagesTs", "labelsTs"):
        name = Path(meta3d["test"][0]["image"]).name
        np.testing.assert_array_equal(nib.load(slices / folder / name).get_fdata(),
                                      nib.load(volumes / folder / name).get_fdata())


def test_k_labelled_slices_spread_evenly_and_the_rest_unlabelled(tasks):
    volumes, slices = tasks
    meta3d, meta2d = (json.loads((d / "dataset.json").read_text()) for d in tasks)
    training = meta2d["training"]
    depths = [nib.load(volumes / e["image"]).shape[2] for e in meta3d["training"]]
    assert len(training) == meta2d["numTraining"] == sum(depths)
    assert ["label" in e for e in training] == [True] * 3 + [False] * (len(training) - 3)
    # position of each labelled slice (<slab>_z<index>) in the training slabs laid end to end
    slabs = [Path(e["image"]).name.removesuffix(".nii.gz") for e in meta3d["training"]]
    offsets = dict(zip(slabs, np.cumsum([0, *depths[:-1]])))
    named = [re.fullmatch(r"(.+)_z(\d+)\.nii\.gz", Path(e["image"]).name) for e in training[:3]]
    positions = [offsets[m[1]] + int(m[2]) for m in named]
    part = sum(depths) / 3
    assert all(i * part <= p < (i + 1) * part for i, p in enumerate(positions)), positions  # one in each third
    assert sorted(p.name for p in (slices / "labelsTr").iterdir()) == sorted(
        Path(e["label"]).name for e in [*training[:3], *meta2d["validation"]])  # no label of an unlabelled slice
    data = bundle_scripts_module(BUNDLES / "template", "data")
    split = data.semi_supervised_split(str(slices / "dataset.json"), str(slices))
    counts = [len(split[k]) for k in ("training", "validation", "unlabeled")]
    assert counts == [3, len(meta2d["validation"]), len(training) - 3]
