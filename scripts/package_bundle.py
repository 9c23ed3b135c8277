"""Package MONAI bundles as model-zoo zips; check and install bundle zips from anywhere safely.

    python scripts/package_bundle.py check bundles/selfreg_segmentation [--weights RUN_DIR]
    python scripts/package_bundle.py package bundles/*_segmentation [--out dist] [--release OWNER/REPO/TAG]
    python scripts/package_bundle.py package bundles/selfreg_segmentation --weights RUN_DIR   # a trained model.pt
    python scripts/package_bundle.py package bundles/selfreg_segmentation --weights RUN_DIR --program RUN_DIR
    python scripts/package_bundle.py verify dist/selfreg_segmentation_v0.2.0.zip
    python scripts/package_bundle.py install dist/selfreg_segmentation_v0.2.0.zip --bundle_dir ~/bundles

``package`` refuses a bundle that fails the model-zoo checks (required files, version in the changelog, metadata
against the zoo schema, ``verify_net_in_out``, and ``--weights`` that load into the inference network). It writes
``{name}_v{version}.zip`` holding one folder named after the bundle, with fixed timestamps like the zoo's
``compress_bundle``, and leaves out caches, logs, datasets, outputs and training checkpoints. Files above 25 MB stay
out of the zip, as in the zoo: each is written next to the zip as a release asset and listed in
``large_files.yml`` with its sha256. The weights (``--weights``: models/model.pt) are listed there too, and written
next to the zip, as the zoo takes them: this is the route for a model-zoo submission, whose ``ci/verify_bundle.py``
refuses a bundle without models/model.pt or a large_files.yml that lists it. ``--program`` adds the
``torch.export`` program (models/model.pt2, written by the bundles' run id ``export``), listed there the same way; it
must load with ``torch.export.load`` and hold the packaged weights. The source bundle is only read.

``verify`` and ``install`` treat a zip as untrusted: every member is inspected before anything is written (absolute
paths, drive letters, backslashes, ``..``, links and special files, more than one top-level folder, a folder not
named after the bundle), and the files that ``large_files.yml`` lists are hash-checked where present (in the zip,
or as assets next to it). ``install`` extracts only a zip that passes, and only to a new folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlparse

# monai and torch are imported inside the functions that check a bundle, so that verify and install start fast.
import yaml
from bundle_env import bundle_imports

REPO = Path(__file__).resolve().parent.parent
# The zoo's metadata schema (MONAI-extra-test-data 0.8.1), stored in the repository so that the check runs offline.
SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"
# Model-zoo rule: no file in a bundle above 25 MB; larger ones are fetched through large_files.yml.
MAX_FILE_BYTES = 25_000_000
# The timestamp the zoo's compress_bundle touches every file with, so a zip's bytes depend only on its content.
ZIP_DATE_TIME = (2022, 5, 30, 0, 0, 0)
REQUIRED_FILES = ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json",
                  "configs/logging.conf", "docs/README.md")
# The weight files the bundle spec names; anything else under models/ is a training output (checkpoints).
MODEL_FILES = ("model.pt", "model.ts", "model.onnx", "model.pt2")
OUTPUT_FOLDERS = ("eval", "runs", "mlruns", "logs", "data", "dataset", "datasets")
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".raw", ".dcm")
# Written into the bundle by MONAI Label's multi-GPU training.
GENERATED_CONFIGS = ("configs/monailabel_train.json",)
LARGE_FILES_NAMES = ("large_files.yml", "large_files.yaml", "large_files.json")
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")
ZIP_NAME = re.compile(r"^(?P<name>.+?)(?:_v(?P<version>\d[^/\\]*))?\.zip$")


class BundleError(Exception):
    """A refusal: the message names the file, the problem and what to do."""


# ---------------------------------------------------------------------------------------------------------- checks


def read_metadata(bundle: Path) -> dict:
    path = bundle / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: cannot be read as JSON ({e}); a bundle needs a valid configs/metadata.json") from e


def check_bundle(bundle: Path, weights: Path | None = None, program: Path | None = None) -> list[str]:
    """The model-zoo CI checks of ``bundle`` and of the weights it ships (``weights``, else its own models/model.pt
    if it has one), and of its ``torch.export`` program (``program``, else its own models/model.pt2 if it has one),
    as problems; empty when it passes."""
    missing = [f for f in REQUIRED_FILES if not (bundle / f).is_file()]
    if missing:
        return [f"{bundle / f}: missing (a bundle needs {', '.join(REQUIRED_FILES)})" for f in missing]
    meta_file = bundle / "configs" / "metadata.json"
    meta = read_metadata(bundle)
    problems = []
    version = meta.get("version")
    if version not in meta.get("changelog", {}):
        problems.append(f"{meta_file}: version {version!r} has no entry in 'changelog'; describe the release there")
    problems += metadata_schema_problems(meta_file, meta)
    if not problems:  # the network check reads the metadata's network_data_format
        own_weights, own_program = bundle / "models" / "model.pt", bundle / "models" / "model.pt2"
        weights = weights or (own_weights if own_weights.is_file() else None)
        problems += network_problems(bundle, weights)
        program = program or (own_program if own_program.is_file() else None)
        if program and not problems:
            problems += program_problems(program, weights)
    return problems


def metadata_schema_problems(meta_file: Path, meta: dict) -> list[str]:
    """``monai.bundle verify_metadata`` against the stored zoo schema (it downloads nothing when the file exists)."""
    from monai.bundle import verify_metadata

    if not str(meta.get("schema", "")).endswith(SCHEMA.name):
        return [f"{meta_file}: 'schema' is {meta.get('schema')!r}; only {SCHEMA.name} is available offline: set "
                "'schema' to https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                f"{SCHEMA.name}"]
    try:
        verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)
    except ValueError as e:
        return [f"{meta_file}: fails the model-zoo schema: {e}"]
    return []


def network_problems(bundle: Path, weights: Path | None) -> list[str]:
    """``verify_net_in_out`` on ``network_def`` of configs/inference.json, as the zoo's CI runs it, and ``weights``
    loaded strictly into that network (what ``monai.bundle load`` and MONAI Label do with models/model.pt)."""
    import torch
    from monai.bundle import ConfigParser, verify_net_in_out

    config = bundle / "configs" / "inference.json"
    meta_file = bundle / "configs" / "metadata.json"
    # Configs import the bundle's own ``scripts`` package; a bundle without code needs no import set-up.
    with bundle_imports(bundle) if (bundle / "scripts" / "__init__.py").is_file() else nullcontext():
        try:
            verify_net_in_out(net_id="network_def", meta_file=str(meta_file), config_file=str(config),
                              bundle_root=str(bundle), device="cpu")
        except Exception as e:  # any failure to build or run the network is the finding
            return [f"{config}: verify_net_in_out failed on network_def: {type(e).__name__}: {e}"]
        if weights is None:
            return []
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # unreadable or pickled objects other than tensors
            return [f"{weights}: not a plain PyTorch state dict ({type(e).__name__}: {e}); "
                    "package the models/model.pt that training writes"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            return [f"{weights}: holds {type(state).__name__} of more than tensors, not a plain state dict; "
                    "package the models/model.pt that training writes, not a training checkpoint"]
        parser = ConfigParser()
        parser.read_config(str(config))
        parser.read_meta(str(meta_file))
        parser["bundle_root"] = str(bundle)
        try:
            parser.get_parsed_content("network_def").load_state_dict(state, strict=True)
        except RuntimeError as e:
            return [f"{weights}: does not load into network_def of {config} ({' '.join(str(e).split())[:300]} ...); "
                    "package weights trained with the network settings of configs/inference.json"]
    return []


def program_problems(program: Path, weights: Path | None) -> list[str]:
    """``program`` (a model.pt2) loads with ``torch.export.load``, carries the export bounds of the bundles'
    ``scripts/export.py``, and holds ``weights`` (the packaged model.pt), so that the two files are one model."""
    import torch

    extra = {"bounds.json": ""}  # scripts/export.py BOUNDS_FILE
    try:
        exported = torch.export.load(program, extra_files=extra)
    except Exception as e:  # torch raises many types for a file that is not an exported program
        return [f"{program}: not a torch.export program ({type(e).__name__}: {e}); package the models/model.pt2 "
                "that the bundle's run id 'export' writes"]
    if not extra["bounds.json"]:
        return [f"{program}: has no bounds.json, so inference cannot check its windows; export it with the bundle's "
                "run id 'export'"]
    if weights is None:
        return []
    state = torch.load(weights, map_location="cpu", weights_only=True)
    held = exported.state_dict
    differ = sorted(set(held) ^ set(state)) + [k for k in held if k in state and not torch.equal(held[k], state[k])]
    if differ:
        return [f"{program}: was exported from other weights than {weights} ({len(differ)} tensors differ, e.g. "
                f"{differ[0]}); export the packaged model again (run id 'export', --overwrite True)"]
    return []


# -------------------------------------------------------------------------------------------------------- package


def skip_reason(rel: PurePosixPath, is_dir: bool) -> str | None:
    """Why a path of the bundle (relative, POSIX) is not packaged, or None when it is."""
    name = rel.name
    if name.startswith("."):
        return "hidden"
    if name == "__pycache__" or rel.suffix in (".pyc", ".pyo"):
        return "cache"
    if len(rel.parts) == 1 and is_dir and name in OUTPUT_FOLDERS:
        return "outputs or data"
    if rel.parts[0] == "models" and len(rel.parts) > 1 and not (len(rel.parts) == 2 and name in MODEL_FILES):
        return "training output (only models/model.pt, .ts, .onnx and .pt2 are packaged)"
    if is_dir:
        return None
    if rel.suffix == ".log" or name.startswith("events.out.tfevents"):
        return "log"
    if name.lower().endswith(IMAGE_SUFFIXES):
        return "image data"
    if rel.as_posix() in GENERATED_CONFIGS:
        return "generated by MONAI Label"
    return None


def bundle_files(bundle: Path) -> tuple[dict[str, Path], list[str]]:
    """The files to package (relative POSIX path -> file) and what was left out, as ``path (reason)``."""
    files, skipped = {}, []
    for root, dirs, names in os.walk(bundle):
        here = Path(root)
        for d in sorted(dirs):
            rel = PurePosixPath((here / d).relative_to(bundle).as_posix())
            reason = skip_reason(rel, is_dir=True)
            if reason:
                skipped.append(f"{rel}/ ({reason})")
                dirs.remove(d)
            elif (here / d).is_symlink():
                raise BundleError(f"{here / d}: is a symbolic link; a zip must not carry links: replace it by the "
                                  "folder")
        for n in sorted(names):
            path = here / n
            rel = PurePosixPath(path.relative_to(bundle).as_posix())
            reason = skip_reason(rel, is_dir=False)
            if reason:
                skipped.append(f"{rel} ({reason})")
            elif path.is_symlink():
                raise BundleError(f"{path}: is a symbolic link; a zip must not carry links: replace it by the file")
            else:
                files[rel.as_posix()] = path
    return files, skipped


def resolve_weights(weights: Path, filename: str = "model.pt") -> Path:
    """``weights`` is a ``filename`` (model.pt, or model.pt2 for --program), or a training output folder (the
    ``--bundle_root`` of a training run) that holds models/``filename``."""
    path = weights / "models" / filename if weights.is_dir() else weights
    if not path.is_file():
        option = "--program" if filename.endswith(".pt2") else "--weights"
        raise BundleError(f"{path}: no such file; {option} takes a {filename} or a training output folder that "
                          f"holds models/{filename}")
    return path


def asset_name(name: str, version: str, rel: str) -> str:
    """The file name a large file is published under, next to ``{name}_v{version}.zip``."""
    return f"{name}_v{version}_{rel.replace('/', '_')}"


def release_asset_url(release: str, asset: str) -> str:
    """The download address of a GitHub release asset, as ``monai.bundle download --source github`` builds it."""
    owner, repo, tag = release.split("/")
    return f"https://github.com/{owner}/{repo}/releases/download/{tag}/{asset}"


def large_files_yaml(entries: list[dict], name: str, version: str) -> bytes:
    """large_files.yml in the zoo's format; a comment says how to fill in the urls that are still empty."""
    header = ""
    without_url = [e["path"] for e in entries if not e.get("url")]
    if without_url:
        example_asset = asset_name(name, version, without_url[0])
        header = ("# Files above 25 MB stay out of the zip (model-zoo rule); packaging wrote each next to the zip,\n"
                  f"# e.g. {example_asset}. Upload it (e.g. to the GitHub release that holds the zip) and set its\n"
                  f"# url, e.g. https://github.com/OWNER/REPO/releases/download/TAG/{example_asset}\n"
                  "# (scripts/package_bundle.py package --release OWNER/REPO/TAG fills urls in). Users then fetch\n"
                  "# and hash-check them with: python -m monai.bundle download_large_files --bundle_path <bundle>\n")
    return (header + yaml.safe_dump({"large_files": entries}, sort_keys=False)).encode()


def write_zip(path: Path, name: str, members: dict[str, bytes | Path]) -> None:
    """A deterministic zip: sorted members under ``name/``, fixed timestamp and mode, deflate level 9, no folder
    entries (like ``zip -D -X -9`` after ``touch -t 202205300000``)."""
    with zipfile.ZipFile(path, "w") as zf:
        for rel in sorted(members):
            info = zipfile.ZipInfo(f"{name}/{rel}", date_time=ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so that the mode below is what extractors see
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            content = members[rel]
            zf.writestr(info, content if isinstance(content, bytes) else content.read_bytes(), compresslevel=9)


def file_digest(path: Path, hash_type: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, hash_type).hexdigest()


def zip_members(bundle: Path, weights: Path | None, release: str | None, program: Path | None = None
                ) -> tuple[dict[str, bytes | Path], dict[str, Path], list[str]]:
    """What the zip of ``bundle`` holds (relative path -> file or content), the files listed in its
    large_files.yml that are published next to it (relative path -> file), and what was left out as not shareable.

    Listed are the weights (models/model.pt, .ts, .onnx, .pt2: the model zoo takes them through large_files.yml, as
    its bundles do) and any other file above 25 MB; the weights stay in the zip too when they are within 25 MB."""
    name, version = bundle.name, read_metadata(bundle)["version"]
    files, skipped = bundle_files(bundle)
    if weights:
        files["models/model.pt"] = weights
    if program:
        files["models/model.pt2"] = program
    large_entries = []
    for source_name in LARGE_FILES_NAMES:  # entries the bundle already lists are kept, ours are added
        if source_name in files:
            large_entries += yaml.safe_load(files.pop(source_name).read_text()).get("large_files", [])
    listed = {rel: path for rel, path in files.items()
              if path.stat().st_size > MAX_FILE_BYTES or rel in {f"models/{m}" for m in MODEL_FILES}}
    for rel, path in listed.items():
        if path.stat().st_size > MAX_FILE_BYTES:
            del files[rel]
        asset = asset_name(name, version, rel)
        large_entries = [e for e in large_entries if e.get("path") != rel]
        large_entries.append({"path": rel, "url": release_asset_url(release, asset) if release else "",
                              "hash_val": file_digest(path, "sha256"), "hash_type": "sha256"})
    members: dict[str, bytes | Path] = dict(files)
    if large_entries:
        members["large_files.yml"] = large_files_yaml(large_entries, name, version)
    return members, listed, skipped


def package_bundle(bundle: Path, out: Path, weights: Path | None = None, release: str | None = None,
                   program: Path | None = None) -> Path:
    """Check ``bundle`` and write ``out/{name}_v{version}.zip`` (plus large-file assets); returns the zip.
    ``program``: a model.pt2 (or a training output folder holding models/model.pt2) packaged as models/model.pt2."""
    bundle, out = bundle.resolve(), out.resolve()
    if not (bundle / "configs" / "metadata.json").is_file():
        raise BundleError(f"{bundle}: not a bundle folder (no configs/metadata.json)")
    if out == bundle or bundle in out.parents:
        raise BundleError(f"{out}: the output folder is inside the bundle {bundle}; the bundle would package its own "
                          "zips and change: choose --out outside it")
    weights_file = resolve_weights(weights) if weights else None
    program_file = resolve_weights(program, "model.pt2") if program else None
    problems = check_bundle(bundle, weights_file, program_file)
    if problems:
        raise BundleError(f"refusing to package {bundle}:\n  " + "\n  ".join(problems) +
                          "\nFix these and run again; nothing was written.")
    name, version = bundle.name, read_metadata(bundle)["version"]
    members, listed, skipped = zip_members(bundle, weights_file, release, program_file)
    out.mkdir(parents=True, exist_ok=True)
    zip_path = out / f"{name}_v{version}.zip"
    with tempfile.TemporaryDirectory(dir=out) as tmp:  # a failed run leaves no half-written zip
        write_zip(Path(tmp) / zip_path.name, name, members)
        os.replace(Path(tmp) / zip_path.name, zip_path)
    assets = [out / asset_name(name, version, rel) for rel in listed]
    for path, asset in zip(listed.values(), assets):
        shutil.copyfile(path, asset)
    inspect_zip(zip_path)  # what we publish must pass what we ask of others
    print(f"wrote {zip_path} ({len(members)} files, sha256 {file_digest(zip_path, 'sha256')})")
    for rel, asset in zip(listed, assets):
        where = "left out of the zip (above 25 MB)" if rel not in members else "in the zip"
        print(f"  {rel}: {where}, listed in large_files.yml with its sha256, written as {asset}: publish it next to "
              "the zip (its url in large_files.yml)")
    if "models/model.pt" not in listed:
        print("  no models/model.pt: the model zoo's ci/verify_bundle.py refuses a bundle without it (or without a "
              "large_files.yml listing it); for a zoo submission package trained weights with --weights RUN_DIR")
    if skipped:
        print("  left out: " + ", ".join(skipped))
    if release:
        owner_repo, tag = release.rsplit("/", 1)
        uploads = " ".join(map(str, [zip_path, *assets]))
        print(f"  publish (after gh release create {tag} --repo {owner_repo}): gh release upload {tag} {uploads} "
              f"--repo {owner_repo}; the zip's address: {release_asset_url(release, zip_path.name)}")
        print(f"  users: python -m monai.bundle download --source github --repo {release} --name {name} "
              f"--version {version} --bundle_dir <folder>")
    return zip_path


# ------------------------------------------------------------------------------------------------ untrusted zips


@dataclass(frozen=True)
class InspectedZip:
    """A zip that passed inspection: its bundle name and version and the entries of its large_files.yml."""

    name: str
    version: str
    large_files: list[dict]


def member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why extracting this member could write outside the target folder or create something other than a plain
    file or folder; None when it is safe."""
    name = info.filename
    mode = info.external_attr >> 16
    if "\\" in name:
        return "uses '\\' in its path (on Windows a separator, which can escape the folder)"
    if name.startswith("/"):
        return "is an absolute path"
    if re.match(r"^[A-Za-z]:", name):
        return "starts with a drive letter"
    if ".." in name.split("/"):
        return "has a '..' component"
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "is a special file (device, fifo or socket)"
    return None


def expected_bundle(zip_path: Path, name: str | None) -> tuple[str, str | None]:
    """The bundle name (``name``, else from ``{name}_v{version}.zip`` or ``{name}.zip``) and the version the file
    name gives, if any."""
    match = ZIP_NAME.match(zip_path.name)
    if name:
        return name, match.group("version") if match and match.group("name") == name else None
    if not match:
        raise BundleError(f"{zip_path}: not a .zip name; pass --name with the bundle name")
    return match.group("name"), match.group("version")


def large_files_entries(zf: zipfile.ZipFile, name: str) -> tuple[list[dict], list[str]]:
    """The entries of ``name/large_files.{yml,yaml,json}`` in the zip, and problems with them."""
    for candidate in LARGE_FILES_NAMES:
        member = f"{name}/{candidate}"
        if member in zf.namelist():
            break
    else:
        return [], []
    try:
        entries = yaml.safe_load(zf.read(member)).get("large_files")
    except (yaml.YAMLError, AttributeError) as e:
        return [], [f"member '{member}' cannot be read ({e})"]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e for e in entries):
        return [], [f"member '{member}': 'large_files' must be a list of {{path, url, hash_val, hash_type}}"]
    problems = []
    for entry in entries:
        path_problem = member_problem(zipfile.ZipInfo(str(entry["path"])))
        if path_problem:
            problems.append(f"large file '{entry['path']}' in '{member}' {path_problem}")
        if entry.get("hash_val") and entry.get("hash_type", "md5") not in HASH_TYPES:
            problems.append(f"large file '{entry['path']}' in '{member}' has hash_type {entry['hash_type']!r}, "
                            f"not one of {', '.join(HASH_TYPES)}")
    return entries, problems


def large_file_asset(zip_path: Path, name: str, version: str, entry: dict) -> Path:
    """Where a large file would lie next to the zip: its url's file name, else the name ``package`` gives it."""
    url_name = PurePosixPath(urlparse(str(entry.get("url") or "")).path).name
    return zip_path.parent / (url_name or asset_name(name, version, str(entry["path"])))


def hash_mismatch(entry: dict, opened: BinaryIO, source: str | Path) -> str | None:
    """A problem when ``opened`` (``source``, the large file) does not have the hash ``entry`` records."""
    if not entry.get("hash_val"):
        return None
    hash_type = entry.get("hash_type", "md5")
    actual = hashlib.file_digest(opened, hash_type).hexdigest()
    if actual != str(entry["hash_val"]).lower():
        return (f"large file '{entry['path']}' ({source}) does not match large_files.yml ({hash_type} {actual}, "
                f"expected {entry['hash_val']}): it is corrupt or was replaced; fetch it again from its url")
    return None


def layout_problems(zf: zipfile.ZipFile, name: str) -> list[str]:
    """Members that are unsafe to extract or do not lie in the one folder ``name/``."""
    problems, seen = [], set()
    for info in zf.infolist():
        problem = member_problem(info)
        top, _, rest = info.filename.partition("/")
        if problem is None and info.filename in seen:
            problem = "appears twice (the second copy would silently replace the first)"
        elif problem is None and top != name:
            problem = f"lies outside the bundle folder '{name}/' (a zip holds one top-level folder named after the " \
                      "bundle)"
        elif problem is None and not rest and not info.is_dir():
            problem = "is a file at the top level, outside the bundle folder"
        seen.add(info.filename)
        if problem:
            problems.append(f"member '{info.filename}' {problem}")
    return problems


def bundle_version(zf: zipfile.ZipFile, name: str, file_version: str | None) -> tuple[str, list[str]]:
    """The version in the zip's metadata.json, and problems: no metadata, or a version other than the file name's."""
    meta_member = f"{name}/configs/metadata.json"
    if meta_member not in zf.namelist():
        return "", [f"no member '{meta_member}': not a MONAI bundle named '{name}'"]
    try:
        version = str(json.loads(zf.read(meta_member))["version"])
    except (ValueError, KeyError, TypeError) as e:
        return "", [f"member '{meta_member}' has no readable 'version' ({e})"]
    if file_version and file_version != version:
        return version, [f"the file name says version {file_version} but '{meta_member}' says {version}"]
    return version, []


def large_file_hash_problems(zf: zipfile.ZipFile, zip_path: Path, name: str, version: str,
                             entries: list[dict]) -> list[str]:
    """Large files, in the zip or published next to it, that do not match their hash in large_files.yml."""
    problems = []
    for entry in entries:
        member, asset = f"{name}/{entry['path']}", large_file_asset(zip_path, name, version, entry)
        if member in zf.namelist():
            with zf.open(member) as opened:
                mismatch = hash_mismatch(entry, opened, f"member '{member}'")
        elif asset.is_file():
            with open(asset, "rb") as opened:
                mismatch = hash_mismatch(entry, opened, asset)
        else:  # not published next to the zip: download_large_files checks it when it fetches it
            continue
        if mismatch:
            problems.append(mismatch)
    return problems


def inspect_zip(zip_path: Path, name: str | None = None) -> InspectedZip:
    """Check an untrusted bundle zip before anything is extracted; raises BundleError listing every problem, each
    naming the member or file."""
    zip_path = Path(zip_path)
    name, file_version = expected_bundle(zip_path, name)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as e:
        raise BundleError(f"{zip_path}: cannot be opened as a zip ({e})") from e
    with zf:  # each step runs only on a zip that passed the ones before
        version, entries = "", []
        problems = layout_problems(zf, name)
        if not problems:
            version, problems = bundle_version(zf, name, file_version)
        if not problems:
            entries, problems = large_files_entries(zf, name)
        if not problems:
            problems = large_file_hash_problems(zf, zip_path, name, version, entries)
    if problems:
        raise BundleError(f"refusing {zip_path}:\n  " + "\n  ".join(problems) +
                          "\nNothing was extracted; do not use this zip (ask its publisher for a correct one).")
    return InspectedZip(name, version, entries)


def install_zip(zip_path: Path, bundle_dir: Path, name: str | None = None) -> Path:
    """Inspect ``zip_path``, then extract it to a new ``bundle_dir/{name}`` together with the large-file assets
    lying next to it, checking their hashes; returns the bundle folder. Nothing is left behind on refusal."""
    inspected = inspect_zip(zip_path, name)
    target = Path(bundle_dir) / inspected.name
    if target.exists():
        raise BundleError(f"{target}: already exists; remove it or choose another --bundle_dir (nothing is "
                          "installed over an existing bundle)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{inspected.name}.") as tmp:
        staged = Path(tmp) / inspected.name
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                dest = Path(tmp, *info.filename.split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        missing = []
        for entry in inspected.large_files:
            dest = staged.joinpath(*str(entry["path"]).split("/"))
            asset = large_file_asset(Path(zip_path), inspected.name, inspected.version, entry)
            if not dest.exists() and asset.is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(asset, dest)
            if not dest.exists():
                missing.append(str(entry["path"]))
                continue
            with open(dest, "rb") as opened:  # the copy, not the inspected original, is what gets used
                mismatch = hash_mismatch(entry, opened, dest)
            if mismatch:
                raise BundleError(f"refusing {zip_path}: {mismatch}. Nothing was installed.")
        os.replace(staged, target)
    print(f"installed {target}")
    if missing:
        print(f"  not there yet (large_files.yml): {', '.join(missing)}; fetch and hash-check them with\n"
              f"  python -m monai.bundle download_large_files --bundle_path {target}")
    return target


# ------------------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="run the model-zoo checks on a bundle folder; write nothing")
    check.add_argument("bundle", type=Path)
    check.add_argument("--weights", type=Path, help="a model.pt, or a training output folder with models/model.pt")
    package = commands.add_parser("package", help="check bundle folders and write {name}_v{version}.zip for each")
    package.add_argument("bundles", type=Path, nargs="+")
    package.add_argument("--out", type=Path, default=Path("dist"), help="output folder (default: ./dist)")
    package.add_argument("--weights", type=Path,
                         help="package this model.pt (or a training output folder's models/model.pt) as "
                              "models/model.pt; one bundle only")
    package.add_argument("--program", type=Path,
                         help="package this torch.export program (a model.pt2, or a training output folder's "
                              "models/model.pt2, written by the bundle's run id 'export') as models/model.pt2; it "
                              "must hold the packaged weights; one bundle only")
    package.add_argument("--release", metavar="OWNER/REPO/TAG",
                         help="the GitHub release the zip goes to: fills in large-file urls, prints the commands")
    verify = commands.add_parser("verify", help="inspect an untrusted bundle zip; extract nothing")
    install = commands.add_parser("install", help="inspect a bundle zip, then extract it to --bundle_dir/{name}")
    for sub in (verify, install):
        sub.add_argument("zip", type=Path)
        sub.add_argument("--name", help="the bundle name (default: from {name}_v{version}.zip)")
    install.add_argument("--bundle_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            problems = check_bundle(args.bundle.resolve(), resolve_weights(args.weights) if args.weights else None)
            for problem in problems:
                print(problem, file=sys.stderr)
            if not problems:
                print(f"{args.bundle}: passes the model-zoo checks")
            return 1 if problems else 0
        if args.command == "package":
            if (args.weights or args.program) and len(args.bundles) > 1:
                raise BundleError("--weights and --program belong to one bundle: package bundles with weights one "
                                  "at a time")
            if args.release and len(args.release.split("/")) != 3:
                raise BundleError(f"--release {args.release}: expected OWNER/REPO/TAG")
            for bundle in args.bundles:
                package_bundle(bundle, args.out, args.weights, args.release, args.program)
        elif args.command == "verify":
            inspected = inspect_zip(args.zip, args.name)
            print(f"{args.zip}: safe to extract (bundle {inspected.name} {inspected.version})")
        else:
            install_zip(args.zip, args.bundle_dir, args.name)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
