"""The training and validation datasets, cached as the plan chose: in memory, on disk, or not at all.

The plan (:func:`scripts.plan.cache_settings`) chooses ``cache`` from the dataset's size at the planned spacing and
the memory and disk available; ``train.json`` builds both datasets with :func:`cached_dataset`:

- ``"memory"``: :class:`~monai.data.CacheDataset` keeps the first ``cache_rate`` of the cases after the
  deterministic transforms (loading, orientation, spacing, intensity, padding); the rest are prepared every epoch.
- ``"disk"``: :class:`~monai.data.PersistentDataset` writes each case's deterministic result once under
  ``cache_dir/<key>`` and reads it back every epoch. ``key`` is a hash of the settings those transforms depend on,
  so a new plan (another spacing) never reads the old plan's files; the file names also hash the deterministic
  transforms' names.
- ``"none"``: :class:`~monai.data.Dataset`: every case is read from its files every epoch; slow, but a dataset of
  any size trains in the memory of the cases a step needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence

from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import json_hashing

logger = logging.getLogger(__name__)

CACHE_MODES = ("memory", "disk", "none")


def cache_key(settings: Mapping) -> str:
    """16 hex digits of the SHA-256 of ``settings`` as sorted JSON: the name of one plan's disk cache folder."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_dataset(
    data: Sequence[Mapping],
    transform: Callable,
    cache: str,
    cache_rate: float,
    cache_dir: str,
    key_settings: Mapping,
    num_workers: int = 0,
    name: str = "dataset",
) -> Dataset:
    """``data`` with ``transform``, cached as ``cache`` says (see the module's docstring); logged with ``name``."""
    if cache == "memory":
        dataset: Dataset = CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers)
        where = f"cached in memory (cache_rate {cache_rate})"
    elif cache == "disk":
        folder = os.path.join(cache_dir, cache_key(key_settings))
        # track_meta: the cached tensors keep their MetaTensor meta (affine, file name), as a CacheDataset's do;
        # torch.load's weights_only refuses MetaTensors (MONAI 1.6 then deletes and recomputes the file every time),
        # so the files, which this bundle wrote in its own folder, are unpickled in full
        # hash_transform: the file names also change with the list of deterministic transforms (MONAI hashes their
        # class names when, as here, their arguments are not JSON), so editing that list never reads stale files
        dataset = PersistentDataset(
            data, transform, cache_dir=folder, hash_transform=json_hashing, track_meta=True, weights_only=False
        )
        where = f"cached on disk in {folder}"
    elif cache == "none":
        dataset = Dataset(data, transform)
        where = "read from its files every epoch (no cache)"
    else:
        raise ValueError(f"cache {cache!r}: use one of {CACHE_MODES} (train.json 'cache', or the plan's settings)")
    logger.info(f"{name}: {len(data)} cases, {where}")
    return dataset
