"""scripts/accuracy_study.py end to end in --quick mode on tiny synthetic volumes, its resume, and its refusal of a
folder it did not make."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, load_module

ARMS = ["--arm", "baseline=--selfreg_weight 0", "--arm", "selfreg=--selfreg_weight 0.015"]
# Tiny volumes on their own 1.5 mm grid, one crop of the whole volume: two runs of two epochs in well under a minute.
TINY = ["--task", "synthetic", "--synthetic-size", "24", "--extra",
        "--learning_rate 2e-3 --num_samples 1 --spacing [1.5,1.5,1.5] --roi_size [24,24,24] --num_workers 0"]


@pytest.fixture(scope="module")
def study():
    return load_module(REPO / "scripts" / "accuracy_study.py", "accuracy_study_tool")


def test_quick_study_reports_both_arms_and_resumes(study, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["--bundle", "selfreg_segmentation", *ARMS, *TINY, "--quick", "--out", str(out)]
    study.main(argv)

    results = json.loads((out / "results.json").read_text())
    assert results["datasets"]["synthetic"]["source"] == "synthetic"
    assert results["machine"]["cpu_cores"] >= 1 and results["machine"]["torch"]
    runs = {run["arm"]: run for run in results["runs"]}
    assert set(runs) == {"baseline", "selfreg"}
    classes = results["datasets"]["synthetic"]["classes"]
    for run in runs.values():
        assert run["overrides"]["max_epochs"] == "2" and run["train_s"] > 0 and run["eval_s"] > 0
        assert len(run["cases"]) == 1  # the one held-out case
        for metric in ("dice", "hd95"):
            assert set(run["cases"][0][metric]) == {*classes, "mean"}
    assert runs["selfreg"]["overrides"]["selfreg_weight"] == "0.015"
    assert set(results["differences"]["synthetic"]) == {"selfreg"}
    markdown = (out / "results.md").read_text()
    assert "| baseline | 0 |" in markdown and "| selfreg | 0 |" in markdown
    assert "selfreg − baseline" in markdown and "SYNTHETIC" in markdown

    capsys.readouterr()
    study.main(argv)  # every run finished: a rerun only rewrites the report
    assert capsys.readouterr().out.count("done earlier, skipped") == 2
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]


def test_refuses_a_foreign_folder_before_any_work(study, tmp_path):
    out = tmp_path / "someone_elses"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not made by accuracy_study.py"):
        study.main(["--bundle", "selfreg_segmentation", *ARMS, *TINY, "--quick", "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
