"""Model-zoo conventions every bundle meets: the file set, configs that parse into MONAI workflows, metadata that
passes the zoo's schema, an inference network that verify_net_in_out accepts, and code that imports only what the
metadata declares (a zipped bundle runs on its own)."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ALL_BUNDLES, SCHEMA, SCHEMA_MD5
from monai.bundle import ConfigWorkflow

BUNDLE_IDS = [b.name for b in ALL_BUNDLES]
REQUIRED_FILES = ["configs/metadata.json", "configs/train.json", "configs/evaluate.json", "configs/inference.json",
                  "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md", "LICENSE",
                  "scripts/__init__.py"]


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
def test_bundle_has_the_model_zoo_file_set(bundle: Path):
    assert [f for f in REQUIRED_FILES if not (bundle / f).is_file()] == []
    for config in (bundle / "configs").glob("*.json"):
        json.loads(config.read_text())


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
def test_configs_parse_and_instantiate(bundle: Path, synthetic_dataset, semi_dataset, tmp_path, bundle_on_path):
    bundle_on_path(bundle)
    # SemSim refuses to build its semi-supervised trainer without unlabeled images
    dataset = semi_dataset if bundle.name == "semsim_segmentation" else synthetic_dataset
    for config_file, workflow_type, ids in (
        ("train.json", "train", ["network", "loss", "train#trainer", "validate#evaluator"]),
        ("inference.json", "infer", ["network", "evaluator"]),
    ):
        workflow = ConfigWorkflow(config_file=str(bundle / "configs" / config_file),
                                  meta_file=str(bundle / "configs/metadata.json"), workflow_type=workflow_type,
                                  bundle_root=str(tmp_path), dataset_dir=str(dataset),
                                  roi_size=[32, 32, 32], num_workers=0)
        workflow.initialize()
        assert workflow.check_properties() == []
        for id_ in ids:
            assert workflow.parser.get_parsed_content(id_) is not None, id_


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
def test_verify_net_in_out(bundle: Path):
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_net_in_out", "--net_id", "network_def",
                           "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
                           "--bundle_root", ".", "--n", "2"], cwd=bundle, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified with no error" in proc.stdout + proc.stderr


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=BUNDLE_IDS)
@pytest.mark.parametrize("drop_key", [None, "required_packages_version"])
def test_verify_metadata_offline(bundle: Path, tmp_path, drop_key):
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    if drop_key:
        del meta[drop_key]
    meta_file = tmp_path / "metadata.json"
    meta_file.write_text(json.dumps(meta))
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta_file),
                           "--filepath", str(schema), "--hash_val", SCHEMA_MD5], capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if drop_key:
        assert proc.returncode != 0 and f"'{drop_key}' is a required property" in output
    else:
        assert proc.returncode == 0 and "metadata is verified with no error" in output, output[-2000:]


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
