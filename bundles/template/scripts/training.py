"""Ignite pieces every method bundle needs and MONAI does not ship: per-term loss logging, per-class Dice and a
warning when a class collapses to Dice 0, HD95 in millimetres, finding the checkpoint to resume from, and stopping
when the loss is no longer finite."""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.data.utils import affine_to_spacing
from monai.engines import Evaluator
from monai.handlers import IgniteMetricHandler, MeanDice, ValidationHandler, from_engine
from monai.metrics import HausdorffDistanceMetric

from .checkpoints import checkpoint_number

logger = logging.getLogger(__name__)

# The loss value of a SupervisedTrainer's (decollated) output.
LOSS_OUTPUT = from_engine(["loss"], first=True)


class LossTermsHandler:
    """Put the epoch mean of each loss term into ``engine.state.metrics`` as ``train_<term>``.

    ``loss_function.terms`` must map term names to detached scalar tensors of the last call. Attach this handler
    before StatsHandler and TensorBoardStatsHandler so they log the terms at the end of each epoch. A term present
    in only some iterations (logged every few) is averaged over those.
    """

    def __init__(self, loss_function: torch.nn.Module) -> None:
        self.loss_function = loss_function
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: Counter[str] = Counter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._publish)

    def _reset(self, engine: Engine) -> None:
        self._sums.clear()
        self._counts.clear()

    def _accumulate(self, engine: Engine) -> None:
        for name, value in self.loss_function.terms.items():
            self._sums[name] += float(value)
            self._counts[name] += 1

    def _publish(self, engine: Engine) -> None:
        for name, total in self._sums.items():
            engine.state.metrics[f"train_{name}"] = total / self._counts[name]


def metric_name(class_name: str) -> str:
    """``"grey matter"`` -> ``"grey_matter"``: a name that TensorBoard, MLflow and CSV headers accept."""
    return re.sub(r"\W+", "_", class_name.strip().lower()).strip("_")


def _channel(index: int):
    def select(output: Sequence[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        preds, labels = from_engine(["pred", "label"])(output)
        return [p[index : index + 1] for p in preds], [y[index : index + 1] for y in labels]

    return select


def per_class_dice(class_names: Sequence[str]) -> dict[str, MeanDice]:
    """One ``val_dice_<class>`` metric per foreground class, on one-hot ``pred``/``label`` of shape (C, *S)."""
    return {
        f"val_dice_{metric_name(name)}": MeanDice(include_background=True, output_transform=_channel(index))
        for index, name in enumerate(class_names)
        if index > 0
    }


class CollapsedClassWarning:
    """Warn when a foreground class has a validation Dice of exactly 0 in ``patience`` validations in a row.

    A Dice of 0 on a class that is in the validation labels means the network predicted none of its voxels: the
    class has collapsed (seen once in 5 tissue runs of the plain SegResNet without dropout, white matter never
    predicted in 8 epochs, docs/recipe.md). Training goes on; the warning makes the run's failure visible before
    its model is used. A class absent from the labels has a NaN Dice and is not counted.

    Args:
        class_names: the classes, background first (``val_dice_<class>`` of :func:`per_class_dice` are read).
        patience: validations in a row with Dice 0 before the warning; it is given once per streak.
    """

    def __init__(self, class_names: Sequence[str], patience: int = 2) -> None:
        self.class_names = list(class_names)[1:]
        self.patience = patience
        self.zero_streaks: Counter[str] = Counter()

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, evaluator: Engine) -> None:
        for name in self.class_names:
            dice = evaluator.state.metrics.get(f"val_dice_{metric_name(name)}")
            self.zero_streaks[name] = self.zero_streaks[name] + 1 if dice == 0 else 0
            if self.zero_streaks[name] == self.patience:
                logger.warning(
                    f"class '{name}' has had a validation Dice of 0 in {self.patience} validations in a row: the "
                    "network predicts none of it (a collapsed class). Train again with another --seed, keep SegResNet's "
                    "dropout (--backbones#segresnet#dropout_prob 0.2) or lower --learning_rate."
                )


def evaluation_metrics(class_names: Sequence[str], spacing: Sequence[float]) -> dict[str, IgniteMetricHandler]:
    """Per-class Dice (``val_dice_<class>``) and HD95 in mm (``val_hd95``, per class in the metric details)."""
    return {**per_class_dice(class_names), "val_hd95": HD95(spacing, output_transform=from_engine(["pred", "label"]))}


class _HausdorffDistanceMM(HausdorffDistanceMetric):
    def __init__(self, spacing: Sequence[float], **kwargs) -> None:
        super().__init__(**kwargs)
        self.spacing = [float(s) for s in spacing]

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return super()._compute_tensor(y_pred, y, spacing=self._spacing_of(y))

    def _spacing_of(self, y: torch.Tensor) -> list[float]:
        """The configured spacing; where it is 0 (slice-wise evaluation of a 2D model keeps each volume's own
        slice spacing, as ``Spacingd`` does), the spacing of ``y`` (a MetaTensor label, B = 1) from its affine."""
        if all(s > 0 for s in self.spacing):
            return self.spacing
        own = affine_to_spacing(y.affine.reshape(-1, 4, 4)[0], r=len(self.spacing))
        return [s if s > 0 else float(o) for s, o in zip(self.spacing, own)]


class HD95(IgniteMetricHandler):
    """95th-percentile Hausdorff distance in millimetres per foreground class.

    MONAI's ``HausdorffDistance`` handler passes no voxel spacing, so its distances are in voxels; this one
    passes the spacing of the resampled grid the evaluator works on.
    """

    def __init__(self, spacing: Sequence[float], output_transform=lambda x: x, save_details: bool = True) -> None:
        metric = _HausdorffDistanceMM(spacing=spacing, include_background=False, percentile=95.0, reduction="mean")
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)


def latest_checkpoint(ckpt_dir: str, pattern: str = "checkpoint_epoch=*.pt") -> str | None:
    """The newest interval checkpoint in ``ckpt_dir`` (by epoch number), or None when training starts fresh."""
    found = glob.glob(os.path.join(ckpt_dir, pattern))
    if not found:
        return None
    return max(found, key=lambda p: checkpoint_number(Path(p)))


class StopOnNonFinite:
    """Stop training with FloatingPointError when the loss or the network's weights become NaN or Inf.

    The loss is checked after every iteration and the weights at the end of every epoch (the last step of an
    epoch can break them after a finite loss). Attach this handler before the ValidationHandler and the
    checkpoint savers: it raises before they run, so nothing of the bad epoch replaces the last good checkpoint
    or ``model.pt``. ignite's TerminateOnNan would end the run as if it had finished (exit status 0).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        ckpt_dir: str,
        checkpoint_pattern: str = "checkpoint_epoch=*.pt",
        output_transform: Callable = LOSS_OUTPUT,
    ) -> None:
        self.network = network
        self.ckpt_dir = ckpt_dir
        self.checkpoint_pattern = checkpoint_pattern
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.check_loss)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.check_weights)

    def check_loss(self, engine: Engine) -> None:
        loss = torch.as_tensor(self.output_transform(engine.state.output)).detach()
        bad = loss[~torch.isfinite(loss)]
        if bad.numel():
            iteration = (engine.state.iteration - 1) % engine.state.epoch_length + 1
            self._stop(engine, f"the loss is {bad.flatten()[0].item()} at iteration {iteration}")

    def check_weights(self, engine: Engine) -> None:
        broken = [name for name, p in self.network.named_parameters() if not torch.isfinite(p.detach()).all()]
        if broken:
            self._stop(engine, f"{len(broken)} weight tensors hold NaN or Inf ({broken[0]}, ...) at the end")

    def _stop(self, engine: Engine, problem: str) -> None:
        last = latest_checkpoint(self.ckpt_dir, self.checkpoint_pattern)
        kept = f"{last} is the last good checkpoint" if last else f"no checkpoint was saved in {self.ckpt_dir} yet"
        raise FloatingPointError(
            f"Training stopped: {problem} of epoch {engine.state.epoch}. Nothing of this epoch was saved: {kept}, "
            "and the best model saved by validation is unchanged. Check the data, or train again from the start "
            "(--resume False) with a lower --learning_rate or with --amp False: resuming restores the optimiser "
            "and its learning rate."
        )


class TimeShareValidationHandler(ValidationHandler):
    """MONAI's ``ValidationHandler`` on a schedule that spends about ``share`` of the training time on validation.

    At the end of every ``interval``-th epoch it validates when the training time since the last validation, times
    ``share``, is at least as long as that validation took; the first checked epoch and the last epoch
    (``max_epochs``) are always validated, so ``models/model.pt`` exists and reflects the end of training. With
    ``share=None`` every ``interval``-th epoch is validated (MONAI's behaviour). The measured share (validation
    seconds / training seconds so far, training time being the wall time outside validation) is logged after each
    validation and kept as ``measured_share``. Under torch.distributed the ranks follow rank 0's clock.
    """

    def __init__(
        self, validator: Evaluator, share: float | None = 0.1, interval: int = 1, exec_at_start: bool = False
    ) -> None:
        if share is not None and share <= 0:
            raise ValueError(
                f"the validation share of training time must be > 0 (or None: every interval), got {share}"
            )
        super().__init__(interval=interval, validator=validator, epoch_level=True, exec_at_start=exec_at_start)
        self.share = share
        self.last_duration: float | None = None
        self.train_seconds = 0.0
        self.val_seconds = 0.0
        self._since_validation = 0.0
        self._mark: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        super().attach(engine)

    def _start(self, engine: Engine) -> None:
        self._mark = time.perf_counter()

    def due(self, engine: Engine) -> bool:
        """Whether this epoch validates (the training time since the last validation is already counted). Under
        torch.distributed every rank takes rank 0's decision: the ranks validate together or not at all."""
        if self.share is None or self.last_duration is None or engine.state.epoch >= (engine.state.max_epochs or 0):
            return True
        decision = [self._since_validation * self.share >= self.last_duration]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(decision, src=0)
        return bool(decision[0])

    def __call__(self, engine: Engine) -> None:
        now = time.perf_counter()
        if self._mark is not None:
            self._since_validation += now - self._mark
            self.train_seconds += now - self._mark
        self._mark = now
        if not self.due(engine):
            return
        super().__call__(engine)
        self._mark = time.perf_counter()
        self.last_duration = self._mark - now
        self.val_seconds += self.last_duration
        self._since_validation = 0.0
        if dist.is_available() and dist.is_initialized() and dist.get_rank() > 0:
            return
        logger.info(
            f"validation took {self.last_duration:.1f} s; {self.val_seconds:.1f} s of validation for "
            f"{self.train_seconds:.1f} s of training so far: a measured share of {self.measured_share:.3f} "
            f"(scheduled share {self.share})"
        )

    @property
    def measured_share(self) -> float:
        return self.val_seconds / self.train_seconds if self.train_seconds > 0 else 0.0
