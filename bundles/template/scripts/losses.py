"""A segmentation loss plus named, weighted regularisers, composed the way MONAI's ``DiceCELoss`` composes Dice and
CE: the parts are passed in, each weight is checked, and the total is their weighted sum.

Every bundle trains with :class:`RegularisedLoss`. A method adds a regulariser by config alone, one entry of the
template's ``regularisers`` dict per term (``"regularisers#selfreg": {...}``, ``"regulariser_weights#selfreg":
"@selfreg_weight"``), so two methods' regularisers stack on one backbone without code. With every weight 0 the
loss is the segmentation loss alone: the plain backbone baseline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch


class Regulariser(Protocol):
    """One regulariser, a ``torch.nn.Module``: ``forward(logits, label, extras) -> {name: scalar tensor}``.

    logits: the network's segmentation output (B, K, *S); label: class indices (B, 1, *S); extras: what the training
    network returned beside the logits (None for a plain backbone). A regulariser reads its features from its own
    forward-hook taps, so the backbone stays unmodified. It returns one or more named terms, each already the
    paper's equation; :class:`RegularisedLoss` applies the term's weight.
    """

    def __call__(self, logits: torch.Tensor, label: torch.Tensor, extras: Any) -> Mapping[str, torch.Tensor]: ...


def split_output(pred: torch.Tensor | tuple[torch.Tensor, Any]) -> tuple[torch.Tensor, Any]:
    """A training output as ``(logits, extras)``: plain logits, or ``(logits, extras)`` from a network with a
    training-only branch (SegResNet-VAE)."""
    if isinstance(pred, torch.Tensor):
        return pred, None
    logits, extras = pred
    return logits, extras


class RegularisedLoss(torch.nn.Module):
    """L = L_seg + sum_r weight_r * sum(terms of regulariser r).

    Args:
        seg_loss: the segmentation loss, ``seg_loss(logits, label)``: (B, K, *S) logits, (B, 1, *S) labels.
        regularisers: name -> :class:`Regulariser`; a None entry (a config component disabled because its weight is
            0) is skipped.
        weights: name -> weight, one per regulariser; a regulariser of weight 0 is not run at all.

    ``forward(pred, label)`` takes the network's training output (logits, or ``(logits, extras)``) and the label.
    After each call ``terms`` holds the detached ``seg``, every regulariser's terms (prefixed by the regulariser's
    name unless the term has the regulariser's name) and ``total``: what ``LossTermsHandler`` logs.
    """

    def __init__(self, seg_loss: torch.nn.Module, regularisers: Mapping[str, torch.nn.Module | None] | None = None,
                 weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        regularisers = {name: r for name, r in (regularisers or {}).items() if r is not None}
        weights = dict(weights or {})
        unweighted = sorted(set(regularisers) - set(weights))
        if unweighted:
            raise ValueError(f"regularisers {unweighted} have no weight: add regulariser_weights#<name> to the config")
        for name, weight in weights.items():
            if weight < 0:
                raise ValueError(f"the weight of regulariser {name!r} must be >= 0, got {weight}")
        self.seg_loss = seg_loss
        self.weights = {name: float(weights[name]) for name in regularisers if weights[name] != 0}
        # a ModuleDict, so that a regulariser with parameters of its own is trained and checkpointed with the loss
        self.regularisers = torch.nn.ModuleDict({name: r for name, r in regularisers.items() if name in self.weights})
        self.terms: dict[str, torch.Tensor] = {}

    def forward(self, pred: torch.Tensor | tuple[torch.Tensor, Any], label: torch.Tensor) -> torch.Tensor:
        logits, extras = split_output(pred)
        seg = self.seg_loss(logits, label)
        terms = {"seg": seg}
        total = seg
        for name, regulariser in self.regularisers.items():
            parts = dict(regulariser(logits, label, extras))
            terms.update({part if part == name else f"{name}_{part}": value for part, value in parts.items()})
            total = total + self.weights[name] * sum(parts.values())
        terms["total"] = total
        self.terms = {name: value.detach() for name, value in terms.items()}
        return total
