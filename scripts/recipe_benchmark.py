"""Time-to-accuracy of a bundle's training recipe: train through the bundle's CLI, run its ``inference.json`` on the
held-out ``imagesTs`` images (predictions inverted to each image's own grid), and score them against the original
``labelsTs`` at that resolution. Prints and writes ``recipe_benchmark.json`` (Dice per class, training seconds, the
load average before and after, the machine).

    python scripts/recipe_benchmark.py --bundle selfreg_segmentation --dataset_dir DATA/brain --out RUN \\
        -- --selfreg_weight 0 --spacing [3.0,3.0,3.0] --roi_size [48,48,48]

Everything after ``--`` is passed to training and inference alike (training-only settings are dropped for
inference: see ``TRAIN_ONLY``, and so are ``#`` paths into ids that ``inference.json`` does not define, such as
``--seg_loss#batch``). Not a test: a measurement to run on the machine the numbers are reported for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Settings only train.json knows; inference.json would add them as unused ids, harmless, but kept out for clarity.
TRAIN_ONLY = {
    "max_epochs",
    "iterations_per_epoch",
    "learning_rate",
    "batch_size",
    "num_samples",
    "val_interval",
    "val_share",
    "seed",
    "crop_pos",
    "crop_neg",
    "weight_decay",
    "selfreg_weight",
    "l2_weight",
    "kl_weight",
    "reseg_weight",
    "unlabeled_weight",
    "intra_weight",
    "cross_weight",
    "progress_bar",
    "cache_rate",
    "resume",
}


def pairs(tokens: list[str]) -> list[tuple[str, str]]:
    return [(tokens[i].removeprefix("--"), tokens[i + 1]) for i in range(0, len(tokens), 2)]


def bundle_run(bundle: Path, configs: list[str], root: Path, dataset: Path, settings: list[tuple[str, str]]) -> float:
    config = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        config,
        "--meta_file",
        "configs/metadata.json",
        "--logging_file",
        "configs/logging.conf",
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(dataset),
    ]
    for key, value in settings:
        command += [f"--{key}", value]
    start = time.time()
    with open(root / f"{Path(configs[-1]).stem}.log", "w") as log:
        subprocess.run(command, cwd=bundle, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.time() - start


def infer(bundle: Path, root: Path, dataset: Path, settings: list[tuple[str, str]], output_dir: Path,
          images: Sequence[Path] | None = None) -> float:
    """Run the bundle's ``inference.json`` with the model under ``root`` (its recorded settings), writing
    predictions inverted to each image's own grid into ``output_dir``; ``images`` replaces the default input
    (``dataset/imagesTs``). Returns the wall time in seconds."""
    settings = [*settings, ("output_dir", str(output_dir))]
    if images is not None:
        settings.append(("datalist", repr([{"image": str(image)} for image in images])))
    return bundle_run(bundle, ["configs/inference.json"], root, dataset, settings)


def case_name(path: Path) -> str:
    """An image or label file's name without its NIfTI suffix: the case name the predictions are written under."""
    return path.name.split(".nii")[0]


def find_prediction(predictions: Path, name: str) -> Path:
    """The prediction ``inference.json`` wrote for case ``name`` (``<name>_seg.nii.gz``, in a subfolder or not)."""
    found = sorted(predictions.rglob(f"{name}_seg.nii*"))
    if not found:
        raise FileNotFoundError(f"no prediction {name}_seg.nii.gz in {predictions}: did inference run on {name}?")
    return found[0]


def dice_scores(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each foreground class; 1.0 where both are empty."""
    scores = []
    for c in range(1, num_classes):
        p, g = prediction == c, label == c
        denominator = p.sum() + g.sum()
        scores.append(float(2 * np.logical_and(p, g).sum() / denominator) if denominator else 1.0)
    return scores


def hd95_scores(prediction: np.ndarray, label: np.ndarray, num_classes: int, spacing: Sequence[float]) -> list[float]:
    """95th-percentile Hausdorff distance in mm of each foreground class at the voxel ``spacing`` (MONAI's
    ``compute_hausdorff_distance``); not finite where the class is missing from the prediction or the label."""
    import torch
    from monai.metrics import compute_hausdorff_distance
    from monai.networks.utils import one_hot

    def hot(volume: np.ndarray) -> torch.Tensor:
        return one_hot(torch.as_tensor(volume)[None, None], num_classes=num_classes)

    distances = compute_hausdorff_distance(hot(prediction), hot(label), include_background=False, percentile=95,
                                           spacing=[float(s) for s in spacing])
    return [float(d) for d in distances[0]]


def load_segmentation(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """A label map as integers (squeezed) and its voxel size in mm."""
    image = nib.load(path)
    volume = np.rint(np.squeeze(np.asarray(image.dataobj))).astype(int)
    return volume, tuple(float(z) for z in image.header.get_zooms()[: volume.ndim])


def score_case(prediction_path: Path, label_path: Path, num_classes: int, hd95: bool = False) -> dict[str, list]:
    """``{"dice": [per foreground class]}`` (and ``"hd95"``) of a prediction against its label on the label's own
    grid; a prediction on another grid is refused, naming both files."""
    prediction, _ = load_segmentation(prediction_path)
    label, spacing = load_segmentation(label_path)
    if prediction.shape != label.shape:
        raise ValueError(f"{prediction_path} has shape {prediction.shape}, {label_path} {label.shape}: inference "
                         "must write predictions on the input image's grid")
    scores = {"dice": dice_scores(prediction, label, num_classes)}
    if hd95:
        scores["hd95"] = hd95_scores(prediction, label, num_classes, spacing)
    return scores


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="bundle folder name under bundles/")
    parser.add_argument("--dataset_dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="bundle_root of the run (created)")
    args = parser.parse_args(argv)
    bundle = REPO / "bundles" / args.bundle
    args.out.mkdir(parents=True, exist_ok=True)
    settings = pairs(extra)
    load_before = os.getloadavg()
    train_s = bundle_run(
        bundle, ["configs/train.json"], args.out, args.dataset_dir, [*settings, ("progress_bar", "False")]
    )
    load_after = os.getloadavg()
    classes = json.loads((args.dataset_dir / "dataset.json").read_text())["labels"]
    num_classes = len(classes)
    predictions = args.out / "predictions"
    inference_ids = set(json.loads((bundle / "configs" / "inference.json").read_text()))
    infer_settings = [
        (k, v) for k, v in settings if k not in TRAIN_ONLY and ("#" not in k or k.split("#")[0] in inference_ids)
    ]
    infer_settings.append(
        ("class_names", "[" + ",".join(f"'{classes[str(i)]}'" for i in range(num_classes)) + "]"))
    infer_s = infer(bundle, args.out, args.dataset_dir, infer_settings, predictions)
    cases = {}
    for label_path in sorted((args.dataset_dir / "labelsTs").glob("*.nii*")):
        name = case_name(label_path)
        cases[name] = score_case(find_prediction(predictions, name), label_path, num_classes)["dice"]
    mean = float(np.mean([np.mean(s) for s in cases.values()]))
    result = {
        "bundle": args.bundle,
        "dataset_dir": str(args.dataset_dir),
        "settings": dict(settings),
        "dice_per_class": cases,
        "mean_dice": mean,
        "train_s": round(train_s, 1),
        "infer_s": round(infer_s, 1),
        "load_before": load_before,
        "load_after": load_after,
        "machine": f"{platform.processor() or platform.machine()}," f" {os.cpu_count()} visible cores",
        "torch_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    (args.out / "recipe_benchmark.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
