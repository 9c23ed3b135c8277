"""SegResNet with VAE regularisation (Myronenko, "3D MRI brain tumor segmentation using autoencoder
regularization", BraTS 2018, arXiv 1810.11654): the network's taps and the paper's loss.

MONAI's :class:`monai.networks.nets.SegResNetVAE` returns one merged ``vae_loss`` with weights 1 and 1 and a KL
averaged over the latent dimensions. The paper weights the L2 and KL terms by 0.1 each and normalises the KL by
the number of image voxels. To log and weight the terms separately, :class:`SegResNetVAE` taps the latent mean,
the latent standard deviation and the reconstruction with forward hooks on MONAI's own modules, and
:class:`SegResNetVAELoss` computes the paper's terms from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks import nets
from monai.transforms import (
    Compose,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandSpatialCropd,
    RandSpatialCropSamplesd,
)

from .backbones import required_divisor
from .feature_taps import FeatureTaps


class VAEOutputs(NamedTuple):
    """What the VAE branch produced for one batch.

    image: the network input, (B, C, *S). reconstruction: its VAE reconstruction, (B, C, *S).
    mu, sigma: latent mean and standard deviation, (B, vae_nz).
    """

    image: torch.Tensor
    reconstruction: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor


class SegResNetVAE(nets.SegResNetVAE):
    """:class:`monai.networks.nets.SegResNetVAE` whose forward returns what the paper's loss needs.

    - training: ``forward(x) -> (logits, VAEOutputs)``, logits of shape (B, out_channels, *S).
    - eval: ``forward(x) -> logits``, so sliding-window inference receives a tensor (MONAI's class returns
      ``(logits, None)``, MONAI issue 2927). The VAE branch does not run, so the cost is a plain SegResNet's.

    Arguments are those of MONAI's class. ``input_image_size`` must equal the training crop: the VAE's dense
    layers are sized from it.
    """

    def __init__(self, input_image_size: Sequence[int], **kwargs) -> None:
        super().__init__(input_image_size=input_image_size, **kwargs)
        self._segresnet_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("vae_")}
        # mu, the pre-softplus sigma and the reconstruction; the VAE branch runs in training mode only
        self._taps = FeatureTaps(self, ["vae_fc1", "vae_fc2", "vae_conv_final"], training_only=False)

    def segmentation_network(self) -> nets.SegResNet:
        """A plain SegResNet that shares this network's segmentation modules (no copy).

        Its ``state_dict`` is the inference checkpoint: exactly the keys of ``SegResNet`` with the same arguments,
        without the training-only VAE branch, so ``models/model.pt`` loads strictly into inference.json's network,
        TorchScript export and MONAI Label. Loading into it loads into this network.
        """
        view = nets.SegResNet(**self._segresnet_kwargs)
        for name, _ in list(view.named_children()):
            setattr(view, name, getattr(self, name))
        return view.train(self.training)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a full checkpoint, or a segmentation-only one such as ``models/model.pt``.

        A checkpoint without ``vae_*`` keys initialises the segmentation modules (strictly, if ``strict``) and leaves
        the VAE branch as it is: fine-tuning from a released model, as MONAI Label's "pretrained" training does.
        """
        if not any(key.startswith("vae_") for key in state_dict):
            return self.segmentation_network().load_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor):
        logits, _ = super().forward(x)
        if not self.training:
            return logits
        taps = self._taps.pop(strict=False)  # vae_fc2 runs only when sigma is estimated
        mu = taps["vae_fc1"]
        if self.vae_estimate_std:
            sigma = F.softplus(taps["vae_fc2"])  # as MONAI's _get_vae_loss does
        else:
            sigma = torch.full_like(mu, self.vae_default_std)
        return logits, VAEOutputs(image=x, reconstruction=taps["vae_conv_final"], mu=mu, sigma=sigma)


def vae_l2(outputs: VAEOutputs) -> torch.Tensor:
    """Paper Eq. (2), L_L2 = ||I_input - I_pred||^2, as the mean over voxels and channels (the Keras reference
    implementation's normalisation; the paper's plain sum would outweigh the Dice term by ~10^6)."""
    return F.mse_loss(outputs.reconstruction, outputs.image)


def vae_kl(outputs: VAEOutputs, eps: float = 1e-8) -> torch.Tensor:
    """Paper Eq. (3), L_KL = 1/N * sum_latent(mu^2 + sigma^2 - log(sigma^2) - 1), N = voxels x channels of the
    input image, averaged over the batch. Written as the paper prints it, without the usual 1/2 factor."""
    num_voxels = outputs.image[0].numel()
    sigma_sq = outputs.sigma.square()
    per_sample = (outputs.mu.square() + sigma_sq - torch.log(sigma_sq + eps) - 1).sum(dim=1)
    return per_sample.mean() / num_voxels


class SegResNetVAELoss(torch.nn.Module):
    """Paper Eq. (1): L = L_dice + l2_weight * L_L2 + kl_weight * L_KL (paper weights 0.1 and 0.1).

    Args:
        seg_loss: the segmentation term. Default: soft Dice with squared denominators (the paper's L_dice),
            softmax over classes and one-hot labels; the paper's sigmoid over nested tumour regions is
            ``DiceLoss(sigmoid=True, squared_pred=True)``.
        l2_weight, kl_weight: weights of the VAE terms. Both 0 gives the plain SegResNet objective.

    ``forward(pred, label)`` takes the network's training output ``(logits, VAEOutputs)``, or plain logits (a
    SegResNet baseline), and a label of shape (B, 1, *S). After each call ``terms`` holds the detached values
    ``dice``, ``l2``, ``kl`` and ``total`` for logging.
    """

    def __init__(self, seg_loss: torch.nn.Module | None = None, l2_weight: float = 0.1, kl_weight: float = 0.1):
        super().__init__()
        self.seg_loss = seg_loss if seg_loss is not None else DiceLoss(to_onehot_y=True, softmax=True, squared_pred=True)
        self.l2_weight = l2_weight
        self.kl_weight = kl_weight
        self.terms: dict[str, torch.Tensor] = {}

    def forward(self, pred: torch.Tensor | tuple[torch.Tensor, VAEOutputs], label: torch.Tensor) -> torch.Tensor:
        logits, outputs = (pred, None) if isinstance(pred, torch.Tensor) else pred
        dice = self.seg_loss(logits, label)
        terms = {"dice": dice}
        total = dice
        if outputs is not None:
            terms["l2"], terms["kl"] = vae_l2(outputs), vae_kl(outputs)
            total = total + self.l2_weight * terms["l2"] + self.kl_weight * terms["kl"]
        terms["total"] = total
        self.terms = {name: value.detach() for name, value in terms.items()}
        return total


_RANDOM_CROPS = (RandCropByPosNegLabeld, RandSpatialCropd, RandCropByLabelClassesd, RandSpatialCropSamplesd)


def check_training_crop(network: nets.SegResNetVAE, transforms: Compose) -> tuple[int, ...]:
    """Refuse a training crop that differs from the VAE's ``input_image_size``, before training starts.

    MONAI sizes the VAE's dense layers from ``input_image_size``, so any other crop fails deep inside the first
    iteration with a reshape error. Returns the crop size.
    """
    size = tuple(int(s) for s in network.input_image_size)
    factor = 2 * required_divisor(network)  # the VAE branch down-samples the encoder endpoint once more
    if any(s % factor for s in size):
        raise ValueError(
            f"SegResNetVAE input_image_size {list(size)} must be divisible by {factor} "
            f"(2 ** len(blocks_down)) in every dimension: set --roi_size to such a size"
        )
    crops = [t for t in transforms.flatten().transforms if isinstance(t, _RANDOM_CROPS)]
    if not crops:
        names = ", ".join(c.__name__ for c in _RANDOM_CROPS)
        raise ValueError(f"the training transforms have no random crop ({names}); the VAE needs crops of a fixed size")
    for crop in crops:
        crop_size = tuple(int(s) for s in _spatial_size(crop))
        if crop_size != size:
            raise ValueError(
                f"training crop {list(crop_size)} ({type(crop).__name__}) differs from SegResNetVAE "
                f"input_image_size {list(size)}: the VAE branch only accepts crops of input_image_size. "
                "Set both with --roi_size"
            )
    return size


def _spatial_size(crop) -> Sequence[int]:
    for owner in (crop, getattr(crop, "cropper", None)):
        for attribute in ("spatial_size", "roi_size"):
            size = getattr(owner, attribute, None)
            if size is not None:
                return size
    raise ValueError(f"cannot read the crop size of {type(crop).__name__}")
