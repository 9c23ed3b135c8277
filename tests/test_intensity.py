"""scripts/intensity.py (template): Otsu's threshold and the foreground z-score the MR plan uses, on synthetic
heads whose background is zero or noise and whose field of view varies. The real slabs and heads are in
tests/test_plan.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import REPO, load_module
from monai.data import MetaTensor

intensity = load_module(REPO / "bundles/template/scripts/intensity.py", "template_intensity")


def head(field: int, noise: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1-channel ``field``^3 image: a 16^3 "head" of two tissues (grey 100, white 150, half each, +-5) in the
    middle of a background of 0 (+ |N(0, noise)|); and the tissue label (1 grey, 2 white, 0 background)."""
    rng = np.random.default_rng(seed)
    image = np.abs(rng.normal(0, noise, (field,) * 3)) if noise else np.zeros((field,) * 3)
    label = np.zeros((field,) * 3, dtype=np.int64)
    start = (field - 16) // 2
    label[start:start + 16, start:start + 16, start:start + 8] = 1
    label[start:start + 16, start:start + 16, start + 8:start + 16] = 2
    image[label == 1] = rng.normal(100, 5, (label == 1).sum())
    image[label == 2] = rng.normal(150, 5, (label == 2).sum())
    return torch.as_tensor(image, dtype=torch.float32)[None], torch.as_tensor(label)


def test_otsu_threshold_splits_two_modes_and_keeps_a_constant():
    rng = np.random.default_rng(1)
    values = torch.as_tensor(np.concatenate([rng.normal(0, 1, 5000), rng.normal(20, 2, 500)]))
    threshold = intensity.otsu_threshold(values)
    assert 3 < threshold < 15
    assert ((values > threshold) == (torch.arange(5500) >= 5000)).all()
    assert intensity.otsu_threshold(torch.full((10,), 3.0)) == 3.0


@pytest.mark.parametrize("noise", [0.0, 10.0])
def test_the_head_gets_the_same_values_whatever_the_field_of_view(noise):
    """The same head in a 24^3 and a 48^3 field (its share of the view 30 % and 4 %): foreground z-scoring puts
    each tissue at the same value in both (within 0.05), whole-image z-scoring moves it by more than 1."""
    values = {}
    for over in ("foreground", "image"):
        transform = intensity.ForegroundZScored("image", over=over)
        for field in (24, 48):
            image, label = head(field, noise)
            out = transform({"image": image})["image"][0]
            values[over, field] = [float(out[label == c].mean()) for c in (1, 2)]
    small, large = np.array(values["foreground", 24]), np.array(values["foreground", 48])
    assert np.abs(small - large).max() < 0.05, values
    assert small[0] == pytest.approx(-1, abs=0.05) and small[1] == pytest.approx(1, abs=0.05)  # the head: mean 0, sd 1
    assert np.abs(np.array(values["image", 24]) - np.array(values["image", 48])).max() > 1, values


def test_channels_are_normalised_apart_and_metadata_is_kept():
    image, _ = head(24)
    two = MetaTensor(torch.cat([image, 10 * image + 7]), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    out = intensity.ForegroundZScored("image")({"image": two})["image"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, two.affine) and out.dtype == torch.float32
    assert torch.allclose(out[0], out[1], atol=1e-4)  # an affine change of one channel's scale is undone
    assert torch.isfinite(out).all()


def test_two_dimensional_and_constant_images():
    image, label = head(24)
    slice_2d = image[:, :, :, 12]
    out = intensity.ForegroundZScored("image")({"image": slice_2d})["image"]
    assert out.shape == slice_2d.shape and float(out[0][label[:, :, 12] > 0].mean()) == pytest.approx(0, abs=0.05)
    constant = intensity.ForegroundZScored("image")({"image": torch.full((1, 8, 8), 5.0)})["image"]
    assert torch.equal(constant, torch.zeros(1, 8, 8))


def test_an_unknown_region_is_refused():
    with pytest.raises(ValueError, match=r"one of \('foreground', 'image'\), got 'nonzero'"):
        intensity.ForegroundZScored("image", over="nonzero")
