"""SemSim's semi-supervised data: the labelled/validation/unlabelled split of a datalist (three ways of giving
unlabelled images), the unlabelled pool of a MONAI Label datastore (no datalist), the dataset check of unlabelled
images, the refusal without unlabelled images, the loader that pairs labelled and unlabelled batches, and
make_dataset.py --labeled."""

from __future__ import annotations

import json
import os
import shutil
from itertools import zip_longest
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLES, REPO, bundle_scripts_module, in_bundle, load_module
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from monai.losses import DiceLoss
from torch.utils.data import DataLoader, DistributedSampler

data = load_module(REPO / "bundles/template/scripts/data.py")
check = load_module(REPO / "bundles/template/scripts/dataset_check.py")
semi_data = bundle_scripts_module(BUNDLES / "semsim_segmentation", "semi_data")
sampling = bundle_scripts_module(BUNDLES / "semsim_segmentation", "sampling")
AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])
UNLABELED_KEYS = ("unlabeled_image", "unlabeled_strong1", "unlabeled_strong2")


def save(path: Path, array: np.ndarray | None = None) -> str:
    """A tiny NIfTI image (6^3 random intensities unless ``array`` is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.RandomState(0).rand(6, 6, 6).astype(np.float32) if array is None else array
    nib.save(nib.Nifti1Image(array, AFFINE), path)
    return str(path)


def write_datalist(root: Path, num_labeled: int, num_unlabeled: int = 0, **keys) -> str:
    """An MSD folder: ``num_labeled`` cases l<i> with labels, then ``num_unlabeled`` training entries u<i> without;
    every file is written. ``keys`` are added to dataset.json as they are."""
    training = []
    for i in range(num_labeled):
        save(root / f"imagesTr/l{i}.nii.gz")
        save(root / f"labelsTr/l{i}.nii.gz", np.zeros((6, 6, 6), np.uint8))
        training.append({"image": f"./imagesTr/l{i}.nii.gz", "label": f"./labelsTr/l{i}.nii.gz"})
    for i in range(num_unlabeled):
        save(root / f"imagesTr/u{i}.nii.gz")
        training.append({"image": f"./imagesTr/u{i}.nii.gz"})
    content = {"labels": {"0": "background", "1": "organ"}, "training": training, **keys}
    (root / "dataset.json").write_text(json.dumps(content))
    return str(root / "dataset.json")


def names(items: list[dict], key: str = "image") -> list[str]:
    return [Path(item[key]).name for item in items]


def test_unlabeled_training_entries_msd_layout(tmp_path):
    split = data.semi_supervised_split(write_datalist(tmp_path, 4, 2), str(tmp_path))
    assert split["unlabeled"] == [{"image": str(tmp_path / f"imagesTr/u{i}.nii.gz")} for i in range(2)]
    assert sorted(names(split["training"] + split["validation"])) == [f"l{i}.nii.gz" for i in range(4)]
    assert all("label" in item for item in split["training"] + split["validation"])


def test_unlabeled_key_resolves_against_base_dir(tmp_path):
    save(tmp_path / "extra/e0.nii.gz")
    datalist = write_datalist(tmp_path, 2, unlabeled=[{"image": "./extra/e0.nii.gz"}])
    unlabeled = data.semi_supervised_split(datalist, str(tmp_path))["unlabeled"]
    assert unlabeled == [{"image": str(tmp_path / "extra/e0.nii.gz")}]
    with pytest.raises(ValueError, match=r"dataset.json: every 'unlabeled' entry must be a dict \{'image': path\}"):
        data.semi_supervised_split(write_datalist(tmp_path / "b", 2, unlabeled=["./extra/e0.nii.gz"]), str(tmp_path))


def test_unlabeled_folder_lists_image_files_sorted(tmp_path):
    folder = tmp_path / "imagesUnlabeled"
    folder.mkdir()
    for name in ("b.nii.gz", "a.nii", "C.NRRD", "d.mha", "e.mhd", "e.raw", "notes.txt", "._b.nii.gz"):
        (folder / name).write_bytes(b"")  # the split reads no image; the dataset check does
    (folder / "series.nii").mkdir()  # a folder is not an image file
    datalist = write_datalist(tmp_path, 2)
    split = data.semi_supervised_split(datalist, str(tmp_path), unlabeled_dir=str(folder))
    assert names(split["unlabeled"]) == ["C.NRRD", "a.nii", "b.nii.gz", "d.mha", "e.mhd"]
    assert data.semi_supervised_split(datalist, str(tmp_path), unlabeled_dir=str(tmp_path / "none"))["unlabeled"] == []


def test_sources_combined_in_order_each_image_once(tmp_path):
    save(tmp_path / "imagesUnlabeled/x.nii.gz")
    save(tmp_path / "imagesVal/v0.nii.gz")
    save(tmp_path / "labelsVal/v0.nii.gz", np.zeros((6, 6, 6), np.uint8))
    datalist = write_datalist(
        tmp_path, 2, 2,
        validation=[{"image": "./imagesVal/v0.nii.gz", "label": "./labelsVal/v0.nii.gz"}],
        unlabeled=[
            {"image": "./imagesUnlabeled/x.nii.gz"},
            {"image": "./imagesTr/../imagesTr/u1.nii.gz"},  # a training entry without label, spelled differently
            {"image": "./imagesVal/v0.nii.gz"},  # the validation case
            {"image": "./imagesTr/l0.nii.gz"},  # a labelled case
        ],
    )
    # The folder holds the labelled images and u0, u1 again.
    split = data.semi_supervised_split(datalist, str(tmp_path), unlabeled_dir=str(tmp_path / "imagesTr"))
    assert names(split["unlabeled"]) == ["u0.nii.gz", "u1.nii.gz", "x.nii.gz"]
    assert names(split["training"]) == ["l0.nii.gz", "l1.nii.gz"] and names(split["validation"]) == ["v0.nii.gz"]


@pytest.mark.parametrize("seed", range(4))
def test_validation_is_drawn_from_labeled_cases_as_split_datalist_draws(tmp_path, seed):
    # Unlabelled entries interleaved with the labelled ones must not move the seeded split.
    mixed = write_datalist(tmp_path / "mixed", 6, 4)
    content = json.loads(Path(mixed).read_text())
    pairs = zip_longest(content["training"][:6], content["training"][6:])  # l0, u0, l1, u1, ..., l4, l5
    content["training"] = [entry for pair in pairs for entry in pair if entry]
    Path(mixed).write_text(json.dumps(content))
    split = data.semi_supervised_split(mixed, str(tmp_path / "mixed"), val_fraction=0.3, seed=seed)
    reference = data.split_datalist(write_datalist(tmp_path / "labeled", 6), str(tmp_path / "labeled"), 0.3, seed)
    assert names(split["validation"]) == names(reference["validation"]) and len(split["validation"]) == 2
    assert names(split["training"]) == names(reference["training"])
    assert sorted(names(split["unlabeled"])) == [f"u{i}.nii.gz" for i in range(4)]


@pytest.mark.parametrize(
    "seed, fraction, validation",
    [(0, 0.2, [0, 5]), (3, 0.2, [3, 8]), (1, 0.5, [3, 1, 7, 8, 5])],  # split_datalist's splits before the refactor
)
def test_split_datalist_unchanged(tmp_path, seed, fraction, validation):
    datalist = write_datalist(tmp_path, 10)
    split = data.split_datalist(datalist, str(tmp_path), fraction, seed)
    assert names(split["validation"]) == [f"l{i}.nii.gz" for i in validation]
    assert sorted(names(split["training"] + split["validation"])) == sorted(f"l{i}.nii.gz" for i in range(10))
    assert data.semi_supervised_split(datalist, str(tmp_path), fraction, seed) == {**split, "unlabeled": []}


def write_datastore(root: Path) -> tuple[list[dict], list[dict]]:
    """A MONAI Label local datastore: every image in studies/ (labelled a, b, c; unlabelled d, e; a symlink to a;
    the datastore's own JSON), labels under studies/labels/final; plus a second folder other/ with a labelled
    f.nii (its label in other_labels/) and an unlabelled g.nii. Returns the training and validation items MONAI
    Label would pass."""
    studies, other = root / "studies", root / "other"
    for name in ("a", "b", "c", "d", "e"):
        save(studies / f"{name}.nii.gz")
    for name in ("a", "b", "c"):
        save(studies / f"labels/final/{name}.nii.gz", np.zeros((6, 6, 6), np.uint8))
    (studies / "datastore_v2.json").write_text("{}")
    os.symlink(studies / "a.nii.gz", studies / "link_to_a.nii.gz")
    save(other / "f.nii")
    save(root / "other_labels/f.nii", np.zeros((6, 6, 6), np.uint8))
    save(other / "g.nii")

    def item(image: Path, label: Path) -> dict:
        return {"image": str(image), "label": str(label)}

    training = [item(studies / f"{n}.nii.gz", studies / f"labels/final/{n}.nii.gz") for n in ("a", "b")]
    validation = [item(studies / "c.nii.gz", studies / "labels/final/c.nii.gz"),
                  item(other / "f.nii", root / "other_labels/f.nii")]
    return training, validation


def test_datastore_unlabeled_is_every_other_image_beside_the_labelled(tmp_path):
    training, validation = write_datastore(tmp_path)
    pool = semi_data.datastore_unlabeled(training, validation)
    # studies/ first (the first item's folder), names sorted; the labelled images, their labels (labels/final is a
    # folder), the symlink to a labelled image and the datastore's JSON are left out; other/ only by its own images
    expected = [tmp_path / "studies/d.nii.gz", tmp_path / "studies/e.nii.gz", tmp_path / "other/g.nii"]
    assert pool == [{"image": str(path)} for path in expected]
    assert semi_data.datastore_unlabeled(training) == [{"image": str(tmp_path / f"studies/{n}.nii.gz")}
                                                        for n in ("c", "d", "e")]


def semsim_train_config(dataset_dir: Path, bundle_root: Path, **overrides) -> ConfigParser:
    """SemSim's train.json as ``monai.bundle run`` parses it, with ``overrides`` (config ids, ``#`` for ``__``)."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "semsim_segmentation/configs/train.json"))
    parser.update({"bundle_root": str(bundle_root), "dataset_dir": str(dataset_dir),
                   **{key.replace("__", "#"): value for key, value in overrides.items()}})
    return parser


@pytest.fixture
def semsim_imports():
    """SemSim's ``scripts`` package is the one imported, as ``monai.bundle run`` does in the bundle folder."""
    with in_bundle(BUNDLES / "semsim_segmentation"):
        yield


def test_train_config_without_datalist_uses_the_datastore(tmp_path, semi_dataset, semsim_imports):
    """As MONAI Label runs the bundle: no datalist, the datastore's labelled items as train#dataset#data and
    validate#dataset#data. The classes are metadata.json's, the unlabelled pool is the other images in their
    folders, and an interval checkpoint is not resumed (each MONAI Label training is a new run). With a datalist
    the config is unchanged: its own split's unlabelled images, and resume."""
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLES / "semsim_segmentation/configs", root / "configs")
    (root / "models").mkdir()
    (root / "models/checkpoint_epoch=3.pt").write_bytes(b"")
    training, validation = write_datastore(tmp_path)
    datastore = semsim_train_config(tmp_path / "no_dataset", root, train__dataset__data=training,
                                    validate__dataset__data=validation)
    assert datastore.get_parsed_content("classes") == ["background", "grey matter", "white matter"]
    assert names(datastore.get_parsed_content("unlabeled_items")) == ["d.nii.gz", "e.nii.gz", "g.nii"]
    assert datastore.get_parsed_content("check_data") == 2 + 2 + 3  # the given pairs and the pool
    assert datastore.get_parsed_content("resume_loader") is None

    cli = semsim_train_config(semi_dataset, root)
    split = data.semi_supervised_split(str(semi_dataset / "dataset.json"), str(semi_dataset))
    assert cli.get_parsed_content("unlabeled_items") == split["unlabeled"] != []
    assert cli.get_parsed_content("check_data") == check.check_dataset(
        split["training"], split["validation"], num_classes=3, unlabeled=split["unlabeled"])
    assert cli.get_parsed_content("resume_loader") is not None


def test_plan_counts_the_unlabeled_images_semsim_caches(tmp_path, semi_dataset, semsim_imports):
    """The plan's cache size against the bytes SemSim's caches hold after the deterministic transforms: the
    labelled and validation cases and the unlabelled images, which a supervised plan leaves out."""
    from monai.bundle import ConfigWorkflow

    root = tmp_path / "bundle"
    plans = {}
    for name, unlabeled_dir in {"semsim": str(semi_dataset / "imagesUnlabeled"), "supervised": None}.items():
        flow = ConfigWorkflow(str(BUNDLES / "semsim_segmentation/configs/plan.json"), workflow_type=None,
                              run_id="plan", bundle_root=str(root), dataset_dir=str(semi_dataset), device="cpu",
                              host_memory_gb=64, unlabeled_dir=unlabeled_dir, plan_file=str(root / f"{name}.json"))
        flow.initialize()
        flow.run()
        plans[name] = json.loads((root / f"{name}.json").read_text())["settings"]
    assert plans["semsim"]["cache"] == "memory" and plans["semsim"]["cache_rate"] == 1.0
    config = semsim_train_config(semi_dataset, root, plan_file=str(root / "semsim.json"), num_workers=0)
    caches = [config.get_parsed_content(f"{split}#dataset")._cache for split in ("train", "validate")]
    unlabeled = config.get_parsed_content("train#unlabeled_dataset")._cache
    labelled_bytes = sum(item[key].numel() * 4 for items in caches for item in items for key in ("image", "label"))
    unlabeled_bytes = sum(item["image"].numel() * 4 for item in unlabeled)
    assert len(unlabeled) == 2 and unlabeled_bytes > 0
    assert plans["semsim"]["cache_gb"] * 2**30 == pytest.approx(labelled_bytes + unlabeled_bytes, rel=0.01)
    assert plans["supervised"]["cache_gb"] * 2**30 == pytest.approx(labelled_bytes, rel=0.01)


@pytest.mark.parametrize(("num_samples", "unlabeled", "crops_per_batch"), [(2, 1, [2]), (1, 3, [2])])
def test_every_unlabeled_batch_has_two_crops_for_cutmix(tmp_path, semsim_imports, num_samples, unlabeled,
                                                        crops_per_batch):
    """CutMix needs two unlabeled crops per batch. One unlabeled volume cut into two crops is a full batch; with
    one crop per volume a pass's last batch of a single volume is dropped (3 volumes, batch size 2: one batch a
    pass). An epoch of 3 iterations is 3 such batches."""
    studies = tmp_path / "studies"
    for name in ("a", "b", *(f"u{i}" for i in range(unlabeled))):
        save(studies / f"{name}.nii.gz")
    labeled = [{"image": str(studies / f"{n}.nii.gz"), "label": save(tmp_path / f"labels/{n}.nii.gz",
                                                                        np.zeros((6, 6, 6), np.uint8))}
               for n in ("a", "b")]
    config = semsim_train_config(tmp_path / "no_dataset", tmp_path / "bundle", train__dataset__data=labeled[:1],
                                 validate__dataset__data=labeled[1:], num_samples=num_samples, roi_size=[4, 4, 4],
                                 num_workers=0, cache_rate=0, iterations_per_epoch=3)
    loader = config.get_parsed_content("train#unlabeled_dataloader")
    assert [batch["unlabeled_image"].shape[0] for batch in loader] == crops_per_batch * 3


def test_refusals_name_the_datalist(tmp_path):
    only_unlabeled = write_datalist(tmp_path / "a", 0, 3)
    with pytest.raises(ValueError, match=f"datalist {only_unlabeled} has no labelled case"):
        data.semi_supervised_split(only_unlabeled, str(tmp_path / "a"))
    one_labeled = write_datalist(tmp_path / "b", 1, 3)
    with pytest.raises(ValueError, match="has one labelled training case and no 'validation' key: add a second"):
        data.semi_supervised_split(one_labeled, str(tmp_path / "b"))


def test_check_dataset_names_every_bad_unlabeled_image(tmp_path):
    label = save(tmp_path / "lab.nii.gz", np.ones((6, 6, 6), np.uint8))
    pair = {"image": save(tmp_path / "img.nii.gz"), "label": label}
    good = {"image": save(tmp_path / "good.nii.gz")}
    assert check.check_dataset([pair], [pair], unlabeled=[good, good]) == 4
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    nan = np.ones((6, 6, 6), np.float32)
    nan[0, 1, 2] = np.inf
    bad = {
        "broken": str(broken),
        "missing": str(tmp_path / "missing.nii.gz"),
        "nan": save(tmp_path / "nan.nii.gz", nan),
        "channels": save(tmp_path / "channels.nii.gz", np.zeros((6, 6, 6, 2), np.float32)),
        "flat": save(tmp_path / "flat.nii.gz", np.arange(36, dtype=np.float32).reshape(6, 6)),
    }
    with pytest.raises(check.DatasetError) as err:
        check.check_dataset([pair], [pair], unlabeled=[good, *({"image": p} for p in bad.values())])
    message = str(err.value)
    assert f"{bad['broken']}: cannot be read" in message
    assert f"{bad['missing']}: file does not exist" in message
    assert f"{bad['nan']}: contains NaN or Inf intensities" in message
    assert f"{bad['channels']}: has 2 channel(s), the network expects 1" in message
    assert f"{bad['flat']}: has 2 spatial dimension(s) (shape [6, 6]), the network is 3D" in message
    assert good["image"] not in message


def test_require_unlabeled(tmp_path):
    with pytest.raises(ValueError) as err:
        semi_data.require_unlabeled([], "/data/task/dataset.json", [0.5, 0.25, 0.25])
    message = str(err.value)
    assert message.startswith("datalist /data/task/dataset.json gives no unlabelled image")
    for hint in ("'training' entries without a 'label'", "imagesUnlabeled/", "'unlabeled' list", "weights to 0"):
        assert hint in message
    assert semi_data.require_unlabeled([], "dataset.json", [0.0, 0, 0]) == []
    items = ({"image": "a.nii.gz"},)
    assert semi_data.require_unlabeled(items, "dataset.json", [0.5, 0.25, 0.25]) == list(items)


def loader(num: int, batch_size: int = 1, keys: tuple[str, ...] = ("image", "label"), **kwargs) -> DataLoader:
    """Batches of ``num`` items whose every key holds the item's index (so a batch says which items it holds)."""
    items = [{key: torch.tensor([float(i)]) for key in keys} for i in range(num)]
    return DataLoader(items, batch_size=batch_size, **kwargs)


def indices(batches: list[dict], key: str) -> list[int]:
    """The item indices that ``batches`` hold under ``key``, in order (each item's tensor is filled with its index)."""
    return [int(i) for batch in batches for i in batch[key].flatten(1)[:, 0]]


def test_loader_length_cycling_and_merged_keys():
    semi = semi_data.SemiSupervisedLoader(loader(3), loader(7, batch_size=2, keys=UNLABELED_KEYS))
    assert len(semi) == 4
    batches = list(semi)
    assert len(batches) == 4 and all(set(b) == {"image", "label", *UNLABELED_KEYS} for b in batches)
    assert indices(batches, "image") == [0, 1, 2, 0]  # the labelled loader started again
    assert indices(batches, "unlabeled_strong2") == list(range(7))  # the longer loader once
    longer_labeled = semi_data.SemiSupervisedLoader(loader(5), loader(2, keys=UNLABELED_KEYS))
    assert len(longer_labeled) == 5 and indices(list(longer_labeled), "unlabeled_image") == [0, 1, 0, 1, 0]


def test_restarted_loader_reshuffles():
    generator = torch.Generator().manual_seed(0)
    semi = semi_data.SemiSupervisedLoader(loader(5, shuffle=True, generator=generator), loader(20, keys=UNLABELED_KEYS))
    for _ in range(2):  # epochs
        order = indices(list(semi), "label")
        passes = [order[i : i + 5] for i in range(0, 20, 5)]
        assert all(sorted(p) == list(range(5)) for p in passes)
        assert len({tuple(p) for p in passes}) > 1


def test_supervised_only():
    labeled = loader(3, batch_size=2)
    semi = semi_data.SemiSupervisedLoader(labeled)
    assert len(semi) == 2
    batches = list(semi)
    assert [set(b) for b in batches] == [{"image", "label"}] * 2 and indices(batches, "image") == [0, 1, 2]
    # with the unlabelled loader present but unused, the epoch is as long as a semi-supervised one
    same_budget = semi_data.SemiSupervisedLoader(loader(3, batch_size=2), loader(7, keys=UNLABELED_KEYS),
                                                 use_unlabeled=False)
    batches = list(same_budget)
    assert len(same_budget) == len(batches) == 7 and all(set(b) == {"image", "label"} for b in batches)
    assert len(semi_data.SemiSupervisedLoader(labeled, loader(0, keys=UNLABELED_KEYS), use_unlabeled=False)) == 2


def test_key_collisions_and_empty_loaders_are_refused():
    with pytest.raises(ValueError, match=r"unlabelled batch has keys \['image'\] that the labelled batch has too"):
        list(semi_data.SemiSupervisedLoader(loader(2), loader(2, keys=("image", "unlabeled_image"))))
    with pytest.raises(ValueError, match="the unlabeled data loader has no batch"):
        semi_data.SemiSupervisedLoader(loader(2), loader(0, keys=UNLABELED_KEYS))


class RecordingSampler(DistributedSampler):
    """A one-process DistributedSampler that records its set_epoch calls."""

    def __init__(self, dataset: list) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)
        super().set_epoch(epoch)


def distributed_loader(items: list[dict]) -> DataLoader:
    """A loader as the bundle's multi-GPU overlay builds it: the process's shard in batches of the template's
    ``EpochBatchSampler`` (one pass a batch sampler's epoch)."""
    return DataLoader(items, batch_sampler=sampling.EpochBatchSampler(RecordingSampler(items), batch_size=1))


def test_loader_in_supervised_trainer_sets_sampler_epochs():
    images = [torch.full((1, 4, 4), float(i)) for i in range(5)]
    labeled = distributed_loader([{"image": image, "label": (image > 0).float()} for image in images[:2]])
    unlabeled = distributed_loader([dict.fromkeys(UNLABELED_KEYS, image) for image in images])
    network = torch.nn.Conv2d(1, 2, 1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=semi_data.SemiSupervisedLoader(labeled, unlabeled),
        network=network, optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        loss_function=DiceLoss(to_onehot_y=True, softmax=True), decollate=False,
    )
    seen: list[dict] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: seen.append(engine.state.batch))
    trainer.run()
    assert trainer.state.epoch_length == 5 and trainer.state.iteration == 10
    assert all(set(b) == {"image", "label", *UNLABELED_KEYS} for b in seen)
    assert labeled.batch_sampler.sampler.epochs == [0, 1, 2, 3, 4, 5]  # three labelled passes per epoch
    assert unlabeled.batch_sampler.sampler.epochs == [0, 1]
    epochs = [indices(seen[i : i + 5], "unlabeled_image") for i in (0, 5)]
    assert all(sorted(e) == list(range(5)) for e in epochs) and epochs[0] != epochs[1]  # set_epoch reshuffled


def test_make_dataset_labeled(make_dataset_module, tmp_path, capsys):
    out = tmp_path / "semi"
    make_dataset_module.main(
        ["--task", "synthetic", "--out", str(out), "--num-cases", "4", "--size", "16", "--labeled", "1"]
    )
    assert "1 of 2 training cases labelled" in capsys.readouterr().out
    content = json.loads((out / "dataset.json").read_text())
    assert [sorted(e) for e in content["training"]] == [["image", "label"], ["image"]]
    assert all("label" in e for e in content["validation"] + content["test"])
    written = [content["training"][0], *content["validation"]]  # no label file for the unlabelled case
    assert sorted(os.listdir(out / "labelsTr")) == sorted(names(written, "label"))
    assert len(os.listdir(out / "imagesTr")) == 3
    split = data.semi_supervised_split(str(out / "dataset.json"), str(out))
    assert names(split["training"]) == names(content["training"][:1])
    assert names(split["unlabeled"]) == names(content["training"][1:])
    assert check.check_dataset(split["training"], split["validation"], num_classes=3, unlabeled=split["unlabeled"]) == 3
    for labeled in (0, 3):
        with pytest.raises(ValueError, match="labeled"):
            make_dataset_module.make_dataset("synthetic", tmp_path / "bad", num_cases=4, size=16, labeled=labeled)
