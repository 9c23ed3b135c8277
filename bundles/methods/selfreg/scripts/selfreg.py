"""SelfReg (Zhu et al., "SelfReg-UNet: Self-Regularized UNet for Medical Image Segmentation", MICCAI 2024,
arXiv 2406.14896) as a plug-in loss on MONAI backbones.

The paper adds two feature regularisers to the segmentation loss L_cd:

- semantic consistency regularisation, L_SCR = 1/(|M-1||I|) sum_{m<M} sum_i ||RCS(F_i^m) - AvgPool(F_final)||^2:
  every tapped encoder and decoder feature map is pulled towards the last decoder feature map F_final,
  average-pooled to its size and detached, on a random channel selection (RCS);
- internal feature distillation, L_IFD = 1/(|M||I|) sum_m sum_i ||F_deep - F_shallow||^2: within one feature map,
  channels ranked by their spatially L2-normalised mean; the top half is pulled towards the bottom half;

and trains with L = L_cd + lambda * (L_SCR + L_IFD) (one lambda for both terms, as in the authors' code; 0.015 is
the paper's best). :class:`SelfRegRegulariser` returns the two terms to the template's ``RegularisedLoss``, which
adds them, weighted by ``selfreg_weight``, to the segmentation loss L_cd (``seg_loss``, DiceCE 0.4/0.6).
The normalisation follows the authors' ``KDloss`` (seeds 001/003): a mean over the maps of each
group (encoder or decoder, first or last block of a stage), summed over groups.

Features are read by forward hooks on named modules of an unmodified MONAI network (:class:`FeatureTaps`), so the
trained network, its ``state_dict``, its inference and its export are those of the plain backbone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks import nets

from .backbones import unwrap
from .feature_taps import FeatureTaps, pool_to_size

BlockPosition = Literal["first", "last"]
ChannelSelection = Literal["random", "first"]


@dataclass(frozen=True)
class TapLayout:
    """Where SelfReg reads a backbone's features.

    teacher: the module whose output is F_final, the last decoder feature map before the output convolution.
    encoder, decoder: block position ("first" or "last" block of a stage, the paper's [0] and [-1]) -> module names,
        one per stage that has such a block. A stage with a single block appears under "last" only.
    channels_last: modules whose output is (B, *S, C) (Swin blocks); they are permuted to (B, C, *S).
    """

    teacher: str
    encoder: Mapping[str, Sequence[str]]
    decoder: Mapping[str, Sequence[str]]
    channels_last: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_config(cls, config: Mapping) -> TapLayout:
        """A layout written in a bundle config: ``{"teacher": ..., "encoder": {...}, "decoder": {...},
        "channels_last": [...]}``."""
        unknown = set(config) - {"teacher", "encoder", "decoder", "channels_last"}
        if unknown or "teacher" not in config:
            raise ValueError(
                f"selfreg_layout needs 'teacher' and may have 'encoder', 'decoder', 'channels_last'; got {sorted(config)}"
            )
        return cls(
            teacher=config["teacher"],
            encoder={k: list(v) for k, v in config.get("encoder", {}).items()},
            decoder={k: list(v) for k, v in config.get("decoder", {}).items()},
            channels_last=frozenset(config.get("channels_last", ())),
        )

    def names(self, blocks: Sequence[str]) -> list[str]:
        """Every tapped module for the given block positions, teacher last, without repeats."""
        names = [n for part in (self.encoder, self.decoder) for b in blocks for n in part.get(b, ())]
        return list(dict.fromkeys([*names, self.teacher]))


def default_layout(network: torch.nn.Module) -> TapLayout:
    """The tap layout of a MONAI SegResNet, UNet or SwinUNETR, read from the network's own structure.

    - SegResNet (and its subclass SegResNetVAE, whose VAE branch adds modules but no stage): encoder stages
      ``down_layers.i`` (first ResBlock ``down_layers.i.1``, last = the stage output), decoder stages
      ``up_layers.i`` but the last; teacher ``up_layers.{-1}`` (init_filters @ full resolution, the input of
      ``conv_final``).
    - UNet: encoder stages are the down ResidualUnits and the bottom unit (first = ``conv.unit0``, last = the unit's
      output); decoder stages are the up blocks (first = the transposed convolution ``.0``, last = the block's
      output) below the last one. Teacher: the last decoder block before the output block, ``model.1.submodule.2``
      (channels[0] @ 1/2 resolution). MONAI's UNet has no full-resolution feature wider than the logits: its top
      block maps straight to out_channels. The input of that block (``model.1``'s output) is wider but is
      ``cat(model.0 output, teacher)``, so SCR would regress the first encoder stage onto a detached copy of itself.
    - SwinUNETR: encoder = the two Swin blocks of each stage, ``swinViT.layers{k}.0.blocks.{0,-1}`` (channels-last);
      decoder = ``decoder5`` .. ``decoder2`` (one residual block each, so "last" only); teacher ``decoder1``
      (feature_size @ full resolution, the input of ``out``).
    """
    module_names = {name for name, _ in network.named_modules()}
    if isinstance(network, nets.SegResNet):
        encoder: dict[str, list[str]] = {"first": [], "last": []}
        for i, stage in enumerate(network.down_layers):
            encoder["last"].append(f"down_layers.{i}")
            if len(stage) > 2:  # pre-conv + more than one ResBlock
                encoder["first"].append(f"down_layers.{i}.1")
        decoder: dict[str, list[str]] = {"first": [], "last": []}
        for i, stage in enumerate(network.up_layers[:-1]):
            decoder["last"].append(f"up_layers.{i}")
            if len(stage) > 1:
                decoder["first"].append(f"up_layers.{i}.0")
        return TapLayout(teacher=f"up_layers.{len(network.up_layers) - 1}", encoder=encoder, decoder=decoder)
    if isinstance(network, nets.UNet):
        return _unet_layout(network, module_names)
    if isinstance(network, nets.SwinUNETR):
        encoder = {"first": [], "last": []}
        for k in range(1, 5):
            blocks = network.swinViT.get_submodule(f"layers{k}")[0].blocks
            encoder["last"].append(f"swinViT.layers{k}.0.blocks.{len(blocks) - 1}")
            if len(blocks) > 1:
                encoder["first"].append(f"swinViT.layers{k}.0.blocks.0")
        decoder = {"last": [f"decoder{k}" for k in (5, 4, 3, 2)]}
        return TapLayout(
            teacher="decoder1",
            encoder=encoder,
            decoder=decoder,
            channels_last=frozenset(encoder["first"] + encoder["last"]),
        )
    raise TypeError(
        f"no default SelfReg tap layout for {type(network).__name__}: give selfreg_layout in the config "
        "(teacher, encoder and decoder module names from network.named_modules())"
    )


def _unet_layout(network: nets.UNet, module_names: set[str]) -> TapLayout:
    if len(network.strides) < 2:
        raise ValueError("SelfReg on UNet needs at least two down-sampling levels (len(strides) >= 2)")
    # model = Sequential(down, SkipConnection(submodule), up); each inner submodule is Sequential(down,
    # SkipConnection(...), up) down to the bottom unit.
    downs, ups, level = ["model.0"], [], "model.1.submodule"
    while f"{level}.2" in module_names:
        downs.append(f"{level}.0")
        ups.append(f"{level}.2")
        level = f"{level}.1.submodule"
    downs.append(level)  # the bottom unit
    encoder: dict[str, list[str]] = {"first": [], "last": list(downs)}
    encoder["first"] = [f"{d}.conv.unit0" for d in downs if f"{d}.conv.unit0" in module_names]
    teacher, students = ups[0], ups[:0:-1]  # ups[0]: the shallowest decoder block below the output block
    decoder = {"first": [f"{u}.0" for u in students if f"{u}.1" in module_names], "last": students}
    return TapLayout(teacher=teacher, encoder=encoder, decoder=decoder)


class SelfRegTaps(FeatureTaps):
    """The :class:`FeatureTaps` SelfReg reads: every module of a :class:`TapLayout` at the chosen block positions,
    stored in training forward passes only (validation and inference do no extra work).

    Args:
        network: the backbone (a DistributedDataParallel wrapper is unwrapped).
        blocks: block positions to tap, a subset of ("first", "last").
        layout: a :class:`TapLayout`, a config dict for :meth:`TapLayout.from_config`, or None for
            :func:`default_layout`.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        blocks: Sequence[BlockPosition] = ("first", "last"),
        layout: TapLayout | Mapping | None = None,
    ) -> None:
        network = unwrap(network)
        if not blocks or set(blocks) - {"first", "last"}:
            raise ValueError(f"selfreg_blocks must be a non-empty subset of ['first', 'last'], got {list(blocks)}")
        if layout is None:
            layout = default_layout(network)
        elif not isinstance(layout, TapLayout):
            layout = TapLayout.from_config(layout)
        self.layout, self.blocks = layout, tuple(blocks)
        super().__init__(network, layout.names(self.blocks), channels_last=layout.channels_last)


def internal_feature_distillation(feature: torch.Tensor) -> torch.Tensor:
    """L_IFD of one feature map (B, C, *S), any number of spatial dims.

    Channel score s_c = mean over batch and space of the map L2-normalised over space; channels sorted by
    descending score; MSE between the i-th of the top half and the i-th of the bottom half. With an odd C the
    median-ranked channel has no partner and is left out (the authors' code would compare halves of unequal size).
    """
    c = feature.shape[1]
    if c < 2:
        raise ValueError(
            f"internal feature distillation needs at least 2 channels, got a map of shape {list(feature.shape)}"
        )
    score = F.normalize(feature.flatten(2), p=2, dim=2).mean(dim=(0, 2))
    order = torch.argsort(score, descending=True)
    half = c // 2
    return _mean_squared_difference(feature[:, order[:half]], feature[:, order[c - half :]])


def semantic_consistency(
    student: torch.Tensor, teacher: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """L_SCR of one student map (B, C_s, *S_s) against the teacher (B, C_t, *S_t), already pooled or not.

    The larger map is adaptive-average-pooled to the smaller one's size (in practice the full-resolution teacher
    down to the student). k = min(C_s, C_t) channels are compared: with a ``generator`` (on the features' device),
    a fresh random subset and pairing on each side (the paper's RCS); without, the first k (the authors'
    commented-out deterministic mode). The teacher is detached; the student is not.
    """
    size = [min(s, t) for s, t in zip(student.shape[2:], teacher.shape[2:])]
    student, teacher = pool_to_size(student, size), pool_to_size(teacher.detach(), size)
    k = min(student.shape[1], teacher.shape[1])
    if generator is None:
        return _mean_squared_difference(student[:, :k], teacher[:, :k])
    # drawn on the features' device: indices made on the CPU would cost a host-to-GPU copy per map and step
    idx_s = torch.randperm(student.shape[1], generator=generator, device=generator.device)[:k]
    idx_t = torch.randperm(teacher.shape[1], generator=generator, device=generator.device)[:k]
    return _mean_squared_difference(student[:, idx_s], teacher[:, idx_t])


def _mean_squared_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss(a, b)``, but autograd keeps only ``a - b`` for backward, not both gathered inputs (half the
    regulariser's extra activation memory)."""
    return (a - b).square().mean()


def selfreg_terms(
    features: Mapping[str, torch.Tensor],
    layout: TapLayout,
    blocks: Sequence[str] = ("first", "last"),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_SCR, L_IFD) of one forward pass, normalised as the authors' KDloss.forward:

    L_IFD = sum over block positions b of [mean_{encoder maps at b} IFD + mean_{decoder maps at b} IFD];
    L_SCR = sum over b of mean_{encoder and decoder maps at b} SCR(map, F_final).

    With SwinUnet's 4 encoder and 3 decoder stages and both positions this is exactly KDloss:
    IFD/4 + IFD/4 + IFD/3 + IFD/3 and SCR/7 + SCR/7. Features are computed in float32 (AMP-safe).
    """
    teacher = features[layout.teacher].float()
    pooled: dict[tuple[int, ...], torch.Tensor] = {}  # the teacher pooled once per student size
    scr = ifd = teacher.new_zeros(())
    for block in blocks:
        students = []
        for part in (layout.encoder, layout.decoder):
            maps = [features[name].float() for name in part.get(block, ())]
            if maps:
                ifd = ifd + sum(internal_feature_distillation(m) for m in maps) / len(maps)
            students += maps
        if students:
            terms = []
            for student in students:
                size = tuple(min(s, t) for s, t in zip(student.shape[2:], teacher.shape[2:]))
                if size not in pooled:
                    pooled[size] = pool_to_size(teacher.detach(), size)
                terms.append(semantic_consistency(student, pooled[size], generator))
            scr = scr + sum(terms) / len(terms)
    return scr, ifd


class SelfRegRegulariser(torch.nn.Module):
    """SelfReg's terms as a regulariser of :class:`scripts.losses.RegularisedLoss`: ``{"scr": L_SCR, "ifd": L_IFD}``,
    weighted there by one lambda (``selfreg_weight``) for both, as the paper and the authors' code do:
    L = L_cd + lambda * (L_SCR + L_IFD).

    Args:
        taps: the :class:`SelfRegTaps` on the trained network.
        channel_selection: "random" (the paper's RCS, drawn anew at every call from a generator on the features'
            device seeded with ``seed``) or "first" (the first min(C_s, C_t) channels, deterministic).
        seed: seed of the random channel selection.

    ``forward(logits, label, extras)`` reads the features of the last training forward pass from the taps; the
    arguments are not used (the segmentation loss is RegularisedLoss's).
    """

    def __init__(self, taps: SelfRegTaps, channel_selection: ChannelSelection = "random", seed: int = 0) -> None:
        super().__init__()
        if channel_selection not in ("random", "first"):
            raise ValueError(f"selfreg_channel_selection must be 'random' or 'first', got {channel_selection!r}")
        self.taps = taps
        self.channel_selection, self.seed = channel_selection, seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The random-channel generator on ``device``, seeded with ``seed`` when first used; None in "first" mode."""
        if self.channel_selection == "first":
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def forward(self, logits: torch.Tensor, label: torch.Tensor, extras: object = None) -> dict[str, torch.Tensor]:
        scr, ifd = selfreg_terms(self.taps.pop(), self.taps.layout, self.taps.blocks, self.generator(logits.device))
        return {"scr": scr, "ifd": ifd}
