"""The SelfReg method code: the loss reproduces the authors' KDloss term by term, gradients flow where the paper
says, lambda = 0 is the plain backbone's loss, and the forward-hook taps read the right features of SegResNet,
UNet and SwinUNETR in 3D and 2D without changing the network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import SELFREG_BUNDLE, bundle_module
from monai.losses import DiceCELoss
from monai.networks import nets

selfreg = bundle_module(SELFREG_BUNDLE, "selfreg")
losses = bundle_module(SELFREG_BUNDLE, "losses")
backbones = bundle_module(SELFREG_BUNDLE, "backbones")


class SeedKDloss(torch.nn.Module):
    """The authors' ``KDloss`` (seed 001, SelfReg-UNet trainer.py), verbatim but for ``inter_fd`` using the
    deterministic first-k channel pairing that the seed carries commented out."""

    def __init__(self, lambda_x):
        super().__init__()
        self.lambda_x = lambda_x

    def inter_fd(self, f_s, f_t):
        s_C, t_C, s_H, t_H = f_s.shape[1], f_t.shape[1], f_s.shape[2], f_t.shape[2]
        if s_H > t_H:
            f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
        elif s_H < t_H:
            f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
        return F.mse_loss(f_s[:, 0:min(s_C, t_C), :, :], f_t[:, 0:min(s_C, t_C), :, :].detach())

    def intra_fd(self, f_s):
        sorted_s, indices_s = torch.sort(F.normalize(f_s, p=2, dim=(2, 3)).mean([0, 2, 3]), dim=0, descending=True)
        f_s = torch.index_select(f_s, 1, indices_s)
        return F.mse_loss(f_s[:, 0:f_s.shape[1] // 2, :, :], f_s[:, f_s.shape[1] // 2: f_s.shape[1], :, :])

    def forward(self, feature, feature_decoder, final_up, epoch):
        f1, f2, f3, f4 = (feature[k][-1] for k in range(4))
        f1_0, f2_0, f3_0, f4_0 = (feature[k][0] for k in range(4))
        f1_d, f2_d, f3_d = (feature_decoder[k][-1] for k in range(3))
        f1_d_0, f2_d_0, f3_d_0 = (feature_decoder[k][0] for k in range(3))
        final_layer = final_up
        loss = (self.intra_fd(f1) + self.intra_fd(f2) + self.intra_fd(f3) + self.intra_fd(f4)) / 4
        loss += (self.intra_fd(f1_0) + self.intra_fd(f2_0) + self.intra_fd(f3_0) + self.intra_fd(f4_0)) / 4
        loss += (self.intra_fd(f1_d_0) + self.intra_fd(f2_d_0) + self.intra_fd(f3_d_0)) / 3
        loss += (self.intra_fd(f1_d) + self.intra_fd(f2_d) + self.intra_fd(f3_d)) / 3
        loss += (self.inter_fd(f1_d, final_layer) + self.inter_fd(f2_d, final_layer) + self.inter_fd(f3_d, final_layer)
                 + self.inter_fd(f1, final_layer) + self.inter_fd(f2, final_layer) + self.inter_fd(f3, final_layer)
                 + self.inter_fd(f4, final_layer)) / 7
        loss += (self.inter_fd(f1_d_0, final_layer) + self.inter_fd(f2_d_0, final_layer)
                 + self.inter_fd(f3_d_0, final_layer) + self.inter_fd(f1_0, final_layer)
                 + self.inter_fd(f2_0, final_layer) + self.inter_fd(f3_0, final_layer)
                 + self.inter_fd(f4_0, final_layer)) / 7
        return loss * self.lambda_x


def swin_unet_features(seed: int = 0):
    """Fixed 2D maps with Swin-Unet's structure at 1/4 scale: 4 encoder stages (24@16^2 .. 192@2^2), 3 decoder
    stages (96@4^2 .. 24@16^2), two blocks each, and final_up 24@64^2."""
    g = torch.Generator().manual_seed(seed)
    enc = [[torch.randn(2, 24 * 2**k, 16 // 2**k, 16 // 2**k, generator=g) for _ in range(2)] for k in range(4)]
    dec = [[torch.randn(2, 96 // 2**k, 4 * 2**k, 4 * 2**k, generator=g) for _ in range(2)] for k in range(3)]
    final = torch.randn(2, 24, 64, 64, generator=g)
    return enc, dec, final


def test_terms_reproduce_the_seed_kdloss_on_fixed_2d_tensors():
    enc, dec, final = swin_unet_features()
    seed = SeedKDloss(lambda_x=0.015)
    for f in [m for stage in enc + dec for m in stage]:
        torch.testing.assert_close(selfreg.internal_feature_distillation(f), seed.intra_fd(f), rtol=0, atol=0)
        torch.testing.assert_close(selfreg.semantic_consistency(f, final), seed.inter_fd(f, final), rtol=1e-6, atol=0)

    features = {"final": final}
    layout = selfreg.TapLayout(teacher="final", encoder={"first": [], "last": []}, decoder={"first": [], "last": []})
    for part, maps in (("enc", enc), ("dec", dec)):
        for k, (first, last) in enumerate(maps):
            features[f"{part}{k}.0"], features[f"{part}{k}.1"] = first, last
            target = layout.encoder if part == "enc" else layout.decoder
            target["first"].append(f"{part}{k}.0")
            target["last"].append(f"{part}{k}.1")
    scr, ifd = selfreg.selfreg_terms(features, layout, ("first", "last"), generator=None)
    torch.testing.assert_close(0.015 * (scr + ifd), seed(enc, dec, final, epoch=0), rtol=1e-6, atol=0)


def test_the_3d_loss_pools_the_teacher_to_the_student_and_detaches_it():
    student = torch.randn(1, 4, 6, 6, 6, requires_grad=True)
    teacher = torch.randn(1, 8, 12, 12, 12, requires_grad=True)
    loss = selfreg.semantic_consistency(student, teacher)
    expected = F.mse_loss(student, F.adaptive_avg_pool3d(teacher, (6, 6, 6))[:, :4])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_odd_channel_count_leaves_the_median_channel_out():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 5, 4, 4, 4, generator=g)
    order = torch.argsort(F.normalize(f.flatten(2), dim=2).mean(dim=(0, 2)), descending=True)
    expected = F.mse_loss(f[:, order[:2]], f[:, order[3:]])  # ranks 0,1 against 3,4; rank 2 unpaired
    torch.testing.assert_close(selfreg.internal_feature_distillation(f), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least 2 channels"):
        selfreg.internal_feature_distillation(f[:, :1])


def test_random_channel_selection_is_fresh_each_call_and_seeded():
    student, teacher = torch.randn(2, 8, 4, 4, 4), torch.randn(2, 16, 8, 8, 8)
    draws = [selfreg.semantic_consistency(student, teacher, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0] == draws[1]  # the same seed gives the same subsets
    generator = torch.Generator().manual_seed(7)
    values = {float(selfreg.semantic_consistency(student, teacher, generator)) for _ in range(5)}
    assert len(values) == 5  # a new subset and pairing at every call


def small_backbone(name: str, spatial_dims: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(spatial_dims=spatial_dims, in_channels=1, out_channels=3)
    if name == "segresnet":
        return nets.SegResNet(init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), **common)
    if name == "unet":
        return nets.UNet(channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=2, **common)
    return nets.SwinUNETR(feature_size=12, use_checkpoint=False, **common)


# (backbone, spatial dims) -> (input size, teacher shape without batch, number of tapped students)
TAP_CASES = {
    ("segresnet", 3): (32, (8, 32, 32, 32), 3 + 4 + 2),
    ("segresnet", 2): (32, (8, 32, 32), 3 + 4 + 2),
    ("unet", 3): (32, (8, 16, 16, 16), 4 + 4 + 1 + 1),
    ("unet", 2): (32, (8, 16, 16), 4 + 4 + 1 + 1),
    ("swinunetr", 3): (64, (12, 64, 64, 64), 4 + 4 + 4),
    ("swinunetr", 2): (64, (12, 64, 64), 4 + 4 + 4),
}


@pytest.mark.parametrize("backbone, dims", list(TAP_CASES), ids=[f"{b}-{d}d" for b, d in TAP_CASES])
def test_taps_read_channels_first_features_in_training_only(backbone, dims):
    size, teacher_shape, num_students = TAP_CASES[backbone, dims]
    net = small_backbone(backbone, dims)
    keys_before = list(net.state_dict())
    taps = selfreg.SelfRegTaps(net)
    assert list(net.state_dict()) == keys_before  # hooks add no parameters or buffers
    x = torch.randn(2, 1, *[size] * dims)
    net.train()(x)
    features = taps.pop()
    assert features[taps.layout.teacher].shape == (2, *teacher_shape)
    assert len(features) == num_students + 1
    for name, f in features.items():
        assert f.ndim == 2 + dims and f.shape[0] == 2, name
        assert type(f) is torch.Tensor
    if backbone == "swinunetr":  # channels-last blocks permuted: feature_size * 2**k channels at 1/2**(k+1) size
        f = features["swinViT.layers2.0.blocks.1"]
        assert f.shape[1:] == (24, *[size // 4] * dims)
    with pytest.raises(RuntimeError, match="training-mode forward"):
        taps.pop()
    with torch.no_grad():
        net.eval()(x)
    with pytest.raises(RuntimeError, match="training-mode forward"):
        taps.pop()
    taps.remove()
    assert not any(m._forward_hooks for m in net.modules())


def test_gradients_reach_the_encoder_and_the_teacher_gets_none_from_scr():
    net = small_backbone("segresnet").train()
    taps = selfreg.SelfRegTaps(net)
    net(torch.randn(2, 1, 32, 32, 32))
    scr, ifd = selfreg.selfreg_terms(taps.pop(), taps.layout, taps.blocks, torch.Generator().manual_seed(0))
    teacher_and_head = [p for n, p in net.named_parameters() if n.startswith(("up_layers.2", "up_samples.2", "conv_final"))]

    scr.backward(retain_graph=True)
    assert net.convInit.conv.weight.grad.abs().sum() > 0
    assert net.up_layers[1][0].conv1.conv.weight.grad.abs().sum() > 0  # a decoder student
    assert all(p.grad is None for p in teacher_and_head)

    net.zero_grad(set_to_none=True)
    ifd.backward()
    assert net.convInit.conv.weight.grad.abs().sum() > 0
    assert net.down_layers[3][1].conv1.conv.weight.grad.abs().sum() > 0


def selfreg_loss(taps, weight: float, channel_selection: str = "random") -> torch.nn.Module:
    """The loss train.json builds: DiceCE 0.4/0.6 plus SelfReg's two terms under one weight (None when it is 0, as
    the config's ``_disabled_`` makes it)."""
    regulariser = selfreg.SelfRegRegulariser(taps, channel_selection) if weight else None
    return losses.RegularisedLoss(DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.4, lambda_dice=0.6),
                                  {"selfreg": regulariser}, {"selfreg": weight})


def test_zero_weight_is_exactly_the_segmentation_loss():
    net = small_backbone("unet").train()
    taps = selfreg.SelfRegTaps(net)
    x, y = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 3, (2, 1, 32, 32, 32))
    logits = net(x)
    baseline = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.4, lambda_dice=0.6)(logits, y)
    loss = selfreg_loss(taps, 0.0)
    assert torch.equal(loss(logits, y), baseline)
    assert set(loss.terms) == {"seg", "total"}
    torch.manual_seed(0)  # the same dropout-free forward again, now with the regulariser
    weighted = selfreg_loss(taps, 0.015)
    total = weighted(net(x), y)
    assert set(weighted.terms) == {"seg", "selfreg_scr", "selfreg_ifd", "total"}
    torch.testing.assert_close(weighted.terms["seg"], baseline.detach())
    torch.testing.assert_close(total, baseline + 0.015 * (weighted.terms["selfreg_scr"] + weighted.terms["selfreg_ifd"]))


def test_regulariser_returns_the_kdloss_terms_and_checks_its_channel_selection():
    net = small_backbone("segresnet").train()
    taps = selfreg.SelfRegTaps(net)
    logits = net(torch.randn(2, 1, 32, 32, 32))
    features = dict(taps._features)
    terms = selfreg.SelfRegRegulariser(taps, "first")(logits, None, None)
    expected = selfreg.selfreg_terms(features, taps.layout, taps.blocks, None)
    torch.testing.assert_close((terms["scr"], terms["ifd"]), expected)
    with pytest.raises(ValueError, match="selfreg_channel_selection must be 'random' or 'first'"):
        selfreg.SelfRegRegulariser(taps, "all")


def test_bundle_loss_is_dice_ce_plus_one_weight_for_both_terms(bundle_on_path):
    from monai.bundle import ConfigParser

    bundle_on_path(SELFREG_BUNDLE)
    parser = ConfigParser()
    parser.read_config(str(SELFREG_BUNDLE / "configs/train.json"))
    parser["backbones#segresnet#init_filters"] = 8
    parser["num_classes"] = 3
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss.seg_loss, DiceCELoss) and loss.weights == {"selfreg": 0.015}
    assert type(loss.regularisers["selfreg"]).__name__ == "SelfRegRegulariser"  # scripts.selfreg, on the bundle path
    parser["selfreg_weight"] = 0.0
    assert not parser.get_parsed_content("loss", lazy=False).regularisers


def test_custom_layout_from_config_and_wrong_names():
    net = small_backbone("segresnet")
    taps = selfreg.SelfRegTaps(net, blocks=["last"], layout={"teacher": "up_layers.2",
                                                             "encoder": {"last": ["down_layers.3"]}})
    net.train()(torch.randn(1, 1, 32, 32, 32))
    assert set(taps.pop()) == {"up_layers.2", "down_layers.3"}
    with pytest.raises(ValueError, match=r"\['down_layers.9'\] are not modules of SegResNet"):
        selfreg.SelfRegTaps(net, layout={"teacher": "up_layers.2", "encoder": {"last": ["down_layers.9"]}})
    with pytest.raises(ValueError, match="selfreg_blocks"):
        selfreg.SelfRegTaps(net, blocks=["middle"])
    with pytest.raises(TypeError, match="give selfreg_layout"):
        selfreg.SelfRegTaps(nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2))


@pytest.mark.parametrize("backbone, roi, ok", [("swinunetr", (64, 64, 32), True), ("swinunetr", (48, 64, 64), False),
                                               ("segresnet", (40, 40, 40), True), ("unet", (36, 40, 40), False)])
def test_roi_size_check(backbone, roi, ok):
    net = small_backbone(backbone)
    if ok:
        assert backbones.check_roi_size(net, roi) == roi
    else:
        with pytest.raises(ValueError, match="must be divisible by"):
            backbones.check_roi_size(net, roi)
