"""The bundles are generated from bundles/template and bundles/methods/<method>: merge rules, headers and drift."""

from __future__ import annotations

import json

import pytest
from helpers import ALL_BUNDLES, REPO, load_module

generate = load_module(REPO / "scripts" / "generate_bundles.py", "generate_bundles_tool")


def test_committed_bundles_match_their_sources():
    assert generate.drift() == [], "edit bundles/template or bundles/methods, then run python scripts/generate_bundles.py"


def test_every_bundle_folder_is_generated_by_one_method():
    assert sorted(generate.bundle_dir(m) for m in generate.methods()) == ALL_BUNDLES


def test_fragment_merges_as_load_config_files_does():
    template = {"a": 1, "backbones": {"x": 1}, "net": {"k": [1, 2], "j": 2}, "run": ["@a", "@net"]}
    fragment = {"net#k": [3], "w": 0.5, "w_loss": {"_target_": "L", "w": "@w"}, "run": ["@w_loss"], "a": 2}
    merged = generate.merge(template, fragment)
    assert merged["net"] == {"k": [3], "j": 2}  # a #-path replaces one nested item; lists are replaced, not merged
    assert merged["run"] == ["@w_loss"] and merged["a"] == 2
    # new ids follow the id before them in the fragment: w after net (net#k), w_loss after w
    assert list(merged) == ["a", "backbones", "net", "w", "w_loss", "run"]
    assert template["net"]["k"] == [1, 2]  # the template is not modified


def test_first_new_id_goes_after_the_backbones_and_flat_overlay_ids_stay_flat():
    merged = generate.merge({"device": "cpu", "backbones": {}, "loss": 1}, {"my_weight": 1.0})
    assert list(merged) == ["device", "backbones", "my_weight", "loss"]
    overlay = generate.merge({"train#sampler": {"_target_": "S"}}, {"train#unlabeled_sampler": {"_target_": "S"}})
    assert list(overlay) == ["train#sampler", "train#unlabeled_sampler"]


def test_after_places_new_ids_after_a_template_id_without_restating_it():
    template = {"cache_dir": "'/c'", "backbones": {}, "make_plan": {"a": 1}}
    merged = generate.merge(template, {"_after_": "cache_dir", "pool": "'/p'", "make_plan#pool": "@pool"})
    assert list(merged) == ["cache_dir", "pool", "backbones", "make_plan"]
    assert merged["cache_dir"] == "'/c'" and merged["make_plan"] == {"a": 1, "pool": "@pool"}
    with pytest.raises(SystemExit, match="names no id of the template"):
        generate.merge(template, {"_after_": "cache", "pool": 1})


def test_generated_files_name_their_sources():
    for bundle in ALL_BUNDLES:
        train = json.loads((bundle / "configs/train.json").read_text())
        assert "bundles/template/configs/train.json" in train[generate.JSON_HEADER_KEY]
        for module in (bundle / "scripts").glob("*.py"):
            assert module.read_text().startswith("# Generated from bundles/"), module
        assert (bundle / "configs/logging.conf").read_text().startswith("# Generated from bundles/template/")
