"""Semi-supervised data for SemSim: refusing a run that has no unlabelled images, and one iterable that pairs each
labelled batch with an unlabelled one for MONAI's ``SupervisedTrainer``.

The unlabelled images themselves come from ``scripts.data.semi_supervised_split`` (``training`` entries without a
``label``, an ``imagesUnlabeled/`` folder, or an ``unlabeled`` key in a datalist), or, without a datalist (MONAI
Label), from the folders of the labelled images (:func:`datastore_unlabeled`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from itertools import islice

from torch.utils.data import DataLoader

from .data import _image_files, semi_supervised_split

logger = logging.getLogger(__name__)


def datastore_unlabeled(labeled: Sequence[dict], validation: Sequence[dict] = ()) -> list[dict]:
    """The unlabelled images of a MONAI Label datastore: every image file in the folders that hold the labelled and
    validation images, except those images themselves; folder by folder in first-seen order, files sorted.

    MONAI Label's local datastore keeps every image, labelled or not, in one studies folder (its labels apart, under
    ``labels/final``) and gives a bundle's training only the labelled ones, as ``train#dataset#data`` and
    ``validate#dataset#data``; the other images beside them are the unlabelled pool. Images are compared by
    resolved path, and the file types are those of an ``imagesUnlabeled/`` folder (.nii, .nii.gz, .nrrd, .mha, .mhd).

    Returns:
        ``[{"image": path}, ...]``.
    """
    cases = [str(item["image"]) for item in [*labeled, *validation]]
    taken = {os.path.realpath(image) for image in cases}
    folders = dict.fromkeys(os.path.dirname(os.path.realpath(image)) for image in cases)
    unlabeled = []
    for folder in folders:
        for image in _image_files(folder):
            if os.path.realpath(image) not in taken:
                taken.add(os.path.realpath(image))
                unlabeled.append({"image": image})
    return unlabeled


def unlabeled_pool(
    datalist: str,
    base_dir: str,
    labeled: Sequence[dict],
    validation: Sequence[dict],
    val_fraction: float = 0.2,
    seed: int = 0,
    unlabeled_dir: str | None = None,
) -> list[dict]:
    """The unlabelled images SemSim trains on.

    With a datalist file, those it gives (``scripts.data.semi_supervised_split`` with the same seeded split as the
    labelled items). Without one, the training items were given directly, as MONAI Label does with its datastore's
    labelled images: then the other images in their folders (:func:`datastore_unlabeled`).

    Args:
        datalist, base_dir, val_fraction, seed, unlabeled_dir: as for ``semi_supervised_split``.
        labeled, validation: the labelled training and validation items the run trains and validates on.
    """
    if os.path.isfile(datalist):
        return semi_supervised_split(datalist, base_dir, val_fraction, seed, unlabeled_dir)["unlabeled"]
    pool = datastore_unlabeled(labeled, validation)
    folders = sorted({os.path.dirname(str(item["image"])) for item in [*labeled, *validation]})
    logger.info(
        f"no datalist {datalist}: the unlabelled pool is the {len(pool)} other image(s) in {folders}, the folder(s) "
        f"of the {len(labeled)} labelled training and {len(validation)} validation image(s)"
    )
    return pool


def require_unlabeled(items: Sequence[dict], datalist: str, weights: Sequence[float]) -> list[dict]:
    """Refuse semi-supervised training without unlabelled images.

    Args:
        items: the unlabelled ``{"image": path}`` items.
        datalist: the datalist they were read from, named in the refusal.
        weights: the weights of the losses on unlabelled data (SemSim's lambda_u, lambda_intra, lambda_cross);
            with all of them 0 the run is supervised-only and needs no unlabelled image.

    Returns:
        ``items`` as a list.
    """
    if not items and any(weight != 0 for weight in weights):
        raise ValueError(
            f"datalist {datalist} gives no unlabelled image, but the unlabelled loss weights {list(weights)} are not "
            "all 0. Provide unlabelled images in one of three ways: MSD 'training' entries without a 'label', image "
            "files in an imagesUnlabeled/ folder of the dataset folder, or an 'unlabeled' list of {'image': path} "
            "in the datalist (under MONAI Label: images without a label in the datastore); or set the unlabelled loss "
            "weights to 0 for supervised-only training"
        )
    return list(items)


class SemiSupervisedLoader:
    """The batches of one epoch of semi-supervised training: each labelled batch merged with an unlabelled one.

    An epoch has ``max(len(labeled), len(unlabeled))`` steps; the shorter loader is iterated again when it runs
    out (a new pass, so a shuffling loader reshuffles), and both start a new pass at every epoch. Each step yields
    ``{**labeled_batch, **unlabeled_batch}``: the unlabelled transforms must write keys of their own
    ("unlabeled_image", "unlabeled_strong1", "unlabeled_strong2"), a key in both batches is refused. With
    ``unlabeled=None`` an epoch is the labelled loader's batches. With ``use_unlabeled=False`` (supervised-only
    training, all unlabelled weights 0) only labelled batches are yielded, but for as many steps as the
    semi-supervised epoch, so that both arms of a comparison take the same number of optimiser steps; an empty
    unlabelled loader is then ignored.

    MONAI's ``Workflow`` takes the epoch length from ``len()`` of an iterable that is not a ``DataLoader``. The
    bundle's loaders draw their batches with ``scripts.sampling.EpochBatchSampler``, which sets the epoch of a
    ``DistributedSampler`` before each of its passes, so multi-GPU shuffles differ between passes here too.
    """

    def __init__(self, labeled: DataLoader, unlabeled: DataLoader | None = None, use_unlabeled: bool = True) -> None:
        if unlabeled is not None and not use_unlabeled and len(unlabeled) == 0:
            unlabeled = None
        self.use_unlabeled = use_unlabeled and unlabeled is not None
        self.loaders = {"labeled": labeled} if unlabeled is None else {"labeled": labeled, "unlabeled": unlabeled}
        for name, loader in self.loaders.items():
            if len(loader) == 0:
                raise ValueError(f"the {name} data loader has no batch: check its dataset and batch size")

    def __len__(self) -> int:
        return max(len(loader) for loader in self.loaders.values())

    def _cycle(self, name: str) -> Iterator[dict]:
        """The loader's batches, pass after pass."""
        loader = self.loaders[name]
        while True:
            yield from loader

    def __iter__(self) -> Iterator[dict]:
        if not self.use_unlabeled:
            yield from islice(self._cycle("labeled"), len(self))
            return
        for labeled, unlabeled in islice(zip(self._cycle("labeled"), self._cycle("unlabeled")), len(self)):
            shared = sorted(labeled.keys() & unlabeled.keys())
            if shared:
                raise ValueError(
                    f"the unlabelled batch has keys {shared} that the labelled batch has too: the unlabelled "
                    "transforms must write only keys of their own (unlabeled_image, unlabeled_strong1, "
                    "unlabeled_strong2), e.g. copy 'image' with CopyItemsd and drop it with DeleteItemsd"
                )
            yield {**labeled, **unlabeled}
