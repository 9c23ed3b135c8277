"""Model-zoo conventions every bundle meets: the checks of the zoo's CI (ci/verify_bundle.py: required files, version
and changelog, verify_metadata against the zoo's schema kept offline, inference properties, verify_net_in_out,
TorchScript export), configs that parse into MONAI workflows, and code that imports only what the metadata declares
(a zipped bundle runs on its own). ONNX export and the other backbones' exports: test_export.py."""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
from functools import partial
from pathlib import Path

import pytest
from helpers import (
    ALL_BUNDLES,
    SCHEMA,
    SCHEMA_MD5,
    assert_export_matches_eager,
    bundle_input_window,
    export_bundle_network,
    in_bundle,
    method_params,
)
from monai.bundle import ConfigWorkflow, create_workflow, verify_metadata, verify_net_in_out
from monai.data import load_net_with_metadata

BUNDLE_IDS = [b.name for b in ALL_BUNDLES]
# The zoo's CI requires configs/metadata.json and a file named exactly LICENSE, and fails without an inference
# config; CONTRIBUTING asks for docs/data_license.txt when the data has licence terms (the MNI template has). The
# zoo's other preferred file, the trained models/model.pt, is not in the source bundle: a user trains it, and
# `scripts/package_bundle.py package --weights RUN_DIR` puts it in the zip.
REQUIRED_FILES = ["configs/metadata.json", "configs/train.json", "configs/evaluate.json", "configs/inference.json",
                  "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md", "docs/data_license.txt",
                  "LICENSE", "scripts/__init__.py"]
# The zoo's limit per file; larger files (weights) are listed in large_files.yml instead. models/ and eval/ hold
# the outputs of runs in the bundle folder, not bundle files.
MAX_FILE_BYTES = 25 * 1024 * 1024
RUN_OUTPUTS = {"models", "eval", "runs", "mlruns", "__pycache__"}


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
def test_bundle_has_the_model_zoo_file_set(bundle: Path):
    """Model-zoo check (b), the directory check."""
    assert [f for f in REQUIRED_FILES if not (bundle / f).is_file()] == []
    for config in (bundle / "configs").glob("*.json"):
        json.loads(config.read_text())
    files = [p for p in bundle.rglob("*") if p.is_file() and not RUN_OUTPUTS & set(p.relative_to(bundle).parts)]
    assert [str(p) for p in files if p.stat().st_size > MAX_FILE_BYTES] == []


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
def test_model_zoo_version_and_changelog(bundle: Path):
    """Model-zoo check (c): ``version`` is a MAJOR.MINOR.PATCH version and the newest entry of ``changelog``. (The
    zoo also refuses a version already published in its models/model_info.json, which this repository has not.)"""
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    versions = [meta["version"], *meta["changelog"]]
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in versions), versions
    assert meta["version"] in meta["changelog"]
    assert max(versions, key=lambda v: tuple(int(n) for n in v.split("."))) == meta["version"]


@pytest.mark.parametrize("method", method_params())
def test_configs_parse_and_instantiate(method, dataset_for, tmp_path):
    bundle = method.bundle_dir
    # a method that trains on unlabeled images (SemSim) refuses to build its trainer without them
    dataset = dataset_for(method)
    for config_file, workflow_type, ids in (
        ("train.json", "train", ["network", "loss", "train#trainer", "validate#evaluator"]),
        ("inference.json", "infer", ["network", "evaluator"]),
    ):
        with in_bundle(bundle):
            workflow = ConfigWorkflow(config_file=str(bundle / "configs" / config_file),
                                      meta_file=str(bundle / "configs/metadata.json"), workflow_type=workflow_type,
                                      logging_file=False, bundle_root=str(tmp_path), dataset_dir=str(dataset),
                                      roi_size=[32, 32, 32], num_workers=0)
            workflow.initialize()
            assert workflow.check_properties() == []
            for id_ in ids:
                assert workflow.parser.get_parsed_content(id_) is not None, id_


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
def test_verify_net_in_out(bundle: Path):
    """Model-zoo check (f), called as ci/verify_bundle.py calls it (in process, as ``python -m monai.bundle
    verify_net_in_out`` runs it), at n = 2: a 64^3 input, the smallest every backbone takes. Raises on a mismatch."""
    with in_bundle(bundle):
        verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs/metadata.json"),
                          config_file=str(bundle / "configs/inference.json"), bundle_root=str(bundle), n=2)


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
@pytest.mark.parametrize("drop_key", [None, "required_packages_version"])
def test_verify_metadata_offline(bundle: Path, tmp_path, drop_key):
    """Model-zoo check (d) against the zoo's schema kept in tests/data (an existing, hash-checked schema file is not
    downloaded), called as ci/verify_bundle.py calls it; a metadata without a required key is refused."""
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    if drop_key:
        del meta[drop_key]
    meta_file = tmp_path / "metadata.json"
    meta_file.write_text(json.dumps(meta))
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)
    verify = partial(verify_metadata, meta_file=str(meta_file), filepath=str(schema), hash_val=SCHEMA_MD5)
    if drop_key:
        with pytest.raises(ValueError, match=f"'{drop_key}' is a required property"):
            verify()
    else:
        verify()


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
def test_bundle_code_imports_only_declared_packages(bundle: Path):
    """A zipped bundle must run on its own: its scripts import only the stdlib, MONAI, torch, numpy, the packages
    its metadata lists and its own modules (relative imports), never the repository."""
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    import_names = {"pytorch-ignite": "ignite"}
    allowed = {"monai", "torch", "numpy"} | {import_names.get(p, p) for p in meta["required_packages_version"]}
    imported = set()
    for path in (bundle / "scripts").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) - {"__future__"} <= allowed


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
def test_model_zoo_inference_properties(bundle: Path):
    """Model-zoo check (e) as ci/verify_bundle.py runs it: ``create_workflow`` on inference.json with the bundle's
    own settings has every required Meta and Infer property, and the ones MONAI Label reads hold the metadata's."""
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    with in_bundle(bundle):
        workflow = create_workflow(workflow_type="inference", config_file=str(bundle / "configs/inference.json"),
                                   meta_file=str(bundle / "configs/metadata.json"),
                                   logging_file=str(bundle / "configs/logging.conf"), bundle_root=str(bundle))
        assert workflow.check_properties() == []
    network_format = meta["network_data_format"]
    assert workflow.version == meta["version"]
    assert workflow.spatial_shape == network_format["inputs"]["image"]["spatial_shape"]
    assert workflow.channel_def == network_format["outputs"]["pred"]["channel_def"]


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
def test_model_zoo_torchscript_export(bundle: Path, real_volume, tmp_path):
    """Model-zoo check (g): ``ckpt_export`` of inference.json's ``network_def`` from a checkpoint, as
    ci/verify_bundle.py runs it, then ``torch.jit.load``. Beyond the zoo: the TorchScript model carries the bundle's
    metadata and inference config, and matches eager output on a real MRI window of the sliding-window size."""
    inference = json.loads((bundle / "configs/inference.json").read_text())
    window = inference["shipped_settings"]["roi_size"]  # no trained model's settings recorded here
    with in_bundle(bundle):
        eager, exported = export_bundle_network(bundle, "torchscript", tmp_path, [1, 1, *window], {})
        x = bundle_input_window(bundle, real_volume, window)
    _, meta, extra = load_net_with_metadata(str(exported), more_extra_files=("inference.json",))
    assert meta["version"] == json.loads((bundle / "configs/metadata.json").read_text())["version"]
    assert json.loads(extra["inference.json"]) == inference
    assert_export_matches_eager(eager, exported, x)
