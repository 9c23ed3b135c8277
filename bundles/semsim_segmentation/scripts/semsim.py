# Generated from bundles/methods/semsim/scripts/semsim.py by scripts/generate_bundles.py: edit those, not this file.
"""SemSim (Xie et al., "SemSim: Revisiting Weak-to-Strong Consistency from a Semantic Similarity Perspective for
Semi-supervised Medical Image Segmentation", arXiv 2410.13486) as a MONAI loss.

On top of FixMatch's weak-to-strong consistency (Eq. 1) SemSim adds two similarity terms computed on the features
of the Spatial-aware Fusion Module (``sfm.py``), a training-only head on the encoder:

- intra-image (Eqs. 4-6): each voxel's prediction is refined by the affinity-weighted predictions of the other voxels
  of the same volume; the refined strong-view prediction is pulled towards the refined weak-view pseudo-label;
- cross-image (Eqs. 7-13): each unlabeled voxel is classified by its cosine similarity to local class prototypes of
  the labeled volumes; the strong-view prediction is pulled (CE) towards the weak-view one, weighted per voxel by the
  agreement of the labeled volumes.

L = 1/2 (L_s + lam_u L_u + lam_intra L_intra + lam_cross L_cross) (Eqs. 18-19). Departures from the paper, each
forced by a choice the paper leaves open, by an inconsistency in it or by the 3D setting, are listed on the
functions below: the affinity and the prototype similarities have a temperature; the refinement is p M^T, halved,
computed on a grid capped at ``affinity_max_tokens`` voxels and upsampled to the image grid where it is added to the
full-resolution p; L_intra's Dice skips classes absent from its masked target and, by default, its mask is the weak
view's own confidence at full resolution; the cross-image prototypes are global per class (N = 1) and per labeled
*volume* (crops of one volume pooled), since random 3D crops are not aligned. The affinity and prototype products
run in float32 with autocast off.

Shapes: B_l labeled and B_u unlabeled volumes, K classes, S the image grid, G the feature grid (1/4 of S), any
number of spatial dims (2D and 3D alike).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, MaskedDiceLoss
from monai.networks import one_hot

from .feature_taps import pool_to_size

# Per image (batch=False) then the mean over images and classes: Eq. 1's 1/|B_u| sum of per-image Dice losses.
# Equal smoothing terms make a class absent from both the masked prediction and the masked target, and so a fully
# masked image, a loss of exactly 0.
_MASKED_DICE = MaskedDiceLoss(include_background=True, batch=False)


def _fp32(device: torch.device):
    """Autocast off for ``device``'s type: the similarity products below must not run in half precision."""
    return torch.autocast(device_type=device.type, enabled=False)


def masked_dice(probabilities: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dice loss of ``probabilities`` (B, K, *S) against class indices ``target`` (B, 1, *S), counting only the
    voxels where ``mask`` (B, 1, *S) is 1 (Eqs. 1 and 6: 1(max p >= tau) inside the Dice sums, as UniMatch's
    ``DiceLoss(ignore=...)``). Returns a scalar.

    The target is one-hot encoded here, not by the loss: MaskedLoss multiplies the target by the mask first, which
    would turn excluded voxels into class 0 before a ``to_onehot_y``. Probabilities, not logits, for the same
    reason (the input is masked before any softmax the loss would apply).
    """
    return _MASKED_DICE(probabilities, one_hot(target, probabilities.shape[1]), mask)


def present_class_dice(
    probabilities: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-5
) -> torch.Tensor:
    """Masked Dice loss over the whole batch, averaged over the classes present in the masked target (L_intra).

    probabilities (B, K, *S); target (B, 1, *S) class indices; mask (B, 1, *S). Per class c, with sums over the
    batch and the voxels where mask = 1: 1 - (2 sum p t + s) / (sum p + sum t + s); the mean over the classes with
    sum t > 0; 0 (with zero gradient) when the mask is empty.

    Batch-level sums as UniMatch's ``DiceLoss``. A class absent from the masked target is left out instead of
    counting as 1 - s / (sum p + s) ~ 1, a constant whose gradient (~ s / (sum p)^2) is nil: with it, a mask that
    only background passes gives the per-image Dice its floor of (K - 1) / K and each present class a 1/K share.
    """
    onehot = one_hot(target, probabilities.shape[1]) * mask
    masked = probabilities * mask
    dims = (0, *range(2, probabilities.ndim))
    intersection = (masked * onehot).sum(dims)
    target_sum = onehot.sum(dims)
    dice = 1 - (2 * intersection + smooth) / (masked.sum(dims) + target_sum + smooth)
    present = (target_sum > 0).to(dice.dtype)
    return (dice * present).sum() / present.sum().clamp(min=1)


def cutmix_target(value: torch.Tensor, mix: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """CutMix ``value`` (B, C, *S) the way the strong image was mixed: where ``mix`` (B, 1, *S) >= 0.5, the value of
    the partner volume ``partner`` (B,) (LongTensor), elsewhere the volume's own. Works for images, pseudo-labels
    and confidences; a mask pooled to a coarser grid is thresholded at 0.5 (the box covers most of the cell)."""
    return torch.where(mix >= 0.5, value[partner], value)


def cap_grid(size: Sequence[int], max_tokens: int) -> tuple[int, ...]:
    """The grid on which the affinity matrix is computed: ``size`` itself when it has at most ``max_tokens`` voxels,
    otherwise every side scaled by (max_tokens / N)^(1/d), floored, at least 1: the same aspect and at most
    max_tokens voxels (unless a side of a very thin grid is raised to 1).

    The affinity is N x N per volume: the paper's 56^2 2D map gives 3136 tokens, but a 3D feature grid of 24^3 gives
    a 729 MiB matrix (fp32, before autograd), so 3D grids are pooled down (adaptive average pooling of the features,
    probabilities and CutMix masks). I(p), the decoder's probabilities on the feature grid, is the same pooling: the
    paper says bilinear resizing, but this only ever down-samples, where averaging is the area form of it and keeps
    every voxel's vote.
    """
    n = math.prod(size)
    if n <= max_tokens:
        return tuple(size)
    scale = (max_tokens / n) ** (1 / len(size))
    # 1e-6 absorbs the float error of exact ratios (32 * (4096 / 32768)^(1/3) must give 16, not 15)
    return tuple(max(1, math.floor(s * scale + 1e-6)) for s in size)


def propagate_by_affinity(probabilities: torch.Tensor, features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 4 and Eq. 5's propagated term: p M^T with M = row-softmax(cos(f(k1), f(k2)) / temperature).

    probabilities (B, K, *G), features (B, D, *G) on the same grid; returns (B, K, *G) in float32, computed with
    autocast off (under AMP the bmm would otherwise run in half precision whatever its inputs' dtype).

    - M^T, not the paper's M: with a row-softmax M (each row a distribution over the tokens k2), (p M^T)(i) =
      sum_k M(i, k) p(k) is token i's affinity-weighted mean of the others' probabilities; p M would weight by
      columns, which do not sum to 1.
    - temperature: the paper has none, but with cosines in [-1, 1] and thousands of tokens a plain softmax is nearly
      uniform, p M^T becomes the volume's mean prediction and the tau mask of L_intra empties.
    """
    with _fp32(probabilities.device):
        b, k = probabilities.shape[:2]
        p = probabilities.float().reshape(b, k, -1)
        f = F.normalize(features.float().reshape(b, features.shape[1], -1), dim=1)
        affinity = torch.softmax(torch.bmm(f.transpose(1, 2), f) / temperature, dim=-1)  # (B, N, N), rows sum to 1
        return torch.bmm(p, affinity.transpose(1, 2)).reshape(b, k, *probabilities.shape[2:])


def refine_by_affinity(probabilities: torch.Tensor, features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 5: refine(p, f) = (p + U(I(p) M^T)) / 2, M from ``features`` (:func:`propagate_by_affinity`).

    probabilities (B, K, *S) on the image grid, features (B, D, *G) on the affinity grid (G <= S); returns
    (B, K, *S) in float32, a distribution per voxel. I is adaptive average pooling to G, U linear interpolation
    back to S; on one grid (S = G) both are the identity and this is the paper's (p + p M^T) / 2.

    - / 2: p + p M^T sums to 2 per voxel; halving keeps a distribution.
    - the full-resolution p (not I(p)) is the first summand: pooling p onto a 3D feature grid (1/4 of the crop, each
      token 4^3 voxels) before the sum dilutes every structure thinner than a token (a sheet two voxels thick at
      p = 0.99 pools to 0.5), so that it never passes tau; only the propagated term lives on the coarse grid.
    """
    grid = features.shape[2:]
    propagated = propagate_by_affinity(pool_to_size(probabilities, grid), features, temperature)
    if propagated.shape[2:] != probabilities.shape[2:]:
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[probabilities.ndim - 2]
        with _fp32(probabilities.device):
            propagated = F.interpolate(propagated, size=probabilities.shape[2:], mode=mode, align_corners=False)
    return (probabilities.float() + propagated) / 2


def region_index(size: Sequence[int], grid: int, device: torch.device | None = None) -> torch.Tensor:
    """The sub-region Lambda_n of every voxel of a grid of ``size``, flattened (prod(size),), row-major region ids.

    ``grid`` regions per side (an N x N (x N) partition: the reading of Table V consistent with N = 14 on a 56^2
    map; the paper's N = 4 is for whole, roughly aligned 2D slices, this bundle's default N = 1 for random 3D
    crops), clamped to the side's length; along each axis voxel i is in region floor(i * N / size).
    """
    axes = [torch.arange(s, device=device) * min(grid, s) // s for s in size]
    strides = [math.prod(min(grid, s) for s in size[a + 1 :]) for a in range(len(size))]
    coords = torch.meshgrid(*axes, indexing="ij")
    return sum(c * stride for c, stride in zip(coords, strides)).reshape(-1)


def local_prototypes(
    features: torch.Tensor, label: torch.Tensor, num_classes: int, grid: int, groups: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 7-8: local class prototypes of the labeled volumes.

    features (B_l, D, *G); label (B_l, 1, *G) class indices on the same grid; ``groups`` (B_l,) the source volume of
    each crop (any ids; None: every crop its own volume). The paper's j is a labeled *image*: crops of one volume
    are pooled into one j, so that with random crops the agreement Ubar (:func:`uncertainty_weight`) compares
    labeled volumes, not the positions of crops of one volume. Returns, for the J distinct volumes,

    - prototypes (J, K, R, D) in float32, R = number of regions (:func:`region_index`): G^c_n(j) = the mean
      feature of the voxels of class c in region n of the crops of volume j; where class c is absent from region n,
      the whole-volume prototype of class c in volume j (Eq. 8's fallback); zeros where c is absent from volume j;
    - present (J, K) bool: whether class c occurs in volume j at all. Absent (j, c) pairs take no part in the
      prediction (:func:`prototype_logits`).
    """
    b, d = features.shape[:2]
    if groups is None:
        groups = torch.arange(b, device=features.device)
    groups = torch.unique(groups.to(features.device), return_inverse=True)[1]  # ids 0 .. J-1
    n_groups = int(groups.max()) + 1
    regions = region_index(features.shape[2:], grid, features.device)
    n_regions = int(regions.max()) + 1
    cells = n_groups * num_classes * n_regions
    # (B_l, V): the (volume, class, region) cell of every voxel, volume-major then class-major
    index = ((groups.view(b, 1) * num_classes + label.reshape(b, -1).long()) * n_regions + regions).reshape(-1)
    with _fp32(features.device):
        f = features.float().reshape(b, d, -1).transpose(1, 2).reshape(-1, d)  # (B_l * V, D)
        sums = torch.zeros(cells, d, device=f.device).index_add(0, index, f)
        counts = torch.zeros(cells, device=f.device).index_add(0, index, torch.ones_like(index, dtype=f.dtype))
        sums = sums.view(n_groups, num_classes, n_regions, d)
        counts = counts.view(n_groups, num_classes, n_regions, 1)
        whole = sums.sum(2, keepdim=True) / counts.sum(2, keepdim=True).clamp(min=1)
        local = torch.where(counts > 0, sums / counts.clamp(min=1), whole)
    return local, counts.sum((2, 3)) > 0


def prototype_similarity(features: torch.Tensor, prototypes: torch.Tensor, grid: int) -> torch.Tensor:
    """Eq. 8's query: m(i, j, c) = cos(f_u(i), G^c_n(j)) for every unlabeled voxel i, n the region of i.

    features (B_u, D, *G); prototypes (J, K, R, D) from :func:`local_prototypes` on a grid of the same size.
    Returns m (B_u, J, K, *G) in float32, computed with autocast off (under AMP the einsum would otherwise run in
    half precision). Every labeled volume is queried (Eq. 9 sums over all of them).
    """
    b, d, *size = features.shape
    regions = region_index(size, grid, features.device)
    with _fp32(features.device):
        query = F.normalize(features.float().reshape(b, d, -1), dim=1)  # (B_u, D, V)
        keys = F.normalize(prototypes.float(), dim=-1)  # (J, K, R, D)
        if keys.shape[2] == 1:  # one region (N = 1): a plain product, no per-voxel copy of the prototypes
            similarity = torch.einsum("udv,jkd->ujkv", query, keys[:, :, 0])
        else:
            similarity = torch.einsum("udv,jkvd->ujkv", query, keys[:, :, regions])  # each voxel's own region
        return similarity.reshape(b, *prototypes.shape[:2], *size)


def _masked_scores(similarity: torch.Tensor, present: torch.Tensor, temperature: float) -> torch.Tensor:
    """m / T with absent (j, c) pairs at the dtype's lowest value: their exponential is exactly 0, yet logsumexp
    over only such entries stays finite (with -inf its gradient would be NaN)."""
    mask = present.view(1, *present.shape, *([1] * (similarity.ndim - 3)))
    return torch.where(mask, similarity / temperature, torch.finfo(similarity.dtype).min)


def prototype_logits(similarity: torch.Tensor, present: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 9 with a temperature: log p_cr(c) = log sum_j exp(m(j, c) / T) - log sum_c sum_j exp(m(j, c) / T).

    similarity m (B_u, J, K, *G); present (J, K). Returns log p_cr (B_u, K, *G) (log-probabilities, computed
    with logsumexp). Pairs (j, c) with c absent from volume j contribute nothing; a class absent from the whole
    labeled batch gets probability 0 (a huge negative, finite log).

    The paper's Eq. 9 has no temperature: with cosines in [-1, 1], max p_cr for K classes is
    e / (e + (K - 1) / e) (0.71 for K = 4), so 1(max p2_w >= tau = 0.95) would mask out every voxel. T = 0.1 lets
    a confident prototype match pass tau.
    """
    scores = _masked_scores(similarity, present, temperature)
    per_class = torch.logsumexp(scores, dim=1)  # (B_u, K, *G): sum over labeled volumes j
    return per_class - torch.logsumexp(per_class, dim=1, keepdim=True)


def uncertainty_weight(similarity: torch.Tensor, present: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Eqs. 10-12: Ubar = 1/|B_l| sum_j exp(-r KL(q(j) || qbar)) per unlabeled voxel.

    similarity m (B_u, J, K, *G); present (J, K), J labeled volumes (:func:`local_prototypes` pools the crops of
    one volume). Returns (B_u, *G) in (0, 1]: 1 where all labeled volumes give the same class distribution, near 0
    where they disagree (r = ``sharpness`` = 1000 in the paper); exactly 1 with one labeled volume, as in the paper
    with one labeled image (crops of that volume are not separate j: their disagreement is about crop positions,
    not about the unlabeled voxel).

    The KL needs distributions: q(j) = softmax_c m(j, .) over the classes present in volume j (the paper writes
    KL(m(j) || mbar) on the similarities), qbar = mean_j q(j). No temperature here, unlike the prediction p_cr
    (:func:`prototype_logits`): r = 1000 is the paper's value for the KL of untempered similarities, and a
    temperature T scales small KLs by about 1/T^2 (T = 0.1 made r act as 10^5 and zeroed the weight almost
    everywhere). A weight, so computed without gradient.
    """
    with torch.no_grad():
        q = torch.softmax(_masked_scores(similarity, present, 1.0), dim=2)
        qbar = q.mean(dim=1, keepdim=True)
        # xlogy: 0 log 0 = 0 for classes absent from volume j (q(j, c) = 0, and qbar(c) may be 0 too)
        kl = (torch.special.xlogy(q, q) - torch.special.xlogy(q, qbar)).sum(dim=2)  # (B_u, B_l, *G)
        # KL >= 0, but rounding leaves about -1e-7 where the volumes agree, which r = 1000 would turn into a weight > 1
        return torch.exp(-sharpness * kl.clamp(min=0)).mean(dim=1)


class SemSimLoss(torch.nn.Module):
    """L = 1/2 (L_s + lam_u L_u + lam_intra L_intra + lam_cross L_cross) (Eqs. 18-19).

    Args:
        num_classes: K, including the background.
        unlabeled_weight, intra_weight, cross_weight: lam_u, lam_intra, lam_cross (paper 0.5, 0.25, 0.25). A weight of
            exactly 0 skips its term, and the outputs only it needs may be absent.
        confidence_threshold: tau (0.95), on the softmax of the weak view for L_u, on the prediction
            ``intra_confidence`` names for L_intra and on the weak view's prototype prediction for L_cross.
        affinity_temperature: temperature of the intra-image affinity softmax (:func:`refine_by_affinity`).
        affinity_max_tokens: the affinity grid cap (:func:`cap_grid`), 16^3 = 4096.
        intra_confidence: which prediction L_intra's tau mask is taken on, at full resolution: "weak" (default), the
            weak view's own softmax p_w, the confidence L_u uses; "refined", the paper's refined p1_w (Eq. 6). The
            refinement averages p with affinity-weighted neighbours and can only lower max p, so with "refined"
            thin or small structures rarely pass tau (see :meth:`intra_term`).
        prototype_grid: N, sub-regions per side for the local prototypes: 1 (default), global class prototypes per
            labeled volume, for random 3D crops, whose region n holds different anatomy in every crop; the paper's
            4 for whole, roughly aligned 2D slices.
        prototype_temperature: T of the cross-image prediction (:func:`prototype_logits`).
        uncertainty_sharpness: r of the uncertainty weight (1000), on untempered similarities.
        gradient_interval: every this many calls, also log each term's gradient norm on ``gradient_module``'s
            parameters (``grad_<term>``: one extra backward pass per term on those calls); 0 (default) never.
        gradient_module: the module whose parameters those norms are taken on, the backbone; not a submodule of the
            loss (it is not saved with it).

    ``forward(outputs, label)`` reads the network's output dict (keys below) and the labels (B_l, 1, *S):

    - "labeled" (B_l, K, *S) logits: always;
    - "weak", "strong1" (B_u, K, *S) logits, "mix1" (B_u, 1, *S), "partner" (B_u,): for L_u and L_intra; "fp"
      (B_u, K, *S), the feature-perturbed weak pass, joins L_u when present;
    - "features_weak", "features_strong1" (B_u, D, *G): for L_intra;
    - "features_labeled" (B_l, D, *G), "features_weak", "features_strong2" (B_u, D, *G), "mix2": for L_cross;
      "labeled_source" (B_l,), the source volume of each labeled crop, when present (:func:`local_prototypes`).

    The whole loss runs in float32 with autocast off (under the trainer's AMP its inputs may be half precision).

    After each call ``terms`` holds the detached "supervised", "unlabeled", "intra", "cross" (those computed),
    "total" and, with L_u, "confident_fraction" (weak-view voxels with max p_w >= tau): the same ``terms`` interface
    as the template's ``RegularisedLoss``, which ``LossTermsHandler`` logs as ``train_<term>``. The activity of each
    unlabeled term is logged with it: "<term>_pass_<c>", the share of the voxels pseudo-labelled c that pass its tau
    mask (weak-view confidence for "unlabeled" and "intra", prototype confidence for "cross"), and every
    ``gradient_interval`` calls "grad_<term>", the term's gradient norm on the backbone (weighted as in the total).

    ``ramp`` (default 1) scales lam_u, lam_intra and lam_cross; :class:`UnlabeledRamp` sets it per iteration.

    SemSim is not a regulariser of ``RegularisedLoss`` and does not stack with the other methods: its terms need the
    semi-supervised training step (labelled and unlabelled batches, weak and strong views, CutMix, the fusion module
    and the Eq. 19 halving of the whole sum), which replaces the template's ``network``, ``loss`` and ``train``.
    """

    def __init__(
        self,
        num_classes: int,
        unlabeled_weight: float = 0.5,
        intra_weight: float = 0.25,
        cross_weight: float = 0.25,
        confidence_threshold: float = 0.95,
        affinity_temperature: float = 0.1,
        affinity_max_tokens: int = 4096,
        prototype_grid: int = 1,
        prototype_temperature: float = 0.1,
        uncertainty_sharpness: float = 1000.0,
        intra_confidence: str = "weak",
        gradient_interval: int = 0,
        gradient_module: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        weights = {"unlabeled_weight": unlabeled_weight, "intra_weight": intra_weight, "cross_weight": cross_weight}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"SemSim loss weights must be >= 0 (0 switches a term off), got {weights}")
        if not 0 < confidence_threshold <= 1:
            raise ValueError(f"confidence_threshold (tau) must be in (0, 1], got {confidence_threshold}")
        if affinity_temperature <= 0 or prototype_temperature <= 0:
            raise ValueError(
                "affinity_temperature and prototype_temperature must be > 0, got "
                f"{affinity_temperature} and {prototype_temperature}"
            )
        if affinity_max_tokens < 1 or prototype_grid < 1:
            raise ValueError(
                f"affinity_max_tokens and prototype_grid must be >= 1, got {affinity_max_tokens} "
                f"and {prototype_grid}"
            )
        if intra_confidence not in ("weak", "refined"):
            raise ValueError(f"intra_confidence must be 'weak' or 'refined', got {intra_confidence!r}")
        if gradient_interval < 0 or (gradient_interval and gradient_module is None):
            raise ValueError(
                f"gradient_interval must be >= 0 (0: off), got {gradient_interval}; a positive interval needs "
                "gradient_module, the backbone whose parameters the norms are taken on"
            )
        self.num_classes = num_classes
        self.intra_confidence = intra_confidence
        self.unlabeled_weight, self.intra_weight, self.cross_weight = unlabeled_weight, intra_weight, cross_weight
        self.confidence_threshold = confidence_threshold
        self.affinity_temperature, self.affinity_max_tokens = affinity_temperature, affinity_max_tokens
        self.prototype_grid, self.prototype_temperature = prototype_grid, prototype_temperature
        self.uncertainty_sharpness = uncertainty_sharpness
        # Eq. 2: L_s = 1/2 (CE + Dice)
        self.supervised_loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.5, lambda_dice=0.5)
        self.terms: dict[str, torch.Tensor] = {}
        self.ramp = 1.0
        self.gradient_interval = gradient_interval
        # a list, so that the backbone is not registered as a submodule of the loss
        self._gradient_modules = [gradient_module] if gradient_module is not None else []
        self._calls = 0

    def forward(self, outputs: Mapping[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        with _fp32(outputs["labeled"].device):
            return self._forward(outputs, label)

    def _forward(self, outputs: Mapping[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        losses = {"supervised": self.supervised_loss(outputs["labeled"].float(), label)}
        weights = {"supervised": 1.0}
        activity: dict[str, torch.Tensor] = {}
        if self.unlabeled_weight or self.intra_weight:
            _require(outputs, ("weak", "strong1", "mix1", "partner"), "unlabeled_weight or intra_weight > 0")
            # float32 throughout: softmax, affinities and logsumexp are not AMP-safe in half precision
            p_weak = torch.softmax(outputs["weak"].detach().float(), dim=1)
            p_strong1 = torch.softmax(outputs["strong1"].float(), dim=1)
        if self.unlabeled_weight:
            losses["unlabeled"], activity["confident_fraction"], passing = self.unlabeled_term(
                p_weak, p_strong1, outputs["mix1"], outputs["partner"], outputs.get("fp")
            )
            weights["unlabeled"] = self.ramp * self.unlabeled_weight
            activity.update(_named("unlabeled_pass", passing))
        if self.intra_weight:
            _require(outputs, ("features_weak", "features_strong1"), "intra_weight > 0")
            losses["intra"], passing = self.intra_term(
                p_weak,
                p_strong1,
                outputs["features_weak"].float(),
                outputs["features_strong1"].float(),
                outputs["mix1"],
                outputs["partner"],
            )
            weights["intra"] = self.ramp * self.intra_weight
            activity.update(_named("intra_pass", passing))
        if self.cross_weight:
            _require(
                outputs,
                ("features_labeled", "features_weak", "features_strong2", "mix2", "partner"),
                "cross_weight > 0",
            )
            losses["cross"], passing = self.cross_term(
                outputs["features_labeled"].float(),
                label,
                outputs["features_weak"].float(),
                outputs["features_strong2"].float(),
                outputs["mix2"],
                outputs["partner"],
                outputs.get("labeled_source"),
                outputs.get("features_labeled_target"),
            )
            weights["cross"] = self.ramp * self.cross_weight
            activity.update(_named("cross_pass", passing))
        total = sum(weights[name] * value for name, value in losses.items()) / 2  # Eq. 19
        self._calls += 1
        if self.gradient_interval and self._calls % self.gradient_interval == 0 and total.requires_grad:
            activity.update(self._gradient_norms({name: weights[name] * value / 2 for name, value in losses.items()}))
        self.terms = {name: value.detach() for name, value in {**losses, **activity, "total": total}.items()}
        return total

    def _gradient_norms(self, weighted: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ "grad_<term>": the L2 norm of d(weighted term)/d(backbone parameters), each term on its own."""
        parameters = [p for p in self._gradient_modules[0].parameters() if p.requires_grad]
        norms = {}
        for name, value in weighted.items():
            if not value.requires_grad:
                continue
            grads = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
            norms[f"grad_{name}"] = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
        return norms

    def unlabeled_term(
        self,
        p_weak: torch.Tensor,
        p_strong1: torch.Tensor,
        mix: torch.Tensor,
        partner: torch.Tensor,
        logits_fp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1 (FixMatch): masked Dice of the CutMixed strong view 1 against the weak view's pseudo-label, CutMixed
        the same way; with the feature-perturbed pass ``logits_fp``, UniMatch's stream is averaged in:
        L_u = 1/2 (Dice_strong1 + Dice_fp), Dice_fp against the unmixed pseudo-label.

        p_weak (detached), p_strong1 (B_u, K, *S) probabilities; mix (B_u, 1, *S); partner (B_u,). Returns
        (L_u, the fraction of weak-view voxels passing tau, the share passing per pseudo-label class (K,)).
        """
        confidence, pseudo = p_weak.max(dim=1, keepdim=True)
        confident = (confidence >= self.confidence_threshold).float()
        loss = masked_dice(p_strong1, cutmix_target(pseudo, mix, partner), cutmix_target(confident, mix, partner))
        if logits_fp is not None:
            loss = (loss + masked_dice(torch.softmax(logits_fp.float(), dim=1), pseudo, confident)) / 2
        return loss, confident.mean(), pass_share(pseudo, confident, p_weak.shape[1])

    def intra_term(
        self,
        p_weak: torch.Tensor,
        p_strong1: torch.Tensor,
        features_weak: torch.Tensor,
        features_strong1: torch.Tensor,
        mix: torch.Tensor,
        partner: torch.Tensor,
    ) -> torch.Tensor:
        """Eq. 6: L_intra = Dice(p_in, one-hot argmax p1_w) over the voxels passing tau, at full resolution.

        p_weak (detached), p_strong1 (B_u, K, *S) probabilities; features (B_u, D, *G); mix (B_u, 1, *S); partner
        (B_u,). p1_w = refine(p_w, f_w) is the detached target, p_in = refine(p_s1, f_s1) carries the gradient into
        the strong logits and the strong features (:func:`refine_by_affinity`: the affinity on the feature grid
        capped at ``affinity_max_tokens``, the propagated term upsampled and added to the full-resolution p). The
        weak view is not mixed, so its target and mask are CutMixed like strong view 1, on the image grid.

        Departures, each because the paper's form leaves the term at a constant in 3D (measured: only background
        passed tau and the loss sat at 2/3 with gradients of 1e-7 on the foreground classes):

        - the mask 1(max p >= tau) is taken on the image grid, from p_w by default (``intra_confidence``), not on
          a pooled p1_w: averaging (pooling, refinement) only lowers max p, so thin structures never passed;
        - the Dice is :func:`present_class_dice`: batch-level sums, classes absent from the masked target left out.
        """
        grid = cap_grid(features_weak.shape[2:], self.affinity_max_tokens)
        with torch.no_grad():
            p1_weak = refine_by_affinity(p_weak, pool_to_size(features_weak, grid), self.affinity_temperature)
            confidence = (p_weak if self.intra_confidence == "weak" else p1_weak).amax(dim=1, keepdim=True)
            pseudo = p1_weak.argmax(dim=1, keepdim=True)
            target = cutmix_target(pseudo, mix, partner)
            confident = cutmix_target((confidence >= self.confidence_threshold).float(), mix, partner)
        p_in = refine_by_affinity(p_strong1, pool_to_size(features_strong1, grid), self.affinity_temperature)
        return present_class_dice(p_in, target, confident), pass_share(target, confident, p_weak.shape[1])

    def cross_term(
        self,
        features_labeled: torch.Tensor,
        label: torch.Tensor,
        features_weak: torch.Tensor,
        features_strong2: torch.Tensor,
        mix: torch.Tensor,
        partner: torch.Tensor,
        groups: torch.Tensor | None = None,
        features_labeled_target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 13: L_cross = mean over voxels of 1(max p2_w >= tau) * Ubar * CE(p_cr(strong 2), argmax p2_w).

        features_labeled (B_l, D, *G) with the labels (B_l, 1, *S) resized to G; features_weak, features_strong2
        (B_u, D, *G); mix (B_u, 1, *S) for strong view 2; partner (B_u,); groups (B_l,) the source volume of each
        labeled crop, or None (each crop its own volume). Prototypes (Eqs. 7-8) and Ubar (Eqs. 10-12) are per
        labeled volume (:func:`local_prototypes`), global per class with the default N = 1.

        Gradient flows into the strong-view-2 features and, through the prototypes, into the labeled features (the
        same forward pass, not a second no-grad one). p2_w (from detached prototypes) and Ubar are detached. Masked
        voxels count as 0 in the mean, as UniMatch averages its masked CE. With an EMA teacher,
        ``features_labeled_target`` (B_l, D, *G) are the teacher's labeled features, and p2_w is made from the
        teacher's prototypes and weak features, both sides of the target from one network.

        Returns (L_cross, the share of voxels passing tau per pseudo-label class (K,)).
        """
        grid = features_labeled.shape[2:]
        # nearest-exact: the label at each cell's centre (plain "nearest" takes its first corner); a plain tensor,
        # as the MetaTensor's metadata has no meaning on the feature grid
        label_grid = F.interpolate(label.as_subclass(torch.Tensor).float(), size=grid, mode="nearest-exact").long()
        prototypes, present = local_prototypes(
            features_labeled, label_grid, self.num_classes, self.prototype_grid, groups
        )
        with torch.no_grad():
            target_prototypes = prototypes.detach()
            if features_labeled_target is not None:
                target_prototypes = local_prototypes(
                    features_labeled_target.float(), label_grid, self.num_classes, self.prototype_grid, groups
                )[0]
            similarity_weak = prototype_similarity(features_weak, target_prototypes, self.prototype_grid)
            confidence, pseudo = (
                prototype_logits(similarity_weak, present, self.prototype_temperature).exp().max(dim=1, keepdim=True)
            )
            mix_grid = pool_to_size(mix.float(), grid)
            target = cutmix_target(pseudo, mix_grid, partner)[:, 0]
            confident = cutmix_target((confidence >= self.confidence_threshold).float(), mix_grid, partner)[:, 0]
        similarity = prototype_similarity(features_strong2, prototypes, self.prototype_grid)
        weight = uncertainty_weight(similarity, present, self.uncertainty_sharpness)
        cross_entropy = F.nll_loss(
            prototype_logits(similarity, present, self.prototype_temperature), target, reduction="none"
        )
        passing = pass_share(target[:, None], confident[:, None], self.num_classes)
        return (confident * weight * cross_entropy).mean(), passing


def pass_share(pseudo: torch.Tensor, confident: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) share of the voxels pseudo-labelled c that pass the tau mask, per class c (0 where no voxel is c).

    pseudo (B, 1, *S) class indices, confident (B, 1, *S) the 0/1 mask of the same voxels."""
    classes = one_hot(pseudo, num_classes)
    labelled = classes.flatten(2).sum((0, 2))
    passing = classes.mul(confident).flatten(2).sum((0, 2))
    return passing / labelled.clamp(min=1)


def _named(prefix: str, per_class: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{prefix}_{c}": value for c, value in enumerate(per_class)}


def _require(outputs: Mapping[str, torch.Tensor], keys: Sequence[str], why: str) -> None:
    missing = [key for key in keys if key not in outputs]
    if missing:
        raise KeyError(
            f"SemSimLoss with {why} needs network outputs {missing}; got {sorted(outputs)}. Set that "
            "weight to 0 or let the network produce them (SemSimNetwork with the matching weights)"
        )
