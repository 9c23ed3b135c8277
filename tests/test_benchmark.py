"""scripts/benchmark.py on two registry methods at the smallest sizes: behaviour, not speed (every arm built from
the bundle's configs, measured, and written in the one JSON format compare_methods.py reads)."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, load_module

import method_registry


@pytest.fixture(scope="module")
def benchmark():
    return load_module(REPO / "scripts" / "benchmark.py", "benchmark_tool")


@pytest.mark.parametrize("name", ["selfreg", "semsim"])
def test_tiny_benchmark_measures_every_registry_arm(benchmark, name, tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--method", name, "--iters", "1", "--warmup", "0", "--small", "--roi", "16", "16", "16",
                    "--volume", "24", "24", "24", "--device", "cpu", "--json", str(out)])
    result = json.loads(out.read_text())
    method = method_registry.by_name(name)
    assert list(result["arms"]) == list(method.arms) and result["against"] == method.baseline_arm
    for arm in result["arms"].values():
        assert arm["step_ms"] > 0 and arm["peak_memory_mib"] > 0 and arm["inference_ms"] > 0
        assert arm["saved_for_backward_mib"] > 0 and arm["parameters"] > 0
        assert arm["training_parameters"] >= arm["parameters"]
        assert arm["inference_max_abs_difference"] == 0  # the deployed network is the plain backbone
    first = result["arms"][method.baseline_arm]
    assert first["step_ratio"] == 1 and first["memory_ratio"] == 1 and first["inference_ratio"] == 1
    assert result["machine"]["torch_threads"] == 1 and result["settings"]["small"]
    assert f"| {method.method_arm} |" in capsys.readouterr().out


def test_arms_and_against_are_checked(benchmark):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--bundle", str(REPO / "bundles" / "selfreg_segmentation")])  # no --arm
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--method", "selfreg", "--against", "nonesuch"])
    args = benchmark.parse_args(["--method", "semsim", "--against", "fixmatch", "--arm", "fixmatch=--intra_weight 0",
                                 "--arm", "semsim="])
    assert [arm.name for arm in args.arm] == ["fixmatch", "semsim"] and args.against == "fixmatch"
    assert args.arm[0].overrides == {"intra_weight": "0"}
