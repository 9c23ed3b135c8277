"""Bad input is refused before any compute, in every bundle, with a message that names the file and the problem.

Three layers, cheapest first:

- the dataset check (``scripts/dataset_check.py``, each bundle's copy) called directly on real NIfTI files, for
  every bundle x every broken case in ``BROKEN_CASES`` (and ``world_size``, and what must pass);
- each bundle's real configs run in-process through ``monai.bundle.ConfigWorkflow`` (what ``monai.bundle run``
  does) for the refusals that live in the configs: dataset folder and datalist, unknown backbone, crop sizes,
  evaluation cases and checkpoint, inference images, checkpoint and output folder. Each asserts that the trainer
  or evaluator was never built;
- the real CLI (``python -m monai.bundle run``), a representative subset: training of every bundle on a dataset
  that holds every broken case at once (one refusal lists them all), and SelfReg's inference with a checkpoint of
  another network. Five CLI starts in all.

Decisions (inputs that look awkward but are legal, so they are not refused):

- a volume smaller than the training crop: the train transforms pad it to the crop (SpatialPadd before the random
  crop, for labelled and unlabelled images), and sliding-window inference pads too;
- a float label whose values are whole numbers (0.0, 1.0, 2.0): many exporters write labels as float32; only
  fractional values (a label resampled with linear interpolation) are refused;
- an all-background label: a case without foreground is valid (the losses handle it, see test_loss_properties.py);
- a config ``--spacing`` entry of 0 or less: MONAI's Spacingd documents it as "keep the image's own spacing on that
  axis"; a voxel size of 0 in an image header is refused.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import (
    ALL_BUNDLES,
    METHODS,
    bundle_scripts_module,
    in_bundle,
    method_params,
    overrides_from_cli,
    refusal_in_process,
    run_bundle,
    workflow,
)
from method_registry import Method, by_name
from monai.networks import nets

BUNDLE_IDS = [b.name for b in ALL_BUNDLES]
# Methods that offer a choice of backbone (--backbone).
BACKBONE_METHODS = [m for m in METHODS if len(m.backbones) > 1]
# The synthetic datasets' first training case (labelled in both).
SOURCE_CASE = "synthetic_000.nii.gz"


class Broken(NamedTuple):
    """One broken datalist entry and the fragment of the refusal that must name its file and its problem."""

    entry: dict
    expected: str


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def _write_zero_voxel_size(path: Path, array: np.ndarray, voxel_size: list[float]) -> str:
    """A NIfTI file whose header says exactly ``voxel_size``, with no sform or qform. nibabel repairs a zero voxel
    size when it saves an image, so the header and data bytes are written here."""
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header["pixdim"][1:4] = voxel_size
    header["vox_offset"] = 352  # 348 header bytes + 4 bytes of "no extensions"
    with gzip.open(path, "wb") as f:
        header.write_to(f)
        f.write(b"\0" * 4)
        f.write(array.tobytes(order="F"))
    return str(path)


def _pair(folder: Path, name: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray,
          label_affine: np.ndarray | None = None) -> tuple[str, str]:
    return (_save(folder / f"{name}_image.nii.gz", image, affine),
            _save(folder / f"{name}_label.nii.gz", label, affine if label_affine is None else label_affine))


# Each case writes its files into a folder, from the source image and label arrays and their affine, and returns
# the broken entry. ``num_classes`` is 3 (the synthetic datasets').
CaseMaker = Callable[[Path, np.ndarray, np.ndarray, np.ndarray], Broken]


def label_without_image(d, image, label, affine):
    _, lab = _pair(d, "orphan", image, label, affine)
    missing = str(d / "orphan_missing_image.nii.gz")
    return Broken({"image": missing, "label": lab}, f"{missing}: file does not exist (the image of label {lab})")


def image_without_label_file(d, image, label, affine):
    img, _ = _pair(d, "unpaired", image, label, affine)
    missing = str(d / "unpaired_missing_label.nii.gz")
    return Broken({"image": img, "label": missing}, f"{missing}: file does not exist (the label of image {img})")


def truncated_image(d, image, label, affine):
    img, lab = _pair(d, "truncated", image, label, affine)
    data = Path(img).read_bytes()
    Path(img).write_bytes(data[: len(data) // 2])
    return Broken({"image": img, "label": lab}, f"{img}: cannot be read (the image of label {lab}): a truncated")


def corrupt_image(d, image, label, affine):
    img, lab = _pair(d, "corrupt", image, label, affine)
    Path(img).write_bytes(np.random.RandomState(0).bytes(4096))
    return Broken({"image": img, "label": lab}, f"{img}: cannot be read (the image of label {lab})")


def non_image_file(d, image, label, affine):
    _, lab = _pair(d, "notes", image, label, affine)
    notes = d / "notes.txt"
    notes.write_text("case notes, not an image")
    return Broken({"image": str(notes), "label": lab}, f"{notes}: cannot be read (the image of label {lab})")


def shape_mismatch(d, image, label, affine):
    img, lab = _pair(d, "shape", image, label[:, :, :-4], affine)
    return Broken({"image": img, "label": lab}, f"{lab}: spatial shape")


def affine_mismatch(d, image, label, affine):
    shifted = affine.copy()
    shifted[0, 3] += 10.0
    img, lab = _pair(d, "affine", image, label, affine, shifted)
    return Broken({"image": img, "label": lab}, f"{lab}: affine differs from its image {img}")


def image_2d_for_3d_network(d, image, label, affine):
    middle = image.shape[2] // 2
    img, lab = _pair(d, "flat", image[:, :, middle], label[:, :, middle], affine)
    return Broken({"image": img, "label": lab}, f"{img}: has 2 spatial dimension(s)")


def multichannel_image(d, image, label, affine):
    img, lab = _pair(d, "twochannel", np.stack([image, image], axis=-1), label, affine)
    return Broken({"image": img, "label": lab}, f"{img}: has 2 channel(s), the network expects 1")


def multichannel_label(d, image, label, affine):
    img, lab = _pair(d, "onehot", image, np.stack([label == 1, label == 2], axis=-1).astype(np.uint8), affine)
    return Broken({"image": img, "label": lab}, f"{lab}: label has 2 channels")


def label_outside_classes(d, image, label, affine):
    outside = label.copy()
    outside[0, 0, 0] = 7
    img, lab = _pair(d, "outside", image, outside, affine)
    return Broken({"image": img, "label": lab}, f"{lab}: label values [7] are outside the 3 declared classes 0..2")


def fractional_label(d, image, label, affine):
    fractional = label.astype(np.float32)
    fractional[0, 0, 0] = 0.5
    img, lab = _pair(d, "fractional", image, fractional, affine)
    return Broken({"image": img, "label": lab}, f"{lab}: label values [0.5] are not integers")


def nan_intensities(d, image, label, affine):
    with_nan = image.astype(np.float32)
    with_nan[1, 2, 3] = np.nan
    img, lab = _pair(d, "nan", with_nan, label, affine)
    return Broken({"image": img, "label": lab}, f"{img}: contains NaN or Inf intensities (1 voxels)")


def inf_intensities(d, image, label, affine):
    with_inf = image.astype(np.float32)
    with_inf[3, 2, 1] = np.inf
    img, lab = _pair(d, "inf", with_inf, label, affine)
    return Broken({"image": img, "label": lab}, f"{img}: contains NaN or Inf intensities (1 voxels)")


def constant_image(d, image, label, affine):
    img, lab = _pair(d, "blank", np.zeros_like(image, dtype=np.float32), label, affine)
    return Broken({"image": img, "label": lab}, f"{img}: every voxel has the same intensity 0.0")


def zero_voxel_size(d, image, label, affine):
    img = _write_zero_voxel_size(d / "zero_size_image.nii.gz", image.astype(np.float32), [1.5, 0.0, 1.5])
    lab = _write_zero_voxel_size(d / "zero_size_label.nii.gz", label.astype(np.uint8), [1.5, 0.0, 1.5])
    return Broken({"image": img, "label": lab}, f"{img}: the header's voxel size [1.5, 0.0, 1.5] has a zero")


def entry_without_label(d, image, label, affine):
    img, _ = _pair(d, "nolabelkey", image, label, affine)
    return Broken({"image": img}, "has no 'label' ({'image': '" + img + "'})")


BROKEN_CASES: dict[str, CaseMaker] = {f.__name__: f for f in (
    label_without_image, image_without_label_file, truncated_image, corrupt_image, non_image_file, shape_mismatch,
    affine_mismatch, image_2d_for_3d_network, multichannel_image, multichannel_label, label_outside_classes,
    fractional_label, nan_intensities, inf_intensities, constant_image, zero_voxel_size, entry_without_label)}


def source_arrays(dataset: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = nib.load(dataset / "imagesTr" / SOURCE_CASE)
    label = nib.load(dataset / "labelsTr" / SOURCE_CASE)
    return np.asarray(image.dataobj, dtype=np.float32), np.asarray(label.dataobj, dtype=np.uint8), image.affine


def good_case(dataset: Path) -> dict:
    return {"image": str(dataset / "imagesTr" / SOURCE_CASE), "label": str(dataset / "labelsTr" / SOURCE_CASE)}


def dataset_refusal(check, *args, **kwargs) -> str:
    with pytest.raises(check.DatasetError) as err:
        check.check_dataset(*args, **kwargs)
    return str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# The dataset check on files, every bundle's copy


@pytest.mark.parametrize("case", list(BROKEN_CASES))
@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
def test_the_dataset_check_names_the_file_and_the_problem(bundle, case, synthetic_dataset, tmp_path):
    check = bundle_scripts_module(bundle, "dataset_check")
    broken = BROKEN_CASES[case](tmp_path, *source_arrays(synthetic_dataset))
    message = dataset_refusal(check, [broken.entry], [good_case(synthetic_dataset)], num_classes=3,
                              datalist="my/dataset.json")
    assert message.startswith("the dataset of my/dataset.json cannot be used for training")
    assert broken.expected in message, message


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
def test_unlabeled_images_and_held_out_cases_are_checked_too(bundle, synthetic_dataset, tmp_path):
    check = bundle_scripts_module(bundle, "dataset_check")
    good = good_case(synthetic_dataset)
    flat = image_2d_for_3d_network(tmp_path, *source_arrays(synthetic_dataset))
    outside = label_outside_classes(tmp_path, *source_arrays(synthetic_dataset))
    message = dataset_refusal(check, [good], [good], num_classes=3, unlabeled=[{"image": flat.entry["image"]}])
    assert f"{flat.entry['image']}: has 2 spatial dimension(s)" in message
    with pytest.raises(check.DatasetError, match="the cases to evaluate cannot be used") as err:
        check.check_evaluation_cases([good, outside.entry], num_classes=3)
    assert outside.expected in str(err.value)
    with pytest.raises(check.DatasetError, match="the images to segment cannot be used") as err:
        check.check_images([{"image": good["image"]}, {"image": flat.entry["image"]}])
    assert flat.expected in str(err.value)


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
def test_more_processes_than_cases(bundle, synthetic_dataset):
    check = bundle_scripts_module(bundle, "dataset_check")
    good = good_case(synthetic_dataset)
    message = dataset_refusal(check, [good], [good, good], num_classes=3, world_size=2)
    assert "the dataset has 1 training case(s), fewer than the 2 training processes" in message
    assert "validation" not in message


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
def test_awkward_but_valid_cases_pass(bundle, synthetic_dataset, tmp_path):
    """Whole-number float labels, an all-background label and a volume smaller than any crop are legal."""
    check = bundle_scripts_module(bundle, "dataset_check")
    image, label, affine = source_arrays(synthetic_dataset)
    pairs = (_pair(tmp_path, "float_label", image, label.astype(np.float32), affine),
             _pair(tmp_path, "background", image, np.zeros_like(label), affine),
             _pair(tmp_path, "small", image[:5, :6, :7], label[:5, :6, :7], affine))
    cases = [{"image": img, "label": lab} for img, lab in pairs]
    assert check.check_dataset(cases, cases, num_classes=3) == 6
    assert check.check_images([{"image": case["image"]} for case in cases]) == 3


def test_a_long_list_of_problems_is_cut(synthetic_dataset, tmp_path):
    check = bundle_scripts_module(ALL_BUNDLES[0], "dataset_check")
    missing = [{"image": str(tmp_path / f"gone{i}.nii.gz"), "label": str(tmp_path / f"gone{i}_label.nii.gz")}
               for i in range(40)]
    message = dataset_refusal(check, missing, [good_case(synthetic_dataset)], num_classes=3)
    assert message.count("\n  - ") == check.MAX_LISTED_PROBLEMS + 1 and message.endswith("... and 30 more")


# ---------------------------------------------------------------------------------------------------------------
# The backbone checks, called directly


@pytest.mark.parametrize("method", method_params(BACKBONE_METHODS))
def test_unknown_backbone_lists_the_known_ones(method: Method):
    bundle = method.bundle_dir
    backbones = bundle_scripts_module(bundle, "backbones")
    with pytest.raises(ValueError, match="unknown backbone 'unetr': set --backbone to one of segresnet, unet, swin"):
        backbones.select_backbone({}, "unetr")
    # what the refusal lists is what the configs define, and what the registry offers
    assert method.backbones == backbones.BACKBONES
    for config_file in ("train.json", "inference.json"):
        config = json.loads((bundle / "configs" / config_file).read_text())
        assert tuple(config["backbones"]) == backbones.BACKBONES
        assert tuple(config.get("reconstruction_backbones", backbones.BACKBONES)) == backbones.BACKBONES


def other_network() -> torch.nn.Module:
    """A small UNet, whose checkpoint the tests put where the bundles look for a SegResNet's."""
    return nets.UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32, 64), strides=(2, 2, 2),
                     num_res_units=2, norm="instance")


def test_checkpoint_of_another_size_names_the_keys(tmp_path):
    backbones = bundle_scripts_module(ALL_BUNDLES[0], "backbones")
    wider = tmp_path / "wider.pt"
    torch.save({"model": nets.SegResNet(init_filters=16, out_channels=3).state_dict()}, wider)
    with pytest.raises(ValueError) as err:
        backbones.check_checkpoint(nets.SegResNet(init_filters=8, out_channels=3), str(wider))
    message = str(err.value)
    assert f"checkpoint {wider} does not fit this SegResNet" in message and "missing keys" not in message
    assert "keys of another shape: convInit.conv.weight [16, 1, 3, 3, 3] (network [8, 1, 3, 3, 3])" in message
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"checkpoint {not_a_checkpoint} cannot be read as a PyTorch state dict"):
        backbones.check_checkpoint(nets.SegResNet(init_filters=8, out_channels=3), str(not_a_checkpoint))


# ---------------------------------------------------------------------------------------------------------------
# The configs' refusals, in-process through MONAI's ConfigWorkflow


def small_overrides(method: Method) -> dict:
    """The tiny network and data settings of the CLI tests, as ConfigWorkflow overrides. A method with a
    prerequisite stage (ReSeg's teacher) trains its zero-weight baseline, which needs none; the prerequisite's
    checkpoint has a test of its own."""
    overrides = {"roi_size": [32, 32, 32], "spacing": [1.5, 1.5, 1.5], "num_workers": 0,
                 "backbones#segresnet#init_filters": 8}
    if method.stage1 is not None:
        overrides.update(overrides_from_cli(method.zero_weights()))
    return overrides


def small_cli_args(method: Method) -> list[str]:
    return [arg for key, value in small_overrides(method).items()
            for arg in (f"--{key}", json.dumps(value).replace(" ", ""))]


def refuse_training(method: Method, dataset_dir: Path, root: Path, **overrides) -> str:
    with in_bundle(method.bundle_dir):
        return refusal_in_process(method.bundle_dir, ["train.json"], "training", "train#trainer",
                                  bundle_root=str(root), dataset_dir=str(dataset_dir),
                                  **{**small_overrides(method), **overrides})


def write_datalist(folder: Path, content: str | dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return folder / "dataset.json"


def datalist_without(dataset: Path, key: str, out: Path) -> Path:
    content = json.loads((dataset / "dataset.json").read_text())
    del content[key]
    shutil.copytree(dataset, out)
    return write_datalist(out, content)


@pytest.mark.parametrize("problem", ["missing_folder", "empty_folder", "invalid_json", "no_training", "no_labels"])
@pytest.mark.parametrize("method", method_params())
def test_dataset_folder_and_datalist_refusals(method, problem, dataset_for, tmp_path):
    folder = tmp_path / "data"
    if problem == "empty_folder":
        folder.mkdir()
    if problem == "invalid_json":
        write_datalist(folder, '{"training": [')
    if problem in ("no_training", "no_labels"):
        datalist_without(dataset_for(method), {"no_training": "training", "no_labels": "labels"}[problem], folder)
    expected = {
        "missing_folder": [f"datalist {folder}/dataset.json does not exist: pass --dataset_dir"],
        "empty_folder": [f"datalist {folder}/dataset.json does not exist: pass --dataset_dir"],
        "invalid_json": [f"datalist {folder}/dataset.json is not valid JSON"],
        "no_training": [f"datalist {folder}/dataset.json has no", "'training'"],
        "no_labels": [f"datalist {folder}/dataset.json has no 'labels' mapping", "--class_names"],
    }[problem]
    message = refuse_training(method, folder, tmp_path / "run")
    assert all(fragment in message for fragment in expected), message


@pytest.mark.parametrize("method", method_params(BACKBONE_METHODS))
def test_unknown_backbone_and_indivisible_window_are_refused(method, dataset_for, synthetic_dataset, tmp_path):
    dataset = dataset_for(method)
    message = refuse_training(method, dataset, tmp_path / "a", backbone="unetr")
    assert "unknown backbone 'unetr': set --backbone to one of segresnet, unet, swinunetr" in message
    message = refuse_training(method, dataset, tmp_path / "a", backbone="swinunetr", roi_size=[48, 48, 48])
    assert "roi_size [48, 48, 48] does not suit SwinUNETR: every size must be divisible by 32" in message
    with in_bundle(method.bundle_dir):
        message = refusal_in_process(method.bundle_dir, ["inference.json"], "run", "evaluator",
                                     bundle_root=str(tmp_path / "b"), dataset_dir=str(synthetic_dataset),
                                     output_dir=str(tmp_path / "out"), backbone="swinunetr", roi_size=[48, 48, 48])
    assert "roi_size [48, 48, 48] does not suit SwinUNETR: every size must be divisible by 32" in message


def test_segresnet_vae_crop_must_be_its_fixed_size(synthetic_dataset, tmp_path):
    method = by_name("segresnet_vae")
    message = refuse_training(method, synthetic_dataset, tmp_path / "a", roi_size=[40, 40, 40])
    assert "SegResNetVAE input_image_size [40, 40, 40] must be divisible by 16" in message
    message = refuse_training(method, synthetic_dataset, tmp_path / "b", **{"network_def#input_image_size": [64] * 3})
    assert "training crop [32, 32, 32] (RandCropByPosNegLabeld) differs from SegResNetVAE input_image_size" in message


def save_other_network(root: Path) -> Path:
    """A checkpoint of another network (a small UNet) where the bundles look for a SegResNet's."""
    (root / "models").mkdir(parents=True)
    torch.save(other_network().state_dict(), root / "models/model.pt")
    return root / "models/model.pt"


def refuse_inference(method: Method, root: Path, dataset: Path, **overrides) -> str:
    with in_bundle(method.bundle_dir):
        return refusal_in_process(method.bundle_dir, ["inference.json"], "run", "evaluator", bundle_root=str(root),
                                  dataset_dir=str(dataset), **{**small_overrides(method), **overrides})


def refuse_evaluation(method: Method, root: Path, dataset: Path, **overrides) -> str:
    with in_bundle(method.bundle_dir):
        return refusal_in_process(method.bundle_dir, ["train.json", "evaluate.json"], "run", "validate#evaluator",
                                  bundle_root=str(root), dataset_dir=str(dataset),
                                  **{**small_overrides(method), **overrides})


@pytest.mark.parametrize("method", method_params([m for m in METHODS if m.stage1 is not None]))
def test_prerequisite_stage_checkpoint_of_another_network_is_refused(method, synthetic_dataset, tmp_path):
    """ReSeg's stage-2 teacher (the registry's stage 1 writes it) saved from another network."""
    teacher = save_other_network(tmp_path / "run").rename(tmp_path / "run" / method.stage1.writes)
    message = refuse_training(method, synthetic_dataset, tmp_path / "run",
                              **dict.fromkeys(method.weights, 0.035))
    assert f"checkpoint {teacher} does not fit this SegResNet: it was saved from another network" in message


@pytest.mark.parametrize("method", method_params())
def test_inference_refusals(method, synthetic_dataset, tmp_path):
    root = tmp_path / "run"
    checkpoint = save_other_network(root)
    output = str(tmp_path / "out")
    message = refuse_inference(method, root, synthetic_dataset, output_dir=str(synthetic_dataset / "imagesTs"))
    assert f"output_dir {synthetic_dataset / 'imagesTs'} is an input folder" in message
    message = refuse_inference(method, root, synthetic_dataset, output_dir=output)
    assert f"checkpoint {checkpoint} does not fit this SegResNet: it was saved from another network" in message
    assert "83 missing keys: convInit.conv.weight, conv_final.0.bias" in message and "and 78 more" in message
    assert "49 unexpected keys: model.0.conv.unit0.adn.A.weight" in message
    message = refuse_inference(method, tmp_path / "untrained", synthetic_dataset, output_dir=output)
    assert f"checkpoint {tmp_path / 'untrained/models/model.pt'} does not exist: train the bundle first" in message
    images = tmp_path / "data" / "imagesTs"
    images.mkdir(parents=True)
    blank = constant_image(images, *source_arrays(synthetic_dataset))
    message = refuse_inference(method, root, tmp_path / "data", output_dir=output)
    assert "the images to segment cannot be used" in message and blank.expected in message
    empty = tmp_path / "empty"
    (empty / "imagesTs").mkdir(parents=True)
    assert "no input images found" in refuse_inference(method, root, empty, output_dir=output)


@pytest.mark.parametrize("method", method_params())
def test_evaluation_refusals(method, dataset_for, tmp_path):
    dataset = dataset_for(method)
    root = tmp_path / "run"
    checkpoint = save_other_network(root)
    message = refuse_evaluation(method, root, dataset)
    assert f"checkpoint {checkpoint} does not fit this SegResNet" in message
    message = refuse_evaluation(method, tmp_path / "untrained", dataset)
    assert f"checkpoint {tmp_path / 'untrained/models/model.pt'} does not exist" in message
    broken_dataset = tmp_path / "broken"
    shutil.copytree(dataset, broken_dataset)
    content = json.loads((broken_dataset / "dataset.json").read_text())
    fractional = fractional_label(broken_dataset, *source_arrays(dataset))
    content["validation"][0] = fractional.entry
    write_datalist(broken_dataset, content)
    message = refuse_evaluation(method, root, broken_dataset)
    assert "the cases to evaluate from" in message and fractional.expected in message


@pytest.mark.parametrize("method", method_params())
def test_volume_smaller_than_the_crop_is_padded(method, synthetic_dataset, tmp_path):
    """The decision that makes "smaller than the crop" legal: the real train transforms pad it to the crop, for
    labelled images and, where the method trains on unlabeled images, for those."""
    image, label, affine = source_arrays(synthetic_dataset)
    img, lab = _pair(tmp_path, "small", image[4:16, 4:16, 4:16], label[4:16, 4:16, 4:16], affine)
    with in_bundle(method.bundle_dir):
        flow = workflow(method.bundle_dir, ["train.json"], None, bundle_root=str(tmp_path),
                        dataset_dir=str(synthetic_dataset), **small_overrides(method))
        for sample in flow.parser.get_parsed_content("train#preprocessing")({"image": img, "label": lab}):
            assert sample["image"].shape[1:] == sample["label"].shape[1:] == (32, 32, 32)
        if method.needs_unlabeled:
            unlabeled = flow.parser.get_parsed_content("train#unlabeled_dataset#transform")({"image": img})
            assert all(view.shape[1:] == (32, 32, 32) for sample in unlabeled for key, view in sample.items()
                       if key.startswith("unlabeled_"))


# ---------------------------------------------------------------------------------------------------------------
# The real CLI: a representative subset


def dataset_with_every_broken_case(dataset: Path, out: Path, semi: bool) -> tuple[Path, list[str]]:
    """A copy of ``dataset`` whose training list also holds every broken case (in a folder of its own); the
    expected fragments. A method that trains on unlabeled images (``semi``: SemSim) reads a training entry without
    a label as an unlabelled image, so there a truncated unlabelled image replaces the entry without a label."""
    shutil.copytree(dataset, out)
    broken_dir = out / "broken"
    broken_dir.mkdir()
    content = json.loads((out / "dataset.json").read_text())
    expected = []
    arrays = source_arrays(dataset)
    for name, make in BROKEN_CASES.items():
        if semi and name == "entry_without_label":
            continue
        broken = make(broken_dir, *arrays)
        content["training"].append(broken.entry)
        expected.append(broken.expected)
    if semi:
        unlabeled = broken_dir / "unlabeled_truncated.nii.gz"
        data = (dataset / "imagesTr" / SOURCE_CASE).read_bytes()
        unlabeled.write_bytes(data[: len(data) // 2])
        content["training"].append({"image": str(unlabeled)})
        expected.append(f"{unlabeled}: cannot be read (an unlabeled image)")
    write_datalist(out, content)
    return out, expected


@pytest.mark.parametrize("method", method_params())
def test_cli_training_lists_every_broken_case_before_training(method, dataset_for, tmp_path):
    dataset, expected = dataset_with_every_broken_case(dataset_for(method), tmp_path / "data",
                                                       method.needs_unlabeled)
    proc = run_bundle(method.bundle_dir, ["configs/train.json"], "--bundle_root", str(tmp_path / "run"),
                      "--dataset_dir", str(dataset), "--max_epochs", "1", "--progress_bar", "False",
                      *small_cli_args(method), run_id="training", check=False)
    assert proc.returncode != 0
    assert f"the dataset of {dataset}/dataset.json cannot be used for training" in proc.stderr
    missing = [fragment for fragment in expected if fragment not in proc.stderr]
    assert missing == [], proc.stderr[-5000:]
    assert "Epoch[" not in proc.stdout + proc.stderr and not (tmp_path / "run" / "models").exists()


def test_cli_inference_refuses_a_checkpoint_of_another_network(synthetic_dataset, tmp_path):
    method = by_name("selfreg")
    checkpoint = save_other_network(tmp_path / "run")
    proc = run_bundle(method.bundle_dir, ["configs/inference.json"], "--bundle_root", str(tmp_path / "run"),
                      "--dataset_dir", str(synthetic_dataset), "--output_dir", str(tmp_path / "out"),
                      *small_cli_args(method), check=False)
    assert proc.returncode != 0
    assert f"checkpoint {checkpoint} does not fit this SegResNet: it was saved from another network" in proc.stderr
    assert not (tmp_path / "out").exists()
