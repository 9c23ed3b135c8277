"""The ReSeg method code: the seven pairs and the divisor reproduce the seed's L_opt, the regulariser composes with
the segmentation loss in the template's RegularisedLoss as the seed's L = 0.5 CE + 0.5 Dice + a L_opt, the frozen
teacher (a copy of the stage-1 network, never that network) neither changes nor receives gradient while the
student's encoder does, a = 0 is the plain segmentation loss, the default pairs of SegResNet, UNet and SwinUNETR
have equal shapes in 3D and 2D, and stage 1 then stage 2 train in one ConfigWorkflow whose properties were resolved
first (the model zoo's test pattern)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import BUNDLES, bundle_module
from monai.losses import DiceCELoss
from monai.networks import nets

RESEG_BUNDLE = BUNDLES / "reseg_segmentation"
reseg = bundle_module(RESEG_BUNDLE, "reseg")
losses = bundle_module(RESEG_BUNDLE, "losses")

NUM_CLASSES = 3


def seed_loss_opt(s: dict, r: dict) -> torch.Tensor:
    """The seed's L_opt (methods.md section 1.3), with x2..x4 / u1..u3 the encoder / decoder maps of each net."""
    return (F.mse_loss(s["x4"], r["u1"]) + F.mse_loss(s["x3"], r["u2"]) + F.mse_loss(s["x2"], r["u3"])
            + F.mse_loss(s["u1"], r["x4"]) + F.mse_loss(s["u2"], r["x3"]) + F.mse_loss(s["u3"], r["x2"])
            + F.mse_loss(s["u1"], r["u1"])) / 3


def segresnet(in_channels: int = 1, out_channels: int = NUM_CLASSES, spatial_dims: int = 3) -> nets.SegResNet:
    return nets.SegResNet(spatial_dims=spatial_dims, init_filters=8, in_channels=in_channels,
                          out_channels=out_channels)


def test_seven_pairs_and_divisor_reproduce_the_seed_formula_on_fixed_tensors():
    # SegResNet's levels as the seed's: x2, x3, x4 = down_layers.0..2 and u3, u2, u1 = up_layers.2..0
    names = {"x2": "down_layers.0", "x3": "down_layers.1", "x4": "down_layers.2",
             "u3": "up_layers.2", "u2": "up_layers.1", "u1": "up_layers.0"}
    shapes = {"x2": (2, 4, 8, 8, 8), "x3": (2, 8, 4, 4, 4), "x4": (2, 16, 2, 2, 2)}
    shapes.update({"u3": shapes["x2"], "u2": shapes["x3"], "u1": shapes["x4"]})
    g = torch.Generator().manual_seed(0)
    s = {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}
    r = {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}
    pairs = reseg.default_pairs(segresnet())
    assert len(pairs) == 7
    student, teacher = {names[k]: v for k, v in s.items()}, {names[k]: v for k, v in r.items()}
    got = reseg.feature_consistency(student, teacher, pairs, divisor=3, feature_norm="none")
    torch.testing.assert_close(got, seed_loss_opt(s, r), rtol=1e-6, atol=0)
    weighted = reseg.feature_consistency(student, teacher, pairs, pair_weights=[2.0] * 7, divisor=3,
                                         feature_norm="none")
    torch.testing.assert_close(weighted, 2 * seed_loss_opt(s, r), rtol=1e-6, atol=0)
    # the default standardises each map per channel over space first (instance norm without affine parameters)
    standardized = reseg.feature_consistency(student, teacher, pairs, divisor=3)
    instance_norm = {k: F.instance_norm(v) for k, v in s.items()}, {k: F.instance_norm(v) for k, v in r.items()}
    torch.testing.assert_close(standardized, seed_loss_opt(*instance_norm), rtol=1e-5, atol=1e-6)


def test_standardized_l_opt_ignores_feature_scale_and_is_bounded():
    g = torch.Generator().manual_seed(2)
    pairs = [("a", "a"), ("b", "b")]
    s = {"a": torch.randn(2, 4, 6, 6, 6, generator=g), "b": torch.randn(2, 8, 3, 3, 3, generator=g)}
    t = {"a": torch.randn(2, 4, 6, 6, 6, generator=g), "b": torch.randn(2, 8, 3, 3, 3, generator=g)}
    loss = reseg.feature_consistency(s, t, pairs, divisor=1)
    # a teacher whose residual streams grew 1000-fold in stage 1 (and shifted) gives the same standardised L_opt
    grown = {k: 1000 * v + 50 for k, v in t.items()}
    torch.testing.assert_close(reseg.feature_consistency(s, grown, pairs, divisor=1), loss, rtol=1e-4, atol=1e-5)
    assert reseg.feature_consistency(s, grown, pairs, divisor=1, feature_norm="none") > 1e5
    # identical maps give 0, opposite maps the maximum 4 per pair; a one-voxel map standardises to 0, not NaN
    torch.testing.assert_close(reseg.feature_consistency(s, {k: 3 * v for k, v in s.items()}, pairs, divisor=1),
                               torch.tensor(0.0), atol=1e-6, rtol=0)
    opposite = reseg.feature_consistency(s, {k: -v for k, v in s.items()}, pairs, divisor=1)
    torch.testing.assert_close(opposite, torch.tensor(8.0), rtol=1e-4, atol=0)
    single = {"a": torch.randn(2, 4, 1, 1, 1, generator=g)}
    assert reseg.feature_consistency(single, {"a": torch.randn(2, 4, 1, 1, 1)}, [("a", "a")]) == 0
    with pytest.raises(ValueError, match="reseg_feature_norm must be 'instance' or 'none'"):
        reseg.feature_consistency(s, t, pairs, feature_norm="batch")


def seg_loss(ce_weight: float = 0.5, dice_weight: float = 0.5) -> DiceCELoss:
    """The template's ``seg_loss`` with ReSeg's ``ce_weight`` and ``dice_weight`` (0.5 and 0.5, the seed's)."""
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=ce_weight, lambda_dice=dice_weight)


def regulariser(student: torch.nn.Module, teacher: torch.nn.Module, **kwargs):
    pairs = reseg.default_pairs(student)
    return reseg.ReSegRegulariser(reseg.pair_taps(student, pairs, "student"), teacher,
                                  reseg.pair_taps(teacher, pairs, "teacher"), pairs, num_classes=NUM_CLASSES, **kwargs)


def stage_two(teacher: torch.nn.Module, weight: float = 0.035, **kwargs):
    """The segmentation network and the loss configs/train.json builds: RegularisedLoss(seg_loss, {"reseg": ...})."""
    student = segresnet()
    loss = losses.RegularisedLoss(seg_loss(), {"reseg": regulariser(student, teacher, **kwargs)}, {"reseg": weight})
    return student, loss


def batch(size: int = 16):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 1, size, size, size, generator=g)
    label = torch.randint(0, NUM_CLASSES, (2, 1, size, size, size), generator=g).float()
    return image, label


def test_total_is_the_seed_composition_of_seg_loss_and_l_opt():
    teacher = segresnet(in_channels=NUM_CLASSES, out_channels=1)
    student, loss = stage_two(teacher)
    image, label = batch()
    logits = student(image)
    total = loss(logits, label)
    seg = seg_loss()(logits, label)
    assert set(loss.terms) == {"seg", "reseg_opt", "total"}  # logged as train_seg, train_reseg_opt, train_total
    torch.testing.assert_close(loss.terms["seg"], seg.detach())
    # L_opt recomputed from the two networks' maps, as the seed does
    pairs = reseg.default_pairs(student)
    s_taps, t_taps = reseg.pair_taps(student, pairs, "student"), reseg.pair_taps(teacher, pairs, "teacher")
    student(image)
    with torch.no_grad():
        teacher(reseg.encode_label(label, NUM_CLASSES))
    opt = reseg.feature_consistency(s_taps.pop(), t_taps.pop(), pairs, divisor=3)
    assert opt > 0
    torch.testing.assert_close(loss.terms["reseg_opt"], opt.detach())
    torch.testing.assert_close(total, seg + 0.035 * opt)


def test_regulariser_returns_the_named_term_with_gradient_to_the_student_only():
    teacher = segresnet(in_channels=NUM_CLASSES, out_channels=1)
    student = segresnet()
    term = regulariser(student, teacher)
    image, label = batch()
    out = term(student(image), label, None)
    assert set(out) == {"opt"} and out["opt"].dtype == torch.float32 and out["opt"].ndim == 0
    out["opt"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    # the gradient reaches the student's encoder through the tapped maps, and nothing after the last tapped map
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.down_layers[0].parameters())
    assert all(p.grad is None for p in student.conv_final.parameters())


def test_teacher_is_unchanged_by_a_step_and_gets_no_gradient_while_the_student_encoder_does():
    # batch norm, so that running statistics updated by a train-mode teacher (the seed's behaviour) would show
    teacher = nets.UNet(spatial_dims=3, in_channels=NUM_CLASSES, out_channels=1, channels=(4, 8, 16, 32, 64),
                        strides=(2, 2, 2, 2), num_res_units=1, norm="batch").train()
    student = nets.UNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, channels=(4, 8, 16, 32, 64),
                        strides=(2, 2, 2, 2), num_res_units=1, norm="batch")
    # CE and Dice weighted 0: every gradient the student gets comes from L_opt
    loss = losses.RegularisedLoss(seg_loss(0.0, 0.0), {"reseg": regulariser(student, teacher)}, {"reseg": 0.035})
    loss.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD([*student.parameters(), *teacher.parameters()], lr=1.0)
    image, label = batch()
    total = loss(student(image), label)
    total.backward()
    optimizer.step()

    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():  # weights and batch-norm running statistics
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    encoder_grad = student.get_submodule("model.0").conv.unit0.conv.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0


def test_frozen_teacher_is_a_frozen_copy_that_leaves_the_stage_one_network_trainable():
    stage_one = segresnet(in_channels=NUM_CLASSES, out_channels=1).train()
    teacher = reseg.frozen_teacher(stage_one, "cpu")
    assert teacher is not stage_one and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert stage_one.training and all(p.requires_grad for p in stage_one.parameters())
    for (name, a), b in zip(stage_one.state_dict().items(), teacher.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        assert a.data_ptr() != b.data_ptr()  # its own storage: training stage 1 further does not move the teacher
    # the regulariser freezes its teacher again, and that never reaches the stage-1 network either
    regulariser(segresnet(), teacher)
    assert all(p.requires_grad for p in stage_one.parameters())


class ExplodingTeacher(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("a = 0 must not run the teacher")


def test_zero_weight_is_exactly_the_segmentation_loss_without_running_the_teacher():
    student = segresnet()
    pairs = reseg.default_pairs(student)
    taps = reseg.pair_taps(student, pairs, "student")
    term = reseg.ReSegRegulariser(taps, ExplodingTeacher(), taps, pairs, num_classes=NUM_CLASSES)
    loss = losses.RegularisedLoss(seg_loss(), {"reseg": term}, {"reseg": 0.0})
    image, label = batch()
    logits = student(image)
    torch.testing.assert_close(loss(logits, label), seg_loss()(logits, label), rtol=0, atol=0)
    assert set(loss.terms) == {"seg", "total"}


def test_zero_weight_config_builds_no_teacher_taps_or_regulariser(synthetic_dataset, tmp_path, monkeypatch):
    """--reseg_weight 0 in configs/train.json: the loss is the template's seg_loss alone, no hook is registered on
    the segmentation network, no teacher is built; with a = 0.035 the teacher is not ``reconstruction_def``."""
    from monai.bundle import ConfigParser

    from bundle_env import bundle_imports

    def parsed(weight: float) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(str(RESEG_BUNDLE / "configs/train.json"))
        parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(synthetic_dataset), "reseg_weight": weight,
                       "backbones#segresnet#init_filters": 8})
        parser.parse()
        return parser

    monkeypatch.setattr(sys, "path", list(sys.path))
    with bundle_imports(RESEG_BUNDLE):
        baseline = parsed(0)
        loss = baseline.get_parsed_content("loss")
        assert type(loss).__name__ == "RegularisedLoss" and len(loss.regularisers) == 0
        assert isinstance(loss.seg_loss, DiceCELoss)
        assert baseline.get_parsed_content("teacher") is None
        network = baseline.get_parsed_content("network_def")
        assert not any(m._forward_hooks for m in network.modules())

        method = parsed(0.035)
        loss = method.get_parsed_content("loss")
        term = loss.regularisers["reseg"]
        assert loss.weights == {"reseg": 0.035} and type(term).__name__ == "ReSegRegulariser"
        assert term.teacher is method.get_parsed_content("teacher")
        assert term.teacher is not method.get_parsed_content("reconstruction_def")
        assert all(p.requires_grad for p in method.get_parsed_content("reconstruction_def").parameters())
        assert any(m._forward_hooks for m in method.get_parsed_content("network_def").modules())


def test_regulariser_refuses_bad_settings_when_built():
    student, teacher = segresnet(), segresnet(in_channels=NUM_CLASSES, out_channels=1)
    with pytest.raises(ValueError, match="reseg_pair_weights has 2 entries for 7 reseg_pairs"):
        regulariser(student, teacher, pair_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="reseg_divisor must be positive"):
        regulariser(student, teacher, divisor=0)
    with pytest.raises(ValueError, match="'onehot' or 'index'"):
        regulariser(student, teacher, label_encoding="one-hot")
    with pytest.raises(ValueError, match="reseg_feature_norm must be 'instance' or 'none'"):
        regulariser(student, teacher, feature_norm="batch")
    with pytest.raises(ValueError, match="set reseg_weight 0 for the baseline"):
        reseg.ReSegRegulariser(None, teacher, None, [], num_classes=NUM_CLASSES)


BACKBONES_3D = {
    "segresnet": lambda i, o, d: nets.SegResNet(spatial_dims=d, init_filters=8, in_channels=i, out_channels=o),
    "unet": lambda i, o, d: nets.UNet(spatial_dims=d, in_channels=i, out_channels=o, channels=(4, 8, 16, 32, 64),
                                      strides=(2, 2, 2, 2), num_res_units=1, norm="instance"),
    "swinunetr": lambda i, o, d: nets.SwinUNETR(spatial_dims=d, in_channels=i, out_channels=o, feature_size=12),
}
EXPECTED_PAIRS = {
    "segresnet": [("down_layers.2", "up_layers.0"), ("down_layers.1", "up_layers.1"), ("down_layers.0", "up_layers.2"),
                  ("up_layers.0", "down_layers.2"), ("up_layers.1", "down_layers.1"), ("up_layers.2", "down_layers.0"),
                  ("up_layers.0", "up_layers.0")],
    "unet": [("model.1.submodule.1.submodule.0", "model.1.submodule.1.submodule.1.submodule.2"),
             ("model.1.submodule.0", "model.1.submodule.1.submodule.2"), ("model.0", "model.1.submodule.2"),
             ("model.1.submodule.1.submodule.1.submodule.2", "model.1.submodule.1.submodule.0"),
             ("model.1.submodule.1.submodule.2", "model.1.submodule.0"), ("model.1.submodule.2", "model.0"),
             ("model.1.submodule.1.submodule.1.submodule.2", "model.1.submodule.1.submodule.1.submodule.2")],
    "swinunetr": [("encoder4", "decoder4"), ("encoder3", "decoder3"), ("encoder2", "decoder2"),
                  ("decoder4", "encoder4"), ("decoder3", "encoder3"), ("decoder2", "encoder2"),
                  ("decoder4", "decoder4")],
}


@pytest.mark.parametrize("backbone,spatial_dims", [("segresnet", 3), ("unet", 3), ("swinunetr", 3), ("unet", 2)])
def test_default_pairs_have_equal_shapes(backbone, spatial_dims):
    student = BACKBONES_3D[backbone](1, NUM_CLASSES, spatial_dims).train()
    teacher = BACKBONES_3D[backbone](NUM_CLASSES, 1, spatial_dims)
    pairs = reseg.default_pairs(student)
    assert pairs == EXPECTED_PAIRS[backbone]
    s_taps, t_taps = reseg.pair_taps(student, pairs, "student"), reseg.pair_taps(teacher.eval(), pairs, "teacher")
    size = 64 if backbone == "swinunetr" else 32  # more than one voxel at the bottleneck in training
    student(torch.randn(1, 1, *[size] * spatial_dims))
    with torch.no_grad():
        teacher(torch.randn(1, NUM_CLASSES, *[size] * spatial_dims))
    s, t = s_taps.pop(), t_taps.pop()
    for s_name, t_name in pairs:
        assert s[s_name].shape == t[t_name].shape, (s_name, t_name)
    # three levels at three resolutions: the seed's H/2, H/4, H/8 relation
    assert len({s[name].shape[2:] for name, _ in pairs[:3]}) == 3


def test_too_shallow_unet_is_refused_with_what_to_do():
    shallow = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16, 32), strides=(2, 2, 2))
    with pytest.raises(ValueError, match=r"len\(strides\) >= 4\) or set reseg_pairs"):
        reseg.default_pairs(shallow)


def test_mismatched_pairs_are_average_pooled_to_the_smaller_shape():
    student, teacher = torch.randn(2, 8, 8, 8, 8), torch.randn(2, 4, 4, 4, 4)
    s, t = reseg.match_shapes(student, teacher)
    assert s.shape == t.shape == (2, 4, 4, 4, 4)
    torch.testing.assert_close(t, teacher)
    expected = F.avg_pool3d(student, 2).unflatten(1, (4, 2)).mean(2)  # 2x2x2 blocks, then pairs of channels
    torch.testing.assert_close(s, expected)


def test_label_encodings_and_stage_one_batch_and_loss():
    label = torch.tensor([0.0, 2.0, 1.0]).reshape(1, 1, 3)
    onehot = reseg.encode_label(label, NUM_CLASSES, "onehot")
    assert onehot.shape == (1, 3, 3) and onehot.argmax(1).tolist() == [[0, 2, 1]]
    assert torch.equal(reseg.encode_label(label, NUM_CLASSES, "index"), label)
    with pytest.raises(ValueError, match="'onehot' or 'index'"):
        reseg.LabelToImageBatch(NUM_CLASSES, "one-hot")

    image = torch.randn(1, 1, 3)
    inputs, targets = reseg.LabelToImageBatch(NUM_CLASSES)({"image": image, "label": label})
    assert torch.equal(inputs, onehot) and torch.equal(targets, image)

    pred = torch.randn(1, 1, 3)
    loss = reseg.ReconstructionLoss()
    torch.testing.assert_close(loss(pred, image), 0.6 * F.mse_loss(pred, image) + 0.4 * F.l1_loss(pred, image))
    assert set(loss.terms) == {"mse", "l1", "total"}


def test_stage_one_trains_after_the_workflow_properties_are_resolved(synthetic_dataset, tmp_path, monkeypatch):
    """The model zoo's own unit-test pattern on stage 1: ConfigWorkflow, initialize, check_properties (which resolves
    the train workflow's properties, ``train#trainer`` and so the stage-2 loss and its frozen teacher among them),
    then run. The teacher must be its own network: freezing it must leave the stage-1 network trainable. Stage 2 then
    runs in the same workflow (as run id training_all does) with the teacher holding the saved stage-1 weights."""
    from monai.bundle import ConfigWorkflow

    from bundle_env import bundle_imports

    monkeypatch.setattr(sys, "path", list(sys.path))  # ConfigWorkflow.run puts the bundle folder on sys.path
    with bundle_imports(RESEG_BUNDLE):
        workflow = ConfigWorkflow(
            config_file=[str(RESEG_BUNDLE / "configs/train.json"),
                         str(RESEG_BUNDLE / "configs/train_reconstruction.json")],
            meta_file=str(RESEG_BUNDLE / "configs/metadata.json"),
            logging_file=str(RESEG_BUNDLE / "configs/logging.conf"), workflow_type="train",
            bundle_root=str(tmp_path), dataset_dir=str(synthetic_dataset), max_epochs=1, roi_size=[32, 32, 32],
            spacing=[1.5, 1.5, 1.5], num_workers=0, progress_bar=False, iterations_per_epoch=0, **{"backbones#segresnet#init_filters": 8})
        workflow.initialize()
        assert workflow.check_properties() == []
        parser = workflow.parser
        parser.get_parsed_content("train#trainer")  # as the zoo's properties do: it builds the stage-2 loss
        stage_one, teacher = parser.get_parsed_content("reconstruction#network"), parser.get_parsed_content("teacher")
        before = [p.detach().clone() for p in stage_one.parameters()]
        workflow.run()  # stage 1
        trainer = parser.get_parsed_content("reconstruction#trainer")
        assert trainer.state.epoch == 1 and math.isfinite(float(trainer.state.output[0]["loss"]))
        assert any(not torch.equal(b, p) for b, p in zip(before, stage_one.parameters()))  # it trained
        assert (tmp_path / "models/reconstruction.pt").is_file()
        # the stage-2 teacher is another network, frozen in eval mode, that stage 1 left untouched
        assert teacher is not stage_one and type(teacher) is type(stage_one)
        assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
        assert all(p.requires_grad for p in stage_one.parameters())

        parser.get_parsed_content("segmentation_run")  # stage 2 in the same workflow, as run id training_all does
        loss = parser.get_parsed_content("loss")
        assert set(loss.terms) == {"seg", "reseg_opt", "total"}
        assert all(math.isfinite(v.item()) for v in loss.terms.values()) and loss.terms["reseg_opt"] > 0
        assert (tmp_path / "models/model.pt").is_file()
        saved = torch.load(tmp_path / "models/reconstruction.pt", weights_only=True)
        saved = saved.get("model", saved)
        for name, value in teacher.state_dict().items():  # the best stage-1 network, untouched by stage 2
            torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)
        workflow.finalize()
