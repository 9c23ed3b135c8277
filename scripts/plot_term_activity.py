"""Plot whether SemSim's unlabelled terms are active, from the training log of a run.

The bundle logs, per epoch (MONAI's ``StatsHandler``: ``Epoch[k] Metrics -- name: value ...``), for L_u, L_intra and
L_cross the share of the voxels pseudo-labelled c that pass the term's tau mask (``train_<term>_pass_<c>``), and,
with ``--term_gradient_interval N``, each weighted term's gradient norm on the backbone (``train_grad_<term>``).
This draws both against the epoch, one panel each, foreground classes only for the pass shares:

    python scripts/plot_term_activity.py RUN.log --out docs/results/semsim_term_activity.png [--title TEXT]
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI machines and servers
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

EPOCH_METRICS = re.compile(r"Epoch\[(?P<epoch>\d+)\] Metrics -- (?P<metrics>.*)$")
METRIC = re.compile(r"(?P<name>\w+): (?P<value>[-+\d.eE]+|nan|inf)")
PASS = re.compile(r"train_(?P<term>unlabeled|intra|cross)_pass_(?P<cls>\d+)$")
GRADIENT = re.compile(r"train_grad_(?P<term>\w+)$")


def read_epoch_metrics(lines: Iterable[str], prefix: str = "train_") -> dict[int, dict[str, float]]:
    """``{epoch: {metric: value}}`` of the metrics named ``prefix*`` (training: ``train_``, validation: ``val_``) in a
    bundle's log; a later line of the same epoch (a resumed run) replaces the earlier values."""
    epochs: dict[int, dict[str, float]] = {}
    for line in lines:
        found = EPOCH_METRICS.search(line.rstrip())
        if found is None:
            continue
        metrics = {m["name"]: float(m["value"]) for m in METRIC.finditer(found["metrics"])}
        chosen = {name: value for name, value in metrics.items() if name.startswith(prefix)}
        if chosen:
            epochs.setdefault(int(found["epoch"]), {}).update(chosen)
    return epochs


def series(epochs: dict[int, dict[str, float]], pattern: re.Pattern) -> dict[str, list[tuple[int, float]]]:
    """Each metric whose name matches ``pattern`` as (epoch, value) points in epoch order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for epoch in sorted(epochs):
        for name, value in epochs[epoch].items():
            if pattern.match(name):
                out.setdefault(name, []).append((epoch, value))
    return out


def plot(epochs: dict[int, dict[str, float]], png: Path, title: str = "") -> Path:
    """Pass shares of the foreground classes (left) and gradient norms per term (right) against the epoch."""
    shares = {n: p for n, p in series(epochs, PASS).items() if PASS.match(n)["cls"] != "0"}
    gradients = series(epochs, GRADIENT)
    if not shares:
        raise ValueError("no train_<term>_pass_<c> metrics of a foreground class in the log: is it a SemSim run?")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in sorted(shares.items()):
        left.plot(*zip(*points), marker="o", label=name.removeprefix("train_"))
    left.set(xlabel="epoch", ylabel="share of voxels passing tau", ylim=(0, 1), title="pseudo-labels passing tau")
    left.legend(fontsize=7)
    for name, points in sorted(gradients.items()):
        right.plot(*zip(*points), marker="o", label=name.removeprefix("train_grad_"))
    right.set(xlabel="epoch", ylabel="gradient norm on the backbone", title="weighted term gradients")
    if gradients:
        right.set_yscale("log")
        right.legend(fontsize=7)
    else:
        right.text(0.5, 0.5, "no train_grad_* metrics\n(run with --term_gradient_interval N)", ha="center")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return png


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="a training run's log (stdout of python -m monai.bundle run ...)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    if not args.log.is_file():
        raise SystemExit(f"{args.log}: no such log file")
    with open(args.log, errors="replace") as log:
        epochs = read_epoch_metrics(log)
    if not epochs:
        raise SystemExit(f"{args.log}: no 'Epoch[k] Metrics -- train_...' lines: pass the training run's log")
    print(plot(epochs, args.out, args.title))


if __name__ == "__main__":
    main()
