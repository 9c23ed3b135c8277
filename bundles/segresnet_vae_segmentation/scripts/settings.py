# Generated from bundles/template/scripts/settings.py by scripts/generate_bundles.py: edit those, not this file.
"""Settings that travel with the model: what a trained ``models/model.pt`` needs to be used.

Training writes ``model_settings.json`` next to ``model.pt`` (rank 0, atomically, each time ``model.pt`` is saved,
through :class:`scripts.checkpoints.AtomicCheckpointSaver`): class names, input channels, spatial dimensions,
orientation, spacing, intensity normalisation, training crop, sliding-window settings, backbone and the network's
constructor arguments. ``evaluate.json`` and ``inference.json`` read it (:func:`read_model_settings`), so a model
trained on a user's own classes is used with ``--dataset_dir`` and ``--output_dir`` alone, and refuse a
command-line override that contradicts it (:func:`check_settings`), naming both values.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from .safe_io import replacing

logger = logging.getLogger(__name__)

SETTINGS_FILENAME = "model_settings.json"
# Settings that must equal the recorded ones: a model sees its inputs only as it was trained to. The crop and the
# sliding-window settings may differ at inference (a fully convolutional network takes other window sizes).
BINDING = (
    "class_names",
    "in_channels",
    "spatial_dims",
    "orientation",
    "spacing",
    "intensity_norm",
    "intensity",
    "backbone",
)


def settings_path(checkpoint: str) -> str:
    """``model_settings.json`` in the folder of ``checkpoint`` (``models/model.pt``)."""
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), SETTINGS_FILENAME)


def plain(value: Any) -> Any:
    """``value`` as JSON data: tuples, tensors and numpy numbers become lists and Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def network_settings(networks: Mapping[str, Any], name: str, settings: Mapping | None = None) -> dict:
    """The constructor of the backbone ``name`` in the configs' ``backbones`` (a ``functools.partial``, built with
    ``_mode_: callable``) and its arguments, with ``settings`` (recorded arguments) applied:
    ``{"class": "monai.networks.nets.segresnet.SegResNet", "kwargs": {...}}``."""
    network = networks.get(name)
    if not isinstance(network, partial):
        return {}
    kwargs = {**network.keywords, **(settings or {})}
    return {"class": f"{network.func.__module__}.{network.func.__qualname__}", "kwargs": plain(kwargs)}


def write_settings(path: str, settings: Mapping) -> str:
    """Write ``settings`` as JSON to ``path`` through :func:`replacing` (a reader never sees a partial file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as partial_path, open(partial_path, "w") as f:
        json.dump(plain(settings), f, indent=2)
        f.write("\n")
    return path


def read_model_settings(path: str, defaults: Mapping | None = None) -> dict:
    """The recorded settings of the model whose ``model_settings.json`` is ``path``, over ``defaults`` (the
    bundle's shipped settings, used as they are when nothing was recorded: a model trained before settings were
    recorded, or the shipped demo model)."""
    recorded: dict = {}
    if os.path.isfile(path):
        with open(path) as f:
            try:
                recorded = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path} is not valid JSON ({e}): retrain, or remove it to use the shipped settings"
                ) from e
        if not isinstance(recorded, dict):
            raise ValueError(f"{path} holds a {type(recorded).__name__}, not the settings of a model")
    return {**plain(defaults or {}), **recorded}


def _same(a: Any, b: Any) -> bool:
    a, b = plain(a), plain(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


# The intensity parameters each normalisation uses (the others are carried along unused).
INTENSITY_KEYS = {"mr": ("percentiles", "zscore_over"), "ct": ("clip", "mean", "std")}


def _relevant_intensity(settings: dict) -> dict:
    keys = INTENSITY_KEYS.get(str(settings.get("intensity_norm")))
    if keys and isinstance(settings.get("intensity"), Mapping):
        settings["intensity"] = {k: v for k, v in settings["intensity"].items() if k in keys}
    return settings


def check_settings(path: str, used: Mapping[str, Any], keys: tuple[str, ...] = BINDING) -> dict:
    """Refuse settings that contradict the ones recorded with the model (``path``, its ``model_settings.json``),
    naming the setting, both values and the file; nothing is checked when the model has no record. Returns
    ``used``."""
    if not os.path.isfile(path):
        return dict(used)
    recorded = read_model_settings(path)
    used, recorded = _relevant_intensity(dict(used)), _relevant_intensity(recorded)
    wrong = [key for key in keys if key in used and key in recorded and not _same(used[key], recorded[key])]
    if wrong:
        lines = "; ".join(
            f"--{key} {json.dumps(plain(used[key]))} but the model was trained with "
            f"{json.dumps(plain(recorded[key]))}"
            for key in wrong
        )
        raise ValueError(
            f"{lines} (recorded in {path}). The model only sees its inputs as it was trained to: drop the "
            f"override{'s' if len(wrong) > 1 else ''} to use the recorded value{'s' if len(wrong) > 1 else ''}, "
            "or retrain with the new settings"
        )
    return dict(used)


def labels_to_metadata(settings_file: str, metadata_file: str) -> dict:
    """Write the class names recorded with a trained model (``settings_file``) into the bundle's
    ``metadata.json`` (its first ``network_data_format`` output's ``channel_def`` and ``num_channels``,
    ``label_classes``, ``pred_classes``), atomically: MONAI Label lists a bundle's labels from there, read when its
    server starts. Returns the new ``channel_def``."""
    if not os.path.isfile(settings_file):
        raise FileNotFoundError(f"{settings_file} does not exist: train the bundle first (run id 'training')")
    names = read_model_settings(settings_file).get("class_names")
    if not names:
        raise ValueError(f"{settings_file} records no class_names")
    with open(metadata_file) as f:
        metadata = json.load(f)
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    if not outputs:
        raise ValueError(f"{metadata_file} has no network_data_format outputs to write the class names into")
    output = next(iter(outputs.values()))
    channel_def = {str(i): name for i, name in enumerate(names)}
    output.update(channel_def=channel_def, num_channels=len(names))
    classes = ", ".join(f"{i} {name}" for i, name in enumerate(names))
    metadata.update(label_classes=classes, pred_classes=classes)
    write_settings(metadata_file, metadata)
    return channel_def


def crop_size(text: str | int | None, planned: Sequence[int]) -> list[int]:
    """The training crop from a client's option (MONAI Label's ``displayable_configs#crop_size``): "" (default)
    keeps the plan's ``planned`` crop; "96" is a cube; "96,96,64" one size per axis, as many as ``planned`` has."""
    if text in ("", None):
        return [int(s) for s in planned]
    try:
        sizes = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes = sizes * len(planned)
    if len(sizes) != len(planned) or any(s < 1 for s in sizes):
        raise ValueError(
            f"crop_size {text!r} is not {len(planned)} positive sizes: give one size (a cube, e.g. '96'), "
            f"{len(planned)} comma-separated sizes (e.g. {','.join(str(p) for p in planned)!r}), or '' for the plan's"
        )
    return sizes


def iterations_per_epoch(text: str | int | None, planned: int) -> int:
    """The iterations per epoch from a client's option (MONAI Label's ``displayable_configs#iterations_per_epoch``):
    "" (default) keeps the plan's ``planned``; a whole number >= 0 replaces it (0: one pass over the cases)."""
    if text in ("", None):
        return int(planned)
    try:
        value = int(str(text).strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"iterations_per_epoch {text!r} is not a whole number >= 0: give e.g. '250', '0' for one pass over the "
            f"cases, or '' for the plan's {planned}"
        )
    return value


def log_training_options(
    options: Mapping[str, Any], max_epochs: int, roi_size: Sequence[int], used: Mapping[str, Any] | None = None
) -> str:
    """Log, before training, the options a MONAI Label client sees and sets (``displayable_configs``) with the values
    this run trains with, and the epochs and crop they lead to; returns the logged line. It is how a ``/train``
    request's options can be seen to reach the bundle (scripts/monailabel_check.py reads it). ``used``: the config
    ids the options feed (``learning_rate``, a method's weights), whose values win: a command-line override of the id
    itself (``--selfreg_weight 0``) bypasses ``displayable_configs``."""
    used = used or {}
    chosen = ", ".join(f"{name} {used.get(name, value)!r}" for name, value in options.items())
    line = f"training options: {chosen}; max_epochs {max_epochs}, crop {list(roi_size)}"
    logger.info(line)
    return line
