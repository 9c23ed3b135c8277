"""The SemSim bundle through MONAI's bundle CLI on real NIfTI files: each backbone trains semi-supervised and saves
the plain backbone (whose exports test_export.py checks); supervised-only and plain FixMatch by zero weights;
unlabeled images from an imagesUnlabeled/ folder; the refusal of a run without unlabeled images and of a crop the
fusion module cannot window; resume, evaluation, inference, 2D training and 2-process DDP on CPU (gloo)."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    BACKBONE_ROI,
    BUNDLES,
    SMALL_BACKBONES,
    assert_plain_backbone_checkpoint,
    central_slices,
    run_bundle,
)

SEMSIM_BUNDLE = BUNDLES / "semsim_segmentation"
TINY = ["--spacing", "[1.5,1.5,1.5]", "--num_workers", "0", "--progress_bar", "False", "--sfm_feature_size", "32"]
TRAIN = ["configs/train.json"]
SEMSIM_TERMS = ("train_supervised", "train_unlabeled", "train_intra", "train_cross", "train_total")


def train(root: Path, dataset: Path, backbone: str = "segresnet", *extra: str, epochs: int = 1,
          configs: list[str] = TRAIN, **kwargs):
    return run_bundle(SEMSIM_BUNDLE, configs, "--bundle_root", str(root), "--dataset_dir", str(dataset),
                      "--max_epochs", str(epochs), "--backbone", backbone, "--roi_size", BACKBONE_ROI[backbone],
                      *SMALL_BACKBONES[backbone], *TINY, *extra, run_id="training", **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, semi_dataset):
    """Two epochs of SegResNet + SemSim whose outputs the other tests read."""
    root = tmp_path_factory.mktemp("semsim_run")
    proc = train(root, semi_dataset, epochs=2)
    return root, proc.stdout + proc.stderr


@pytest.mark.parametrize("backbone", ["segresnet", "unet", "swinunetr"])
def test_backbone_trains_semi_supervised_and_saves_the_plain_backbone(backbone, semi_dataset, tmp_path, trained):
    if backbone == "segresnet":
        root, log = trained
    else:
        root = tmp_path / "run"
        proc = train(root, semi_dataset, backbone)
        log = proc.stdout + proc.stderr
    for term in (*SEMSIM_TERMS, "val_mean_dice"):
        assert term in log, term
    # the plain backbone's keys: the fusion module is not part of the model
    assert_plain_backbone_checkpoint(root / "models/model.pt", backbone)


def test_checkpoint_keeps_the_fusion_module_for_resume(trained, semi_dataset, tmp_path):
    root, _ = trained
    checkpoint = torch.load(root / "models/checkpoint_epoch=2.pt", weights_only=True)
    assert {"model", "sfm", "optimizer", "lr_scheduler", "trainer"} <= set(checkpoint)
    resumed = tmp_path / "resumed"
    shutil.copytree(root, resumed)
    log = train(resumed, semi_dataset, epochs=3)
    log = log.stdout + log.stderr
    assert "resuming from iteration" in log and "epoch 2 until 3 epochs" in log, log[-2000:]
    assert "Epoch[1]" not in log and (resumed / "models/checkpoint_epoch=3.pt").is_file()


def test_zero_weights_give_supervised_only_and_plain_fixmatch(semi_dataset, synthetic_dataset, tmp_path):
    supervised = train(tmp_path / "sup", semi_dataset, "segresnet", "--unlabeled_weight", "0", "--intra_weight",
                       "0", "--cross_weight", "0")
    log = supervised.stdout + supervised.stderr
    assert "train_supervised" in log and "train_unlabeled" not in log and "train_intra" not in log
    # FixMatch on a fully labeled dataset whose unlabeled images come from an imagesUnlabeled/ folder
    dataset = tmp_path / "data"
    shutil.copytree(synthetic_dataset, dataset)
    (dataset / "imagesUnlabeled").mkdir()
    for path in sorted((dataset / "imagesTs").glob("*.nii.gz")) + sorted((dataset / "imagesTr").glob("*.nii.gz"))[:1]:
        shutil.copy(path, dataset / "imagesUnlabeled" / f"u_{path.name}")
    fixmatch = train(tmp_path / "fixmatch", dataset, "segresnet", "--intra_weight", "0", "--cross_weight", "0")
    log = fixmatch.stdout + fixmatch.stderr
    assert "train_unlabeled" in log and "train_intra" not in log and "train_cross" not in log
    assert "sfm" not in torch.load(tmp_path / "fixmatch/models/checkpoint_epoch=1.pt", weights_only=True)


def test_a_run_without_unlabeled_images_is_refused_unless_supervised_only(synthetic_dataset, tmp_path):
    proc = train(tmp_path / "semi", synthetic_dataset, check=False)
    assert proc.returncode != 0
    assert "unlabeled" in proc.stderr and "imagesUnlabeled" in proc.stderr
    assert "Epoch[" not in proc.stdout + proc.stderr
    train(tmp_path / "sup", synthetic_dataset, "segresnet", "--unlabeled_weight", "0", "--intra_weight", "0",
          "--cross_weight", "0")


def test_crop_the_fusion_module_cannot_window_is_refused_before_training(semi_dataset, tmp_path):
    proc = train(tmp_path, semi_dataset, "segresnet", "--roi_size", "[40,40,40]", "--sfm_window_size", "2",
                 check=False)
    assert proc.returncode != 0
    assert "roi_size [40, 40, 40] does not suit the Spatial-aware Fusion Module" in proc.stderr
    assert "Epoch[" not in proc.stdout + proc.stderr


def test_evaluate_and_infer_through_the_plain_backbone(trained, semi_dataset, tmp_path):
    root, _ = trained
    run_bundle(SEMSIM_BUNDLE, ["configs/train.json", "configs/evaluate.json"], "--bundle_root", str(root),
               "--dataset_dir", str(semi_dataset), "--eval_split", "test", "--roi_size", "[32,32,32]",
               *SMALL_BACKBONES["segresnet"], *TINY)
    rows = list(csv.DictReader(open(root / "eval/val_mean_dice_raw.csv")))
    assert len(rows) == 1 and set(rows[0]) == {"filename", "class0", "class1", "mean"}

    out = tmp_path / "pred"
    run_bundle(SEMSIM_BUNDLE, ["configs/inference.json"], "--bundle_root", str(root), "--dataset_dir",
               str(semi_dataset), "--output_dir", str(out), "--roi_size", "[32,32,32]", *SMALL_BACKBONES["segresnet"],
               "--spacing", "[1.5,1.5,1.5]", "--num_workers", "0")
    for image_path in sorted((semi_dataset / "imagesTs").glob("*.nii.gz")):
        pred = nib.load(out / image_path.name.replace(".nii.gz", "_seg.nii.gz"))
        image = nib.load(image_path)
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)


def test_two_process_ddp_training_on_cpu(semi_dataset, tmp_path):
    # per rank: 1 labeled and 1 unlabeled volume, 2 crops of each (CutMix needs 2 unlabeled crops)
    proc = train(tmp_path, semi_dataset, "segresnet", "--batch_size", "1", "--unlabeled_batch_size", "1",
                 "--num_samples", "2",
                 configs=["configs/train.json", "configs/multi_gpu_train.json"],
                 launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                           "--nproc_per_node=2"])
    log = proc.stdout + proc.stderr
    assert (tmp_path / "models/model.pt").is_file()
    assert "train_cross" in log and log.count("Key metric: val_mean_dice") == 1


@pytest.fixture
def dataset_2d(semi_dataset, tmp_path) -> Path:
    return central_slices(semi_dataset, tmp_path / "data2d")


def test_two_dimensional_training_with_the_same_code(dataset_2d, tmp_path):
    proc = train(tmp_path, dataset_2d, "unet", "--spatial_dims", "2", "--roi_size", "[32,32]", "--spacing",
                 "[1.5,1.5]", "--orientation", "RA")
    log = proc.stdout + proc.stderr
    assert all(term in log for term in SEMSIM_TERMS) and "val_mean_dice" in log
    state = torch.load(tmp_path / "models/model.pt", weights_only=True)
    assert state["model.0.conv.unit0.conv.weight"].ndim == 4  # Conv2d weights


def test_config_files_agree_on_the_backbones():
    train_config = json.loads((SEMSIM_BUNDLE / "configs/train.json").read_text())
    infer_config = json.loads((SEMSIM_BUNDLE / "configs/inference.json").read_text())
    for key in ("backbone", "backbones", "spatial_dims", "in_channels", "roi_size", "spacing", "orientation",
                "intensity_norm", "sw_overlap"):
        assert train_config[key] == infer_config[key], key
