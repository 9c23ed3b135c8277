"""What only the SegResNet-VAE bundle has: Myronenko's paper settings one config file away, and the preprocessing
settings reaching the transforms. Training, evaluation, inference, resume, DDP and the plain-backbone checkpoint
are the bundle contract (test_bundle_contract.py); the crop refusals are in test_bad_input.py."""

from __future__ import annotations

import pytest
from helpers import VAE_BUNDLE, in_bundle, workflow


def test_paper_settings_are_one_override_away(synthetic_dataset, tmp_path):
    """configs/paper_settings.json on top of train.json gives Myronenko's network and optimisation settings."""
    with in_bundle(VAE_BUNDLE):
        flow = workflow(VAE_BUNDLE, ["train.json", "paper_settings.json"], "train", bundle_root=str(tmp_path),
                        dataset_dir=str(synthetic_dataset))
        net = flow.parser.get_parsed_content("network_def")
        assert (net.init_filters, net.vae_nz, net.vae_estimate_std) == (32, 128, True)
        assert list(net.input_image_size) == [160, 192, 128] and net.dropout is not None
        assert flow.parser.get_parsed_content("check_roi") == (160, 192, 128)
        assert flow.parser.get_parsed_content("optimizer").defaults["lr"] == 1e-4
    # Paper configuration (in 4, out 3) has 24.8 M parameters; with one input channel a few hundred fewer.
    assert 24.7e6 < sum(p.numel() for p in net.parameters()) < 24.9e6


@pytest.mark.parametrize("norm, expected", [("mr", "ForegroundZScored"), ("ct", "ScaleIntensityRanged")])
def test_preprocessing_settings_reach_the_transforms(synthetic_dataset, tmp_path, norm, expected):
    with in_bundle(VAE_BUNDLE):
        flow = workflow(VAE_BUNDLE, ["train.json"], "train", bundle_root=str(tmp_path),
                        dataset_dir=str(synthetic_dataset), intensity_norm=norm, ct_window=[-175, 250],
                        orientation="LPS", spacing=[1.0, 1.25, 1.5], crop_pos=3)
        preprocessing = flow.parser.get_parsed_content("train#preprocessing").flatten()  # MR: clip, then z-score
        transforms = {type(t).__name__: t for t in preprocessing.transforms}
    assert expected in transforms
    if norm == "ct":
        assert transforms["ScaleIntensityRanged"].scaler.a_min == -175
    assert transforms["Orientationd"].ornt_transform.axcodes == "LPS"
    assert list(transforms["Spacingd"].spacing_transform.pixdim) == [1.0, 1.25, 1.5]
    assert transforms["RandCropByPosNegLabeld"].cropper.pos_ratio == 0.75
