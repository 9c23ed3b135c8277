"""SemSim's training step on MONAI's SupervisedTrainer: the views of one iteration and the passes that produce them.

MONAI's ``SupervisedTrainer`` runs ``loss_function(network(inputs), targets)`` with AMP, gradient accumulation and
its events; SemSim fits it unchanged with

- ``prepare_batch`` = :class:`SemiSupervisedBatch`: moves the labeled and unlabeled views to the device and
  applies CutMix between unlabeled volumes of the batch to the two strong views;
- ``network`` = :class:`SemSimNetwork`: the backbone's passes over the labeled + weak, strong and
  feature-perturbed views, and the Spatial-aware Fusion Module on the encoder features read by forward hooks;
- ``loss_function`` = ``scripts.semsim.SemSimLoss`` on the outputs.

Only the backbone is saved as the model, so inference and export are those of the plain backbone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.networks import nets

from .backbones import required_divisor, unwrap
from .feature_taps import FeatureTaps

UNLABELED_KEYS = ("unlabeled_image", "unlabeled_strong1", "unlabeled_strong2")


def encoder_stages(network: torch.nn.Module) -> list[tuple[str, int]]:
    """(module name, down-sampling factor) of every encoder stage whose output the decoder uses, shallow first.

    - SegResNet: ``down_layers.i`` at 2**i (the last is the bottleneck).
    - UNet: the down ResidualUnit of each level (``model.0`` at the first stride, ``model.1.submodule.0``, ...)
      and the bottom unit (no stride); each feeds both its skip connection and the next level.
    - SwinUNETR: the residual encoder blocks ``encoder1..4`` (1, 2, 4, 8) and ``encoder10`` (32) on the image and
      ``swinViT``'s hidden states.
    """
    network = unwrap(network)
    if isinstance(network, nets.SegResNet):
        return [(f"down_layers.{i}", 2**i) for i in range(len(network.down_layers))]
    if isinstance(network, nets.UNet):
        names, level, factor = [], "model", 1
        for stride in network.strides:
            factor *= int(stride)
            names.append((f"{level}.0", factor))
            level = f"{level}.1.submodule"
        names.append((level, factor))
        return names
    if isinstance(network, nets.SwinUNETR):
        return [("encoder1", 1), ("encoder2", 2), ("encoder3", 4), ("encoder4", 8), ("encoder10", 32)]
    raise TypeError(
        f"no SemSim encoder stages for {type(network).__name__}: use SegResNet, UNet or SwinUNETR, or "
        "give semsim_fusion_stages and semsim_perturbed_stages in the config"
    )


def fusion_stages(network: torch.nn.Module) -> list[str]:
    """The encoder stages at 1/2, 1/4 and 1/8 of the input, the Spatial-aware Fusion Module's inputs.

    The paper fuses stages 2, 3 and 4 of its UNet, which lie at 1/2, 1/4 and 1/8 (stage 1 is full resolution), and
    predicts on the middle (1/4) grid; the bundle picks the stages at the same resolutions on every backbone.
    """
    by_factor = {}
    for name, factor in encoder_stages(network):
        by_factor.setdefault(factor, name)
    missing = [f for f in (2, 4, 8) if f not in by_factor]
    if missing:
        raise ValueError(
            f"{type(unwrap(network)).__name__} has no encoder stage at 1/{missing}: the fusion module "
            "needs stages at 1/2, 1/4 and 1/8; set semsim_fusion_stages in the config"
        )
    return [by_factor[f] for f in (2, 4, 8)]


def fusion_channels(network: torch.nn.Module, spatial_dims: int = 3) -> list[int]:
    """Channel counts of the :func:`fusion_stages`, read from one forward pass of a small zero input, so that any
    configuration of the backbone (init_filters, channels, feature_size) gives the fusion module's in_channels."""
    names = fusion_stages(network)
    size = 2 * max(16, required_divisor(network))  # a deepest map of at least 2 voxels for instance norms
    taps = FeatureTaps(network, names, training_only=False)
    mode = network.training
    try:
        with torch.no_grad():
            network.eval()(torch.zeros(1, _in_channels(network), *(size,) * spatial_dims))
        features = taps.pop()
    finally:
        taps.remove()
        network.train(mode)
    return [features[name].shape[1] for name in names]


def _in_channels(network: torch.nn.Module) -> int:
    first_conv = next(m for m in unwrap(network).modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    return first_conv.in_channels


def check_fusion_roi(network: torch.nn.Module, roi_size: Sequence[int], window_size: int = 2) -> tuple[int, ...]:
    """Refuse, before any data is loaded, a crop whose 1/8 grid the fusion module cannot cut into windows of
    ``window_size``: every size must be divisible by 8 * window_size (and by the backbone's own divisor)."""
    size = tuple(int(s) for s in roi_size)
    divisor = math.lcm(8 * window_size, required_divisor(network))
    bad = [s for s in size if s % divisor]
    if bad:
        raise ValueError(
            f"roi_size {list(size)} does not suit the Spatial-aware Fusion Module with sfm_window_size {window_size} "
            f"on {type(unwrap(network)).__name__}: every size must be divisible by {divisor}; set --roi_size to e.g. "
            f"{[max(divisor, round(s / divisor) * divisor) for s in size]} or a smaller --sfm_window_size"
        )
    return size


def perturbed_stages(network: torch.nn.Module) -> list[str]:
    """The modules whose outputs the feature-perturbation pass drops channels of: every encoder feature the
    decoder reads. For SwinUNETR that is the image stem ``encoder1`` and ``swinViT``'s hidden states (before the
    residual encoder blocks, so the raw fourth state the decoder also reads is perturbed too). The encoder itself
    computes from clean features (:class:`ChannelDropout`)."""
    if isinstance(unwrap(network), nets.SwinUNETR):
        return ["encoder1", "swinViT"]
    return [name for name, _ in encoder_stages(network)]


class ChannelDropout:
    """UniMatch's feature perturbation (``nn.Dropout2d(0.5)`` on the encoder features handed to the decoder) by
    forward hooks on named encoder stages, active only inside ``with hooks.active():``.

    A stage's output is replaced by a copy with whole channels dropped (probability ``p``, survivors scaled by
    1 / (1 - p)) for its consumers in the decoder, while the encoder runs clean: a forward pre-hook on each named
    stage swaps a dropped input back for the clean tensor it was made from, so the next stage computes from the
    undropped features, as in UniMatch, where the decoder gets dropped copies of a clean encoder pass. (Replacing
    every stage's output alone would compound: deeper stages would compute from dropped inputs.) This needs the
    encoder's consumer of a stage's output to be the next named stage, as in :func:`perturbed_stages`.

    A module that returns a list or tuple of maps (SwinUNETR's ``swinViT``) has each map dropped.
    """

    def __init__(self, network: torch.nn.Module, names: Sequence[str], p: float = 0.5) -> None:
        if not 0 <= p < 1:
            raise ValueError(f"feature_dropout must be in [0, 1), got {p}")
        modules = dict(unwrap(network).named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise ValueError(f"perturbed stages {missing} are not modules of {type(unwrap(network)).__name__}")
        self.p, self._active = p, False
        self._clean: list[tuple[torch.Tensor, torch.Tensor]] = []  # (dropped copy, clean original) of this pass
        self._handles = []
        for name in dict.fromkeys(names):
            self._handles.append(modules[name].register_forward_pre_hook(self._restore))
            self._handles.append(modules[name].register_forward_hook(self._hook))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, *S) -> (B, C, 1, ...) mask: whole channels are dropped, the survivors scaled by 1 / (1 - p)
        keep = torch.rand(x.shape[:2] + (1,) * (x.dim() - 2), device=x.device) >= self.p
        dropped = x * keep.to(x.dtype) / (1 - self.p)
        self._clean.append((dropped, x))
        return dropped

    def _hook(self, module: torch.nn.Module, args: tuple, output):
        if not self._active:
            return None
        if isinstance(output, (list, tuple)):
            return type(output)(self._drop(o) for o in output)
        return self._drop(output)

    def _restore(self, module: torch.nn.Module, args: tuple):
        if not self._active or not self._clean:
            return None
        restored = tuple(next((clean for dropped, clean in self._clean if a is dropped), a) for a in args)
        return restored if any(r is not a for r, a in zip(restored, args)) else None

    @contextmanager
    def active(self):
        self._active = True
        try:
            yield
        finally:
            self._active, self._clean = False, []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def cutmix_masks(
    shape: Sequence[int],
    probability: float = 0.5,
    volume: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random CutMix boxes as float masks (B, 1, *S), 1 inside the box.

    UniMatch's box, in d dimensions: with ``probability`` per volume, a box of ``volume`` fraction U(0.02, 0.4) of the
    crop, at a uniform position, clipped to the crop (which can only shrink it and bring its edges closer to equal).
    Its edges are e * exp(u_i - mean(u)), u_i ~ U(log(aspect) / 2) independently, so the ratio of any two edges lies
    in ``aspect`` (0.3 ... 3.3 when aspect[0] * aspect[1] = 1; UniMatch's 2D range of h / w) and their product is
    e^d, the box volume. (Drawing u_i in the whole of log(aspect) would give edge ratios up to 3.3^2 = 11.)
    """
    batch, spatial = shape[0], [int(s) for s in shape[2:]]
    masks = torch.zeros(batch, 1, *spatial)
    for b in range(batch):
        if torch.rand((), generator=generator) >= probability:
            continue
        fraction = volume[0] + (volume[1] - volume[0]) * torch.rand((), generator=generator).item()
        log_ratios = torch.empty(len(spatial)).uniform_(
            math.log(aspect[0]) / 2, math.log(aspect[1]) / 2, generator=generator
        )
        log_ratios -= log_ratios.mean()  # edge ratios whose product is 1, so the box keeps its volume
        edge = (fraction * math.prod(spatial)) ** (1 / len(spatial))
        box = []
        for size, ratio in zip(spatial, log_ratios.exp().tolist()):
            length = min(size, max(1, round(edge * ratio)))
            start = int(torch.randint(0, size - length + 1, (), generator=generator))
            box.append(slice(start, start + length))
        masks[(b, 0, *box)] = 1.0
    return masks


class SemiSupervisedBatch:
    """``prepare_batch`` for SupervisedTrainer: (inputs, label) from a batch of :class:`SemiSupervisedLoader`.

    ``inputs`` holds plain tensors on ``device``: "image" (B_l, C, *S), and with unlabeled data
    "unlabeled_image" (B_u, C, *S) and the strong views "unlabeled_strong1"/"unlabeled_strong2", each with a box
    pasted from its partner volume with ``cutmix_probability`` (Sec. IV-B: colour transformation and CutMix);
    "mix1"/"mix2" (B_u, 1, *S) are those boxes and "partner" (B_u,) the partner of each volume, the next one in the
    batch, so the loss can mix the pseudo-labels the same way; "labeled_source" (B_l,) the source volume of each
    labeled crop (crops with the same ``filename_or_obj`` share an id; without that metadata every crop is its own),
    which the cross-image term pools its prototypes by. ``label`` is (B_l, 1, *S).
    """

    def __init__(self, cutmix_probability: float = 0.5, seed: int = 0) -> None:
        self.cutmix_probability = cutmix_probability
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        def move(key: str) -> torch.Tensor:
            return batchdata[key].as_subclass(torch.Tensor).to(device=device, non_blocking=non_blocking)

        inputs = {"image": move("image")}
        if UNLABELED_KEYS[0] in batchdata:
            inputs["labeled_source"] = labeled_sources(batchdata["image"]).to(device)
            inputs.update({key: move(key) for key in UNLABELED_KEYS})
            batch = inputs["unlabeled_image"].shape[0]
            if batch < 2 and self.cutmix_probability > 0:
                raise ValueError(
                    "CutMix pastes boxes between unlabeled volumes of a batch, which has 1: set "
                    "unlabeled_batch_size (times num_samples) >= 2, or cutmix_probability 0"
                )
            partner = torch.roll(torch.arange(batch), -1)
            inputs["partner"] = partner.to(device)
            for view, mix in (("unlabeled_strong1", "mix1"), ("unlabeled_strong2", "mix2")):
                box = cutmix_masks(inputs[view].shape, self.cutmix_probability, generator=self.generator).to(device)
                inputs[view] = torch.lerp(inputs[view], inputs[view][inputs["partner"]], box)
                inputs[mix] = box
        return inputs, move("label")


def labeled_sources(image: torch.Tensor) -> torch.Tensor:
    """(B,) ids of the source volume of each crop of a collated batch: equal ``filename_or_obj`` metadata, equal id
    (numbered by first appearance); ``torch.arange(B)`` when the batch carries no such metadata."""
    batch = image.shape[0]
    names = getattr(image, "meta", {}).get("filename_or_obj")
    if isinstance(names, (list, tuple)) and len(names) == batch and all(isinstance(n, str) and n for n in names):
        ids = {}
        return torch.tensor([ids.setdefault(name, len(ids)) for name in names])
    return torch.arange(batch)


class _EncoderDone(Exception):
    """Raised by a forward hook to end a pass once the features it is run for exist."""


class SemSimNetwork(torch.nn.Module):
    """The passes of one SemSim iteration, as one module for SupervisedTrainer (and DistributedDataParallel).

    ``forward(inputs)`` with the dict of :class:`SemiSupervisedBatch` returns the dict ``SemSimLoss`` reads:

    1. labeled + weak views in one pass: "labeled" (B_l, K, *S), "weak" (B_u, K, *S) logits, and with the fusion
       module "features_labeled" / "features_weak" (B, D, *S/4), the latter without gradient (it only makes
       targets);
    2. strong view 1: "strong1" logits and, with the fusion module, "features_strong1"; then strong view 2 for
       "features_strong2" only: the paper's x_s2 serves only the cross-image term (Table VI), which reads SFM
       features, so its pass ends at the deepest fused encoder stage (a forward hook stops it) and the rest of the
       encoder and the decoder are not run;
    3. with ``feature_perturbation``, the weak view again with channel dropout on every encoder feature the
       decoder reads, from a clean encoder pass (:class:`ChannelDropout`): "fp".

    Passes a term does not need are skipped: without unlabeled data (supervised-only) only pass 1's labeled part
    runs; without ``sfm`` (L_intra and L_cross weighted 0: FixMatch) there are no features and no strong view 2.
    "mix1", "mix2", "partner" and "labeled_source" (when present) are passed through. ``remove_hooks()`` detaches
    every forward hook the module put on the backbone.

    With an :class:`EmaTeacher` (an option, off by default: a departure from the paper, which takes its
    pseudo-labels and prototypes from the student), pass 1 runs the student on the labeled view only, and the
    teacher, without gradient, on labeled + weak: "weak" and "features_weak" are the teacher's, and
    "features_labeled_target" its labeled features, from which the cross-image target's prototypes are made.

    Args:
        backbone: the segmentation network (its ``state_dict`` is the bundle's model).
        sfm: the Spatial-aware Fusion Module on the ``fusion`` stages, or None.
        fusion: three encoder module names at 1/2, 1/4, 1/8 (:func:`fusion_stages`); None without ``sfm``.
        perturbed: modules for the feature-perturbation pass (:func:`perturbed_stages`).
        feature_perturbation: run pass 3.
        feature_dropout: its channel-dropout probability, 0.5.
        teacher: an :class:`EmaTeacher` of ``backbone`` and ``sfm``, or None (default).
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        sfm: torch.nn.Module | None,
        fusion: Sequence[str] | None = None,
        perturbed: Sequence[str] = (),
        feature_perturbation: bool = True,
        feature_dropout: float = 0.5,
        teacher: EmaTeacher | None = None,
    ) -> None:
        super().__init__()
        if sfm is not None and not fusion:
            raise ValueError("the fusion module needs the names of its three encoder stages (fusion_stages)")
        self.backbone, self.sfm = backbone, sfm
        self.fusion = list(fusion or ())
        self.taps = FeatureTaps(backbone, self.fusion) if sfm is not None else None
        self._deepest_fused = dict(unwrap(backbone).named_modules())[self.fusion[-1]] if sfm is not None else None
        self.dropout = ChannelDropout(backbone, perturbed, feature_dropout) if feature_perturbation else None
        self.teacher = teacher

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a full checkpoint, or the backbone's own such as ``models/model.pt`` (no ``backbone.`` keys).

        The backbone's checkpoint loads into the backbone (strictly, if ``strict``) and leaves the fusion module as
        it is: fine-tuning from a released model, as MONAI Label's "pretrained" training does by loading
        models/model.pt into ``network`` non-strictly, where otherwise no key would match and training would
        silently start from scratch.
        """
        if not any(key.startswith("backbone.") for key in state_dict):
            return self.backbone.load_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _features(self) -> torch.Tensor:
        features = self.taps.pop()
        return self.sfm([features[name] for name in self.fusion])

    def _encoder_features(self, image: torch.Tensor) -> torch.Tensor:
        """The SFM features of ``image`` from a pass that stops once the deepest fused stage has run."""

        def stop(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            raise _EncoderDone

        handle = self._deepest_fused.register_forward_hook(stop)  # after the taps' hook, which stores first
        try:
            self.backbone(image)
        except _EncoderDone:
            pass
        finally:
            handle.remove()
        return self._features()

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labeled = inputs["image"]
        if "unlabeled_image" not in inputs:
            return {"labeled": self.backbone(labeled)}
        weak = inputs["unlabeled_image"]
        n_labeled, n_unlabeled = labeled.shape[0], weak.shape[0]
        if self.teacher is not None:
            out = {"labeled": self.backbone(labeled)}
            if self.sfm is not None:
                out["features_labeled"] = self._features()
            with torch.no_grad():
                logits, features = self.teacher(torch.cat([labeled, weak]))
            out["weak"] = logits[n_labeled:]
            if features is not None:
                out["features_labeled_target"], out["features_weak"] = features.split([n_labeled, n_unlabeled])
        else:
            logits = self.backbone(torch.cat([labeled, weak]))
            out = dict(zip(("labeled", "weak"), logits.split([n_labeled, n_unlabeled])))
            if self.sfm is not None:
                tapped = self.taps.pop()
                stages = [tapped[name] for name in self.fusion]
                out["features_labeled"] = self.sfm([stage[:n_labeled] for stage in stages])
                with torch.no_grad():  # the weak view's features only make targets (p1_w, p2_w): no gradient
                    out["features_weak"] = self.sfm([stage[n_labeled:] for stage in stages])
        out["strong1"] = self.backbone(inputs["unlabeled_strong1"])
        if self.sfm is not None:
            out["features_strong1"] = self._features()
            out["features_strong2"] = self._encoder_features(inputs["unlabeled_strong2"])
        if self.dropout is not None:
            with self.dropout.active():
                out["fp"] = self.backbone(weak)
        if self.taps is not None:
            self.taps.pop(strict=False)  # the perturbed pass's features are not used
        for key in ("mix1", "mix2", "partner"):
            out[key] = inputs[key]
        if "labeled_source" in inputs:
            out["labeled_source"] = inputs["labeled_source"]
        return out

    def remove_hooks(self) -> None:
        """Detach the feature taps and the channel-dropout hooks from the backbone (the early-exit hook of the
        strong-2 pass is removed after every pass)."""
        for hooks in (self.taps, self.dropout, self.teacher):
            if hooks is not None:
                hooks.remove()


class EmaTeacher(torch.nn.Module):
    """A mean teacher (Tarvainen and Valpola, NeurIPS 2017) of the backbone and the fusion module: copies whose
    weights are the exponential moving average of the student's, updated by :class:`EmaUpdate` after every
    optimiser step. An option of this bundle (``ema_decay`` > 0), off by default: the paper takes its
    pseudo-labels and prototypes from the student itself.

    ``forward(image)`` (B, C, *S) returns the teacher's logits (B, K, *S) and, with a fusion module, its features
    (B, D, *S/4) (else None); call it under ``torch.no_grad()``. Its parameters never require gradient.
    """

    def __init__(
        self, backbone: torch.nn.Module, sfm: torch.nn.Module | None, fusion: Sequence[str] | None, decay: float
    ) -> None:
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) for the EMA teacher (0 switches it off), got {decay}")
        self.decay = decay
        self.backbone = _hookless_copy(unwrap(backbone))
        self.sfm = _hookless_copy(sfm) if sfm is not None else None
        self.fusion = list(fusion or ())
        self.taps = FeatureTaps(self.backbone, self.fusion, training_only=False) if self.sfm is not None else None

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.backbone(image)
        if self.taps is None:
            return logits, None
        features = self.taps.pop()
        return logits, self.sfm([features[name] for name in self.fusion])

    @torch.no_grad()
    def update(self, backbone: torch.nn.Module, sfm: torch.nn.Module | None, step: int) -> None:
        """teacher <- a teacher + (1 - a) student, a = min(decay, 1 - 1 / (step + 1)) (the mean teacher's warm-up:
        at step 0 the teacher becomes the student, so a model loaded into the student after this module was built,
        such as a fine-tuning start, is taken over). Buffers are copied."""
        alpha = min(self.decay, 1 - 1 / (step + 1))
        pairs = [(self.backbone, unwrap(backbone))] + ([(self.sfm, sfm)] if self.sfm is not None else [])
        for teacher, student in pairs:
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.lerp_(s.detach(), 1 - alpha)
            for t, s in zip(teacher.buffers(), student.buffers()):
                t.copy_(s)

    def remove(self) -> None:
        if self.taps is not None:
            self.taps.remove()


def _hookless_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` without gradient and without the student's forward hooks (feature taps, channel
    dropout), which ``copy.deepcopy`` would otherwise copy along with their state."""
    duplicate = copy.deepcopy(module).requires_grad_(False)
    for submodule in duplicate.modules():
        submodule._forward_hooks.clear()
        submodule._forward_pre_hooks.clear()
    return duplicate


def ema_teacher(
    backbone: torch.nn.Module, sfm: torch.nn.Module | None, fusion: Sequence[str] | None, decay: float
) -> EmaTeacher | None:
    """An :class:`EmaTeacher`, or None where ``decay`` is 0 (the default: no teacher)."""
    return EmaTeacher(backbone, sfm, fusion, decay) if decay else None


class EmaUpdate:
    """After every iteration, moves the :class:`EmaTeacher` towards the student (``teacher`` None: does nothing),
    with the trainer's iteration count as the step, so a resumed run continues the same schedule."""

    def __init__(self, teacher: EmaTeacher | None, backbone: torch.nn.Module, sfm: torch.nn.Module | None) -> None:
        self.teacher, self.backbone, self.sfm = teacher, backbone, sfm

    def attach(self, engine: Engine) -> None:
        if self.teacher is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.teacher.update(self.backbone, self.sfm, engine.state.iteration - 1)


class UnlabeledRamp:
    """Ramps the unlabeled terms' weights (lam_u, lam_intra, lam_cross) up over the first ``iterations``
    iterations, by the sigmoid-shaped exp(-5 (1 - t)^2), t = iteration / iterations (Laine and Aila, ICLR 2017;
    the mean teacher's and UA-MT's ramp), setting ``loss.ramp`` before each iteration. An option of this bundle,
    off by default (``unlabeled_rampup`` 0: weight 1 from the start, as in the paper)."""

    def __init__(self, loss: torch.nn.Module, iterations: int) -> None:
        if iterations < 0:
            raise ValueError(f"unlabeled_rampup must be >= 0 iterations (0: no ramp), got {iterations}")
        self.loss, self.iterations = loss, iterations

    def weight(self, iteration: int) -> float:
        """The ramp's factor before iteration ``iteration`` (1-based)."""
        if not self.iterations:
            return 1.0
        t = min(1.0, (iteration - 1) / self.iterations)
        return math.exp(-5.0 * (1.0 - t) ** 2)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.loss.ramp = self.weight(engine.state.iteration)


def one_item_output(engine: SupervisedTrainer, batchdata: dict[str, Any]) -> list[dict[str, Any]]:
    """``SupervisedTrainer``'s own iteration, its output returned as a one-item list.

    SemSim's trainer does not decollate (labeled and unlabeled views have different batch sizes), so its output is
    one dict; ``monai.handlers.from_engine(["loss"], first=True)``, which the template's handlers and MONAI's
    tracking handlers (``--tracking mlflow``) use, returns a tuple for a dict but the loss itself for a list of
    dicts. Wrapped so, every handler reads the loss as it does from a decollated output.
    """
    return [engine._iteration(engine, batchdata)]
