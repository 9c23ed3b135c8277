"""Sharing bundles (scripts/package_bundle.py): model-zoo zips of every bundle that ``monai.bundle download``
installs, one of which then trains and infers in a clean folder on its own; refusals of bundles that fail the zoo
checks; weights packaged from a training output, large ones kept out of the zip with their hash; and untrusted
zips (crafted here with zipfile) refused, naming the bad member, before anything is extracted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import package_bundle
import pytest
import torch
import yaml
from helpers import ALL_BUNDLES, REPO, SCHEMA, VAE_BUNDLE
from monai.bundle import ConfigParser, download, download_large_files, verify_metadata
from monai.bundle.scripts import _get_git_release_url
from monai.networks.nets import SegResNet, UNet

TOOL = REPO / "scripts" / "package_bundle.py"
VAE = VAE_BUNDLE.name
VAE_ZIP = f"{VAE}_v{json.loads((VAE_BUNDLE / 'configs/metadata.json').read_text())['version']}.zip"
TINY = ["--roi_size", "[32,32,32]", "--spacing", "[1.5,1.5,1.5]", "--num_workers", "0", "--progress_bar", "False",
        "--iterations_per_epoch", "0"]
# Files a user may leave in a bundle folder that must not be shared: caches, outputs, logs, data, checkpoints.
JUNK = ["scripts/__pycache__/data.cpython-311.pyc", "eval/val_mean_dice_raw.csv", "runs/events.out.tfevents.1",
        "mlruns/0/meta.yaml", "models/checkpoint_epoch=2.pt", "data/imagesTr/case0.nii.gz", "train.log",
        "configs/monailabel_train.json", ".ipynb_checkpoints/README-checkpoint.md", "docs/case0_seg.nii.gz"]


def copy_bundle(bundle: Path, dest: Path) -> Path:
    """A copy of a repository bundle without the caches that test runs leave in it."""
    return Path(shutil.copytree(bundle, dest / bundle.name, ignore=shutil.ignore_patterns("__pycache__")))


def edit_json(path: Path, edit) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content, indent=4))


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def zip_files(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Path:
    """Every repository bundle packaged by one run of the tool."""
    out = tmp_path_factory.mktemp("dist")
    assert package_bundle.main(["package", *map(str, ALL_BUNDLES), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=[b.name for b in ALL_BUNDLES])
def test_every_bundle_zips_and_downloads_with_monai(bundle: Path, packaged, tmp_path, bundle_on_path):
    version = json.loads((bundle / "configs/metadata.json").read_text())["version"]
    zip_path = packaged / f"{bundle.name}_v{version}.zip"
    with zipfile.ZipFile(zip_path) as zf:
        infos = zf.infolist()
    assert all(i.filename.startswith(f"{bundle.name}/") and not i.is_dir() for i in infos)
    assert {i.date_time for i in infos} == {package_bundle.ZIP_DATE_TIME}
    download(name=bundle.name, url=zip_path.as_uri(), bundle_dir=str(tmp_path), progress=False)
    installed = tmp_path / bundle.name
    shipped = files_of(installed)
    assert {f"{bundle.name}/{rel}" for rel in shipped} == {i.filename for i in infos}
    assert shipped == {rel: (bundle / rel).read_bytes() for rel in shipped}  # byte for byte the source files
    assert not [rel for rel in shipped if "__pycache__" in rel or rel.startswith(("models/", "eval/"))]
    for config in (installed / "configs").glob("*.json"):
        ConfigParser.load_config_file(config)
    bundle_on_path(installed)
    parser = ConfigParser()
    parser.read_config(str(installed / "configs/inference.json"))
    assert isinstance(parser.get_parsed_content("network_def"), torch.nn.Module)


def test_downloaded_bundle_trains_and_infers_in_a_clean_folder(packaged, synthetic_dataset, tmp_path):
    """The round trip a user makes: monai.bundle download of the zip, then training and inference from the
    downloaded copy, in a folder holding only that bundle and the data, with nothing of this repository on the
    path."""
    clean = tmp_path / "clean"
    shutil.copytree(synthetic_dataset, clean / "data")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONWARNINGS": "ignore",
                                                                          "OMP_NUM_THREADS": "1"}

    def monai_bundle(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=clean, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{args[:2]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout + proc.stderr

    monai_bundle("download", "--name", VAE, "--url", (packaged / VAE_ZIP).as_uri(),
                 "--bundle_dir", "bundles")
    root = f"bundles/{VAE}"
    common = ["--meta_file", f"{root}/configs/metadata.json", "--logging_file", f"{root}/configs/logging.conf",
              "--bundle_root", root, "--dataset_dir", "data", *TINY]
    log = monai_bundle("run", "training", "--config_file", f"{root}/configs/train.json", "--max_epochs", "1", *common)
    assert "val_mean_dice" in log
    assert (clean / root / "models/model.pt").is_file()
    monai_bundle("run", "--config_file", f"{root}/configs/inference.json", "--output_dir", "pred", *common)
    for image in sorted((clean / "data/imagesTs").glob("*.nii.gz")):
        pred = nib.load(clean / "pred" / image.name.replace(".nii.gz", "_seg.nii.gz"))
        assert pred.shape == nib.load(image).shape
    assert sorted(p.name for p in clean.iterdir()) == ["bundles", "data", "pred"]


def test_package_leaves_out_outputs_is_deterministic_and_only_reads_the_source(tmp_path, capsys):
    bundle = copy_bundle(VAE_BUNDLE, tmp_path / "src")
    shareable = files_of(bundle)
    for rel in JUNK:
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        (bundle / rel).write_bytes(b"not for sharing")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in bundle.rglob("*") if p.is_file()}
    for out in ("out1", "out2"):
        assert package_bundle.main(["package", str(bundle), "--out", str(tmp_path / out)]) == 0
    zip1, zip2 = (tmp_path / out / VAE_ZIP for out in ("out1", "out2"))
    assert zip1.read_bytes() == zip2.read_bytes()
    assert zip_files(zip1) == {f"{VAE}/{rel}": content for rel, content in shareable.items()}
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in bundle.rglob("*") if p.is_file()} == before
    assert "left out: .ipynb_checkpoints/ (hidden), data/ (outputs or data)" in capsys.readouterr().out


def _set_version(meta: dict) -> None:
    meta["version"] = "99.0.0"


def _drop_required_packages(meta: dict) -> None:
    del meta["required_packages_version"]


def _five_output_channels(meta: dict) -> None:
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 5


@pytest.mark.parametrize("edit_metadata, remove, message", [
    (_set_version, None, "configs/metadata.json: version '99.0.0' has no entry in 'changelog'"),
    (_drop_required_packages, None, "fails the model-zoo schema: 'required_packages_version' is a required property"),
    (_five_output_channels, None, "configs/inference.json: verify_net_in_out failed on network_def"),
    (None, "LICENSE", "LICENSE: missing"),
], ids=["version_not_in_changelog", "metadata_schema", "network_io", "no_license"])
def test_package_refuses_a_bundle_failing_the_zoo_checks(tmp_path, capsys, edit_metadata, remove, message):
    bundle = copy_bundle(VAE_BUNDLE, tmp_path)
    if edit_metadata:
        edit_json(bundle / "configs/metadata.json", edit_metadata)
    if remove:
        (bundle / remove).unlink()
    assert package_bundle.main(["package", str(bundle), "--out", str(tmp_path / "dist")]) == 1
    err = capsys.readouterr().err
    assert f"refusing to package {bundle}" in err and message in err, err
    assert not (tmp_path / "dist").exists()


def test_package_refuses_to_write_into_the_bundle(tmp_path, capsys):
    bundle = copy_bundle(VAE_BUNDLE, tmp_path)
    assert package_bundle.main(["package", str(bundle), "--out", str(bundle / "dist")]) == 1
    assert f"{bundle / 'dist'}: the output folder is inside the bundle" in capsys.readouterr().err
    assert not (bundle / "dist").exists()


def test_weights_from_a_training_output_folder(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    # the plain network of the vae bundle's inference.json, as its training saves it
    torch.save(SegResNet(spatial_dims=3, init_filters=16, in_channels=1, out_channels=3).state_dict(),
               run / "models/model.pt")
    assert package_bundle.main(["package", str(VAE_BUNDLE), "--out", str(tmp_path / "dist"),
                                "--weights", str(run)]) == 0
    packaged_weights = zip_files(tmp_path / "dist" / VAE_ZIP)[f"{VAE}/models/model.pt"]
    assert packaged_weights == (run / "models/model.pt").read_bytes()
    torch.save(UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16), strides=(2,)).state_dict(),
               tmp_path / "unet.pt")
    assert package_bundle.main(["package", str(VAE_BUNDLE), "--out", str(tmp_path / "dist2"),
                                "--weights", str(tmp_path / "unet.pt")]) == 1
    assert f"{tmp_path / 'unet.pt'}: does not load into network_def" in capsys.readouterr().err
    assert not (tmp_path / "dist2").exists()


# -------------------------------------------------------------------- the model zoo's ci/verify_bundle.py -m min

# What the zoo's ci/verify_bundle.py checks in "min" mode (Project-MONAI/model-zoo, branch dev, commit dfae206),
# re-implemented here because the zoo's CI scripts are not part of any package and nothing may be downloaded.
ZOO_NECESSARY_FILES = ("configs/metadata.json", "LICENSE")
ZOO_PREFERRED_FILES = ("models/model.pt", "configs/inference.json")


def _zoo_find_bundle_file(root_dir: Path, file: str) -> str | None:
    names = [f"{file}.{suffix}" for suffix in ("json", "yaml", "yml") if f"{file}.{suffix}" in os.listdir(root_dir)]
    return names[-1] if names else None


def zoo_verify_min(models_path: Path, bundle_name: str) -> None:
    """``verify(bundle, models_path, mode="min")`` of the zoo's ci/verify_bundle.py, after its ci/prepare_schema.py:
    raises ValueError as the zoo's CI does. Left out: the version must not be in the zoo's model_info.json yet (a
    new bundle never is)."""
    from monai.apps.utils import download_url

    bundle_path = models_path / bundle_name
    # prepare_schema: the schema named in the metadata goes to eval/schema.json
    schema_url = json.loads((bundle_path / "configs/metadata.json").read_text())["schema"]
    schema_path = models_path / schema_url.split("/")[-1]
    download_url(url=schema_url, filepath=str(schema_path))
    (bundle_path / "eval").mkdir(exist_ok=True)
    shutil.copyfile(schema_path, bundle_path / "eval/schema.json")
    # verify_bundle_directory: large files first (utils.download_large_files), then the files
    large_file_name = _zoo_find_bundle_file(bundle_path, "large_files")
    if large_file_name is not None:
        parser = ConfigParser()
        parser.read_config(str(bundle_path / large_file_name))
        for lf_data in parser.get()["large_files"]:
            lf_data["fuzzy"] = True
            if "hash_val" in lf_data and lf_data.get("hash_val", "") == "":
                lf_data.pop("hash_val")
            if "hash_type" in lf_data and lf_data.get("hash_type", "") == "":
                lf_data.pop("hash_type")
            lf_data["filepath"] = os.path.join(bundle_path, lf_data.pop("path"))
            try:
                download_url(**lf_data)
            except Exception as e:
                raise ValueError(f"Download large files in {bundle_path} error.") from e
    for file in ZOO_NECESSARY_FILES:
        if not (bundle_path / file).exists():
            raise ValueError(f"necessary file {file} is not existing.")
    for file in ZOO_PREFERRED_FILES:
        if file == "configs/inference.json":
            if _zoo_find_bundle_file(bundle_path / "configs", "inference") is None:
                raise ValueError("inference config file is not existing.")
        elif not (bundle_path / file).exists():
            raise ValueError(f"necessary file {file} is not existing.")
    # verify_version_changes
    metadata = json.loads((bundle_path / "configs/metadata.json").read_text())
    for key in ("version", "changelog"):
        if key not in metadata:
            raise ValueError(f"'{key}' is missing in configs/metadata.json of bundle: {bundle_name}.")
    if metadata["version"] not in metadata["changelog"]:
        raise ValueError(f"version number: {metadata['version']} is missing in 'changelog' in configs/metadata.json")
    # verify_metadata_format
    verify_metadata(meta_file=str(bundle_path / "configs/metadata.json"),
                    filepath=str(bundle_path / "eval/schema.json"))


@pytest.fixture
def release_server(monkeypatch) -> SimpleNamespace:
    """Offline stand-in for the internet: monai's download_url fetches only the urls in ``served`` (url -> local
    file) and records them in ``fetched``; any other url is refused like an unpublished one (ConnectionError) and
    recorded in ``refused``. The bundles' metadata schema (the url in their metadata.json) is served from
    tests/data."""
    import monai.apps.utils

    schema_url = json.loads((VAE_BUNDLE / "configs/metadata.json").read_text())["schema"]
    assert schema_url.endswith(f"/{SCHEMA.name}")
    server = SimpleNamespace(served={schema_url: SCHEMA}, fetched=[], refused=[], schema_url=schema_url)

    def fake_download(url: str, filepath: Path, progress: bool = True) -> None:
        if url not in server.served:
            server.refused.append(url)
            raise ConnectionError(f"{url}: not served (the test runs offline)")
        server.fetched.append(url)
        shutil.copyfile(server.served[url], filepath)

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", fake_download)
    return server


def test_zoo_submission_zip_passes_verify_bundle_min(tmp_path, capsys, release_server):
    """The documented route to the model zoo: package with trained weights. The zip holds models/model.pt and a
    large_files.yml listing it (url of the release asset, sha256); its unzipped folder passes the zoo's
    ``verify_bundle.py -m min`` as it stands, and so does the folder a zoo pull request holds (large_files.yml
    without the weights, which the check then fetches from the url and hash-checks). A bundle packaged without
    weights is refused, as the repository bundles are."""
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    torch.manual_seed(0)  # seeded stand-in for trained weights of the vae bundle's inference network
    torch.save(SegResNet(spatial_dims=3, init_filters=16, in_channels=1, out_channels=3).state_dict(),
               run / "models/model.pt")
    weights = (run / "models/model.pt").read_bytes()
    dist = tmp_path / "dist"
    assert package_bundle.main(["package", str(VAE_BUNDLE), "--out", str(dist), "--weights", str(run),
                                "--release", "owner/repo/v1"]) == 0
    asset = dist / VAE_ZIP.replace(".zip", "_models_model.pt")
    assert f"models/model.pt: in the zip, listed in large_files.yml with its sha256, written as {asset}" in \
        capsys.readouterr().out
    assert asset.read_bytes() == weights
    members = zip_files(dist / VAE_ZIP)
    assert members[f"{VAE}/models/model.pt"] == weights
    url = _get_git_release_url("owner", "repo", "v1", asset.name)
    assert yaml.safe_load(members[f"{VAE}/large_files.yml"]) == {"large_files": [
        {"path": "models/model.pt", "url": url, "hash_val": hashlib.sha256(weights).hexdigest(),
         "hash_type": "sha256"}]}

    as_zipped = tmp_path / "zipped" / "models"
    with zipfile.ZipFile(dist / VAE_ZIP) as zf:
        zf.extractall(as_zipped)
    zoo_verify_min(as_zipped, VAE)  # the weights are there and match: nothing to fetch
    assert release_server.fetched == [release_server.schema_url] and not release_server.refused

    pull_request = tmp_path / "pull_request" / "models"
    shutil.copytree(as_zipped / VAE, pull_request / VAE, ignore=shutil.ignore_patterns("eval", "model.pt"))
    with pytest.raises(ValueError, match="Download large files"):  # the asset is not published yet
        zoo_verify_min(pull_request, VAE)
    release_server.served[url] = asset  # published
    zoo_verify_min(pull_request, VAE)
    assert (pull_request / VAE / "models/model.pt").read_bytes() == weights
    assert release_server.refused == [url] and release_server.fetched[-1] == url

    assert package_bundle.main(["package", str(VAE_BUNDLE), "--out", str(tmp_path / "code_only")]) == 0
    assert "no models/model.pt: the model zoo's ci/verify_bundle.py refuses" in capsys.readouterr().out
    code_only = tmp_path / "code_only" / "models"
    with zipfile.ZipFile(tmp_path / "code_only" / VAE_ZIP) as zf:
        zf.extractall(code_only)
    with pytest.raises(ValueError, match="necessary file models/model.pt is not existing"):
        zoo_verify_min(code_only, VAE)


def test_large_weights_are_listed_with_their_hash_and_checked_on_install(tmp_path, capsys):
    """A bundle whose network is too big for the zoo's 25 MB limit: its weights go next to the zip, listed in
    large_files.yml; install brings them in and refuses them once they no longer match."""
    bundle = copy_bundle(VAE_BUNDLE, tmp_path / "src")
    edit_json(bundle / "configs/inference.json",
              lambda config: config["backbones"]["segresnet"].update(init_filters=24))
    pretrained = b"pretrained encoder"  # a large file the bundle already lists: its entry is kept
    listed = {"path": "models/pretrained.pt", "url": "https://example.org/pretrained.pt",
              "hash_val": hashlib.sha256(pretrained).hexdigest(), "hash_type": "sha256"}
    (bundle / "large_files.yml").write_text(yaml.safe_dump({"large_files": [listed]}))
    weights = tmp_path / "model.pt"
    torch.save(SegResNet(spatial_dims=3, init_filters=24, in_channels=1, out_channels=3).state_dict(), weights)
    assert weights.stat().st_size > package_bundle.MAX_FILE_BYTES
    dist = tmp_path / "dist"
    assert package_bundle.main(["package", str(bundle), "--out", str(dist), "--weights", str(weights),
                                "--release", "owner/repo/v1"]) == 0
    zip_path, asset = dist / VAE_ZIP, dist / VAE_ZIP.replace(".zip", "_models_model.pt")
    members = zip_files(zip_path)
    assert f"{VAE}/models/model.pt" not in members
    assert yaml.safe_load(members[f"{VAE}/large_files.yml"]) == {"large_files": [listed, {
        "path": "models/model.pt", "url": _get_git_release_url("owner", "repo", "v1", asset.name),
        "hash_val": package_bundle.file_digest(weights, "sha256"), "hash_type": "sha256"}]}
    assert asset.read_bytes() == weights.read_bytes()
    # the zip itself is where monai.bundle download --source github looks for it
    assert f"the zip's address: {_get_git_release_url('owner', 'repo', 'v1', zip_path.name)}" in \
        capsys.readouterr().out

    installed = package_bundle.install_zip(zip_path, tmp_path / "installed")
    assert (installed / "models/model.pt").read_bytes() == weights.read_bytes()
    assert "not there yet (large_files.yml): models/pretrained.pt" in capsys.readouterr().out
    (installed / "models/pretrained.pt").write_bytes(pretrained)
    download_large_files(bundle_path=str(installed))  # monai reads our large_files.yml; the files are there: no fetch

    with open(asset, "r+b") as f:  # one flipped byte: a corrupt or replaced download
        f.seek(1000)
        f.write(bytes([f.read(1)[0] ^ 0xFF]))
    assert package_bundle.main(["install", str(zip_path), "--bundle_dir", str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err
    assert f"large file 'models/model.pt' ({asset}) does not match large_files.yml" in err and str(zip_path) in err
    assert not (tmp_path / "again" / VAE).exists()

    shutil.rmtree(dist)  # without a release, the url is left for the publisher, and large_files.yml says how
    assert package_bundle.main(["package", str(bundle), "--out", str(dist), "--weights", str(weights)]) == 0
    text = zip_files(zip_path)[f"{VAE}/large_files.yml"].decode()
    assert yaml.safe_load(text)["large_files"][1]["url"] == ""
    assert "set its\n# url" in text and "python -m monai.bundle download_large_files" in text


# ----------------------------------------------------------------------------------------------- crafted zips

NAME = "toy_segmentation"
METADATA = json.dumps({"version": "0.1.0"}).encode()
MODEL = b"weights"


def crafted_zip(path: Path, *extra: tuple[str | zipfile.ZipInfo, bytes], top: str = NAME) -> Path:
    """A minimal bundle zip (metadata and licence under ``top/``) plus ``extra`` members, written as an attacker
    or a careless tool could."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/configs/metadata.json", METADATA)
        zf.writestr(f"{top}/LICENSE", b"licence")
        for member, content in extra:
            zf.writestr(member, content)
    return path


def symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def large_files(content_hash: str) -> tuple[str, bytes]:
    return f"{NAME}/large_files.yml", yaml.safe_dump({"large_files": [
        {"path": "models/model.pt", "url": "", "hash_val": content_hash, "hash_type": "sha256"}]}).encode()


UNSAFE = {  # id: (extra members, top-level folder, the member the refusal must name, the reason it gives)
    "absolute_path": ([("/tmp/evil.txt", b"x")], NAME, "/tmp/evil.txt", "is an absolute path"),
    "drive_letter": ([("C:/evil.txt", b"x")], NAME, "C:/evil.txt", "starts with a drive letter"),
    "dot_dot": ([(f"{NAME}/../evil.txt", b"x")], NAME, f"{NAME}/../evil.txt", "has a '..' component"),
    "backslash": ([(f"{NAME}\\..\\evil.txt", b"x")], NAME, f"{NAME}\\..\\evil.txt", "uses '\\'"),
    "symlink": ([(symlink(f"{NAME}/models/model.pt"), b"/etc/passwd")], NAME, f"{NAME}/models/model.pt",
                "is a symbolic link"),
    "second_top_folder": ([("other/configs/metadata.json", b"{}")], NAME, "other/configs/metadata.json",
                          "lies outside the bundle folder"),
    "file_at_top": ([(f"{NAME}", b"x")], NAME, NAME, "is a file at the top level"),
    "folder_not_the_bundle_name": ([], "other_name", "other_name/LICENSE", "lies outside the bundle folder"),
    "duplicate_member": ([(f"{NAME}/LICENSE", b"replaced")], NAME, f"{NAME}/LICENSE", "appears twice"),
}


@pytest.mark.parametrize("case", UNSAFE)
def test_unsafe_zip_is_refused_naming_the_member(case, tmp_path, capsys):
    extra, top, member, reason = UNSAFE[case]
    zip_path = crafted_zip(tmp_path / f"{NAME}_v0.1.0.zip", *extra, top=top)
    assert package_bundle.main(["verify", str(zip_path)]) == 1
    assert package_bundle.main(["install", str(zip_path), "--bundle_dir", str(tmp_path / "bundles")]) == 1
    for err in capsys.readouterr().err.split("error: ")[1:]:
        assert f"refusing {zip_path}" in err and f"member '{member}' {reason}" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == [zip_path.name]  # nothing extracted anywhere


@pytest.mark.parametrize("name, message", [
    (f"{NAME}_v0.2.0.zip", f"the file name says version 0.2.0 but '{NAME}/configs/metadata.json' says 0.1.0"),
    ("other_v0.1.0.zip", f"member '{NAME}/configs/metadata.json' lies outside the bundle folder 'other/'"),
])
def test_zip_not_matching_its_name_is_refused(name, message, tmp_path):
    with pytest.raises(package_bundle.BundleError, match=message.replace("(", r"\(")):
        package_bundle.inspect_zip(crafted_zip(tmp_path / name))


def test_large_file_hash_mismatch_in_the_zip_is_refused(tmp_path):
    model = (f"{NAME}/models/model.pt", MODEL)
    good = crafted_zip(tmp_path / "good" / f"{NAME}_v0.1.0.zip", large_files(hashlib.sha256(MODEL).hexdigest()),
                       model)
    installed = package_bundle.install_zip(good, tmp_path / "bundles")
    assert (installed / "models/model.pt").read_bytes() == MODEL
    bad = crafted_zip(tmp_path / "bad" / f"{NAME}_v0.1.0.zip", large_files(hashlib.sha256(b"other").hexdigest()),
                      model)
    with pytest.raises(package_bundle.BundleError, match=f"large file 'models/model.pt' \\(member '{NAME}/models/"):
        package_bundle.install_zip(bad, tmp_path / "bundles2")
    assert not (tmp_path / "bundles2" / NAME).exists()


def test_cli_verifies_and_installs_a_zip(tmp_path):
    zip_path = crafted_zip(tmp_path / f"{NAME}_v0.1.0.zip")
    proc = subprocess.run([sys.executable, str(TOOL), "install", str(zip_path), "--bundle_dir", str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and files_of(tmp_path / "b" / NAME) == {"configs/metadata.json": METADATA,
                                                                      "LICENSE": b"licence"}
    proc = subprocess.run([sys.executable, str(TOOL), "install", str(zip_path), "--bundle_dir", str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and f"{tmp_path / 'b' / NAME}: already exists" in proc.stderr
