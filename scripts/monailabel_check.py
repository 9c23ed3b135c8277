"""Check every bundle in MONAI Label's stock ``monaibundle`` sample app against a live server, on real MRI.

Run by ``scripts/monailabel_check.sh`` with the Python of ``.venv-monailabel`` (monailabel 0.8.5). It builds, in a
work folder outside the repository:

- ``app/``: a copy of the installed ``monailabel/sample-apps/monaibundle`` with a copy of every
  ``bundles/*_segmentation`` under ``app/model/<name>/`` (copies, not links: MONAI Label writes models/model.pt
  into the bundle), each with untrained ``models/model.pt`` weights (MONAI Label lists a bundle only once it has
  them). Nothing else is prepared: ReSeg's first ``/train`` must train its missing stage-1 teacher itself.
- ``studies/``: a datastore of real MRI from ``scripts/make_dataset.py``: the MNI tissue slabs 0, 1 and 3 labelled
  (``labels/final/``), slab 2 and two other heads (ITK, LSA at 2x2x3 mm; ROBEX) unlabelled.

Then it starts ``monailabel start_server`` on 127.0.0.1 (a free port, ``--conf zoo_source github`` so nothing is
downloaded) and, for every bundle: ``/info`` lists it with its labels and dimension 3; ``/infer`` on two images returns
a label volume with the input's shape and affine and only the bundle's label values; ``/train`` (one epoch, CPU)
rewrites ``models/model.pt`` twice in a row (MONAI Label trains again after each round of labelling), the first time
with training options a client sets (learning rate, crop size, the method's weights), which the bundle must log as the
values it trains with; ``/infer`` then serves the trained model. A method with a prerequisite stage (ReSeg's teacher)
must train it in the first ``/train``, with its progress in the log, and not again in the second. A method that needs
unlabelled images (SemSim) must report the datastore's unlabelled images as its unlabelled pool in the first round, and
train without them in the second, where the client switches the pool off. Any failure ends the run with a non-zero exit
and the server log's tail; the server is stopped in every case, and nothing may have been written into the repository
bundles' output folders (models/, eval/, ...).

    .venv-monailabel/bin/python scripts/monailabel_check.py [--workdir DIR] [--data-cache DIR] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

# scripts/ is this script's folder, first on sys.path: its tools import as top-level modules
import method_registry
from method_registry import Method

REPO = Path(__file__).resolve().parent.parent
METHODS = method_registry.all_methods()
BUNDLES = [m.bundle_dir for m in METHODS]
METHOD_OF = {m.bundle: m for m in METHODS}
# What the repository's bundle folders may hold from local runs; none of it belongs in the app's copy.
LOCAL_OUTPUTS = ("models", "eval", "runs", "mlruns", "__pycache__")
LABELS = {"grey matter": 1, "white matter": 2}  # every bundle's metadata channel_def, without the background
LABELED = ("mni_slab0", "mni_slab1", "mni_slab3")
UNLABELED = ("mni_slab2", "itk_head", "robex_head")
INFER_IMAGES = ("mni_slab2", "itk_head")  # RAS at 1 mm, and LSA at 2x2x3 mm
SERVER_START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 1800
LOG_TAIL_LINES = 80


class CheckFailed(Exception):
    """A MONAI Label check did not pass; the message says which and why."""


def log(message: str) -> None:
    print(f"[monailabel_check] {message}", flush=True)


@contextmanager
def timed(step: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.monotonic()
    yield
    timings[step] = time.monotonic() - start
    log(f"{step}: {timings[step]:.1f} s")


def snapshot_outputs() -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file in the repository bundles' output folders (models/, eval/, ...), where a run
    would write if it used them instead of the app's copies; compared before and after the run."""
    files = [p for b in BUNDLES for name in LOCAL_OUTPUTS for p in (b / name).rglob("*") if p.is_file()]
    return {str(p.relative_to(REPO)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_make_dataset():
    spec = importlib.util.spec_from_file_location("make_dataset_tool", REPO / "scripts/make_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_datastore(work: Path, data_cache: str | None) -> Path:
    """``work/studies``: the real-MRI images, the labelled ones' labels under ``labels/final``."""
    make_dataset = load_make_dataset()
    images: dict[str, Path] = {}
    for task in ("tissue", "brain"):
        info = make_dataset.make_dataset(task, work / "data" / task, cache_dir=data_cache)
        if info.source != "real":
            raise CheckFailed(f"make_dataset.py could not fetch the real {task} volumes ({info.description}): pass "
                              "--data-cache with a folder that holds them, or let it reach PyPI and Debian")
        images.update({p.name.split(".")[0]: p for p in (work / "data" / task).glob("images*/*.nii.gz")})
    studies = work / "studies"
    (studies / "labels/final").mkdir(parents=True)
    for name in (*LABELED, *UNLABELED):
        shutil.copy(images[name], studies / f"{name}.nii.gz")
    for name in LABELED:
        label = next((work / "data/tissue").glob(f"labels*/{name}.nii.gz"))
        shutil.copy(label, studies / "labels/final" / f"{name}.nii.gz")
    return studies


def sample_app() -> Path:
    """The stock monaibundle app that the monailabel wheel installs under the environment's prefix."""
    app = Path(sys.prefix) / "monailabel/sample-apps/monaibundle"
    if not (app / "main.py").is_file():
        raise CheckFailed(f"{app}/main.py not found: run this with the Python of the monailabel 0.8.5 environment "
                          "(scripts/monailabel_check.sh creates it)")
    return app


def run_logged(cmd: list[str], cwd: Path, log_file: Path, what: str) -> None:
    """Run ``cmd``; on failure raise with the tail of its output (kept whole in ``log_file``)."""
    with open(log_file, "w") as out:
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise CheckFailed(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{tail(log_file)}")


def write_untrained_model(bundle: Path, work: Path) -> None:
    """``models/model.pt``: seeded initial weights of inference.json's ``network_def``, as MONAI Label loads it."""
    code = (
        "import torch; from monai.bundle import ConfigParser; torch.manual_seed(0); p = ConfigParser(); "
        "p.read_config('configs/inference.json'); "
        "torch.save(p.get_parsed_content('network_def').state_dict(), 'models/model.pt')"
    )
    (bundle / "models").mkdir()
    # A subprocess in the bundle folder, so that the bundle's own ``scripts`` package is the one imported.
    run_logged([sys.executable, "-c", code], bundle, work / f"{bundle.name}_init.log", f"writing {bundle.name} weights")


def build_app(work: Path, studies: Path) -> Path:
    app = work / "app"
    shutil.copytree(sample_app(), app)
    for method in METHODS:
        target = app / "model" / method.bundle
        shutil.copytree(method.bundle_dir, target,
                        ignore=lambda folder, names: [n for n in names if n in LOCAL_OUTPUTS])
        write_untrained_model(target, work)
    return app


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return f"({path} was not written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Server:
    """``monailabel start_server`` in its own process group, so that stopping it also ends what it started."""

    def __init__(self, app: Path, studies: Path, log_file: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = log_file
        # ``python -m monailabel.main`` is what the ``monailabel`` command runs, without the command's wrapper, which
        # would put the folder two levels above it (here the repository) on PYTHONPATH.
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies",
               str(studies), "--host", "127.0.0.1", "--port", str(self.port),
               "--conf", "models", ",".join(b.name for b in BUNDLES),
               "--conf", "zoo_source", "github",  # local bundles only; the default asks the model zoo online
               "--conf", "sam2", "false"]
        log(f"starting {' '.join(cmd)}  (log: {log_file})")
        self._log = open(log_file, "w")
        self.proc = subprocess.Popen(cmd, cwd=app.parent, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CheckFailed(f"monailabel start_server exited with {self.proc.returncode} before it answered")
            try:
                response = requests.get(f"{self.url}/info/", timeout=10)
                if response.status_code == 200:
                    return response.json()
            except requests.ConnectionError:
                pass
            time.sleep(2)
        raise CheckFailed(f"the server did not answer /info/ within {SERVER_START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        log(f"server stopped (exit {self.proc.returncode})")


def post(url: str, what: str, **kwargs) -> requests.Response:
    response = requests.post(url, timeout=REQUEST_TIMEOUT_S, **kwargs)
    if response.status_code != 200:
        raise CheckFailed(f"{what}: HTTP {response.status_code}: {response.text[-2000:]}")
    return response


def check_info(info: dict) -> None:
    for bundle in BUNDLES:
        model = info.get("models", {}).get(bundle.name)
        if model is None:
            raise CheckFailed(f"/info lists no model {bundle.name}; models: {sorted(info.get('models', {}))}")
        if model.get("labels") != LABELS or model.get("dimension") != 3 or model.get("type") != "segmentation":
            raise CheckFailed(f"/info {bundle.name}: labels {model.get('labels')}, dimension {model.get('dimension')}, "
                              f"type {model.get('type')}; expected {LABELS}, 3, segmentation")
        if bundle.name not in info.get("trainers", {}):
            raise CheckFailed(f"/info lists no trainer {bundle.name}; trainers: {sorted(info.get('trainers', {}))}")
    log(f"/info: {len(BUNDLES)} bundles listed with labels {LABELS}, dimension 3, and a trainer each")


def check_infer(server: Server, bundle: str, image: str, studies: Path, out_dir: Path, tag: str = "") -> str:
    """``/infer`` returns a label volume on the input's grid with only background and the bundle's labels."""
    response = post(f"{server.url}/infer/{bundle}?image={image}&output=image", f"/infer {bundle} {image}",
                    files={"params": (None, json.dumps({"device": "cpu"}))})
    out = out_dir / f"{bundle}_{image}{tag}.nii.gz"
    out.write_bytes(response.content)
    source, label = nib.load(studies / f"{image}.nii.gz"), nib.load(out)
    values = np.unique(np.asarray(label.dataobj))
    problems = []
    if label.shape != source.shape:
        problems.append(f"shape {label.shape}, the input's is {source.shape}")
    if not np.allclose(label.affine, source.affine, atol=1e-4):
        problems.append(f"affine\n{label.affine}\nthe input's is\n{source.affine}")
    if not set(values.tolist()) <= {0, *LABELS.values()}:
        problems.append(f"label values {values.tolist()} outside {{0, {', '.join(map(str, LABELS.values()))}}}")
    if problems:
        raise CheckFailed(f"/infer {bundle} on {image} ({out}): " + "; ".join(problems))
    return f"{image} {label.shape} labels {values.tolist()}"


def client_options(method: Method, offered: dict, round_: int) -> dict:
    """The options a client sends in ``/train`` round ``round_``: every training option of the bundle
    (``displayable_configs``, which MONAI Label 0.8.5 reads from the request one by one) with the value /info offers
    (``offered``), epochs of 20 iterations and 32^3 crops, round 1 with a learning rate and method weights of its
    own, round 2 with the offered values, where a semi-supervised method's unlabelled pool is switched off. MONAI
    Label's own options are left at their defaults: its offered ``run_id`` "" would make MONAI resolve the whole
    config, not run id ``run``."""
    train_config = json.loads((method.bundle_dir / "configs/train.json").read_text())
    options = {name: offered[name] for name in train_config["displayable_configs"]}
    # epochs of 20 iterations of 32^3 crops keep the check short (without a plan an epoch is 250 iterations)
    options.update(max_epochs=1, device="cpu", multi_gpu=False, crop_size="32", iterations_per_epoch="20")
    if round_ == 1:
        options.update(learning_rate=0.0005, **{w: offered[w] / 2 for w in method.weights})
    elif method.needs_unlabeled:
        options["unlabeled_pool"] = False
    return options


def check_train(server: Server, bundle: str, model: Path, options: dict) -> str:
    """``/train`` (one epoch on CPU) with ``options`` rewrites models/model.pt and logs the options it trains with.
    Returns what the server logged during the request."""
    start = server.log_file.stat().st_size
    before = sha256(model)
    post(f"{server.url}/train/{bundle}?run_sync=true", f"/train {bundle}", json=options)
    if sha256(model) == before:
        raise CheckFailed(f"/train {bundle} answered 200 but left {model} unchanged")
    with open(server.log_file, errors="replace") as log_file:
        log_file.seek(start)
        logged = log_file.read()
    used = re.findall(r"training options: (.*); max_epochs (\d+), crop \[([\d, ]+)\]", logged)
    if len(used) != 1:
        raise CheckFailed(f"/train {bundle}: expected one 'training options:' line in the log, found {len(used)}")
    chosen, epochs, crop = used[0]
    chosen_names = ("learning_rate", "crop_size", "iterations_per_epoch", *METHOD_OF[bundle].weights)
    expected = [f"{name} {options[name]!r}" for name in chosen_names]
    missing = [e for e in expected if e not in chosen]
    if missing or epochs != "1" or crop.replace(" ", "") != "32,32,32":
        raise CheckFailed(f"/train {bundle}: the client's options {expected}, 1 epoch, crop {options['crop_size']!r} did "
                          f"not reach training, which logged: {used[0]}")
    if not re.search(rf"Iter: \d+/{options['iterations_per_epoch']} ", logged):
        raise CheckFailed(f"/train {bundle}: no epoch of {options['iterations_per_epoch']} iterations in the log")
    log(f"{bundle}: /train options reached training: {chosen}; max_epochs {epochs}, crop [{crop}]")
    return logged


def check_prerequisite_stage(method: Method, teacher: Path, logged: list[str], teacher_digest: str | None) -> None:
    """The first ``/train`` of a method with a prerequisite stage trained it, with its progress (the stage's
    iterations) logged between the announcement and the end, and wrote its file ``teacher`` (``teacher_digest``: its
    digest after round 1); the second left that file alone."""
    first, second = logged
    started, done = first.find("stage 1 of 2"), first.find("stage 1 done")
    if started < 0 or done < started or not re.search(r"Epoch: \d+/\d+, Iter: \d+/\d+", first[started:done]):
        raise CheckFailed(f"{method.title}'s first /train did not train its missing prerequisite stage with progress "
                          f"in the log ('stage 1 of 2', iterations, 'stage 1 done')")
    if not teacher.is_file():
        raise CheckFailed(f"{method.title}'s first /train wrote no {teacher}")
    if "stage 1 of 2" in second or sha256(teacher) != teacher_digest:
        raise CheckFailed(f"{method.title}'s second /train trained its prerequisite stage again")
    log(f"{method.bundle}: the first /train trained the missing {method.stage1.writes} first (progress logged), "
        "the second kept it")


def check_unlabeled_pool(method: Method, logged: list[str], studies: Path) -> None:
    """A semi-supervised method's first training took the datastore's unlabelled images as its unlabelled pool (the
    bundle logs it); its second, with the pool switched off by the client, trained no unlabelled term."""
    found = re.findall(r"the unlabelled pool is the (\d+) other image\(s\) in \['([^']+)'\]", logged[0])
    expected = (str(len(UNLABELED)), os.path.realpath(studies))
    if not found or any((count, os.path.realpath(folder)) != expected for count, folder in found):
        raise CheckFailed(f"{method.title}'s unlabelled pool was not the datastore's {len(UNLABELED)} unlabelled "
                          f"images in {studies}: the server log says {found or 'nothing about it'}")
    terms = re.findall(r"Metrics -- (train_\w+: .*)", logged[1])
    if not terms or any(term in line for line in terms for term in ("train_unlabeled", "train_intra", "train_cross")):
        raise CheckFailed(f"{method.title} trained unlabelled terms with the pool switched off: {terms}")
    log(f"{method.bundle}: unlabelled pool of {found[-1][0]} datastore images in {found[-1][1]}; off in round 2: {terms[-1]}")


def run_checks(work: Path, data_cache: str | None, timings: dict[str, float]) -> None:
    with timed("datastore (make_dataset.py, real MRI)", timings):
        studies = write_datastore(work, data_cache)
    with timed("app (copy sample app and bundles, initial weights)", timings):
        app = build_app(work, studies)
    server = Server(app, studies, work / "server.log")
    try:
        with timed("server start", timings):
            info = server.wait_ready()
        check_info(info)
        infer_dir = work / "infer"
        infer_dir.mkdir()
        for method in METHODS:
            bundle = method.bundle_dir
            model = app / "model" / bundle.name / "models/model.pt"
            with timed(f"{bundle.name} /infer x{len(INFER_IMAGES)}", timings):
                results = [check_infer(server, bundle.name, image, studies, infer_dir) for image in INFER_IMAGES]
            log(f"{bundle.name} /infer: " + "; ".join(results))
            offered = info["trainers"][bundle.name]["config"]
            stage1_file = app / "model" / bundle.name / method.stage1.writes if method.stage1 else None
            logged, stage1_digest = [], None
            for round_ in (1, 2):
                with timed(f"{bundle.name} /train round {round_}", timings):
                    logged.append(check_train(server, bundle.name, model, client_options(method, offered, round_)))
                if round_ == 1 and stage1_file is not None and stage1_file.is_file():
                    stage1_digest = sha256(stage1_file)
            if stage1_file is not None:
                check_prerequisite_stage(method, stage1_file, logged, stage1_digest)
            if method.needs_unlabeled:
                check_unlabeled_pool(method, logged, studies)
            with timed(f"{bundle.name} /infer with the trained model", timings):
                result = check_infer(server, bundle.name, INFER_IMAGES[0], studies, infer_dir, "_trained")
            log(f"{bundle.name} trained /infer: {result}")
    except Exception:
        log(f"server log tail ({server.log_file}):\n{tail(server.log_file)}")
        raise
    finally:
        server.stop()


def prepare_workdir(workdir: str | None) -> tuple[Path, bool]:
    """The work folder (created empty) and whether it is a temporary one."""
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="monailabel_check_")), True
    work = Path(workdir).expanduser().resolve()
    if work == REPO or REPO in work.parents:
        raise CheckFailed(f"--workdir {work} is inside the repository: pick a folder outside {REPO}")
    if work.exists() and any(work.iterdir()):
        raise CheckFailed(f"--workdir {work} is not empty: pick a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)
    return work, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="new or empty folder outside the repository (default: a temporary one, "
                        "deleted after a passing run unless --keep)")
    parser.add_argument("--data-cache", help="make_dataset.py's download cache (default $MB_DATA_CACHE or "
                        "~/.cache/monai_method_bundles)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder after a passing run")
    args = parser.parse_args(argv)
    # A plain kill runs the ``finally`` that stops the server, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    timings: dict[str, float] = {}
    start = time.monotonic()
    before = snapshot_outputs()
    work, temporary = None, False
    try:
        work, temporary = prepare_workdir(args.workdir)
        log(f"work folder {work}")
        run_checks(work, args.data_cache, timings)
        if snapshot_outputs() != before:
            raise CheckFailed(f"the run wrote into the output folders {LOCAL_OUTPUTS} of {REPO / 'bundles'}/*")
    except CheckFailed as err:
        log(f"FAILED: {err}" + (f"\n(work folder kept: {work})" if work else ""))
        return 1
    log("timings (s): " + ", ".join(f"{step} {seconds:.0f}" for step, seconds in timings.items()))
    log(f"PASSED: {len(BUNDLES)} bundles: /info, /infer, /train x2, trained /infer; {time.monotonic() - start:.0f} s")
    if temporary and not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
