"""Losses compose as MONAI's DiceCELoss does: the template's RegularisedLoss adds named, weighted regularisers to a
segmentation loss that is passed in, and two methods' regularisers stack on one backbone by config alone
(``scripts/generate_bundles.py --stack``): SelfReg and the VAE terms on SegResNet-VAE, trained through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, SELFREG_BUNDLE, VAE_BUNDLE, bundle_module, load_module, run_bundle
from monai.losses import DiceCELoss
from monai.networks import nets

losses = bundle_module(SELFREG_BUNDLE, "losses")
selfreg = bundle_module(SELFREG_BUNDLE, "selfreg")
vae = bundle_module(VAE_BUNDLE, "vae")
generate = load_module(REPO / "scripts" / "generate_bundles.py", "generate_bundles_tool")


class Constant(torch.nn.Module):
    """A regulariser returning fixed terms (times the mean logit, so that gradients flow), counting its calls."""

    def __init__(self, **terms: float) -> None:
        super().__init__()
        self.values = terms
        self.calls = 0

    def forward(self, logits, label, extras):
        self.calls += 1
        scale = logits.mean()
        return {name: value * scale for name, value in self.values.items()}


def seg_case():
    torch.manual_seed(0)
    return torch.randn(2, 3, 4, 4, 4, requires_grad=True), torch.randint(0, 3, (2, 1, 4, 4, 4))


def test_total_is_the_segmentation_loss_plus_the_weighted_terms():
    logits, label = seg_case()
    a, b = Constant(x=1.0, y=2.0), Constant(c=3.0)
    loss = losses.RegularisedLoss(DiceCELoss(to_onehot_y=True, softmax=True), {"a": a, "b": b}, {"a": 0.5, "b": 2.0})
    total = loss(logits, label)

    seg = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    m = logits.mean()
    torch.testing.assert_close(total, seg + 0.5 * (1.0 * m + 2.0 * m) + 2.0 * (3.0 * m))
    assert set(loss.terms) == {"seg", "a_x", "a_y", "b_c", "total"}
    torch.testing.assert_close(loss.terms["a_y"], (2.0 * m).detach())
    torch.testing.assert_close(loss.terms["total"], total.detach())
    assert not any(t.requires_grad for t in loss.terms.values())
    total.backward()
    assert torch.isfinite(logits.grad).all()


def test_per_term_weights_and_a_term_named_as_its_regulariser():
    logits, label = seg_case()
    seg_loss = DiceCELoss(to_onehot_y=True, softmax=True)
    loss = losses.RegularisedLoss(seg_loss, {"vae": Constant(l2=1.0, kl=4.0), "reseg": Constant(reseg=1.0)},
                                  {"vae": {"l2": 0.1, "kl": 0.0}, "reseg": 1.0})
    total = loss((logits, {"anything": None}), label)  # (logits, extras): a network with a training-only branch
    m = logits.mean()
    torch.testing.assert_close(total, seg_loss(logits, label) + 0.1 * m + m)
    assert set(loss.terms) == {"seg", "vae_l2", "vae_kl", "reseg", "total"}  # a 0-weighted term is still logged


def test_weight_zero_skips_the_regulariser_and_none_is_disabled():
    logits, label = seg_case()
    skipped, per_term = Constant(x=1.0), Constant(l2=1.0, kl=1.0)
    loss = losses.RegularisedLoss(DiceCELoss(to_onehot_y=True, softmax=True),
                                  {"off": skipped, "also_off": per_term, "disabled": None},
                                  {"off": 0.0, "also_off": {"l2": 0.0, "kl": 0}, "disabled": 1.0})
    total = loss(logits, label)
    assert skipped.calls == 0 and per_term.calls == 0 and len(loss.regularisers) == 0
    assert torch.equal(total, DiceCELoss(to_onehot_y=True, softmax=True)(logits, label))
    assert set(loss.terms) == {"seg", "total"}


@pytest.mark.parametrize("weights, error, match", [
    ({"r": -0.1}, ValueError, r"weight of regulariser 'r' must be >= 0, got -0.1"),
    ({"r": {"x": 1.0, "y": -1.0}}, ValueError, r"regulariser 'r' term 'y' must be >= 0"),
    ({"r": "0.1"}, TypeError, "must be a number"),
    ({}, ValueError, r"regularisers \['r'\] have no weight: add regulariser_weights#<name>"),
])
def test_bad_weights_are_refused(weights, error, match):
    with pytest.raises(error, match=match):
        losses.RegularisedLoss(DiceCELoss(), {"r": Constant(x=1.0, y=1.0)}, weights)


def test_per_term_weights_must_name_every_term():
    logits, label = seg_case()
    loss = losses.RegularisedLoss(DiceCELoss(to_onehot_y=True, softmax=True), {"vae": Constant(l2=1.0, kl=1.0)},
                                  {"vae": {"l2": 0.1}})
    with pytest.raises(ValueError, match=r"returned the terms \['kl', 'l2'\] but regulariser_weights#vae weights"):
        loss(logits, label)


def test_selfreg_taps_on_segresnet_vae_read_the_segmentation_decoder():
    """SegResNetVAE is a SegResNet to SelfReg's default layout; its VAE decoder re-runs MONAI's shared up_layers, and
    the taps must keep the segmentation pass: conv_final of the tapped teacher is the logits."""
    torch.manual_seed(0)
    net = vae.SegResNetVAE(input_image_size=(32, 32, 32), vae_nz=8, spatial_dims=3, init_filters=8, in_channels=1,
                           out_channels=3).train()
    taps = selfreg.SelfRegTaps(net)
    assert taps.layout == selfreg.default_layout(nets.SegResNet(spatial_dims=3, init_filters=8, out_channels=3))
    logits, outputs = net(torch.randn(1, 1, 32, 32, 32))
    features = taps.pop()
    torch.testing.assert_close(net.conv_final(features[taps.layout.teacher]), logits)
    regularisers = {"vae": vae.VAERegulariser(), "selfreg": selfreg.SelfRegRegulariser(taps, "first")}
    loss = losses.RegularisedLoss(DiceCELoss(to_onehot_y=True, softmax=True), regularisers,
                                  {"vae": {"l2": 0.1, "kl": 0.1}, "selfreg": 0.015})
    loss(net(torch.randn(1, 1, 32, 32, 32)), torch.randint(0, 3, (1, 1, 32, 32, 32))).backward()
    assert set(loss.terms) == {"seg", "vae_l2", "vae_kl", "selfreg_scr", "selfreg_ifd", "total"}
    assert all(p.grad is not None for p in net.parameters())


def test_a_method_with_its_own_training_step_does_not_stack(tmp_path):
    with pytest.raises(SystemExit, match=r"semsim cannot be stacked: its configs/train.json replaces"):
        generate.generate_stack(["segresnet_vae", "semsim"], tmp_path)
    with pytest.raises(SystemExit, match="no method"):
        generate.generate_stack(["segresnet_vae", "nope"], tmp_path)


def test_vae_and_selfreg_stack_by_config_alone(synthetic_dataset, tmp_path):
    """The template plus the VAE's and SelfReg's folders, in that order, generated and trained for one epoch."""
    bundle = tmp_path / "vae_selfreg"
    assert generate.main(["--stack", "segresnet_vae", "selfreg", "--out", str(bundle)]) == 0
    config = json.loads((bundle / "configs/train.json").read_text())
    assert set(config["regularisers"]) == {"vae", "selfreg"} and config["seg_loss"]["_target_"] == "DiceLoss"
    assert {"vae.py", "selfreg.py", "losses.py"} <= {p.name for p in (bundle / "scripts").iterdir()}

    root = tmp_path / "run"
    proc = run_bundle(bundle, ["configs/train.json"], "--bundle_root", str(root), "--dataset_dir",
                      str(synthetic_dataset), "--max_epochs", "1", "--roi_size", "[32,32,32]", "--spacing",
                      "[1.5,1.5,1.5]", "--num_workers", "0", "--progress_bar", "False", "--iterations_per_epoch",
                      "0", "--backbones#segresnet#init_filters", "8", "--vae_nz", "32", run_id="training")
    log = proc.stdout + proc.stderr
    for term in ("train_seg", "train_vae_l2", "train_vae_kl", "train_selfreg_scr", "train_selfreg_ifd",
                 "train_total", "val_mean_dice"):
        assert f"{term}: " in log, term
    state = torch.load(root / "models/model.pt", weights_only=True)
    nets.SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3).load_state_dict(state, strict=True)
