"""The method registry: one ``bundles/methods/<method>/method.json`` per method, read by the tests,
``compare_methods.py``, ``benchmark.py``, ``accuracy_study.py`` and the MONAI Label check, so that no tool needs
``if bundle.name == ...``.

Fields of ``method.json``:

- ``bundle``: the generated bundle's folder under ``bundles/``; ``title``: the name in reports.
- ``backbones``: the backbones the method supports (``--backbone``); ``weights``: the config ids of its weights
  (all 0 is the plain baseline).
- ``arms``: name -> bundle command-line overrides; the first arm is the plain baseline, the last the full method.
  ``compare_against``: the arm the method is measured against (SemSim: FixMatch).
- ``training``: the config files and run id that train the method; ``stage1``: a prerequisite stage (ReSeg's
  teacher: configs, run id and the file it writes) or null.
- ``unlabeled``: null, or ``{"labeled": N}``: the method needs unlabeled images, and its comparison keeps N labels.
- ``tasks``: the real-MRI tasks of its comparison; ``cost_target``: the training-step ratio against
  ``compare_against``; ``dice_gain_target``: the Dice gain it promises over ``compare_against``;
  ``baseline_dice_target``: task -> the held-out mean Dice its baseline arm must reach in a comparison's budget
  (optional: a budget that leaves the baseline below it compares undertrained models).
- ``small_run``: overrides that shrink the method's own parts for CPU tests and benchmarks.
- ``metadata``: the method's part of ``configs/metadata.json`` (name, task, description, references, changelog
  entries), merged into the template's by ``generate_bundles.py``.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
METHODS_DIR = REPO / "bundles" / "methods"


@dataclass(frozen=True)
class Stage:
    """Config files and run id of one training stage, and the file a prerequisite stage writes."""

    configs: tuple[str, ...]
    run_id: str
    writes: str | None = None


@dataclass(frozen=True)
class Method:
    name: str
    bundle: str
    title: str
    backbones: tuple[str, ...]
    weights: tuple[str, ...]
    arms: dict[str, str]
    compare_against: str
    training: Stage
    stage1: Stage | None
    labeled: int | None
    tasks: tuple[str, ...]
    step_ratio_target: float
    dice_gain_target: float
    baseline_dice_target: dict[str, float]
    small_run: tuple[str, ...]

    @property
    def bundle_dir(self) -> Path:
        return REPO / "bundles" / self.bundle

    @property
    def baseline_arm(self) -> str:
        return next(iter(self.arms))

    @property
    def method_arm(self) -> str:
        return list(self.arms)[-1]

    @property
    def needs_unlabeled(self) -> bool:
        return self.labeled is not None

    def arm_overrides(self, arm: str) -> list[str]:
        """The arm's overrides as command-line words (``["--selfreg_weight", "0"]``)."""
        return shlex.split(self.arms[arm])

    def zero_weights(self) -> list[str]:
        """Overrides that turn every weight of the method off: the plain backbone baseline."""
        return [word for weight in self.weights for word in (f"--{weight}", "0")]


def _stage(entry: dict[str, Any] | None) -> Stage | None:
    if entry is None:
        return None
    return Stage(tuple(entry["configs"]), entry["run_id"], entry.get("writes"))


def load(path: Path) -> Method:
    entry = json.loads(path.read_text())
    arms = dict(entry["arms"])
    if entry["compare_against"] not in arms:
        raise ValueError(f"{path}: compare_against {entry['compare_against']!r} is not one of the arms {list(arms)}")
    unlabeled = entry.get("unlabeled")
    return Method(
        name=path.parent.name,
        bundle=entry["bundle"],
        title=entry["title"],
        backbones=tuple(entry["backbones"]),
        weights=tuple(entry["weights"]),
        arms=arms,
        compare_against=entry["compare_against"],
        training=_stage(entry["training"]),
        stage1=_stage(entry.get("stage1")),
        labeled=unlabeled["labeled"] if unlabeled else None,
        tasks=tuple(entry["tasks"]),
        step_ratio_target=float(entry["cost_target"]["step_ratio"]),
        dice_gain_target=float(entry["dice_gain_target"]),
        baseline_dice_target={task: float(v) for task, v in entry.get("baseline_dice_target", {}).items()},
        small_run=tuple(entry.get("small_run", ())),
    )


def all_methods() -> tuple[Method, ...]:
    return tuple(load(p) for p in sorted(METHODS_DIR.glob("*/method.json")))


def by_name(name: str) -> Method:
    for method in all_methods():
        if name in (method.name, method.bundle):
            return method
    raise KeyError(f"no method {name!r}; known: {[m.name for m in all_methods()]}")
