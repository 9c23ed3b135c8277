# Generated from bundles/template/scripts/sampling.py by scripts/generate_bundles.py: edit those, not this file.
"""Batches for epochs counted in iterations (``iterations_per_epoch``), in one pass of the data loader.

An epoch of ``iterations_per_epoch`` steps over a dataset of few cases (two brain heads make one batch) used to
end the data loader's pass after one batch; the trainer then started a new pass for every step, so only one loader
worker at a time prepared a batch, and on a GPU the step waited for the CPU augmentation of each batch in turn
(measured on an H200: 3.8 s per step, docs/recipe.md). :class:`EpochBatchSampler` yields the whole epoch's batches
from one iterator, so that every worker prepares batches ahead, while each batch is what a shuffling loader gave:
the cases of one pass over the sampler's order, cut into ``batch_size`` (the last one of a pass shorter unless
``drop_last``), pass after pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from itertools import chain, count, islice

from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[list[int]]):
    """The batches of one epoch: ``iterations`` batches of case indices, or one pass when ``iterations`` is 0.

    Args:
        sampler: the order of the cases in one pass (``RandomSampler``; a ``DistributedSampler`` for one process's
            shard, whose ``set_epoch`` is called with the pass count before each pass, so that passes differ; the
            count, ``passes``, is saved with the checkpoint by ``scripts.random_state.RandomState``).
        batch_size: cases per batch.
        iterations: batches per epoch; 0 or ``None``: one pass over ``sampler``.
        drop_last: leave out a pass's last batch when it is shorter than ``batch_size``.
    """

    def __init__(self, sampler: Sized, batch_size: int, iterations: int | None = 0, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.iterations = iterations or 0
        self.drop_last = drop_last
        self.passes = 0
        if self._batches_per_pass() == 0:
            raise ValueError(
                f"no batch of {batch_size} from {len(sampler)} case(s) with drop_last: lower the batch size or add cases"
            )

    def _batches_per_pass(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        return self.iterations or self._batches_per_pass()

    def _one_pass(self) -> Iterator[list[int]]:
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.passes)
        self.passes += 1
        order = list(self.sampler)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __iter__(self) -> Iterator[list[int]]:
        if not self.iterations:
            return self._one_pass()
        passes = chain.from_iterable(self._one_pass() for _ in count())
        return islice(passes, self.iterations)
