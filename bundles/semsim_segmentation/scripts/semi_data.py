"""Semi-supervised data for SemSim: refusing a run that has no unlabelled images, and one iterable that pairs each
labelled batch with an unlabelled one for MONAI's ``SupervisedTrainer``.

The unlabelled images themselves come from ``scripts.data.semi_supervised_split`` (``training`` entries without a
``label``, an ``imagesUnlabeled/`` folder, or an ``unlabeled`` key in a datalist).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice

from torch.utils.data import DataLoader


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
            "in the datalist; or set the unlabelled loss weights to 0 for supervised-only training"
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

    MONAI's ``Workflow`` takes the epoch length from ``len()`` of an iterable that is not a ``DataLoader``, but sets
    the epoch of a ``DistributedSampler`` only on a ``DataLoader``; so this class calls ``sampler.set_epoch(n)``
    itself at the start of each pass, ``n`` counting that loader's passes from 0, and multi-GPU shuffles differ
    between passes. The count starts again at 0 in a resumed run.
    """

    def __init__(self, labeled: DataLoader, unlabeled: DataLoader | None = None, use_unlabeled: bool = True) -> None:
        if unlabeled is not None and not use_unlabeled and len(unlabeled) == 0:
            unlabeled = None
        self.use_unlabeled = use_unlabeled and unlabeled is not None
        self.loaders = {"labeled": labeled} if unlabeled is None else {"labeled": labeled, "unlabeled": unlabeled}
        for name, loader in self.loaders.items():
            if len(loader) == 0:
                raise ValueError(f"the {name} data loader has no batch: check its dataset and batch size")
        self._passes = dict.fromkeys(self.loaders, 0)

    def __len__(self) -> int:
        return max(len(loader) for loader in self.loaders.values())

    def _cycle(self, name: str) -> Iterator[dict]:
        """The loader's batches, pass after pass, setting the sampler's epoch before each pass."""
        loader = self.loaders[name]
        while True:
            set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
            if set_epoch is not None:
                set_epoch(self._passes[name])
            self._passes[name] += 1
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
