"""scripts/compare_methods.py end to end on the user's own data (smoke profile: SelfReg on a tiny synthetic MSD folder,
2 seeds, one epoch), its resume, its refusal of bad data, the paired statistics (scripts/paired_stats.py) and the
pieces of the report."""

from __future__ import annotations

import csv
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO, load_module

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compare():
    return load_module(REPO / "scripts" / "compare_methods.py", "compare_methods_tool")


@pytest.fixture(scope="module")
def paired_stats():
    return load_module(REPO / "scripts" / "paired_stats.py", "paired_stats_tool")


def test_comparison_on_own_data_writes_the_paired_report_and_resumes(compare, synthetic_dataset, tmp_path, capsys):
    """--dataset_dir: SelfReg against its baseline on a tiny MSD folder, 2 seeds, one epoch: plan step, training,
    inference on the held-out image at its own grid, the paired report; a rerun reuses everything."""
    readme = tmp_path / "README.md"
    readme.write_text(f"# top\n\n{compare.README_START}\nold table\n{compare.README_END}\n\nkept\n")
    results, out = tmp_path / "results", tmp_path / "out"
    argv = ["--profile", "smoke", "--dataset_dir", str(synthetic_dataset), "--method", "selfreg", "--seeds", "0", "1",
            "--target", "0.5", "--out", str(out), "--results", str(results), "--readme", str(readme)]
    compare.main([*argv, "--arm", "baseline"])  # one arm first (recipe_sweep.py's baselines): its runs, no report
    printed = capsys.readouterr().out
    assert "2 runs (1 method(s) x their tasks x arms x 2 seeds)" in printed and "no report" in printed
    assert sorted(p.parent.name for p in (out / "runs").rglob("scores.json")) == ["seed0", "seed1"]
    assert not (out / "runs" / "selfreg" / "synthetic" / "selfreg").exists() and not results.exists()
    compare.main(argv)
    printed = capsys.readouterr().out
    assert "4 runs (1 method(s) x their tasks x arms x 2 seeds) of 1 epochs" in printed and "estimated" in printed
    assert printed.count("done earlier, skipped") == 2  # the baseline's runs are kept

    plan = json.loads((out / "plans" / "selfreg" / "synthetic" / "models" / "plan.json").read_text())
    roots = sorted((out / "runs" / "selfreg" / "synthetic").glob("*/seed*"))
    assert [r.relative_to(out / "runs" / "selfreg" / "synthetic").as_posix() for r in roots] == [
        "baseline/seed0", "baseline/seed1", "selfreg/seed0", "selfreg/seed1"]
    for root in roots:  # trained with the plan; the profile's explicit crop wins over the plan's
        record = json.loads((root / "study_run.json").read_text())
        assert record["overrides"]["plan_file"].endswith("plans/selfreg/synthetic/models/plan.json")
        assert record["overrides"]["roi_size"] == "[24,24,24]" != str(plan["settings"]["roi_size"])
        assert len(record["load_average_1min"]) == 3 and min(record["load_average_1min"]) >= 0  # steps' ends
        assert record["started"] + record["train_s"] + record["infer_s"] <= record["finished"]
        [prediction] = (root / "predictions").rglob("*_seg.nii.gz")
        assert nib.load(prediction).shape == nib.load(next((synthetic_dataset / "labelsTs").glob("*"))).shape

    with (results / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["arm"], r["seed"]) for r in rows} == {("baseline", "0"), ("baseline", "1"), ("selfreg", "0"),
                                                     ("selfreg", "1")}
    assert all(0 <= float(r["dice_mean"]) <= 1 for r in rows)

    summary = json.loads((results / "summary.json").read_text())
    [paired] = summary["accuracy"]["selfreg"]["paired"]
    assert (paired["arm"], paired["against"], len(paired["pairs"])) == ("selfreg", "baseline", 2)
    for pair in paired["pairs"]:  # per seed and held-out case: method − baseline of the per-case Dice
        ours, theirs = ({(r["seed"], r["case"]): float(r["dice_mean"]) for r in rows if r["arm"] == arm}
                        for arm in ("selfreg", "baseline"))
        key = (str(pair["seed"]), pair["case"])
        assert pair["difference"] == pytest.approx(ours[key] - theirs[key], abs=1e-6)
    interval = paired["interval"]
    assert interval["low"] <= interval["mean"] <= interval["high"] and interval["n"] == 2
    cost = summary["costs"]["selfreg"]
    assert cost["step_ratio"] > 0 and cost["inference_ratio"] > 0

    report = (results / "README.md").read_text()
    assert "## Paired differences" in report and "### SelfReg, synthetic: selfreg − baseline" in report
    assert "| seed | held-out case | baseline Dice | selfreg Dice | difference |" in report
    assert paired["verdict"] in report and ("no measurable effect" in paired["verdict"]
                                            or re.match(r"(better|worse) by \d\.\d{3} \(95 % CI ", paired["verdict"]))
    assert "95 % CI" in report and "`baseline` " in report and "target ≥ 0.50" in report
    assert "--dataset_dir" in report and "your data" in report
    assert "while the runs were timed (14 samples" in report  # start, end and 3 per run
    assert re.search(r"- Wall time: \d+ min for the runs, from the first's start to the last's end \(\d+ min summed "
                     r"over them, at most [12] at a time\)", report)
    for png in ("dice.png", "validation_curves.png", "overlay_selfreg_synthetic.png"):
        assert (results / png).read_bytes()[:8] == PNG_MAGIC and f"]({png})" in report
    top = readme.read_text()
    assert "old table" not in top and "| SelfReg | synthetic |" in top and top.endswith("\n\nkept\n")

    benchmark = out / "benchmarks" / "selfreg.json"
    stamp = benchmark.stat().st_mtime_ns
    compare.main(argv)  # everything finished: a rerun reuses plan, runs and benchmark
    assert capsys.readouterr().out.count("done earlier, skipped") == 4
    assert benchmark.stat().st_mtime_ns == stamp
    assert json.loads((results / "summary.json").read_text())["accuracy"]["selfreg"]["paired"] == [paired]

    # scripts/recipe_sweep.py: a recipe setting trained on top of the finished baseline's run, paired with it
    sweep = load_module(REPO / "scripts" / "recipe_sweep.py", "recipe_sweep_tool")
    swept = sweep.main(["--out", str(out), "--method", "selfreg", "--task", "synthetic", "--seeds", "1",
                        "--arm", "lr_high=--learning_rate 0.05"])
    root = out / "sweep" / "selfreg" / "synthetic" / "lr_high" / "seed1"
    record = json.loads((root / "study_run.json").read_text())["overrides"]
    baseline_record = json.loads((out / "runs" / "selfreg" / "synthetic" / "baseline" / "seed1" / "study_run.json")
                                 .read_text())["overrides"]
    assert record == {**baseline_record, "learning_rate": "0.05"}
    assert "learning_rate 0.05" in (root / "train.log").read_text()  # the training-options line
    [case] = swept["lr_high"]["dice"][1]
    difference = swept["lr_high"]["dice"][1][case] - swept["baseline"]["dice"][1][case]
    assert swept["lr_high"]["difference"]["mean"] == pytest.approx(difference, abs=1e-9)
    assert json.loads((out / "sweep" / "selfreg" / "synthetic" / "sweep.json").read_text())["lr_high"]["dice"]
    with pytest.raises(SystemExit):
        compare.main([*argv, "--arm", "vae"])
    assert "--arm ['vae']: not an arm of ['selfreg']; their arms: ['baseline', 'selfreg']" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no finished baseline run"):
        sweep.main(["--out", str(out), "--method", "selfreg", "--task", "synthetic", "--seeds", "7",
                    "--arm", "lr_high=--learning_rate 0.05"])


def test_bad_own_data_is_refused_before_any_training(compare, synthetic_dataset, tmp_path):
    """A folder without dataset.json/imagesTr, and a dataset whose test label is missing: refused with the file
    named, before the plan step or any run."""
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--profile", "smoke", "--method", "selfreg", "--results", str(tmp_path / "r"), "--readme",
            str(tmp_path / "none.md")]
    with pytest.raises(SystemExit, match=f"{empty / 'dataset.json'} and {empty / 'imagesTr'} not found"):
        compare.main([*base, "--dataset_dir", str(empty), "--out", str(tmp_path / "o1")])
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_dataset, broken)
    [label] = (broken / "labelsTs").glob("*.nii.gz")
    label.unlink()
    with pytest.raises(SystemExit, match=f"test label {label} not found"):
        compare.main([*base, "--dataset_dir", str(broken), "--out", str(tmp_path / "o2")])
    assert not (tmp_path / "o1" / "plans").exists() and not (tmp_path / "o2" / "plans").exists()
    own = compare.parse_args(["--dataset_dir", str(broken), "--out", str(tmp_path / "o3")])
    assert own.readme is None and own.results == tmp_path / "o3" / "report"  # the repository's report is left alone


def test_paired_verdicts(paired_stats):
    spans = paired_stats.bootstrap_interval([0.03, -0.02, 0.01, -0.01, 0.02])
    assert spans.low < 0 < spans.high and paired_stats.verdict(spans).startswith("no measurable effect")
    positive = paired_stats.bootstrap_interval([0.05, 0.07, 0.06, 0.08, 0.04])
    assert positive.low > 0 and positive.mean == pytest.approx(0.06)
    assert paired_stats.verdict(positive) == f"better by 0.060 (95 % CI {positive.low:+.3f} to {positive.high:+.3f})"
    negative = paired_stats.bootstrap_interval([-0.05, -0.07, -0.06, -0.08, -0.04])
    assert negative.high < 0 and paired_stats.verdict(negative).startswith("worse by 0.060 (95 % CI -0.0")
    assert paired_stats.bootstrap_interval([0.05, 0.07, 0.06, 0.08, 0.04]) == positive  # fixed generator
    with pytest.raises(ValueError, match="finite"):
        paired_stats.bootstrap_interval([0.1, float("nan")])


def test_crossed_interval_resamples_seeds_and_cases(paired_stats):
    seeds, cases = [s for s in range(5) for _ in range(4)], [c for _ in range(5) for c in "abcd"]
    # every seed gains on case "a" only: an effect of one image, not of the method
    one_image = [0.2 + 0.01 * s if c == "a" else 0.01 * (s - 2) for s, c in zip(seeds, cases)]
    naive = paired_stats.bootstrap_interval(one_image)
    crossed = paired_stats.crossed_bootstrap_interval(one_image, seeds, cases)
    assert naive.low > 0 and crossed.spans_zero and crossed.mean == pytest.approx(naive.mean)
    assert crossed.n == 5 and paired_stats.verdict(crossed).startswith("no measurable effect")
    # one held-out case: the seeds are the units; a consistent gain is measurable
    gains = [0.05, 0.07, 0.06, 0.08, 0.04]
    single = paired_stats.crossed_bootstrap_interval(gains, range(5), ["head"] * 5)
    assert single.low > 0 and single.mean == pytest.approx(0.06)
    # a missing (seed, case) pair is left out of the means; a repeated one is refused
    partial = paired_stats.crossed_bootstrap_interval(one_image[:-1], seeds[:-1], cases[:-1])
    assert partial.mean == pytest.approx(np.mean(one_image[:-1]))
    with pytest.raises(ValueError, match="occurs twice"):
        paired_stats.crossed_bootstrap_interval([0.1, 0.2], [0, 0], ["a", "a"])


def test_wall_time_spans_the_runs_of_every_invocation(compare):
    """Seeds split over two invocations (one per core) and reported by a third that ran nothing: the runs' wall
    time is their clock span and the overlap counted, not the reporting invocation's own time."""
    def study(*intervals):
        return {"runs": [{"started": a, "finished": b, "train_s": b - a, "infer_s": 0} for a, b in intervals]}

    split = {"m": study((0, 600), (600, 1200)), "n": study((30, 630), (630, 1260))}  # two cores, two runs each
    assert compare.runs_span(split) == (1260, 2)
    assert compare.runs_span({"m": study((0, 600), (600, 1200))}) == (1200, 1)  # back to back: one at a time
    line = compare.wall_time_line(split, {}, runs_wall_s=0.0, parallel=1, wall_s=6.0)
    assert line.startswith("- Wall time: 21 min for the runs, from the first's start to the last's end (40 min "
                           "summed over them, at most 2 at a time)")
    older = {"m": {"runs": [{"started": None, "finished": None, "train_s": 600, "infer_s": 0}]}}
    assert compare.runs_span(older) is None  # recorded before the clock times: the invocation's own time
    assert "- Wall time: 10 min for the runs (10 min summed over them, 1 at a time)" in compare.wall_time_line(
        older, {}, runs_wall_s=600.0, parallel=1, wall_s=6.0)


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
    assert compare.update_readme(readme, ["| a |"], tmp_path / "results", ["A"]) is False
    assert readme.read_text() == "# no markers\n"


def test_readme_block_gathers_the_reports_of_several_invocations(compare, tmp_path):
    """Each invocation adds its rows and report line; a rerun replaces its method's rows; a report written over
    another takes the other's rows with it. The text around the markers is kept."""
    readme = tmp_path / "README.md"
    readme.write_text(f"# top\n{compare.README_START}\nold text\n{compare.README_END}\nbottom\n")
    header = ["| method | task | baseline Dice | method Dice | verdict |", "|---|---|---:|---:|---:|"]

    def update(title: str, task: str, dice: str, folder: str) -> None:
        assert compare.update_readme(readme, [*header, f"| {title} | {task} | 0.9 | {dice} | v |"],
                                     tmp_path / folder, [title])

    def rows() -> list[str]:
        return [line for line in readme.read_text().splitlines() if line.startswith("| ") and "method |" not in line]

    update("SelfReg", "brain", "0.8", "results")
    update("ReSeg", "brain", "0.91", "results/reseg_brain")
    assert rows() == ["| SelfReg | brain | 0.9 | 0.8 | v |", "| ReSeg | brain | 0.9 | 0.91 | v |"]
    update("SelfReg", "brain", "0.85", "results")  # a rerun: its row replaced in place
    assert rows() == ["| SelfReg | brain | 0.9 | 0.85 | v |", "| ReSeg | brain | 0.9 | 0.91 | v |"]
    text = readme.read_text()
    assert "- [results/README.md](results/README.md): SelfReg" in text
    assert "- [results/reseg_brain/README.md](results/reseg_brain/README.md): ReSeg" in text
    assert text.startswith("# top\n") and text.endswith(f"{compare.README_END}\nbottom\n") and "old text" not in text
    update("SemSim", "brain", "0.7", "results")  # SelfReg's report overwritten: its row goes
    assert rows() == ["| ReSeg | brain | 0.9 | 0.91 | v |", "| SemSim | brain | 0.9 | 0.7 | v |"]
    assert "SelfReg" not in readme.read_text()


def test_one_method_on_one_task_reports_in_its_own_folder(compare):
    results = compare.REPO / "docs" / "results"
    assert compare.parse_args(["--method", "semsim", "--task", "brain"]).results == (results / "semsim_brain").resolve()
    assert compare.parse_args(["--method", "selfreg", "--task", "brain", "--task", "tissue"]).results == results
    assert compare.parse_args([]).results == results


def test_extra_overrides_follow_the_profiles(compare, tmp_path):
    """--extra: every run's overrides after the profile's and before the arm's, and the report's command line."""
    args = compare.parse_args(["--profile", "cpu", "--method", "semsim", "--task", "brain", "--extra",
                               "--unlabeled_batch_size 1 --num_workers 2", "--out", str(tmp_path)])
    assert args.profile.extra == "--num_workers 0 --unlabeled_batch_size 1 --num_workers 2"
    overrides = compare.run_overrides(args, "--intra_weight 0", 3, tmp_path / "plan.json", {"datalist": "d.json"})
    assert overrides["unlabeled_batch_size"] == "1" and overrides["num_workers"] == "2"  # the later one wins
    assert overrides["intra_weight"] == "0" and overrides["seed"] == "3"
    assert "--extra '--unlabeled_batch_size 1 --num_workers 2'" in compare.command_line(args)


def test_method_is_compared_with_its_registry_arm(compare):
    """SemSim is compared with FixMatch: besides every arm − supervised, semsim − fixmatch, paired by seed and case."""
    def run(arm, seed, dice):
        return {"task": "synthetic", "arm": arm, "seed": seed, "cases": [{"case": "c", "dice": {"mean": dice}}]}

    report = {"settings": {"tasks": ["synthetic"]}, "datasets": {"synthetic": {"classes": ["a", "b"]}},
              "runs": [run("supervised", 0, 0.5), run("supervised", 1, 0.6), run("fixmatch", 0, 0.6),
                       run("fixmatch", 1, 0.9), run("semsim", 0, 0.65), run("semsim", 1, 0.9)]}
    semsim = compare.method_registry.by_name("semsim")
    report["paired"] = compare.comparisons(semsim, report)
    assert [(c["arm"], c["against"]) for c in report["paired"]] == [
        ("fixmatch", "supervised"), ("semsim", "supervised"), ("semsim", semsim.compare_against)]
    against = compare.find_comparison(report, "synthetic", "semsim", "fixmatch")
    assert [p["difference"] for p in against["pairs"]] == pytest.approx([0.05, 0.0])
    [line] = compare.target_lines({"semsim": report}, [semsim])
    assert f"semsim − {semsim.compare_against} = +0.025" in line and f"≥ {semsim.dice_gain_target:+.3f}" in line


def test_largest_component_study_rescores_finished_runs(tmp_path, capsys):
    """scripts/largest_component_study.py on a compare_methods output folder: a baseline run whose prediction has a
    stray island and a method run without one; keeping class 1 to its largest component removes the island only,
    raises the baseline's Dice and HD95 accordingly, and the method - baseline difference is taken with both kept."""
    study = load_module(REPO / "scripts" / "largest_component_study.py", "largest_component_study_tool")
    grid = np.stack(np.meshgrid(*[np.arange(24)] * 3, indexing="ij"))
    label = (((grid - 12) ** 2).sum(0) <= 25).astype(np.uint8)
    data = tmp_path / "data/m/brain/labelsTs"
    data.mkdir(parents=True)
    nib.save(nib.Nifti1Image(label, np.eye(4)), data / "head.nii.gz")
    island = label.copy()
    island[0:3, 0:3, 0:3] = 1  # 27 voxels, 20 mm from the ball
    for arm, prediction in (("baseline", island), ("m", label)):
        for seed in ("seed0", "seed1"):
            folder = tmp_path / f"runs/m/brain/{arm}/{seed}/predictions"
            folder.mkdir(parents=True)
            nib.save(nib.Nifti1Image(prediction, np.eye(4)), folder / "head_seg.nii.gz")
    results = study.main(["--out", str(tmp_path), "--classes", "1"])
    baseline, method = results["m/brain/baseline"], results["m/brain/m"]
    rows = baseline["runs"]["seed0"]
    assert rows[0]["voxels_removed"] == 27 and rows[0]["dice_kept"] == 1.0 and rows[0]["dice_predicted"] < 0.98
    assert rows[0]["hd95_predicted"] > 5 and rows[0]["hd95_kept"] == 0.0
    assert method["runs"]["seed1"][0]["voxels_removed"] == 0 and method["dice_kept"] == 1.0
    assert baseline["difference"]["mean"] > 0.02 and method["minus_baseline_kept"]["mean"] == 0.0
    assert "kept - predicted" in capsys.readouterr().out
