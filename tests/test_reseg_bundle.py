"""The ReSeg bundle through MONAI's bundle CLI: stage 1 then stage 2 on tiny data for each backbone (one command for
both stages), the refusal of stage 2 without a stage-1 checkpoint, a = 0 as the plain baseline without a teacher,
a stage-2 model.pt that is the plain backbone (whose exports test_export.py checks), evaluation and inference with
the stage-2 model, stage 2 in 2-process DDP on CPU (gloo), and 2D training."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BACKBONE_ROI, BUNDLES, assert_plain_backbone_checkpoint, central_slices, run_bundle

RESEG_BUNDLE = BUNDLES / "reseg_segmentation"
TINY = ["--spacing", "[1.5,1.5,1.5]", "--num_workers", "0", "--progress_bar", "False", "--max_epochs", "1"]
STAGE_2 = ["configs/train.json"]
BOTH = ["configs/train.json", "configs/train_reconstruction.json"]
SMALL = {
    "segresnet": ["--backbones#segresnet#init_filters", "8"],
    # four strides: ReSeg's three levels need an encoder and a decoder map of equal shape each
    "unet": ["--backbones#unet#channels", "[4,8,16,32,64]"],
    "swinunetr": ["--backbones#swinunetr#feature_size", "12"],
}


def run(root: Path, dataset: Path, configs: list[str], backbone: str = "segresnet", *extra: str,
        run_id: str = "training", **kwargs):
    return run_bundle(RESEG_BUNDLE, configs, "--bundle_root", str(root), "--dataset_dir", str(dataset),
                      "--backbone", backbone, "--roi_size", BACKBONE_ROI[backbone], *SMALL[backbone], *TINY, *extra,
                      run_id=run_id, **kwargs)


def assert_stage_logs(log: str) -> None:
    for term in ("train_mse", "train_l1", "val_reconstruction_mse"):  # stage 1
        assert term in log, term
    assert "Restored all variables from" in log and "reconstruction.pt" in log  # the teacher's checkpoint
    for term in ("train_seg", "train_opt", "train_total", "val_mean_dice"):  # stage 2
        assert term in log, term


@pytest.fixture(scope="module")
def segresnet_run(tmp_path_factory, synthetic_dataset):
    """Stage 1, then stage 2, as two commands on SegResNet."""
    root = tmp_path_factory.mktemp("reseg_run")
    first = run(root, synthetic_dataset, BOTH)
    assert (root / "models/reconstruction.pt").is_file()
    second = run(root, synthetic_dataset, STAGE_2)
    return root, first.stdout + first.stderr + second.stdout + second.stderr


@pytest.mark.parametrize("backbone", ["segresnet", "unet", "swinunetr"])
def test_both_stages_train_end_to_end(backbone, synthetic_dataset, tmp_path, segresnet_run):
    if backbone == "segresnet":
        root, log = segresnet_run
    else:  # one command, both stages in order
        root = tmp_path / "run"
        proc = run(root, synthetic_dataset, BOTH, backbone, run_id="training_all")
        log = proc.stdout + proc.stderr
        assert log.index("val_reconstruction_mse") < log.index("train_opt")
    assert_stage_logs(log)
    for name in ("model.pt", "reconstruction.pt", "checkpoint_epoch=1.pt", "reconstruction_checkpoint_epoch=1.pt"):
        assert (root / "models" / name).is_file(), name


def test_stage_two_without_checkpoint_is_refused_with_the_command(synthetic_dataset, tmp_path):
    proc = run(tmp_path, synthetic_dataset, STAGE_2, check=False)
    assert proc.returncode != 0
    assert f"ReSeg stage 2 needs the stage-1 reconstruction network {tmp_path}/models/reconstruction.pt" in proc.stderr
    assert "configs/train_reconstruction.json" in proc.stderr and "training_all" in proc.stderr
    assert "Epoch[" not in proc.stdout + proc.stderr and "Loading dataset" not in proc.stderr


@pytest.mark.parametrize("configs", ["stage 2", "both stages"])
def test_zero_weight_trains_the_plain_baseline_without_a_teacher(configs, synthetic_dataset, tmp_path):
    if configs == "stage 2":
        proc = run(tmp_path, synthetic_dataset, STAGE_2, "segresnet", "--reseg_weight", "0")
    else:  # the one command for both stages skips stage 1, which the baseline does not need
        proc = run(tmp_path, synthetic_dataset, BOTH, "segresnet", "--reseg_weight", "0", run_id="training_all")
        assert "stage 1 is skipped" in proc.stdout + proc.stderr
    log = proc.stdout + proc.stderr
    assert "train_seg" in log and "train_opt" not in log and "Restored all variables" not in log
    assert "train_mse" not in log and not (tmp_path / "models/reconstruction.pt").exists()


def test_stage_two_saves_the_plain_backbone(segresnet_run):
    root, _ = segresnet_run
    # nothing ReSeg-specific (no teacher, no feature taps) was saved with the segmentation network
    assert_plain_backbone_checkpoint(root / "models/model.pt", "segresnet")


def test_two_dimensional_training_with_the_same_code(synthetic_dataset, tmp_path):
    data_2d = central_slices(synthetic_dataset, tmp_path / "data2d")
    root = tmp_path / "run"
    proc = run(root, data_2d, BOTH, "unet", "--spatial_dims", "2", "--roi_size", "[32,32]", "--spacing",
               "[1.5,1.5]", "--orientation", "RA", run_id="training_all")
    assert_stage_logs(proc.stdout + proc.stderr)
    state = torch.load(root / "models/model.pt", weights_only=True)
    assert state["model.0.conv.unit0.conv.weight"].ndim == 4  # Conv2d weights


def test_evaluate_and_infer_with_the_stage_two_model(segresnet_run, synthetic_dataset, tmp_path):
    root, _ = segresnet_run
    run(root, synthetic_dataset, ["configs/train.json", "configs/evaluate.json"], "segresnet", "--eval_split", "test",
        run_id=None)
    rows = list(csv.DictReader(open(root / "eval/val_mean_dice_raw.csv")))
    assert len(rows) == 1 and set(rows[0]) == {"filename", "class0", "class1", "mean"}  # the one test case
    assert 0 <= float(rows[0]["mean"]) <= 1
    test_images = sorted((synthetic_dataset / "imagesTs").glob("*.nii.gz"))
    assert [Path(rows[0]["filename"]).name] == [p.name for p in test_images]  # the test split, not validation
    hd95 = list(csv.DictReader(open(root / "eval/val_hd95_raw.csv")))
    assert len(hd95) == 1 and hd95[0]["filename"] == rows[0]["filename"]

    out = tmp_path / "pred"
    run_bundle(RESEG_BUNDLE, ["configs/inference.json"], "--bundle_root", str(root), "--dataset_dir",
               str(synthetic_dataset), "--output_dir", str(out), "--roi_size", BACKBONE_ROI["segresnet"],
               *SMALL["segresnet"], "--spacing", "[1.5,1.5,1.5]", "--num_workers", "0")
    assert len(list(out.glob("*_seg.nii.gz"))) == len(test_images)
    for image_path in test_images:
        pred = nib.load(out / image_path.name.replace(".nii.gz", "_seg.nii.gz"))
        image = nib.load(image_path)
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}


def test_two_process_ddp_stage_two_on_cpu(segresnet_run, synthetic_dataset, tmp_path):
    root, _ = segresnet_run
    (tmp_path / "models").mkdir()
    shutil.copy(root / "models/reconstruction.pt", tmp_path / "models/reconstruction.pt")  # stage 1 runs in one process
    proc = run(tmp_path, synthetic_dataset, ["configs/train.json", "configs/multi_gpu_train.json"],
               launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                         "--nproc_per_node=2"])
    log = proc.stdout + proc.stderr
    assert (tmp_path / "models/model.pt").is_file() and (tmp_path / "models/checkpoint_epoch=1.pt").is_file()
    assert "Iter: 2/2" in log and "Iter: 4/4" not in log  # each rank trains on 2 of the 4 cases
    teacher = tmp_path / "models/reconstruction.pt"
    assert log.count(f"Restored all variables from {teacher}") == 2, log[-3000:]  # each rank loads the teacher
    assert "train_opt" in log and log.count("Key metric: val_mean_dice") == 1
    state = torch.load(tmp_path / "models/model.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in state)  # the plain backbone, not the DDP wrapper
