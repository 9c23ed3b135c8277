"""The SegResNet-VAE method code: the VAE branch reproduces MONAI's, the loss terms match a hand computation of the
paper's equations, weights of zero give the plain SegResNet, the crop check refuses what the VAE cannot take, and a
constant sigma (``vae_estimate_std`` false) builds no unused layer, so that 2-process DDP trains."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers import VAE_BUNDLE, bundle_module, run_bundle
from monai.bundle import ConfigParser
from monai.losses import DiceLoss
from monai.networks import nets
from monai.transforms import Compose, RandCropByPosNegLabeld, RandSpatialCropd

vae = bundle_module(VAE_BUNDLE, "vae")
losses = bundle_module(VAE_BUNDLE, "losses")
KWARGS = dict(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
ROI = (32, 32, 16)


def paper_loss(l2_weight: float = 0.1, kl_weight: float = 0.1) -> torch.nn.Module:
    """The loss train.json builds: soft Dice with squared denominators plus the VAE terms, one weight each."""
    return losses.RegularisedLoss(DiceLoss(to_onehot_y=True, softmax=True, squared_pred=True),
                                  {"vae": vae.VAERegulariser()}, {"vae": {"l2": l2_weight, "kl": kl_weight}})


def make_vae(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return vae.SegResNetVAE(input_image_size=ROI, vae_nz=16, **{"vae_estimate_std": True, **KWARGS, **extra})


def test_train_forward_returns_logits_and_vae_outputs():
    net = make_vae().train()
    x = torch.randn(2, 1, *ROI)
    logits, out = net(x)
    assert logits.shape == (2, 3, *ROI)
    assert out.image is x and out.reconstruction.shape == x.shape
    assert out.mu.shape == out.sigma.shape == (2, 16) and (out.sigma > 0).all()


def test_eval_forward_returns_logits_only():
    net = make_vae().eval()
    with torch.no_grad():
        logits = net(torch.randn(1, 1, 48, 48, 32))  # any size divisible by 8 in eval mode
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 3, 48, 48, 32)


@pytest.mark.parametrize("estimate_std", [True, False])
def test_vae_branch_reproduces_monai_vae_loss(estimate_std):
    """MONAI's logits and merged vae_loss, recomputed from the returned mu, sigma and reconstruction of the same
    forward pass (the VAE branch runs before the segmentation decoder here: the same random draws, the same values)."""
    net = make_vae().train()
    net.vae_estimate_std = estimate_std
    x = torch.randn(2, 1, *ROI)
    torch.manual_seed(1)
    logits, out = net(x)
    torch.manual_seed(1)
    monai_logits, monai_vae_loss = nets.SegResNetVAE.forward(net, x)
    torch.testing.assert_close(logits, monai_logits)
    if estimate_std:
        reg = 0.5 * torch.mean(out.mu**2 + out.sigma**2 - torch.log(1e-8 + out.sigma**2) - 1)
    else:
        reg = torch.mean(out.mu**2)
    torch.testing.assert_close(reg + torch.nn.functional.mse_loss(x, out.reconstruction), monai_vae_loss)


def test_loss_terms_match_hand_computation():
    """Eq. (1)-(3) on fixed tensors, computed by hand in numpy."""
    logits = torch.tensor([[[[[2.0]], [[0.0]]], [[[0.0]], [[1.0]]]]])  # (B=1, C=2, 2, 1, 1)
    label = torch.tensor([[[[[1.0]], [[1.0]]]]])  # (1, 1, 2, 1, 1): both voxels are class 1
    image = torch.tensor([[[[[1.0]], [[3.0]]]]])
    recon = torch.tensor([[[[[0.0]], [[2.0]]]]])
    mu = torch.tensor([[0.5, -1.0]])
    sigma = torch.tensor([[1.0, 0.5]])
    outputs = vae.VAEOutputs(image=image, reconstruction=recon, mu=mu, sigma=sigma)
    loss = paper_loss(l2_weight=0.1, kl_weight=0.1)
    total = loss((logits, outputs), label)

    z = logits.numpy()[0, :, :, 0, 0]  # (C, voxels)
    p = np.exp(z) / np.exp(z).sum(axis=0)
    y = np.array([[0.0, 0.0], [1.0, 1.0]])
    smooth = 1e-5
    dice = np.mean([1 - (2 * (p[c] * y[c]).sum() + smooth) / ((y[c] ** 2).sum() + (p[c] ** 2).sum() + smooth)
                    for c in range(2)])
    l2 = ((1 - 0) ** 2 + (3 - 2) ** 2) / 2
    kl = ((0.25 + 1 - 0 - 1) + (1 + 0.25 - np.log(0.25) - 1)) / 2  # N = 2 voxels x 1 channel
    assert loss.terms["seg"].item() == pytest.approx(dice, rel=1e-5)
    assert loss.terms["vae_l2"].item() == pytest.approx(l2, rel=1e-6)
    assert loss.terms["vae_kl"].item() == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(dice + 0.1 * l2 + 0.1 * kl, rel=1e-5)
    assert loss.terms["total"].item() == pytest.approx(total.item())


def test_zero_weights_give_the_plain_segresnet_objective():
    net = make_vae().train()
    plain = nets.SegResNet(**KWARGS).train()
    plain.load_state_dict(net.segmentation_network().state_dict(), strict=True)
    x, label = torch.randn(1, 1, *ROI), torch.randint(0, 3, (1, 1, *ROI)).float()
    loss = paper_loss(l2_weight=0.0, kl_weight=0.0)
    loss(net(x), label).backward()
    assert set(loss.terms) == {"seg", "total"}  # the VAE regulariser is not run
    loss(plain(x), label).backward()
    plain_grads = dict(plain.named_parameters())
    for name, param in net.named_parameters():
        if name.startswith("vae_"):
            assert param.grad is None or not param.grad.any(), name
        else:
            torch.testing.assert_close(param.grad, plain_grads[name].grad, rtol=1e-4, atol=1e-6)


def test_segmentation_network_shares_parameters():
    net = make_vae()
    view = net.segmentation_network()
    assert set(view.state_dict()) == set(nets.SegResNet(**KWARGS).state_dict())
    with torch.no_grad():
        view.convInit.conv.weight.fill_(0.5)
    assert (net.convInit.conv.weight == 0.5).all()


def crop_pipeline(size) -> Compose:
    return Compose([RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=size)])


def test_crop_check_accepts_the_input_image_size():
    assert vae.check_training_crop(make_vae(), crop_pipeline(ROI)) == ROI
    assert vae.check_training_crop(make_vae(), Compose([RandSpatialCropd(keys="image", roi_size=ROI)])) == ROI


def test_crop_check_refuses_another_crop():
    with pytest.raises(ValueError, match=r"training crop \[32, 32, 32\] \(RandCropByPosNegLabeld\) differs from "
                                         r"SegResNetVAE input_image_size \[32, 32, 16\]"):
        vae.check_training_crop(make_vae(), crop_pipeline((32, 32, 32)))


def test_crop_check_refuses_sizes_the_encoder_cannot_halve():
    net = vae.SegResNetVAE(input_image_size=(40, 32, 32), **KWARGS)
    with pytest.raises(ValueError, match=r"input_image_size \[40, 32, 32\] must be divisible by 16"):
        vae.check_training_crop(net, crop_pipeline((40, 32, 32)))


def test_segmentation_only_checkpoint_initialises_the_segmentation_modules():
    trained, fresh = make_vae(), vae.SegResNetVAE(input_image_size=ROI, vae_nz=16, vae_estimate_std=True, **KWARGS)
    vae_before = fresh.vae_fc1.weight.detach().clone()
    fresh.load_state_dict(trained.segmentation_network().state_dict())  # strict, as MONAI Label's loader
    torch.testing.assert_close(fresh.convInit.conv.weight, trained.convInit.conv.weight)
    torch.testing.assert_close(fresh.vae_fc1.weight, vae_before)
    incomplete = {k: v for k, v in trained.segmentation_network().state_dict().items() if k != "conv_final.2.conv.bias"}
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(incomplete)


def test_crop_check_refuses_training_without_a_random_crop():
    with pytest.raises(ValueError, match="no random crop"):
        vae.check_training_crop(make_vae(), Compose([]))


def test_bundle_loss_is_dice_plus_the_weighted_vae_terms(bundle_on_path):
    bundle_on_path(VAE_BUNDLE)
    parser = ConfigParser()
    parser.read_config(str(VAE_BUNDLE / "configs/train.json"))
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss.seg_loss, DiceLoss) and loss.seg_loss.squared_pred
    assert loss.weights == {"vae": {"l2": 0.1, "kl": 0.1}} and list(loss.regularisers) == ["vae"]
    parser["l2_weight"] = parser["kl_weight"] = 0.0
    assert not parser.get_parsed_content("loss", lazy=False).regularisers  # the plain SegResNet objective


def test_vae_regulariser_refuses_plain_logits():
    with pytest.raises(TypeError, match="needs the training output"):
        paper_loss()(torch.randn(1, 3, *ROI), torch.zeros(1, 1, *ROI))


def test_constant_sigma_builds_no_unused_layer_and_loads_old_checkpoints():
    """MONAI builds vae_fc2 even when sigma is constant; unused, it breaks DDP. A checkpoint from before still loads."""
    net = make_vae(vae_estimate_std=False).train()
    assert net.vae_fc2 is None and not [k for k in net.state_dict() if k.startswith("vae_fc2")]
    x = torch.randn(2, 1, *ROI)
    logits, out = net(x)
    torch.testing.assert_close(out.sigma, torch.full_like(out.mu, net.vae_default_std))
    paper_loss()((logits, out), torch.randint(0, 3, (2, 1, *ROI))).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []  # every parameter is used: DDP can reduce
    torch.manual_seed(0)
    old = nets.SegResNetVAE(input_image_size=ROI, vae_nz=16, vae_estimate_std=False, **KWARGS).state_dict()
    assert "vae_fc2.weight" in old
    net.load_state_dict(old, strict=True)
    torch.nn.Sequential(net).load_state_dict({f"0.{k}": v for k, v in old.items()}, strict=True)  # through a wrapper
    torch.testing.assert_close(net.vae_fc1.weight, old["vae_fc1.weight"])


def test_zero_weights_build_no_vae_branch():
    """The baseline arm (both weights 0) keeps no VAE module: under DDP an unused branch fails like vae_fc2 did."""
    net = make_vae(vae_branch=False).train()
    assert set(net.state_dict()) == set(nets.SegResNet(**KWARGS).state_dict())
    assert isinstance(net(torch.randn(1, 1, *ROI)), torch.Tensor)
    net.load_state_dict(make_vae().state_dict(), strict=True)  # a full checkpoint: its VAE weights are ignored


@pytest.mark.parametrize("overrides", [["--vae_estimate_std", "False"], ["--l2_weight", "0", "--kl_weight", "0"]],
                         ids=["constant_sigma", "zero_weights"])
def test_two_process_ddp_training_without_unused_parameters(synthetic_dataset, tmp_path, overrides):
    """Defect 4: with --vae_estimate_std false MONAI's unused vae_fc2 made DDP (no find_unused_parameters) fail; with
    both weights 0 the whole unused VAE branch did."""
    proc = run_bundle(VAE_BUNDLE, ["configs/train.json", "configs/multi_gpu_train.json"], "--bundle_root",
                      str(tmp_path), "--dataset_dir", str(synthetic_dataset), "--max_epochs", "1", "--roi_size",
                      "[32,32,32]", "--spacing", "[1.5,1.5,1.5]", "--num_workers", "0", "--progress_bar", "False",
                      "--iterations_per_epoch", "0", "--vae_nz", "32", *overrides, run_id="training",
                      launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                                "--nproc_per_node=2"])
    log = proc.stdout + proc.stderr
    assert (tmp_path / "models/model.pt").is_file()
    assert "Iter: 2/2" in log and "train_seg: " in log
    assert ("train_vae_kl: " in log) == (overrides[0] == "--vae_estimate_std")
