"""What only the ReSeg bundle has, in process through ConfigWorkflow: stage 2 without a stage-1 checkpoint is
refused with the command that makes one, and a = 0 trains the plain baseline from train.json alone, with no teacher.
Both stages, evaluation, inference, resume, DDP, 2D and every backbone are the bundle contract
(test_bundle_contract.py, driven by the registry's stage 1 and training stage); a teacher of another network is
refused in test_bad_input.py."""

from __future__ import annotations

from helpers import BUNDLES, in_bundle, refusal_in_process, small_run, workflow
from method_registry import by_name

RESEG = by_name("reseg")
RESEG_BUNDLE = BUNDLES / RESEG.bundle
STAGE_2 = ["train.json"]


def test_stage_two_without_checkpoint_is_refused_with_the_command(synthetic_dataset, tmp_path):
    with in_bundle(RESEG_BUNDLE):
        message = refusal_in_process(RESEG_BUNDLE, STAGE_2, "training", "train#trainer", bundle_root=str(tmp_path),
                                     dataset_dir=str(synthetic_dataset), max_epochs=1, **small_run(RESEG))
    assert f"ReSeg stage 2 needs the stage-1 reconstruction network {tmp_path}/models/reconstruction.pt" in message
    assert "configs/train_reconstruction.json" in message and "training_all" in message
    assert not (tmp_path / "models").exists()


def test_zero_weight_trains_the_plain_baseline_from_stage_two_alone(synthetic_dataset, tmp_path):
    with in_bundle(RESEG_BUNDLE):
        flow = workflow(RESEG_BUNDLE, STAGE_2, "train", run_id="training", bundle_root=str(tmp_path),
                        dataset_dir=str(synthetic_dataset), max_epochs=1, reseg_weight=0,
                        **{**small_run(RESEG), "train#trainer#epoch_length": 1})
        flow.run()
        metrics = flow.parser.get_parsed_content("train#trainer").state.metrics
    assert {k for k in metrics if k.startswith("train_")} == {"train_seg", "train_total"}, metrics
    assert (tmp_path / "models/model.pt").is_file() and not (tmp_path / "models/reconstruction.pt").exists()
