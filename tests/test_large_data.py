"""Large volumes and large datasets: where the sliding window stitches its output (``scripts/sliding_window.py``,
ids ``sw_device``, ``stitch_device``, ``buffer_steps``), and the cache the plan chooses for the cases
(``scripts.plan.cache_settings``, built by ``scripts/caching.py``): each branch of both choices, the cache size
estimate against a real cache, the same output whatever the stitching, and one epoch of training with each cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import SELFREG_BUNDLE, bundle_scripts_module, in_bundle, small_run, workflow
from method_registry import all_methods

BUNDLE = SELFREG_BUNDLE
METHOD = next(m for m in all_methods() if m.bundle_dir == BUNDLE)
GB = 2**30
CT_SHAPE = (512, 512, 600)


@pytest.fixture(scope="module")
def sliding_window():
    return bundle_scripts_module(BUNDLE, "sliding_window")


def test_small_volume_is_stitched_on_the_device(sliding_window):
    choice = sliding_window.stitching_for((96, 96, 96), 3, (64, 64, 64), 4, 0.5, "cuda", 8 * GB, 16 * GB)
    # None: the input's device, where the evaluator put it (the network's), as MONAI's default
    assert choice["device"] is None and choice["sw_device"] is None and choice["buffer_steps"] is None
    on_cpu = sliding_window.stitching_for(CT_SHAPE, 14, (64, 64, 64), 2, 0.25, "cpu", 64 * GB, 64 * GB)
    assert on_cpu["device"] is None and on_cpu["sw_device"] is None and on_cpu["buffer_steps"] is None


def test_large_volume_is_stitched_on_the_cpu_with_a_buffer_that_fits(sliding_window, caplog):
    # 14 classes of a 512 x 512 x 600 CT: 3 x 15 x 629 MB of output, more than an 8 GB device holds
    choice = sliding_window.stitching_for(CT_SHAPE, 14, (96, 96, 96), 2, 0.5, "cuda", 8 * GB, 64 * GB)
    assert choice["sw_device"] is None and choice["device"] == torch.device("cpu")  # windows stay on the GPU
    assert choice["output_gb"] > 8 and choice["buffer_steps"] > 1
    rows = choice["buffer_steps"]
    buffer = 14 * 512 * 512 * (96 + (rows - 1) * 48) * 4  # the rows' extent along the last axis, every class
    assert buffer <= sliding_window.MEMORY_SHARE * 8 * GB  # fits beside the input and the windows
    smaller = sliding_window.stitching_for(CT_SHAPE, 14, (96, 96, 96), 2, 0.5, "cuda", 4 * GB, 64 * GB)
    assert smaller["device"] == torch.device("cpu") and 1 <= smaller["buffer_steps"] < rows
    with caplog.at_level(logging.WARNING):
        none = sliding_window.stitching_for(CT_SHAPE, 14, (96, 96, 96), 2, 0.5, "cuda", 2 * GB, 4 * GB)
    assert none["device"] == torch.device("cpu") and none["buffer_steps"] is None
    assert "needs about" in caplog.text and "--spacing" in caplog.text  # host memory too small: said, not refused


def test_bundle_inferer_gives_the_same_output_with_cpu_stitching_and_a_buffer(synthetic_dataset):
    """inference.json's automatic choice on this CPU machine (all on the CPU, unbuffered) against the non-default
    ids given on the command line, on a seeded network and a real preprocessed image: the same output."""
    overrides = {
        "dataset_dir": str(synthetic_dataset),
        "num_workers": 0,
        **{k: v for k, v in small_run(METHOD).items() if k in ("backbones#segresnet#init_filters", "roi_size")},
    }
    outputs = {}
    with in_bundle(BUNDLE):
        for name, extra in {
            "auto": {},
            "buffered": {"stitch_device": "cpu", "sw_device": "cpu", "buffer_steps": 2},
        }.items():
            flow = workflow(BUNDLE, ["inference.json"], "infer", **overrides, **extra)
            parser = flow.parser
            inferer = parser.get_parsed_content("inferer")
            assert inferer.buffer_steps == extra.get("buffer_steps")  # the automatic choice here: None
            assert (inferer.sw_device, inferer.device) == ((None, None) if name == "auto" else ("cpu", "cpu"))
            torch.manual_seed(0)
            network = parser.get_parsed_content("network_def").eval()
            image = parser.get_parsed_content("dataset")[0]["image"][None]
            image = torch.cat([image, image.flip(-1)], dim=-1)  # 64 wide: several windows along the buffer axis
            with torch.no_grad():
                outputs[name] = inferer(image.as_tensor(), network)
    auto = outputs["auto"]
    assert auto.shape[1] == 3 and auto.abs().max() > 0
    assert (auto - outputs["buffered"]).abs().max().item() <= 1e-5


def run_plan(dataset: Path, root: Path, **overrides) -> dict:
    with in_bundle(BUNDLE):
        workflow(
            BUNDLE,
            ["plan.json"],
            None,
            run_id="plan",
            bundle_root=str(root),
            dataset_dir=str(dataset),
            device="cpu",
            **overrides,
        ).run()
    return json.loads((root / "models/plan.json").read_text())


def test_cache_estimate_matches_the_cached_cases(synthetic_dataset, tmp_path):
    """The plan's estimate (from the fingerprint at the planned spacing) against the bytes a real CacheDataset
    holds for the same cases after train.json's deterministic transforms."""
    plan = run_plan(synthetic_dataset, tmp_path, host_memory_gb=64)
    assert plan["settings"]["cache"] == "memory" and plan["settings"]["cache_rate"] == 1.0
    with in_bundle(BUNDLE):
        flow = workflow(
            BUNDLE, ["train.json"], None, bundle_root=str(tmp_path), dataset_dir=str(synthetic_dataset), num_workers=0
        )
        cached = [flow.parser.get_parsed_content(f"{split}#dataset")._cache for split in ("train", "validate")]
    held = sum(
        item[key].numel() * item[key].element_size() for items in cached for item in items for key in ("image", "label")
    )
    assert held == pytest.approx(plan["settings"]["cache_gb"] * GB, rel=0.01)


# The 6 labelled synthetic cases hold 6 x 2 x 32^3 x 4 bytes = 1.5 MiB; the cache may take half the host memory.
CACHE_CASES = {
    "disk": ({"host_memory_gb": 0.001, "disk_free_gb": 1.0}, "disk", 0.0),
    "share": ({"host_memory_gb": 0.002, "disk_free_gb": 0.0}, "memory", 0.68),
    "none": ({"host_memory_gb": 0.0001, "disk_free_gb": 0.0}, "none", 0.0),
}


def test_processes_on_one_node_share_the_memory_cache(synthetic_dataset, tmp_path):
    """Every torchrun process holds its own memory cache: a dataset that fits one process's share of the host goes to
    the shared disk cache when four processes train on the node (1.5 MiB of cases, 2 MiB of the host's memory
    share)."""
    limits = {"host_memory_gb": 0.004, "disk_free_gb": 1.0}
    alone = run_plan(synthetic_dataset, tmp_path / "one", **limits)
    assert alone["settings"]["cache"] == "memory" and alone["fingerprint"]["device"]["processes_per_node"] == 1
    four = run_plan(synthetic_dataset, tmp_path / "four", processes_per_node=4, **limits)
    assert four["settings"]["cache"] == "disk" and four["fingerprint"]["device"]["processes_per_node"] == 4
    assert "shared by 4 processes per node" in four["why"]["cache"]


# Training runs on 2 of the training cases and 1 validation case (the plan sees them all).
FEW_CASES = {
    "train#dataset#data": "$@data_split['training'][:2]",
    "validate#dataset#data": "$@data_split['validation'][:1]",
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_plan_chooses_the_cache_that_fits_and_training_runs_with_it(case, synthetic_dataset, tmp_path):
    limits, cache, rate = CACHE_CASES[case]
    plan = run_plan(synthetic_dataset, tmp_path, **limits)
    assert (plan["settings"]["cache"], plan["settings"]["cache_rate"]) == (cache, rate), plan["why"]["cache"]
    assert plan["settings"]["cache_gb"] == pytest.approx(1.5 / 1024, rel=0.01)
    with in_bundle(BUNDLE):
        flow = workflow(
            BUNDLE,
            ["train.json"],
            "train",
            bundle_root=str(tmp_path),
            dataset_dir=str(synthetic_dataset),
            max_epochs=1,
            **small_run(METHOD),
            **FEW_CASES,
        )
        flow.run()
        dataset = flow.parser.get_parsed_content("train#dataset")
        trainer = flow.parser.get_parsed_content("train#trainer")
        flow.finalize()
    assert trainer.state.epoch == 1 and (tmp_path / "models/model.pt").is_file()
    expected = {"disk": "PersistentDataset", "share": "CacheDataset", "none": "Dataset"}[case]
    assert type(dataset).__name__ == expected
    if case == "share":
        assert dataset.cache_num == 1  # 0.68 of the 2 training cases
    cache_files = list((tmp_path / "cache").rglob("*.pt"))
    assert len(cache_files) == (3 if case == "disk" else 0)  # 2 training and 1 validation case, once each
    if case == "disk":  # read back as written (MONAI rewrites a file it cannot load)
        written = {path: path.stat().st_mtime_ns for path in cache_files}
        assert dataset[0][0]["image"].meta["filename_or_obj"].endswith(".nii.gz")  # a list of crops
        assert {path: path.stat().st_mtime_ns for path in cache_files} == written
