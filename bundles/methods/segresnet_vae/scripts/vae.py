"""SegResNet with VAE regularisation (Myronenko, "3D MRI brain tumor segmentation using autoencoder
regularization", BraTS 2018, arXiv 1810.11654): the network's training outputs and the paper's VAE terms.

MONAI's :class:`monai.networks.nets.SegResNetVAE` returns one merged ``vae_loss`` with weights 1 and 1 and a KL
averaged over the latent dimensions. The paper weights the L2 and KL terms by 0.1 each and normalises the KL by
the number of image voxels. To log and weight the terms separately, :class:`SegResNetVAE` returns the latent mean,
the latent standard deviation and the reconstruction (:class:`VAEOutputs`) beside the logits, and
:class:`VAERegulariser` computes the paper's two terms from them for the template's ``RegularisedLoss``, which
weights each by its own weight (``l2_weight``, ``kl_weight``) and adds them to the segmentation loss (``seg_loss``:
the paper's soft Dice).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from monai.networks import nets
from monai.transforms import (
    Compose,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandSpatialCropd,
    RandSpatialCropSamplesd,
)

from .backbones import required_divisor


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
    layers are sized from it. With ``vae_estimate_std=False`` the latent sigma is the constant ``vae_default_std``
    and the layer that would estimate it, ``vae_fc2``, is not kept: MONAI builds it anyway and never uses it, and
    DistributedDataParallel (without ``find_unused_parameters``) fails on a parameter that gets no gradient. A
    checkpoint of this network from before holds ``vae_fc2`` weights that were never trained; they are ignored.

    ``settings``: the SegResNet arguments a trained model recorded (``models/model_settings.json``, which
    evaluate.json passes as ``network_settings``), over the other arguments.

    ``vae_branch=False`` (the config sets it when both VAE weights are 0: the plain SegResNet baseline) keeps no VAE
    module at all, for the same reason: the training forward returns the logits alone, and the state dict is a
    SegResNet's.
    """

    def __init__(
        self,
        input_image_size: Sequence[int],
        vae_branch: bool = True,
        settings: Mapping[str, Any] | None = None,
        **kwargs,
    ) -> None:
        kwargs = {**kwargs, **(settings or {})}
        super().__init__(input_image_size=input_image_size, **kwargs)
        self._segresnet_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("vae_")}
        self.vae_branch_enabled = vae_branch
        unused = [] if vae_branch else [n for n in _VAE_MODULES if n != "vae_fc2"]
        if not self.vae_estimate_std or not vae_branch:
            unused.append("vae_fc2")  # sigma is vae_default_std (see the class docstring)
        for name in unused:
            setattr(self, name, None)
        self._unused_modules = tuple(unused)
        if unused:
            self._register_load_state_dict_pre_hook(self._drop_unused_modules)

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
        if not self.training:
            return nets.SegResNet.forward(self, x)
        if not self.vae_branch_enabled:
            return nets.SegResNet.forward(self, x)
        encoded, down_x = self.encode(x)
        down_x.reverse()
        # The VAE branch first: its decoder re-runs the segmentation decoder's up_samples and up_layers (MONAI shares
        # them), so forward hooks on those modules (SelfReg's feature taps, stacked on this network) keep the
        # segmentation pass, which runs last. Nothing in the decoder is random, so the order changes no value.
        outputs = self.vae_branch(x, encoded)
        return self.decode(encoded, down_x), outputs

    def vae_branch(self, image: torch.Tensor, encoded: torch.Tensor) -> VAEOutputs:
        """MONAI's ``SegResNetVAE._get_vae_loss`` up to the reconstruction, keeping mu, sigma and the reconstruction
        instead of merging them into one loss (a test checks it against MONAI's loss)."""
        x = self.vae_down(encoded).view(-1, self.vae_fc1.in_features)
        mu = self.vae_fc1(x)
        if self.vae_estimate_std:
            sigma = F.softplus(self.vae_fc2(x))
        else:
            sigma = torch.full_like(mu, self.vae_default_std)
        z = mu + sigma * torch.randn_like(mu)
        x = self.act_mod(self.vae_fc3(z)).view([-1, self.smallest_filters, *self.fc_insize])
        x = self.vae_fc_up_sample(x)
        for up, upl in zip(self.up_samples, self.up_layers):
            x = upl(up(x))
        return VAEOutputs(image=image, reconstruction=self.vae_conv_final(x), mu=mu, sigma=sigma)

    def _drop_unused_modules(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Drop the weights of modules this network does not keep (``vae_fc2``, never trained with a constant sigma)
        from a checkpoint written before. A load-time pre-hook, so that it also runs through a DDP wrapper's load."""
        unused = tuple(f"{prefix}{name}." for name in self._unused_modules)
        for key in [k for k in state_dict if k.startswith(unused)]:
            del state_dict[key]


_VAE_MODULES = ("vae_down", "vae_fc1", "vae_fc2", "vae_fc3", "vae_fc_up_sample", "vae_conv_final")


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


class VAERegulariser(torch.nn.Module):
    """The paper's VAE terms as a regulariser of :class:`scripts.losses.RegularisedLoss`: ``{"l2": L_L2, "kl":
    L_KL}`` (Eqs. 2-3) from the :class:`VAEOutputs` that :class:`SegResNetVAE` returns beside the logits in training.

    The paper weights the two terms separately (Eq. 1: L = L_dice + 0.1 L_L2 + 0.1 L_KL), so the config gives this
    regulariser one weight per term, ``"regulariser_weights#vae": {"l2": "@l2_weight", "kl": "@kl_weight"}``; they
    are logged as ``vae_l2`` and ``vae_kl``.
    """

    def forward(self, logits: torch.Tensor, label: torch.Tensor, extras: VAEOutputs | None) -> dict[str, torch.Tensor]:
        if not isinstance(extras, VAEOutputs):
            raise TypeError(
                "the VAE regulariser needs the training output (logits, VAEOutputs) of "
                f"scripts.vae.SegResNetVAE as network_def, got extras of type {type(extras).__name__}"
            )
        return {"l2": vae_l2(extras), "kl": vae_kl(extras)}


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
