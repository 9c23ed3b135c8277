"""The training options a MONAI Label client sees and sets: every bundle's ``displayable_configs``, which MONAI
Label's ``BundleTrainTask`` lists in its train options (``config()``) and hands back, with the client's values, as
the ``displayable_configs`` override of the training run. Here the override is given as that task gives it, in
process; the live-server check (scripts/monailabel_check.sh) is the end-to-end test."""

from __future__ import annotations

import pytest
from helpers import BUNDLES, METHODS, bundle_module, in_bundle, method_params, small_run, workflow
from method_registry import by_name

SEMSIM = by_name("semsim")
settings = bundle_module(BUNDLES / "selfreg_segmentation", "settings")


@pytest.mark.parametrize("method", method_params(METHODS))
def test_every_bundle_offers_learning_rate_crop_and_its_weights(method):
    bundle = BUNDLES / method.bundle
    with in_bundle(bundle):
        flow = workflow(bundle, ["train.json"], "train", run_id="training", initialize=False)
        options = flow.parser.get_parsed_content("displayable_configs", instantiate=True)
    assert {"learning_rate", "crop_size", "iterations_per_epoch", *method.weights} <= set(options), options
    assert all(isinstance(v, (int, float, str, bool)) for v in options.values())  # what a client can show and edit


def options_reach_training(root, dataset, **chosen) -> dict:
    """Train one iteration with MONAI Label's override of ``displayable_configs`` (every option, the client's
    values where given) and return what the run used."""
    bundle = BUNDLES / SEMSIM.bundle
    with in_bundle(bundle):
        probe = workflow(bundle, ["train.json"], "train", run_id="training", initialize=False)
        options = {**probe.parser.get_parsed_content("displayable_configs", instantiate=True), **chosen}
        chosen_ids = ("roi_size", "iterations_per_epoch")  # set through the options, not replaced
        overrides = {key: value for key, value in small_run(SEMSIM).items() if key not in chosen_ids}
        # MONAI Label sets the trainer's max_epochs, not the bundle's max_epochs (default 300)
        flow = workflow(bundle, ["train.json"], "train", run_id="training", bundle_root=str(root),
                        dataset_dir=str(dataset), displayable_configs=options,
                        **{**overrides, "train#trainer#epoch_length": 1, "train#trainer#max_epochs": 1})
        flow.run()
        parsed = flow.parser
        return {"lr": parsed.get_parsed_content("optimizer").param_groups[0]["initial_lr"],
                "lr_iterations": parsed.get_parsed_content("lr_scheduler").total_iters,
                "one_epoch": (parsed.get_parsed_content("iterations_per_epoch")
                              or len(parsed.get_parsed_content("train#dataloader"))),
                "logged": parsed.get_parsed_content("report_options"),
                "roi_size": parsed.get_parsed_content("roi_size"),
                "metrics": dict(parsed.get_parsed_content("train#trainer").state.metrics)}


def test_client_options_reach_bundle_training(semi_dataset, tmp_path):
    used = options_reach_training(tmp_path / "on", semi_dataset, learning_rate=0.0005, crop_size="32",
                                  iterations_per_epoch="2", cross_weight=0.0)
    assert used["lr"] == pytest.approx(0.0005) and used["roi_size"] == [32, 32, 32]
    assert used["one_epoch"] == 2 and used["lr_iterations"] == 2  # the schedule spans the 1 epoch MONAI Label asked for
    assert "learning_rate 0.0005" in used["logged"] and "cross_weight 0.0" in used["logged"]
    assert used["logged"].endswith("max_epochs 1, crop [32, 32, 32]")
    assert "train_unlabeled" in used["metrics"] and "train_intra" in used["metrics"]
    assert "train_cross" not in used["metrics"]  # the client's weight 0 switches the term off
    off = options_reach_training(tmp_path / "off", semi_dataset, crop_size="32,32,32", unlabeled_pool=False)
    assert not any(name in off["metrics"] for name in ("train_unlabeled", "train_intra", "train_cross"))


def test_iterations_per_epoch_option():
    assert settings.iterations_per_epoch("", 50) == 50 and settings.iterations_per_epoch(None, 250) == 250
    assert settings.iterations_per_epoch("20", 50) == 20 and settings.iterations_per_epoch(" 0 ", 50) == 0
    for bad in ("-1", "ten", "2.5"):
        with pytest.raises(ValueError, match="iterations_per_epoch"):
            settings.iterations_per_epoch(bad, 50)


def test_crop_size_option():
    assert settings.crop_size("", [48, 48, 32]) == [48, 48, 32]
    assert settings.crop_size("96", [48, 48, 32]) == [96, 96, 96]
    assert settings.crop_size(" 96, 64 ,32", [48, 48, 32]) == [96, 64, 32]
    for bad in ("96,64", "a,b,c", "0"):
        with pytest.raises(ValueError, match="crop_size"):
            settings.crop_size(bad, [48, 48, 32])


@pytest.mark.parametrize("method", method_params(METHODS))
def test_logged_options_are_the_ones_training_uses(method):
    """A command-line override of the id an option feeds (``--selfreg_weight 0.123``, ``--learning_rate 0.0042``)
    bypasses ``displayable_configs``: the options line logs the value training uses, not the option's default."""
    bundle = BUNDLES / method.bundle
    overrides = {"learning_rate": 0.0042, **{weight: 0.123 for weight in method.weights}}
    with in_bundle(bundle):
        flow = workflow(bundle, ["train.json"], "train", run_id="training", initialize=False, **overrides)
        options = flow.parser.get_parsed_content("displayable_configs", instantiate=True)
        used = flow.parser.get_parsed_content("report_options#used", instantiate=True)
    line = settings.log_training_options(options, 1, [32, 32, 32], used)
    assert "learning_rate 0.0042" in line and all(f"{weight} 0.123" in line for weight in method.weights), line
    assert set(used) == {"learning_rate", *method.weights}
    assert all(f"{weight} 0.123" not in settings.log_training_options(options, 1, [32, 32, 32])
               for weight in method.weights)  # the options' own values, as before
