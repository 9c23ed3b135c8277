"""scripts/accuracy_study.py's refusal of a folder it did not make and its arms from the registry. (The study's
training runs are not exercised end to end here: compare_methods.py, which has its own end-to-end test, no longer
drives it.)"""

from __future__ import annotations

import pytest
from helpers import REPO, load_module

ARMS = ["--arm", "baseline=--selfreg_weight 0", "--arm", "selfreg=--selfreg_weight 0.015"]
# Tiny volumes on their own 1.5 mm grid (the refusal comes before any of it is made).
TINY = ["--task", "synthetic", "--synthetic-size", "24", "--extra",
        "--learning_rate 2e-3 --num_samples 1 --spacing [1.5,1.5,1.5] --roi_size [24,24,24] --num_workers 0 "
        "--iterations_per_epoch 0"]


@pytest.fixture(scope="module")
def study():
    return load_module(REPO / "scripts" / "accuracy_study.py", "accuracy_study_tool")


def test_refuses_a_foreign_folder_before_any_work(study, tmp_path):
    out = tmp_path / "someone_elses"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not made by accuracy_study.py"):
        study.main(["--bundle", "selfreg_segmentation", *ARMS, *TINY, "--quick", "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_registered_bundle_takes_its_arms_stages_and_labels_from_the_registry(study):
    import method_registry

    for method in method_registry.all_methods():
        args = study.parse_args(["--bundle", method.bundle])
        assert {arm.name: arm.overrides for arm in args.arm} == {
            name: study.parse_overrides(text) for name, text in method.arms.items()}
        assert args.train_configs == list(method.training.configs) and args.train_run_id == method.training.run_id
        assert args.labeled == method.labeled
    args = study.parse_args(["--bundle", "selfreg_segmentation", *ARMS, "--train-run-id", "run"])
    assert [arm.name for arm in args.arm] == ["baseline", "selfreg"] and args.train_run_id == "run"
