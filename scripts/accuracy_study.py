"""Accuracy study: a method bundle against its own baseline arm, over several seeds, on held-out real MRI.

Every (task, arm, seed) run trains the bundle through its own CLI (``python -m monai.bundle run``) into its own
bundle_root under ``--out``, then evaluates the held-out test cases (``--eval_split test``). The report gives
per-case Dice per foreground class and HD95 (mm), their mean +- std over seeds and cases and over per-seed means,
and each method arm minus the baseline (the first ``--arm``) with the per-seed paired differences. It is written
as ``results.json`` (raw numbers, aggregates, settings, data source, machine, wall times) and ``results.md``
(tables for the docs), and the markdown is printed at the end. An interrupted study resumes: finished runs are
skipped and the bundle resumes a half-finished training from its checkpoint.

    python scripts/accuracy_study.py --bundle selfreg_segmentation \\
        --arm "baseline=--selfreg_weight 0" --arm "selfreg=--selfreg_weight 0.015"          # about an hour
    python scripts/accuracy_study.py --bundle selfreg_segmentation \\
        --arm "baseline=--selfreg_weight 0" --arm "selfreg=--selfreg_weight 0.015" --quick  # smoke test

Tasks are those of scripts/make_dataset.py: ``tissue`` and ``brain`` (real MRI, synthetic fallback; the report
says which) and ``synthetic`` (for tests).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# scripts/ is this script's folder, first on sys.path: its tools import as top-level modules
import make_dataset
import method_registry

REPO = Path(__file__).resolve().parents[1]
RUN_MARKER = ".made_by_accuracy_study"
TASKS = ("tissue", "brain", "synthetic")
DEFAULT_TASKS = ["tissue", "brain"]
DEFAULT_SEEDS = [0, 1, 2]
# Sized so that the full default study (2 tasks x 2 arms x 3 seeds = 12 runs, as 6 rounds of two runs side by
# side) takes about an hour on this repository's 2-core CPU, which other jobs share. Measured there (AMD EPYC,
# torch 2.13.0+cpu, SelfReg bundle, default --extra and --parallel 2) twice over 8 epochs, the slower arm of each
# pair (SelfReg costs <= 10 % more than the baseline), validation every 4th epoch included:
#   busier machine (load ~3): tissue 6.8 s/epoch, brain 9.8 s/epoch (its validation volume is a whole head);
#                             fixed per round (start-up, caching, test evaluation) 38 s tissue, 55 s brain;
#   quieter (load ~2):        tissue 4.4 s/epoch, brain 7.0 s/epoch; fixed 27 s and 51 s.
# A study costs 3 x (tissue + brain): 50 s (34 s) per epoch plus 4.7 (3.9) minutes, so 64 epochs take about
# 58 (40) minutes. A multiple of the validation interval, so that the last epoch is validated too.
DEFAULT_EPOCHS = 64
QUICK_EPOCHS = 2
# The demo's settings tuned for a 2-core CPU (scripts/demo.py): a learning rate that moves in few epochs, two
# crops per volume, whole-volume validation only every 4th epoch, the 2 mm grid and a crop that fits it, and no
# worker processes competing for the cores.
DEFAULT_EXTRA = (
    "--learning_rate 2e-3 --num_samples 2 --val_interval 4 --spacing [2.0,2.0,2.0] --roi_size [64,64,32] "
    "--num_workers 0 --iterations_per_epoch 0"
)
# Set by this tool for every run; an --extra or --arm that sets one is refused rather than silently overridden.
TOOL_KEYS = ("config_file", "meta_file", "logging_file", "bundle_root", "dataset_dir", "seed", "max_epochs",
             "eval_split")
TRAIN_CONFIGS = ("configs/train.json",)
EVAL_CONFIGS = ("configs/train.json", "configs/evaluate.json")
METRIC_FILES = {"dice": "eval/val_mean_dice_raw.csv", "hd95": "eval/val_hd95_raw.csv"}
RUN_RECORD = "study_run.json"
LOG_TAIL_LINES = 40
ARM_NAME = re.compile(r"^\w[\w.-]*$")  # an arm names a folder


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: dict[str, str]


# eq=False: hashed by identity (the overrides dict is unhashable), each run being planned once per study.
@dataclass(frozen=True, eq=False)
class Run:
    """One training + evaluation of the bundle; ``overrides`` are all the CLI settings but configs and paths."""

    task: str
    arm: str
    seed: int
    root: Path
    dataset: Path
    overrides: dict[str, str]

    @property
    def label(self) -> str:
        return f"{self.task} / {self.arm} / seed {self.seed}"


class RunFailed(Exception):
    """A bundle command exited non-zero; the message holds the command and its log's tail."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_overrides(text: str) -> dict[str, str]:
    """``"--key value --other=value"`` (shlex-split) as ``{key: value}``; values stay as the CLI gets them."""
    tokens = shlex.split(text)
    overrides: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise argparse.ArgumentTypeError(f"expected --key value pairs, got {token!r} in {text!r}")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(tokens):
            key, value = token[2:], tokens[i + 1]
            i += 2
        else:
            raise argparse.ArgumentTypeError(f"{token} has no value in {text!r}")
        if key in TOOL_KEYS:
            raise argparse.ArgumentTypeError(f"--{key} is set by the study for every run; leave it out of {text!r}")
        overrides[key] = value
    return overrides


def parse_arm(text: str) -> Arm:
    name, sep, overrides = text.partition("=")
    if not sep or not ARM_NAME.match(name):
        raise argparse.ArgumentTypeError(f"expected NAME=OVERRIDES with NAME a plain folder name, got {text!r}")
    return Arm(name, parse_overrides(overrides))


def registered_method(bundle: str) -> method_registry.Method | None:
    """The registry's method whose bundle is ``bundle`` (its arms, training stages and labeled count are the
    study's defaults), or None for a bundle outside the registry."""
    return next((m for m in method_registry.all_methods() if m.bundle == bundle), None)


def cpu_model() -> str:
    """The CPU's model name (Linux), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back below
    return platform.processor() or platform.machine()


def default_threads(parallel: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // parallel)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="folder name under bundles/, e.g. selfreg_segmentation")
    parser.add_argument("--arm", action="append", type=parse_arm, metavar="NAME=OVERRIDES",
                        help="an arm and its bundle CLI overrides; repeat; the first is the baseline (default: the "
                             "method registry's arms of the bundle)")
    parser.add_argument("--task", action="append", choices=TASKS, help="repeat (default: tissue and brain)")
    parser.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS, help="default 0 1 2")
    parser.add_argument("--epochs", type=positive_int, help=f"default {DEFAULT_EPOCHS} ({QUICK_EPOCHS} with --quick)")
    parser.add_argument("--extra", type=parse_overrides, default=DEFAULT_EXTRA,
                        help=f"bundle CLI overrides for every run (default: {DEFAULT_EXTRA!r})")
    parser.add_argument("--out", type=Path, help="output folder (default study_output/<bundle>[_quick])")
    parser.add_argument("--data-cache", default=None, help="download cache for the MRI volumes")
    parser.add_argument("--synthetic-size", type=positive_int, default=48,
                        help="edge length in voxels of synthetic volumes (task synthetic and the fallback)")
    parser.add_argument("--labeled", type=positive_int, default=None, metavar="N",
                        help="semi-supervised datasets: only the first N training cases keep their label, the others "
                             "are unlabeled (make_dataset.py --labeled; default: the registry's, for a method that "
                             "needs unlabeled images)")
    parser.add_argument("--parallel", type=positive_int, default=2,
                        help="training runs at once, each with OMP_NUM_THREADS = cores // N (default 2)")
    parser.add_argument("--train-configs", nargs="+", metavar="CONFIG",
                        help="the training's config files, in the bundle (default: the registry's training configs "
                             "of the bundle's method, else configs/train.json)")
    parser.add_argument("--train-run-id", help="the training's run id (default: the registry's, else run)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_EPOCHS} epochs, the first seed, the first task")
    args = parser.parse_args(argv)
    method = registered_method(args.bundle)
    if method is not None:
        args.arm = args.arm or [parse_arm(f"{name}={text}") for name, text in method.arms.items()]
        args.train_configs = args.train_configs or list(method.training.configs)
        args.train_run_id = args.train_run_id or method.training.run_id
        args.labeled = args.labeled or method.labeled
    args.arm = args.arm or []
    args.train_configs = args.train_configs or list(TRAIN_CONFIGS)
    args.train_run_id = args.train_run_id or "run"
    names = [arm.name for arm in args.arm]
    if len(names) < 2 or len(set(names)) != len(names):
        parser.error(f"give at least two --arm with distinct names (the first is the baseline), got {names}")
    if not (REPO / "bundles" / args.bundle / "configs" / "evaluate.json").is_file():
        parser.error(f"bundles/{args.bundle}/configs/evaluate.json not found: --bundle names a folder under bundles/")
    args.task = args.task or DEFAULT_TASKS
    for option, values in (("--seeds", args.seeds), ("--task", args.task)):
        if len(set(values)) != len(values):
            parser.error(f"{option} repeats a value (two runs would share a folder): {values}")
    if args.quick:
        args.task, args.seeds = args.task[:1], args.seeds[:1]
    args.epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    # A quick study has its own default folder: its runs would otherwise clash with the full study's.
    args.out = (args.out or REPO / "study_output" / (args.bundle + ("_quick" if args.quick else ""))).resolve()
    return args


def claim_output(out: Path) -> None:
    """Refuse a non-empty folder this tool did not create; mark the folder as the study's."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RUN_MARKER).is_file())):
        raise SystemExit(f"{out} exists and was not made by accuracy_study.py: move it away or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).write_text("written by scripts/accuracy_study.py; a rerun resumes the study in this folder\n")


def prepare_dataset(task: str, data_dir: Path, cache: str | None, size: int, labeled: int | None = None) -> dict:
    """Write the task's dataset once and record where it came from; a resumed study reuses both, so that all its
    runs see the same data even if the real volumes became (un)reachable in between. ``labeled``: keep the labels
    of the first N training cases only (a semi-supervised dataset, ``make_dataset.py --labeled``)."""
    record = data_dir.with_suffix(".json")
    if record.is_file():
        return json.loads(record.read_text())
    info = make_dataset.make_dataset(task, data_dir, cache_dir=cache, size=size, labeled=labeled)
    labels = json.loads((data_dir / "dataset.json").read_text())["labels"]
    dataset = {
        "task": task,
        "path": str(info.path),
        "source": info.source,
        "description": info.description,
        "classes": [labels[str(value)] for value in range(1, len(labels))],  # foreground, in label order
    }
    record.write_text(json.dumps(dataset, indent=2) + "\n")
    return dataset


def run_overrides(args: argparse.Namespace, arm: Arm, seed: int) -> dict[str, str]:
    """The settings of one run: the study's, then --extra, then the arm's (later ones win)."""
    overrides = {"progress_bar": "False", **args.extra, **arm.overrides, "max_epochs": str(args.epochs),
                 "seed": str(seed)}
    # At least one validation, which is what saves models/model.pt for the evaluation.
    if "val_interval" in overrides and int(overrides["val_interval"]) > args.epochs:
        overrides["val_interval"] = str(args.epochs)
    return overrides


def plan_runs(args: argparse.Namespace, datasets: dict[str, dict]) -> list[Run]:
    """All runs, ordered so that the arms of one (task, seed) are neighbours: with --parallel they run side by
    side under the same machine load, which keeps their wall times comparable."""
    return [
        Run(task, arm.name, seed, args.out / task / arm.name / f"seed{seed}", Path(datasets[task]["path"]),
            run_overrides(args, arm, seed))
        for task in args.task
        for seed in args.seeds
        for arm in args.arm
    ]


def check_resumable(run: Run) -> None:
    """Refuse to resume a run that an earlier invocation started with other settings: mixing them would make the
    report lie about what it compares."""
    record = run.root / RUN_RECORD
    if record.is_file() and json.loads(record.read_text())["overrides"] != run.overrides:
        raise SystemExit(f"{run.root} was started with other settings than this study's ({record}): "
                         "pass the same options as before, or another --out")


def is_done(run: Run) -> bool:
    return (run.root / METRIC_FILES["dice"]).is_file()


def bundle_command(configs: Sequence[str], run: Run, run_id: str = "run", **more: str) -> list[str]:
    """``python -m monai.bundle run RUN_ID`` as a user calls it from the bundle folder, with this run's settings."""
    config = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    settings = {"config_file": config, "meta_file": "configs/metadata.json", "logging_file": "configs/logging.conf",
                "bundle_root": str(run.root), "dataset_dir": str(run.dataset), **run.overrides, **more}
    command = [sys.executable, "-m", "monai.bundle", "run", run_id]
    for key, value in settings.items():
        command += [f"--{key}", value]
    return command


def run_step(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    """Run a bundle command with its output appended to ``log``; returns its wall time in seconds."""
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ {shlex.join(command)}\n")
        f.flush()
        returncode = subprocess.run(command, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        with log.open() as f:
            tail = "".join(deque(f, maxlen=LOG_TAIL_LINES))
        raise RunFailed(f"exit code {returncode}: {shlex.join(command)}\n--- last lines of {log}:\n{tail}")
    return time.perf_counter() - start


def execute(run: Run, bundle: Path, env: dict[str, str], train_configs: Sequence[str], train_run_id: str) -> dict:
    """Train, then evaluate the held-out test cases, unless an earlier invocation finished this run; returns the
    run's record (settings and wall times)."""
    record_path = run.root / RUN_RECORD
    if is_done(run):
        return json.loads(record_path.read_text())
    # models/ exists once a training started: the bundle then resumes from its checkpoint, and the wall time
    # measured here covers only the rest.
    record = {"overrides": run.overrides, "resumed": (run.root / "models").exists()}
    run.root.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    record["train_s"] = run_step(bundle_command(train_configs, run, train_run_id), bundle, env,
                                 run.root / "train.log")
    record["eval_s"] = run_step(bundle_command(EVAL_CONFIGS, run, eval_split="test"), bundle, env,
                                run.root / "eval.log")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_all(runs: list[Run], bundle: Path, parallel: int, threads: int, train_configs: Sequence[str],
            train_run_id: str) -> dict[Run, dict]:
    """Execute the runs, ``parallel`` at a time; a failed run does not stop the others (a rerun resumes), but the
    study then exits with the failures instead of a report."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONWARNINGS": "ignore"}
    records: dict[Run, dict] = {}
    failures: list[str] = []

    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:  # lines of runs finishing together would otherwise interleave
            print(text, flush=True)

    def one(index: int, run: Run) -> dict:
        if is_done(run):
            say(f"[{index}/{len(runs)}] {run.label}: done earlier, skipped")
            return execute(run, bundle, env, train_configs, train_run_id)
        say(f"[{index}/{len(runs)}] {run.label}: running (logs in {run.root})")
        record = execute(run, bundle, env, train_configs, train_run_id)
        say(f"[{index}/{len(runs)}] {run.label}: finished in {record['train_s'] + record['eval_s']:.0f} s")
        return record

    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(one, i, run): run for i, run in enumerate(runs, start=1)}
        for future in concurrent.futures.as_completed(futures):
            run = futures[future]
            try:
                records[run] = future.result()
            except RunFailed as exc:
                failures.append(f"{run.label}: {exc}")
    if failures:
        raise SystemExit("\n\n".join(["runs failed (rerun the same command to resume):", *failures]))
    return records


def case_name(filename: str) -> str:
    return Path(filename).name.removesuffix(".gz").removesuffix(".nii")


def read_per_case(path: Path, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{case: {class: value, ..., "mean": value}}`` from a MetricsSaver ``*_raw.csv`` (filename, one column per
    foreground class in label order, then a mean over classes).

    The mean is recomputed as a plain mean, NaN if any class is NaN: the CSV's is a nanmean, which would give a
    model that misses a class entirely (HD95 NaN) the HD95 of the classes it did predict."""
    with path.open() as f:
        header, *rows = list(csv.reader(f))
    if len(header) != len(classes) + 2:
        raise ValueError(f"{path}: columns {header} do not fit the foreground classes {list(classes)}")
    per_case = {}
    for row in rows:
        values = [float(v) for v in row[1:-1]]
        per_case[case_name(row[0])] = {**dict(zip(classes, values, strict=True)), "mean": float(np.mean(values))}
    return per_case


def per_case_rows(run: Run, classes: Sequence[str]) -> list[dict]:
    """One row per held-out case: ``{"case", "dice": {...}, "hd95": {...}}``."""
    metrics = {name: read_per_case(run.root / file, classes) for name, file in METRIC_FILES.items()}
    return [{"case": case, **{name: values[case] for name, values in metrics.items()}} for case in metrics["dice"]]


def summary(values: Iterable[float]) -> dict:
    """Mean and sample std (n - 1) of the finite values; HD95 is NaN when a class is not predicted at all, and
    such values are counted, not averaged."""
    array = np.asarray(list(values), dtype=float)
    finite = array[np.isfinite(array)]
    return {
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else None,
        "n": int(finite.size),
        "not_finite": int(array.size - finite.size),
    }


def columns(classes: Sequence[str]) -> list[tuple[str, str]]:
    """(metric, column) pairs in report order: Dice per class and mean, then HD95 per class and mean; no mean
    column for a single foreground class, where it would repeat the class's."""
    shown = [*classes, "mean"] if len(classes) > 1 else list(classes)
    return [(metric, column) for metric in METRIC_FILES for column in shown]


def seed_means(rows_by_seed: dict[int, list[dict]], metric: str, column: str) -> dict[int, float]:
    """Per seed, the mean over its cases (non-finite where a case was non-finite)."""
    return {seed: float(np.mean([row[metric][column] for row in rows])) for seed, rows in rows_by_seed.items()}


def aggregate_arm(rows_by_seed: dict[int, list[dict]], classes: Sequence[str]) -> dict:
    """Pooled over seeds and cases, and over seeds only (the spread of per-seed means)."""
    result: dict[str, dict] = {"pooled": {}, "over_seeds": {}}
    for metric, column in columns(classes):
        pooled = (row[metric][column] for rows in rows_by_seed.values() for row in rows)
        result["pooled"].setdefault(metric, {})[column] = summary(pooled)
        per_seed = seed_means(rows_by_seed, metric, column).values()
        result["over_seeds"].setdefault(metric, {})[column] = summary(per_seed)
    return result


def paired_differences(method: dict[int, list[dict]], baseline: dict[int, list[dict]], classes: Sequence[str]) -> dict:
    """Per metric and column: method - baseline of the per-seed means, seed by seed, and their summary."""
    result: dict[str, dict] = {}
    for metric, column in columns(classes):
        ours, theirs = seed_means(method, metric, column), seed_means(baseline, metric, column)
        per_seed = {seed: ours[seed] - theirs[seed] for seed in ours}
        result.setdefault(metric, {})[column] = {"per_seed": per_seed, **summary(per_seed.values())}
    return result


def analyse(runs: list[Run], datasets: dict[str, dict], arms: Sequence[str]) -> tuple[dict, dict, dict]:
    """Per-case rows per (task, arm, seed), aggregates per (task, arm), differences per (task, method arm)."""
    rows = {run: per_case_rows(run, datasets[run.task]["classes"]) for run in runs}
    by_arm: dict[str, dict[str, dict[int, list[dict]]]] = {}
    for run, case_rows in rows.items():
        by_arm.setdefault(run.task, {}).setdefault(run.arm, {})[run.seed] = case_rows
    aggregates = {task: {arm: aggregate_arm(by_arm[task][arm], datasets[task]["classes"]) for arm in arms}
                  for task in by_arm}
    baseline = arms[0]
    differences = {
        task: {arm: paired_differences(by_arm[task][arm], by_arm[task][baseline], datasets[task]["classes"])
               for arm in arms[1:]}
        for task in by_arm
    }
    return rows, aggregates, differences


def machine_info() -> dict:
    """What the study ran on; the load average tells how much other work shared the CPU."""
    import torch  # here, not at the top: the study itself runs no torch code

    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_1min_at_start": os.getloadavg()[0],
    }


def json_safe(value: object) -> object:
    """Non-finite floats as null: strict JSON has no NaN or Infinity."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def fmt(value: float | None, places: int, sign: bool = False, missing: str = "–") -> str:
    if value is None:
        return missing
    return f"{value:{'+' if sign else ''}.{places}f}"


def digits(metric: str) -> int:
    return 3 if metric == "dice" else 2


def cell(stats: dict, metric: str, sign: bool = False) -> str:
    """``mean ± std``, the std left out for a single value, and a count of values left out as non-finite."""
    text = fmt(stats["mean"], digits(metric), sign)
    if stats["std"] is not None:
        text += f" ± {fmt(stats['std'], digits(metric))}"
    if stats["not_finite"]:
        text += f" ({stats['not_finite']} of {stats['n'] + stats['not_finite']} not finite, left out)"
    return text


def column_title(metric: str, column: str) -> str:
    return f"Dice {column}" if metric == "dice" else f"HD95 {column} (mm)"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], text_columns: int = 1) -> list[str]:
    """A markdown table, its first ``text_columns`` left-aligned and the numbers right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def per_case_table(report: dict, task: str, classes: Sequence[str]) -> list[str]:
    header = ["arm", "seed", "case", *(column_title(m, c) for m, c in columns(classes)), "train + eval (s)"]
    rows = []
    for run in (r for r in report["runs"] if r["task"] == task):
        wall = fmt(run["train_s"] + run["eval_s"], 0) if run["eval_s"] is not None else "–"
        wall += " (resumed: the rest only)" if run["resumed"] else ""
        for case in run["cases"]:
            values = [fmt(case[m][c], digits(m), missing="not finite") for m, c in columns(classes)]
            rows.append([run["arm"], str(run["seed"]), case["case"], *values, wall])
    return table(header, rows, text_columns=3)


def aggregate_table(report: dict, task: str, classes: Sequence[str], kind: str) -> list[str]:
    header = ["arm", *(column_title(m, c) for m, c in columns(classes))]
    stats = report["aggregates"][task]
    rows = [[arm, *(cell(stats[arm][kind][m][c], m) for m, c in columns(classes))] for arm in stats]
    return table(header, rows)


def difference_table(report: dict, task: str, classes: Sequence[str]) -> list[str]:
    seeds = report["settings"]["seeds"]
    baseline = report["settings"]["arms"][0]["name"]
    header = ["metric", "arm", "difference (mean ± std over seeds)", *(f"seed {s}" for s in seeds)]
    rows = [
        [column_title(m, c), f"{arm} − {baseline}", cell(diff[m][c], m, sign=True),
         *(fmt(diff[m][c]["per_seed"][str(s)], digits(m), sign=True) for s in seeds)]
        for arm, diff in report["differences"][task].items()
        for m, c in columns(classes)
    ]
    return table(header, rows, text_columns=2)


def describe_machine(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    device = f"CUDA {m['cuda_device']}" if m["cuda_device"] else "no GPU"
    return (f"{m['cpu']} ({m['cpu_cores']} cores), {device}, torch {m['torch']}; {s['parallel']} runs at once, "
            f"{s['threads_per_run']} thread(s) each; 1-min load average {m['load_average_1min_at_start']:.1f} "
            f"at start, {m['load_average_1min_at_end']:.1f} at end")


def source_name(dataset: dict) -> str:
    return "real MRI" if dataset["source"] == "real" else "SYNTHETIC volumes, not MRI"


def task_section(report: dict, task: str) -> list[str]:
    dataset = report["datasets"][task]
    classes = dataset["classes"]
    n_cases = max(len(run["cases"]) for run in report["runs"] if run["task"] == task)
    return [
        f"### Task `{task}` ({source_name(dataset)})",
        "",
        f"Data: {dataset['description']}. Metrics on the held-out test case(s), on the resampled grid the "
        "model works on; HD95 in mm.",
        "",
        "Per case:",
        "",
        *per_case_table(report, task, classes),
        "",
        f"Pooled over seeds and cases (mean ± std, up to {len(report['settings']['seeds'])} seeds x {n_cases} "
        "case(s)):",
        "",
        *aggregate_table(report, task, classes, "pooled"),
        "",
        "Over seeds (mean ± std across seeds of the per-seed mean over cases):",
        "",
        *aggregate_table(report, task, classes, "over_seeds"),
        "",
        "Method − baseline, paired by seed (per-seed mean over cases; for HD95 negative is better):",
        "",
        *difference_table(report, task, classes),
        "",
    ]


def val_interval_note(settings: dict) -> str:
    """Say so when run_overrides capped the validation interval: the settings show it as given."""
    if int(settings["extra"].get("val_interval", 1)) > settings["epochs"]:
        return f" (val_interval capped at {settings['epochs']}, the epoch count)"
    return ""


def cli_text(overrides: dict[str, str]) -> str:
    return " ".join(f"--{key} {value}" for key, value in overrides.items())


def markdown(report: dict) -> str:
    s = report["settings"]
    arms = "; ".join(f"`{a['name']}`: `{cli_text(a['overrides'])}`" for a in s["arms"])
    sources = sorted({source_name(d) for d in report["datasets"].values()})
    run_minutes = sum((r["train_s"] or 0) + (r["eval_s"] or 0) for r in report["runs"]) / 60
    lines = [
        f"## Accuracy study: `{s['bundle']}`",
        "",
        f"Machine: {describe_machine(report)}.",
        f"Data: {' and '.join(sources)} (per task below).",
        f"Arms (the first is the baseline): {arms}. {s['epochs']} epochs, seeds {', '.join(map(str, s['seeds']))}; "
        f"every run: `run {s['training']['run_id']}` of `{' + '.join(s['training']['configs'])}` with "
        f"`{cli_text(s['extra'])}`{val_interval_note(s)}. Wall time: {run_minutes:.1f} min summed over "
        f"the runs (trained {s['parallel']} at a time), {report['wall_s'] / 60:.1f} min for the last invocation of "
        "the study. std is the sample standard deviation (n − 1).",
        "",
    ]
    for task in s["tasks"]:
        lines += task_section(report, task)
    return "\n".join(lines)


def build_report(args: argparse.Namespace, machine: dict, datasets: dict[str, dict], runs: list[Run],
                 records: dict[Run, dict], wall_s: float) -> dict:
    rows, aggregates, differences = analyse(runs, datasets, [arm.name for arm in args.arm])
    return json_safe({
        "settings": {
            "bundle": args.bundle,
            "arms": [{"name": arm.name, "overrides": arm.overrides} for arm in args.arm],
            "tasks": args.task,
            "seeds": args.seeds,
            "epochs": args.epochs,
            "extra": args.extra,
            "training": {"configs": args.train_configs, "run_id": args.train_run_id},
            "parallel": args.parallel,
            "threads_per_run": default_threads(args.parallel),
            "quick": args.quick,
            "labeled": args.labeled,
        },
        "machine": {**machine, "load_average_1min_at_end": os.getloadavg()[0]},
        "datasets": datasets,
        "runs": [
            {"task": run.task, "arm": run.arm, "seed": run.seed, "bundle_root": str(run.root),
             "overrides": run.overrides, "resumed": records[run].get("resumed"),
             "train_s": records[run].get("train_s"), "eval_s": records[run].get("eval_s"), "cases": rows[run]}
            for run in runs
        ],
        "aggregates": aggregates,
        "differences": differences,
        "wall_s": wall_s,
        "notes": "null metric values are not finite (HD95 of a class the model did not predict, and a case's mean "
                 "over classes then); aggregates leave them out and count them in not_finite. std: sample "
                 "standard deviation (n - 1), null for n < 2.",
    })


def main(argv: Sequence[str] | None = None) -> dict:
    start = time.perf_counter()
    args = parse_args(argv)
    claim_output(args.out)  # first, so that a folder the study did not make is refused before any work
    machine = machine_info()
    datasets = {}
    for task in args.task:
        datasets[task] = prepare_dataset(task, args.out / "data" / task, args.data_cache, args.synthetic_size,
                                         args.labeled)
        print(f"dataset {task} ({source_name(datasets[task])}): {datasets[task]['description']}", flush=True)
    runs = plan_runs(args, datasets)
    for run in runs:
        check_resumable(run)  # all before any compute
    threads = default_threads(args.parallel)
    print(f"{len(runs)} runs of {args.epochs} epochs, {args.parallel} at a time with {threads} thread(s) each, "
          f"under {args.out}", flush=True)
    ran_none = all(is_done(run) for run in runs)
    records = run_all(runs, REPO / "bundles" / args.bundle, args.parallel, threads, args.train_configs,
                      args.train_run_id)
    report = build_report(args, machine, datasets, runs, records, time.perf_counter() - start)
    earlier = args.out / "results.json"
    if ran_none and earlier.is_file():
        # Only the report was rewritten: the machine's load and the wall time of the invocation that ran the
        # runs are what their timings mean.
        previous = json.loads(earlier.read_text())
        report["machine"], report["wall_s"] = previous["machine"], previous["wall_s"]
    (args.out / "results.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    text = markdown(report)
    (args.out / "results.md").write_text(text.rstrip("\n") + "\n")  # one final newline, no blank line
    print("\n" + text)
    print(f"written: {args.out / 'results.json'}, {args.out / 'results.md'}")
    return report


if __name__ == "__main__":
    main()
