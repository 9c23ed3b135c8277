"""The SelfReg bundle through MONAI's bundle CLI: each backbone trains on tiny data and saves the plain backbone
(whose exports test_export.py checks); lambda = 0 trains the plain baseline; resume, evaluation, inference, 2D
training, 2-process DDP on CPU (gloo) and the refusal of a window the backbone cannot take."""

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
    SELFREG_BUNDLE,
    SMALL_BACKBONES,
    assert_plain_backbone_checkpoint,
    central_slices,
    run_bundle,
)

TINY = ["--spacing", "[1.5,1.5,1.5]", "--num_workers", "0", "--progress_bar", "False"]
TRAIN = ["configs/train.json"]


def train(root: Path, dataset: Path, backbone: str = "segresnet", *extra: str, epochs: int = 1,
          configs: list[str] = TRAIN, **kwargs):
    return run_bundle(SELFREG_BUNDLE, configs, "--bundle_root", str(root), "--dataset_dir", str(dataset),
                      "--max_epochs", str(epochs), "--backbone", backbone, "--roi_size", BACKBONE_ROI[backbone],
                      *SMALL_BACKBONES[backbone], *TINY, *extra, run_id="training", **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dataset):
    """Two epochs of SegResNet + SelfReg whose outputs the other tests read."""
    root = tmp_path_factory.mktemp("selfreg_run")
    proc = train(root, synthetic_dataset, epochs=2)
    return root, proc.stdout + proc.stderr


@pytest.mark.parametrize("backbone", ["segresnet", "unet", "swinunetr"])
def test_backbone_trains_and_saves_the_plain_backbone(backbone, synthetic_dataset, tmp_path, trained):
    if backbone == "segresnet":
        root, log = trained
    else:
        root = tmp_path / "run"
        proc = train(root, synthetic_dataset, backbone)
        log = proc.stdout + proc.stderr
    for term in ("train_seg", "train_scr", "train_ifd", "train_total", "val_mean_dice"):
        assert term in log, term
    # the plain backbone's keys: nothing SelfReg-specific was saved
    assert_plain_backbone_checkpoint(root / "models/model.pt", backbone)


def test_zero_weight_trains_the_plain_baseline(synthetic_dataset, tmp_path):
    log = train(tmp_path, synthetic_dataset, "segresnet", "--selfreg_weight", "0")
    log = log.stdout + log.stderr
    assert "train_seg" in log and "train_scr" not in log and "train_ifd" not in log


def test_resume_continues_from_last_checkpoint(trained, synthetic_dataset, tmp_path):
    root, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(root, resumed)
    proc = train(resumed, synthetic_dataset, epochs=3)
    log = proc.stdout + proc.stderr
    assert "resuming from iteration" in log and "epoch 2 until 3 epochs" in log, log[-2000:]
    assert "Epoch[1]" not in log
    assert (resumed / "models/checkpoint_epoch=3.pt").is_file()


def test_evaluate_and_infer_through_the_plain_backbone(trained, synthetic_dataset, tmp_path):
    root, _ = trained
    run_bundle(SELFREG_BUNDLE, ["configs/train.json", "configs/evaluate.json"], "--bundle_root", str(root),
               "--dataset_dir", str(synthetic_dataset), "--eval_split", "test", "--roi_size", "[32,32,32]",
               *SMALL_BACKBONES["segresnet"], *TINY)
    rows = list(csv.DictReader(open(root / "eval/val_mean_dice_raw.csv")))
    assert len(rows) == 1 and set(rows[0]) == {"filename", "class0", "class1", "mean"}

    out = tmp_path / "pred"
    run_bundle(SELFREG_BUNDLE, ["configs/inference.json"], "--bundle_root", str(root), "--dataset_dir",
               str(synthetic_dataset), "--output_dir", str(out), "--roi_size", "[32,32,32]",
               *SMALL_BACKBONES["segresnet"], *TINY)
    for image_path in sorted((synthetic_dataset / "imagesTs").glob("*.nii.gz")):
        pred = nib.load(out / image_path.name.replace(".nii.gz", "_seg.nii.gz"))
        image = nib.load(image_path)
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)


def test_two_process_ddp_training_on_cpu(synthetic_dataset, tmp_path):
    proc = train(tmp_path, synthetic_dataset, configs=["configs/train.json", "configs/multi_gpu_train.json"],
                 launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                           "--nproc_per_node=2"])
    log = proc.stdout + proc.stderr
    assert (tmp_path / "models/model.pt").is_file()
    assert "Iter: 2/2" in log and "Iter: 4/4" not in log  # each rank trains on 2 of the 4 cases
    assert "train_scr" in log and log.count("Key metric: val_mean_dice") == 1


def test_window_the_backbone_cannot_take_is_refused_before_training(synthetic_dataset, tmp_path):
    proc = train(tmp_path, synthetic_dataset, "swinunetr", "--roi_size", "[48,48,48]", check=False)
    assert proc.returncode != 0
    assert "roi_size [48, 48, 48] does not suit SwinUNETR: every size must be divisible by 32" in proc.stderr
    assert "Epoch[" not in proc.stdout + proc.stderr


@pytest.fixture
def dataset_2d(synthetic_dataset, tmp_path) -> Path:
    return central_slices(synthetic_dataset, tmp_path / "data2d")


def test_two_dimensional_training_with_the_same_code(dataset_2d, tmp_path):
    proc = train(tmp_path, dataset_2d, "unet", "--spatial_dims", "2", "--roi_size", "[32,32]", "--spacing",
                 "[1.5,1.5]", "--orientation", "RA")
    log = proc.stdout + proc.stderr
    assert "train_scr" in log and "val_mean_dice" in log
    state = torch.load(tmp_path / "models/model.pt", weights_only=True)
    assert state["model.0.conv.unit0.conv.weight"].ndim == 4  # Conv2d weights


def test_config_files_agree_on_the_backbones():
    train_config = json.loads((SELFREG_BUNDLE / "configs/train.json").read_text())
    infer_config = json.loads((SELFREG_BUNDLE / "configs/inference.json").read_text())
    for key in ("backbone", "backbones", "spatial_dims", "in_channels", "roi_size", "spacing", "orientation",
                "intensity_norm", "sw_overlap"):
        assert train_config[key] == infer_config[key], key
