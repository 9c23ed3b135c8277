"""Label-efficiency study in SemSim's 2-D protocol: supervised-only, FixMatch and SemSim with K labelled slices.

For each K of ``--labeled`` this writes ``make_dataset.py --task tissue2d --labeled K`` (the MNI training slabs cut
into 77 axial slices, K labelled and spread evenly, the rest the unlabelled pool; validation slices from the
validation slab; the held-out slab as a volume), trains every arm of the method's registry entry
(``bundles/methods/semsim/method.json``: ``supervised``, ``fixmatch``, ``semsim``) for every seed with the same
budget through ``scripts/recipe_benchmark.py`` (the bundle's CLI, then ``inference.json`` slice by slice on the
held-out volume, scored at its own 1 mm grid), and reports per K:

- held-out Dice per arm and seed, and the mean;
- paired differences over seeds (SemSim − supervised, SemSim − FixMatch, FixMatch − supervised) with a percentile
  bootstrap 95 % interval and its verdict (``scripts/paired_stats.py``), and the targets of issue 16: SemSim ≥
  supervised + ``dice_gain_target`` with the interval above 0, and SemSim ≥ FixMatch;
- the supervised arm's validation curve (``val_mean_dice`` per epoch from its log) and, with ``--plateau-epochs N``,
  that of one supervised run N epochs long: whether the budget brings supervised-only to a plateau.

It writes ``results.json``, ``results.md`` and ``validation_curves.png`` under ``--out`` and prints the markdown.
``--variant NAME=OVERRIDES`` adds an arm: SemSim with OVERRIDES on top (say ``ema=--ema_decay 0.99``), reported
against ``semsim`` and ``supervised`` with the same paired intervals; ``--arms`` trains only the arms it names (the
report covers every finished run). Runs are independent processes (``--parallel`` at once, ``OMP_NUM_THREADS`` =
cores // parallel); a finished run (its ``recipe_benchmark.json``) is kept and not retrained, so an interrupted study
resumes.

    python scripts/label_efficiency_study.py --labeled 1 3 --seeds 0 1 2 3 4 --plateau-epochs 24   # hours on 2 cores
    python scripts/label_efficiency_study.py --task synthetic2d --labeled 2 --seeds 0 1 --epochs 1 \\
        --extra "--iterations_per_epoch 2 --roi_size [32,32]"                                        # smoke test
    python scripts/label_efficiency_study.py --labeled 1 --arms supervised semsim ema \\
        --variant "ema=--ema_decay 0.99"                                              # an option against SemSim
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI machines and servers
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

import accuracy_study  # noqa: E402
import make_dataset  # noqa: E402
import method_registry  # noqa: E402
import paired_stats  # noqa: E402
from plot_term_activity import read_epoch_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ("tissue2d", "synthetic2d")
# The budget of the protocol (SemSim docs, "2-D protocol"): SegResNet with 8 filters on 128^2 crops at 1 mm, 12
# epochs of 50 iterations; each setting can be overridden by --extra (later settings win).
DEFAULT_SETTINGS = ("--spatial_dims 2 --roi_size [128,128] --spacing [1.0,1.0] --orientation RA "
                    "--backbones#segresnet#init_filters 8 --iterations_per_epoch 50 --progress_bar False "
                    "--num_workers 0")
PLATEAU_ARM = "supervised_long"
COMPARISONS = (("semsim", "supervised"), ("semsim", "fixmatch"), ("fixmatch", "supervised"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="semsim", help="a registry method with unlabelled arms (default semsim)")
    parser.add_argument("--task", choices=TASKS, default="tissue2d")
    parser.add_argument("--labeled", type=int, nargs="+", default=[1, 3], help="labelled slices K (default 1 3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=12, help="epochs per run (default 12, of 50 iterations)")
    parser.add_argument("--plateau-epochs", type=int, default=0,
                        help="also train one supervised run (the first seed) this many epochs per K (0: none)")
    parser.add_argument("--extra", default="", help="bundle CLI overrides for every run, over the protocol's")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="an extra arm: SemSim's overrides plus OVERRIDES (repeatable)")
    parser.add_argument("--arms", nargs="+", help="train only these arms (default: the registry's and the variants)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--out", type=Path, default=REPO / "study_output" / "label_efficiency_2d")
    parser.add_argument("--report-only", action="store_true", help="report the finished runs, train nothing")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or min(args.labeled) < 1 or args.epochs < 1 or args.parallel < 1:
        parser.error("seeds must be distinct, --labeled, --epochs and --parallel at least 1")
    method = method_registry.by_name(args.method)
    missing = {a for pair in COMPARISONS for a in pair} - set(method.arms)
    if missing:
        parser.error(f"method {args.method!r} has no arm(s) {sorted(missing)} in its registry entry; this study "
                     f"compares {[a for a, _ in COMPARISONS]}")
    args.method = method
    args.arm_overrides = dict(method.arms)
    args.variants = []
    for variant in args.variant:
        name, separator, overrides = variant.partition("=")
        if not separator or not name.isidentifier() or name in args.arm_overrides or name == PLATEAU_ARM:
            parser.error(f"--variant {variant!r}: give NAME=OVERRIDES with a new identifier NAME, not one of "
                         f"{sorted(args.arm_overrides)}")
        args.arm_overrides[name] = f"{method.arms['semsim']} {overrides}".strip()
        args.variants.append(name)
    unknown = set(args.arms or ()) - set(args.arm_overrides)
    if unknown:
        parser.error(f"--arms {sorted(unknown)}: not an arm; the arms are {sorted(args.arm_overrides)}")
    return args


def run_dir(out: Path, labeled: int, arm: str, seed: int) -> Path:
    return out / f"k{labeled}" / f"{arm}_{seed}"


def planned_runs(args: argparse.Namespace) -> list[tuple[int, str, int, int]]:
    """(K, arm, seed, epochs) of every run, the slow arms (SemSim and its variants) first so that two workers finish
    together."""
    arms = sorted(args.arms or args.arm_overrides, key=lambda a: a not in ("semsim", *args.variants))
    runs = [(k, arm, seed, args.epochs) for seed in args.seeds for k in args.labeled for arm in arms]
    if args.plateau_epochs:
        runs += [(k, PLATEAU_ARM, args.seeds[0], args.plateau_epochs) for k in args.labeled]
    return runs


def train_one(args: argparse.Namespace, labeled: int, arm: str, seed: int, epochs: int, threads: int) -> Path:
    """One run through scripts/recipe_benchmark.py; its log beside its folder. Returns the run's folder."""
    out = run_dir(args.out, labeled, arm, seed)
    if (out / "recipe_benchmark.json").is_file():
        return out
    # The plateau run validates every epoch (a share of 100 always passes the time-share schedule) to draw its curve.
    overrides = args.arm_overrides["supervised"] + " --val_share 100" if arm == PLATEAU_ARM else args.arm_overrides[arm]
    settings = shlex.split(f"{DEFAULT_SETTINGS} {args.extra} {overrides}") + [
        "--max_epochs", str(epochs), "--seed", str(seed)]
    command = [sys.executable, str(REPO / "scripts" / "recipe_benchmark.py"), "--bundle", args.method.bundle,
               "--dataset_dir", str(args.out / f"data_k{labeled}"), "--out", str(out), "--", *settings]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{arm}_{seed}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with log.open("w") as stream:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"K={labeled} {arm} seed {seed} failed (exit {code}): see {log}")
    return out


def train_all(args: argparse.Namespace) -> None:
    for labeled in args.labeled:
        data = args.out / f"data_k{labeled}"
        if not (data / "dataset.json").is_file():
            info = make_dataset.make_dataset(args.task, data, labeled=labeled)
            print(f"K={labeled}: {info.description}", flush=True)
    runs = planned_runs(args)
    threads = accuracy_study.default_threads(args.parallel)
    print(f"{len(runs)} runs, {args.parallel} at once with {threads} thread(s) each", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(train_one, args, *run, threads): run for run in runs}
        for future in concurrent.futures.as_completed(futures):
            labeled, arm, seed, _ = futures[future]
            score = json.loads((future.result() / "recipe_benchmark.json").read_text())["mean_dice"]
            print(f"K={labeled} {arm} seed {seed}: held-out mean Dice {score:.3f}", flush=True)


def validation_curve(folder: Path) -> list[tuple[int, float]]:
    """(epoch, val_mean_dice) from a run's training log."""
    with open(folder / "train.log", errors="replace") as log:
        epochs = read_epoch_metrics(log, prefix="val_")
    return [(e, m["val_mean_dice"]) for e, m in sorted(epochs.items()) if "val_mean_dice" in m]


def analyse(args: argparse.Namespace) -> dict:
    """Scores, paired intervals, target checks and validation curves of every K from the finished runs."""
    report = {"settings": f"{DEFAULT_SETTINGS} {args.extra}".strip(), "epochs": args.epochs, "seeds": args.seeds,
              "task": args.task, "arms": args.arm_overrides, "per_k": {}}
    comparisons_to_make = COMPARISONS + tuple((v, base) for v in args.variants for base in ("semsim", "supervised"))
    for labeled in args.labeled:
        scores: dict[str, dict[int, dict]] = {}
        for arm in args.arm_overrides:
            for seed in args.seeds:
                result = run_dir(args.out, labeled, arm, seed) / "recipe_benchmark.json"
                if result.is_file():
                    data = json.loads(result.read_text())
                    per_class = np.mean(list(data["dice_per_class"].values()), axis=0).tolist()
                    scores.setdefault(arm, {})[seed] = {"mean": data["mean_dice"], "per_class": per_class,
                                                        "train_s": data["train_s"]}
        comparisons = {}
        for method_arm, base_arm in comparisons_to_make:
            seeds = sorted(set(scores.get(method_arm, {})) & set(scores.get(base_arm, {})))
            if not seeds:
                continue
            differences = [scores[method_arm][s]["mean"] - scores[base_arm][s]["mean"] for s in seeds]
            interval = paired_stats.bootstrap_interval(differences)
            comparisons[f"{method_arm}-{base_arm}"] = {
                "seeds": seeds, "differences": differences, "mean": interval.mean, "low": interval.low,
                "high": interval.high, "verdict": paired_stats.verdict(interval)}
        curves = {f"{arm}_{seed}": validation_curve(run_dir(args.out, labeled, arm, seed))
                  for arm in ("supervised", PLATEAU_ARM) for seed in args.seeds
                  if (run_dir(args.out, labeled, arm, seed) / "train.log").is_file()}
        report["per_k"][labeled] = {"scores": scores, "comparisons": comparisons, "curves": curves,
                                    "targets": targets(comparisons, args.method.dice_gain_target)}
    return report


def targets(comparisons: dict, gain: float) -> dict:
    """Issue 16's targets: SemSim ≥ supervised + gain with the interval above 0; SemSim ≥ FixMatch (mean)."""
    out = {}
    if "semsim-supervised" in comparisons:
        c = comparisons["semsim-supervised"]
        out["semsim_vs_supervised"] = {"met": c["mean"] >= gain and c["low"] > 0, "need": gain,
                                       "short_by": max(0.0, gain - c["mean"])}
    if "semsim-fixmatch" in comparisons:
        out["semsim_vs_fixmatch"] = {"met": comparisons["semsim-fixmatch"]["mean"] >= 0}
    return out


def plot_curves(report: dict, png: Path) -> None:
    """Supervised-only validation Dice against the epoch, one panel per K."""
    ks = list(report["per_k"])
    figure, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 3.6), squeeze=False)
    for axis, labeled in zip(axes[0], ks):
        for name, points in report["per_k"][labeled]["curves"].items():
            if points:
                axis.plot(*zip(*points), marker=".", label=name, linewidth=2 if PLATEAU_ARM in name else 1)
        axis.set(xlabel="epoch (50 iterations)", ylabel="validation mean Dice", title=f"supervised only, K = {labeled}")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)


def markdown(report: dict, gain: float) -> str:
    lines = [f"Task `{report['task']}`, {report['epochs']} epochs per run, seeds {report['seeds']}; settings "
             f"`{report['settings']}`.", ""]
    for labeled, k in report["per_k"].items():
        lines += [f"### K = {labeled} labelled slice(s)", "",
                  "| arm | " + " | ".join(f"seed {s}" for s in report["seeds"]) + " | mean |",
                  "|---|" + "---:|" * (len(report["seeds"]) + 1)]
        for arm, by_seed in k["scores"].items():
            cells = [f"{by_seed[s]['mean']:.3f}" if s in by_seed else "–" for s in report["seeds"]]
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {np.mean([v['mean'] for v in by_seed.values()]):.3f} |")
        lines += ["", "| paired difference | per seed | mean | verdict (bootstrap 95 % interval) |", "|---|---|---:|---|"]
        for name, c in k["comparisons"].items():
            per_seed = ", ".join(f"{d:+.3f}" for d in c["differences"])
            lines.append(f"| {name.replace('-', ' − ')} | {per_seed} | {c['mean']:+.3f} | {c['verdict']} |")
        t = k["targets"]
        if "semsim_vs_supervised" in t:
            v = t["semsim_vs_supervised"]
            lines += ["", f"Target SemSim ≥ supervised + {gain} with the interval above 0: "
                      + ("**met**" if v["met"] else f"**missed** (mean short by {v['short_by']:.3f})")]
        if "semsim_vs_fixmatch" in t:
            lines.append(f"Target SemSim ≥ FixMatch: {'**met**' if t['semsim_vs_fixmatch']['met'] else '**missed**'}")
        for name, points in k["curves"].items():
            if points:
                tail = [v for _, v in points[-max(1, len(points) // 3):]]
                lines.append(f"- validation curve `{name}`: {len(points)} epochs, best {max(v for _, v in points):.3f}, "
                             f"last third {min(tail):.3f}-{max(tail):.3f}")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        train_all(args)
    report = analyse(args)
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report, args.method.dice_gain_target)
    (args.out / "results.md").write_text(text)
    plot_curves(report, args.out / "validation_curves.png")
    print(text)
    return report


if __name__ == "__main__":
    main()
