"""The runs of ``scripts/compare_methods.py``: the data a comparison reads, the plan step, and each (task, arm,
seed) run: train through the bundle's CLI, segment the held-out images with the bundle's ``inference.json``
(predictions inverted to each image's own grid) and score them there against their labels
(``scripts/recipe_benchmark.py``'s scoring).

A dataset is an MSD folder (``dataset.json``, ``imagesTr/``, labels; held-out ``test`` cases with a ``label`` or a
``labelsTs/`` file of the image's name) or a MONAI datalist JSON (paths relative to its folder). It is checked
before any training (:func:`read_dataset`), and every problem is named with its file.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import json
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import accuracy_study
import recipe_benchmark
from accuracy_study import Run
from method_registry import Method

SCORES = "scores.json"
PLAN_CONFIG = "configs/plan.json"
# The only settings passed to inference: the rest (spacing, crop, classes, normalisation) is what the trained model
# recorded in models/model_settings.json, which inference.json reads.
INFERENCE_KEYS = ("num_workers",)


class DatasetInputError(ValueError):
    """The data given to the comparison cannot be used; the message names the file and what to do."""


def dataset_files(dataset_dir: Path) -> tuple[Path, Path]:
    """(datalist, folder its relative paths start from) of ``--dataset_dir``: an MSD folder or a datalist JSON."""
    if dataset_dir.is_file():
        return dataset_dir, dataset_dir.parent
    if not dataset_dir.is_dir():
        raise DatasetInputError(f"{dataset_dir} does not exist: pass an MSD dataset folder (dataset.json, imagesTr/, "
                                "labelsTr/) or a MONAI datalist JSON file")
    missing = [str(p) for p in (dataset_dir / "dataset.json", dataset_dir / "imagesTr") if not p.exists()]
    if missing:
        raise DatasetInputError(f"{dataset_dir} is not an MSD dataset folder: {' and '.join(missing)} not found; "
                                "pass a folder holding dataset.json and imagesTr/, or a datalist JSON file")
    return dataset_dir / "dataset.json", dataset_dir


def _resolve(base_dir: Path, path: str) -> Path:
    """A datalist path as MONAI's ``load_decathlon_datalist`` resolves it: relative to the datalist's folder."""
    return Path(os.path.normpath(base_dir / path))


def _class_names(datalist: Path, content: dict) -> list[str]:
    """Foreground class names in label order from the datalist's ``labels`` map (``{"0": "background", ...}``)."""
    labels = content.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DatasetInputError(f"{datalist} has no 'labels' map: add one such as {{\"0\": \"background\", "
                                "\"1\": \"organ\"}, the class names of the report")
    keys = [str(value) for value in range(len(labels))]
    if sorted(labels, key=str) != sorted(keys):
        raise DatasetInputError(f"{datalist}: 'labels' must be keyed 0..{len(labels) - 1}, got {sorted(labels)}")
    return [str(labels[key]) for key in keys[1:]]


def _held_out(datalist: Path, base_dir: Path, content: dict, problems: list[str]) -> list[dict]:
    """The held-out cases with their labels: a ``test``/``testing`` entry's own ``label``, else ``labelsTs/`` of
    the image's name; missing files are added to ``problems``."""
    entries = content.get("test") or content.get("testing") or []
    if not entries:
        problems.append(f"{datalist} has no 'test' cases: the comparison scores held-out cases, so add 'test' "
                        "entries ({'image': ..., 'label': ...}, or images with labels in labelsTs/)")
    cases = []
    for entry in entries:
        image = _resolve(base_dir, entry["image"] if isinstance(entry, dict) else entry)
        label = (_resolve(base_dir, entry["label"]) if isinstance(entry, dict) and "label" in entry
                 else base_dir / "labelsTs" / image.name)
        for kind, path in (("image", image), ("label", label)):
            if not path.is_file():
                problems.append(f"test {kind} {path} not found (listed in {datalist})")
        cases.append({"image": str(image), "label": str(label)})
    return cases


def _training_problems(datalist: Path, base_dir: Path, content: dict, needs_unlabeled: bool) -> list[str]:
    """Missing training files, no labelled case, or no unlabelled image for a method that needs some."""
    entries = content.get("training") or []
    if not entries:
        return [f"{datalist} has no 'training' cases"]
    problems = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry:
            problems.append(f"training entry {index} of {datalist} is not {{'image': ..., 'label': ...}}")
            continue
        for key in ("image", "label"):
            if key in entry and not _resolve(base_dir, entry[key]).is_file():
                problems.append(f"training {key} {_resolve(base_dir, entry[key])} not found (listed in {datalist})")
    labelled = sum(isinstance(e, dict) and "label" in e for e in entries)
    if not labelled:
        problems.append(f"{datalist} has no training case with a 'label'")
    if needs_unlabeled and labelled == len(entries) and not content.get("unlabeled"):
        problems.append(f"{datalist} has no unlabelled image, which a semi-supervised method needs: add "
                        "'training' entries without a 'label' or an 'unlabeled' list, or leave that method out")
    return problems


def read_dataset(datalist: Path, base_dir: Path, needs_unlabeled: bool = False) -> dict:
    """Check a datalist before any training: its class names, its training and held-out files. Returns
    ``{"datalist", "path", "classes", "test": [{"image", "label"}], "training_cases"}``; raises
    :class:`DatasetInputError` listing every problem with its file."""
    try:
        content = json.loads(datalist.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetInputError(f"{datalist} cannot be read as a datalist JSON ({e})") from e
    classes = _class_names(datalist, content)
    problems = _training_problems(datalist, base_dir, content, needs_unlabeled)
    test = _held_out(datalist, base_dir, content, problems)
    if problems:
        raise DatasetInputError(f"the dataset {datalist} cannot be compared on; fix these and run again:\n  - "
                                + "\n  - ".join(problems))
    labelled = sum("label" in e for e in content["training"])
    return {"datalist": str(datalist), "path": str(base_dir), "classes": classes, "test": test,
            "training_cases": labelled}


def run_plan(bundle: Path, root: Path, dataset: dict) -> Path:
    """The bundle's plan step (``run plan`` of ``configs/plan.json``) on the dataset, once: writes and returns
    ``root/models/plan.json``, which every run of this dataset then trains with (``--plan_file``)."""
    plan_file = root / "models" / "plan.json"
    if not plan_file.is_file():
        root.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "monai.bundle", "run", "plan", "--config_file", PLAN_CONFIG,
                   "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
                   "--bundle_root", str(root), "--dataset_dir", dataset["path"], "--datalist", dataset["datalist"]]
        accuracy_study.run_step(command, bundle, os.environ.copy(), root / "plan.log")
    return plan_file


def effective_settings(plan_file: Path, overrides: dict[str, str]) -> dict:
    """The plan's settings with the run's command-line overrides over them (what training will use)."""
    settings = dict(json.loads(plan_file.read_text())["settings"])
    for key, value in overrides.items():
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value  # a plain word such as a backbone name
    return settings


def run_steps(settings: dict, epochs: int, training_cases: int) -> int:
    """Optimiser steps of one training: epochs x iterations per epoch (0: one pass over the cases)."""
    per_epoch = int(settings["iterations_per_epoch"]) or math.ceil(training_cases / int(settings["batch_size"]))
    return epochs * per_epoch


def step_voxels(settings: dict) -> int:
    """Crop voxels per optimiser step: volumes x crops per volume x crop size."""
    return int(settings["batch_size"]) * int(settings["num_samples"]) * math.prod(settings["roi_size"])


def estimate_seconds(runs: Sequence[tuple[Method, Run]], plans: dict, datasets: dict, epochs: int,
                     seconds_per_voxel: float, overhead_s: float, parallel: int) -> float:
    """Wall time of the runs: per run ``overhead_s`` plus steps x crop voxels x ``seconds_per_voxel``, an arm
    other than the method's first costing its registry step-ratio target; ``parallel`` runs at once."""
    total = 0.0
    for method, run in runs:
        settings = effective_settings(plans[method.name, run.task], run.overrides)
        steps = run_steps(settings, epochs, datasets[method.name, run.task]["training_cases"])
        factor = 1.0 if run.arm == method.baseline_arm else method.step_ratio_target
        total += overhead_s + steps * step_voxels(settings) * seconds_per_voxel * factor
    return total / parallel


def _finite_or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def case_row(name: str, scores: dict[str, list[float]], classes: Sequence[str]) -> dict:
    """``{"case", "dice": {class..., "mean"}, "hd95": {...}}``, the row format of ``accuracy_study``; the mean is
    not finite where a class is not (a model that misses a class has no HD95 for it)."""
    row: dict = {"case": name}
    for metric, values in scores.items():
        values = [_finite_or_nan(v) for v in values]
        row[metric] = {**dict(zip(classes, values, strict=True)), "mean": float(np.mean(values))}
    return row


def score_run(predictions: Path, test: Sequence[dict], classes: Sequence[str]) -> list[dict]:
    """Every held-out case scored at its label's own resolution: Dice and HD95 (mm) per foreground class."""
    rows = []
    for case in test:
        name = recipe_benchmark.case_name(Path(case["image"]))
        prediction = recipe_benchmark.find_prediction(predictions, name)
        scores = recipe_benchmark.score_case(prediction, Path(case["label"]), len(classes) + 1, hd95=True)
        rows.append(case_row(name, scores, classes))
    return rows


def execute(method: Method, run: Run, dataset: dict, env: dict[str, str]) -> dict:
    """Train, segment the held-out images and score them, unless an earlier invocation finished this run; returns
    the run's record (settings, wall times, and the scored cases)."""
    record_path, scores_path = run.root / accuracy_study.RUN_RECORD, run.root / SCORES
    if scores_path.is_file():
        record = json.loads(record_path.read_text())
        return {**record, "cases": json.loads(scores_path.read_text(), object_hook=_nan_hook)}
    # models/ exists once a training started: the bundle then resumes from its checkpoint
    record = {"overrides": run.overrides, "resumed": (run.root / "models").exists()}
    run.root.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    train = accuracy_study.bundle_command(method.training.configs, run, method.training.run_id)
    # sampled at each step's start and end, so the report gives the load the runs' times were measured under
    record["load_average_1min"] = [os.getloadavg()[0]]
    # clock times, so that a report over runs of several invocations (seeds split across cores) gives their span
    record["started"] = time.time()
    record["train_s"] = accuracy_study.run_step(train, method.bundle_dir, env, run.root / "train.log")
    record["load_average_1min"].append(os.getloadavg()[0])
    predictions = run.root / "predictions"
    inference = dataclasses.replace(run, overrides={k: v for k, v in run.overrides.items() if k in INFERENCE_KEYS})
    images = repr([{"image": case["image"]} for case in dataset["test"]])
    command = accuracy_study.bundle_command(["configs/inference.json"], inference, output_dir=str(predictions),
                                            datalist=images)
    record["infer_s"] = accuracy_study.run_step(command, method.bundle_dir, env, run.root / "inference.log")
    record["load_average_1min"].append(os.getloadavg()[0])
    record["finished"] = time.time()
    cases = score_run(predictions, dataset["test"], dataset["classes"])
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    scores_path.write_text(json.dumps(accuracy_study.json_safe(cases), indent=2) + "\n")  # last: marks it done
    return {**record, "cases": cases}


def _nan_hook(entry: dict) -> dict:
    """JSON null (a non-finite score written by ``json_safe``) back to NaN."""
    return {k: float("nan") if v is None else v for k, v in entry.items()}


def run_all(jobs: Sequence[tuple[Method, Run]], datasets: dict, parallel: int) -> dict[Run, dict]:
    """Execute the runs, ``parallel`` at a time with cores // parallel threads each; a failed run does not stop the
    others (a rerun resumes), but then the comparison exits with the failures instead of a report."""
    threads = accuracy_study.default_threads(parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONWARNINGS": "ignore"}
    lock = threading.Lock()

    def one(index: int, method: Method, run: Run) -> dict:
        label = f"[{index}/{len(jobs)}] {method.name} / {run.label}"
        done = (run.root / SCORES).is_file()
        with lock:  # lines of runs finishing together would otherwise interleave
            print(f"{label}: {'done earlier, skipped' if done else f'running (logs in {run.root})'}", flush=True)
        record = execute(method, run, datasets[method.name, run.task], env)
        if not done:
            with lock:
                print(f"{label}: finished in {record['train_s'] + record['infer_s']:.0f} s", flush=True)
        return record

    records: dict[Run, dict] = {}
    failures: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(one, i, m, r): (m, r) for i, (m, r) in enumerate(jobs, start=1)}
        for future in concurrent.futures.as_completed(futures):
            method, run = futures[future]
            try:
                records[run] = future.result()
            except (accuracy_study.RunFailed, FileNotFoundError, ValueError) as exc:
                failures.append(f"{method.name} / {run.label}: {exc}")
    if failures:
        raise SystemExit("\n\n".join(["runs failed (rerun the same command to resume):", *failures]))
    return records
