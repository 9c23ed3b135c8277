"""The SegResNet-VAE bundle end to end through MONAI's bundle CLI: configs, training and resume, evaluation,
inference and 2-process DDP on CPU (gloo). The model-zoo checks shared by all bundles (TorchScript export among
them) are in test_bundle_conventions.py, the ONNX export in test_export.py."""

from __future__ import annotations

import csv
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import VAE_BUNDLE, run_bundle
from monai.bundle import ConfigWorkflow

TINY = ["--roi_size", "[32,32,32]", "--spacing", "[1.5,1.5,1.5]", "--num_workers", "0", "--progress_bar", "False"]
TRAIN = ["configs/train.json"]
EVALUATE = ["configs/train.json", "configs/evaluate.json"]
INFER = ["configs/inference.json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dataset):
    """One short training run (2 epochs) whose outputs the other tests read."""
    root = tmp_path_factory.mktemp("vae_run")
    proc = run_bundle(VAE_BUNDLE, TRAIN, "--bundle_root", str(root), "--dataset_dir", str(synthetic_dataset),
                      "--max_epochs", "2", *TINY, run_id="training")
    return root, proc.stdout + proc.stderr


def test_training_writes_model_and_checkpoint(trained):
    root, log = trained
    assert (root / "models/model.pt").is_file()
    assert (root / "models/checkpoint_epoch=2.pt").is_file()
    for term in ("train_dice", "train_l2", "train_kl", "train_total", "val_mean_dice", "val_dice_class_1"):
        assert term in log, term
    assert list(root.glob("eval/events.out.tfevents.*")), "no TensorBoard log"


def test_model_pt_is_a_plain_segresnet_state_dict(trained):
    from monai.networks.nets import SegResNet

    root, _ = trained
    state = torch.load(root / "models/model.pt", weights_only=True)
    assert not [k for k in state if k.startswith("vae_")]
    SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3).load_state_dict(state, strict=True)


def test_resume_continues_from_last_checkpoint_with_mlflow(trained, synthetic_dataset, tmp_path):
    root, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(root, resumed)
    proc = run_bundle(VAE_BUNDLE, TRAIN, "--bundle_root", str(resumed), "--dataset_dir", str(synthetic_dataset),
                      "--max_epochs", "3", "--tracking", "mlflow", *TINY, run_id="training")
    log = proc.stdout + proc.stderr
    assert "resuming from iteration" in log and "epoch 2 until 3 epochs" in log, log[-2000:]
    assert "Epoch[1]" not in log, [l for l in log.splitlines() if "Epoch[1]" in l]  # epochs 1-2 not retrained
    assert (resumed / "models/checkpoint_epoch=3.pt").is_file()
    assert (resumed / "eval/mlruns.db").stat().st_size > 0, "no MLflow run recorded"


def test_evaluate_writes_per_class_metrics(trained, synthetic_dataset):
    root, _ = trained
    proc = run_bundle(VAE_BUNDLE, EVALUATE, "--bundle_root", str(root), "--dataset_dir", str(synthetic_dataset), *TINY)
    assert "val_hd95" in proc.stdout + proc.stderr
    for metric in ("val_mean_dice", "val_hd95"):
        with open(root / f"eval/{metric}_raw.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 2  # the two validation cases
        assert set(rows[0]) == {"filename", "class0", "class1", "mean"}  # per foreground class and per case
    dice = [float(r["mean"]) for r in csv.DictReader(open(root / "eval/val_mean_dice_raw.csv"))]
    assert all(0.0 <= d <= 1.0 for d in dice)


def test_evaluate_on_held_out_test_split(trained, synthetic_dataset):
    root, _ = trained
    run_bundle(VAE_BUNDLE, EVALUATE, "--bundle_root", str(root), "--dataset_dir", str(synthetic_dataset),
               "--eval_split", "test", *TINY)
    rows = list(csv.DictReader(open(root / "eval/val_mean_dice_raw.csv")))
    assert [r["filename"].split("/")[-2] for r in rows] == ["imagesTs"]


def test_inference_writes_nifti_with_input_geometry(trained, synthetic_dataset, tmp_path):
    root, _ = trained
    out = tmp_path / "pred"
    run_bundle(VAE_BUNDLE, INFER, "--bundle_root", str(root), "--dataset_dir", str(synthetic_dataset),
               "--output_dir", str(out), *TINY)
    for image_path in sorted((synthetic_dataset / "imagesTs").glob("*.nii.gz")):
        image = nib.load(image_path)
        pred = nib.load(out / image_path.name.replace(".nii.gz", "_seg.nii.gz"))
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}


def test_inference_refuses_to_write_into_the_input_folder(trained, synthetic_dataset):
    root, _ = trained
    before = sorted(p.name for p in (synthetic_dataset / "imagesTs").iterdir())
    proc = run_bundle(VAE_BUNDLE, INFER, "--bundle_root", str(root), "--dataset_dir", str(synthetic_dataset),
                      "--output_dir", str(synthetic_dataset / "imagesTs"), *TINY, check=False)
    assert proc.returncode != 0
    assert "is an input folder" in proc.stderr
    assert sorted(p.name for p in (synthetic_dataset / "imagesTs").iterdir()) == before


def test_two_process_ddp_training_on_cpu(synthetic_dataset, tmp_path):
    proc = run_bundle(VAE_BUNDLE, ["configs/train.json", "configs/multi_gpu_train.json"], "--bundle_root",
                      str(tmp_path), "--dataset_dir", str(synthetic_dataset), "--max_epochs", "1", *TINY,
                      run_id="training",
                      launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                                "--nproc_per_node=2"])
    assert (tmp_path / "models/model.pt").is_file()
    log = proc.stdout + proc.stderr
    # DistributedSampler gives each of the 2 ranks 2 of the 4 training cases; only rank 0 logs (and with the
    # progress bar disabled, rank 1 must still keep its ValidationHandler, or the metric all-gather hangs up).
    assert "Iter: 2/2" in log and "Iter: 4/4" not in log
    assert log.count("train_loss: ") == 2 and log.count("Key metric: val_mean_dice") == 1


def test_wrong_crop_is_refused_before_training(synthetic_dataset, tmp_path):
    proc = run_bundle(VAE_BUNDLE, TRAIN, "--bundle_root", str(tmp_path), "--dataset_dir", str(synthetic_dataset),
                      "--max_epochs", "1", *TINY, "--network_def#input_image_size", "[48,48,48]",
                      run_id="training", check=False)
    assert proc.returncode != 0
    assert "training crop [32, 32, 32] (RandCropByPosNegLabeld) differs from SegResNetVAE input_image_size " \
           "[48, 48, 48]" in proc.stderr
    assert "Epoch[" not in proc.stdout + proc.stderr
    assert not (tmp_path / "models").exists()


def test_bad_dataset_is_refused_before_training(synthetic_dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_dataset, broken)
    label = next((broken / "labelsTr").glob("*.nii.gz"))
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.uint8) + 5, img.affine), label)
    proc = run_bundle(VAE_BUNDLE, TRAIN, "--bundle_root", str(tmp_path / "run"), "--dataset_dir", str(broken),
                      "--max_epochs", "1", *TINY, run_id="training", check=False)
    assert proc.returncode != 0
    assert f"{label}: label values" in proc.stderr and "outside the 3 declared classes" in proc.stderr
    assert "Epoch[" not in proc.stdout + proc.stderr


def test_paper_settings_are_one_override_away(synthetic_dataset, tmp_path, bundle_on_path):
    """configs/paper_settings.json on top of train.json gives Myronenko's network and optimisation settings."""
    bundle_on_path(VAE_BUNDLE)
    workflow = ConfigWorkflow(config_file=[str(VAE_BUNDLE / "configs/train.json"),
                                           str(VAE_BUNDLE / "configs/paper_settings.json")],
                              meta_file=str(VAE_BUNDLE / "configs/metadata.json"), workflow_type="train",
                              bundle_root=str(tmp_path), dataset_dir=str(synthetic_dataset))
    workflow.initialize()
    net = workflow.parser.get_parsed_content("network_def")
    assert (net.init_filters, net.vae_nz, net.vae_estimate_std) == (32, 128, True)
    assert list(net.input_image_size) == [160, 192, 128] and net.dropout is not None
    assert workflow.parser.get_parsed_content("check_crop") == (160, 192, 128)
    assert workflow.parser.get_parsed_content("optimizer").defaults["lr"] == 1e-4
    # Paper configuration (in 4, out 3) has 24.8 M parameters; with one input channel a few hundred fewer.
    assert 24.7e6 < sum(p.numel() for p in net.parameters()) < 24.9e6


@pytest.mark.parametrize("norm, expected", [("mr", "NormalizeIntensityd"), ("ct", "ScaleIntensityRanged")])
def test_preprocessing_settings_reach_the_transforms(synthetic_dataset, tmp_path, bundle_on_path, norm, expected):
    bundle_on_path(VAE_BUNDLE)
    workflow = ConfigWorkflow(config_file=str(VAE_BUNDLE / "configs/train.json"),
                              meta_file=str(VAE_BUNDLE / "configs/metadata.json"), workflow_type="train",
                              bundle_root=str(tmp_path), dataset_dir=str(synthetic_dataset), intensity_norm=norm,
                              ct_window=[-175, 250], orientation="LPS", spacing=[1.0, 1.25, 1.5], crop_pos=3)
    workflow.initialize()
    transforms = {type(t).__name__: t for t in workflow.parser.get_parsed_content("train#preprocessing").transforms}
    assert expected in transforms
    if norm == "ct":
        assert transforms["ScaleIntensityRanged"].scaler.a_min == -175
    assert transforms["Orientationd"].ornt_transform.axcodes == "LPS"
    assert list(transforms["Spacingd"].spacing_transform.pixdim) == [1.0, 1.25, 1.5]
    assert transforms["RandCropByPosNegLabeld"].cropper.pos_ratio == 0.75
