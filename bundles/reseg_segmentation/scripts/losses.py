# Generated from bundles/template/scripts/losses.py by scripts/generate_bundles.py: edit those, not this file.
"""A segmentation loss plus named, weighted regularisers, composed the way MONAI's ``DiceCELoss`` composes Dice and
CE: the parts are passed in, each weight is checked, and the total is their weighted sum.

Every bundle whose method adds terms to a supervised loss trains with :class:`RegularisedLoss`. A method adds a
regulariser by config alone, one entry of the template's ``regularisers`` dict (``"regularisers#selfreg": {...}``)
and its weight (``"regulariser_weights#selfreg": "@selfreg_weight"``, or one weight per term:
``"regulariser_weights#vae": {"l2": "@l2_weight", "kl": "@kl_weight"}``), so two methods' regularisers stack on one
backbone without code (``scripts/generate_bundles.py --stack``). With every weight 0 the loss is the segmentation
loss alone: the plain backbone baseline. SemSim does not compose: its loss needs its own semi-supervised training
step; it exposes the same ``terms`` dict for logging."""

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

    def __call__(self, logits: torch.Tensor, label: torch.Tensor, extras: Any) -> Mapping[str, torch.Tensor]:
        """The regulariser's named terms for one training step."""


def split_output(pred: torch.Tensor | tuple[torch.Tensor, Any]) -> tuple[torch.Tensor, Any]:
    """A training output as ``(logits, extras)``: plain logits, or ``(logits, extras)`` from a network with a
    training-only branch (SegResNet-VAE)."""
    if isinstance(pred, torch.Tensor):
        return pred, None
    logits, extras = pred
    return logits, extras


Weight = float | Mapping[str, float]


class RegularisedLoss(torch.nn.Module):
    """L = L_seg + sum over regularisers r of w_r * sum(terms of r), or sum_t w_r,t * term_t with per-term weights.

    Args:
        seg_loss: the segmentation loss, ``seg_loss(logits, label)``: (B, K, *S) logits, (B, 1, *S) labels.
        regularisers: name -> :class:`Regulariser`; a None entry (a config component disabled because its weight is
            0) is skipped.
        weights: name -> weight, one per regulariser: a float applied to the sum of the regulariser's terms (SelfReg:
            one lambda for L_SCR + L_IFD), or term name -> float for a regulariser whose terms the paper weights
            separately (the VAE: 0.1 L_L2 + 0.1 L_KL). Weights must be >= 0; a regulariser whose weights are all 0 is
            not run at all. Weights of regularisers not given (disabled) are ignored.

    ``forward(pred, label)`` takes the network's training output (logits, or ``(logits, extras)``) and the label.
    After each call ``terms`` holds the detached ``seg``, every regulariser's terms (prefixed by the regulariser's
    name, ``selfreg_scr``, unless the term has the regulariser's name) and ``total``: what ``LossTermsHandler``
    logs as ``train_<term>``. Every method's loss exposes this ``terms`` dict, including the ones that do not
    compose (SemSim's ``SemSimLoss``).
    """

    def __init__(
        self,
        seg_loss: torch.nn.Module,
        regularisers: Mapping[str, torch.nn.Module | None] | None = None,
        weights: Mapping[str, Weight] | None = None,
    ) -> None:
        super().__init__()
        regularisers = {name: r for name, r in (regularisers or {}).items() if r is not None}
        weights = {name: dict(w) if isinstance(w, Mapping) else w for name, w in (weights or {}).items()}
        unweighted = sorted(set(regularisers) - set(weights))
        if unweighted:
            raise ValueError(f"regularisers {unweighted} have no weight: add regulariser_weights#<name> to the config")
        for name, weight in weights.items():
            for term, value in (weight.items() if isinstance(weight, dict) else [(None, weight)]):
                label = f"{name!r}" if term is None else f"{name!r} term {term!r}"
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise TypeError(f"the weight of regulariser {label} must be a number, got {value!r}")
                if value < 0:
                    raise ValueError(f"the weight of regulariser {label} must be >= 0, got {value}")
        self.seg_loss = seg_loss
        self.weights: dict[str, Weight] = {}
        for name in regularisers:
            weight = weights[name]
            if isinstance(weight, dict) and any(weight.values()):
                self.weights[name] = {term: float(value) for term, value in weight.items()}
            elif not isinstance(weight, dict) and weight != 0:
                self.weights[name] = float(weight)
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
            total = total + self.weighted(name, parts)
        terms["total"] = total
        self.terms = {name: value.detach() for name, value in terms.items()}
        return total

    def weighted(self, name: str, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of one regulariser's ``parts``."""
        weight = self.weights[name]
        if not isinstance(weight, dict):
            return weight * sum(parts.values())
        if set(parts) != set(weight):
            raise ValueError(
                f"regulariser {name!r} returned the terms {sorted(parts)} but regulariser_weights#{name} "
                f"weights {sorted(weight)}: give one weight per term"
            )
        return sum(weight[part] * value for part, value in parts.items() if weight[part] != 0)
