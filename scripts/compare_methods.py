"""Compare every method bundle against its zero-weight baseline, in one command, and write the report.

For each method of the registry (``bundles/methods/<method>/method.json``: its arms, tasks, training stages, the
arm it is measured against and its targets) this

1. trains every arm on the real-MRI tasks of ``scripts/make_dataset.py`` (brain extraction on held-out heads and
   bg/GM/WM tissue on disjoint MNI slabs; SemSim: both with one labeled case plus the unlabeled pool), over several
   seeds, and evaluates the held-out cases, through ``scripts/accuracy_study.py``: the bundle's own configs
   run by ``python -m monai.bundle run`` with overrides only;
2. measures the training-step time, its peak memory and the sliding-window inference time of every arm with
   ``scripts/benchmark.py`` (the bundle's own configs; ratios against the method's ``compare_against`` arm from one
   interleaved run);
3. runs each arm's seed-0 model through the bundle's ``configs/inference.json`` on the held-out case, for overlays;
4. writes ``docs/results/``: ``README.md`` (tables: Dice and HD95 mean and spread per method, arm and task, the
   cost ratios and inference time per volume, each against its target), ``per_case.csv`` (every case of every run),
   ``summary.json``, and PNG plots: Dice per arm with its spread, validation-Dice curves, overlays; and the
   headline table of the top README between its ``results`` markers.

Everything is resumable: finished runs, benchmarks and predictions are kept under ``--out`` and not recomputed, a
half-finished training resumes from its checkpoint.

    python scripts/compare_methods.py --profile cpu           # ~1 h on 2 CPU cores (small crops and budgets)
    python scripts/compare_methods.py --profile gpu           # paper-sized crops and budgets, AMP, one GPU
    python scripts/compare_methods.py --profile smoke --task synthetic --method selfreg --results /tmp/r  # tests
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
import demo  # noqa: E402
import method_registry  # noqa: E402
from method_registry import Method  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
# The crop, grid and optimiser settings every run of a profile shares (each bundle's own defaults otherwise).
CPU_EXTRA = ("--learning_rate 2e-3 --num_samples 2 --spacing [2.0,2.0,2.0] --roi_size [32,32,16] "
             "--num_workers 0 --iterations_per_epoch 0")
GPU_EXTRA = "--num_samples 2 --spacing [1.0,1.0,1.0] --roi_size [96,96,96] --num_workers 4"


@dataclass(frozen=True)
class Profile:
    """A budget: epochs per run, the validation interval, the shared overrides, seeds, runs side by side, and the
    options of ``scripts/benchmark.py`` (the same for every method)."""

    epochs: int
    val_interval: int
    extra: str
    seeds: tuple[int, ...]
    parallel: int
    benchmark: tuple[str, ...]
    caveat: str = ""


PROFILES = {
    # Sized for 60 minutes on 2 cores (docs/results/README.md has the measured wall time); the benchmark's --small
    # networks (half-width backbones, the registry's small_run) at the CPU profile's crop.
    "cpu": Profile(epochs=24, val_interval=8, extra=CPU_EXTRA, seeds=(0, 1, 2), parallel=2,
                   benchmark=("--device", "cpu", "--iters", "5", "--warmup", "1", "--small", "--roi", "64", "64", "32"),
                   caveat="This is a CPU budget of a few dozen optimiser steps per run on small crops, far below "
                          "the papers' and below the longer studies in each bundle's docs: it shows what each method "
                          "does to a briefly trained baseline, not what it does at convergence."),
    # The papers' crops and the bundles' own learning rates, with AMP (the bundles turn it on with CUDA).
    "gpu": Profile(epochs=300, val_interval=10, extra=GPU_EXTRA, seeds=(0, 1, 2), parallel=1,
                   benchmark=("--device", "cuda", "--iters", "20", "--warmup", "5", "--roi", "96", "96", "96")),
    # For tests: one epoch, one seed, tiny crops.
    "smoke": Profile(epochs=1, val_interval=1,
                     extra="--learning_rate 2e-3 --num_samples 1 --spacing [1.5,1.5,1.5] --roi_size [24,24,24] "
                           "--num_workers 0 --iterations_per_epoch 0",
                     seeds=(0,), parallel=1,
                     benchmark=("--device", "cpu", "--iters", "1", "--warmup", "0", "--small", "--roi", "16", "16",
                                "16", "--volume", "24", "24", "24")),
}
METHODS = method_registry.all_methods()
METHOD_NAMES = tuple(m.name for m in METHODS)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=tuple(PROFILES), default="cpu")
    parser.add_argument("--method", action="append", choices=METHOD_NAMES, help="repeat (default: all)")
    parser.add_argument("--task", action="append", choices=accuracy_study.TASKS,
                        help="repeat (default: each method's real-MRI tasks)")
    parser.add_argument("--out", type=Path, help="runs, benchmarks and predictions (default "
                                                  "study_output/comparison_<profile>)")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results",
                        help="where the report goes (default docs/results)")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md",
                        help=f"README whose {README_START} ... {README_END} block gets the headline table "
                             "(default the repository's; a README without the markers is left alone)")
    parser.add_argument("--data-cache", default=None, help="download cache for the MRI volumes")
    args = parser.parse_args(argv)
    args.methods = [m for m in METHODS if m.name in (args.method or METHOD_NAMES)]
    args.profile_name, args.profile = args.profile, PROFILES[args.profile]
    args.out = (args.out or REPO / "study_output" / f"comparison_{args.profile_name}").resolve()
    args.results = args.results.resolve()
    return args


def method_tasks(method: Method, args: argparse.Namespace) -> list[str]:
    """--task replaces every method's own tasks (``synthetic`` for tests)."""
    return list(args.task or method.tasks)


def study_argv(method: Method, tasks: Sequence[str], args: argparse.Namespace) -> list[str]:
    """accuracy_study.py's command line for one method: its arms, tasks and the profile's budget."""
    p = args.profile
    argv = ["--bundle", method.bundle, "--epochs", str(p.epochs), "--seeds", *map(str, p.seeds),
            "--extra", f"{p.extra} --val_interval {p.val_interval}", "--parallel", str(p.parallel),
            "--out", str(args.out / "runs" / method.name), "--train-configs", *method.training.configs,
            "--train-run-id", method.training.run_id]
    for name, overrides in method.arms.items():
        argv += ["--arm", f"{name}={overrides}"]
    for task in tasks:
        argv += ["--task", task]
    if method.labeled:
        argv += ["--labeled", str(method.labeled)]
    if args.data_cache:
        argv += ["--data-cache", args.data_cache]
    if args.task and "synthetic" in args.task:
        argv += ["--synthetic-size", "24"]
    return argv


def run_benchmark(method: Method, args: argparse.Namespace) -> dict:
    """scripts/benchmark.py on the method's arms, once: its JSON is kept under --out and reused by a rerun."""
    path = args.out / "benchmarks" / f"{method.name}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--method", method.name,
                   "--against", method.compare_against, *args.profile.benchmark,
                   "--json", str(path.with_suffix(".partial"))]
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


def predict(method: Method, report: dict, args: argparse.Namespace) -> dict[str, dict[str, Path]]:
    """Seed-0 predictions of every arm on each task's first held-out case, by the bundle's inference config; kept
    under --out. Returns {task: {arm: prediction NIfTI}}."""
    seed = report["settings"]["seeds"][0]
    predictions: dict[str, dict[str, Path]] = {}
    for task, dataset in report["datasets"].items():
        data = Path(dataset["path"])
        case = json.loads((data / "dataset.json").read_text())["test"][0]
        name = accuracy_study.case_name(case["image"])
        for run in (r for r in report["runs"] if r["task"] == task and r["seed"] == seed):
            out = args.out / "predictions" / method.name / task / run["arm"]
            prediction = out / f"{name}_seg.nii.gz"
            if not prediction.is_file():
                overrides = {k: v for k, v in run["overrides"].items() if k in INFERENCE_KEYS}
                trained = accuracy_study.Run(task, run["arm"], seed, Path(run["bundle_root"]), data, overrides)
                # inference.json names the demo's classes; the network's output count follows the task's
                command = accuracy_study.bundle_command(["configs/inference.json"], trained, output_dir=str(out),
                                                        class_names=repr(["background", *dataset["classes"]]))
                out.parent.mkdir(parents=True, exist_ok=True)
                accuracy_study.run_step(command, REPO / "bundles" / method.bundle, os.environ.copy(),
                                        out.parent / f"{run['arm']}_inference.log")
            predictions.setdefault(task, {})[run["arm"]] = prediction
    return predictions


# Settings of a run that inference must share (the network and its grid); the rest are training-only.
INFERENCE_KEYS = ("spacing", "roi_size", "num_workers")


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


def paired_difference(report: dict, task: str, arm: str) -> dict:
    """Dice of ``arm`` minus the baseline's, paired by seed, over the class mean."""
    return report["differences"][task][arm]["dice"][mean_column(report, task)]


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


def plot_overlay(dataset: Path, predictions: dict[str, Path], foreground: Sequence[str], title: str,
                 path: Path) -> None:
    """Image, ground truth and each arm's prediction on the first held-out case."""
    case = json.loads((dataset / "dataset.json").read_text())["test"][0]
    image, label = (demo.load_volume(dataset / case[key]) for key in ("image", "label"))
    panels = {"ground truth": label, **{arm: demo.load_volume(p) for arm, p in predictions.items()}}
    for heading, volume in panels.items():
        if volume.shape != image.shape:
            raise ValueError(f"{title}: the {heading} volume has shape {volume.shape}, the image {image.shape}; "
                             "inference must write predictions on the input's grid")
    demo.draw_overlay(image, panels, foreground, title=title, png=path)


def accuracy_table(method: Method, report: dict) -> list[str]:
    baseline = report["settings"]["arms"][0]["name"]
    rows = []
    for task in report["settings"]["tasks"]:
        for arm in (a["name"] for a in report["settings"]["arms"]):
            dice = arm_stats(report, task, arm, "dice")
            hd95 = arm_stats(report, task, arm, "hd95")
            if arm == baseline:
                diff = "baseline"
            else:
                d = paired_difference(report, task, arm)
                verdict = "at or above" if d["mean"] is not None and d["mean"] >= 0 else "BELOW"
                diff = f"{accuracy_study.cell(d, 'dice', sign=True)} ({verdict} baseline)"
            cases = max(len(r["cases"]) for r in report["runs"] if r["task"] == task and r["arm"] == arm)
            rows.append([method.title, task, arm, accuracy_study.cell(dice, "dice"), diff,
                         accuracy_study.cell(hd95, "hd95"),
                         f"{dice['n'] + dice['not_finite']} seeds × {cases} held-out case(s)"])
    return rows


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
    """One row per method and task: baseline and method mean Dice and their paired difference."""
    rows = []
    for method in methods:
        report = studies[method.name]
        arms = [a["name"] for a in report["settings"]["arms"]]
        for task in report["settings"]["tasks"]:
            base = arm_stats(report, task, arms[0], "dice")["mean"]
            ours = arm_stats(report, task, arms[-1], "dice")["mean"]
            diff = paired_difference(report, task, arms[-1])
            rows.append([method.title, task, f"{base:.3f} ({arms[0]})", f"{ours:.3f}",
                         accuracy_study.cell(diff, "dice", sign=True)])
    return accuracy_study.table(["method", "task", "baseline Dice", "method Dice", "paired difference"], rows, 2)


def task_descriptions(studies: dict[str, dict]) -> dict[str, str]:
    """Each task's dataset description, once (SemSim's one-labeled-slab datasets say so in theirs)."""
    return {f"{task} ({name})" if report["settings"]["labeled"] else task: dataset["description"]
            for name, report in studies.items() for task, dataset in report["datasets"].items()}


def dice_gain(report: dict, task: str, arm: str, against: str) -> float | None:
    """Mean over seeds of ``arm``'s mean Dice minus ``against``'s, paired by seed (the study pairs every arm with
    its first, the baseline)."""
    ours = paired_difference(report, task, arm)
    if against == report["settings"]["arms"][0]["name"]:
        return ours["mean"]
    theirs = paired_difference(report, task, against)["per_seed"]
    return accuracy_study.summary(d - theirs[s] for s, d in ours["per_seed"].items() if s in theirs)["mean"]


def target_lines(studies: dict[str, dict], methods: Sequence[Method]) -> list[str]:
    """Each accuracy target of the registry (the method arm's Dice gain over its ``compare_against`` arm), met or
    missed and by how much (the cost targets are in the cost table)."""
    lines = []
    for method in methods:
        report = studies[method.name]
        ours, against, need = method.method_arm, method.compare_against, method.dice_gain_target
        for task in report["settings"]["tasks"]:
            gain = dice_gain(report, task, ours, against)
            verdict = "not measured" if gain is None else "met" if gain >= need else f"MISSED by {need - gain:.3f}"
            shown = "n/a" if gain is None else f"{gain:+.3f}"
            lines.append(f"- {method.title}, {task}: {ours} − {against} = {shown} mean Dice, target ≥ "
                         f"{need:+.3f}: {verdict}.")
    return lines


def machine_line(studies: dict[str, dict]) -> str:
    """The machine, and the range of its load while the runs were timed (other jobs may share the CPU)."""
    machines = [r["machine"] for r in studies.values()]
    loads = [m[key] for m in machines for key in ("load_average_1min_at_start", "load_average_1min_at_end")]
    m = machines[0]
    device = f"CUDA {m['cuda_device']}" if m["cuda_device"] else "no GPU"
    return (f"{m['cpu']} ({m['cpu_cores']} cores), {device}, torch {m['torch']}; 1-min load average "
            f"{min(loads):.1f}-{max(loads):.1f} while the runs were timed")


def run_minutes(studies: dict[str, dict]) -> float:
    """Training and evaluation wall time of every run, as each run recorded it when it ran."""
    return sum((r["train_s"] or 0) + (r["eval_s"] or 0) for report in studies.values() for r in report["runs"]) / 60


def benchmark_minutes(costs: dict[str, dict]) -> float:
    return sum(cost["wall_s"] for cost in costs.values()) / 60


def report_text(args: argparse.Namespace, studies: dict[str, dict], costs: dict[str, dict],
                images: dict[str, list[str]], wall_s: float) -> str:
    p = args.profile
    sources = sorted({accuracy_study.source_name(d) for r in studies.values() for d in r["datasets"].values()})
    lines = [
        f"# Method comparison (`{args.profile_name}` profile)",
        "",
        "Written by `python scripts/compare_methods.py --profile " + args.profile_name + "`; per-case numbers in "
        "[`per_case.csv`](per_case.csv), everything in [`summary.json`](summary.json).",
        "",
        f"- Machine: {machine_line(studies)}.",
        f"- Data ({' and '.join(sources)}), scored on held-out cases only:",
        *[f"  - `{task}`: {description}" for task, description in task_descriptions(studies).items()],
        f"- Budget: {p.epochs} epochs per run, validation every {p.val_interval}, seeds "
        f"{', '.join(map(str, p.seeds))}, `{p.extra}` for every run, each bundle's other defaults (SegResNet). "
        "Every number of a method is paired with its baseline trained on the same data, seeds and budget. "
        f"{p.caveat}",
        f"- Wall time: {sum(r['wall_s'] for r in studies.values()) / 60:.0f} min for the accuracy runs "
        f"({run_minutes(studies):.0f} min summed over the runs, {p.parallel} at a time), "
        f"{benchmark_minutes(costs):.0f} min of benchmarks; this invocation {wall_s / 60:.1f} min (finished runs "
        "and benchmarks are reused, not re-timed).",
        "",
        "## Accuracy (held-out mean Dice and HD95: mean ± std over seeds of the per-seed mean over cases)",
        "",
        *accuracy_study.table(["method", "task", "arm", "Dice", "Dice − baseline (paired by seed)", "HD95 (mm)",
                               "behind each number"],
                              [row for m in args.methods for row in accuracy_table(m, studies[m.name])], 3),
        "",
        "Targets (the method registry's): each method's mean Dice gain over the arm it is compared with, on every "
        "task:",
        "",
        *target_lines(studies, args.methods),
        "",
        "Where a row says BELOW, the method did not beat its baseline in this budget. With 3 seeds and one held-out "
        "case per task, a difference under about one std of the paired differences is not evidence either way.",
        "",
        "## Cost (training step and memory: method / the arm it is compared with, median of interleaved paired "
        "steps; inference: "
        "sliding window over a whole volume)",
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
    ]
    return "\n".join(lines)


def update_readme(readme: Path, table: list[str], results: Path) -> bool:
    """Replace the block between the README's markers with the headline table; False if it has no markers."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    link = os.path.relpath(results / "README.md", readme.parent)
    block = "\n".join([README_START, *table, "", f"Full report: [{link}]({link}).", README_END])
    head, rest = text.split(README_START, 1)
    readme.write_text(head + block + rest.split(README_END, 1)[1])
    return True


def main(argv: Sequence[str] | None = None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    studies: dict[str, dict] = {}
    for method in args.methods:
        tasks = method_tasks(method, args)
        print(f"\n=== {method.title}: {', '.join(tasks)} ===", flush=True)
        studies[method.name] = accuracy_study.main(study_argv(method, tasks, args))
    costs = {m.name: cost_summary(m, run_benchmark(m, args)) for m in args.methods}

    args.results.mkdir(parents=True, exist_ok=True)
    rows = [row for m in args.methods for row in per_case_rows(m, studies[m.name])]
    write_csv(rows, args.results / "per_case.csv")
    plot_dice(studies, args.results / "dice.png")
    plot_curves(studies, args.results / "validation_curves.png")
    images = {"summary": ["dice.png", "validation_curves.png"], "overlays": []}
    for method in args.methods:
        report = studies[method.name]
        for task, predictions in predict(method, report, args).items():
            dataset = report["datasets"][task]
            name = f"overlay_{method.name}_{task}.png"
            plot_overlay(Path(dataset["path"]), predictions, dataset["classes"],
                         f"{method.title}, {task}: seed {report['settings']['seeds'][0]}, first held-out case",
                         args.results / name)
            images["overlays"].append(name)
    wall_s = time.perf_counter() - start
    summary = {"profile": args.profile_name, "settings": vars(args.profile), "costs": costs,
               "accuracy": {name: {k: r[k] for k in ("settings", "machine", "datasets", "aggregates", "differences")}
                            for name, r in studies.items()},
               "wall_s": wall_s}
    (args.results / "summary.json").write_text(json.dumps(accuracy_study.json_safe(summary), indent=2) + "\n")
    text = report_text(args, studies, costs, images, wall_s)
    (args.results / "README.md").write_text(text)
    table = headline(studies, args.methods)
    updated = update_readme(args.readme, table, args.results)
    print("\n" + "\n".join(table))
    print(f"\nreport: {args.results / 'README.md'}" + (f"; headline table in {args.readme}" if updated else ""))


if __name__ == "__main__":
    main()
