"""The parts of a SemSim training step on tiny inputs, each checked against an independent computation: the CutMix
boxes (volume, edge-ratio and probability ranges), the channel dropout of the feature-perturbation pass (rate,
scaling, and where it acts: on the features the decoder reads, from a clean encoder pass), the batch preparation
(views, CutMix of the strong views, partners, the labeled crops' source volumes) and SemSimNetwork's passes (the
weak view's features without gradient, the early-exit strong-2 pass, its hooks)."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import BUNDLES, bundle_module
from monai.data import MetaTensor
from monai.networks import nets

SEMSIM_BUNDLE = BUNDLES / "semsim_segmentation"
training = bundle_module(SEMSIM_BUNDLE, "semsim_training")
sfm = bundle_module(SEMSIM_BUNDLE, "sfm")


def box_edges(mask: torch.Tensor) -> list[int]:
    """The edge lengths of the box a (*S) 0/1 mask holds, checking that it is one solid box."""
    edges = [int(mask.amax(dim=tuple(d for d in range(mask.ndim) if d != axis)).sum()) for axis in range(mask.ndim)]
    assert int(mask.sum()) == torch.Size(edges).numel(), "not a solid box"
    return edges


# ---------------------------------------------------------------------------------------------------- CutMix boxes


@pytest.mark.parametrize("size", [(48, 48, 48), (96, 96)])
def test_cutmix_boxes_keep_the_volume_and_edge_ratio_ranges(size):
    """Box volume U(0.02, 0.4) of the crop; every pair of edges in ratio 0.3 ... 3.3 (UniMatch's h / w range), up
    to the rounding of edges to voxels. The old draw (each log-edge over the whole log range) reached ratios of 11."""
    generator = torch.Generator().manual_seed(0)
    volume = torch.Size(size).numel()
    fractions, ratios = [], []
    for _ in range(40):
        masks = training.cutmix_masks((5, 1, *size), probability=1.0, generator=generator)
        assert set(masks.unique().tolist()) == {0.0, 1.0}
        for mask in masks[:, 0]:
            edges = box_edges(mask)
            fractions.append(mask.sum().item() / volume)
            ratios.append(max(a / b for a, b in itertools.permutations(edges, 2)))
    assert 0.02 * 0.85 <= min(fractions) < 0.05 and 0.3 < max(fractions) <= 0.4 * 1.15
    assert 2.0 < max(ratios) <= (1 / 0.3) * 1.12, max(ratios)


def test_cutmix_probability_per_volume():
    generator = torch.Generator().manual_seed(1)
    masks = training.cutmix_masks((600, 1, 8, 8, 8), probability=0.3, generator=generator)
    pasted = masks.flatten(1).amax(1)
    assert abs(pasted.mean().item() - 0.3) < 0.06  # binomial sd 0.019
    assert training.cutmix_masks((50, 1, 8, 8), probability=0.0).sum() == 0
    assert (training.cutmix_masks((50, 1, 8, 8), probability=1.0).flatten(1).amax(1) == 1).all()
    # the same generator state gives the same boxes
    a = training.cutmix_masks((4, 1, 16, 16), 0.5, generator=torch.Generator().manual_seed(5))
    b = training.cutmix_masks((4, 1, 16, 16), 0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------- channel dropout


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_channel_dropout_rate_and_scaling(p):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Identity())
    dropout = training.ChannelDropout(network, ["0"], p=p)
    x = torch.rand(4, 500, 3, 2) + 0.5
    assert torch.equal(network(x), x)  # inactive outside the context
    with dropout.active():
        y = network(x)
    kept = (y != 0).flatten(2)
    assert (kept.all(2) | ~kept.any(2)).all()  # whole channels
    assert abs(1 - kept.all(2).float().mean().item() - p) < 0.04
    survivors = kept.all(2)
    assert torch.allclose(y[survivors], x[survivors] / (1 - p))
    dropout.remove()
    with dropout.active():
        assert torch.equal(network(x), x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        training.ChannelDropout(network, ["0"], p=1.0)


def tiny_segresnet() -> torch.nn.Module:
    return nets.SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 1, 1, 1),
                          blocks_up=(1, 1, 1)).eval()


def test_channel_dropout_acts_on_the_decoder_inputs_of_a_clean_encoder_pass_segresnet():
    """Issue 16, defect 3: every down stage's output was replaced by a dropped copy, so deeper stages computed from
    dropped inputs. Now each stage's first layer sees the clean output of the stage before, and the decoder, and
    only the decoder, reads the dropped copies (UniMatch's perturbation of a clean encoder pass)."""
    torch.manual_seed(0)
    network = tiny_segresnet()
    x = torch.randn(1, 1, 16, 16, 16)
    stages = training.perturbed_stages(network)
    assert stages == [f"down_layers.{i}" for i in range(4)]
    modules = dict(network.named_modules())
    with torch.no_grad():
        clean_output = network(x)
        _, clean = network.encode(x)  # the clean output of every stage
    dropout = training.ChannelDropout(network, stages, p=0.5)
    seen, dropped = {}, {}
    handles = [modules[f"{name}.0"].register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0]))
               for name in stages[1:]]  # what each deeper stage's first layer receives
    handles += [modules[name].register_forward_hook(lambda m, a, out, name=name: dropped.setdefault(name, out))
                for name in stages]  # registered after the dropout's: the outputs handed on
    with torch.no_grad(), dropout.active():
        perturbed = network(x)
    for handle in handles:
        handle.remove()
    for i, name in enumerate(stages[1:]):
        assert torch.equal(seen[name], clean[i]), f"{name} computed from a dropped input"
    zero_channels = 0
    for i, name in enumerate(stages):
        per_channel = dropped[name].flatten(2)
        is_zero = (per_channel == 0).all(2)
        zero_channels += int(is_zero.sum())
        assert torch.allclose(dropped[name][~is_zero], 2 * clean[i][~is_zero])
    assert zero_channels > 0
    # the decoder's output is that of the dropped features: SegResNet's own decode of them
    with torch.no_grad():
        expected = network.decode(dropped[stages[-1]], [dropped[name] for name in reversed(stages)])
    assert torch.allclose(perturbed, expected, atol=1e-6) and not torch.allclose(perturbed, clean_output, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(network(x), clean_output)  # inactive again after the context


def test_channel_dropout_leaves_the_encoder_clean_unet():
    torch.manual_seed(0)
    network = nets.UNet(3, 1, 3, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=1).eval()
    stages = training.perturbed_stages(network)
    modules = dict(network.named_modules())
    x = torch.randn(1, 1, 16, 16, 16)
    clean = {}
    handles = [modules[name].register_forward_hook(lambda m, a, out, name=name: clean.setdefault(name, out))
               for name in stages]
    with torch.no_grad():
        network(x)
    for handle in handles:
        handle.remove()
    dropout = training.ChannelDropout(network, stages, p=0.5)
    seen = {}
    handles = [modules[f"{name}.conv"].register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0]))
               for name in stages[1:]]
    with torch.no_grad(), dropout.active():
        network(x)
    for handle in handles:
        handle.remove()
    for previous, name in zip(stages, stages[1:]):
        assert torch.equal(seen[name], clean[previous]), name


# ------------------------------------------------------------------------------------------------- the batch


def semi_batch(labeled: int = 4, unlabeled: int = 3, size: int = 8, names=("a.nii.gz", "a.nii.gz", "b.nii.gz",
                                                                            "b.nii.gz")) -> dict:
    g = torch.Generator().manual_seed(0)
    image = MetaTensor(torch.randn(labeled, 1, size, size, size, generator=g))
    if names is not None:
        image.meta["filename_or_obj"] = list(names)
    batch = {"image": image, "label": MetaTensor(torch.randint(0, 3, (labeled, 1, size, size, size), generator=g))}
    for key in training.UNLABELED_KEYS:
        batch[key] = MetaTensor(torch.randn(unlabeled, 1, size, size, size, generator=g))
    return batch


def test_semi_supervised_batch_mixes_the_strong_views_with_their_partners():
    batch = semi_batch()
    prepare = training.SemiSupervisedBatch(cutmix_probability=1.0, seed=3)
    assert isinstance(prepare.generator, torch.Generator)
    inputs, label = prepare(batch, device="cpu")
    assert set(inputs) == {"image", *training.UNLABELED_KEYS, "mix1", "mix2", "partner", "labeled_source"}
    assert all(type(v) is torch.Tensor for v in (*inputs.values(), label))  # plain tensors, no metadata
    assert torch.equal(label, batch["label"].as_subclass(torch.Tensor))
    assert inputs["partner"].tolist() == [1, 2, 0]  # the next volume of the batch
    assert inputs["labeled_source"].tolist() == [0, 0, 1, 1]  # crops of a.nii.gz, then of b.nii.gz
    assert torch.equal(inputs["unlabeled_image"], batch["unlabeled_image"].as_subclass(torch.Tensor))  # weak: as is
    for view, mix in (("unlabeled_strong1", "mix1"), ("unlabeled_strong2", "mix2")):
        original = batch[view].as_subclass(torch.Tensor)
        box = inputs[mix]
        assert box.shape == (3, 1, 8, 8, 8)
        for b in range(3):
            box_edges(box[b, 0])  # one solid box per volume (cutmix_probability 1)
            partner = (b + 1) % 3
            expected = torch.where(box[b].bool(), original[partner], original[b])
            assert torch.equal(inputs[view][b], expected)
    assert not torch.equal(inputs["mix1"], inputs["mix2"])  # each strong view its own boxes
    again, _ = training.SemiSupervisedBatch(cutmix_probability=1.0, seed=3)(semi_batch(), device="cpu")
    assert torch.equal(again["mix1"], inputs["mix1"]) and torch.equal(again["mix2"], inputs["mix2"])


def test_semi_supervised_batch_edge_cases():
    # without filenames every labeled crop is its own volume
    inputs, _ = training.SemiSupervisedBatch(seed=0)(semi_batch(names=None), device="cpu")
    assert inputs["labeled_source"].tolist() == [0, 1, 2, 3]
    # labeled only (supervised-only training): the image alone
    labeled_only = {key: value for key, value in semi_batch().items() if key in ("image", "label")}
    inputs, _ = training.SemiSupervisedBatch(seed=0)(labeled_only, device="cpu")
    assert set(inputs) == {"image"}
    # CutMix needs two unlabeled volumes, unless it is off
    with pytest.raises(ValueError, match="unlabeled_batch_size"):
        training.SemiSupervisedBatch(cutmix_probability=0.5)(semi_batch(unlabeled=1), device="cpu")
    single = semi_batch(unlabeled=1)
    inputs, _ = training.SemiSupervisedBatch(cutmix_probability=0.0)(single, device="cpu")
    assert torch.equal(inputs["unlabeled_strong1"], single["unlabeled_strong1"].as_subclass(torch.Tensor))
    assert inputs["mix1"].sum() == 0


# ------------------------------------------------------------------------------------------------ SemSimNetwork


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def semsim_network() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    backbone = tiny_segresnet().train()
    fusion = training.fusion_stages(backbone)
    module = sfm.SpatialFusionModule(3, training.fusion_channels(backbone, 3), feature_size=8, window_size=1,
                                     num_heads=2)
    network = training.SemSimNetwork(backbone, module, fusion, training.perturbed_stages(backbone)).train()
    inputs, _ = training.SemiSupervisedBatch(cutmix_probability=1.0)(semi_batch(labeled=2, unlabeled=2, size=16,
                                                                                names=("a", "b")), device="cpu")
    return network, inputs


def test_semsim_network_outputs_gradients_and_hooks():
    network, inputs = semsim_network()
    before = hook_count(network.backbone)
    out = network(inputs)
    assert hook_count(network.backbone) == before  # the early-exit hook is gone after the pass
    assert set(out) == {"labeled", "weak", "strong1", "fp", "features_labeled", "features_weak", "features_strong1",
                        "features_strong2", "mix1", "mix2", "partner", "labeled_source"}
    assert out["labeled"].shape == (2, 3, 16, 16, 16) and out["weak"].shape == (2, 3, 16, 16, 16)
    for key in ("features_labeled", "features_weak", "features_strong1", "features_strong2"):
        assert out[key].shape == (2, 8, 4, 4, 4), key
    # the weak view's features only make targets: no graph; the others carry gradient to the backbone and the SFM
    assert not out["features_weak"].requires_grad
    for key in ("features_labeled", "features_strong1", "features_strong2", "fp", "strong1", "labeled"):
        assert out[key].requires_grad, key
    assert not torch.allclose(out["fp"], out["weak"], atol=1e-4)  # the perturbed pass differs from the weak one
    network.remove_hooks()
    assert hook_count(network.backbone) == 0
    assert set(network({"image": inputs["image"]})) == {"labeled"}  # supervised-only: one pass


def test_strong2_early_exit_gives_the_full_pass_features_without_the_decoder():
    network, inputs = semsim_network()
    image = inputs["unlabeled_strong2"]
    decoder_calls = []
    handle = network.backbone.up_layers[0].register_forward_pre_hook(lambda m, a: decoder_calls.append(1))
    early = network._encoder_features(image)
    assert decoder_calls == []  # the pass ended at the deepest fused stage
    network.backbone(image)
    full = network._features()
    handle.remove()
    assert decoder_calls == [1]
    assert torch.allclose(early, full, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- EMA teacher


def test_ema_teacher_makes_the_targets_and_moves_by_the_mean_teacher_rule():
    network, inputs = semsim_network()
    teacher = training.EmaTeacher(network.backbone, network.sfm, network.fusion, decay=0.9)
    network.teacher = teacher
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a teacher that differs from the student
    assert not any(p.requires_grad for p in teacher.parameters())
    out = network(inputs)
    with torch.no_grad():
        expected_logits, expected_features = teacher(torch.cat([inputs["image"], inputs["unlabeled_image"]]))
    torch.testing.assert_close(out["weak"], expected_logits[2:])
    torch.testing.assert_close(out["features_weak"], expected_features[2:])
    torch.testing.assert_close(out["features_labeled_target"], expected_features[:2])
    assert out["labeled"].requires_grad and out["features_labeled"].requires_grad
    assert not out["weak"].requires_grad
    # the update: a = min(decay, 1 - 1/(step + 1)); step 0 copies the student
    before = [p.clone() for p in teacher.parameters()]
    student = list(network.backbone.parameters()) + list(network.sfm.parameters())
    teacher.update(network.backbone, network.sfm, step=4)  # a = min(0.9, 0.8) = 0.8
    for t, b, s in zip(teacher.parameters(), before, student):
        torch.testing.assert_close(t, 0.8 * b + 0.2 * s)
    teacher.update(network.backbone, network.sfm, step=0)
    for t, s in zip(teacher.parameters(), student):
        torch.testing.assert_close(t, s)
    network.remove_hooks()
    assert hook_count(teacher.backbone) == 0
    with pytest.raises(ValueError, match="ema_decay"):
        training.EmaTeacher(network.backbone, network.sfm, network.fusion, decay=1.0)
