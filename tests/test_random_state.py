"""Random streams of real bundle runs through MONAI's bundle CLI (CPU, tiny data, no loader workers).

- Under torchrun (2 gloo processes) each rank draws its own stream, seeded from ``seed`` and its rank (crops, flips,
  intensity jitter and the method's own generators), and a rerun draws the same streams.
- A run stopped after its first epoch's checkpoint and resumed draws, in the second epoch, exactly what the
  uninterrupted run draws (the same crops, the same losses): the checkpoint holds the random state
  (``scripts.random_state.RandomState``).

- ``RandomState`` alone, in this process: a weights-only checkpoint of it restores every stream, including a
  generator that a loss makes only when first used.

Each run carries ``tests/rng_probe.py``'s handler through a config overlay: one JSON line per iteration with the
rank, the batch image's digest and the loss.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import monai
import numpy as np
import pytest
import torch
from bundle_env import bundle_imports
from helpers import BUNDLES, SELFREG_BUNDLE, SMALL_BACKBONES, TORCHRUN, run_bundle

SEMSIM_BUNDLE = BUNDLES / "semsim_segmentation"
TINY = ["--roi_size", "[32,32,32]", *SMALL_BACKBONES["segresnet"], "--spacing", "[1.5,1.5,1.5]",
        "--num_workers", "0", "--progress_bar", "False", "--iterations_per_epoch", "0"]
METHOD_ARGS = {SELFREG_BUNDLE: [], SEMSIM_BUNDLE: ["--sfm_feature_size", "32"]}


@pytest.fixture
def probe_path(tmp_path, monkeypatch) -> Path:
    """A folder holding rng_probe.py, put on the PYTHONPATH of the bundle processes."""
    folder = tmp_path / "probe"
    folder.mkdir()
    shutil.copy(Path(__file__).parent / "rng_probe.py", folder)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    return folder


def probed_run(bundle: Path, root: Path, dataset: Path, records: Path, *, stop_after_epochs: int | None = None,
               multi_gpu: bool = False, epochs: int = 2, extra: tuple[str, ...] = ()) -> list[dict]:
    """Train ``bundle`` in ``root`` with the probe writing to ``records``; returns the lines this run wrote."""
    overlay = root.parent / f"{root.name}_probe.json"
    root.mkdir(parents=True, exist_ok=True)
    overlay.write_text(json.dumps({
        "rng_probe": {"_target_": "rng_probe.RandomStreamProbe", "path": str(records),
                      "stop_after_epochs": stop_after_epochs},
        "train#trainer#train_handlers": "$[h for h in @train#handlers if @is_main_process or not isinstance(h, "
                                        "(monai.handlers.StatsHandler, monai.handlers.TensorBoardStatsHandler, "
                                        "ignite.handlers.ProgressBar))] + [@rng_probe]",
    }))
    configs = ["configs/train.json", *(["configs/multi_gpu_train.json"] if multi_gpu else []), str(overlay)]
    before = len(records.read_text().splitlines()) if records.is_file() else 0
    run_bundle(bundle, configs, "--bundle_root", str(root), "--dataset_dir", str(dataset), "--max_epochs",
               str(epochs), *TINY, *METHOD_ARGS[bundle], *extra, run_id="training",
               launcher=TORCHRUN if multi_gpu else None)
    return [json.loads(line) for line in records.read_text().splitlines()[before:]]


def streams(records: list[dict]) -> dict[int, list[tuple]]:
    """Each rank's (epoch, iteration, image digest) sequence."""
    out: dict[int, list[tuple]] = {}
    for r in sorted(records, key=lambda r: (r["rank"], r["iteration"])):
        out.setdefault(r["rank"], []).append((r["epoch"], r["iteration"], r["image"], r["generators"]))
    return out


@pytest.fixture
def twin_dataset(synthetic_dataset, tmp_path) -> Path:
    """The synthetic dataset whose training list is one case twice: each of 2 ranks trains on the same volume, so
    only the random transforms can make their crops differ."""
    out = tmp_path / "twin"
    shutil.copytree(synthetic_dataset, out)
    datalist = json.loads((out / "dataset.json").read_text())
    datalist["training"] = [datalist["training"][0]] * 2
    datalist["validation"] = datalist.get("validation") or [datalist["training"][0]] * 2
    datalist["numTraining"] = 2
    (out / "dataset.json").write_text(json.dumps(datalist))
    return out


# A grid finer than the tiny runs' 1.5 mm: the 32^3 volume becomes 43^3, so a 32^3 crop has 12 positions per axis
# and the crop position itself is random, not only the flips and the (rarer) intensity augmentation.
FINE_GRID = ("--spacing", "[0.75,0.75,0.75]")


def test_each_rank_draws_its_own_stream_and_a_rerun_draws_the_same(twin_dataset, tmp_path, probe_path):
    first = streams(probed_run(SELFREG_BUNDLE, tmp_path / "first", twin_dataset, tmp_path / "first.jsonl",
                               multi_gpu=True, epochs=2, extra=FINE_GRID))
    assert sorted(first) == [0, 1] and all(len(s) == 2 for s in first.values())  # one case per rank and epoch
    # the same volume, cropped, flipped and jittered by each rank's own transforms, in every epoch
    assert all(crop_0[2] != crop_1[2] for crop_0, crop_1 in zip(first[0], first[1]))
    # SelfReg's channel-selection generator is seeded per rank: seed + rank
    seeds = {rank: s[0][3] for rank, s in first.items()}
    assert seeds[0] and set(seeds[0]) == set(seeds[1]), seeds
    assert all(seeds[1][path] == seeds[0][path] + 1 for path in seeds[0]), seeds

    again = streams(probed_run(SELFREG_BUNDLE, tmp_path / "again", twin_dataset, tmp_path / "again.jsonl",
                               multi_gpu=True, epochs=2, extra=FINE_GRID))
    assert again == first


@pytest.mark.parametrize("bundle", [SELFREG_BUNDLE, SEMSIM_BUNDLE], ids=["selfreg", "semsim"])
def test_resumed_run_draws_what_the_uninterrupted_run_draws(bundle, synthetic_dataset, semi_dataset, tmp_path,
                                                            probe_path):
    dataset = semi_dataset if bundle == SEMSIM_BUNDLE else synthetic_dataset
    uninterrupted = probed_run(bundle, tmp_path / "whole", dataset, tmp_path / "whole.jsonl")
    root, records = tmp_path / "killed", tmp_path / "killed.jsonl"
    first_epoch = probed_run(bundle, root, dataset, records, stop_after_epochs=1)
    assert (root / "models/checkpoint_epoch=1.pt").is_file() and {r["epoch"] for r in first_epoch} == {1}
    resumed = probed_run(bundle, root, dataset, records)
    assert {r["epoch"] for r in resumed} == {2}

    def epoch(records: list[dict], n: int) -> list[tuple]:
        return [(r["iteration"], r["image"], r["loss"]) for r in records if r["epoch"] == n]

    assert epoch(first_epoch, 1) == epoch(uninterrupted, 1)
    expected = epoch(uninterrupted, 2)
    assert len(expected) > 0
    assert [r[:2] for r in epoch(resumed, 2)] == [r[:2] for r in expected]  # the same crops, flips and jitter
    assert [r[2] for r in epoch(resumed, 2)] == pytest.approx([r[2] for r in expected], rel=1e-6, abs=1e-8)


class _LazyGenerators:
    """Like SelfReg's loss: a dict device -> torch.Generator filled when first used."""

    def __init__(self, seed: int) -> None:
        self.seed, self._generators = seed, {}

    def draw(self) -> torch.Tensor:
        device = torch.device("cpu")
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return torch.randint(0, 1000, (4,), generator=self._generators[device])


def _trainer(seed: int) -> SimpleNamespace:
    """A stand-in for SupervisedTrainer: a loader whose dataset has random transforms (seeded by MONAI's DataLoader
    from torch's generator), a loss with lazily made generators and a prepare_batch with its own generator."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, RandFlipd, RandSpatialCropd, RandShiftIntensityd

    monai.utils.set_determinism(seed=seed)
    transform = Compose([RandSpatialCropd("image", roi_size=(4, 4), random_size=False), RandFlipd("image", prob=0.5),
                         RandShiftIntensityd("image", offsets=1.0, prob=1.0)])
    data = [{"image": torch.arange(64.0).reshape(1, 8, 8)} for _ in range(3)]
    loader = DataLoader(Dataset(data, transform), batch_size=1, shuffle=True, num_workers=0)
    return SimpleNamespace(data_loader=loader, loss_function=_LazyGenerators(seed),
                           prepare_batch=SimpleNamespace(generator=torch.Generator().manual_seed(seed)),
                           network=torch.nn.Linear(2, 2), inferer=None, scaler=None)


def _draws(trainer: SimpleNamespace) -> list:
    batches = [b["image"].flatten().tolist() for b in trainer.data_loader]
    return [batches, trainer.loss_function.draw().tolist(),
            torch.rand(2, generator=trainer.prepare_batch.generator).tolist(), torch.rand(2).tolist(),
            np.random.rand(2).tolist(), random.random()]


def test_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    with bundle_imports(SELFREG_BUNDLE):
        from scripts.random_state import RandomState

        trainer = _trainer(seed=0)
        _draws(trainer)  # one epoch: every stream advanced, the lazy generator made
        state = RandomState(trainer)
        torch.save({"random_state": state.state_dict()}, tmp_path / "checkpoint.pt")
        expected = _draws(trainer)

        resumed = _trainer(seed=0)  # a fresh process: streams from the seed, no lazy generator yet
        assert not resumed.loss_function._generators
        RandomState(resumed).load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["random_state"])
        assert _draws(resumed) == expected

        fresh = _trainer(seed=0)
        assert _draws(fresh) != expected  # without the saved state the streams start again


def test_random_state_keeps_the_pass_count_of_a_distributed_epoch_sampler(tmp_path):
    """One rank's shard under torchrun: each pass is shuffled by its pass count (DistributedSampler.set_epoch), so a
    resumed run continues with the uninterrupted run's next passes instead of repeating the first ones."""
    with bundle_imports(SELFREG_BUNDLE):
        from monai.data import DataLoader
        from torch.utils.data import DistributedSampler

        from scripts.random_state import RandomState
        from scripts.sampling import EpochBatchSampler

        def trainer() -> SimpleNamespace:
            shard = DistributedSampler(range(16), num_replicas=2, rank=1, shuffle=True, seed=0)
            loader = DataLoader(list(range(16)), batch_sampler=EpochBatchSampler(shard, batch_size=4, iterations=3))
            return SimpleNamespace(data_loader=loader, loss_function=None, prepare_batch=None, network=None,
                                   inferer=None, scaler=None)

        def epoch(run: SimpleNamespace) -> list[list[int]]:
            return [batch.tolist() for batch in run.data_loader]

        whole = trainer()
        epoch(whole)
        torch.save({"random_state": RandomState(whole).state_dict()}, tmp_path / "checkpoint.pt")
        expected = [epoch(whole), epoch(whole)]

        resumed = trainer()
        RandomState(resumed).load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["random_state"])
        assert resumed.data_loader.batch_sampler.passes == 2  # an epoch of 3 batches took two passes of 2
        assert [epoch(resumed), epoch(resumed)] == expected
        restarted = trainer()
        assert [epoch(restarted), epoch(restarted)] != expected  # from pass 0 it repeats the first passes' orders
