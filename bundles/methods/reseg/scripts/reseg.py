"""ReSeg (reconstruction-guided feature consistency, Li-gzhu/ReSeg-UNet) as a two-stage recipe on MONAI backbones.

Stage 1 trains a reconstruction network, the same backbone with the label map as input and the image as target,
with L_rec = 0.6 * MSE + 0.4 * L1. Stage 2 freezes a copy of it as the teacher and trains the segmentation network
with (the authors' train_unet_se.py; no paper was found, so its loss is the equation cited)

    L = ce_weight * CE + dice_weight * Dice + a * L_opt,
    L_opt = ( MSE(s.e1, r.d1) + MSE(s.e2, r.d2) + MSE(s.e3, r.d3)      # seg encoder  vs recon decoder
            + MSE(s.d1, r.e1) + MSE(s.d2, r.e2) + MSE(s.d3, r.e3)      # seg decoder  vs recon encoder
            + MSE(s.d1, r.d1) ) / 3                                    # "mid": deepest decoder map vs same

where e_k / d_k are the encoder / decoder maps of the k-th deepest resolution level that has both (the seed's
x4, x3, x2 and u1, u2, u3), s the segmentation network on the image and r the frozen teacher on the label;
a = 0.035, CE and Dice weighted 0.5 each (seed 000 and the authors' train_unet_se.py). Each map is standardised
per channel before its MSE by default (``reseg_feature_norm``), because MONAI's blocks, unlike the seed's, do not
end in a normalisation (see :func:`feature_consistency`).

L is the template's ``RegularisedLoss``: its ``seg_loss`` is the DiceCE term (``ce_weight``, ``dice_weight``),
:class:`ReSegRegulariser` returns ``{"opt": L_opt}`` as the regulariser ``reseg``, and ``regulariser_weights#reseg``
is a (``reseg_weight``). The teacher is :func:`frozen_teacher`, a copy of the stage-1 network, never the stage-1
network itself.

Features are read by forward hooks (:class:`FeatureTaps`) on unmodified MONAI networks, so the trained network,
its ``state_dict``, its inference and its export are those of the plain backbone.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Engine
from monai.networks import nets
from monai.networks.utils import one_hot

from .backbones import unwrap
from .feature_taps import FeatureTaps, pool_to_size
from .training import latest_checkpoint

logger = logging.getLogger(__name__)

LabelEncoding = Literal["onehot", "index"]
FeatureNorm = Literal["instance", "none"]
Pair = Sequence[str]  # (module name in the segmentation network, module name in the reconstruction network)

STAGE_ONE_COMMAND = (
    "python -m monai.bundle run training --config_file \"['configs/train.json','configs/train_reconstruction.json']\" "
    "--meta_file configs/metadata.json --logging_file configs/logging.conf"
)


def matched_levels(network: torch.nn.Module) -> list[tuple[str, str]]:
    """(encoder module, decoder module) of every resolution level where the backbone has an encoder map and a
    decoder map of the same shape, shallowest first.

    - SegResNet: ``down_layers.i`` <-> ``up_layers.{n-1-i}`` (init_filters * 2**i channels at 1/2**i), for the n
      levels above the bottleneck ``down_layers.n``.
    - UNet: the down ResidualUnit of level k (``model.0``, ``model.1.submodule.0``, ...) <-> the up block of the
      level below it (``model.1.submodule.2``, ``model.1.submodule.1.submodule.2``, ...): MONAI's up blocks
      up-sample at their end, so that block's output has channels[k] at the down unit's resolution. The deepest
      down unit has no partner (its level's up block up-samples away from it) and the top block ``model.2``
      outputs the logits.
    - SwinUNETR: ``encoder{k}`` <-> ``decoder{k}``, k = 1..4 (feature_size * 2**(k-1) channels at 1/2**(k-1)).
    """
    network = unwrap(network)
    if isinstance(network, nets.SegResNet):
        n = len(network.up_layers)
        return [(f"down_layers.{i}", f"up_layers.{n - 1 - i}") for i in range(n)]
    if isinstance(network, nets.UNet):
        module_names = {name for name, _ in network.named_modules()}
        levels, down, level = [], "model.0", "model.1.submodule"
        # model = Sequential(down, SkipConnection(Sequential(down, SkipConnection(...), up)), up)
        while f"{level}.2" in module_names:
            levels.append((down, f"{level}.2"))
            down, level = f"{level}.0", f"{level}.1.submodule"
        return levels
    if isinstance(network, nets.SwinUNETR):
        return [(f"encoder{k}", f"decoder{k}") for k in range(1, 5)]
    raise TypeError(
        f"no default ReSeg pairing for {type(network).__name__}: give reseg_pairs in the config as a list of "
        "[segmentation module, reconstruction module] names from network.named_modules()"
    )


def default_pairs(network: torch.nn.Module, levels: int = 3) -> list[tuple[str, str]]:
    """The seed's seven pairs for a MONAI SegResNet, UNet or SwinUNETR, in the seed's order.

    With (e_k, d_k) the encoder and decoder maps of the k-th deepest level of :func:`matched_levels`
    (k = 1..``levels``): (s.e_k, r.d_k) for each k, (s.d_k, r.e_k) for each k, then the "mid" pair (s.d_1, r.d_1).
    Both networks are the same backbone, so a pair names the same module on each side.

    "Mid" is the seed's ``bridge_x``: its first decoder stage u1, which is also the decoder map of its deepest
    paired level. Those coincide for SegResNet (``up_layers.0``) and UNet; for SwinUNETR the first decoder stage
    ``decoder5`` lies below the deepest level with an encoder block, so the deeper reading is kept: ``decoder4``.
    """
    available = matched_levels(network)
    if len(available) < levels:
        raise ValueError(
            f"{type(unwrap(network)).__name__} has {len(available)} levels with an encoder and a decoder map of "
            f"equal shape ({available}), ReSeg pairs {levels}: give the backbone more down-sampling levels (UNet: "
            "len(strides) >= 4) or set reseg_pairs in the config"
        )
    deepest = available[::-1][:levels]
    return [*((e, d) for e, d in deepest), *((d, e) for e, d in deepest), (deepest[0][1], deepest[0][1])]


def pair_taps(network: torch.nn.Module, pairs: Sequence[Pair], side: Literal["student", "teacher"]) -> FeatureTaps:
    """The :class:`FeatureTaps` for one side of ``pairs``: the segmentation network's modules (first names),
    stored in training forward passes only, or the teacher's (second names), stored in every forward pass, as the
    teacher runs in eval mode under ``no_grad``."""
    if side not in ("student", "teacher"):
        raise ValueError(f"side must be 'student' or 'teacher', got {side!r}")
    index = 0 if side == "student" else 1
    return FeatureTaps(network, [pair[index] for pair in pairs], training_only=side == "student")


def encode_label(label: torch.Tensor, num_classes: int, encoding: LabelEncoding = "onehot") -> torch.Tensor:
    """The reconstruction network's input from a label map (B, 1, *S) of class indices: one-hot (B, num_classes,
    *S), or the raw index as a float intensity (B, 1, *S) as in the seed's ``UNet_hd.forward``."""
    label = label.as_subclass(torch.Tensor)  # plain tensor: MetaTensor metadata is of no use to the network
    if encoding == "onehot":
        return one_hot(label, num_classes, dim=1, dtype=torch.float32)
    if encoding == "index":
        return label.float()
    raise ValueError(f"reseg_label_encoding must be 'onehot' or 'index', got {encoding!r}")


class LabelToImageBatch:
    """``prepare_batch`` for stage 1: the network input is the encoded label, the target is the image.

    Called by MONAI's SupervisedTrainer / SupervisedEvaluator as ``prepare_batch(batchdata, device,
    non_blocking)``; returns (encode_label(label) (B, C_in, *S), image (B, C_img, *S)).
    """

    def __init__(self, num_classes: int, label_encoding: LabelEncoding = "onehot") -> None:
        encode_label(torch.zeros(1, 1, 1), num_classes, label_encoding)  # refuse a bad encoding now, not at step 1
        self.num_classes, self.label_encoding = num_classes, label_encoding

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        label = batchdata["label"].to(device=device, non_blocking=non_blocking)
        image = batchdata["image"].to(device=device, non_blocking=non_blocking)
        return encode_label(label, self.num_classes, self.label_encoding), image.as_subclass(torch.Tensor)


class ReconstructionLoss(torch.nn.Module):
    """Stage-1 loss L_rec = mse_weight * MSE(pred, image) + l1_weight * L1(pred, image), 0.6 and 0.4 in the seed.

    ``forward(pred, target)`` takes (B, C_img, *S) each; ``terms`` holds the detached ``mse``, ``l1``, ``total``.
    Unlike the seed (``n_classes`` output channels broadcast against a 1-channel image), the network has as many
    output channels as the image.
    """

    def __init__(self, mse_weight: float = 0.6, l1_weight: float = 0.4) -> None:
        super().__init__()
        self.mse_weight, self.l1_weight = mse_weight, l1_weight
        self.terms: dict[str, torch.Tensor] = {}

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(
                f"reconstruction {list(pred.shape)} and image {list(target.shape)} differ: the "
                "reconstruction network's out_channels must be the image's in_channels"
            )
        mse, l1 = F.mse_loss(pred, target), F.l1_loss(pred, target)
        total = self.mse_weight * mse + self.l1_weight * l1
        self.terms = {"mse": mse.detach(), "l1": l1.detach(), "total": total.detach()}
        return total


STAGE_ONE_CHECKPOINTS = "reconstruction_checkpoint_epoch=*.pt"


def stage_one_pending(teacher_checkpoint: str, ckpt_dir: str, pattern: str = STAGE_ONE_CHECKPOINTS) -> bool:
    """Whether stage 1 has to run before stage 2 in this training run: the teacher ``teacher_checkpoint`` does not
    exist, or the newest stage-1 interval checkpoint in ``ckpt_dir`` is of a run that stopped before its last
    iteration (a crash mid-stage-1 leaves the best teacher so far; stage 1 then resumes from that checkpoint). A
    finished teacher is never retrained here: run id ``training`` of train_reconstruction.json retrains it."""
    if not os.path.isfile(teacher_checkpoint):
        return True
    newest = latest_checkpoint(ckpt_dir, pattern)
    if newest is None:
        return False
    trainer = torch.load(newest, map_location="cpu", weights_only=True)["trainer"]
    return trainer["iteration"] < trainer["max_epochs"] * trainer["epoch_length"]


def run_stage_one(
    trainer: Engine, checkpoint_saver: Any | None, resume_loader: Any | None, teacher_checkpoint: str
) -> None:
    """Train the stage-1 reconstruction network (the teacher) in this run, then return so that stage 2 follows.

    ``checkpoint_saver`` (None on ranks other than 0) and ``resume_loader`` (None when starting fresh) are attached
    to ``trainer`` first. Progress is the stage-1 trainer's own (loss per iteration, validation per epoch), framed by
    one log line before and after. Refused under torchrun with more than one process, where every rank would train
    a teacher of its own."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"ReSeg stage 2 needs the stage-1 teacher {teacher_checkpoint}, which is missing or unfinished, and "
            "stage 1 runs in one process. Train it first without torchrun, with the same data and settings:\n"
            f"    {STAGE_ONE_COMMAND} --bundle_root ... --dataset_dir ...\nthen start this multi-process run again."
        )
    state = trainer.state
    logger.info(
        f"ReSeg stage 1 of 2: training the teacher (label-to-image reconstruction network) for {state.max_epochs} "
        f"epoch(s) of {state.epoch_length} iterations, because {teacher_checkpoint} is missing or unfinished; stage 2 "
        "(segmentation) follows in this run"
    )
    if checkpoint_saver is not None:
        checkpoint_saver.attach(trainer)
    if resume_loader is not None:
        resume_loader.attach(trainer)
    trainer.run()
    if not os.path.isfile(teacher_checkpoint):
        raise RuntimeError(
            f"ReSeg stage 1 ended without writing the teacher {teacher_checkpoint}: it is written at stage 1's "
            "validation, so give stage 1 at least one validation (val_interval, max_epochs)"
        )
    logger.info(f"ReSeg stage 1 done, teacher {teacher_checkpoint}; stage 2 of 2: segmentation with the teacher")


def _pool_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, *S) -> (B, channels, *S) by averaging consecutive channel groups (adaptive average pooling)."""
    if x.shape[1] == channels:
        return x
    flat = x.movedim(1, -1).reshape(-1, 1, x.shape[1])
    return F.adaptive_avg_pool1d(flat, channels).reshape(*x.shape[:1], *x.shape[2:], channels).movedim(-1, 1)


def match_shapes(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two maps (B, C_s, *S_s) and (B, C_t, *S_t) to a common shape without parameters: the larger is
    adaptive-average-pooled to the element-wise smaller spatial size, then to the smaller channel count (means of
    consecutive channel groups). The default pairs always have equal shapes, so this only acts on pairs given in
    the config; nothing is ever up-sampled, and no projection is learned that could absorb the difference."""
    size = [min(s, t) for s, t in zip(student.shape[2:], teacher.shape[2:])]
    channels = min(student.shape[1], teacher.shape[1])
    return (
        _pool_channels(pool_to_size(student, size), channels),
        _pool_channels(pool_to_size(teacher, size), channels),
    )


def _check_feature_norm(feature_norm: str) -> FeatureNorm:
    if feature_norm not in ("instance", "none"):
        raise ValueError(f"reseg_feature_norm must be 'instance' or 'none', got {feature_norm!r}")
    return feature_norm


def standardize_channels(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each channel of each sample of (B, C, *S) to zero mean and unit variance over its spatial positions
    (instance normalisation without affine parameters; a map of one position becomes 0)."""
    spatial = tuple(range(2, x.dim()))
    variance, mean = torch.var_mean(x, dim=spatial, keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(variance + eps)


def feature_consistency(
    student: Mapping[str, torch.Tensor],
    teacher: Mapping[str, torch.Tensor],
    pairs: Sequence[Pair],
    pair_weights: Sequence[float] | None = None,
    divisor: float = 3.0,
    feature_norm: FeatureNorm = "instance",
) -> torch.Tensor:
    """L_opt = sum_i w_i * MSE(n(student[pairs[i][0]]), n(teacher[pairs[i][1]])) / divisor (seed: w_i = 1, divisor 3).

    n is :func:`standardize_channels` (``feature_norm="instance"``, the default) or the identity (``"none"``, the
    seed's formula on raw maps). The seed's maps all end in BatchNorm + ReLU, so their scale is fixed near 1 and
    a = 0.035 weighs L_opt at a few percent of the segmentation loss; MONAI's SegResNet, UNet and SwinUNETR blocks
    end in residual sums without a closing normalisation, whose scale grows with training (the docs give the
    measurements), so the bundle standardises each map per channel before the MSE to keep the seed's scale and
    the meaning of a. Each standardised MSE lies in [0, 4] (it is 2 * (1 - correlation) averaged over channels).

    MSE is the mean over all elements (``F.mse_loss``), in float32 so that AMP features do not lose the small
    differences; mismatched shapes go through :func:`match_shapes` before normalising.
    """
    _check_feature_norm(feature_norm)
    weights = [1.0] * len(pairs) if pair_weights is None else list(pair_weights)
    if len(weights) != len(pairs):
        raise ValueError(f"reseg_pair_weights has {len(weights)} entries for {len(pairs)} reseg_pairs")
    total = 0.0
    for (s_name, t_name), w in zip(pairs, weights):
        s, t = match_shapes(student[s_name].float(), teacher[t_name].float())
        if feature_norm == "instance":
            s, t = standardize_channels(s), standardize_channels(t)
        total = total + w * F.mse_loss(s, t)
    return total / divisor


def frozen_teacher(network: torch.nn.Module, device: str | torch.device | None = None) -> torch.nn.Module:
    """The stage-2 teacher r: a deep copy of the stage-1 reconstruction network ``network`` (``reconstruction_def``),
    moved to ``device``, with no parameter requiring gradient and in eval mode.

    A copy, because the config caches ``reconstruction_def`` and stage 1 trains that very instance
    (``reconstruction#network``): freezing it in place would stop stage 1 from training whenever stage 2's loss is
    built first, as resolving a train workflow's properties (``train#trainer``) does. The copy's weights do not
    matter: stage 2 loads ``models/reconstruction.pt`` into it strictly (``teacher_loader``) before its first step.
    """
    teacher = copy.deepcopy(unwrap(network))
    if device is not None:
        teacher = teacher.to(device)
    return teacher.requires_grad_(False).eval()


class ReSegRegulariser(torch.nn.Module):
    """ReSeg's feature-consistency term as the regulariser ``reseg`` of the template's ``RegularisedLoss``:
    ``forward(logits, label, extras) -> {"opt": L_opt}``, L_opt of the authors' train_unet_se.py (module docstring):

        L_opt = sum_i w_i * MSE(n(s[p_i]), n(r[q_i])) / divisor,   L = L_seg + a * L_opt,

    a (``reseg_weight``, the seed's 0.035) being applied by ``RegularisedLoss`` (``regulariser_weights#reseg``),
    and L_seg (``seg_loss``: ce_weight * CE + dice_weight * Dice, 0.5 and 0.5 in the seed) computed there. The
    term is logged as ``train_reseg_opt``, beside ``train_seg`` and ``train_total``.

    Args:
        student_taps: :class:`FeatureTaps` on the segmentation network (training forward passes only) for the
            pairs' first names p_i.
        teacher: the stage-1 reconstruction network r, its own instance (:func:`frozen_teacher`), not the network
            stage 1 trains. It is frozen here (no parameter requires grad) and kept in eval mode, and runs under
            ``torch.no_grad()`` on the encoded label at every call.
        teacher_taps: :class:`FeatureTaps` on ``teacher`` with ``training_only=False``, for the pairs' second
            names q_i.
        pairs: (student module, teacher module) names, :func:`default_pairs` for the seed's seven.
        divisor: L_opt's divisor, the seed's 3 (not the number of pairs).
        pair_weights: w_i, one weight per pair; None for all 1, as in the seed.
        feature_norm: n: "instance" (default) standardises every tapped map per channel before the MSE, "none" uses
            the raw maps as the seed does (see :func:`feature_consistency` for why).
        num_classes, label_encoding: how the label becomes the teacher's input, as in stage 1 (:func:`encode_label`).

    ``forward`` takes logits (B, K, *S) (unused: the student's features come from its taps, filled by the training
    forward pass that made the logits), labels (B, 1, *S) of class indices and the network's extras (unused), and
    returns ``{"opt": L_opt}``, a float32 scalar with gradient to the segmentation network only.
    """

    def __init__(
        self,
        student_taps: FeatureTaps,
        teacher: torch.nn.Module,
        teacher_taps: FeatureTaps,
        pairs: Sequence[Pair],
        divisor: float = 3.0,
        pair_weights: Sequence[float] | None = None,
        feature_norm: FeatureNorm = "instance",
        num_classes: int = 2,
        label_encoding: LabelEncoding = "onehot",
    ) -> None:
        super().__init__()
        if student_taps is None or teacher is None or teacher_taps is None or not pairs:
            raise ValueError(
                "the ReSeg regulariser needs student taps, the teacher, its taps and at least one pair; "
                "set reseg_weight 0 for the baseline (the regulariser is then disabled)"
            )
        if divisor <= 0:
            raise ValueError(f"reseg_divisor must be positive, got {divisor}")
        if pair_weights is not None and len(pair_weights) != len(pairs):
            raise ValueError(f"reseg_pair_weights has {len(pair_weights)} entries for {len(pairs)} reseg_pairs")
        encode_label(torch.zeros(1, 1, 1), num_classes, label_encoding)  # refuse a bad encoding now, not at step 1
        self.student_taps, self.teacher_taps = student_taps, teacher_taps
        self.teacher = teacher.requires_grad_(False).eval()
        self.pairs = [tuple(p) for p in pairs]
        self.pair_weights, self.divisor, self.feature_norm = pair_weights, divisor, _check_feature_norm(feature_norm)
        self.num_classes, self.label_encoding = num_classes, label_encoding

    def train(self, mode: bool = True) -> ReSegRegulariser:
        super().train(mode)
        self.teacher.eval()  # the teacher's normalisation layers use their stage-1 statistics, never the batch's
        return self

    def teacher_forward(self, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's tapped maps r[q_i] on the encoded label (B, 1, *S), without gradient."""
        with torch.no_grad():
            self.teacher(encode_label(label, self.num_classes, self.label_encoding))
        return self.teacher_taps.pop()

    def forward(self, logits: torch.Tensor, label: torch.Tensor, extras: object = None) -> dict[str, torch.Tensor]:
        student = self.student_taps.pop()
        teacher = self.teacher_forward(label)
        return {
            "opt": feature_consistency(student, teacher, self.pairs, self.pair_weights, self.divisor, self.feature_norm)
        }
