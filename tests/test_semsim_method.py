"""The SemSim method code on fixed tiny tensors: every loss term against a hand or dense computation written
independently of the implementation, the paper's Eq. 9 inconsistency (tau unreachable without a temperature), the
3D repairs of issue 16 (L_intra's floor and its full-resolution mask, prototypes and Ubar per labeled volume, float32
similarity products under autocast), the weights that switch terms off, where gradients flow, and the
Spatial-aware Fusion Module's shapes, refusals and size. The training-step parts (CutMix boxes, channel dropout,
the batch, the network's passes) are in test_semsim_parts.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import BUNDLES, bundle_module
from monai.losses import DiceCELoss

SEMSIM_BUNDLE = BUNDLES / "semsim_segmentation"
semsim = bundle_module(SEMSIM_BUNDLE, "semsim")
sfm = bundle_module(SEMSIM_BUNDLE, "sfm")
semsim_training = bundle_module(SEMSIM_BUNDLE, "semsim_training")


def plain_masked_dice(p: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Per image and class 1 - (2 sum m p t + s) / (sum m p + sum m t + s), then the mean: written out directly."""
    t = F.one_hot(target[:, 0].long(), p.shape[1]).movedim(-1, 1).float()
    dims = tuple(range(2, p.ndim))
    inter = (mask * p * t).sum(dims)
    denom = (mask * p).sum(dims) + (mask * t).sum(dims)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


# ---------------------------------------------------------------------------------------------- masked Dice, CutMix


def test_masked_dice_excludes_masked_voxels_by_hand():
    # 1 image, 2 classes, 4 voxels; the last voxel is masked out
    p0 = torch.tensor([0.8, 0.6, 0.3, 0.1])
    probs = torch.stack([p0, 1 - p0]).view(1, 2, 1, 4)
    target = torch.tensor([0, 0, 1, 1]).view(1, 1, 1, 4)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 1, 4)
    s = 1e-5
    class0 = 1 - (2 * (0.8 + 0.6) + s) / ((0.8 + 0.6 + 0.3) + 2 + s)
    class1 = 1 - (2 * 0.7 + s) / ((0.2 + 0.4 + 0.7) + 1 + s)
    loss = semsim.masked_dice(probs, target, mask)
    assert loss.item() == pytest.approx((class0 + class1) / 2, abs=1e-6)
    # the same as the Dice of the three kept voxels alone, whatever the excluded voxel holds
    kept = semsim.masked_dice(probs[..., :3], target[..., :3], mask[..., :3])
    assert loss.item() == pytest.approx(kept.item(), abs=1e-6)
    flipped = probs.clone()
    flipped[..., 3] = flipped[..., 3].flip(1)
    assert semsim.masked_dice(flipped, target, mask).item() == pytest.approx(loss.item(), abs=1e-6)


def test_masked_dice_fully_masked_image_is_zero_without_nan():
    probs = torch.softmax(torch.randn(2, 3, 4, 4, requires_grad=True), dim=1)
    target = torch.randint(0, 3, (2, 1, 4, 4))
    mask = torch.ones(2, 1, 4, 4)
    mask[1] = 0  # image 1 has no confident voxel
    per_image = [semsim.masked_dice(probs[i:i + 1], target[i:i + 1], mask[i:i + 1]) for i in range(2)]
    assert per_image[1].item() == 0.0
    loss = semsim.masked_dice(probs, target, mask)
    assert loss.item() == pytest.approx((per_image[0].item() + 0.0) / 2, abs=1e-6)  # Eq. 1: mean over images
    assert loss.item() == pytest.approx(plain_masked_dice(probs, target, mask).item(), abs=1e-6)
    everything_masked = semsim.masked_dice(probs, target, torch.zeros_like(mask))
    everything_masked.backward()
    assert everything_masked.item() == 0.0


def test_cutmix_of_pseudo_labels_and_confidence():
    pseudo = torch.tensor([[0, 1, 2], [3, 4, 5]]).view(2, 1, 1, 3)
    confidence = torch.tensor([[0.1, 0.2, 0.3], [0.7, 0.8, 0.9]]).view(2, 1, 1, 3)
    mix = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]).view(2, 1, 1, 3)
    partner = torch.tensor([1, 0])
    assert semsim.cutmix_target(pseudo, mix, partner).flatten().tolist() == [0, 4, 5, 0, 4, 5]
    assert semsim.cutmix_target(confidence, mix, partner).flatten().tolist() == pytest.approx(
        [0.1, 0.8, 0.9, 0.1, 0.8, 0.9])
    # a mask pooled to a coarser grid counts as pasted where the box covers at least half the cell
    pooled = torch.tensor([[0.25, 0.5, 0.75], [0.0, 1.0, 0.49]]).view(2, 1, 1, 3)
    assert semsim.cutmix_target(pseudo, pooled, partner).flatten().tolist() == [0, 4, 5, 3, 1, 5]


# ------------------------------------------------------------------------------------------------ intra-image term


def test_refinement_matches_dense_computation_and_gives_distributions():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 3, 4), dim=1)
    features = torch.randn(2, 5, 3, 4)
    refined = semsim.refine_by_affinity(probs, features, temperature=0.5)
    for b in range(2):
        p = probs[b].reshape(3, -1)
        f = features[b].reshape(5, -1)
        n = f.shape[1]
        cos = torch.tensor([[F.cosine_similarity(f[:, i], f[:, j], dim=0).item() for j in range(n)] for i in range(n)])
        m = torch.softmax(cos / 0.5, dim=1)
        expected = torch.stack([(p[:, i] + sum(m[i, j] * p[:, j] for j in range(n))) / 2 for i in range(n)], dim=1)
        assert torch.allclose(refined[b].reshape(3, -1), expected, atol=1e-5)
    assert torch.allclose(refined.sum(1), torch.ones(2, 3, 4), atol=1e-5)
    assert refined.min() >= 0


def test_affinity_without_temperature_empties_the_tau_mask():
    # two orthogonal clusters of 256 tokens each (8^3 grid), predictions confident and matching the clusters
    torch.manual_seed(0)
    cluster = (torch.arange(512) % 2).view(1, 1, 8, 8, 8)
    features = F.one_hot(cluster[:, 0], 4).movedim(-1, 1).float() + 0.01 * torch.randn(1, 4, 8, 8, 8)
    probs = torch.where(F.one_hot(cluster[:, 0], 2).movedim(-1, 1).bool(), 0.99, 0.01)
    plain = semsim.refine_by_affinity(probs, features, temperature=1.0)  # the paper's softmax(cos)
    assert plain.amax(1).max() < 0.95  # (p + ~0.73 p_own + ~0.27 p_other) / 2: nothing passes tau
    sharp = semsim.refine_by_affinity(probs, features, temperature=0.1)
    assert sharp.amax(1).min() > 0.95


def test_grid_capping():
    assert semsim.cap_grid((56, 56), 4096) == (56, 56)  # the paper's 2D map: no pooling
    assert semsim.cap_grid((16, 16, 16), 4096) == (16, 16, 16)
    assert semsim.cap_grid((32, 32, 32), 4096) == (16, 16, 16)
    assert semsim.cap_grid((24, 24, 24), 4096) == (16, 16, 16)
    assert semsim.cap_grid((40, 40, 20), 4096) == (20, 20, 10)
    assert semsim.cap_grid((128, 128), 4096) == (64, 64)
    for size in [(24, 24, 12), (48, 40, 32), (20, 30, 40), (100, 100)]:
        grid = semsim.cap_grid(size, 1000)
        assert math.prod(grid) <= 1000 and all(1 <= g <= s for g, s in zip(grid, size))
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert semsim.pool_to_size(x, (2, 2)).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert semsim.pool_to_size(x, (4, 4)) is x


def block_mean(x: torch.Tensor, size) -> torch.Tensor:
    """(B, C, *S) averaged over equal blocks down to ``size`` (each S divisible by its size), by reshaping."""
    b, c, *spatial = x.shape
    shape = [b, c]
    for n, g in zip(spatial, size):
        shape += [g, n // g]
    return x.reshape(shape).mean(dim=tuple(range(3, 2 + 2 * len(size), 2)))


def linear_weights(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) weights of linear interpolation with half-pixel centres (align_corners=False), written out."""
    w = torch.zeros(n_out, n_in)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        k0 = min(int(math.floor(src)), n_in - 1)
        k1, frac = min(k0 + 1, n_in - 1), src - k0
        w[i, k0] += 1 - frac
        w[i, k1] += frac
    return w


def dense_refine_2d(p: torch.Tensor, f: torch.Tensor, temperature: float) -> torch.Tensor:
    """(p + U(I(p) M^T)) / 2 for one 2D image with loops: p (K, H, W) on the image grid, f (D, h, w) on the
    affinity grid; I = block mean, M = row-softmax of cosines / T, U = bilinear with half-pixel centres."""
    k, height, width = p.shape
    d, h, w = f.shape
    pooled = block_mean(p[None], (h, w))[0].reshape(k, -1)
    flat = f.reshape(d, -1)
    n = flat.shape[1]
    cos = torch.tensor([[F.cosine_similarity(flat[:, i], flat[:, j], dim=0).item() for j in range(n)]
                        for i in range(n)])
    m = torch.softmax(cos / temperature, dim=1)
    q = torch.stack([sum(m[i, j] * pooled[:, j] for j in range(n)) for i in range(n)], dim=1).reshape(k, h, w)
    up = torch.einsum("Yy,kyx,Xx->kYX", linear_weights(height, h), q, linear_weights(width, w))
    return (p + up) / 2


def batch_present_dice(p: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-5):
    """Per class, sums over the batch and the masked voxels: 1 - (2 sum p t + s) / (sum p + sum t + s); the mean
    over the classes present in the masked target; 0 if none."""
    losses = []
    for c in range(p.shape[1]):
        t = (target[:, 0] == c).float() * mask[:, 0]
        if t.sum() > 0:
            pc = p[:, c] * mask[:, 0]
            losses.append(1 - (2 * (pc * t).sum() + smooth) / (pc.sum() + t.sum() + smooth))
    return torch.stack(losses).mean() if losses else torch.tensor(0.0)


def test_present_class_dice_by_hand():
    p0 = torch.tensor([0.8, 0.6, 0.3, 0.1])
    probs = torch.stack([p0, 1 - p0, torch.zeros(4)]).view(1, 3, 4).repeat(2, 1, 1)  # 2 images, 3 classes
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]).view(2, 1, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]).view(2, 1, 4)
    s = 1e-5
    class0 = 1 - (2 * (0.8 + 0.6 + 0.8) + s) / ((0.8 + 0.6 + 0.3 + 0.8) + 3 + s)  # both images' masked voxels
    class1 = 1 - (2 * 0.7 + s) / ((0.2 + 0.4 + 0.7 + 0.2) + 1 + s)
    # class 2 is absent from the masked target: left out, not counted as ~1
    assert semsim.present_class_dice(probs, target, mask).item() == pytest.approx((class0 + class1) / 2, abs=1e-6)
    logits = torch.randn(2, 3, 4, requires_grad=True)
    empty = semsim.present_class_dice(torch.softmax(logits, 1), target, torch.zeros_like(mask))
    empty.backward()
    assert empty.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("confidence, tau", [("weak", 0.9), ("refined", 0.7)])
def test_intra_term_by_a_dense_computation(confidence, tau):
    """The whole of L_intra (Eqs. 4-6) against loops: features and p pooled to the capped affinity grid (4 tokens
    here), the propagated term upsampled to the image grid and added to the full-resolution p, the tau mask on the
    image grid (from p_w or from p1_w), target and mask CutMixed by the partner's on the image grid, the Dice over
    the batch and the classes present."""
    g = torch.Generator().manual_seed(3)
    k = 3
    label = torch.randint(0, k, (2, 4, 4), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)  # 8x8
    onehot = F.one_hot(label, k).movedim(-1, 1).float()
    p_weak = torch.softmax(4 * onehot + torch.randn(onehot.shape, generator=g), 1)
    logits = (2 * onehot + torch.randn(onehot.shape, generator=g)).requires_grad_()
    f_weak, f_strong = torch.randn(2, 5, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    mix = torch.zeros(2, 1, 8, 8)
    mix[0, :, 1:6, 2:5] = 1
    partner = torch.tensor([1, 0])
    loss = semsim.SemSimLoss(k, affinity_max_tokens=4, intra_confidence=confidence, confidence_threshold=tau)
    value, _ = loss.intra_term(p_weak, torch.softmax(logits, 1), f_weak, f_strong, mix, partner)
    p_strong = torch.softmax(logits, 1).detach()
    refined_weak = torch.stack([dense_refine_2d(p_weak[b], block_mean(f_weak, (2, 2))[b], 0.1) for b in range(2)])
    p_in = torch.stack([dense_refine_2d(p_strong[b], block_mean(f_strong, (2, 2))[b], 0.1) for b in range(2)])
    confident = ((p_weak if confidence == "weak" else refined_weak).amax(1, keepdim=True) >= tau).float()
    pseudo = refined_weak.argmax(1, keepdim=True)
    box = mix.bool()  # partner of volume 0 is volume 1: flip(0)
    target, mask = torch.where(box, pseudo.flip(0), pseudo), torch.where(box, confident.flip(0), confident)
    assert 0.1 < mask.mean() < 0.9 and len(target[mask.bool()].unique()) > 1  # a non-trivial case
    assert value.item() == pytest.approx(batch_present_dice(p_in, target, mask).item(), abs=1e-5)
    value.backward()
    assert logits.grad.abs().sum() > 0


def thin_sheet_case():
    """A 32x32x16 crop (feature grid 8x8x4, tokens of 4^3 voxels) whose weak view is confident everywhere: p = 0.99
    for background and for a foreground sheet two voxels thick inside one token layer; class 2 absent."""
    size, k = (32, 32, 16), 3
    cls = torch.zeros(1, *size, dtype=torch.long)
    cls[:, 13:15] = 1
    onehot = F.one_hot(cls, k).movedim(-1, 1)
    p_weak = torch.where(onehot.bool(), 0.99, 0.005)
    features = block_mean(p_weak, (8, 8, 4)) + 0.01 * torch.randn(1, 3, 8, 8, 4, generator=torch.Generator().manual_seed(0))
    return cls, onehot.float(), p_weak, features


def test_a_thin_foreground_class_entering_the_mask_gets_a_gradient():
    """Issue 16, defect 1: the weak probabilities were pooled to the token grid before the tau threshold (the sheet
    pooled to 0.5), refined by an average that only dilutes, and the per-image Dice gave a class absent from the
    mask loss ~1 with a gradient of ~1e-7. Now the sheet's voxels pass tau and its class learns like background."""
    cls, onehot, p_weak, features = thin_sheet_case()
    logits = (2.0 * onehot).requires_grad_()
    no_mix, partner = torch.zeros(1, 1, *cls.shape[1:]), torch.tensor([0])
    value, _ = semsim.SemSimLoss(3).intra_term(p_weak, torch.softmax(logits, 1), features, features.clone(),
                                               no_mix, partner)
    value.backward()
    sheet = cls[0] == 1
    foreground = logits.grad[0, 1][sheet].abs().mean()
    background = logits.grad[0, 0][~sheet].abs().mean()
    assert foreground > background, (foreground, background)  # per voxel: the sheet has 1/15 of the voxels
    # a confident, correct strong view: no floor of (K - 1) / K = 2/3 from the absent class 2 (what remains is the
    # sheet's refined p_in, diluted by the coarse propagated term)
    exact, _ = semsim.SemSimLoss(3).intra_term(p_weak, torch.softmax(20 * onehot, 1), features, features, no_mix,
                                               partner)
    assert exact.item() < 0.25


def test_the_papers_refined_mask_is_an_option():
    """intra_confidence="refined" thresholds p1_w (Eq. 6 as written), on the image grid: the sheet's refined
    confidence, (0.99 + a propagated ~0.5) / 2, stays below tau, so only background passes."""
    cls, onehot, p_weak, features = thin_sheet_case()
    logits = (2.0 * onehot).requires_grad_()
    no_mix, partner = torch.zeros(1, 1, *cls.shape[1:]), torch.tensor([0])
    loss = semsim.SemSimLoss(3, intra_confidence="refined")
    loss.intra_term(p_weak, torch.softmax(logits, 1), features, features, no_mix, partner)[0].backward()
    sheet = cls[0] == 1
    # the sheet's class gets only what reaches it through the propagated term of background voxels
    assert logits.grad[0, 1][sheet].abs().mean() < 0.1 * logits.grad[0, 0][~sheet].abs().mean()
    with pytest.raises(ValueError, match="intra_confidence"):
        semsim.SemSimLoss(3, intra_confidence="pooled")


# ------------------------------------------------------------------------------------------------ cross-image term


def test_local_prototypes_by_hand_with_both_fallbacks():
    # 2 labeled 4x4 volumes, 3 classes, N = 2: four 2x2 regions; feature = (row, col) of the voxel
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    features = torch.stack([rows, cols]).unsqueeze(0).repeat(2, 1, 1, 1)
    label = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    label[0, 0, 0, 0] = label[0, 0, 1, 1] = 1  # volume 0: class 1 only in region 0, class 2 absent
    label[1, 0, 3, 3] = 2  # volume 1: class 2 in region 3 only, class 1 absent
    prototypes, present = semsim.local_prototypes(features, label, num_classes=3, grid=2)
    assert prototypes.shape == (2, 3, 4, 2)
    assert present.tolist() == [[True, True, False], [True, False, True]]
    # class 0 in volume 0, region 0 = voxels (0,1), (1,0); regions 1-3 = all of their voxels
    assert prototypes[0, 0].tolist() == [[0.5, 0.5], [0.5, 2.5], [2.5, 0.5], [2.5, 2.5]]
    # class 1 in volume 0: region 0's mean (0.5, 0.5); absent from regions 1-3, which take the whole-volume mean
    assert prototypes[0, 1].tolist() == [[0.5, 0.5]] * 4
    assert prototypes[0, 2].abs().sum() == 0 and prototypes[1, 1].abs().sum() == 0  # absent from the volume
    # class 0 in volume 1, region 3 = voxels (2,2), (2,3), (3,2): mean (7/3, 7/3)
    assert torch.allclose(prototypes[1, 0, 3], torch.tensor([7 / 3, 7 / 3]))
    assert prototypes[1, 2].tolist() == [[3.0, 3.0]] * 4
    # regions clamp to the grid (N = 4 on a side of 3) and use floor(i * N / size)
    assert semsim.region_index((3, 8), 4).view(3, 8).tolist() == [
        [0, 0, 1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 6, 7, 7], [8, 8, 9, 9, 10, 10, 11, 11]]


def test_prototype_similarity_queries_each_voxels_own_region():
    torch.manual_seed(0)
    prototypes = torch.randn(2, 3, 4, 5)  # B_l, K, R = 2x2 regions, D
    features = torch.randn(1, 5, 4, 4)
    m = semsim.prototype_similarity(features, prototypes, grid=2)
    assert m.shape == (1, 2, 3, 4, 4)
    for y in range(4):
        for x in range(4):
            region = (y // 2) * 2 + x // 2
            expected = F.cosine_similarity(features[0, :, y, x].view(1, 1, 5), prototypes[:, :, region], dim=-1)
            assert torch.allclose(m[0, :, :, y, x], expected, atol=1e-6)


def test_p_cr_matches_eq9_and_needs_a_temperature_to_reach_tau():
    torch.manual_seed(0)
    present = torch.ones(2, 4, dtype=torch.bool)
    m = torch.rand(3, 2, 4, 5) * 2 - 1  # cosines of 3 voxels x 5 against 2 labeled volumes, 4 classes
    expected = m.exp().sum(1) / m.exp().sum((1, 2)).unsqueeze(1)  # Eq. 9 as written
    assert torch.allclose(semsim.prototype_logits(m, present, 1.0).exp(), expected, atol=1e-6)
    bound = math.e / (math.e + 3 / math.e)  # ~0.711
    assert semsim.prototype_logits(m, present, 1.0).exp().max() <= bound
    best = torch.tensor([1.0, -1.0, -1.0, -1.0]).view(1, 1, 4, 1).repeat(1, 2, 1, 1)  # the extreme case
    assert semsim.prototype_logits(best, present, 1.0).exp()[0, 0, 0].item() == pytest.approx(bound, abs=1e-6)
    assert bound < 0.95  # tau = 0.95 is unreachable without a temperature ...
    assert semsim.prototype_logits(best, present, 0.1).exp()[0, 0, 0].item() > 0.95  # ... and reachable with T=0.1
    # the extreme case through real features: a query aligned with class 0, opposite to the three others
    prototypes = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]]).view(1, 4, 1, 2)
    m_real = semsim.prototype_similarity(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), prototypes, grid=1)
    assert semsim.prototype_logits(m_real, torch.ones(1, 4, dtype=torch.bool), 1.0).exp().max().item() == \
        pytest.approx(bound, abs=1e-6)


def test_p_cr_leaves_out_absent_classes_without_nan():
    m = torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.3, 0.9]]).view(1, 2, 3, 1, 1).requires_grad_()
    present = torch.tensor([[True, True, False], [True, False, False]])  # class 2 absent from the whole batch
    log_p = semsim.prototype_logits(m, present, 0.1)
    e = torch.exp(torch.tensor([0.5, 0.2, 0.1]) / 0.1)
    expected = torch.stack([e[0] + e[2], e[1], torch.tensor(0.0)]) / (e.sum())
    assert torch.allclose(log_p.exp().flatten(), expected, atol=1e-6)
    assert torch.isfinite(log_p).all()
    log_p[0, :2].sum().backward()
    assert torch.isfinite(m.grad).all() and m.grad[0, :, 2].abs().sum() == 0


def test_uncertainty_weight_is_one_on_agreement_and_small_on_disagreement():
    present = torch.ones(3, 4, dtype=torch.bool)
    agree = torch.tensor([0.9, 0.1, -0.2, 0.0]).view(1, 1, 4, 1).repeat(2, 3, 1, 5)
    # float32 rounding of identical q(j) leaves KL ~ 1e-8, which r = 1000 turns into 1 - 1e-5
    assert torch.allclose(semsim.uncertainty_weight(agree, present, 1000.0), torch.ones(2, 5), atol=1e-4)
    disagree = agree.clone()
    disagree[:, 1] = torch.tensor([0.0, 0.9, 0.1, -0.2]).view(1, 4, 1)  # volume 1 prefers another class
    weight = semsim.uncertainty_weight(disagree, present, 1000.0)
    assert weight.shape == (2, 5) and (weight < 1e-3).all()
    # by hand on two volumes with r = 1: q(j) = softmax(m(j)) (no temperature), qbar = mean,
    # Ubar = mean_j exp(-KL(q(j) || qbar))
    m = torch.tensor([[0.3, 0.0], [0.0, 0.3]]).view(1, 2, 2)
    q = torch.softmax(m, dim=-1)
    qbar = q.mean(1, keepdim=True)
    kl = (q * (q / qbar).log()).sum(-1)
    assert semsim.uncertainty_weight(m, torch.ones(2, 2, dtype=torch.bool), 1.0).item() == pytest.approx(
        torch.exp(-kl).mean().item(), abs=1e-6)


def test_uncertainty_weight_has_no_temperature():
    """r = 1000 is the paper's value for untempered similarities: two volumes whose cosines differ by 0.05 mostly
    agree (Ubar 0.79); with the prediction's T = 0.1 inside the KL the same pair would weigh 0.03."""
    present = torch.ones(2, 3, dtype=torch.bool)
    m = torch.tensor([[0.50, 0.10, -0.10], [0.45, 0.15, -0.10]]).view(1, 2, 3, 1)
    assert semsim.uncertainty_weight(m, present, 1000.0).item() > 0.75
    tempered = semsim.uncertainty_weight(m / 0.1, present, 1000.0)  # what T = 0.1 would have given
    assert tempered.item() < 0.05


def cross_case():
    """One labeled volume with orthogonal class directions e0, e1 (N = 1) and one unlabeled volume of two voxels:
    weak voxel A along e0 (p2_w ~ 1, passes tau), weak voxel B halfway (p2_w = 0.5, masked); strong voxel A along
    e1, so CE = -log p_cr(class 0) = log(1 + e^10) with T = 0.1."""
    features_labeled = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    label = torch.tensor([0, 1]).view(1, 1, 1, 2)
    features_weak = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).T.reshape(1, 2, 1, 2)
    features_strong2 = torch.tensor([[0.0, 1.0], [0.3, 0.7]]).T.reshape(1, 2, 1, 2).requires_grad_()
    return features_labeled, label, features_weak, features_strong2


def test_cross_term_is_masked_by_tau_by_hand():
    loss = semsim.SemSimLoss(num_classes=2, prototype_grid=1)
    features_labeled, label, features_weak, features_strong2 = cross_case()
    no_mix, partner = torch.zeros(1, 1, 1, 2), torch.tensor([0])
    cross, _ = loss.cross_term(features_labeled, label, features_weak, features_strong2, no_mix, partner)
    # voxel B is below tau and counts as 0 in the mean over both voxels; one labeled volume: Ubar = 1
    assert cross.item() == pytest.approx(math.log1p(math.exp(10.0)) / 2, rel=1e-5)


def dense_cross_term(features_labeled, label_grid, groups, features_weak, features_strong2, mix_grid, partner,
                     num_classes, temperature=0.1, sharpness=1000.0, tau=0.95):
    """Eq. 13 with loops, 2D: global class prototypes (N = 1) of each labeled volume (its crops pooled), p_cr of
    Eq. 9 with a temperature, Ubar of Eqs. 10-12 on untempered similarities, CutMix of target and mask by the
    partner's weak-view prediction where the pooled box covers at least half a cell."""
    volumes = sorted(set(groups))
    prototypes = {}
    for j in volumes:
        crops = [i for i, g in enumerate(groups) if g == j]
        for c in range(num_classes):
            vectors = [features_labeled[i, :, y, x] for i in crops for y in range(label_grid.shape[2])
                       for x in range(label_grid.shape[3]) if label_grid[i, 0, y, x] == c]
            if vectors:
                prototypes[j, c] = torch.stack(vectors).mean(0)

    def predict(f):
        cos = {key: F.cosine_similarity(f, proto, dim=0) for key, proto in prototypes.items()}
        per_class = torch.stack([sum(((cos[j, c] / temperature).exp() for j in volumes if (j, c) in cos),
                                     torch.tensor(0.0)) for c in range(num_classes)])
        q = []
        for j in volumes:
            e = torch.stack([cos[j, c].exp() if (j, c) in cos else torch.tensor(0.0) for c in range(num_classes)])
            q.append(e / e.sum())
        qbar = sum(q) / len(q)
        kl = [sum(qj[c] * torch.log(qj[c] / qbar[c]) for c in range(num_classes) if qj[c] > 0) for qj in q]
        return per_class / per_class.sum(), sum(torch.exp(-sharpness * k) for k in kl) / len(q)

    terms = []
    for b in range(features_weak.shape[0]):
        for y in range(features_weak.shape[2]):
            for x in range(features_weak.shape[3]):
                source = partner[b] if mix_grid[b, 0, y, x] >= 0.5 else b
                confidence, target = predict(features_weak[source, :, y, x])[0].max(0)
                p_cr, weight = predict(features_strong2[b, :, y, x])
                terms.append(float(confidence >= tau) * weight * -torch.log(p_cr[target]))
    return torch.stack(terms).mean()


def cross_volumes_case(seed: int = 0):
    """Four labeled 8x8 crops (feature grid 4x4, D = 3, 3 classes) and two unlabeled ones whose features follow
    class directions, each crop with its own offset: the crops' prototypes differ, the classes stay apart."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.eye(3)

    def crop(label_4x4, offset):
        f = directions[label_4x4].movedim(-1, 0) + offset.view(3, 1, 1) + 0.05 * torch.randn(3, 4, 4, generator=g)
        return f

    labels = torch.randint(0, 3, (4, 4, 4), generator=g)
    labels[0, 0, :3] = torch.tensor([0, 1, 2])  # every class in the first crop
    offsets = 0.4 * torch.randn(4, 3, generator=g)
    features_labeled = torch.stack([crop(labels[i], offsets[i]) for i in range(4)])
    label = labels.unsqueeze(1).repeat_interleave(2, 2).repeat_interleave(2, 3)  # (4, 1, 8, 8)
    unlabeled = torch.randint(0, 3, (2, 4, 4), generator=g)
    features_weak = torch.stack([crop(unlabeled[i], torch.zeros(3)) for i in range(2)])
    features_strong2 = (features_weak + 0.3 * torch.randn(features_weak.shape, generator=g)).requires_grad_()
    mix = torch.zeros(2, 1, 8, 8)
    mix[0, :, 2:7, 0:5] = 1  # pooled to 4x4: cells with >= 2 of 4 voxels in the box count as pasted
    return features_labeled, label, features_weak, features_strong2, mix, torch.tensor([1, 0])


def test_cross_term_by_a_dense_computation_with_prototypes_per_labeled_volume():
    """Crops 0-1 come from one labeled volume and 2-3 from another: prototypes pool the crops of a volume, and Ubar
    compares the two volumes (Eqs. 7-13, written with loops)."""
    features_labeled, label, features_weak, features_strong2, mix, partner = cross_volumes_case()
    groups = torch.tensor([5, 5, 2, 2])  # any ids
    loss = semsim.SemSimLoss(num_classes=3, uncertainty_sharpness=200.0, confidence_threshold=0.9)
    cross, _ = loss.cross_term(features_labeled, label, features_weak, features_strong2, mix, partner, groups)
    label_grid = label[:, :, 1::2, 1::2]  # nearest-exact: the label at each 2x2 cell's centre
    mix_grid = block_mean(mix, (4, 4))
    expected = dense_cross_term(features_labeled, label_grid, groups.tolist(), features_weak,
                                features_strong2.detach(), mix_grid, partner.tolist(), 3, sharpness=200.0, tau=0.9)
    unweighted = dense_cross_term(features_labeled, label_grid, groups.tolist(), features_weak,
                                  features_strong2.detach(), mix_grid, partner.tolist(), 3, sharpness=0.0, tau=0.9)
    assert cross.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < expected < 0.9 * unweighted  # a case where the volumes' agreement matters
    cross.backward()
    assert features_strong2.grad.abs().sum() > 0


def test_crops_of_one_labeled_volume_are_one_labeled_image():
    """Issue 16, defect 2: with the crops of one labeled volume as separate j, Ubar measured the disagreement of
    crop positions and all but switched L_cross off; as one j (the paper's one labeled image) Ubar = 1 and L_cross
    is the tau-masked CE."""
    features_labeled, label, features_weak, features_strong2, mix, partner = cross_volumes_case()
    loss = semsim.SemSimLoss(num_classes=3, confidence_threshold=0.9)
    one_volume, _ = loss.cross_term(features_labeled, label, features_weak, features_strong2, mix, partner,
                                    torch.zeros(4, dtype=torch.long))
    label_grid, mix_grid = label[:, :, 1::2, 1::2], block_mean(mix, (4, 4))
    masked_ce = dense_cross_term(features_labeled, label_grid, [0] * 4, features_weak, features_strong2.detach(),
                                 mix_grid, partner.tolist(), 3, sharpness=0.0, tau=0.9)
    assert one_volume.item() == pytest.approx(masked_ce.item(), rel=1e-5) and masked_ce > 0
    per_crop, _ = loss.cross_term(features_labeled, label, features_weak, features_strong2, mix, partner)
    assert per_crop < 0.1 * one_volume  # each crop its own j (the old behaviour): r = 1000 zeroes the weight
    similarity = torch.randn(2, 1, 3, 4, 4)
    assert torch.equal(semsim.uncertainty_weight(similarity, torch.ones(1, 3, dtype=torch.bool), 1000.0),
                       torch.ones(2, 4, 4))


def test_global_prototypes_are_the_default_for_random_crops():
    """N = 1: a crop's prototype does not depend on where in the crop its anatomy lies (region n of a labeled crop
    and of an unlabeled crop hold different anatomy when crops are random)."""
    assert semsim.SemSimLoss(3).prototype_grid == 1
    config = json.loads((SEMSIM_BUNDLE / "configs" / "train.json").read_text())
    assert config["prototype_grid"] == 1 and config["loss"]["prototype_grid"] == "@prototype_grid"
    torch.manual_seed(0)
    features = torch.randn(2, 4, 6, 6)
    label = torch.randint(0, 3, (2, 1, 6, 6))
    shifted_f, shifted_l = features.roll(3, dims=2), label.roll(3, dims=2)  # the same content, moved in the crop
    prototypes, present = semsim.local_prototypes(features, label, 3, grid=1)
    moved, _ = semsim.local_prototypes(shifted_f, shifted_l, 3, grid=1)
    assert prototypes.shape == (2, 3, 1, 4) and torch.allclose(prototypes, moved, atol=1e-6)
    for j in range(2):
        for c in range(3):
            voxels = features[j].reshape(4, -1)[:, label[j].reshape(-1) == c]
            assert torch.allclose(prototypes[j, c, 0], voxels.mean(1), atol=1e-6) and present[j, c]
    local, _ = semsim.local_prototypes(features, label, 3, grid=3)
    local_moved, _ = semsim.local_prototypes(shifted_f, shifted_l, 3, grid=3)
    assert not torch.allclose(local, local_moved, atol=1e-3)  # regions in crop coordinates move with the crop
    # crops pooled by volume: the mean over both crops' voxels of a class
    pooled, _ = semsim.local_prototypes(features, label, 3, grid=1, groups=torch.tensor([3, 3]))
    voxels = torch.cat([features[j].reshape(4, -1)[:, label[j].reshape(-1) == 1] for j in range(2)], 1)
    assert pooled.shape == (1, 3, 1, 4) and torch.allclose(pooled[0, 1, 0], voxels.mean(1), atol=1e-6)

# ------------------------------------------------------------------------------------------------ the whole loss


def semsim_outputs(num_classes: int = 3, present_classes: int | None = None, seed: int = 0,
                   features: bool = True, fp: bool = True) -> tuple[dict, torch.Tensor]:
    """Outputs of one iteration on 2D 8x8 images (feature grid 4x4), B_l = B_u = 2, in a setting where many
    voxels pass tau: logits and features follow one label map per volume, plus noise."""
    g = torch.Generator().manual_seed(seed)
    k = present_classes or num_classes
    label = torch.randint(0, k, (2, 1, 4, 4), generator=g).repeat_interleave(2, 2).repeat_interleave(2, 3)
    unlabeled = torch.randint(0, k, (2, 1, 4, 4), generator=g).repeat_interleave(2, 2).repeat_interleave(2, 3)

    def logits(lab, scale):
        onehot = F.one_hot(lab[:, 0], num_classes).movedim(-1, 1).float()
        return (scale * onehot + torch.randn(onehot.shape, generator=g)).requires_grad_()

    def feats(lab):
        onehot = F.one_hot(lab[:, 0, ::2, ::2], 8).movedim(-1, 1).float()  # D = 8, one direction per class
        return (onehot + 0.1 * torch.randn(onehot.shape, generator=g)).requires_grad_()

    mix1, mix2 = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    mix1[0, :, :4, :4] = 1
    mix2[1, :, 4:, 2:6] = 1
    outputs = {"labeled": logits(label, 3.0), "weak": logits(unlabeled, 6.0), "strong1": logits(unlabeled, 2.0),
               "mix1": mix1, "mix2": mix2, "partner": torch.tensor([1, 0])}
    if fp:
        outputs["fp"] = logits(unlabeled, 2.0)
    if features:
        outputs.update(features_labeled=feats(label), features_weak=feats(unlabeled),
                       features_strong1=feats(unlabeled), features_strong2=feats(unlabeled))
    return outputs, label


def test_supervised_only_is_half_dice_ce_and_reads_only_labeled():
    outputs, label = semsim_outputs()
    loss = semsim.SemSimLoss(3, unlabeled_weight=0, intra_weight=0, cross_weight=0)
    total = loss({"labeled": outputs["labeled"]}, label)
    reference = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.5, lambda_dice=0.5)(outputs["labeled"], label)
    assert total.item() == 0.5 * reference.item()
    assert set(loss.terms) == {"supervised", "total"}


def test_without_similarity_terms_it_is_fixmatch():
    outputs, label = semsim_outputs(features=False)
    loss = semsim.SemSimLoss(3, intra_weight=0, cross_weight=0)
    total = loss(outputs, label)  # no feature keys needed
    p_weak = torch.softmax(outputs["weak"].detach(), 1)
    confidence, pseudo = p_weak.max(1, keepdim=True)
    mix, partner = outputs["mix1"].bool(), outputs["partner"]
    mixed_pseudo = torch.where(mix, pseudo[partner], pseudo)
    mixed_mask = torch.where(mix, confidence[partner], confidence) >= 0.95
    strong = plain_masked_dice(torch.softmax(outputs["strong1"], 1), mixed_pseudo, mixed_mask.float())
    perturbed = plain_masked_dice(torch.softmax(outputs["fp"], 1), pseudo, (confidence >= 0.95).float())
    l_s = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.5, lambda_dice=0.5)(outputs["labeled"], label)
    l_u = (strong + perturbed) / 2
    assert 0 < (confidence >= 0.95).float().mean() < 1
    assert total.item() == pytest.approx(0.5 * (l_s + 0.5 * l_u).item(), abs=1e-6)
    passing = {f"unlabeled_pass_{c}" for c in range(3)}
    assert set(loss.terms) == {"supervised", "unlabeled", "confident_fraction", "total"} | passing
    assert loss.terms["confident_fraction"].item() == pytest.approx((confidence >= 0.95).float().mean().item())
    for c in range(3):  # the share of the voxels pseudo-labelled c that pass tau
        voxels = pseudo == c
        expected = ((confidence >= 0.95) & voxels).sum() / voxels.sum() if voxels.any() else torch.tensor(0.0)
        assert loss.terms[f"unlabeled_pass_{c}"].item() == pytest.approx(expected.item())
    # without the feature-perturbed pass L_u is the strong-view Dice alone
    del outputs["fp"]
    assert loss(outputs, label).item() == pytest.approx(0.5 * (l_s + 0.5 * strong).item(), abs=1e-6)


def test_full_loss_weights_the_terms_and_sends_gradients_where_the_paper_says():
    outputs, label = semsim_outputs()
    loss = semsim.SemSimLoss(3)
    total = loss(outputs, label)
    terms = loss.terms
    passing = {f"{term}_pass_{c}" for term in ("unlabeled", "intra", "cross") for c in range(3)}
    assert set(terms) == {"supervised", "unlabeled", "intra", "cross", "confident_fraction", "total"} | passing
    assert all(0 <= terms[name] <= 1 for name in passing) and any(terms[f"intra_pass_{c}"] > 0 for c in (1, 2))
    assert all(terms[name] > 0 for name in ("supervised", "unlabeled", "intra", "cross"))
    expected = 0.5 * (terms["supervised"] + 0.5 * terms["unlabeled"] + 0.25 * terms["intra"] + 0.25 * terms["cross"])
    assert total.item() == pytest.approx(expected.item(), abs=1e-6)
    total.backward()
    for name in ("labeled", "strong1", "fp", "features_strong1", "features_strong2", "features_labeled"):
        assert outputs[name].grad is not None and outputs[name].grad.abs().sum() > 0, name
    # the weak view only makes targets: no gradient reaches its logits or its features
    assert outputs["weak"].grad is None and outputs["features_weak"].grad is None


def test_no_nan_with_a_class_absent_from_the_labeled_batch():
    outputs, label = semsim_outputs(num_classes=4, present_classes=2)
    assert label.max() <= 1
    total = semsim.SemSimLoss(4)(outputs, label)
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(v.grad).all() for v in outputs.values() if v.requires_grad and v.grad is not None)


def test_no_nan_when_every_voxel_is_below_tau():
    outputs, label = semsim_outputs()
    outputs["weak"] = torch.zeros_like(outputs["weak"])  # uniform pseudo-labels
    outputs["features_weak"] = torch.zeros_like(outputs["features_weak"])  # no similarity: uniform p1_w and p2_w
    loss = semsim.SemSimLoss(3)
    total = loss(outputs, label)
    total.backward()
    assert loss.terms["unlabeled"] == 0 and loss.terms["intra"] == 0 and loss.terms["cross"] == 0
    assert loss.terms["confident_fraction"] == 0
    assert total.item() == pytest.approx(0.5 * loss.terms["supervised"].item())
    assert all(torch.isfinite(v.grad).all() for v in outputs.values() if v.requires_grad and v.grad is not None)


def test_missing_outputs_and_bad_settings_are_refused():
    outputs, label = semsim_outputs(features=False)
    with pytest.raises(KeyError, match="intra_weight > 0 needs network outputs"):
        semsim.SemSimLoss(3, cross_weight=0)(outputs, label)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        semsim.SemSimLoss(3, intra_weight=-1)
    with pytest.raises(ValueError, match="tau"):
        semsim.SemSimLoss(3, confidence_threshold=0)


def test_similarity_products_run_in_float32_under_autocast():
    """Issue 16, defect 4: under the trainer's AMP the affinity bmm and the prototype einsum ran in half precision
    although their inputs were cast to float32. They now run with autocast off (bfloat16 autocast on CPU here)."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 8, 8, 8, generator=g), 1)
    f = torch.randn(2, 16, 4, 4, 4, generator=g)
    label = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=g)
    prototypes = torch.randn(3, 3, 8, 16, generator=g)

    def compute():
        return (semsim.propagate_by_affinity(block_mean(p, (4, 4, 4)), f, 0.1), semsim.refine_by_affinity(p, f, 0.1),
                semsim.prototype_similarity(f, prototypes, 2), semsim.prototype_similarity(f, prototypes[:, :, :1], 1),
                semsim.local_prototypes(f, label, 3, 2)[0])

    plain = compute()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = compute()
        assert torch.mm(f[0, :, 0, 0].reshape(1, -1), f[0, :, 0, 0].reshape(-1, 1)).dtype == torch.bfloat16  # AMP is on
    for name, a, b in zip(("propagate", "refine", "similarity", "similarity N=1", "prototypes"), autocast, plain):
        assert a.dtype == torch.float32, name
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6), (name, (a - b).abs().max())
    # the whole loss, with its inputs in bfloat16 as AMP hands them over
    outputs, label = semsim_outputs()
    half = {key: v.detach().bfloat16() if v.is_floating_point() else v for key, v in outputs.items()}
    expected = semsim.SemSimLoss(3)(half, label)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = semsim.SemSimLoss(3)
        value = loss(half, label)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(term.dtype == torch.float32 for term in loss.terms.values())


# --------------------------------------------------------------------------------------- Spatial-aware Fusion Module


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_sfm_output_is_the_middle_scale(spatial_dims):
    torch.manual_seed(0)
    module = sfm.SpatialFusionModule(spatial_dims, (4, 8, 16), feature_size=16, window_size=2, num_heads=2)
    coarse = (4, 6, 2)[:spatial_dims]
    maps = [torch.randn(2, c, *(s * f for s in coarse)) for c, f in ((4, 4), (8, 2), (16, 1))]
    out = module(maps)
    assert out.shape == (2, 16, *(2 * s for s in coarse))
    assert (out >= 0).all()  # ends in ReLU
    out.sum().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_sfm_windows_are_shared_across_scales():
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float).view(2, 3, 8, 12)
    tokens = sfm.window_partition(x, (2, 3))  # 6 windows of 4x4 per image
    assert tokens.shape == (12, 16, 3)
    assert torch.equal(tokens[1], x[0, :, :4, 4:8].reshape(3, -1).T)  # image 0, window (0, 1)
    assert torch.equal(sfm.window_merge(tokens, (2, 3), (8, 12)), x)
    x3 = torch.randn(1, 2, 4, 6, 8)
    assert torch.equal(sfm.window_merge(sfm.window_partition(x3, (2, 3, 4)), (2, 3, 4), (4, 6, 8)), x3)
    # every window group attends within itself only: changing one window of the input changes that window's
    # tokens alone (before the 3x3 fusion convolution mixes neighbours)
    module = sfm.SpatialFusionModule(2, (2, 2, 2), feature_size=8, window_size=2, num_heads=2).eval()
    maps = [torch.randn(1, 2, 16, 16), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)]
    moved = [m.clone() for m in maps]
    moved[2][..., :2, :2] += 1.0  # coarse window (0, 0) only
    grid = (2, 2)
    before, after = ([sfm.window_partition(p(m), grid) for p, m in zip(module.projections, ms)] for ms in (maps, moved))
    out_before = module.block(torch.cat(before, 1))
    out_after = module.block(torch.cat(after, 1))
    changed = (out_before - out_after).abs().amax((1, 2)) > 1e-6
    assert changed.tolist() == [True, False, False, False]


def test_sfm_refuses_wrong_sizes_with_a_roi_hint():
    module = sfm.SpatialFusionModule(2, (4, 8, 16), feature_size=16, window_size=2, num_heads=2)
    with pytest.raises(ValueError, match=r"ratio 4:2:1.*roi_size divisible by 16"):
        module([torch.randn(1, 4, 32, 32), torch.randn(1, 8, 16, 16), torch.randn(1, 16, 4, 4)])
    with pytest.raises(ValueError, match=r"not divisible by the SFM window_size 2.*roi_size divisible by 16"):
        module([torch.randn(1, 4, 12, 12), torch.randn(1, 8, 6, 6), torch.randn(1, 16, 3, 3)])
    with pytest.raises(ValueError, match="three consecutive encoder maps"):
        sfm.SpatialFusionModule(2, (4, 8))


def test_sfm_parameter_count_is_near_the_papers():
    module = sfm.SpatialFusionModule(2, (32, 64, 128), feature_size=128)
    count = sum(p.numel() for p in module.parameters())
    print(f"SFM parameters (D = 128, 2D, in_channels 32/64/128): {count / 1e6:.3f} M (paper: 0.79 M)")
    assert 0.4e6 < count < 1.2e6


def test_ramp_scales_every_unlabeled_term_and_follows_the_sigmoid_schedule():
    outputs, label = semsim_outputs()
    loss = semsim.SemSimLoss(3)
    full = loss(outputs, label).item()
    terms = dict(loss.terms)
    loss.ramp = 0.25
    ramped = loss(outputs, label).item()
    unlabeled = 0.5 * terms["unlabeled"] + 0.25 * terms["intra"] + 0.25 * terms["cross"]
    assert ramped == pytest.approx(0.5 * (terms["supervised"] + 0.25 * unlabeled).item(), abs=1e-6)
    assert full == pytest.approx(0.5 * (terms["supervised"] + unlabeled).item(), abs=1e-6)
    ramp = semsim_training.UnlabeledRamp(loss, iterations=100)
    assert ramp.weight(1) == pytest.approx(math.exp(-5))  # the first iteration: t = 0
    assert ramp.weight(51) == pytest.approx(math.exp(-5 * 0.25))
    assert ramp.weight(101) == ramp.weight(5000) == 1.0
    assert semsim_training.UnlabeledRamp(loss, iterations=0).weight(1) == 1.0  # off: the paper's constant weights
    with pytest.raises(ValueError, match="unlabeled_rampup"):
        semsim_training.UnlabeledRamp(loss, iterations=-1)


def test_term_gradient_norms_are_each_terms_own_gradient_on_the_backbone():
    torch.manual_seed(0)
    backbone = torch.nn.Conv2d(1, 3, 1)
    image = torch.randn(4, 1, 8, 8)
    outputs, label = semsim_outputs(features=False, fp=False)
    logits = backbone(image)
    outputs["labeled"], outputs["strong1"] = logits[:2], logits[2:]
    loss = semsim.SemSimLoss(3, intra_weight=0, cross_weight=0, gradient_interval=2, gradient_module=backbone)
    loss(outputs, label)
    assert not any(name.startswith("grad_") for name in loss.terms)  # only every 2nd call
    total = loss(outputs, label)
    # each norm equals the norm of the gradient of that weighted term alone
    supervised = 0.5 * DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.5, lambda_dice=0.5)(
        outputs["labeled"], label)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(supervised, list(backbone.parameters()),
                                                                  retain_graph=True)]).norm()
    assert loss.terms["grad_supervised"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.terms["grad_unlabeled"] > 0
    total.backward()  # the graph is kept for the trainer's own backward
    with pytest.raises(ValueError, match="gradient_module"):
        semsim.SemSimLoss(3, gradient_interval=5)
