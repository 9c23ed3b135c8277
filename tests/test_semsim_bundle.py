"""What only the SemSim bundle has, in process through ConfigWorkflow: a training checkpoint keeps the fusion
module for resume (plain FixMatch has none), unlabeled images from an imagesUnlabeled/ folder, the refusal of a run
without unlabeled images unless supervised-only, and of a crop the fusion module cannot window. Training,
evaluation, inference, resume, DDP, 2D, every backbone and the zero-weight baseline are the bundle contract
(test_bundle_contract.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from helpers import BUNDLES, in_bundle, overrides_from_cli, refusal_in_process, small_run, workflow
from method_registry import by_name

SEMSIM = by_name("semsim")
SEMSIM_BUNDLE = BUNDLES / SEMSIM.bundle


def train(root: Path, dataset: Path, **overrides) -> dict:
    """One training iteration and validation in process; the trainer's metrics."""
    with in_bundle(SEMSIM_BUNDLE):
        flow = workflow(SEMSIM_BUNDLE, ["train.json"], "train", run_id="training", bundle_root=str(root),
                        dataset_dir=str(dataset), max_epochs=1,
                        **{**small_run(SEMSIM), "train#trainer#epoch_length": 1, **overrides})
        flow.run()
        return dict(flow.parser.get_parsed_content("train#trainer").state.metrics)


def test_checkpoint_keeps_the_fusion_module_for_resume(semi_dataset, tmp_path):
    train(tmp_path, semi_dataset)
    checkpoint = torch.load(tmp_path / "models/checkpoint_epoch=1.pt", weights_only=True)
    assert {"model", "sfm", "optimizer", "lr_scheduler", "trainer"} <= set(checkpoint)


def test_ema_teacher_ramp_and_term_activity_in_a_bundle_run(semi_dataset, tmp_path):
    """The options of the 3D study, all on: the EMA teacher is checkpointed for resume, and the log holds each
    term's per-class pass share and its gradient norm on the backbone."""
    metrics = train(tmp_path, semi_dataset, ema_decay=0.99, unlabeled_rampup=10, term_gradient_interval=1)
    checkpoint = torch.load(tmp_path / "models/checkpoint_epoch=1.pt", weights_only=True)
    assert {"model", "sfm", "ema_teacher"} <= set(checkpoint)
    teacher = checkpoint["ema_teacher"]
    # one iteration: the warm-up makes the teacher a copy of the student after its first step
    for name, value in checkpoint["model"].items():
        torch.testing.assert_close(teacher[f"backbone.{name}"], value)
    for term in ("supervised", "unlabeled", "intra", "cross"):
        assert f"train_grad_{term}" in metrics, metrics
    for term in ("unlabeled", "intra", "cross"):
        assert all(0 <= metrics[f"train_{term}_pass_{c}"] <= 1 for c in range(3)), metrics


def test_fixmatch_with_an_unlabeled_folder_saves_no_fusion_module(synthetic_dataset, tmp_path):
    """Plain FixMatch (the registry's ``fixmatch`` arm) on a fully labeled dataset whose unlabeled images come from
    an imagesUnlabeled/ folder."""
    dataset = tmp_path / "data"
    shutil.copytree(synthetic_dataset, dataset)
    (dataset / "imagesUnlabeled").mkdir()
    for path in sorted((dataset / "imagesTs").glob("*.nii.gz")) + sorted((dataset / "imagesTr").glob("*.nii.gz"))[:1]:
        shutil.copy(path, dataset / "imagesUnlabeled" / f"u_{path.name}")
    metrics = train(tmp_path / "run", dataset, **overrides_from_cli(SEMSIM.arm_overrides("fixmatch")))
    assert "train_unlabeled" in metrics and "train_intra" not in metrics and "train_cross" not in metrics, metrics
    assert "sfm" not in torch.load(tmp_path / "run/models/checkpoint_epoch=1.pt", weights_only=True)


def test_a_run_without_unlabeled_images_is_refused_unless_supervised_only(synthetic_dataset, tmp_path):
    with in_bundle(SEMSIM_BUNDLE):
        message = refusal_in_process(SEMSIM_BUNDLE, ["train.json"], "training", "train#trainer",
                                     bundle_root=str(tmp_path / "semi"), dataset_dir=str(synthetic_dataset),
                                     max_epochs=1, **small_run(SEMSIM))
    assert "unlabeled" in message and "imagesUnlabeled" in message
    metrics = train(tmp_path / "sup", synthetic_dataset, **overrides_from_cli(SEMSIM.zero_weights()))
    assert "train_supervised" in metrics and "train_unlabeled" not in metrics, metrics


def test_crop_the_fusion_module_cannot_window_is_refused_before_training(semi_dataset, tmp_path):
    with in_bundle(SEMSIM_BUNDLE):
        message = refusal_in_process(SEMSIM_BUNDLE, ["train.json"], "training", "train#trainer",
                                     bundle_root=str(tmp_path), dataset_dir=str(semi_dataset), max_epochs=1,
                                     **{**small_run(SEMSIM), "roi_size": [40, 40, 40], "sfm_window_size": 2})
    assert "roi_size [40, 40, 40] does not suit the Spatial-aware Fusion Module" in message
