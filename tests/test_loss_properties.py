"""Every bundle's loss stays finite, with finite gradients, on valid but awkward input (property-based, hypothesis).

Drawn over batch sizes, class counts, 2D and 3D shapes, label layouts (all background, one foreground voxel, a
class absent from the batch, every class, no background at all), image content (random, constant, all zero, huge
intensities) and logit scales (all equal, ordinary, saturating softmax): SegResNet-VAE's loss on drawn network
outputs (latent sigma down to 0), SelfReg's and ReSeg's on the real tapped MONAI backbones (all three as the
template's RegularisedLoss composes them), SemSim's on drawn outputs of its network (features may be all zero, masks
may be empty or full). Each loss is a sum of non-negative terms, so it must also be >= 0.

The examples are derandomized (the same on every run) and hypothesis keeps no database, so CI is reproducible.
SwinUNETR is left out of the tapped backbones: it needs crops of 32^3 and more, too slow for dozens of examples.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import BUNDLES, bundle_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.losses import DiceCELoss, DiceLoss
from monai.networks import nets

vae = bundle_module(BUNDLES / "segresnet_vae_segmentation", "vae")
selfreg = bundle_module(BUNDLES / "selfreg_segmentation", "selfreg")
reseg = bundle_module(BUNDLES / "reseg_segmentation", "reseg")
reseg_losses = bundle_module(BUNDLES / "reseg_segmentation", "losses")
semsim = bundle_module(BUNDLES / "semsim_segmentation", "semsim")
losses = bundle_module(BUNDLES / "selfreg_segmentation", "losses")

LAYOUTS = ("all_background", "one_voxel", "absent_class", "every_class", "no_background")
IMAGES = ("random", "constant", "zero", "huge")
PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
# The losses on tapped backbones run a forward and backward pass per example: fewer examples keep them cheap.
NETWORK_PROPERTY = settings(PROPERTY, max_examples=10)


def make_label(layout: str, shape: tuple[int, ...], num_classes: int, rng: np.random.Generator) -> torch.Tensor:
    """A label batch (B, 1, *S) of class indices in one of ``LAYOUTS``."""
    label = np.zeros(shape, dtype=np.int64)
    if layout == "one_voxel":
        label[tuple(rng.integers(0, s) for s in shape)] = rng.integers(1, num_classes)
    elif layout == "absent_class":  # the last class appears nowhere in the batch
        label = rng.integers(0, num_classes - 1, shape)
    elif layout == "every_class":
        label = rng.integers(0, num_classes, shape)
    elif layout == "no_background":
        label = rng.integers(1, num_classes, shape)
    return torch.from_numpy(label)


def make_image(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
    values = {"random": lambda: rng.standard_normal(shape), "constant": lambda: np.full(shape, 3.5),
              "zero": lambda: np.zeros(shape), "huge": lambda: 1e4 * rng.standard_normal(shape)}[kind]()
    return torch.from_numpy(values).float()


def assert_finite_and_non_negative(loss: torch.Tensor, *inputs: torch.Tensor) -> None:
    assert torch.isfinite(loss), loss
    assert loss.item() >= -1e-6, loss
    loss.backward()
    for tensor in inputs:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


def assert_finite_gradients(network: torch.nn.Module) -> None:
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


segmentation_case = dict(
    batch=st.integers(1, 2),
    num_classes=st.integers(2, 4),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)


@PROPERTY
@given(**segmentation_case, spatial=st.lists(st.integers(1, 6), min_size=2, max_size=3),
       logit_scale=st.sampled_from([0.0, 1.0, 1e3]), image=st.sampled_from(IMAGES),
       sigma_shift=st.sampled_from([0.0, -50.0]))
def test_segresnet_vae_loss(batch, num_classes, layout, seed, spatial, logit_scale, image, sigma_shift):
    """sigma_shift -50: the latent sigma is softplus(-50) ~ 0, the KL's log at its edge."""
    rng = np.random.default_rng(seed)
    shape = (batch, 1, *spatial)
    logits = (logit_scale * torch.randn(batch, num_classes, *spatial)).requires_grad_()
    reconstruction = torch.randn(shape).requires_grad_()
    mu = torch.randn(batch, 8).requires_grad_()
    pre_sigma = (torch.randn(batch, 8) + sigma_shift).requires_grad_()
    outputs = vae.VAEOutputs(image=make_image(image, shape, rng), reconstruction=reconstruction, mu=mu,
                             sigma=torch.nn.functional.softplus(pre_sigma))
    loss_function = losses.RegularisedLoss(DiceLoss(to_onehot_y=True, softmax=True, squared_pred=True),
                                           {"vae": vae.VAERegulariser()}, {"vae": {"l2": 0.1, "kl": 0.1}})
    loss = loss_function((logits, outputs), make_label(layout, shape, num_classes, rng))
    assert set(loss_function.terms) == {"seg", "vae_l2", "vae_kl", "total"}
    assert_finite_and_non_negative(loss, logits, reconstruction, mu, pre_sigma)


def tapped_backbone(name: str, num_classes: int, in_channels: int = 1) -> torch.nn.Module:
    """A tiny MONAI backbone: inputs divisible by 8, and for the UNet (instance norm needs more than one voxel at its
    bottleneck in training) at least 16."""
    if name == "segresnet":
        return nets.SegResNet(spatial_dims=3, init_filters=8, in_channels=in_channels, out_channels=num_classes)
    return nets.UNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, channels=(4, 8, 8, 16),
                     strides=(2, 2, 2), num_res_units=1, norm="instance")


@NETWORK_PROPERTY
@given(**segmentation_case, backbone=st.sampled_from(["segresnet", "unet"]), size=st.sampled_from([8, 16]),
       image=st.sampled_from(IMAGES), channel_selection=st.sampled_from(["random", "first"]))
def test_selfreg_loss(batch, num_classes, layout, seed, backbone, size, image, channel_selection):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    network = tapped_backbone(backbone, num_classes).train()
    regulariser = selfreg.SelfRegRegulariser(selfreg.SelfRegTaps(network), channel_selection=channel_selection,
                                             seed=seed)
    loss_function = losses.RegularisedLoss(DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.4, lambda_dice=0.6),
                                           {"selfreg": regulariser}, {"selfreg": 1.0})
    size = max(size, 16) if backbone == "unet" else size
    shape = (batch, 1, size, size, size)
    logits = network(make_image(image, shape, rng))
    loss = loss_function(logits, make_label(layout, shape, num_classes, rng))
    assert set(loss_function.terms) == {"seg", "selfreg_scr", "selfreg_ifd", "total"}
    assert_finite_and_non_negative(loss)
    assert_finite_gradients(network)


@NETWORK_PROPERTY
@given(**segmentation_case, image=st.sampled_from(IMAGES), feature_norm=st.sampled_from(["instance", "none"]),
       label_encoding=st.sampled_from(["onehot", "index"]))
def test_reseg_loss(batch, num_classes, layout, seed, image, feature_norm, label_encoding):
    """SegResNet student and teacher on 8^3: the deepest paired level is a single voxel (standardised to 0)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    student = tapped_backbone("segresnet", num_classes).train()
    teacher = tapped_backbone("segresnet", 1, in_channels=num_classes if label_encoding == "onehot" else 1)
    pairs = reseg.default_pairs(student)
    regulariser = reseg.ReSegRegulariser(reseg.pair_taps(student, pairs, "student"), teacher,
                                         reseg.pair_taps(teacher, pairs, "teacher"), pairs, feature_norm=feature_norm,
                                         num_classes=num_classes, label_encoding=label_encoding)
    seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.5, lambda_dice=0.5)
    loss_function = reseg_losses.RegularisedLoss(seg_loss, {"reseg": regulariser}, {"reseg": 1.0})
    shape = (batch, 1, 8, 8, 8)
    logits = student(make_image(image, shape, rng))
    loss = loss_function(logits, make_label(layout, shape, num_classes, rng))
    assert set(loss_function.terms) == {"seg", "reseg_opt", "total"}
    assert loss_function.terms["reseg_opt"] >= 0
    assert_finite_and_non_negative(loss)
    assert_finite_gradients(student)


@st.composite
def semsim_outputs(draw) -> tuple[dict, torch.Tensor, int]:
    """SemSimNetwork's outputs for B_l labelled and B_u unlabelled volumes: logits on the image grid, features on a
    grid of half its size, CutMix masks and partners. Returns (outputs, label, num_classes)."""
    num_classes = draw(st.integers(2, 4))
    b_l, b_u = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    grid = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=3)))
    size = tuple(2 * g for g in grid)
    depth = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    label = make_label(draw(st.sampled_from(LAYOUTS)), (b_l, 1, *size), num_classes, rng)
    scale = draw(st.sampled_from([0.0, 1.0, 30.0]))  # 30: confident weak views, so the tau masks are not empty

    def logits(b: int) -> torch.Tensor:
        return torch.from_numpy(scale * rng.standard_normal((b, num_classes, *size))).float().requires_grad_()

    feature_kind = draw(st.sampled_from(["random", "zero", "constant"]))

    def features(b: int) -> torch.Tensor:
        values = {"random": rng.standard_normal, "zero": np.zeros, "constant": np.ones}[feature_kind]((b, depth, *grid))
        return torch.from_numpy(values).float().requires_grad_()

    def mix() -> torch.Tensor:
        kind = draw(st.sampled_from(["none", "all", "random"]))
        values = {"none": np.zeros, "all": np.ones}.get(kind, lambda s: rng.integers(0, 2, s))((b_u, 1, *size))
        return torch.from_numpy(np.asarray(values)).float()

    outputs = {"labeled": logits(b_l), "weak": logits(b_u), "strong1": logits(b_u), "fp": logits(b_u),
               "mix1": mix(), "mix2": mix(), "partner": torch.from_numpy(rng.permutation(b_u)),
               "features_labeled": features(b_l), "features_weak": features(b_u),
               "features_strong1": features(b_u), "features_strong2": features(b_u)}
    return outputs, label, num_classes


@PROPERTY
@given(case=semsim_outputs(), prototype_grid=st.integers(1, 4), max_tokens=st.sampled_from([4096, 4]))
def test_semsim_loss(case, prototype_grid, max_tokens):
    """max_tokens 4: the affinity grid is pooled below the feature grid."""
    outputs, label, num_classes = case
    loss_function = semsim.SemSimLoss(num_classes, prototype_grid=prototype_grid, affinity_max_tokens=max_tokens)
    loss = loss_function(outputs, label)
    assert set(loss_function.terms) >= {"supervised", "unlabeled", "intra", "cross", "total"}
    trained = [outputs[k] for k in ("labeled", "strong1", "fp", "features_strong1", "features_strong2",
                                    "features_labeled")]
    assert_finite_and_non_negative(loss, *trained)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_are_what_they_say(layout):
    """The label generator itself: the property tests rely on each layout holding what its name says."""
    label = make_label(layout, (2, 1, 5, 6, 7), 4, np.random.default_rng(0))
    values = set(label.unique().tolist())
    expected = {"all_background": lambda: values == {0},
                "one_voxel": lambda: values <= {0, 1, 2, 3} and int((label > 0).sum()) == 1,
                "absent_class": lambda: 3 not in values and len(values) == 3,
                "every_class": lambda: values == {0, 1, 2, 3},
                "no_background": lambda: 0 not in values}[layout]
    assert expected(), values
