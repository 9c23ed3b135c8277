"""scripts/compare_methods.py end to end (smoke profile: SelfReg on tiny synthetic volumes, one epoch), with the
accuracy study it runs (scripts/accuracy_study.py), their resume, and the pieces of the report."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import REPO, load_module

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compare():
    return load_module(REPO / "scripts" / "compare_methods.py", "compare_methods_tool")


def test_smoke_comparison_writes_the_report_and_resumes(compare, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# top\n\n{compare.README_START}\nold table\n{compare.README_END}\n\nkept\n")
    results = tmp_path / "results"
    argv = ["--profile", "smoke", "--task", "synthetic", "--method", "selfreg", "--out", str(tmp_path / "out"),
            "--results", str(results), "--readme", str(readme)]
    compare.main(argv)

    study = json.loads((tmp_path / "out" / "runs" / "selfreg" / "results.json").read_text())
    assert study["datasets"]["synthetic"]["source"] == "synthetic"
    runs = {run["arm"]: run for run in study["runs"]}
    assert set(runs) == {"baseline", "selfreg"}
    for run in runs.values():
        assert run["overrides"]["max_epochs"] == "1" and run["train_s"] > 0 and run["eval_s"] > 0
        assert len(run["cases"]) == 1  # the one held-out case
    assert runs["baseline"]["overrides"]["selfreg_weight"] == "0" and "selfreg_weight" not in runs["selfreg"][
        "overrides"]  # the method arm runs the bundle's own weight
    assert "selfreg − baseline" in (tmp_path / "out" / "runs" / "selfreg" / "results.md").read_text()

    with (results / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["task"], r["arm"], r["seed"]) for r in rows} == {
        ("selfreg", "synthetic", "baseline", "0"), ("selfreg", "synthetic", "selfreg", "0")}
    assert all(0 <= float(r["dice_mean"]) <= 1 for r in rows)

    summary = json.loads((results / "summary.json").read_text())
    cost = summary["costs"]["selfreg"]
    assert cost["step_ratio"] > 0 and cost["memory_ratio"] > 0 and cost["inference_ratio"] > 0
    selfreg = compare.method_registry.by_name("selfreg")
    assert cost["step_target"] == selfreg.step_ratio_target and cost["backbone"] == "segresnet"
    assert cost["against"] == selfreg.compare_against and cost["inference_max_abs_difference"] == 0
    bench = json.loads((tmp_path / "out" / "benchmarks" / "selfreg.json").read_text())
    assert list(bench["arms"]) == list(selfreg.arms) and bench["against"] == selfreg.compare_against

    report = (results / "README.md").read_text()
    assert "| SelfReg | synthetic | baseline |" in report and "| SelfReg | synthetic | selfreg |" in report
    assert "- SelfReg, synthetic: selfreg − baseline = " in report and "target ≥ +0.000" in report
    assert "target ≤ 1.10" in report and "1 seeds × 1 held-out case(s)" in report and "SYNTHETIC" in report
    for png in ("dice.png", "validation_curves.png", "overlay_selfreg_synthetic.png"):
        assert (results / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in report

    top = readme.read_text()
    assert "old table" not in top and "| SelfReg | synthetic |" in top and top.endswith("\n\nkept\n")

    benchmark = tmp_path / "out" / "benchmarks" / "selfreg.json"
    stamp = benchmark.stat().st_mtime_ns
    capsys.readouterr()
    compare.main(argv)  # everything finished: a rerun reuses runs, benchmark and predictions
    assert capsys.readouterr().out.count("done earlier, skipped") == 2
    assert benchmark.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "out" / "runs" / "selfreg" / "results.json").read_text())["runs"] == study["runs"]


def test_validation_curve_reads_the_logged_epochs(compare, tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "2026-11-22 10:00:00,000 - INFO - Epoch[1] Metrics -- train_total: 0.9\n"
        "2026-11-22 10:00:01,000 - INFO - Epoch[2] Metrics -- val_dice_a: 0.5 val_mean_dice: 0.25 \n"
        "2026-11-22 10:00:02,000 - INFO - Epoch[4] Metrics -- val_mean_dice: 0.5 val_dice_a: 0.6\n")
    assert compare.validation_curve(log) == [(2, 0.25), (4, 0.5)]


def test_readme_without_markers_is_left_alone(compare, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert compare.update_readme(readme, ["| a |"], tmp_path / "results") is False
    assert readme.read_text() == "# no markers\n"


def test_dice_gain_is_taken_against_the_registry_arm(compare):
    """SemSim is compared with FixMatch: its gain is semsim − fixmatch, paired by seed, though the study pairs every
    arm with its first (supervised)."""
    def diff(per_seed):
        return {"dice": {"mean": {"per_seed": per_seed, "mean": sum(per_seed.values()) / len(per_seed)}}}

    report = {"settings": {"arms": [{"name": "supervised"}, {"name": "fixmatch"}, {"name": "semsim"}],
                           "tasks": ["synthetic"]},
              "datasets": {"synthetic": {"classes": ["a", "b"]}},
              "differences": {"synthetic": {"fixmatch": diff({"0": 0.10, "1": 0.30}),
                                            "semsim": diff({"0": 0.15, "1": 0.30})}}}
    assert compare.dice_gain(report, "synthetic", "semsim", "supervised") == pytest.approx(0.225)
    assert compare.dice_gain(report, "synthetic", "semsim", "fixmatch") == pytest.approx(0.025)
    semsim = compare.method_registry.by_name("semsim")
    [line] = compare.target_lines({"semsim": report}, [semsim])
    assert f"semsim − {semsim.compare_against} = +0.025" in line and f"≥ {semsim.dice_gain_target:+.3f}" in line
