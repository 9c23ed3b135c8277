# Generated from bundles/template/scripts/plan.py by scripts/generate_bundles.py: edit those, not this file.
"""The plan step: settings from the data.

``python -m monai.bundle run plan --config_file configs/plan.json --meta_file configs/metadata.json --logging_file
configs/logging.conf --dataset_dir DIR`` reads the dataset's fingerprint and writes ``models/plan.json`` in the
bundle (never into the dataset folder); ``train.json`` reads it through :func:`load_plan` (its settings ids, such as
``spacing``, are ``$@plan['spacing']``, so a command-line override still wins).

The fingerprint comes from MONAI Auto3DSeg's :class:`~monai.apps.auto3dseg.DataAnalyzer` (spacing, shape and size
in mm of every labelled training case after reorientation to RAS; image intensities per label, label 0 being the
background, and the foreground as a whole; label frequencies), which takes about 2 s on two CPU cores for the three
``brain`` heads, plus the modality (``dataset.json`` ``modality`` or ``channel_names``, or ``--modality``; default MR)
and the device that will train (kind, memory, CPU cores).

The settings (:func:`make_settings`), every choice with its reason in the plan's ``why``:

- ``spacing``: the median spacing of the cases. On CPU it is coarsened (never refined) to a multiple of 0.25 mm so
  that the median case holds at most ``CPU_IMAGE_VOXELS`` voxels: a whole head then fits about one 64^3 crop
  (3 mm for the ``brain`` heads), which two cores train in minutes.
- ``roi_size`` (the training crop, also the sliding window): the median case's extent at that spacing rounded up
  to the backbone's divisor, capped per axis. CPU: at most 48 per axis. CUDA: crops as large as the device memory
  allows for ``batch_size`` x ``num_samples`` crops per step with AMP (``CUDA_BYTES_PER_VOXEL``), at least 96 per
  axis where the data is that large (the model zoo's 96^3 and more), at most 192.
- ``batch_size`` (volumes per step) and ``num_samples`` (crops per volume): CPU, as many crops as fit
  ``CPU_STEP_VOXELS`` per step; CUDA, 2 x 2.
- ``intensity_norm``, ``intensity``: CT is clipped at the foreground's 0.5 and 99.5 percentiles and z-scored with
  the foreground's mean and standard deviation (nnU-Net's CT scheme; ``intensity``: ``clip``, ``mean``, ``std``).
  MR is clipped at each image's own 0.5 and 99.5 percentiles and z-scored with the mean and standard deviation of
  the voxels above the image's Otsu threshold (``intensity``: ``percentiles``, ``zscore_over`` "foreground";
  ``scripts/intensity.py``). Not over non-zero voxels only: where the background is noise rather than zero (the
  ROBEX head) that puts the brain at about 1.6 instead of the training heads' 0.1-0.2 and nnU-Net's non-zero-region
  normalisation fails there. Not over the whole image (0.4.0): that ties a tissue's value to the share of the field
  of view the head fills (grey matter at z = 1.0-2.9 on the four MNI tissue slabs).
- ``iterations_per_epoch``, ``sw_batch_size``, ``sw_overlap``: 250 iterations (nnU-Net) on CUDA, 50 on CPU;
  sliding windows of the crop size, 4 at a time with 0.5 overlap on CUDA, 2 with 0.25 on CPU.
- ``init_filters``: SegResNet's first-level width (``backbones#segresnet#init_filters``), 16 on CUDA as in the
  model zoo, 8 on CPU, where it halves the cost of a step.
- ``keep_largest_component``: the classes whose every training label is one connected object (its largest
  connected component, full connectivity, holds at least ``SINGLE_OBJECT_SHARE`` of the class's voxels in every case
  that has the class; the fingerprint's ``largest_component_share``). Evaluation and inference keep only the
  largest component of these classes in a prediction (MONAI's ``KeepLargestConnectedComponentd``), as nnU-Net's
  post-processing does for single-object structures (nnU-Net decides it on cross-validation predictions; the plan
  decides it from the labels, before any training). On the ``brain`` task the brain mask is one object in every
  head (class 1 kept); on ``tissue`` grey and white matter fall apart into several pieces in a slab (none kept).

The cache (:func:`cache_settings`, keys ``cache``, ``cache_rate``, ``cache_gb``): every labelled case at the planned
spacing, padded to the crop, as float32 image channels and label (a semi-supervised bundle caches its unlabelled
images too: each counts as the mean labelled case's image), against half the host's available memory and most of
the free disk under the cache folder: all in memory, else all on disk, else a fitted share in memory, else
none (the cases are read from their files every epoch: slow, never killed for memory).

The plan refuses, naming the file: mixed modalities (CT and MR channels), spacings that differ by more than 10x
between cases, a dataset smaller than one crop, labels without any foreground.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImage
from scipy import ndimage

from .data import semi_supervised_split
from .memory import host_available_memory
from .settings import plain, write_settings

logger = logging.getLogger(__name__)

PLAN_VERSION = 1
# CPU: the median case at the planned spacing holds at most this many voxels (a whole head at 3 mm: 76x70x75).
CPU_IMAGE_VOXELS = 400_000
# CPU: at most 48 voxels per axis: four 48^3 crops (442k voxels) cost a SegResNet step a little less than two 64^3
# crops (524k) and give twice the crop positions per step (docs/recipe.md).
CPU_MAX_EDGE = 48
# CPU: crop voxels per optimiser step (four 48^3 crops).
CPU_STEP_VOXELS = 4 * 48**3
CPU_SPACING_STEP = 0.25
# SegResNet's first-level width: 16 on CUDA (the model zoo's), 8 on CPU, where a step with 16 costs about twice as
# much and 8 reaches the brain target in fewer minutes (docs/recipe.md).
CUDA_INIT_FILTERS = 16
CPU_INIT_FILTERS = 8
# CUDA: bytes per crop voxel of a training step with AMP (SegResNet, 16 filters: activations, gradients, Adam),
# of which a share CUDA_MEMORY_SHARE of the device memory is used.
CUDA_BYTES_PER_VOXEL = 2048
CUDA_MEMORY_SHARE = 0.6
CUDA_MIN_EDGE = 96
CUDA_MAX_EDGE = 192
# The sizes every crop is a multiple of, per backbone: SegResNet (4 levels) 8, UNet (4 strides) 16, SwinUNETR 32.
# 16 by default, so a plan made for SegResNet also suits UNet.
DIVISORS = {"segresnet": 16, "unet": 16, "swinunetr": 32}
# Spacings of one axis may differ at most this much between cases.
MAX_SPACING_RATIO = 10.0
MR_PERCENTILES = (0.5, 99.5)
# A class is one object when its largest connected component holds at least this share of its voxels in every
# training label (a few stray voxels of label noise allowed: the MNI brain mask has 6 components, the largest 99.99 %).
SINGLE_OBJECT_SHARE = 0.99
# The dataset cache may take this share of the host's available memory (the rest: the model, the loader workers'
# augmented crops, the validation outputs) and of the free disk under the cache folder.
CACHE_MEMORY_SHARE = 0.5
CACHE_DISK_SHARE = 0.8
CT_NAMES = ("CT",)
MR_NAMES = ("MR", "MRI", "T1", "T2", "FLAIR", "PD", "ADC", "DWI", "T1W", "T2W", "T1GD", "T1CE", "SWI", "BOLD")


class PlanError(ValueError):
    """The dataset cannot be planned for; the message names the file and what to do."""


def _read(datalist: str) -> dict:
    if not os.path.isfile(datalist):
        raise PlanError(f"datalist {datalist} does not exist: pass --dataset_dir with an MSD folder (dataset.json)")
    with open(datalist) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise PlanError(f"datalist {datalist} is not valid JSON: {e}") from e


def modality_of(datalist: str, content: Mapping, override: str | None = None) -> str:
    """``"CT"`` or ``"MR"``: ``override``, else the channels of ``content`` (``modality`` as in MSD, or nnU-Net's
    ``channel_names``), else MR. Channels of both kinds are refused."""
    if override:
        kind = str(override).upper()
        if kind not in ("CT", "MR"):
            raise PlanError(f"--modality {override!r}: use 'CT' or 'MR'")
        return kind
    channels = content.get("modality") or content.get("channel_names") or {}
    if isinstance(channels, str):
        channels = {"0": channels}
    kinds = {}
    for channel, name in dict(channels).items():
        upper = str(name).upper().replace("-", "").replace(" ", "")
        kinds[f"{channel}: {name}"] = "CT" if upper in CT_NAMES or upper.startswith("CT") else "MR"
    found = set(kinds.values())
    if len(found) > 1:
        raise PlanError(
            f"datalist {datalist} mixes modalities ({', '.join(f'{c} ({k})' for c, k in kinds.items())}): one "
            "intensity normalisation cannot suit CT and MR channels together; plan a dataset of one modality"
        )
    return found.pop() if found else "MR"


def labelled_cases(datalist: str, dataset_dir: str) -> list[dict]:
    """The labelled training cases of the datalist, with absolute paths."""
    content = _read(datalist)
    if not content.get("training"):
        raise PlanError(f"datalist {datalist} has no 'training' cases to plan from")
    cases = [c for c in load_decathlon_datalist(datalist, True, "training", dataset_dir) if "label" in c]
    if not cases:
        raise PlanError(f"datalist {datalist} has no labelled training case to plan from")
    return [{"image": str(c["image"]), "label": str(c["label"])} for c in cases]


def device_info(device: str | None = None, memory_gb: float | None = None) -> dict:
    """The device that will train: ``{"kind": "cuda"|"cpu", "name", "memory_gb", "cpu_count"}``. ``device`` and
    ``memory_gb`` override what is detected (a plan for another machine, and the tests of the CUDA branch)."""
    kind = str(device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    name, detected = "cpu", None
    if kind == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        name, detected = props.name, props.total_memory / 2**30
    elif kind == "cpu" and hasattr(os, "sysconf"):
        try:
            detected = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        except (ValueError, OSError):
            detected = None
    memory = memory_gb if memory_gb is not None else detected
    if kind == "cuda" and memory is None:
        raise PlanError("--device cuda without a CUDA device here: pass --device_memory_gb of the device to plan for")
    return {
        "kind": kind,
        "name": name,
        "memory_gb": None if memory is None else round(float(memory), 2),
        "cpu_count": cpus,
    }


def _analyse(cases: list[dict], dataset_dir: str, device: str) -> dict:
    """DataAnalyzer's statistics of ``cases``, written to a temporary folder (never into the dataset folder)."""
    from monai.apps.auto3dseg import DataAnalyzer

    with tempfile.TemporaryDirectory(prefix="plan_") as tmp:
        datalist = os.path.join(tmp, "datalist.json")
        with open(datalist, "w") as f:
            json.dump({"training": [{**c, "fold": 0} for c in cases]}, f)
        analyzer = DataAnalyzer(
            datalist,
            dataset_dir,
            output_path=os.path.join(tmp, "datastats.yaml"),
            device=device,
            worker=0,
            image_key="image",
            label_key="label",
        )
        return analyzer.get_all_case_stats("training")


def largest_component_shares(label_path: str) -> dict[int, float]:
    """Per class value > 0 present in the label file, the share of its voxels in its largest connected component
    (full connectivity: face, edge and corner neighbours, as ``KeepLargestConnectedComponentd``'s default)."""
    label = np.squeeze(np.asarray(LoadImage(image_only=True)(label_path)))
    structure = ndimage.generate_binary_structure(label.ndim, label.ndim)
    shares = {}
    for value in np.unique(label):
        if value <= 0:
            continue
        components, _ = ndimage.label(label == value, structure=structure)
        sizes = np.bincount(components.ravel())[1:]
        shares[int(value)] = float(sizes.max() / sizes.sum())
    return shares


def _first(value: Any) -> Any:
    """DataAnalyzer keeps a per-channel list of statistics: the first channel's."""
    return value[0] if isinstance(value, list) and value and isinstance(value[0], dict) else value


def _intensity(stats: Mapping) -> dict:
    stats = _first(stats)
    return {
        "mean": float(stats["mean"]),
        "std": float(stats["stdev"]),
        "min": float(stats["min"]),
        "max": float(stats["max"]),
        "p00_5": float(stats["percentile_00_5"]),
        "p99_5": float(stats["percentile_99_5"]),
    }


def fingerprint(
    datalist: str,
    dataset_dir: str,
    modality: str | None = None,
    device: str | None = None,
    device_memory_gb: float | None = None,
) -> dict:
    """The dataset's fingerprint: per case (RAS) spacing, shape, size in mm, foreground and background intensity
    percentiles; their medians; the foreground intensities over all cases; the label frequencies; the modality;
    and the device. Refuses spacings that differ by more than ``MAX_SPACING_RATIO`` between cases."""
    content = _read(datalist)
    kind = modality_of(datalist, content, modality)
    cases = labelled_cases(datalist, dataset_dir)
    dev = device_info(device, device_memory_gb)
    analyse_on = "cuda" if dev["kind"] == "cuda" and torch.cuda.is_available() else "cpu"
    stats = _analyse(cases, dataset_dir, analyse_on)
    per_case = []
    for case in stats["stats_by_cases"]:
        image = case["image_stats"]
        labels = case["label_stats"]["label"]
        per_case.append(
            {
                "image": case["image_filepath"],
                "label": case["label_filepath"],
                "channels": int(image["channels"]),
                "shape": [int(s) for s in image["shape"][0]],
                "spacing": [float(s) for s in image["spacing"]],
                "size_mm": [float(s) for s in image["sizemm"]],
                "foreground": _intensity(case["image_foreground_stats"]["intensity"]),
                "background": _intensity(labels[0]["image_intensity"]),
                "class_fractions": [float(label["foreground_percentage"]) for label in labels],
                "label_values": [int(v) for v in case["label_stats"]["labels"]],
                "largest_component_share": largest_component_shares(case["label_filepath"]),
            }
        )
    if not per_case:
        raise PlanError(f"datalist {datalist}: no training case could be analysed")
    spacings = np.array([c["spacing"] for c in per_case])
    for axis in range(spacings.shape[1]):
        low, high = int(spacings[:, axis].argmin()), int(spacings[:, axis].argmax())
        if spacings[high, axis] > MAX_SPACING_RATIO * spacings[low, axis]:
            raise PlanError(
                f"datalist {datalist}: spacing along axis {axis} differs by more than {MAX_SPACING_RATIO:g}x between "
                f"cases ({per_case[low]['image']}: {spacings[low, axis]:g} mm, {per_case[high]['image']}: "
                f"{spacings[high, axis]:g} mm): resample the outliers or leave them out"
            )
    label_values = sorted({v for c in per_case for v in c["label_values"]})
    foreground = stats["stats_summary"]["image_foreground_stats"]["intensity"]
    if not any(v > 0 for v in label_values):
        raise PlanError(f"datalist {datalist}: the training labels hold no foreground (label > 0) at all")
    num_labels = max(len(c["class_fractions"]) for c in per_case)
    fractions = [
        float(np.mean([c["class_fractions"][i] for c in per_case if i < len(c["class_fractions"])]))
        for i in range(num_labels)
    ]
    return {
        "datalist": os.path.abspath(datalist),
        "dataset_dir": os.path.abspath(dataset_dir),
        "modality": kind,
        "num_cases": len(per_case),
        "channels": per_case[0]["channels"],
        "spatial_dims": len(per_case[0]["shape"]),
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "median_size_mm": np.median([c["size_mm"] for c in per_case], axis=0).tolist(),
        "median_shape": np.median([c["shape"] for c in per_case], axis=0).tolist(),
        "foreground_intensity": _intensity(foreground),
        "label_values": label_values,
        "class_fractions": fractions,
        "device": dev,
        "cases": per_case,
    }


def _round_up(value: float, divisor: int) -> int:
    return max(divisor, int(math.ceil(value / divisor)) * divisor)


def _shape_at(size_mm: Sequence[float], spacing: Sequence[float]) -> list[int]:
    return [max(1, int(math.ceil(s / p))) for s, p in zip(size_mm, spacing)]


def _cpu_spacing(median: Sequence[float], size_mm: Sequence[float]) -> list[float]:
    """The median spacing, each axis coarsened to at least the smallest multiple of ``CPU_SPACING_STEP`` mm that
    brings the median case to ``CPU_IMAGE_VOXELS`` voxels or fewer."""
    floor = 0.0
    while math.prod(_shape_at(size_mm, [max(m, floor) for m in median])) > CPU_IMAGE_VOXELS:
        floor += CPU_SPACING_STEP
    return [round(max(m, floor), 4) for m in median]


def _cuda_crop(shape: Sequence[int], divisor: int, voxels: float) -> list[int]:
    """The largest crop within the image (rounded up to ``divisor``) and ``CUDA_MAX_EDGE`` that holds at most
    ``voxels`` voxels: the longest axis is shortened first, down to ``CUDA_MIN_EDGE`` (or the image) per axis."""
    crop = [min(_round_up(s, divisor), CUDA_MAX_EDGE) for s in shape]
    floor = [min(c, CUDA_MIN_EDGE) for c in crop]
    while math.prod(crop) > voxels:
        axis = max(
            (a for a in range(len(crop)) if crop[a] - divisor >= max(floor[a], divisor)),
            key=lambda a: crop[a],
            default=None,
        )
        if axis is None:
            break
        crop[axis] -= divisor
    return crop


def make_settings(fp: Mapping, backbone: str = "segresnet") -> tuple[dict, dict]:
    """The training, evaluation and inference settings for the fingerprint ``fp``, and why each was chosen."""
    divisor = DIVISORS.get(backbone, 32)
    dev = fp["device"]
    cuda = dev["kind"] == "cuda"
    median, size_mm = fp["median_spacing"], fp["median_size_mm"]
    why: dict[str, str] = {}
    if cuda:
        spacing = [round(float(m), 4) for m in median]
        why["spacing"] = "the cases' median spacing"
    else:
        spacing = _cpu_spacing(median, size_mm)
        why["spacing"] = (
            f"the cases' median spacing {plain(median)}, coarsened on CPU so that the median case "
            f"holds at most {CPU_IMAGE_VOXELS} voxels"
        )
    shape = _shape_at(size_mm, spacing)
    largest = max(math.prod(_shape_at(c["size_mm"], spacing)) for c in fp["cases"])
    if largest < divisor ** len(shape):
        raise PlanError(
            f"datalist {fp['datalist']}: the dataset is smaller than one crop: its largest case holds {largest} "
            f"voxels at {spacing} mm, fewer than the smallest crop {[divisor] * len(shape)}"
        )
    if cuda:
        budget = dev["memory_gb"] * 2**30 * CUDA_MEMORY_SHARE / CUDA_BYTES_PER_VOXEL
        for batch_size, num_samples in ((2, 2), (2, 1), (1, 1)):  # fewer crops per step before crops below 96
            roi = _cuda_crop(shape, divisor, budget / (batch_size * num_samples))
            if math.prod(roi) * batch_size * num_samples <= budget:
                break
        why["roi_size"] = (
            f"the median case ({shape} voxels) within {CUDA_MIN_EDGE}-{CUDA_MAX_EDGE} per axis and "
            f"{dev['memory_gb']} GB x {CUDA_MEMORY_SHARE} at {CUDA_BYTES_PER_VOXEL} bytes per voxel "
            "(AMP)"
        )
        iterations, sw_batch_size, sw_overlap = 250, 4, 0.5
        init_filters = CUDA_INIT_FILTERS
    else:
        roi = [min(_round_up(s, divisor), CPU_MAX_EDGE) for s in shape]
        crops = max(1, CPU_STEP_VOXELS // math.prod(roi))
        batch_size = max(1, min(crops, fp["num_cases"], 2))
        num_samples = max(1, math.ceil(crops / batch_size))
        why["roi_size"] = f"the median case ({shape} voxels) rounded up to {divisor}, at most {CPU_MAX_EDGE} per axis"
        iterations, sw_batch_size, sw_overlap = 50, 2, 0.25
        init_filters = CPU_INIT_FILTERS
    why["init_filters"] = f"SegResNet's first-level width on {dev['kind']}"
    single_objects = single_object_classes(fp["cases"])
    why["keep_largest_component"] = (
        f"classes whose largest connected component holds at least {SINGLE_OBJECT_SHARE:.0%} of their voxels in "
        "every training label: only their largest component is kept in a prediction"
    )
    why["batch_size"] = f"{batch_size} volumes x {num_samples} crops per step"
    if fp["modality"] == "CT":
        fg = fp["foreground_intensity"]
        intensity = {"clip": [fg["p00_5"], fg["p99_5"]], "mean": fg["mean"], "std": max(fg["std"], 1e-6)}
        why["intensity_norm"] = "CT: clipped at the foreground's 0.5/99.5 percentiles, z-scored with its mean and std"
    else:
        intensity = {"percentiles": list(MR_PERCENTILES), "zscore_over": "foreground"}
        why["intensity_norm"] = (
            "MR: clipped at each image's own 0.5/99.5 percentiles and z-scored over the voxels above its Otsu "
            "threshold, which holds up where the background is noise rather than zero and whatever share of the "
            "field of view the head fills"
        )
    settings = {
        "spatial_dims": fp["spatial_dims"],
        "in_channels": fp["channels"],
        "spacing": spacing,
        "roi_size": roi,
        "batch_size": batch_size,
        "num_samples": num_samples,
        "intensity_norm": fp["modality"].lower(),
        "intensity": intensity,
        "iterations_per_epoch": iterations,
        "sw_batch_size": sw_batch_size,
        "sw_overlap": sw_overlap,
        "amp": cuda,
        "init_filters": init_filters,
        "keep_largest_component": single_objects,
    }
    return settings, why


def single_object_classes(cases: Sequence[Mapping]) -> list[int]:
    """The class values whose largest connected component holds at least ``SINGLE_OBJECT_SHARE`` of their voxels
    in every case of the fingerprint ``cases`` that has them (``largest_component_share``)."""
    shares: dict[int, list[float]] = {}
    for case in cases:
        for value, share in case["largest_component_share"].items():
            shares.setdefault(int(value), []).append(share)
    return sorted(value for value, found in shares.items() if min(found) >= SINGLE_OBJECT_SHARE)


def _cached_bytes(case: Mapping, spacing: Sequence[float], roi: Sequence[int], channels: int) -> int:
    """Bytes one case takes in a cache: its image channels and label as float32 (what ``LoadImaged`` makes) on the
    grid at ``spacing``, padded to at least ``roi`` (train.json's ``SpatialPadd``)."""
    shape = [max(s, r) for s, r in zip(_shape_at(case["size_mm"], spacing), roi)]
    return (channels + 1) * math.prod(shape) * 4


def _free_disk(folder: str) -> int:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent)."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def cache_settings(
    fp: Mapping,
    settings: Mapping,
    host_memory_gb: float | None = None,
    disk_free_gb: float | None = None,
    cache_dir: str = ".",
    unlabeled_images: int = 0,
    processes_per_node: int = 1,
) -> tuple[dict, dict]:
    """How train.json caches the cases (``scripts/caching.py``): ``{"cache": "memory"|"disk"|"none",
    "cache_rate", "cache_gb"}`` and why. The size of every labelled case at the planned spacing and crop
    (:func:`_cached_bytes`; the datalist's ``validation`` cases at the mean size) against ``CACHE_MEMORY_SHARE``
    of the host's available memory (``host_memory_gb``, else measured now) and ``CACHE_DISK_SHARE`` of the free
    disk under ``cache_dir`` (``disk_free_gb``, else measured): all in memory; else all on disk; else the share
    that fits in memory (a fitted ``cache_rate``); else no cache (every case read from its files every epoch).
    ``unlabeled_images``: how many unlabelled images a semi-supervised bundle caches at the same rate; each counts
    as the mean case without its label. ``processes_per_node``: the training processes that share the host (one per
    GPU under torchrun); each holds its own memory cache of every case, so the memory share is divided among them,
    while the disk cache is one folder that they share."""
    sizes = [_cached_bytes(c, settings["spacing"], settings["roi_size"], fp["channels"]) for c in fp["cases"]]
    mean = sum(sizes) // len(sizes)
    # a datalist's own 'validation' cases are cached too, each taken as large as the mean training case
    extra = len(_read(fp["datalist"]).get("validation") or [])
    sizes += [mean] * extra + [mean * fp["channels"] // (fp["channels"] + 1)] * unlabeled_images
    total = sum(sizes)
    available = host_memory_gb * 2**30 if host_memory_gb is not None else host_available_memory()
    memory = available * CACHE_MEMORY_SHARE / processes_per_node
    disk = (disk_free_gb * 2**30 if disk_free_gb is not None else _free_disk(cache_dir)) * CACHE_DISK_SHARE
    gb = round(total / 2**30, 6)
    budget = f"{memory / 2**30:.3g} GB of memory ({CACHE_MEMORY_SHARE:g} of the available"
    budget += f", shared by {processes_per_node} processes per node)" if processes_per_node > 1 else ")"
    if total <= memory:
        cache, rate, why = "memory", 1.0, f"the {len(sizes)} cases ({gb} GB at the planned spacing) fit {budget}"
    elif total <= disk:
        cache, rate = "disk", 0.0
        why = f"the {len(sizes)} cases ({gb} GB) exceed {budget} but fit {disk / 2**30:.3g} GB of disk in {cache_dir}"
    elif memory >= min(sizes):
        cache, rate = "memory", math.floor(100 * memory / total) / 100
        why = f"the {len(sizes)} cases ({gb} GB) fit neither {budget} nor the disk: a share of {rate:g} is cached"
    else:
        cache, rate = "none", 0.0
        why = f"not one of the {len(sizes)} cases ({gb} GB) fits {budget} or the disk: read from the files"
    return {"cache": cache, "cache_rate": rate, "cache_gb": gb}, {"cache": why}


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def write_plan(
    datalist: str,
    dataset_dir: str,
    plan_file: str,
    modality: str | None = None,
    device: str | None = None,
    device_memory_gb: float | None = None,
    backbone: str = "segresnet",
    host_memory_gb: float | None = None,
    disk_free_gb: float | None = None,
    cache_dir: str = ".",
    unlabeled_dir: str | None = None,
    processes_per_node: int | None = None,
) -> dict:
    """Fingerprint the dataset, choose the settings and the cache (:func:`cache_settings`: ``host_memory_gb``,
    ``disk_free_gb`` override what is measured) and write them to ``plan_file`` (atomically; refused inside the
    dataset folder or the datalist's folder). Returns the plan. ``unlabeled_dir``: a semi-supervised bundle's
    folder of unlabelled images; its unlabelled images (``scripts.data.semi_supervised_split``) are cached beside
    the labelled cases and counted in the cache's size (None: a supervised bundle, none cached).
    ``processes_per_node``: the training processes per host (:func:`cache_settings`); default one per visible GPU
    when planning for CUDA, else one. Recorded in the fingerprint's ``device``."""
    for folder in {dataset_dir, os.path.dirname(os.path.abspath(datalist))}:
        if _inside(plan_file, folder):
            raise PlanError(
                f"plan file {plan_file} is inside the dataset folder {folder}: the plan never writes into the "
                "dataset; set --plan_file elsewhere (default: <bundle_root>/models/plan.json)"
            )
    fp = fingerprint(datalist, dataset_dir, modality, device, device_memory_gb)
    settings, why = make_settings(fp, backbone)
    unlabeled = []
    if unlabeled_dir is not None:
        unlabeled = semi_supervised_split(datalist, dataset_dir, unlabeled_dir=unlabeled_dir)["unlabeled"]
    if processes_per_node is None:
        processes_per_node = max(1, torch.cuda.device_count()) if fp["device"]["kind"] == "cuda" else 1
    if processes_per_node < 1:
        raise PlanError(f"processes_per_node {processes_per_node}: give the training processes per node, 1 or more")
    fp["device"]["processes_per_node"] = processes_per_node
    cache, cache_why = cache_settings(
        fp, settings, host_memory_gb, disk_free_gb, cache_dir, len(unlabeled), processes_per_node
    )
    settings.update(cache)
    why.update(cache_why)
    logger.info(f"plan: cache {cache['cache']}, cache_rate {cache['cache_rate']}: {cache_why['cache']}")
    plan = {
        "plan_version": PLAN_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backbone": backbone,
        "settings": settings,
        "why": why,
        "fingerprint": fp,
    }
    write_settings(plan_file, plan)
    logger.info(f"plan written to {plan_file}: {json.dumps(plain(settings))}")
    return plan


def load_plan(path: str, defaults: Mapping, datalist: str | None = None) -> dict:
    """The settings of the plan at ``path`` over ``defaults`` (the bundle's shipped settings, used as they are when
    there is no plan). With ``datalist``, a plan made for another datalist is refused, naming both."""
    settings = dict(plain(defaults))
    if not os.path.isfile(path):
        return settings
    with open(path) as f:
        try:
            plan = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan {path} is not valid JSON ({e}): run the plan step again") from e
    planned_for = plan.get("fingerprint", {}).get("datalist")
    if datalist and planned_for and os.path.realpath(planned_for) != os.path.realpath(datalist):
        raise ValueError(
            f"plan {path} was made for {planned_for}, but this run reads {datalist}: run the plan step on this "
            "dataset (run id 'plan', configs/plan.json), or pass --plan_file of its plan"
        )
    planned = plan.get("settings", {})
    intensity = {**settings.get("intensity", {}), **planned.get("intensity", {})}  # both modalities' parameters
    return {**settings, **planned, "intensity": intensity}
