"""What only the ReSeg bundle has, in process through ConfigWorkflow: training from train.json alone (as MONAI
Label's /train runs it) trains the missing stage-1 teacher first, says so, then stage 2, and never retrains a finished
teacher; an unfinished stage 1 resumes; stage 1 refuses to run in several processes; a = 0 trains the plain baseline
with no teacher. Both stages run explicitly, evaluation, inference, resume, DDP, 2D and every backbone are the bundle
contract (test_bundle_contract.py, driven by the registry's stage 1 and training stage); a teacher of another network
is refused in test_bad_input.py."""

from __future__ import annotations

import hashlib
import logging

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import BUNDLES, bundle_module, in_bundle, small_run, workflow
from method_registry import by_name

RESEG = by_name("reseg")
RESEG_BUNDLE = BUNDLES / RESEG.bundle
STAGE_2 = ["train.json"]
reseg = bundle_module(RESEG_BUNDLE, "reseg")


def train_from_train_json(root, dataset, max_epochs: int) -> None:
    with in_bundle(RESEG_BUNDLE):
        flow = workflow(RESEG_BUNDLE, STAGE_2, "train", run_id="training", bundle_root=str(root),
                        dataset_dir=str(dataset), max_epochs=max_epochs,
                        **{**small_run(RESEG), "train#trainer#epoch_length": 1})
        flow.run()


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_trains_the_missing_teacher_first_then_never_again(synthetic_dataset, tmp_path, caplog):
    teacher = tmp_path / "models/reconstruction.pt"
    with caplog.at_level(logging.INFO):
        train_from_train_json(tmp_path, synthetic_dataset, max_epochs=1)
    assert "ReSeg stage 1 of 2: training the teacher" in caplog.text and str(teacher) in caplog.text
    assert "ReSeg stage 1 done" in caplog.text and "stage 2 of 2: segmentation" in caplog.text
    assert teacher.is_file() and (tmp_path / "models/model.pt").is_file()
    first = digest(teacher)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_from_train_json(tmp_path, synthetic_dataset, max_epochs=2)  # MONAI Label's next round
    assert "ReSeg stage 1" not in caplog.text
    assert digest(teacher) == first and (tmp_path / "models/checkpoint_epoch=2.pt").is_file()


def save_stage_one_checkpoint(folder, iteration: int, max_epochs: int = 2, epoch_length: int = 3) -> None:
    trainer = {"iteration": iteration, "max_epochs": max_epochs, "epoch_length": epoch_length}
    torch.save({"trainer": trainer}, folder / f"reconstruction_checkpoint_epoch={iteration // epoch_length}.pt")


def test_stage_one_is_pending_while_the_teacher_is_missing_or_unfinished(tmp_path):
    teacher = str(tmp_path / "reconstruction.pt")
    assert reseg.stage_one_pending(teacher, str(tmp_path))  # no teacher
    torch.save({}, teacher)
    assert not reseg.stage_one_pending(teacher, str(tmp_path))  # a teacher given without stage-1 checkpoints
    save_stage_one_checkpoint(tmp_path, iteration=3)
    assert reseg.stage_one_pending(teacher, str(tmp_path))  # stopped after epoch 1 of 2: resume stage 1
    save_stage_one_checkpoint(tmp_path, iteration=6)
    assert not reseg.stage_one_pending(teacher, str(tmp_path))  # the newest checkpoint is of the finished run


def refuse_in_two_processes(rank: int, init_file: str, errors) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        reseg.run_stage_one(None, None, None, "models/reconstruction.pt")
    except RuntimeError as err:
        errors.put(str(err))
    finally:
        # a rank that tears down while its peer is still in gloo's handshake makes the peer's init fail
        dist.barrier()
        dist.destroy_process_group()


def test_stage_one_refuses_several_processes(tmp_path):
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    mp.start_processes(refuse_in_two_processes, args=(str(tmp_path / "init"), errors), nprocs=2,
                       start_method="spawn")
    messages = [errors.get() for _ in range(2)]
    assert all("stage 1 runs in one process" in m and "run training --config_file" in m for m in messages)


def test_zero_weight_trains_the_plain_baseline_from_stage_two_alone(synthetic_dataset, tmp_path):
    with in_bundle(RESEG_BUNDLE):
        flow = workflow(RESEG_BUNDLE, STAGE_2, "train", run_id="training", bundle_root=str(tmp_path),
                        dataset_dir=str(synthetic_dataset), max_epochs=1, reseg_weight=0,
                        **{**small_run(RESEG), "train#trainer#epoch_length": 1})
        flow.run()
        metrics = flow.parser.get_parsed_content("train#trainer").state.metrics
    assert {k for k in metrics if k.startswith("train_")} == {"train_seg", "train_total"}, metrics
    assert (tmp_path / "models/model.pt").is_file() and not (tmp_path / "models/reconstruction.pt").exists()
    assert not (tmp_path / "eval/reconstruction").exists()  # stage 1's TensorBoard writer was never built
