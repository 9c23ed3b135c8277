"""What keeping only the largest connected component does to finished runs of ``scripts/compare_methods.py``.

The plan (``keep_largest_component``, ``scripts/plan.py`` in every bundle) keeps a class to its largest connected
component at inference when the class is one object in every training label. This study measures that choice on
predictions that were made without it: for every run under ``--out`` (``runs/<method>/<task>/<arm>/seed<N>``) it
re-scores each held-out prediction with and without MONAI's ``KeepLargestConnectedComponent`` on ``--classes`` (the
transform inference.json applies, on the prediction at the test image's own grid, as there), and prints per run the
Dice and HD95 of both, then per arm the paired difference kept − as predicted over seeds and cases, and per method
arm its difference from the ``baseline`` arm with both kept, each with its bootstrap 95 % interval
(``scripts/paired_stats.py``).

    python scripts/largest_component_study.py --out /tmp/cmp_selfreg --classes 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_stats import paired_interval, verdict  # noqa: E402
from recipe_benchmark import case_name, dice_scores, find_prediction, hd95_scores, load_segmentation  # noqa: E402


def held_out_labels(data: Path) -> dict[str, Path]:
    """The held-out cases of a task's dataset folder (its ``labelsTs``), by case name."""
    labels = sorted((data / "labelsTs").glob("*.nii*"))
    if not labels:
        raise FileNotFoundError(f"no held-out labels in {data / 'labelsTs'}: is {data} a compare_methods dataset?")
    return {case_name(p): p for p in labels}


def rescore(run: Path, labels: dict[str, Path], keep: KeepLargestConnectedComponent) -> list[dict]:
    """Per held-out case of ``run``: Dice and HD95 (mean over foreground classes) as predicted and kept."""
    rows = []
    for name, label_path in labels.items():
        prediction, _ = load_segmentation(find_prediction(run / "predictions", name))
        label, spacing = load_segmentation(label_path)
        num_classes = int(max(label.max(), prediction.max())) + 1
        kept = keep(torch.tensor(prediction[None])).numpy()[0]  # a copy: the transform edits its input in place
        row = {"case": name}
        for tag, volume in (("predicted", prediction), ("kept", kept)):
            row[f"dice_{tag}"] = float(np.mean(dice_scores(volume, label, num_classes)))
            row[f"hd95_{tag}"] = float(np.mean(hd95_scores(volume, label, num_classes, spacing)))
        row["voxels_removed"] = int((prediction != kept).sum())
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a compare_methods.py --out folder")
    parser.add_argument("--classes", type=int, nargs="+", required=True, help="the classes kept to one component")
    args = parser.parse_args(argv)
    keep = KeepLargestConnectedComponent(applied_labels=args.classes, is_onehot=False, independent=True)
    runs = sorted(p.parent for p in args.out.glob("runs/*/*/*/seed*/predictions"))
    if not runs:
        raise SystemExit(f"no finished runs under {args.out}/runs: run scripts/compare_methods.py first")
    labels: dict[tuple[str, str], dict[str, Path]] = {}
    rows_by_arm: dict[str, dict[str, list[dict]]] = {}
    for run in runs:
        seed, arm, task, method = run.name, run.parent.name, run.parent.parent.name, run.parent.parent.parent.name
        if (method, task) not in labels:
            labels[method, task] = held_out_labels(args.out / "data" / method / task)
        rows = rescore(run, labels[method, task], keep)
        rows_by_arm.setdefault(f"{method}/{task}/{arm}", {})[seed] = rows
        for r in rows:
            print(f"{method}/{task}/{arm}/{seed} {r['case']}: Dice {r['dice_predicted']:.3f} -> {r['dice_kept']:.3f},"
                  f" HD95 {r['hd95_predicted']:.1f} -> {r['hd95_kept']:.1f} mm, {r['voxels_removed']} voxels removed")
    results: dict = {}
    for arm, seeds in rows_by_arm.items():
        every = [r for rows in seeds.values() for r in rows]
        interval = paired_interval([(seed, r["case"], r["dice_kept"] - r["dice_predicted"])
                                    for seed, rows in seeds.items() for r in rows])
        kept, predicted = np.mean([r["dice_kept"] for r in every]), np.mean([r["dice_predicted"] for r in every])
        print(f"{arm}: Dice {predicted:.3f} -> {kept:.3f}, kept - predicted: {verdict(interval)}")
        results[arm] = {"runs": seeds, "dice_predicted": predicted, "dice_kept": kept, "difference": interval.__dict__}
    for arm, seeds in rows_by_arm.items():
        baseline = rows_by_arm.get(arm.rsplit("/", 1)[0] + "/baseline")
        if baseline is None or baseline is seeds:
            continue
        interval = paired_interval([(seed, r["case"], r["dice_kept"] - b["dice_kept"])
                                    for seed, rows in seeds.items() if seed in baseline
                                    for r, b in zip(rows, baseline[seed])])
        print(f"{arm} - baseline, both kept: {verdict(interval)}")
        results[arm]["minus_baseline_kept"] = interval.__dict__
    print(json.dumps(results, default=float, indent=1), file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
