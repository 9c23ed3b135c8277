# Generated from bundles/template/scripts/data.py by scripts/generate_bundles.py: edit those, not this file.
"""Datalists for MSD-layout folders and MONAI datalist JSON files.

A user brings either an MSD folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``, optional ``imagesTs/``)
or a MONAI datalist JSON with ``training``/``validation``/``testing`` keys. Both are read with
:func:`monai.data.load_decathlon_datalist`, so relative paths resolve against ``base_dir``. Semi-supervised
training (:func:`semi_supervised_split`) also takes unlabelled images: ``training`` entries without a ``label``,
an ``unlabeled`` key, or a folder of image files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from monai.data import load_decathlon_datalist, partition_dataset

# Single-file image formats that an unlabelled-image folder may hold (MONAI reads them with nibabel or ITK).
IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def _read_json(datalist: str) -> dict:
    if not os.path.isfile(datalist):
        raise FileNotFoundError(
            f"datalist {datalist} does not exist: pass --dataset_dir with an MSD folder that holds dataset.json, "
            "or --datalist with a MONAI datalist JSON"
        )
    with open(datalist) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"datalist {datalist} is not valid JSON: {e}") from e


def _hold_out(
    datalist: str, content: dict, training: list[dict], base_dir: str, val_fraction: float, seed: int, cases: str
) -> dict[str, list[dict]]:
    """``training`` and the validation items: the datalist's ``validation`` key when it has one, else a seeded
    ``val_fraction`` of ``training`` (at least one case, at least one left for training). ``cases`` names the
    training cases in the refusal."""
    if content.get("validation"):
        return {"training": training, "validation": load_decathlon_datalist(datalist, True, "validation", base_dir)}
    if len(training) < 2:
        raise ValueError(f"datalist {datalist} has one {cases} case and no 'validation' key: add a second case")
    num_val = min(len(training) - 1, max(1, round(val_fraction * len(training))))
    train_part, val_part = partition_dataset(
        training, ratios=[len(training) - num_val, num_val], shuffle=True, seed=seed
    )
    return {"training": train_part, "validation": val_part}


def _image_files(folder: str) -> list[str]:
    """The image files in ``folder``, sorted; hidden files (macOS ``._*`` copies in MSD archives) are skipped."""
    names = [n for n in sorted(os.listdir(folder)) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    return [path for path in (os.path.join(folder, name) for name in names) if os.path.isfile(path)]


def split_datalist(datalist: str, base_dir: str, val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """Training and validation items of a datalist.

    The ``validation`` key is used when the file has one; otherwise a seeded ``val_fraction`` of ``training``
    (at least one case) is held out, so the split is the same on every rank and every run.

    Returns:
        ``{"training": [{"image": path, "label": path}, ...], "validation": [...]}``.
    """
    content = _read_json(datalist)
    if not content.get("training"):
        raise ValueError(f"datalist {datalist} has no 'training' cases")
    training = load_decathlon_datalist(datalist, True, "training", base_dir)
    return _hold_out(datalist, content, training, base_dir, val_fraction, seed, "training")


def semi_supervised_split(
    datalist: str, base_dir: str, val_fraction: float = 0.2, seed: int = 0, unlabeled_dir: str | None = None
) -> dict[str, list[dict]]:
    """Labelled training, validation and unlabelled items of a datalist, for semi-supervised training.

    Labelled cases are the ``training`` entries with a ``label``. Unlabelled images come from three places, in
    this order: ``training`` entries without a ``label`` (MSD layout), the datalist's ``unlabeled`` key (a list of
    ``{"image": path}``, paths relative to ``base_dir``), and every image file (.nii, .nii.gz, .nrrd, .mha, .mhd;
    sorted; hidden files skipped) in ``unlabeled_dir`` when that folder exists. An image listed twice (same
    resolved path) is kept once; an image that is also a labelled or validation case is dropped from the
    unlabelled ones. Validation is split off the labelled cases exactly as :func:`split_datalist` does. An empty
    ``unlabeled`` list is returned as is: whether that is an error is the caller's decision.

    Returns:
        ``{"training": [{"image", "label"}, ...], "validation": [...], "unlabeled": [{"image": path}, ...]}``.
    """
    content = _read_json(datalist)
    entries = content.get("unlabeled") or []
    if not all(isinstance(entry, dict) and "image" in entry for entry in entries):
        raise ValueError(f"datalist {datalist}: every 'unlabeled' entry must be a dict {{'image': path}}")
    training = load_decathlon_datalist(datalist, True, "training", base_dir) if content.get("training") else []
    labeled = [item for item in training if "label" in item]
    if not labeled:
        raise ValueError(
            f"datalist {datalist} has no labelled case: semi-supervised training needs 'training' entries with a "
            "'label' (at least one, two when there is no 'validation' key)"
        )
    split = _hold_out(datalist, content, labeled, base_dir, val_fraction, seed, "labelled training")
    candidates = [item["image"] for item in training if "label" not in item]
    if entries:
        candidates += [item["image"] for item in load_decathlon_datalist(datalist, False, "unlabeled", base_dir)]
    if unlabeled_dir and os.path.isdir(unlabeled_dir):
        candidates += _image_files(unlabeled_dir)
    seen = {os.path.realpath(str(item["image"])) for item in [*labeled, *split["validation"]]}
    unlabeled = []
    for image in candidates:
        resolved = os.path.realpath(str(image))
        if resolved not in seen:
            seen.add(resolved)
            unlabeled.append({"image": image})
    return {**split, "unlabeled": unlabeled}


def held_out_items(datalist: str, base_dir: str, key: str = "test") -> list[dict]:
    """Held-out items of a datalist (MSD's ``test`` or MONAI's ``testing``), each a dict with ``image``."""
    content = _read_json(datalist)
    keys = [k for k in (key, "test", "testing") if content.get(k)]
    if not keys:
        raise ValueError(f"datalist {datalist} has no '{key}' cases")
    return load_decathlon_datalist(datalist, False, keys[0], base_dir)


def evaluation_items(
    datalist: str, base_dir: str, split: str = "validation", val_fraction: float = 0.2, seed: int = 0
) -> list[dict]:
    """Labelled items to evaluate: ``"training"`` or ``"validation"`` as :func:`split_datalist` splits them, or
    ``"test"`` (held-out cases whose entries carry a ``label``)."""
    if split in ("training", "validation"):
        return split_datalist(datalist, base_dir, val_fraction, seed)[split]
    items = held_out_items(datalist, base_dir, split)
    unlabelled = [str(item["image"]) for item in items if "label" not in item]
    if unlabelled:
        raise ValueError(f"datalist {datalist}: '{split}' cases without a label cannot be evaluated: {unlabelled[:3]}")
    return items


def check_output_dir(output_dir: str, inputs: Sequence[dict], key: str = "image") -> str:
    """Refuse to write predictions into a folder that holds inputs or into a folder inside one, and refuse an
    empty input list.

    Predictions go into their own folder so that no input folder is ever written. Returns ``output_dir``.
    """
    if not inputs:
        raise ValueError(
            "no input images found: check --dataset_dir (inference reads <dataset_dir>/imagesTs) or --datalist"
        )
    out = os.path.realpath(output_dir)
    input_dirs = {os.path.dirname(os.path.realpath(str(item[key]))) for item in inputs}
    if out in input_dirs:
        raise ValueError(
            f"output_dir {output_dir} is an input folder: choose another --output_dir so inputs stay untouched"
        )
    inside = sorted(d for d in input_dirs if os.path.commonpath([out, d]) == d)
    if inside:
        raise ValueError(
            f"output_dir {output_dir} is inside the input folder {inside[0]}: choose another --output_dir so input "
            "folders stay untouched"
        )
    return output_dir


def read_class_names(
    datalist: str, class_names: Sequence[str] | None = None, metadata_file: str | None = None
) -> list[str]:
    """Class names in label-value order, from ``class_names`` if given, else from the datalist's ``labels``.

    MSD's ``labels`` maps label values to names: ``{"0": "background", "1": "tumour"}``. When the datalist file
    does not exist but ``metadata_file`` (the bundle's ``configs/metadata.json``) does, the names are the
    ``channel_def`` of its first ``network_data_format`` output: MONAI Label passes its datastore's items to the
    bundle directly, has no datalist, and shows exactly these labels for the bundle.
    """
    if class_names:
        return list(class_names)
    if metadata_file and not os.path.isfile(datalist) and os.path.isfile(metadata_file):
        return _metadata_class_names(metadata_file)
    labels = _read_json(datalist).get("labels")
    if not labels:
        raise ValueError(
            f"datalist {datalist} has no 'labels' mapping: add one (MSD style, {{'0': 'background', ...}}) "
            "or pass --class_names \"['background', 'organ']\""
        )
    values = sorted(int(v) for v in labels)
    if values != list(range(len(values))):
        raise ValueError(f"datalist {datalist}: label values {values} must be 0..N-1 without gaps")
    return [labels[str(v)] for v in values]


def _metadata_class_names(metadata_file: str) -> list[str]:
    """The ``channel_def`` of the first output in a bundle's metadata.json, in channel order."""
    with open(metadata_file) as f:
        outputs = json.load(f).get("network_data_format", {}).get("outputs", {})
    channel_def = next(iter(outputs.values()), {}).get("channel_def")
    if not channel_def:
        raise ValueError(
            f"{metadata_file}: its first network_data_format output has no channel_def, so the class names are "
            "unknown: add one ({'0': 'background', ...}) or pass --class_names \"['background', 'organ']\""
        )
    values = sorted(int(v) for v in channel_def)
    if values != list(range(len(values))):
        raise ValueError(f"{metadata_file}: channel_def indices {values} must be 0..N-1 without gaps")
    return [channel_def[str(v)] for v in values]
