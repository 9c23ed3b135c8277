"""Crashes lose nothing, a non-finite loss stops cleanly, outputs are written whole, untrusted checkpoints are
refused.

One real training process (the SegResNet-VAE bundle, tiny) is killed with SIGKILL while it saves a checkpoint;
the restart and the other checks run each bundle's own configs in process through MONAI's ConfigWorkflow, or the
shared checkpoint and writer classes on real ignite engines and real NIfTI files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import (
    METHODS,
    REPO,
    VAE_BUNDLE,
    Method,
    bundle_scripts_module,
    load_module,
    method_params,
    overrides_from_cli,
    small_run,
    workflow,
)
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor

TINY = {"spacing": [1.5, 1.5, 1.5], "num_workers": 0, "progress_bar": False, "cache_rate": 1.0,
        "iterations_per_epoch": 0}
SAFE_IO = load_module(REPO / "bundles/template/scripts/safe_io.py", "safe_io_under_test")
VAE = next(m for m in METHODS if m.bundle_dir == VAE_BUNDLE)


def tiny_run(method: Method) -> dict:
    """In-process overrides of a tiny training of ``method`` (helpers.small_run). A method with a prerequisite
    stage (ReSeg's teacher) trains its zero-weight baseline, which needs none."""
    zero = overrides_from_cli(method.zero_weights()) if method.stage1 is not None else {}
    return {**small_run(method), **TINY, **zero}


def failure(flow: ConfigWorkflow, kind: str) -> BaseException:
    """Run ``flow`` and return the ``kind`` exception it raised (MONAI wraps what a config expression raises)."""
    with pytest.raises(Exception) as raised:
        flow.run()
    error: BaseException | None = raised.value
    while error is not None and type(error).__name__ != kind:
        error = error.__cause__
    assert error is not None, f"no {kind} in {raised.value!r}"
    return error


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partial_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*partial*")]


# ---------------------------------------------------------------- a run killed while it saves, then restarted

def bundle_cli(root: Path, dataset: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
            "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
            "--bundle_root", str(root), "--dataset_dir", str(dataset), "--max_epochs", str(epochs),
            "--roi_size", "[32,32,32]", "--spacing", "[1.5,1.5,1.5]", "--num_workers", "0", "--progress_bar", "False",
            "--iterations_per_epoch", "0"]


def kill_when_epoch_two_is_saved(command: list[str], models: Path, log: Path) -> None:
    """Start training and SIGKILL it as soon as the epoch-2 checkpoint appears, under its temporary name (a kill
    in the middle of the write) or, if that write was too quick to see, under its final one."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=VAE_BUNDLE, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 540
    try:
        while time.monotonic() < deadline and process.poll() is None:
            names = os.listdir(models) if models.is_dir() else []
            if any(n.startswith((".checkpoint_epoch=2", "checkpoint_epoch=2")) for n in names):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, synthetic_dataset) -> tuple[Path, int]:
    """A 3-epoch training (a real ``monai.bundle run`` process) killed while saving epoch 2. Returns the run
    folder and the epoch of the newest checkpoint the kill left."""
    root = tmp_path_factory.mktemp("killed_run")
    models = root / "models"
    kill_when_epoch_two_is_saved(bundle_cli(root, synthetic_dataset, 3), models, root.parent / "killed.log")
    # epoch 1's checkpoint is deleted only once epoch 2's is whole: one of them, or both, must be complete
    trainers = [torch.load(p, weights_only=True)["trainer"] for p in models.glob("checkpoint_epoch=*.pt")]
    epochs = [t["iteration"] // t["epoch_length"] for t in trainers]  # each file loads: none is truncated
    assert epochs and set(epochs) <= {1, 2}, [p.name for p in models.iterdir()]
    return root, max(epochs)


def test_killed_training_restarts_from_its_last_complete_checkpoint(killed_run, synthetic_dataset, tmp_path,
                                                                     bundle_on_path):
    killed, epoch = killed_run
    root = tmp_path / "run"
    shutil.copytree(killed, root)
    models = root / "models"
    best_before = torch.load(models / f"checkpoint_epoch={epoch}.pt", weights_only=True)["best_model_saver"]
    model_before = digest(models / "model.pt")
    bundle_on_path(VAE_BUNDLE)
    # the same command again, for one epoch more than the checkpoint has
    flow = workflow(VAE_BUNDLE, ["train.json"], "train", bundle_root=str(root), dataset_dir=str(synthetic_dataset),
                    max_epochs=epoch + 1, roi_size=[32, 32, 32], **TINY)
    iterations: list[int] = []
    flow.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.ITERATION_COMPLETED, lambda engine: iterations.append(engine.state.iteration))
    flow.run()
    # 4 iterations an epoch: it ran epoch + 1 only, so at most the epoch being saved was lost
    assert iterations == list(range(4 * epoch + 1, 4 * epoch + 5))
    assert torch.load(models / f"checkpoint_epoch={epoch + 1}.pt", weights_only=True)["trainer"]["iteration"] == \
        4 * epoch + 4
    # the checkpoint resumed from, and epoch 1's if the kill left it, went once the new one was complete
    assert [p.name for p in models.glob("checkpoint_epoch=*.pt")] == [f"checkpoint_epoch={epoch + 1}.pt"]
    # the best metric came back with the checkpoint: model.pt is replaced only by a better model
    validator = flow.parser.get_parsed_content("validate#evaluator")
    latest = validator.state.metrics["val_mean_dice"]
    assert validator.state.best_metric == max(best_before["best_metric"], latest)
    # (the resumed epoch repeats the killed run's exactly, random state included, so a replaced model.pt may hold
    # the very bytes the killed run saved for it: compare with this run's weights, not with the file before)
    saved = torch.load(models / "model.pt", weights_only=True)
    network = flow.parser.get_parsed_content("best_model_saver").save_dict["model"]
    holds_this_run = all(torch.equal(saved[k], v.detach().cpu()) for k, v in network.state_dict().items())
    if latest > best_before["best_metric"]:
        assert holds_this_run
    else:
        assert digest(models / "model.pt") == model_before and not holds_this_run


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(killed_run, synthetic_dataset, tmp_path,
                                                                   bundle_on_path):
    killed, epoch = killed_run
    root = tmp_path / "run"
    shutil.copytree(killed, root)
    last = root / "models" / f"checkpoint_epoch={epoch}.pt"
    before = {p.name: digest(p) for p in (root / "models").iterdir()}
    bundle_on_path(VAE_BUNDLE)
    # an infinite KL weight makes the first loss of the resumed epoch infinite
    flow = workflow(VAE_BUNDLE, ["train.json"], "train", bundle_root=str(root), dataset_dir=str(synthetic_dataset),
                    max_epochs=epoch + 1, kl_weight=float("inf"), roi_size=[32, 32, 32], **TINY)
    message = str(failure(flow, "FloatingPointError"))
    assert f"at iteration 1 of epoch {epoch + 1}" in message and "the loss is " in message, message
    assert f"{last} is the last good checkpoint" in message
    assert {p.name: digest(p) for p in (root / "models").iterdir()} == before  # nothing saved, nothing replaced


# ---------------------------------------------------------------- NaN and Inf in every bundle

# The SegResNet-VAE bundle's stop is tested above, after a good epoch.
@pytest.mark.parametrize("method", method_params([m for m in METHODS if m is not VAE]))
def test_infinite_learning_rate_stops_training_before_anything_is_saved(method, dataset_for, tmp_path,
                                                                        bundle_on_path):
    bundle = bundle_on_path(method.bundle_dir)
    flow = workflow(bundle, ["train.json"], "train", bundle_root=str(tmp_path), dataset_dir=str(dataset_for(method)),
                    max_epochs=1, learning_rate=float("inf"), **{**tiny_run(method), "cache_rate": 0.0})
    message = str(failure(flow, "FloatingPointError"))
    # the first step breaks the weights: the next loss is NaN, or the epoch ends and the weights are checked
    assert "the loss is nan at iteration 2 of epoch 1" in message or "hold NaN or Inf" in message, message
    assert f"no checkpoint was saved in {tmp_path}/models yet" in message
    assert not list(tmp_path.glob("models/*.pt"))


# ---------------------------------------------------------------- checkpoint files: whole, never missing

class Weights(torch.nn.Module):
    """A module whose state can be made unpicklable, so that a save fails half-way through its file."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(256, 256))
        self.broken = False

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return {**state, "unpicklable": lambda: None} if self.broken else state


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    checkpoints = bundle_scripts_module(VAE_BUNDLE, "checkpoints")
    weights = Weights()
    saver = checkpoints.AtomicCheckpointSaver(str(tmp_path), {"model": weights, "other": torch.nn.Linear(2, 2)},
                                              save_interval=1, n_saved=1)
    engine = Engine(lambda e, batch: None)
    saver.attach(engine)
    engine.add_event_handler(Events.EPOCH_STARTED(once=2), lambda e: setattr(weights, "broken", True))
    with pytest.raises(Exception, match="lambda"):
        engine.run([0], max_epochs=2)
    # MONAI's saver would have deleted epoch 1 first, then written part of epoch 2 under its final name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]
    assert torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)["model"]["w"].shape == (256, 256)


def test_resumed_best_model_saver_replaces_model_pt_only_with_a_better_model(tmp_path):
    checkpoints = bundle_scripts_module(VAE_BUNDLE, "checkpoints")
    network = torch.nn.Linear(2, 2)

    def validate(scores: list[float], state: dict | None = None):
        saver = checkpoints.AtomicCheckpointSaver(str(tmp_path), {"model": network}, save_key_metric=True,
                                                  key_metric_name="dice", key_metric_filename="model.pt")
        engine = Engine(lambda e, batch: e.state.metrics.__setitem__("dice", scores[e.state.epoch - 1]))
        saver.attach(engine)
        if state is not None:
            saver.load_state_dict(state)
        engine.run([0], max_epochs=len(scores))
        return saver.state_dict()

    state = validate([0.5, 0.7])
    assert state["key_metric"]["_saved"][0][0] == 0.7
    kept = digest(tmp_path / "model.pt")
    with torch.no_grad():
        network.weight.add_(1.0)
    validate([0.6], state)  # worse than the 0.7 of before the restart
    assert digest(tmp_path / "model.pt") == kept
    validate([0.8], state)
    assert digest(tmp_path / "model.pt") != kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# ---------------------------------------------------------------- checkpoints that need code are refused

@pytest.fixture
def code_checkpoint(tmp_path) -> tuple[Path, Path]:
    """A checkpoint whose unpickling would run ``Path.touch(marker)``: harmless, and visible if it ran."""
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    path = tmp_path / "crafted.pt"
    torch.save({"model": {"weight": torch.zeros(1)}, "extra": Payload()}, path)
    torch.load(path, weights_only=False)  # the payload is live: a plain torch.load runs it
    assert marker.exists()
    marker.unlink()
    return path, marker


@pytest.mark.parametrize("method", method_params())
def test_inference_refuses_a_checkpoint_that_needs_code(method, code_checkpoint, synthetic_dataset, tmp_path,
                                                        bundle_on_path):
    crafted, marker = code_checkpoint
    (tmp_path / "models").mkdir()
    model = tmp_path / "models/model.pt"
    shutil.copy(crafted, model)
    bundle = bundle_on_path(method.bundle_dir)
    flow = workflow(bundle, ["inference.json"], "infer", bundle_root=str(tmp_path),
                    dataset_dir=str(synthetic_dataset), output_dir=str(tmp_path / "pred"), **tiny_run(method))
    message = str(failure(flow, "UntrustedCheckpointError"))
    assert message.startswith(f"{model} is refused: it holds Python objects that need code to load"), message
    assert "(it refers to getattr)" in message  # what it would have called: getattr(Path, "touch")
    assert not marker.exists() and not list(tmp_path.glob("pred/*"))


@pytest.mark.parametrize("configs, name", [(["train.json"], "checkpoint_epoch=1.pt"),
                                           (["train.json", "evaluate.json"], "model.pt")])
def test_training_and_evaluation_refuse_a_checkpoint_that_needs_code(configs, name, code_checkpoint,
                                                                     synthetic_dataset, tmp_path, bundle_on_path):
    crafted, marker = code_checkpoint
    (tmp_path / "models").mkdir()
    shutil.copy(crafted, tmp_path / "models" / name)
    bundle_on_path(VAE_BUNDLE)
    flow = workflow(VAE_BUNDLE, configs, "train" if configs == ["train.json"] else "eval", bundle_root=str(tmp_path),
                    dataset_dir=str(synthetic_dataset), max_epochs=2, roi_size=[32, 32, 32], **TINY)
    assert str(failure(flow, "UntrustedCheckpointError")).startswith(f"{tmp_path}/models/{name} is refused")
    assert not marker.exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [name]  # refused before anything ran or saved


def test_every_config_loads_saves_and_writes_through_the_safe_classes():
    """No config of any bundle uses MONAI's CheckpointLoader, CheckpointSaver or SaveImaged directly."""
    safe = {"CheckpointLoader": "scripts.checkpoints.WeightsOnlyCheckpointLoader",
            "CheckpointSaver": "scripts.checkpoints.AtomicCheckpointSaver",
            "SaveImaged": "scripts.safe_io.AtomicSaveImaged"}

    def targets(node):
        if isinstance(node, dict):
            if "_target_" in node:
                yield node["_target_"]
            for value in node.values():
                yield from targets(value)
        elif isinstance(node, list):
            for value in node:
                yield from targets(value)

    found = {}
    for config in sorted(REPO.glob("bundles/*/configs/*.json")):
        for target in targets(json.loads(config.read_text())):
            for monai_name, ours in safe.items():
                if target.split(".")[-1] == monai_name or target == ours:
                    found.setdefault(target, []).append(f"{config.parent.parent.name}/{config.name}")
    assert set(found) == set(safe.values()), found


# ---------------------------------------------------------------- predictions: whole files, no overwrite

@pytest.fixture
def prediction(tmp_path) -> MetaTensor:
    """A label map with the metadata LoadImaged gives an input image at ``inputs/case_1.nii.gz``."""
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    data = torch.from_numpy(np.random.default_rng(0).integers(0, 3, (1, 8, 9, 10))).float()
    return MetaTensor(data, affine=torch.from_numpy(affine),
                      meta={"filename_or_obj": str(tmp_path / "inputs/case_1.nii.gz"),
                            "spatial_shape": np.array([8, 9, 10])})


def saver(out: Path, **kwargs):
    return SAFE_IO.AtomicSaveImaged(keys="pred", output_dir=str(out), output_postfix="seg", output_dtype=np.uint8,
                                    resample=False, separate_folder=False, print_log=False, **kwargs)


def test_prediction_is_written_whole_and_not_overwritten_unless_asked(prediction, tmp_path):
    out = tmp_path / "pred"
    saver(out)({"pred": prediction})
    written = out / "case_1_seg.nii.gz"
    np.testing.assert_array_equal(nib.load(written).get_fdata(), prediction[0].numpy())
    assert partial_files(out) == []
    first = digest(written)
    with pytest.raises(FileExistsError, match=f"{written} exists and is not overwritten.*--overwrite True"):
        saver(out)({"pred": prediction + 1})
    assert digest(written) == first and partial_files(out) == []
    saver(out, overwrite=True)({"pred": prediction + 1})
    np.testing.assert_array_equal(nib.load(written).get_fdata(), prediction[0].numpy() + 1)


def test_a_failed_write_leaves_no_file(prediction, tmp_path):
    from monai.data import NibabelWriter

    class DiskFullWriter(NibabelWriter):
        """Writes the file, then fails as a full disk would after part of it."""

        def write(self, filename, verbose=False, **kwargs):
            super().write(filename, verbose=verbose, **kwargs)
            raise OSError(28, "No space left on device")

    out = tmp_path / "pred"
    with pytest.raises(RuntimeError, match="No space left on device"):
        saver(out, writer=DiskFullWriter)({"pred": prediction})
    assert list(out.iterdir()) == []


def test_inference_refuses_an_output_folder_inside_the_input_folder(synthetic_dataset):
    data = load_module(REPO / "bundles/template/scripts/data.py", "data_under_test")
    inputs = [{"image": str(p)} for p in (synthetic_dataset / "imagesTs").glob("*.nii.gz")]
    with pytest.raises(ValueError, match="is inside the input folder"):
        data.check_output_dir(str(synthetic_dataset / "imagesTs/predictions"), inputs)
    assert data.check_output_dir(str(synthetic_dataset / "predictions"), inputs)


def test_inference_run_writes_once_and_never_touches_its_inputs(synthetic_dataset, tmp_path, bundle_on_path):
    from monai.networks.nets import SegResNet

    (tmp_path / "models").mkdir()
    torch.save(SegResNet(spatial_dims=3, init_filters=16, in_channels=1, out_channels=3).state_dict(),
               tmp_path / "models/model.pt")
    inputs = synthetic_dataset / "imagesTs"
    before = {p.name: (p.stat().st_mtime_ns, digest(p)) for p in inputs.iterdir()}
    out = tmp_path / "pred"
    bundle_on_path(VAE_BUNDLE)

    def inference(**overrides) -> ConfigWorkflow:
        return workflow(VAE_BUNDLE, ["inference.json"], "infer", bundle_root=str(tmp_path),
                        dataset_dir=str(synthetic_dataset), output_dir=str(out), roi_size=[32, 32, 32], **TINY,
                        **overrides)

    inference().run()
    written = sorted(out.iterdir())
    assert [p.name for p in written] == [p.name.replace(".nii.gz", "_seg.nii.gz") for p in sorted(inputs.iterdir())]
    first = {p.name: (p.stat().st_mtime_ns, digest(p)) for p in written}
    assert "--overwrite True" in str(failure(inference(), "FileExistsError"))
    assert {p.name: (p.stat().st_mtime_ns, digest(p)) for p in written} == first
    inference(overwrite=True).run()
    assert sorted(out.iterdir()) == written and partial_files(out) == []
    assert all(p.stat().st_mtime_ns != first[p.name][0] for p in written)  # written again
    assert {p.name: (p.stat().st_mtime_ns, digest(p)) for p in inputs.iterdir()} == before
