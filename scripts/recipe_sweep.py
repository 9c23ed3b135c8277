"""A recipe setting (learning rate, optimiser, schedule, ...) against the baseline of a finished comparison.

For every finished baseline run of ``scripts/compare_methods.py`` under ``--out``
(``runs/<method>/<task>/<against>/seed<N>``) and every ``--arm NAME=OVERRIDES``, this trains the same run again with
the arm's overrides on top of the baseline's (the same plan, data, budget and seed: paired), segments and scores
the held-out cases as the comparison does (``comparison_runs.execute``), and prints per arm its held-out Dice over
seeds and its paired difference from the baseline, with the bootstrap 95 % interval of ``scripts/paired_stats.py``.
Runs go to ``<out>/sweep/<method>/<task>/<arm>/seed<N>``; finished ones are reused, so a rerun resumes. Every
invocation adds its arms to ``<out>/sweep/<method>/<task>/sweep.json``.

    python scripts/recipe_sweep.py --out /tmp/cmp --method segresnet_vae --task brain --seeds 0 1 2 \\
        --arm "lr_5e-3=--learning_rate 5e-3" --arm "adamw=--optimizer#_target_ torch.optim.AdamW"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_study  # noqa: E402
import comparison_runs  # noqa: E402
import method_registry  # noqa: E402
from accuracy_study import Run  # noqa: E402
from paired_stats import paired_interval, verdict  # noqa: E402


def baseline_record(root: Path) -> tuple[dict[str, str], list[dict]]:
    """A finished baseline run's overrides and its scored held-out cases."""
    scores = root / comparison_runs.SCORES
    if not scores.is_file():
        raise SystemExit(f"{root}: no finished baseline run ({scores.name} missing): run scripts/compare_methods.py "
                         "with the same --out, --method, --task and --seeds first")
    overrides = json.loads((root / accuracy_study.RUN_RECORD).read_text())["overrides"]
    return overrides, json.loads(scores.read_text())


def dice_by_case(cases: list[dict]) -> dict[str, float]:
    """A run's scored held-out cases (``comparison_runs.case_row``) as ``{case: mean foreground Dice}``."""
    return {c["case"]: c["dice"]["mean"] for c in cases}


def parse_arm(text: str) -> tuple[str, dict[str, str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name or not overrides.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=OVERRIDES, e.g. 'lr_5e-3=--learning_rate 5e-3', got {text!r}")
    return name, accuracy_study.parse_overrides(overrides)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a compare_methods.py --out folder")
    parser.add_argument("--method", required=True, choices=sorted(m.name for m in method_registry.all_methods()))
    parser.add_argument("--task", required=True, help="the comparison's task (its folder under runs/<method>/)")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--arm", type=parse_arm, action="append", required=True, help="NAME=OVERRIDES; repeat")
    parser.add_argument("--against", default="baseline", help="the comparison's arm the settings are added to")
    parser.add_argument("--parallel", type=accuracy_study.positive_int, default=1, help="runs at once")
    args = parser.parse_args(argv)
    method = next(m for m in method_registry.all_methods() if m.name == args.method)

    baselines = {seed: baseline_record(args.out / "runs" / method.name / args.task / args.against / f"seed{seed}")
                 for seed in args.seeds}
    datalist = Path(baselines[args.seeds[0]][0]["datalist"])
    dataset = comparison_runs.read_dataset(datalist, datalist.parent, method.needs_unlabeled)
    runs = [Run(args.task, name, seed, args.out / "sweep" / method.name / args.task / name / f"seed{seed}",
                datalist.parent, {**baselines[seed][0], **overrides})
            for seed in args.seeds for name, overrides in args.arm]
    records = comparison_runs.run_all([(method, run) for run in runs], {(method.name, args.task): dataset},
                                      args.parallel)

    baseline_dice = {seed: dice_by_case(cases) for seed, (_, cases) in baselines.items()}
    every = [d for cases in baseline_dice.values() for d in cases.values()]
    print(f"{method.name} / {args.task} / {args.against}: held-out Dice {np.mean(every):.3f} ± {np.std(every):.3f}")
    results: dict = {args.against: {"dice": baseline_dice}}
    for name, _ in args.arm:
        arm_runs = [run for run in runs if run.arm == name]
        dice = {run.seed: dice_by_case(records[run]["cases"]) for run in arm_runs}
        interval = paired_interval([(seed, case, value - baseline_dice[seed][case]) for seed, cases in dice.items()
                                    for case, value in cases.items()])
        values = [d for cases in dice.values() for d in cases.values()]
        print(f"{name}: held-out Dice {np.mean(values):.3f} ± {np.std(values):.3f}; {name} − {args.against}: "
              f"{verdict(interval)}")
        results[name] = {"dice": dice, "difference": interval.__dict__,
                         "train_s": [records[run]["train_s"] for run in arm_runs]}
    summary = args.out / "sweep" / method.name / args.task / "sweep.json"
    merged = json.loads(summary.read_text()) if summary.is_file() else {}  # arms of earlier invocations stay
    for name, entry in json.loads(json.dumps(results)).items():  # seeds as JSON writes them, strings
        if name == args.against and name in merged:
            merged[name]["dice"].update(entry["dice"])
        else:
            merged[name] = entry
    summary.write_text(json.dumps(merged, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
