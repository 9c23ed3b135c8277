"""A 2D model segments 3D volumes slice by slice: the paper's 2D protocol (tissue2d: training and validation on
axial slices, evaluation and inference on the held-out slab as a volume). The template's inference.json and
evaluate.json pick MONAI's SliceInferer when the model is 2D and the images are 3D (scripts/slices.py); a real 2D
training of the SemSim bundle on the 2D slice task is evaluated and run on the 3D test volume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import pytest
from helpers import (
    ALL_BUNDLES,
    BUNDLES,
    METHODS,
    assert_predictions_match_inputs,
    bundle_scripts_module,
    in_bundle,
    small_run,
    workflow,
)

TEMPLATE = BUNDLES / "template"
SEMSIM = next(m for m in METHODS if m.name == "semsim")
# A tiny 2D run: 3 mm in plane (the MNI slices become 66 x 78), 32 x 32 crops, a few validation slices.
TINY_2D = {"spatial_dims": 2, "roi_size": [32, 32], "spacing": [3.0, 3.0], "orientation": "RA"}


@pytest.fixture(scope="module")
def slice_task(make_dataset_module, tmp_path_factory) -> Path:
    """tissue2d with 3 labelled training slices (the real MNI slabs; synthetic volumes cut the same way where they
    cannot be fetched)."""
    return make_dataset_module.make_dataset("tissue2d", tmp_path_factory.mktemp("data") / "tissue2d", labeled=3).path


def test_the_slice_wise_choice_is_the_templates_in_every_bundle():
    """Every bundle's inference.json and evaluate.json choose the inferer and the volume geometry as the template
    does: one logic, generated into all of them."""
    for name in ("inference.json", "evaluate.json"):
        template = json.loads((TEMPLATE / "configs" / name).read_text())
        ids = [k for k in template if k in ("slice_wise", "image_geometry", "slice_inferer", "volume_preprocessing")
               or k.endswith("#inferer") or k.endswith("#transform")]
        assert {"slice_wise", "image_geometry", "slice_inferer"} <= set(ids), ids
        for bundle in ALL_BUNDLES:
            config = json.loads((bundle / "configs" / name).read_text())
            assert {k: config[k] for k in ids} == {k: template[k] for k in ids}, (bundle, name)
            evaluator = config.get("evaluator", {}).get("inferer") or config["validate#evaluator#inferer"]
            assert evaluator.startswith("$@slice_inferer if @slice_wise else"), (bundle, name)


def test_which_images_are_segmented_slice_by_slice(slice_task):
    slices = bundle_scripts_module(TEMPLATE, "slices")
    volume = {"image": str(next((slice_task / "imagesTs").glob("*.nii.gz")))}
    one_slice = {"image": str(next((slice_task / "imagesTr").glob("*.nii.gz")))}
    assert slices.slice_wise([volume], spatial_dims=2)
    assert not slices.slice_wise([one_slice], spatial_dims=2)  # 2D images: the plain sliding window
    assert not slices.slice_wise([volume], spatial_dims=3)
    assert slices.image_geometry("RA", [3.0, 3.0], True) == {"orientation": "RAS", "spacing": [3.0, 3.0, 0.0]}
    assert slices.volume_axcodes("LS") == "LSA"  # a coronal 2D model slices over A/P
    with pytest.raises(ValueError, match="'RL'.*--orientation"):
        slices.volume_axcodes("RL")
    check = bundle_scripts_module(TEMPLATE, "dataset_check")
    with pytest.raises(check.DatasetError, match=f"{one_slice['image']}: has 2 spatial dimension.*3D volumes only"):
        check.check_images([volume, one_slice], spatial_dims=2, slice_wise=True)


def test_a_2d_semsim_model_evaluates_and_segments_the_3d_test_volume(slice_task, tmp_path):
    """Train SemSim 2D on the slice task (validation on 2D slices), then evaluate.json on the test split and
    inference.json: both run the 2D network slice by slice on the 3D volume, with Dice and HD95 per volume and a
    3D segmentation on the input's grid."""
    bundle, root = SEMSIM.bundle_dir, tmp_path / "run"
    run = {**small_run(SEMSIM, "unet"), **TINY_2D, "bundle_root": str(root), "dataset_dir": str(slice_task)}
    with in_bundle(bundle):
        flow = workflow(bundle, SEMSIM.training.configs, "train", max_epochs=1,
                        **{**run, "iterations_per_epoch": 4, "validate#dataset#data": "$@data_split['validation'][:3]"})
        flow.run()
        assert 0 <= flow.parser.get_parsed_content("validate#evaluator").state.metrics["val_mean_dice"] <= 1
        flow.finalize()
        assert json.loads((root / "models/model_settings.json").read_text())["spatial_dims"] == 2

        flow = workflow(bundle, ["train.json", "evaluate.json"], "eval", eval_split="test", **run)
        assert flow.parser.get_parsed_content("slice_wise")
        flow.run()
        flow.finalize()
        # Inference reads every setting from the model's record: only the folders are given.
        pred = tmp_path / "pred"
        flow = workflow(bundle, ["inference.json"], "infer", bundle_root=str(root), dataset_dir=str(slice_task),
                        output_dir=str(pred), num_workers=0)
        assert type(flow.parser.get_parsed_content("evaluator").inferer).__name__ == "SliceInferer"
        flow.run()
        flow.finalize()
    volumes = sorted((slice_task / "imagesTs").glob("*.nii.gz"))
    assert all(len(nib.load(v).shape) == 3 for v in volumes)
    for metric in ("val_mean_dice", "val_hd95"):
        rows = list(csv.DictReader(open(root / f"eval/{metric}_raw.csv")))
        assert [Path(r["filename"]).name for r in rows] == [v.name for v in volumes]
        assert 0 <= float(rows[0]["mean"]) < (1.0 if metric == "val_mean_dice" else float("inf")), rows
    assert_predictions_match_inputs(volumes, pred)
