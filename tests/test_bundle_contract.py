"""The contract every method bundle keeps, one parametrised test per clause, driven by the method registry
(bundles/methods/<method>/method.json): the model zoo's unit-test pattern in process (train, train + evaluate,
infer; a prerequisite stage such as ReSeg's stage 1 first), every backbone trains and saves the plain backbone,
zero weights train the plain baseline, 2D training with the same code, train and inference configs that agree,
the same pre-flight checks under torchrun as in one process, and the two real launches a user makes: one
``python -m monai.bundle run`` and one 2-process ``torchrun`` (gloo, CPU) per bundle.

In-process runs build each bundle's configs with ``monai.bundle.ConfigWorkflow``, as the model zoo's
ci/unit_tests do (``initialize``, ``check_properties``, ``run``, ``finalize``). What only one bundle has (the VAE's
crop, SemSim's unlabeled images, ReSeg's teacher) is tested in that bundle's test_<bundle>_bundle.py.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    METHODS,
    TORCHRUN,
    Method,
    assert_plain_backbone_checkpoint,
    assert_predictions_match_inputs,
    central_slices,
    in_bundle,
    method_params,
    overrides_from_cli,
    run_bundle,
    small_run,
    small_run_cli,
    workflow,
)
from monai.bundle import ConfigParser

MULTI_GPU = "configs/multi_gpu_train.json"


@dataclass
class Run:
    """An in-process training of one method: its folder, dataset, missing workflow properties per stage, the
    trainer's metrics and epoch length, and a copy of models/ as the prerequisite stage left it."""

    root: Path
    dataset: Path
    missing_properties: dict[str, list[str]]
    metrics: dict[str, float]
    val_metrics: dict[str, float]
    epoch_length: int
    stage1_models: Path | None


def train_in_process(method: Method, root: Path, dataset: Path, **overrides: Any) -> Run:
    """The zoo's pattern for training: each stage (the prerequisite first) as a ConfigWorkflow of the registry's
    configs and run id, ``initialize``, ``check_properties``, ``run``, ``finalize``."""
    overrides = {"bundle_root": str(root), "dataset_dir": str(dataset), "max_epochs": 1, **overrides}
    missing, stage1_models = {}, None
    for stage in (method.stage1, method.training):
        if stage is None:
            continue
        with in_bundle(method.bundle_dir):
            flow = workflow(method.bundle_dir, stage.configs, "train", run_id=stage.run_id, **overrides)
            missing[stage.run_id] = flow.check_properties()
            flow.run()
            flow.finalize()
        if stage is method.stage1:
            stage1_models = root.parent / f"{root.name}_stage1_models"
            shutil.copytree(root / "models", stage1_models)
    trainer = flow.parser.get_parsed_content("train#trainer")
    evaluator = flow.parser.get_parsed_content("validate#evaluator")
    return Run(root, dataset, missing, dict(trainer.state.metrics), dict(evaluator.state.metrics),
               trainer.state.epoch_length, stage1_models)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_for):
    """``trained(method)``: one in-process training of the method (1 epoch, tiny), made once per module."""
    runs: dict[str, Run] = {}

    def get(method: Method) -> Run:
        if method.name not in runs:
            root = tmp_path_factory.mktemp(method.name) / "run"
            runs[method.name] = train_in_process(method, root, dataset_for(method), **small_run(method))
        return runs[method.name]

    return get


def loss_terms(metrics: dict[str, float]) -> set[str]:
    """The loss terms a training logged (``train_<term>``, LossTermsHandler) other than their total: the
    segmentation loss, and the method's own terms where they are on."""
    assert "train_total" in metrics, metrics
    return {k for k in metrics if k.startswith("train_")} - {"train_total"}


# ---------------------------------------------------------------------------------------------------------------
# The model zoo's pattern, in process


@pytest.mark.parametrize("method", method_params())
def test_zoo_train(method: Method, trained):
    run = trained(method)
    assert run.missing_properties == {s.run_id: [] for s in (method.stage1, method.training) if s}
    assert len(loss_terms(run.metrics)) >= 2, run.metrics  # the segmentation loss and the method's terms
    assert 0 <= run.val_metrics["val_mean_dice"] <= 1
    models = run.root / "models"
    assert (models / "model.pt").is_file() and (models / "checkpoint_epoch=1.pt").is_file()
    if method.stage1:
        assert (run.root / method.stage1.writes).is_file()
    assert list(run.root.glob("eval/events.out.tfevents.*")), "no TensorBoard log"
    # nothing method-specific (taps, fusion modules, a teacher) is saved with the segmentation network
    assert_plain_backbone_checkpoint(models / "model.pt", "segresnet")


def recorded_width(method: Method) -> dict[str, Any]:
    """The tiny run's settings without SegResNet's width (8, the shipped default being 16): evaluation and
    inference must take it from the model's record."""
    return {k: v for k, v in small_run(method).items() if k != "backbones#segresnet#init_filters"}


@pytest.mark.parametrize("method", method_params())
def test_zoo_train_and_evaluate(method: Method, trained):
    """[train.json, evaluate.json] as the zoo runs it (no property check: evaluate.json overrides train.json), on
    the held-out test split: per-case, per-class Dice and HD95 of the trained model."""
    run = trained(method)
    with in_bundle(method.bundle_dir):
        flow = workflow(method.bundle_dir, ["train.json", "evaluate.json"], "eval", bundle_root=str(run.root),
                        dataset_dir=str(run.dataset), eval_split="test", **recorded_width(method))
        flow.run()
        flow.finalize()
    test_images = sorted((run.dataset / "imagesTs").glob("*.nii.gz"))
    for metric in ("val_mean_dice", "val_hd95"):
        rows = list(csv.DictReader(open(run.root / f"eval/{metric}_raw.csv")))
        assert [Path(r["filename"]).name for r in rows] == [p.name for p in test_images]  # the test split
        assert set(rows[0]) == {"filename", "class0", "class1", "mean"}  # per foreground class and per case
    dice = [float(r["mean"]) for r in csv.DictReader(open(run.root / "eval/val_mean_dice_raw.csv"))]
    assert all(0.0 <= d <= 1.0 for d in dice)


@pytest.mark.parametrize("method", method_params())
def test_zoo_infer(method: Method, trained, tmp_path):
    run = trained(method)
    out = tmp_path / "pred"
    with in_bundle(method.bundle_dir):
        flow = workflow(method.bundle_dir, ["inference.json"], "infer", bundle_root=str(run.root),
                        dataset_dir=str(run.dataset), output_dir=str(out), **recorded_width(method))
        assert flow.check_properties() == []
        flow.run()
        flow.finalize()
    assert_predictions_match_inputs(sorted((run.dataset / "imagesTs").glob("*.nii.gz")), out)


# ---------------------------------------------------------------------------------------------------------------
# Backbones, baseline, 2D, configs


def short_epoch(method: Method, backbone: str = "segresnet") -> dict[str, Any]:
    """An epoch of one training case and one validation case, in every stage: enough to build, step and save
    every part of the method."""
    return {**small_run(method, backbone), "train#dataset#data": "$@data_split['training'][:1]",
            "validate#dataset#data": "$@data_split['validation'][:1]"}


OTHER_BACKBONES = [pytest.param(m, b, id=f"{m.name}-{b}") for m in METHODS for b in m.backbones if b != "segresnet"]


@pytest.mark.parametrize("method, backbone", OTHER_BACKBONES)
def test_every_backbone_trains_and_saves_the_plain_backbone(method: Method, backbone: str, dataset_for, tmp_path):
    run = train_in_process(method, tmp_path / "run", dataset_for(method), **short_epoch(method, backbone))
    assert len(loss_terms(run.metrics)) >= 2, run.metrics
    assert_plain_backbone_checkpoint(run.root / "models/model.pt", backbone)


@pytest.mark.parametrize("method", method_params())
def test_zero_weights_train_the_plain_baseline(method: Method, trained, dataset_for, tmp_path):
    """The registry's zero weights turn every term of the method off, leaving the segmentation loss of the full
    method's run (and a prerequisite stage is not needed)."""
    run = train_in_process(method, tmp_path / "run", dataset_for(method),
                           **{**short_epoch(method), **overrides_from_cli(method.zero_weights())})
    baseline = loss_terms(run.metrics)
    assert len(baseline) == 1 and baseline < loss_terms(trained(method).metrics), run.metrics
    if method.stage1:
        assert not (run.root / method.stage1.writes).exists()
    assert_plain_backbone_checkpoint(run.root / "models/model.pt", "segresnet")


@pytest.mark.parametrize("method", method_params())
def test_two_dimensional_training_with_the_same_code(method: Method, dataset_for, tmp_path):
    backbone = "unet" if "unet" in method.backbones else method.backbones[0]
    data_2d = central_slices(dataset_for(method), tmp_path / "data2d")
    run = train_in_process(method, tmp_path / "run", data_2d, **{
        **small_run(method, backbone), "spatial_dims": 2, "roi_size": [32, 32], "spacing": [1.5, 1.5],
        "orientation": "RA"})
    assert len(loss_terms(run.metrics)) >= 2, run.metrics
    conv_dims = {w.ndim for k, w in torch.load(run.root / "models/model.pt", weights_only=True).items()
                 if k.endswith("conv.weight")}
    assert conv_dims == {4}  # Conv2d weights only


# The settings training records with the model (train.json ``model_settings``, written beside model.pt) that
# inference.json and evaluate.json read back from models/model_settings.json.
RECORDED_KEYS = ("class_names", "in_channels", "spatial_dims", "orientation", "spacing", "intensity_norm", "intensity",
                 "roi_size", "sw_batch_size", "sw_overlap", "keep_largest_component", "backbone")


def as_shipped(config: Any, plan_defaults: dict) -> Any:
    """``config`` with each setting that train.json reads from the plan (``$@plan['key']``, such as SegResNet's
    ``init_filters``) at the plan's default, its value when the bundle ships without a plan."""
    if isinstance(config, dict):
        return {k: as_shipped(v, plan_defaults) for k, v in config.items()}
    if isinstance(config, list):
        return [as_shipped(v, plan_defaults) for v in config]
    read = re.fullmatch(r"\$@plan\['(\w+)'\]", config) if isinstance(config, str) else None
    return plan_defaults[read.group(1)] if read else config


@pytest.mark.parametrize("method", method_params())
def test_train_and_inference_configs_agree(method: Method):
    """The network and preprocessing that inference.json builds are the ones train.json trained: the same
    backbones, and every setting training records with the model read back from the record (shipped defaults: the
    plan's defaults in train.json)."""
    train_config = json.loads((method.bundle_dir / "configs/train.json").read_text())
    infer_config = json.loads((method.bundle_dir / "configs/inference.json").read_text())
    eval_config = json.loads((method.bundle_dir / "configs/evaluate.json").read_text())
    planned = train_config["plan"]["defaults"]
    assert as_shipped(train_config["backbones"], planned) == infer_config["backbones"]
    assert set(train_config["model_settings"]) == {*RECORDED_KEYS, "network"}
    for key in RECORDED_KEYS:
        assert "@recorded_settings" in infer_config[key] and "@recorded_settings" in eval_config[key], key
    shipped = infer_config["shipped_settings"]
    assert {k: shipped[k] for k in planned if k in shipped} == {k: planned[k] for k in planned if k in shipped}
    assert set(method.backbones) <= set(train_config["backbones"])  # what the registry offers, the configs build


@pytest.mark.parametrize("method", method_params())
def test_the_network_width_is_the_plans(method: Method, tmp_path):
    """SegResNet's ``init_filters`` come from the plan in every bundle (16 on CUDA, 8 on CPU), none pins its own."""
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"settings": {"init_filters": 12}}))
    parser = ConfigParser()
    parser.read_config(str(method.bundle_dir / "configs/train.json"))
    parser.update({"bundle_root": str(tmp_path), "plan_file": str(plan_file), "dataset_dir": str(tmp_path / "none")})
    with in_bundle(method.bundle_dir):
        assert parser.get_parsed_content("backbones#segresnet#init_filters") == 12
    assert "$@plan['init_filters']" == parser.get("backbones#segresnet#init_filters")


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight checks: the same under torchrun as in one process


def preflight(configs: list[str], bundle: Path, run_id: str) -> dict[str, Any]:
    """The checks ``run_id`` runs, as the parsed config defines them: each ``@id`` item of the run list (and of the
    run lists it includes, such as ReSeg's two stages) that is not an expression, a dict of checks (``preflight``)
    read as its entries; with each check's definition."""
    parser = ConfigParser()
    parser.read_config([str(bundle / c) for c in configs])
    parser.resolve_macro_and_relative_ids()
    checks: dict[str, Any] = {}

    def collect(items: list) -> None:
        for item in items:
            if isinstance(item, list):
                collect(item)
            elif isinstance(item, str) and item.startswith("@"):
                node = parser[item[1:]]
                refs = list(node.values()) if isinstance(node, dict) and "_target_" not in node else [item]
                for ref in refs:
                    checks[ref] = parser[ref[1:]] if isinstance(ref, str) and ref.startswith("@") else ref

    collect(parser[run_id])
    return checks


STAGES = [pytest.param(m, s, id=f"{m.name}-{s.run_id}") for m in METHODS for s in (m.stage1, m.training) if s]


@pytest.mark.parametrize("method, stage", STAGES)
def test_torchrun_runs_the_same_preflight_checks_as_one_process(method: Method, stage):
    single = preflight(list(stage.configs), method.bundle_dir, stage.run_id)
    multi = preflight([*stage.configs, MULTI_GPU], method.bundle_dir, stage.run_id)
    assert "@check_data" in single, single  # the dataset check runs before any training
    assert multi == single


# ---------------------------------------------------------------------------------------------------------------
# The two real launches: the CLI, and torchrun


# Known failures, each a bug to fix in the method's code (strict: the test says when it is fixed).
@pytest.mark.parametrize("method", method_params())
def test_cli_resumes_the_training_with_mlflow(method: Method, trained, tmp_path):
    """``python -m monai.bundle run`` of the registry's training stage, as a user types it: it resumes the
    in-process run (every stage), logs through configs/logging.conf and records the run in MLflow."""
    run = trained(method)
    root = tmp_path / "resumed"
    shutil.copytree(run.root, root)
    proc = run_bundle(method.bundle_dir, list(method.training.configs), "--bundle_root", str(root), "--dataset_dir",
                      str(run.dataset), "--max_epochs", "2", "--tracking", "mlflow", *small_run_cli(method),
                      run_id=method.training.run_id)
    log = proc.stdout + proc.stderr
    assert "resuming from iteration" in log and "epoch 1 until 2 epochs" in log, log[-3000:]
    assert "Epoch[1]" not in log, [line for line in log.splitlines() if "Epoch[1]" in line]  # not retrained
    assert all(term in log for term in run.metrics), sorted(run.metrics)
    assert (root / "models/checkpoint_epoch=2.pt").is_file()
    assert (root / "eval/mlruns.db").stat().st_size > 0, "no MLflow run recorded"



@pytest.mark.parametrize("method", method_params())
def test_torchrun_two_process_training(method: Method, trained, tmp_path):
    """The registry's training stage with multi_gpu_train.json under torchrun, 2 processes on CPU (gloo); a
    prerequisite stage ran in one process first. Each rank trains on half the cases and runs the pre-flight checks
    (a probe added to ``preflight`` writes a file on each rank, after the dataset check); only rank 0 logs."""
    run = trained(method)
    root = tmp_path / "run"
    if run.stage1_models is not None:
        shutil.copytree(run.stage1_models, root / "models")
    # each rank writes its own file (two processes' prints can interleave in one pipe)
    probe = f"$open(os.path.join('{tmp_path}', 'preflight_rank%d' % dist.get_rank()), 'w').write(str(@check_data))"
    proc = run_bundle(method.bundle_dir, [*method.training.configs, MULTI_GPU], "--bundle_root", str(root),
                      "--dataset_dir", str(run.dataset), "--max_epochs", "1", "--num_samples", "2",
                      *small_run_cli(method), "--preflight#probe", probe, run_id=method.training.run_id,
                      launcher=TORCHRUN)
    log = proc.stdout + proc.stderr
    probes = sorted(tmp_path.glob("preflight_rank*"))
    assert [p.name for p in probes] == ["preflight_rank0", "preflight_rank1"], log[-3000:]
    assert all(int(p.read_text()) > 0 for p in probes)  # after the dataset check, which counted the cases
    # the checks ran before training: before the first checkpoint was written
    first_checkpoint = min(p.stat().st_mtime for p in (root / "models").glob("checkpoint_epoch=*.pt"))
    assert max(p.stat().st_mtime for p in probes) < first_checkpoint
    epoch_length = {int(n) for n in re.findall(r"Iter: \d+/(\d+)", log)}
    assert epoch_length == {math.ceil(run.epoch_length / 2)}  # DistributedSampler: half the cases per rank
    assert all(term in log for term in run.metrics) and log.count("Key metric: val_mean_dice") == 1
    state = torch.load(root / "models/model.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in state)  # the plain backbone, not the DDP wrapper
    assert_plain_backbone_checkpoint(root / "models/model.pt", "segresnet")
