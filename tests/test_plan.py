"""The plan step (settings from the data, ``configs/plan.json``) and the settings that travel with the model
(``models/model_settings.json``, read by ``evaluate.json`` and ``inference.json``), in process on tiny data, on
the real ``brain`` task (ITK head + MNI T1 for training, the ROBEX head with its noisy background held out) and on
the real ``tissue`` slabs (MR normalisation across fields of view)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import SELFREG_BUNDLE, in_bundle, refusal_in_process, small_run, workflow
from method_registry import all_methods

BUNDLE = SELFREG_BUNDLE
METHOD = next(m for m in all_methods() if m.bundle_dir == BUNDLE)


def files_of(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


def run_plan(dataset: Path, root: Path, **overrides) -> dict:
    """``monai.bundle run plan --config_file configs/plan.json`` in this process; the plan it wrote."""
    with in_bundle(BUNDLE):
        flow = workflow(BUNDLE, ["plan.json"], None, run_id="plan", bundle_root=str(root),
                        dataset_dir=str(dataset), **overrides)
        flow.run()
    return json.loads((root / "models/plan.json").read_text())


def real_dataset(make_dataset_module, tmp_path_factory, task: str) -> Path:
    """The real-MRI ``task`` of make_dataset.py; the test is skipped where its volumes cannot be fetched."""
    info = make_dataset_module.make_dataset(task, tmp_path_factory.mktemp("data") / task)
    if info.source != "real":
        pytest.skip(f"the real {task} volumes could not be fetched: {info.description}")
    return info.path


@pytest.fixture(scope="module")
def brain_dataset(make_dataset_module, tmp_path_factory) -> Path:
    return real_dataset(make_dataset_module, tmp_path_factory, "brain")


@pytest.fixture(scope="module")
def two_class_dataset(make_dataset_module, tmp_path_factory) -> Path:
    """A user's own two-class dataset: 5 synthetic cases of 32^3 (2 training, 2 validation, 1 test)."""
    out = tmp_path_factory.mktemp("data") / "two_class"
    return make_dataset_module.make_dataset("synthetic", out, num_cases=5, size=32, num_classes=2, seed=3).path


def test_plan_on_synthetic_data_never_writes_into_the_dataset(synthetic_dataset, tmp_path):
    before = files_of(synthetic_dataset)
    plan = run_plan(synthetic_dataset, tmp_path)
    assert files_of(synthetic_dataset) == before
    fp, settings = plan["fingerprint"], plan["settings"]
    assert fp["modality"] == "MR" and fp["num_cases"] == 4 and fp["device"]["kind"] in ("cpu", "cuda")
    assert fp["median_spacing"] == [1.5, 1.5, 1.5] and fp["median_shape"] == [32, 32, 32]
    assert fp["label_values"] == [0, 1, 2] and len(fp["class_fractions"]) == 3
    assert fp["foreground_intensity"]["p99_5"] > fp["cases"][0]["background"]["p00_5"]
    if fp["device"]["kind"] == "cpu":
        assert settings["spacing"] == [1.5, 1.5, 1.5] and settings["roi_size"] == [32, 32, 32]
    assert settings["intensity_norm"] == "mr" and set(plan["why"]) >= {"spacing", "roi_size", "intensity_norm"}
    # a plan file inside the dataset folder is refused
    with in_bundle(BUNDLE):
        message = refusal_in_process(BUNDLE, ["plan.json"], "plan", "nothing", dataset_dir=str(synthetic_dataset),
                                     plan_file=str(synthetic_dataset / "plan.json"))
    assert "inside the dataset folder" in message and str(synthetic_dataset) in message
    assert files_of(synthetic_dataset) == before


def test_plan_on_real_brain_heads_cpu_and_cuda(brain_dataset, tmp_path):
    cpu = run_plan(brain_dataset, tmp_path / "cpu", device="cpu")["settings"]
    assert cpu["spacing"] == [3.0, 3.0, 3.0] and cpu["roi_size"] == [48, 48, 48]
    assert (cpu["batch_size"], cpu["num_samples"]) == (2, 2) and cpu["amp"] is False and cpu["init_filters"] == 8
    cuda = run_plan(brain_dataset, tmp_path / "cuda", device="cuda", device_memory_gb=16)["settings"]
    assert cuda["spacing"] == [1.5, 2.0, 1.5]  # the median spacing (ITK 2x3x2 in RAS, MNI 1 mm)
    assert min(cuda["roi_size"]) >= 96 and cuda["amp"] is True and cuda["batch_size"] * cuda["num_samples"] >= 2
    assert cuda["init_filters"] == 16
    # the brain mask is one object in both training heads (the MNI mask: 6 components, nearly all in one)
    assert cpu["keep_largest_component"] == [1] and cuda["keep_largest_component"] == [1]


def test_mr_normalisation_holds_on_a_noisy_background(brain_dataset, tmp_path):
    """Through the bundle's own training preprocessing at the planned spacing, the held-out ROBEX brain (noisy
    background) gets the intensities of the training heads' brains (zero background); z-scoring over non-zero
    voxels, the old default, puts it more than 1 standard deviation away."""
    run_plan(brain_dataset, tmp_path, device="cpu")
    content = json.loads((brain_dataset / "dataset.json").read_text())
    cases = [*content["training"], *content["test"]]
    with in_bundle(BUNDLE):
        flow = workflow(BUNDLE, ["train.json"], None, bundle_root=str(tmp_path), dataset_dir=str(brain_dataset),
                        initialize=False)
        flow.initialize()
        preprocess = flow.parser.get_parsed_content("validate#preprocessing")
        medians = {}
        for case in cases:
            item = preprocess({k: str(brain_dataset / v) for k, v in case.items()})
            image, label = item["image"].numpy()[0], item["label"].numpy()[0] > 0
            medians[Path(case["image"]).name] = (float(np.median(image[label])), float(np.median(image[~label])))
    robex = medians.pop("robex_head.nii.gz")
    training_brain = [fg for fg, _ in medians.values()]
    assert min(abs(robex[0] - fg) for fg in training_brain) < 0.5, medians
    assert robex[0] - robex[1] > 1.5  # brain and background stay apart

    def nonzero_z(path: Path) -> tuple[np.ndarray, np.ndarray]:
        image = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(str(path).replace("images", "labels")).dataobj) > 0
        values = image[image != 0]
        return (image - values.mean()) / values.std(), label

    old = {}
    for case in cases:
        image, label = nonzero_z(brain_dataset / case["image"])
        old[Path(case["image"]).name] = float(np.median(image[label]))
    assert min(abs(old["robex_head.nii.gz"] - old[n]) for n in medians) > 1.0, old


@pytest.fixture(scope="module")
def tissue_dataset(make_dataset_module, tmp_path_factory) -> Path:
    return real_dataset(make_dataset_module, tmp_path_factory, "tissue")


def test_mr_normalisation_holds_whatever_share_of_the_view_the_head_fills(tissue_dataset, tmp_path):
    """The four MNI tissue slabs (the head fills 10-39 % of each) through the bundle's own training preprocessing
    at the planned spacing: grey and white matter land within 0.7 of each other's value on every slab, and stay
    apart. Z-scored over the whole image (0.4.0) grey matter moved by 1.9 between slabs, more than its distance to
    white matter."""
    plan = run_plan(tissue_dataset, tmp_path, device="cpu")
    assert plan["settings"]["intensity"]["zscore_over"] == "foreground"
    # grey and white matter fall apart into several pieces in a slab: no class is kept to its largest component
    assert plan["settings"]["keep_largest_component"] == []
    assert min(min(c["largest_component_share"].values()) for c in plan["fingerprint"]["cases"]) < 0.9
    content = json.loads((tissue_dataset / "dataset.json").read_text())
    cases = [*content["training"], *content["validation"], *content["test"]]
    with in_bundle(BUNDLE):
        flow = workflow(BUNDLE, ["train.json"], None, bundle_root=str(tmp_path), dataset_dir=str(tissue_dataset),
                        initialize=False)
        flow.initialize()
        preprocess = flow.parser.get_parsed_content("validate#preprocessing")
        means = []
        for case in cases:
            item = preprocess({k: str(tissue_dataset / v) for k, v in case.items()})
            image, label = item["image"].numpy()[0], item["label"].numpy()[0]
            means.append([float(image[label == c].mean()) for c in (1, 2)])
    grey, white = np.array(means).T
    assert len(means) == 4 and np.ptp(grey) < 0.7 and np.ptp(white) < 0.7, means
    assert white.min() - grey.max() > 0.2, means  # the tissues stay apart on every slab

    whole = []
    for case in cases:
        image = np.asarray(nib.load(tissue_dataset / case["image"]).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(tissue_dataset / case["label"]).dataobj)
        image = np.clip(image, *np.percentile(image, [0.5, 99.5]))
        whole.append(float(((image - image.mean()) / image.std())[label == 1].mean()))
    assert np.ptp(whole) > 1.5, whole


def _tiny_dataset(folder: Path, shapes: list, spacings: list, modality: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "imagesTr").mkdir()
    (folder / "labelsTr").mkdir()
    training = []
    for i, (shape, spacing) in enumerate(zip(shapes, spacings)):
        image = np.random.RandomState(i).rand(*shape).astype(np.float32)
        label = (image > 0.5).astype(np.uint8)
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(image, affine), folder / f"imagesTr/case{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"labelsTr/case{i}.nii.gz")
        training.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    content = {"labels": {"0": "background", "1": "thing"}, "modality": modality or {"0": "MRI"},
               "training": training}
    (folder / "dataset.json").write_text(json.dumps(content))
    return folder


def test_plan_keeps_the_largest_component_of_single_object_classes_only(tmp_path):
    """Class 1 is one ball in each case (one case adds a one-voxel speck: 0.1 % label noise), class 2 is two
    separate blocks: the plan keeps class 1 to its largest component and leaves class 2 alone; inference.json and
    evaluate.json (through the model's record) keep the largest component of class 1 only, with MONAI's
    KeepLargestConnectedComponentd; with an empty list they keep every component."""
    folder = tmp_path / "data"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"))
    training = []
    for i, centre in enumerate((12, 18)):
        label = np.zeros((32, 32, 32), np.uint8)
        label[((grid - centre) ** 2).sum(0) <= 36] = 1
        label[2:6, 2:6, 2:6] = label[26:30, 26:30, 2:6] = 2
        if i:
            label[30, 2, 30] = 1
        image = label * 100.0 + np.random.RandomState(i).rand(32, 32, 32).astype(np.float32)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), folder / f"imagesTr/case{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), folder / f"labelsTr/case{i}.nii.gz")
        training.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps(
        {"labels": {"0": "background", "1": "ball", "2": "blocks"}, "modality": {"0": "MRI"}, "training": training}))
    plan = run_plan(folder, tmp_path / "root", device="cpu")
    shares = [c["largest_component_share"] for c in plan["fingerprint"]["cases"]]
    assert shares[0] == {"1": 1.0, "2": 0.5} and 0.99 < shares[1]["1"] < 1.0 and shares[1]["2"] == 0.5
    assert plan["settings"]["keep_largest_component"] == [1] and "keep_largest_component" in plan["why"]

    two_balls = np.zeros((1, 32, 32, 32), np.float32)
    two_balls[0][((grid - 10) ** 2).sum(0) <= 16] = 1  # 257 voxels
    two_balls[0][((grid - 24) ** 2).sum(0) <= 4] = 1  # 33 voxels, apart from the first
    two_balls[0, 2:6, 2:6, 2:6] = two_balls[0, 26:30, 26:30, 2:6] = 2
    models = tmp_path / "root/models"
    for kept in ([1], []):
        (models / "model_settings.json").write_text(json.dumps({"keep_largest_component": kept}))
        with in_bundle(BUNDLE):
            flow = workflow(BUNDLE, ["inference.json"], None, bundle_root=str(tmp_path / "root"),
                            dataset_dir=str(folder), output_dir=str(tmp_path / "pred"))
            post = flow.parser.get_parsed_content("postprocessing").transforms
            evaluation = workflow(BUNDLE, ["train.json", "evaluate.json"], None, bundle_root=str(tmp_path / "root"),
                                  dataset_dir=str(folder))
            post_onehot = evaluation.parser.get_parsed_content("validate#postprocessing").transforms
        keep = [t for t in post if type(t).__name__ == "KeepLargestConnectedComponentd"]
        keep_onehot = [t for t in post_onehot if type(t).__name__ == "KeepLargestConnectedComponentd"]
        if not kept:
            assert keep == [] and keep_onehot == []
            continue
        out = keep[0]({"pred": torch.as_tensor(two_balls)})["pred"].numpy()
        assert (out == 1).sum() == 257 and (out == 2).sum() == (two_balls == 2).sum()
        onehot = torch.as_tensor(np.concatenate([two_balls == c for c in range(3)]).astype(np.float32))
        out = keep_onehot[0]({"pred": onehot})["pred"].numpy()
        assert out[1].sum() == 257 and out[2].sum() == (two_balls == 2).sum()


@pytest.mark.parametrize("case, expected", [
    ("mixed", "mixes modalities"), ("anisotropic", "differs by more than 10x"), ("tiny", "smaller than one crop")])
def test_plan_refuses_naming_the_file(case, expected, tmp_path):
    shapes, spacings, modality = [(24, 24, 24)] * 2, [(1.0, 1.0, 1.0)] * 2, None
    if case == "mixed":
        modality = {"0": "CT", "1": "T2"}
    elif case == "anisotropic":
        spacings = [(1.0, 1.0, 1.0), (1.0, 1.0, 12.0)]
    else:
        shapes = [(8, 8, 8)] * 2
    dataset = _tiny_dataset(tmp_path / "data", shapes, spacings, modality)
    with in_bundle(BUNDLE):
        message = refusal_in_process(BUNDLE, ["plan.json"], "plan", "nothing", bundle_root=str(tmp_path / "root"),
                                     dataset_dir=str(dataset), device="cpu")
    assert expected in message and str(dataset / "dataset.json") in message, message
    assert not (tmp_path / "root/models/plan.json").exists()


def test_train_then_infer_with_only_the_data_and_output_folders(two_class_dataset, tmp_path):
    """A two-class model trained on the user's own data (through its plan) is used by inference.json with only
    --dataset_dir and --output_dir; evaluate.json reads the same record; a contradicting override is refused."""
    root = tmp_path / "run"
    plan = run_plan(two_class_dataset, root, device="cpu")
    # tiny run; the data settings (spacing, crop) and SegResNet's width (8 on CPU) are the plan's
    planned = ("spacing", "roi_size", "backbones#segresnet#init_filters")
    tiny = {**{k: v for k, v in small_run(METHOD).items() if k not in planned},
            "max_epochs": 1, "iterations_per_epoch": 2, "num_samples": 1}
    with in_bundle(BUNDLE):
        flow = workflow(BUNDLE, ["train.json"], "train", bundle_root=str(root), dataset_dir=str(two_class_dataset),
                        **tiny)
        flow.run()
        flow.finalize()
    recorded = json.loads((root / "models/model_settings.json").read_text())
    assert recorded["class_names"] == ["background", "class 1"] and recorded["in_channels"] == 1
    assert recorded["spacing"] == plan["settings"]["spacing"] and recorded["roi_size"] == plan["settings"]["roi_size"]
    assert recorded["backbone"] == "segresnet" and recorded["network"]["kwargs"]["init_filters"] == 8
    assert recorded["network"]["kwargs"]["out_channels"] == 2

    out = tmp_path / "pred"
    with in_bundle(BUNDLE):
        flow = workflow(BUNDLE, ["inference.json"], "infer", bundle_root=str(root), dataset_dir=str(two_class_dataset),
                        output_dir=str(out))
        flow.run()
    image = next((two_class_dataset / "imagesTs").glob("*.nii.gz"))
    pred = nib.load(out / image.name.replace(".nii.gz", "_seg.nii.gz"))
    assert pred.shape == nib.load(image).shape and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}

    with in_bundle(BUNDLE):
        message = refusal_in_process(BUNDLE, ["inference.json"], "run", "evaluator", bundle_root=str(root),
                                     dataset_dir=str(two_class_dataset), output_dir=str(tmp_path / "pred2"),
                                     spacing=[1.0, 1.0, 1.0])
    assert "--spacing [1.0, 1.0, 1.0]" in message and json.dumps(recorded["spacing"]) in message, message
    assert str(root / "models/model_settings.json") in message

    # MONAI Label lists the labels of configs/metadata.json: the run id labels_to_metadata writes the recorded ones
    (root / "configs").mkdir()
    shutil.copy(BUNDLE / "configs/metadata.json", root / "configs/metadata.json")
    with in_bundle(BUNDLE):
        workflow(BUNDLE, ["plan.json"], None, run_id="labels_to_metadata", bundle_root=str(root)).run()
    outputs = json.loads((root / "configs/metadata.json").read_text())["network_data_format"]["outputs"]
    assert outputs["pred"]["channel_def"] == {"0": "background", "1": "class 1"}

    with in_bundle(BUNDLE):
        flow = workflow(BUNDLE, ["train.json", "evaluate.json"], None, bundle_root=str(root),
                        dataset_dir=str(two_class_dataset), num_workers=0, progress_bar=False)
        assert flow.parser.get_parsed_content("classes") == ["background", "class 1"]
        assert flow.parser.get_parsed_content("spacing") == recorded["spacing"]
        flow.run()

    # MR z-scored over the head (0.5.0); a model recorded before records no region and keeps the whole-image z-score
    assert recorded["intensity"]["zscore_over"] == "foreground"
    for intensity, region in ((recorded["intensity"], "foreground"),
                              ({"percentiles": recorded["intensity"]["percentiles"]}, "image")):
        (root / "models/model_settings.json").write_text(json.dumps({**recorded, "intensity": intensity}))
        with in_bundle(BUNDLE):
            flow = workflow(BUNDLE, ["inference.json"], None, bundle_root=str(root),
                            dataset_dir=str(two_class_dataset), output_dir=str(tmp_path / "pred3"))
            assert flow.parser.get_parsed_content("intensity_transform#mr#transforms#1").over == region
