"""Compare every method bundle against its zero-weight baseline, in one command, and write the report.

For each method of the registry (``bundles/methods/<method>/method.json``: its arms, tasks, training stages, the
arm it is measured against and its targets) this

1. reads the data (the real-MRI tasks of ``scripts/make_dataset.py``: brain extraction on a held-out head and
   bg/GM/WM tissue on a held-out MNI slab, SemSim's with one labelled case plus the unlabelled pool; or the user's
   own with ``--dataset_dir``) and checks it before any training (``scripts/comparison_runs.py``);
2. runs the bundle's plan step once per dataset (``configs/plan.json``): every run of it trains with that plan's
   spacing, crop, batch and iterations per epoch, except where the profile overrides a setting explicitly;
3. trains every arm for every seed with the same budget (paired: the same seeds for every arm), segments the
   held-out images with the bundle's ``configs/inference.json`` (inverted to each image's own grid) and scores
   them there (Dice and HD95 per class, ``scripts/recipe_benchmark.py``);
4. measures the training-step time, its peak memory and the sliding-window inference time of every arm with
   ``scripts/benchmark.py`` (ratios against the method's ``compare_against`` arm from one interleaved run);
5. writes ``docs/results/`` (or ``--results``): ``README.md`` (the baseline's Dice against its target; per arm
   the Dice and HD95 over seeds; the paired differences method − baseline per seed and held-out case with their
   bootstrap 95 % interval and verdict, ``scripts/paired_stats.py``; the cost ratios), ``per_case.csv``,
   ``summary.json``, PNG plots, and its rows of the headline table of the top README between its ``results``
   markers, where the rows and report links of earlier invocations (other methods or tasks) are kept.

Before training it prints the number of runs and their estimated wall time (``--estimate`` stops there).
Everything is resumable: finished plans, runs and benchmarks are kept under ``--out`` and not recomputed, and a
half-finished training resumes from its checkpoint.

    python scripts/compare_methods.py --profile cpu --estimate          # runs and estimated time, nothing trained
    python scripts/compare_methods.py --profile cpu --method selfreg --task brain   # 5 seeds, ~80 min on 2 cores
    python scripts/compare_methods.py --profile gpu                     # the plan's CUDA settings, one GPU
    python scripts/compare_methods.py --dataset_dir DATA --method selfreg --target 0.8   # your data (MSD or JSON)
    python scripts/compare_methods.py --profile cpu --method semsim --task brain --extra "--unlabeled_batch_size 1"
    python scripts/compare_methods.py --profile cpu --method segresnet_vae --task brain --seeds 2 --arm baseline
        # one arm's runs only (the baselines scripts/recipe_sweep.py trains on top of), no report
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

# scripts/ is this script's folder, first on sys.path: its tools import as top-level modules
import accuracy_study  # noqa: E402
import comparison_runs  # noqa: E402
import demo  # noqa: E402
import method_registry  # noqa: E402
import paired_stats  # noqa: E402
from accuracy_study import Run  # noqa: E402
from comparison_runs import DatasetInputError  # noqa: E402
from method_registry import Method  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
OUT_MARKER = ".made_by_compare_methods"


@dataclass(frozen=True)
class Profile:
    """A budget: epochs per run (of the plan's iterations per epoch), the validation interval, the overrides every
    run shares (each bundle's plan and defaults otherwise), seeds, runs side by side, the options of
    ``scripts/benchmark.py``, and what the time estimate assumes: seconds of a training step per crop voxel with
    one run's threads, and the rest of a run (start-ups, validation, inference, scoring)."""

    epochs: int
    val_interval: int
    extra: str
    seeds: tuple[int, ...]
    parallel: int
    benchmark: tuple[str, ...]
    seconds_per_voxel: float
    run_overhead_s: float
    caveat: str = ""


PROFILES = {
    # The plan's CPU settings (8 filters; brain: 3 mm, two heads x two 48^3 crops, 50 iterations per epoch). Eight
    # epochs (400 steps) are the budget that brings the brain baseline to its target (0.913 and 0.930 in the
    # recipe's runs, docs/recipe.md; 10 minutes on the 2 idle cores). Measured in this profile's own runs (two at
    # a time, one thread each, on the 2-core machine): 900 s for 400 steps of 4 x 48^3 voxels, 5e-6 s per voxel,
    # and about a minute more per run (validation every epoch, inference, scoring). At this budget one method on
    # one task over 5 seeds takes about 80 minutes, so the whole registry (4 methods x 2 tasks) is a night's run:
    # narrow it with --method and --task.
    "cpu": Profile(epochs=8, val_interval=1, extra="--num_workers 0", seeds=(0, 1, 2, 3, 4), parallel=2,
                   benchmark=("--device", "cpu", "--iters", "5", "--warmup", "1", "--small", "--roi", "64", "64", "32"),
                   seconds_per_voxel=5e-6, run_overhead_s=60,
                   caveat="This is a CPU budget of 400 optimiser steps per run, far below the papers' but the one "
                          "that brings the plain brain baseline to its target; the baseline's score against its "
                          "target says whether it did on each task."),
    # The plan's CUDA settings and the bundles' own learning rates, with AMP (the bundles turn it on with CUDA).
    "gpu": Profile(epochs=300, val_interval=10, extra="--num_workers 4", seeds=(0, 1, 2, 3, 4), parallel=1,
                   benchmark=("--device", "cuda", "--iters", "20", "--warmup", "5", "--roi", "96", "96", "96"),
                   seconds_per_voxel=5e-8, run_overhead_s=120),
    # For tests: one epoch of one pass over tiny data, tiny crops set explicitly over the plan's.
    "smoke": Profile(epochs=1, val_interval=1,
                     extra="--num_samples 1 --batch_size 1 --spacing [1.5,1.5,1.5] --roi_size [24,24,24] "
                           "--num_workers 0 --iterations_per_epoch 0",
                     seeds=(0,), parallel=1,
                     benchmark=("--device", "cpu", "--iters", "1", "--warmup", "0", "--small", "--roi", "16", "16",
                                "16", "--volume", "24", "24", "24"),
                     seconds_per_voxel=2e-5, run_overhead_s=30),
}
HOW_TO = """## How to run on your data

```bash
python scripts/compare_methods.py --dataset_dir DATA --method selfreg --target 0.85 --estimate   # check, plan, time
python scripts/compare_methods.py --dataset_dir DATA --method selfreg --target 0.85 --epochs 4 --seeds 0 1 2 3 4
```

`DATA` is an MSD folder (`dataset.json` with a `labels` map, `imagesTr/`, `labelsTr/`, and held-out `test` cases
with a `label` or a file of the image's name in `labelsTs/`) or a MONAI datalist JSON (paths relative to its folder).
It is checked before any training: a missing `dataset.json` or `imagesTr/`, a listed file that does not exist or a
held-out image without its label stops the comparison with the file named. Then the bundle's plan step runs once on
the data, every arm trains with the same plan, budget and seeds, and each held-out image is segmented by the bundle's
`inference.json` and scored at its own resolution. The report has the same sections as this one: the baseline's Dice
against `--target`; per arm, Dice and HD95 over seeds; the paired differences method − baseline for every seed and
held-out case with a bootstrap 95 % interval (10000 resamples of seeds and cases, numpy seed 0) and the verdict: "no
measurable effect" where the interval spans 0, else "better by X (95 % CI a to b)" or "worse by X (...)"; the cost
ratios (`scripts/benchmark.py`, independent of the data). The report goes to `<out>/report/` (`--results`), the
repository's README and `docs/results/` are left alone; `--out` keeps plans and runs, and a rerun resumes there.
"""
METHODS = method_registry.all_methods()
METHOD_NAMES = tuple(m.name for m in METHODS)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=tuple(PROFILES), default="cpu")
    parser.add_argument("--method", action="append", choices=METHOD_NAMES, help="repeat (default: all)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--task", action="append", choices=accuracy_study.TASKS,
                      help="repeat (default: each method's real-MRI tasks)")
    data.add_argument("--dataset_dir", type=Path,
                      help="your own data instead of the tasks: an MSD folder (dataset.json, imagesTr/, labelsTr/, "
                           "held-out 'test' cases with labels or labelsTs/) or a MONAI datalist JSON")
    parser.add_argument("--target", type=float, help="with --dataset_dir: the held-out mean Dice the baseline "
                                                     "should reach (the registry's targets are per built-in task)")
    parser.add_argument("--epochs", type=accuracy_study.positive_int, help="epochs per run (default: the profile's)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds, the same for every arm (default: the profile's)")
    parser.add_argument("--parallel", type=accuracy_study.positive_int, help="runs at once (default: the profile's)")
    parser.add_argument("--extra", default="",
                        help="bundle overrides for every run and the benchmark, after the profile's (e.g. "
                             "\"--unlabeled_batch_size 1\"); they are in the report's budget line")
    parser.add_argument("--arm", action="append",
                        help="train only this arm's runs (repeat) and stop before the benchmark and the report, "
                             "which need every arm: e.g. the baselines that scripts/recipe_sweep.py adds arms to")
    parser.add_argument("--estimate", action="store_true",
                        help="check the data, plan, print the runs and their estimated time, and stop")
    parser.add_argument("--out", type=Path,
                        help="plans, runs and benchmarks (default study_output/comparison_<profile>)")
    parser.add_argument("--results", type=Path,
                        help="where the report goes (default docs/results, docs/results/<method>_<task> for one method "
                             "on one task; with --dataset_dir, <out>/report)")
    parser.add_argument("--readme", type=Path,
                        help=f"README whose {README_START} ... {README_END} block gets the headline table "
                             "(default the repository's, none with --dataset_dir; a README without the markers is "
                             "left alone)")
    parser.add_argument("--data-cache", default=None, help="download cache for the MRI volumes")
    args = parser.parse_args(argv)
    args.methods = [m for m in METHODS if m.name in (args.method or METHOD_NAMES)]
    profile = PROFILES[args.profile]
    args.profile_name = args.profile
    args.profile = Profile(**{**vars(profile), "epochs": args.epochs or profile.epochs,
                              "extra": f"{profile.extra} {args.extra}".strip(),
                              "seeds": tuple(args.seeds or profile.seeds),
                              "parallel": args.parallel or profile.parallel})
    if len(set(args.profile.seeds)) != len(args.profile.seeds):
        parser.error(f"--seeds repeats a value (two runs would share a folder): {list(args.profile.seeds)}")
    known_arms = {arm for m in args.methods for arm in m.arms}
    unknown = sorted(set(args.arm or ()) - known_arms)
    if unknown:
        parser.error(f"--arm {unknown}: not an arm of {[m.name for m in args.methods]}; their arms: "
                     f"{sorted(known_arms)}")
    if args.target is not None and args.dataset_dir is None:
        parser.error("--target is for --dataset_dir; the built-in tasks take their targets from the registry")
    args.out = (args.out or REPO / "study_output" / f"comparison_{args.profile_name}").resolve()
    # The repository's report and README hold the built-in tasks' numbers: a comparison on other data leaves them.
    own = args.dataset_dir is not None
    args.results = (args.results or (args.out / "report" if own else default_results(args))).resolve()
    args.readme = args.readme or (None if own else REPO / "README.md")
    return args


def default_results(args: argparse.Namespace) -> Path:
    """docs/results for the whole registry; docs/results/<method>_<task> for one method on one task, so that a
    partial invocation (some seeds, on one core) never writes over the registry-wide report."""
    pairs = [(m.name, task) for m in args.methods for task in method_tasks(m, args)]
    return REPO / "docs" / "results" / ("_".join(pairs[0]) if len(pairs) == 1 else "")


def method_tasks(method: Method, args: argparse.Namespace) -> list[str]:
    """--task replaces every method's own tasks (``synthetic`` for tests); --dataset_dir is one task, named after
    the data."""
    if args.dataset_dir is not None:
        return [own_task_name(args.dataset_dir)]
    return list(args.task or method.tasks)


def own_task_name(dataset_dir: Path) -> str:
    """The user's dataset as a task name: its folder's (or datalist file's) name, as a plain folder name."""
    path = dataset_dir.resolve()
    return re.sub(r"[^\w.-]", "_", path.name if path.is_dir() else path.stem) or "dataset"


def claim_output(out: Path) -> None:
    """Refuse a non-empty folder this tool did not create; mark the folder as the comparison's."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / OUT_MARKER).is_file())):
        raise SystemExit(f"{out} exists and was not made by compare_methods.py: move it away or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / OUT_MARKER).write_text("written by scripts/compare_methods.py; a rerun resumes in this folder\n")


def task_dataset(method: Method, task: str, args: argparse.Namespace) -> dict:
    """The checked dataset of one method and task: the user's (--dataset_dir) or make_dataset's, written once
    under --out (SemSim's keeps the registry's number of labelled cases)."""
    if args.dataset_dir is not None:
        datalist, base_dir = comparison_runs.dataset_files(args.dataset_dir.resolve())
        info = {"task": task, "source": "own", "description": f"your data, {datalist}"}
    else:
        size = 24 if task == "synthetic" else 48
        info = accuracy_study.prepare_dataset(task, args.out / "data" / method.name / task, args.data_cache, size,
                                              method.labeled)
        datalist, base_dir = Path(info["path"]) / "dataset.json", Path(info["path"])
    checked = comparison_runs.read_dataset(datalist, base_dir, method.needs_unlabeled)
    return {**info, **checked}


def baseline_target(method: Method, task: str, args: argparse.Namespace) -> float | None:
    """The held-out mean Dice the baseline must reach: --target for the user's data, else the registry's."""
    return args.target if args.dataset_dir is not None else method.baseline_dice_target.get(task)


def run_overrides(args: argparse.Namespace, arm_overrides: str, seed: int, plan_file: Path,
                  dataset: dict) -> dict[str, str]:
    """The settings of one run: the plan file and datalist, the profile's overrides, then the arm's (later ones
    win), the budget and the seed."""
    p = args.profile
    return {"progress_bar": "False", "plan_file": str(plan_file), "datalist": dataset["datalist"],
            **accuracy_study.parse_overrides(p.extra), "val_interval": str(min(p.val_interval, p.epochs)),
            **accuracy_study.parse_overrides(arm_overrides), "max_epochs": str(p.epochs), "seed": str(seed)}


def plan_runs(method: Method, task: str, plan_file: Path, dataset: dict, args: argparse.Namespace) -> list[Run]:
    """The runs of one method and task (only the arms of --arm when given), the arms of one seed neighbours (side by
    side under the same load)."""
    arms = {arm: overrides for arm, overrides in method.arms.items() if arm in (args.arm or method.arms)}
    return [Run(task, arm, seed, args.out / "runs" / method.name / task / arm / f"seed{seed}", Path(dataset["path"]),
                run_overrides(args, overrides, seed, plan_file, dataset))
            for seed in args.profile.seeds for arm, overrides in arms.items()]


def run_benchmark(method: Method, args: argparse.Namespace) -> dict:
    """scripts/benchmark.py on the method's arms, once: its JSON is kept under --out and reused by a rerun."""
    path = args.out / "benchmarks" / f"{method.name}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--method", method.name,
                   "--against", method.compare_against, *args.profile.benchmark,
                   *(["--extra", args.extra] if args.extra else []), "--json", str(path.with_suffix(".partial"))]
        print(f"benchmark {method.name}: {shlex.join(command)}", flush=True)
        with (path.parent / f"{method.name}.log").open("w") as log:
            code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise SystemExit(f"benchmark {method.name} failed (exit {code}); its output: {path.parent}/"
                             f"{method.name}.log")
        path.with_suffix(".partial").rename(path)  # only a finished benchmark counts as done
    return json.loads(path.read_text())


def cost_summary(method: Method, bench: dict) -> dict:
    """The method arm's step-time, memory and inference numbers from benchmark.py's JSON, as ratios against the
    ``compare_against`` arm (the benchmark's --against)."""
    if bench["against"] != method.compare_against:
        raise ValueError(f"{method.name}: the benchmark's ratios are against {bench['against']!r}, the registry "
                         f"compares with {method.compare_against!r}; delete the benchmark's JSON to rerun it")
    ours, theirs = bench["arms"][method.method_arm], bench["arms"][method.compare_against]
    return {"against": method.compare_against, "step_ratio": ours["step_ratio"],
            "step_target": method.step_ratio_target, "memory_ratio": ours["memory_ratio"],
            "backbone": ours["backbone"], "wall_s": bench["wall_s"],
            "inference_ms": {"method": ours["inference_ms"], "against": theirs["inference_ms"]},
            "inference_ratio": ours["inference_ratio"],
            "inference_max_abs_difference": ours["inference_max_abs_difference"]}


def validation_curve(log: Path) -> list[tuple[int, float]]:
    """(epoch, val_mean_dice) from a training log's ``Epoch[N] Metrics -- ... val_mean_dice: X`` lines; for ReSeg's
    two stages only the segmentation stage validates."""
    pattern = re.compile(r"Epoch\[(\d+)\] Metrics -- .*val_mean_dice: ([-\d.]+)")
    return [(int(m[1]), float(m[2])) for line in log.read_text().splitlines() if (m := pattern.search(line))]


def per_case_rows(method: Method, report: dict) -> list[dict]:
    rows = []
    for run in report["runs"]:
        for case in run["cases"]:
            row = {"method": method.name, "task": run["task"], "arm": run["arm"], "seed": run["seed"],
                   "case": case["case"]}
            for metric in ("dice", "hd95"):
                row.update({f"{metric}_{column}": value for column, value in case[metric].items()})
            rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def mean_column(report: dict, task: str) -> str:
    """The column of the mean over foreground classes: "mean", or the class itself when there is only one (the
    accuracy study then has no separate mean column)."""
    classes = report["datasets"][task]["classes"]
    return "mean" if len(classes) > 1 else classes[0]


def arm_stats(report: dict, task: str, arm: str, metric: str) -> dict:
    """Mean and spread over seeds of the per-seed mean over cases of the class-mean ``metric``."""
    return report["aggregates"][task][arm]["over_seeds"][metric][mean_column(report, task)]


def plot_dice(studies: dict[str, dict], path: Path) -> None:
    """Mean Dice per arm and task, the bar at the mean over seeds, the error bar one std of the per-seed means, the
    dots each seed."""
    panels = [(name, task) for name, report in studies.items() for task in report["settings"]["tasks"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, task) in zip(axes[0], panels, strict=True):
        report = studies[name]
        arms = [a["name"] for a in report["settings"]["arms"]]
        for i, arm in enumerate(arms):
            stats = arm_stats(report, task, arm, "dice")
            ax.bar(i, stats["mean"] or 0, yerr=stats["std"] or 0, color=f"C{i}", alpha=0.6, capsize=4)
            seeds = [np.mean([c["dice"][mean_column(report, task)] for c in r["cases"]]) for r in report["runs"]
                     if r["task"] == task and r["arm"] == arm]
            ax.plot([i] * len(seeds), seeds, "k.", markersize=5)
        ax.set_xticks(range(len(arms)), arms, rotation=30)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}\n{task}", fontsize=9)
    axes[0][0].set_ylabel("held-out mean Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(studies: dict[str, dict], path: Path) -> None:
    """Validation mean Dice against epoch, one line per arm (mean over seeds of the epochs all seeds logged)."""
    panels = [(name, task) for name, report in studies.items() for task in report["settings"]["tasks"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (name, task) in zip(axes[0], panels, strict=True):
        report = studies[name]
        for i, arm in enumerate(a["name"] for a in report["settings"]["arms"]):
            curves = [dict(validation_curve(Path(r["bundle_root"]) / "train.log")) for r in report["runs"]
                      if r["task"] == task and r["arm"] == arm]
            epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            ax.plot(epochs, [np.mean([c[e] for c in curves]) for e in epochs], "o-", color=f"C{i}", label=arm)
        ax.set_title(f"{name}\n{task}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation mean Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_overlay(case: dict, predictions: dict[str, Path], foreground: Sequence[str], title: str,
                 path: Path) -> None:
    """Image, ground truth and each arm's prediction on one held-out case (``{"image", "label"}``)."""
    image, label = (demo.load_volume(Path(case[key])) for key in ("image", "label"))
    panels = {"ground truth": label, **{arm: demo.load_volume(p) for arm, p in predictions.items()}}
    for heading, volume in panels.items():
        if volume.shape != image.shape:
            raise ValueError(f"{title}: the {heading} volume has shape {volume.shape}, the image {image.shape}; "
                             "inference must write predictions on the input's grid")
    demo.draw_overlay(image, panels, foreground, title=title, png=path)


def paired_cases(report: dict, task: str, arm: str, against: str) -> list[dict]:
    """``arm`` − ``against`` held-out mean Dice for every seed and case both have: the paired differences."""
    column = mean_column(report, task)

    def scores(name: str) -> dict[tuple[int, str], float]:
        return {(r["seed"], c["case"]): c["dice"][column] for r in report["runs"]
                if r["task"] == task and r["arm"] == name for c in r["cases"]}

    ours, theirs = scores(arm), scores(against)
    return [{"seed": seed, "case": case, "method": ours[seed, case], "against": theirs[seed, case],
             "difference": ours[seed, case] - theirs[seed, case]}
            for seed, case in sorted(ours) if (seed, case) in theirs]


def paired_comparison(report: dict, task: str, arm: str, against: str) -> dict:
    """The paired differences of ``arm`` against ``against``, their bootstrap interval and the verdict."""
    pairs = paired_cases(report, task, arm, against)
    interval = paired_stats.crossed_bootstrap_interval([p["difference"] for p in pairs], [p["seed"] for p in pairs],
                                                       [p["case"] for p in pairs])
    return {"task": task, "arm": arm, "against": against, "pairs": pairs, "interval": vars(interval),
            "verdict": paired_stats.verdict(interval)}


def comparisons(method: Method, report: dict) -> list[dict]:
    """Every arm against the baseline and the method arm against its ``compare_against`` arm, per task."""
    arms = list(method.arms)
    pairs = [(arm, arms[0]) for arm in arms[1:]]
    if method.compare_against != arms[0]:
        pairs.append((method.method_arm, method.compare_against))
    return [paired_comparison(report, task, arm, against) for task in report["settings"]["tasks"]
            for arm, against in pairs]


def find_comparison(report: dict, task: str, arm: str, against: str) -> dict:
    return next(c for c in report["paired"] if (c["task"], c["arm"], c["against"]) == (task, arm, against))


def source_name(dataset: dict) -> str:
    return "your data" if dataset["source"] == "own" else accuracy_study.source_name(dataset)


def accuracy_table(method: Method, report: dict) -> list[list[str]]:
    baseline = report["settings"]["arms"][0]["name"]
    rows = []
    for task in report["settings"]["tasks"]:
        for arm in (a["name"] for a in report["settings"]["arms"]):
            dice = arm_stats(report, task, arm, "dice")
            hd95 = arm_stats(report, task, arm, "hd95")
            diff = "baseline" if arm == baseline else find_comparison(report, task, arm, baseline)["verdict"]
            cases = max(len(r["cases"]) for r in report["runs"] if r["task"] == task and r["arm"] == arm)
            rows.append([method.title, task, arm, accuracy_study.cell(dice, "dice"), diff,
                         accuracy_study.cell(hd95, "hd95"),
                         f"{dice['n'] + dice['not_finite']} seeds × {cases} held-out case(s)"])
    return rows


def baseline_lines(studies: dict[str, dict], methods: Sequence[Method]) -> list[str]:
    """Each baseline's held-out mean Dice beside the target its budget should bring it to, met or missed."""
    lines = []
    for method in methods:
        report = studies[method.name]
        for task in report["settings"]["tasks"]:
            dice = arm_stats(report, task, method.baseline_arm, "dice")
            target = report["targets"].get(task)
            if target is None:
                verdict = "no target given"
            else:
                need = f"target ≥ {target:.2f}"
                verdict = f"{need}: met" if dice["mean"] >= target else f"{need}: MISSED by {target - dice['mean']:.3f}"
            lines.append(f"- {method.title}, {task}: `{method.baseline_arm}` {accuracy_study.cell(dice, 'dice')}, "
                         f"{verdict}.")
    return lines


def paired_section(method: Method, report: dict) -> list[str]:
    """Per comparison: the paired differences seed by seed and case by case, the interval and the verdict."""
    lines = []
    for c in report["paired"]:
        interval = c["interval"]
        rows = [[str(p["seed"]), p["case"], f"{p['against']:.3f}", f"{p['method']:.3f}", f"{p['difference']:+.3f}"]
                for p in c["pairs"]]
        lines += [f"### {method.title}, {c['task']}: {c['arm']} − {c['against']}", "",
                  *accuracy_study.table(["seed", "held-out case", f"{c['against']} Dice", f"{c['arm']} Dice",
                                         "difference"], rows, 2),
                  "", f"Mean difference {interval['mean']:+.3f} over {interval['n']} pairs: **{c['verdict']}**.", ""]
    return lines


def cost_rows(method: Method, cost: dict) -> list[str]:
    step, target, versus = cost["step_ratio"], cost["step_target"], cost["against"]
    verdict = "met" if step <= target else f"MISSED by {step - target:.2f}"
    memory = "–" if cost["memory_ratio"] is None else f"{cost['memory_ratio']:.2f}"
    ms = cost["inference_ms"]
    within = "within 5 %" if abs(cost["inference_ratio"] - 1) <= 0.05 else "NOT within 5 %"
    same = "same logits" if cost["inference_max_abs_difference"] == 0 else (
        f"max logit difference {cost['inference_max_abs_difference']:.3g}")
    inference = (f"{ms['method'] / 1000:.2f} s vs {ms['against'] / 1000:.2f} s per volume, ratio "
                 f"{cost['inference_ratio']:.3f} ({within}); {same} as the training network")
    return [method.title, cost["backbone"], f"{step:.2f} vs {versus} (target ≤ {target:.2f}: {verdict})", memory,
            inference]


def headline(studies: dict[str, dict], methods: Sequence[Method]) -> list[str]:
    """One row per method and task: baseline and method mean Dice and the verdict on their paired difference."""
    rows = []
    for method in methods:
        report = studies[method.name]
        base_arm = method.baseline_arm
        for task in report["settings"]["tasks"]:
            base = arm_stats(report, task, base_arm, "dice")["mean"]
            ours = arm_stats(report, task, method.method_arm, "dice")["mean"]
            verdict = find_comparison(report, task, method.method_arm, base_arm)["verdict"]
            rows.append([method.title, task, f"{base:.3f} ({base_arm})", f"{ours:.3f}", verdict])
    return accuracy_study.table(["method", "task", "baseline Dice", "method Dice",
                                 "method − baseline (paired, 95 % CI)"], rows, 2)


def task_descriptions(studies: dict[str, dict]) -> dict[str, str]:
    """Each task's dataset description, once (SemSim's one-labeled-slab datasets say so in theirs)."""
    return {f"{task} ({name})" if report["settings"]["labeled"] else task: dataset["description"]
            for name, report in studies.items() for task, dataset in report["datasets"].items()}


def target_lines(studies: dict[str, dict], methods: Sequence[Method]) -> list[str]:
    """Each accuracy target of the registry (the method arm's Dice gain over its ``compare_against`` arm), met or
    missed by the mean paired difference, with the verdict of its interval (the cost targets are in the cost
    table)."""
    lines = []
    for method in methods:
        report = studies[method.name]
        ours, against, need = method.method_arm, method.compare_against, method.dice_gain_target
        for task in report["settings"]["tasks"]:
            c = find_comparison(report, task, ours, against)
            gain = c["interval"]["mean"]
            met = "met" if gain >= need else f"MISSED by {need - gain:.3f}"
            lines.append(f"- {method.title}, {task}: {ours} − {against} = {gain:+.3f} mean Dice, target ≥ "
                         f"{need:+.3f}: {met}; {c['verdict']}.")
    return lines


def plan_lines(studies: dict[str, dict]) -> list[str]:
    """The plan's settings of each dataset, with the profile's overrides over them: what every run trained with."""
    keys = ("spacing", "roi_size", "batch_size", "num_samples", "iterations_per_epoch")
    return [f"  - `{task}` ({name}): " + ", ".join(f"{k} {settings[k]}" for k in keys)
            for name, report in studies.items() for task, settings in report["plans"].items()]


def machine_line(studies: dict[str, dict]) -> str:
    """The machine, and the range of its load while the runs were timed (other jobs may share the CPU): at the
    comparison's start and end and at each run's training and inference start and end."""
    machines = [r["machine"] for r in studies.values()]
    loads = [m[key] for m in machines for key in ("load_average_1min_at_start", "load_average_1min_at_end")]
    loads += [load for report in studies.values() for run in report["runs"] for load in run["load_average_1min"]]
    m = machines[0]
    device = f"CUDA {m['cuda_device']}" if m["cuda_device"] else "no GPU"
    return (f"{m['cpu']} ({m['cpu_cores']} cores), {device}, torch {m['torch']}; 1-min load average "
            f"{min(loads):.1f}-{max(loads):.1f} while the runs were timed "
            f"({len(loads)} samples: the comparison's start and end, each run's steps' starts and ends)")


def run_minutes(studies: dict[str, dict]) -> float:
    """Training and inference wall time of every run, as each run recorded it when it ran."""
    return sum((r["train_s"] or 0) + (r["infer_s"] or 0) for report in studies.values() for r in report["runs"]) / 60


def runs_span(studies: dict[str, dict]) -> tuple[float, int] | None:
    """Seconds from the first run's start to the last run's end, and the most runs that overlapped, from the clock
    times every run recorded; ``None`` when a run has none (recorded before 0.6.3). Unlike one invocation's wall
    time this also holds when the seeds were split over several invocations, one per core."""
    runs = [r for report in studies.values() for r in report["runs"]]
    if not runs or any(r.get("started") is None or r.get("finished") is None for r in runs):
        return None
    # a start sorts after an end at the same instant, so back-to-back runs do not count as overlapping
    events = sorted([(r["started"], 1) for r in runs] + [(r["finished"], -1) for r in runs])
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    return max(r["finished"] for r in runs) - min(r["started"] for r in runs), most


def wall_time_line(studies: dict[str, dict], costs: dict[str, dict], runs_wall_s: float, parallel: int,
                   wall_s: float) -> str:
    span, summed = runs_span(studies), run_minutes(studies)
    runs = (f"{span[0] / 60:.0f} min for the runs, from the first's start to the last's end ({summed:.0f} min summed "
            f"over them, at most {span[1]} at a time)" if span else
            f"{runs_wall_s / 60:.0f} min for the runs ({summed:.0f} min summed over them, {parallel} at a time)")
    return (f"- Wall time: {runs}, {benchmark_minutes(costs):.0f} min of benchmarks; this invocation "
            f"{wall_s / 60:.1f} min (finished runs and benchmarks are reused, not re-timed).")


def benchmark_minutes(costs: dict[str, dict]) -> float:
    return sum(cost["wall_s"] for cost in costs.values()) / 60


def command_line(args: argparse.Namespace) -> str:
    """The command that writes this report, as a user would type it."""
    p = args.profile
    words = ["python", "scripts/compare_methods.py", "--profile", args.profile_name, "--epochs", str(p.epochs),
             "--seeds", *map(str, p.seeds)]
    if args.dataset_dir is not None:
        words += ["--dataset_dir", str(args.dataset_dir)]
    if args.target is not None:
        words += ["--target", str(args.target)]
    if args.extra:
        words += ["--extra", args.extra]
    for method in (args.methods if len(args.methods) < len(METHODS) else []):
        words += ["--method", method.name]
    return shlex.join(words)


def report_text(args: argparse.Namespace, studies: dict[str, dict], costs: dict[str, dict],
                images: dict[str, list[str]], runs_wall_s: float, wall_s: float) -> str:
    p = args.profile
    sources = sorted({source_name(d) for r in studies.values() for d in r["datasets"].values()})
    lines = [
        f"# Method comparison (`{args.profile_name}` profile)",
        "",
        f"Written by `{command_line(args)}`; per-case numbers in [`per_case.csv`](per_case.csv), everything in "
        "[`summary.json`](summary.json).",
        "",
        f"- Machine: {machine_line(studies)}.",
        f"- Data ({' and '.join(sources)}), scored on the held-out cases only, at each test image's own "
        "resolution (the bundle's `inference.json`, its predictions inverted to the image's grid):",
        *[f"  - `{task}`: {description}" for task, description in task_descriptions(studies).items()],
        f"- Budget, the same for every arm of a task: {p.epochs} epochs per run, seeds "
        f"{', '.join(map(str, p.seeds))} (paired: every arm trains with each seed), `{p.extra}` for every run over "
        "the plan step's settings (`configs/plan.json`), which are:",
        *plan_lines(studies),
        *([f"  {p.caveat}"] if p.caveat else []),
        wall_time_line(studies, costs, runs_wall_s, p.parallel, wall_s),
        "",
        "## Baseline against its target (held-out mean Dice, mean ± std over seeds)",
        "",
        "A method's effect is measured on a baseline trained to its target; a baseline below it makes the "
        "comparison one of undertrained models.",
        "",
        *baseline_lines(studies, args.methods),
        "",
        "## Accuracy (held-out mean Dice and HD95: mean ± std over seeds of the per-seed mean over cases)",
        "",
        "The difference column is the mean of the paired differences (method − baseline, per seed and held-out "
        f"case) with a bootstrap {paired_stats.LEVEL:.0%} interval ({paired_stats.RESAMPLES} resamples, numpy seed "
        f"{paired_stats.SEED}, of the seeds and the held-out cases, each with replacement and independently: the "
        "differences of one seed share a model and those of one case an image); where the interval spans 0 it says "
        f"\"{paired_stats.NO_EFFECT}\".".replace("%", " %"),
        "",
        *accuracy_study.table(["method", "task", "arm", "Dice", "Dice − baseline (paired, 95 % CI)", "HD95 (mm)",
                               "behind each number"],
                              [row for m in args.methods for row in accuracy_table(m, studies[m.name])], 3),
        "",
        "Targets (the method registry's): each method's mean Dice gain over the arm it is compared with, on every "
        "task:",
        "",
        *target_lines(studies, args.methods),
        "",
        "## Paired differences (held-out mean Dice, per seed and case)",
        "",
        *[line for m in args.methods for line in paired_section(m, studies[m.name])],
        "## Cost (training step and memory: method / the arm it is compared with, median of interleaved paired "
        "steps; inference: sliding window over a whole volume)",
        "",
        *accuracy_study.table(["method", "backbone", "training step", "peak memory ratio", "inference"],
                              [cost_rows(m, costs[m.name]) for m in args.methods], 2),
        "",
        "Cost numbers come from `scripts/benchmark.py` on each method's arms, built by the bundle's own configs "
        f"(options: `{shlex.join(p.benchmark)}`; 1 torch thread). The bundles' docs explain the misses as far as "
        "known.",
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})" for group in images.values() for name in group],
        "",
        HOW_TO,
    ]
    return "\n".join(lines)


# A report's line in the README block: "- [docs/results/x/README.md](docs/results/x/README.md): SelfReg, ReSeg".
REPORT_LINE = re.compile(r"^- \[(?P<link>[^\]]+)\]\((?P=link)\): (?P<titles>.+)$")


def _row_key(row: str) -> tuple[str, str]:
    """A headline row's method and task."""
    method, task = [cell.strip() for cell in row.strip().strip("|").split("|")][:2]
    return method, task


def update_readme(readme: Path | None, table: list[str], results: Path, titles: Sequence[str]) -> bool:
    """Merge the headline table into the block between the README's markers; False if it has no markers.

    The block gathers the reports of several invocations (one per method or task, as 2 cores allow): this
    invocation's rows (``titles``' methods, tasks) replace the rows of the same method and task, and its report's
    line replaces the line of the same report file; the rows of a method whose report was overwritten go with it."""
    if readme is None or not readme.is_file():
        return False
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    block, tail = rest.split(README_END, 1)
    link = os.path.relpath(results / "README.md", readme.parent)
    reports = {m["link"]: m["titles"] for m in map(REPORT_LINE.match, block.splitlines()) if m}
    reports.pop(link, None)
    reported = {title.strip() for titles_line in reports.values() for title in titles_line.split(",")}
    reports[link] = ", ".join(titles)
    new_rows = {_row_key(row): row for row in table[2:]}
    rows = [row for row in block.splitlines() if row.startswith("|")][2:]
    kept = [row for row in rows if _row_key(row) in new_rows or _row_key(row)[0] in reported]
    merged = [new_rows.pop(_row_key(row), row) for row in kept]
    lines = [*table[:2], *merged, *new_rows.values(), "", "Full reports:", "",
             *[f"- [{path}]({path}): {names}" for path, names in reports.items()]]
    readme.write_text(head + "\n".join([README_START, *lines, README_END]) + tail)
    return True


def prepare(args: argparse.Namespace) -> tuple[dict, dict, list[tuple[Method, Run]]]:
    """Every dataset checked, then planned (all before any training); the runs. Returns ({(method, task):
    dataset}, {(method, task): plan file}, [(method, run)])."""
    datasets = {(m.name, task): task_dataset(m, task, args) for m in args.methods for task in method_tasks(m, args)}
    plans: dict[tuple[str, str], Path] = {}
    jobs: list[tuple[Method, Run]] = []
    for method in args.methods:
        for task in method_tasks(method, args):
            dataset = datasets[method.name, task]
            print(f"{method.name} / {task} ({source_name(dataset)}): {len(dataset['test'])} held-out case(s); "
                  "plan step", flush=True)
            plans[method.name, task] = comparison_runs.run_plan(method.bundle_dir, args.out / "plans" / method.name /
                                                                task, dataset)
            jobs += [(method, run) for run in plan_runs(method, task, plans[method.name, task], dataset, args)]
    return datasets, plans, jobs


def build_study(method: Method, args: argparse.Namespace, datasets: dict, plans: dict, jobs: list,
                records: dict, machine: dict) -> dict:
    """One method's runs as the report reads them: settings, data, plans, runs with their scored cases,
    aggregates over seeds, and the paired comparisons."""
    runs = [run for m, run in jobs if m.name == method.name]
    tasks = method_tasks(method, args)
    by_arm: dict[str, dict[str, dict[int, list[dict]]]] = {}
    for run in runs:
        by_arm.setdefault(run.task, {}).setdefault(run.arm, {})[run.seed] = records[run]["cases"]
    arms = list(method.arms)
    classes = {task: datasets[method.name, task]["classes"] for task in tasks}
    study = accuracy_study.json_safe({
        "settings": {"bundle": method.bundle, "arms": [{"name": a, "overrides": o} for a, o in method.arms.items()],
                     "tasks": tasks, "seeds": list(args.profile.seeds), "epochs": args.profile.epochs,
                     "extra": args.profile.extra, "labeled": method.labeled,
                     "training": {"configs": method.training.configs, "run_id": method.training.run_id}},
        "machine": {**machine, "load_average_1min_at_end": os.getloadavg()[0]},
        "datasets": {task: datasets[method.name, task] for task in tasks},
        "plans": {task: comparison_runs.effective_settings(plans[method.name, task], runs[0].overrides)
                  for task in tasks},
        "targets": {task: baseline_target(method, task, args) for task in tasks},
        "runs": [{"task": run.task, "arm": run.arm, "seed": run.seed, "bundle_root": str(run.root),
                  "overrides": run.overrides, "resumed": records[run]["resumed"], "train_s": records[run]["train_s"],
                  "infer_s": records[run]["infer_s"], "load_average_1min": records[run].get("load_average_1min", []),
                  "started": records[run].get("started"), "finished": records[run].get("finished"),
                  "cases": records[run]["cases"]} for run in runs],
        "aggregates": {task: {arm: accuracy_study.aggregate_arm(by_arm[task][arm], classes[task]) for arm in arms}
                       for task in tasks},
    })
    study["paired"] = comparisons(method, study)
    return study


def write_overlays(studies: dict[str, dict], args: argparse.Namespace) -> list[str]:
    """Each method and task: the first seed's prediction of every arm on the first held-out case."""
    names = []
    for method in args.methods:
        report = studies[method.name]
        seed = report["settings"]["seeds"][0]
        for task, dataset in report["datasets"].items():
            case = dataset["test"][0]
            name = comparison_runs.recipe_benchmark.case_name(Path(case["image"]))
            predictions = {r["arm"]: comparison_runs.recipe_benchmark.find_prediction(
                Path(r["bundle_root"]) / "predictions", name) for r in report["runs"]
                if r["task"] == task and r["seed"] == seed}
            png = f"overlay_{method.name}_{task}.png"
            plot_overlay(case, predictions, dataset["classes"],
                         f"{method.title}, {task}: seed {seed}, held-out {name}", args.results / png)
            names.append(png)
    return names


def main(argv: Sequence[str] | None = None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    claim_output(args.out)
    try:
        datasets, plans, jobs = prepare(args)
    except DatasetInputError as e:
        raise SystemExit(str(e)) from e
    p = args.profile
    estimate = comparison_runs.estimate_seconds(jobs, plans, datasets, p.epochs, p.seconds_per_voxel,
                                                p.run_overhead_s, p.parallel)
    print(f"{len(jobs)} runs ({len(args.methods)} method(s) x their tasks x arms x {len(p.seeds)} seeds) of "
          f"{p.epochs} epochs, {p.parallel} at a time: estimated {estimate / 60:.0f} min (plus the benchmarks; "
          f"{p.seconds_per_voxel:g} s per crop voxel per step, {p.run_overhead_s:.0f} s more per run)", flush=True)
    if args.estimate:
        return
    machine = accuracy_study.machine_info()
    ran_none = all((run.root / comparison_runs.SCORES).is_file() for _, run in jobs)
    runs_start = time.perf_counter()
    records = comparison_runs.run_all(jobs, datasets, p.parallel)
    runs_wall_s = time.perf_counter() - runs_start
    if args.arm:
        print(f"trained {len(jobs)} run(s) of the arm(s) {args.arm} under {args.out / 'runs'}; no report (it needs "
              "every arm: run again without --arm, which keeps these runs)")
        return
    earlier = args.results / "summary.json"
    if ran_none and earlier.is_file():
        # Only the report is rewritten: the wall time and the machine's load of the invocation that ran the runs
        # are what they cost and what they ran beside.
        previous = json.loads(earlier.read_text())
        runs_wall_s = previous.get("runs_wall_s", runs_wall_s)
        machine = next((r["machine"] for r in previous.get("accuracy", {}).values() if "machine" in r), machine)
    studies = {m.name: build_study(m, args, datasets, plans, jobs, records, machine) for m in args.methods}
    costs = {m.name: cost_summary(m, run_benchmark(m, args)) for m in args.methods}

    args.results.mkdir(parents=True, exist_ok=True)
    rows = [row for m in args.methods for row in per_case_rows(m, studies[m.name])]
    write_csv(rows, args.results / "per_case.csv")
    plot_dice(studies, args.results / "dice.png")
    plot_curves(studies, args.results / "validation_curves.png")
    images = {"summary": ["dice.png", "validation_curves.png"], "overlays": write_overlays(studies, args)}
    wall_s = time.perf_counter() - start
    kept = ("settings", "machine", "datasets", "plans", "targets", "aggregates", "paired")
    summary = {"profile": args.profile_name, "settings": vars(p), "costs": costs,
               "accuracy": {name: {k: r[k] for k in kept} for name, r in studies.items()},
               "runs_wall_s": runs_wall_s, "wall_s": wall_s}
    (args.results / "summary.json").write_text(json.dumps(accuracy_study.json_safe(summary), indent=2) + "\n")
    (args.results / "README.md").write_text(report_text(args, studies, costs, images, runs_wall_s, wall_s))
    table = headline(studies, args.methods)
    updated = update_readme(args.readme, table, args.results, [m.title for m in args.methods])
    print("\n" + "\n".join(table))
    print(f"\nreport: {args.results / 'README.md'}" + (f"; headline table in {args.readme}" if updated else ""))


if __name__ == "__main__":
    main()
