"""scripts/label_efficiency_study.py: the report of the 2-D label-efficiency study from finished runs (the
``recipe_benchmark.json`` files ``scripts/recipe_benchmark.py`` writes, and training logs written by MONAI's
StatsHandler), its paired intervals and target verdicts, its resume, and its refusals. Training itself is
``recipe_benchmark.py``, exercised end to end by tests/test_compare_methods.py."""

from __future__ import annotations

import json
import re

import pytest
from helpers import REPO, load_module
from test_plot_term_activity import write_log

study = load_module(REPO / "scripts" / "label_efficiency_study.py", "label_efficiency_study_tool")

SEEDS = [0, 1, 2, 3, 4]
SUPERVISED = [0.70, 0.72, 0.69, 0.71, 0.73]
# K=1: SemSim clearly ahead of both; K=3: SemSim's differences straddle 0.
GAINS = {1: {"fixmatch": [0.01, 0.02, 0.00, 0.01, 0.01], "semsim": [0.06, 0.08, 0.07, 0.05, 0.09]},
         3: {"fixmatch": [0.02, 0.03, 0.01, 0.02, 0.02], "semsim": [-0.02, 0.03, 0.01, -0.01, 0.02]}}


def write_run(folder, mean: float) -> None:
    """A finished run as recipe_benchmark.py leaves it: per-class Dice of the held-out case and their mean."""
    folder.mkdir(parents=True)
    per_class = [mean + 0.05, mean - 0.05]
    (folder / "recipe_benchmark.json").write_text(json.dumps(
        {"dice_per_class": {"mni_slab2": per_class}, "mean_dice": sum(per_class) / 2, "train_s": 60.0}))


@pytest.fixture()
def finished_study(tmp_path):
    for labeled, gains in GAINS.items():
        for i, seed in enumerate(SEEDS):
            write_run(tmp_path / f"k{labeled}" / f"supervised_{seed}", SUPERVISED[i])
            for arm, gain in gains.items():
                write_run(tmp_path / f"k{labeled}" / f"{arm}_{seed}", SUPERVISED[i] + gain[i])
    curve = [{"val_mean_dice": v, "val_dice_grey_matter": v + 0.05} for v in (0.5, 0.7, 0.8, 0.81, 0.80, 0.81)]
    (tmp_path / "k1" / "supervised_long_0").mkdir()
    write_log(tmp_path / "k1" / "supervised_long_0" / "train.log", curve)
    return tmp_path


def test_report_gives_paired_intervals_and_target_verdicts(finished_study):
    report = study.main(["--out", str(finished_study), "--report-only", "--plateau-epochs", "6"])
    k1, k3 = report["per_k"][1], report["per_k"][3]
    assert k1["scores"]["semsim"][2]["mean"] == pytest.approx(0.69 + 0.07)
    assert k1["comparisons"]["semsim-supervised"]["mean"] == pytest.approx(0.07)
    assert k1["comparisons"]["semsim-supervised"]["low"] > 0.05
    assert k1["comparisons"]["semsim-supervised"]["verdict"].startswith("better by 0.070")
    assert k1["targets"] == {"semsim_vs_supervised": {"met": True, "need": 0.05, "short_by": 0.0},
                             "semsim_vs_fixmatch": {"met": True}}
    assert k3["comparisons"]["semsim-supervised"]["mean"] == pytest.approx(0.006)
    assert k3["comparisons"]["semsim-supervised"]["verdict"].startswith("no measurable effect")
    assert not k3["targets"]["semsim_vs_supervised"]["met"]
    assert k3["targets"]["semsim_vs_supervised"]["short_by"] == pytest.approx(0.044)
    assert k3["targets"]["semsim_vs_fixmatch"] == {"met": False}
    assert k1["curves"]["supervised_long_0"] == [(e + 1, pytest.approx(v)) for e, v in
                                                 enumerate((0.5, 0.7, 0.8, 0.81, 0.80, 0.81))]
    text = (finished_study / "results.md").read_text()
    assert "| semsim | 0.760 | 0.800 | 0.760 | 0.760 | 0.820 | 0.780 |" in text
    assert "**missed** (mean short by 0.044)" in text
    assert "validation curve `supervised_long_0`: 6 epochs, best 0.810, last third 0.800-0.810" in text
    assert (finished_study / "validation_curves.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((finished_study / "results.json").read_text())["per_k"]["1"]["targets"]["semsim_vs_fixmatch"]


def test_a_finished_run_is_not_trained_again(finished_study):
    args = study.parse_args(["--out", str(finished_study)])
    folder = study.train_one(args, 1, "semsim", 0, 12, threads=1)
    assert folder == finished_study / "k1" / "semsim_0"
    assert not (finished_study / "k1" / "semsim_0.log").exists()  # no training process was started


def test_planned_runs_put_the_slow_arm_first_and_add_the_plateau_run(tmp_path):
    args = study.parse_args(["--out", str(tmp_path), "--labeled", "1", "--seeds", "3", "--plateau-epochs", "24"])
    assert study.planned_runs(args) == [(1, "semsim", 3, 12), (1, "supervised", 3, 12), (1, "fixmatch", 3, 12),
                                        (1, "supervised_long", 3, 24)]


def test_a_variant_is_semsim_with_its_overrides_and_is_compared_with_semsim_and_supervised(finished_study):
    for i, seed in enumerate(SEEDS):
        write_run(finished_study / "k1" / f"ema_{seed}", SUPERVISED[i] + GAINS[1]["semsim"][i] + 0.01 * (i - 2))
    argv = ["--out", str(finished_study), "--labeled", "1", "--variant", "ema=--ema_decay 0.99"]
    args = study.parse_args(argv + ["--arms", "ema", "supervised"])
    assert args.arm_overrides["ema"] == "--ema_decay 0.99"  # the registry's semsim arm has no overrides
    assert [arm for _, arm, _, _ in study.planned_runs(args)[:2]] == ["ema", "supervised"]
    report = study.main(argv + ["--report-only"])
    comparisons = report["per_k"][1]["comparisons"]
    assert comparisons["ema-semsim"]["differences"] == pytest.approx([-0.02, -0.01, 0.0, 0.01, 0.02])
    assert comparisons["ema-semsim"]["verdict"].startswith("no measurable effect")
    assert comparisons["ema-supervised"]["mean"] == pytest.approx(0.07)
    assert "| ema − semsim | -0.020, -0.010, +0.000, +0.010, +0.020 |" in (finished_study / "results.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0", "0"], "seeds must be distinct"),
    (["--method", "selfreg"], r"has no arm\(s\) \['fixmatch', 'semsim', 'supervised'\]"),
    (["--variant", "fixmatch=--ema_decay 0.99"], "a new identifier NAME, not one of"),
    (["--variant", "ema"], "give NAME=OVERRIDES"),
    (["--arms", "semsim", "mean_teacher"], r"--arms \['mean_teacher'\]: not an arm"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)
