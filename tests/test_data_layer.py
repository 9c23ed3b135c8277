"""The shared data layer: datalists (MSD and MONAI JSON), NRRD/MHA/DICOM input through the dataset check, the
real-volume dataset tool, and the bundles' copies of the shared code. The dataset check's refusals of bad input
are in test_bad_input.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
from helpers import REPO, load_module

data = load_module(REPO / "bundles/template/scripts/data.py")
check = load_module(REPO / "bundles/template/scripts/dataset_check.py")


def refusal(training: list[dict], validation: list[dict] | None = None, **kwargs) -> str:
    with pytest.raises(check.DatasetError) as err:
        check.check_dataset(training, validation if validation is not None else training, **{"num_classes": 3, **kwargs})
    return str(err.value)


@pytest.mark.parametrize("ext", ["nrrd", "mha"])
def test_itk_formats_are_read(tmp_path, ext):
    image = itk.image_from_array(np.random.RandomState(0).rand(6, 7, 8).astype(np.float32))
    label = itk.image_from_array(np.ones((6, 7, 8), np.uint8) * 3)
    for img in (image, label):
        img.SetSpacing((1.0, 2.0, 3.0))
    itk.imwrite(image, str(tmp_path / f"img.{ext}"))
    itk.imwrite(label, str(tmp_path / f"lab.{ext}"))
    pair = {"image": str(tmp_path / f"img.{ext}"), "label": str(tmp_path / f"lab.{ext}")}
    assert f"lab.{ext}: label values [3]" in refusal([pair])
    assert check.check_dataset([pair], [pair], num_classes=4) == 2


def write_dicom_series(folder: Path, array: np.ndarray) -> str:
    folder.mkdir()
    image_type = itk.Image[itk.SS, 3]
    writer = itk.ImageSeriesWriter[image_type, itk.Image[itk.SS, 2]].New(
        Input=itk.image_from_array(array.astype(np.int16)), ImageIO=itk.GDCMImageIO.New(),
        FileNames=[str(folder / f"slice{i:03d}.dcm") for i in range(array.shape[0])])
    writer.Update()
    return str(folder)


def test_dicom_series_are_read(tmp_path):
    image = (np.random.RandomState(0).rand(5, 7, 8) * 1000).astype(np.int16)
    pair = {"image": write_dicom_series(tmp_path / "image", image),
            "label": write_dicom_series(tmp_path / "label", (image > 500).astype(np.int16))}
    assert check.check_dataset([pair], [pair], num_classes=2) == 2
    assert f"{pair['label']}: label values [1]" in refusal([pair], num_classes=1)


def write_msd(root: Path, num_cases: int, validation: int = 0, labels: dict | None = None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    cases = [{"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"} for i in range(num_cases)]
    content = {"labels": labels or {"0": "background", "1": "organ"}, "training": cases[validation:]}
    if validation:
        content["validation"] = cases[:validation]
    (root / "dataset.json").write_text(json.dumps(content))
    return root / "dataset.json"


def test_split_without_validation_key_is_seeded_and_disjoint(tmp_path):
    datalist = write_msd(tmp_path, 10)
    split = data.split_datalist(str(datalist), str(tmp_path), val_fraction=0.2, seed=3)
    again = data.split_datalist(str(datalist), str(tmp_path), val_fraction=0.2, seed=3)
    assert split == again and len(split["validation"]) == 2 and len(split["training"]) == 8
    assert not {d["image"] for d in split["training"]} & {d["image"] for d in split["validation"]}
    assert split["training"][0]["image"].startswith(str(tmp_path))  # relative paths resolved against base_dir


def test_split_uses_validation_key(tmp_path):
    split = data.split_datalist(str(write_msd(tmp_path, 5, validation=2)), str(tmp_path))
    assert [Path(d["image"]).name for d in split["validation"]] == ["c0.nii.gz", "c1.nii.gz"]


def test_monai_datalist_json_outside_the_data_folder(tmp_path):
    write_msd(tmp_path / "data", 4)
    datalist = tmp_path / "lists" / "my_split.json"
    datalist.parent.mkdir()
    shutil.move(tmp_path / "data" / "dataset.json", datalist)
    split = data.split_datalist(str(datalist), str(tmp_path / "data"), val_fraction=0.25)
    assert all(Path(d["image"]).parent == tmp_path / "data" / "imagesTr" for d in split["training"])


def test_class_names_from_labels(tmp_path):
    datalist = str(write_msd(tmp_path, 3, labels={"1": "liver", "0": "background", "2": "tumour"}))
    assert data.read_class_names(datalist) == ["background", "liver", "tumour"]
    assert data.read_class_names(datalist, ["bg", "x"]) == ["bg", "x"]


def test_class_names_refusals(tmp_path):
    with pytest.raises(ValueError, match="must be 0..N-1 without gaps"):
        data.read_class_names(str(write_msd(tmp_path / "a", 2, labels={"0": "bg", "2": "x"})))
    with pytest.raises(FileNotFoundError, match="does not exist: pass --dataset_dir"):
        data.read_class_names(str(tmp_path / "none.json"))


def test_output_dir_may_not_be_an_input_folder(tmp_path):
    inputs = [{"image": str(tmp_path / "in" / "a.nii.gz")}]
    with pytest.raises(ValueError, match="is an input folder"):
        data.check_output_dir(str(tmp_path / "in"), inputs)
    with pytest.raises(ValueError, match="no input images found"):
        data.check_output_dir(str(tmp_path / "out"), [])
    assert data.check_output_dir(str(tmp_path / "out"), inputs) == str(tmp_path / "out")


def test_evaluation_on_test_split_needs_labels(tmp_path):
    datalist = write_msd(tmp_path, 3)
    content = json.loads(datalist.read_text())
    content["test"] = ["./imagesTs/t0.nii.gz"]
    datalist.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="without a label cannot be evaluated"):
        data.evaluation_items(str(datalist), str(tmp_path), split="test")


def test_synthetic_dataset_tool(synthetic_dataset):
    content = json.loads((synthetic_dataset / "dataset.json").read_text())
    assert len(content["training"]) == 4 and len(content["validation"]) == 2 and len(content["test"]) == 1
    split = data.split_datalist(str(synthetic_dataset / "dataset.json"), str(synthetic_dataset))
    assert check.check_dataset(split["training"], split["validation"], num_classes=3) == 6


def test_dataset_tool_never_overwrites_user_files(make_dataset_module, tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        make_dataset_module.make_dataset("synthetic", tmp_path, num_cases=3, size=16)
    assert (tmp_path / "mine.txt").read_text() == "precious"


@pytest.mark.parametrize("task, num_classes", [("tissue", 3), ("brain", 2)])
def test_real_volumes(make_dataset_module, tmp_path, task, num_classes):
    info = make_dataset_module.make_dataset(task, tmp_path / task)
    if info.source != "real":
        pytest.skip(f"real volumes could not be fetched here: {info.description}")
    datalist = str(info.path / "dataset.json")
    split = data.split_datalist(datalist, str(info.path))
    assert len(data.read_class_names(datalist)) == num_classes
    assert check.check_dataset(split["training"], split["validation"], num_classes=num_classes) >= 3
    orientations = {nib.aff2axcodes(nib.load(d["image"]).affine) for d in split["training"]}
    assert task == "tissue" or len(orientations) > 1  # real heads keep their own orientations


def test_semi_supervised_brain_pools_every_real_head_without_a_mask(make_dataset_module, tmp_path):
    info = make_dataset_module.make_dataset("brain", tmp_path / "brain", labeled=1)
    if info.source != "real":
        pytest.skip(f"real volumes could not be fetched here: {info.description}")
    datalist = str(info.path / "dataset.json")
    split = data.semi_supervised_split(datalist, str(info.path), unlabeled_dir=str(info.path / "imagesUnlabeled"))
    names = {key: sorted(Path(item["image"]).name for item in items) for key, items in split.items()}
    assert names == {"training": ["itk_head.nii.gz"], "validation": ["itk_head.nii.gz"],
                     "unlabeled": ["mni_t1.nii.gz", "nipy_anatomical.nii.gz"]}
    assert not (info.path / "labelsTr" / "mni_t1.nii.gz").exists()
    nipy = nib.load(info.path / "imagesUnlabeled" / "nipy_anatomical.nii.gz")
    assert nipy.shape == (33, 41, 25) and np.allclose(nipy.header.get_zooms(), 2.0)
    # the fully labelled task stays as it was: no unlabelled pool
    supervised = make_dataset_module.make_dataset("brain", tmp_path / "supervised")
    assert not (supervised.path / "imagesUnlabeled").exists()
    assert "unlabeled" not in json.loads((supervised.path / "dataset.json").read_text())
