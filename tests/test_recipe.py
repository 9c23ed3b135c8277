"""The training recipe of the template (docs/recipe.md): epochs by iterations, validation on a time-share schedule,
augmentation each part of which is on by default and off by override, and background crops drawn anywhere in the
background."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
import torch
from helpers import ALL_BUNDLES, BUNDLES, SELFREG_BUNDLE, SMALL_BACKBONES, TINY, in_bundle, overrides_from_cli, workflow
from ignite.engine import Engine, Events
from torch.utils.data import DistributedSampler, RandomSampler

# Each augmentation switch and the MONAI transform it turns off (3D; in 2D elastic is Rand2DElasticd).
AUGMENTATIONS = {
    "rotation": "RandRotated",
    "scaling": "RandZoomd",
    "elastic": "Rand3DElasticd",
    "flips": "RandFlipd",
    "noise": "RandGaussianNoised",
    "bias_field": "RandBiasFieldd",
    "brightness": "RandScaleIntensityd",
    "contrast": "RandScaleIntensityFixedMeand",
    "low_resolution": "RandSimulateLowResolutiond",
    "gamma": "RandAdjustContrastd",
}


def tiny(synthetic_dataset, tmp_path, **overrides):
    return {**overrides_from_cli([*TINY, *SMALL_BACKBONES["segresnet"]]), "bundle_root": str(tmp_path),
            "dataset_dir": str(synthetic_dataset), "roi_size": [32, 32, 32], "selfreg_weight": 0, **overrides}


def random_transform_names(synthetic_dataset, tmp_path, **overrides) -> list[str]:
    with in_bundle(SELFREG_BUNDLE):
        flow = workflow(SELFREG_BUNDLE, ["train.json"], "train", **tiny(synthetic_dataset, tmp_path, **overrides))
        return [type(t).__name__ for t in flow.parser.get_parsed_content("train#random_transforms")]


def test_every_bundle_trains_with_the_template_recipe():
    """SemSim sets only its own parts of ``train``: its crops and augmentation are the template's."""
    template = json.loads((BUNDLES / "template" / "configs" / "train.json").read_text())
    for bundle in ALL_BUNDLES:
        config = json.loads((bundle / "configs" / "train.json").read_text())
        assert config["train"]["random_transforms"] == template["train"]["random_transforms"], bundle.name
        assert config["augmentation"] == template["augmentation"], bundle.name
        assert config["train"]["trainer"]["epoch_length"] == "$@iterations_per_epoch or None", bundle.name
        # SegResNet with dropout 0.2, the default chosen by measurement (docs/recipe.md), in every bundle
        assert config["backbones"]["segresnet"]["dropout_prob"] == 0.2, bundle.name


@pytest.mark.parametrize("num_cases, iterations, per_epoch", [(1, 3, 3), (4, 3, 3), (2, 0, 2)])
def test_iterations_per_epoch_does_not_depend_on_the_number_of_cases(num_cases, iterations, per_epoch,
                                                                     synthetic_dataset, tmp_path):
    """3 iterations per epoch from 1 case (3 passes over the cases) and from 4 (an epoch ends mid-pass); 0 is one
    pass over the cases. Either way an epoch is one pass of the data loader (one iterator, so that its workers
    prepare batches ahead). No validation (interval 3 > 2 epochs) to keep the test short."""
    with in_bundle(SELFREG_BUNDLE):
        flow = workflow(SELFREG_BUNDLE, ["train.json"], "train", **tiny(
            synthetic_dataset, tmp_path, iterations_per_epoch=iterations, max_epochs=2, num_samples=1, roi_size=[16, 16, 16],
            val_share=None, val_interval=3))
        parser = flow.parser
        parser["train#dataset#data"] = parser.get_parsed_content("data_split")["training"][:num_cases]
        parser["validate#dataset#data"] = parser.get_parsed_content("data_split")["validation"][:1]
        trainer = parser.get_parsed_content("train#trainer")
        assert len(trainer.data_loader) == per_epoch
        counts, iterators = [], []
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: counts.append(e.state.iteration))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iterators.append(e._dataloader_iter))
        trainer.run()
    assert counts == [per_epoch, 2 * per_epoch]
    assert all(i is iterators[0] for i in iterators[:per_epoch])
    assert all(i is iterators[-1] for i in iterators[per_epoch:])
    # the polynomial schedule runs over all the iterations and ends at 0
    assert parser.get_parsed_content("lr_scheduler").total_iters == 2 * per_epoch
    assert parser.get_parsed_content("optimizer").param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_epoch_batches_are_the_passes_of_a_shuffling_loader(bundle_on_path):
    """5 cases in batches of 2, 7 batches an epoch: passes of 3 batches (2, 2 and a shorter last one), each pass a
    new order of all the cases; with drop_last the short batch is left out; 0 iterations is one pass."""
    bundle_on_path(SELFREG_BUNDLE)
    from scripts.sampling import EpochBatchSampler

    torch.manual_seed(0)
    batches = list(EpochBatchSampler(RandomSampler(range(5)), batch_size=2, iterations=7))
    assert [len(b) for b in batches] == [2, 2, 1, 2, 2, 1, 2]
    passes = [sum(batches[i : i + 3], []) for i in (0, 3)]
    assert all(sorted(p) == list(range(5)) for p in passes) and passes[0] != passes[1]
    dropped = EpochBatchSampler(RandomSampler(range(5)), batch_size=2, iterations=7, drop_last=True)
    assert len(dropped) == 7 and [len(b) for b in dropped] == [2] * 7
    one_pass = EpochBatchSampler(RandomSampler(range(5)), batch_size=2, iterations=0)
    assert len(one_pass) == 3 and sorted(sum(list(one_pass), [])) == list(range(5))
    with pytest.raises(ValueError, match="no batch of 4 from 3 case"):
        EpochBatchSampler(RandomSampler(range(3)), batch_size=4, iterations=5, drop_last=True)


def test_epoch_batches_set_the_distributed_epoch_of_each_pass(bundle_on_path):
    """One process's shard (a DistributedSampler of 2 ranks): a new shuffle per pass, as set_epoch gives it."""
    bundle_on_path(SELFREG_BUNDLE)
    from scripts.sampling import EpochBatchSampler

    shard = DistributedSampler(range(8), num_replicas=2, rank=1, shuffle=True, seed=0)
    sampler = EpochBatchSampler(shard, batch_size=4, iterations=3)
    batches = list(sampler)
    assert sampler.passes == 3
    for epoch, batch in enumerate(batches):
        shard.set_epoch(epoch)
        assert batch == list(shard)
    assert batches[0] != batches[1]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("share, validated", [(0.1, [1, 21, 30]), (None, list(range(1, 31)))])
def test_validation_costs_the_scheduled_share_of_training_time(share, validated, bundle_on_path):
    """1 s of training per epoch, 2 s per validation: with share 0.1 the next validation comes after 20 s of
    training; the first and the last epoch are always validated."""
    bundle_on_path(SELFREG_BUNDLE)
    from monai.engines import Evaluator

    from scripts import training

    clock = _Clock()
    epochs = []

    def validate(epoch):
        epochs.append(epoch)
        clock.now += 2.0

    validator = mock.MagicMock(spec=Evaluator)
    validator.run.side_effect = validate
    engine = Engine(lambda e, batch: setattr(clock, "now", clock.now + 1.0))
    with mock.patch.object(training.time, "perf_counter", clock):
        handler = training.TimeShareValidationHandler(validator, share=share)
        handler.attach(engine)
        engine.run([0], max_epochs=30)
    assert epochs == validated
    assert handler.train_seconds == pytest.approx(30.0)
    assert handler.measured_share == pytest.approx(2.0 * len(validated) / 30.0)
    with pytest.raises(ValueError, match="share"):
        training.TimeShareValidationHandler(validator, share=0)


def test_augmentation_is_on_by_default(synthetic_dataset, tmp_path):
    names = random_transform_names(synthetic_dataset, tmp_path)
    assert names[0] == "RandCropByPosNegLabeld"
    assert set(AUGMENTATIONS.values()) <= set(names)
    assert names.count("RandFlipd") == 3


@pytest.mark.parametrize("part", sorted(AUGMENTATIONS))
def test_each_augmentation_turns_off_by_override(part, synthetic_dataset, tmp_path):
    names = random_transform_names(synthetic_dataset, tmp_path, **{f"augmentation#{part}": False})
    assert AUGMENTATIONS[part] not in names
    assert set(AUGMENTATIONS.values()) - {AUGMENTATIONS[part]} <= set(names)


def test_augmentation_in_2d(synthetic_dataset, tmp_path):
    """spatial_dims 2: a 2D elastic deformation, two flips, and every transform runs on a 2D crop."""
    with in_bundle(SELFREG_BUNDLE):
        flow = workflow(SELFREG_BUNDLE, ["train.json"], "train", **tiny(
            synthetic_dataset, tmp_path, spatial_dims=2, roi_size=[32, 32]))
        transforms = flow.parser.get_parsed_content("train#random_transforms")
    names = [type(t).__name__ for t in transforms]
    assert "Rand2DElasticd" in names and "Rand3DElasticd" not in names and names.count("RandFlipd") == 2
    sample = {"image": torch.rand(1, 40, 40), "label": (torch.rand(1, 40, 40) > 0.5).float()}
    for t in transforms:
        if hasattr(t, "prob"):
            t.prob = 1.0
    for t in transforms:
        sample = t(sample)
        sample = sample[0] if isinstance(sample, list) else sample
    assert tuple(sample["image"].shape) == (1, 32, 32)


def skull_stripped_case(size: int = 24) -> dict[str, torch.Tensor]:
    """Zero background outside a head ball, positive intensities inside, the label a smaller ball: z-scored over the
    non-zero voxels (the template's MR normalisation), about half of the head falls below its mean."""
    from monai.transforms import NormalizeIntensity

    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    radius = np.sqrt(((grid - size / 2) ** 2).sum(0))
    rng = np.random.default_rng(0)
    image = np.where(radius < size / 3, rng.uniform(1.0, 2.0, radius.shape), 0.0).astype(np.float32)
    label = (radius < size / 6).astype(np.float32)
    image = NormalizeIntensity(nonzero=True)(torch.as_tensor(image[None]))
    return {"image": image, "label": torch.as_tensor(label[None])}


def crop_centre_values(crop, case, calls: int = 20) -> np.ndarray:
    crop.set_random_state(seed=0)
    return np.array([float(c["image"].flatten()[0]) for _ in range(calls) for c in crop(case)])


def test_background_crops_are_drawn_in_the_whole_background(synthetic_dataset, tmp_path):
    """Background centres are drawn from every background voxel, also the zero background of a skull-stripped
    scan and the head below its mean; thresholding the z-scored image at 0 (the former setting) never drew them."""
    from monai.transforms import RandCropByPosNegLabeld

    with in_bundle(SELFREG_BUNDLE):
        flow = workflow(SELFREG_BUNDLE, ["train.json"], "train", **tiny(
            synthetic_dataset, tmp_path, crop_pos=0, crop_neg=1, num_samples=10, roi_size=[1, 1, 1]))
        crop = flow.parser.get_parsed_content("train#random_transforms")[0]
    assert isinstance(crop, RandCropByPosNegLabeld)
    case = skull_stripped_case()
    values = crop_centre_values(crop, case)
    assert (values == 0).mean() > 0.5  # most background voxels lie outside the head
    assert (values < 0).any()  # the head below its mean
    former = RandCropByPosNegLabeld(["image", "label"], "label", [1, 1, 1], pos=0, neg=1, num_samples=10,
                                    image_key="image", image_threshold=0)
    assert (crop_centre_values(former, case) > 0).all()


class _AlwaysClass(torch.nn.Module):
    """Logits that put every voxel in one class."""

    def __init__(self, index: int, num_classes: int = 3) -> None:
        super().__init__()
        self.index, self.num_classes = index, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.num_classes, *x.shape[2:])
        logits[:, self.index] = 1.0
        return logits


def test_a_class_never_predicted_in_two_validations_is_warned_about_once(bundle_on_path, caplog):
    """A MONAI evaluator with the bundle's per-class Dice: a network that predicts grey matter everywhere gives white
    matter a Dice of 0; the second validation in a row warns, naming the class, and the third does not repeat it.
    Grey matter (Dice > 0) is never named."""
    bundle_on_path(SELFREG_BUNDLE)
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator
    from monai.transforms import AsDiscreted

    from scripts.training import CollapsedClassWarning, per_class_dice

    classes = ["background", "grey matter", "white matter"]
    label = torch.zeros(1, 8, 8, 8)
    label[:, 2:4], label[:, 4:6] = 1, 2
    loader = DataLoader([{"image": torch.rand(1, 8, 8, 8), "label": label}], batch_size=1)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=_AlwaysClass(1),
        postprocessing=AsDiscreted(["pred", "label"], argmax=[True, False], to_onehot=[3, 3]),
        key_val_metric=per_class_dice(classes), val_handlers=[CollapsedClassWarning(classes)])
    warned = []
    for _ in range(3):
        caplog.clear()
        with caplog.at_level("WARNING", logger="scripts.training"):
            evaluator.run()
        warned.append([r.getMessage() for r in caplog.records if "collapsed class" in r.getMessage()])
    assert evaluator.state.metrics["val_dice_white_matter"] == 0 and evaluator.state.metrics["val_dice_grey_matter"] > 0
    assert [len(w) for w in warned] == [0, 1, 0]
    assert "class 'white matter'" in warned[1][0] and "'grey matter'" not in warned[1][0]
