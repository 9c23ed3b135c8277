"""``torch.export`` of the trained network (template ``configs/export.json``, run id ``export``;
``scripts/export.py``) and inference through the program (``inference.json --network_program models/model.pt2``).

One tiny SelfReg bundle is trained for an epoch in process; the export runs as the documented command line. The
program is reloaded with ``torch.export.load`` and compared with the eager network within 1e-4 on windows of a real
MRI volume (tests' ``real_volume``: the cached MNI T1 slab) of several sizes; inference through the program writes
the eager segmentation; refusals: a window outside the bounds, weights other than the exported ones, an existing
program, SwinUNETR (whose window count torch.export fixes). UNet is exported through the same function at its own
divisor. The packaging tool's ``--program`` is checked on the same run.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import package_bundle
import pytest
import torch
import yaml
from helpers import (
    METHODS,
    SELFREG_BUNDLE,
    bundle_input_window,
    bundle_scripts_module,
    in_bundle,
    refusal_in_process,
    run_bundle,
    small_backbone,
    small_run,
    workflow,
)

SELFREG = next(m for m in METHODS if m.bundle_dir == SELFREG_BUNDLE)
EXPORT_CONFIGS = ["configs/inference.json", "configs/export.json"]
TOLERANCE = 1e-4


def eager_network(root: Path) -> torch.nn.Module:
    """The trained run's network as inference.json builds it (recorded settings, models/model.pt), in eval mode."""
    with in_bundle(SELFREG_BUNDLE):
        flow = workflow(SELFREG_BUNDLE, ["inference.json"], None, bundle_root=str(root))
        network = flow.parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(root / "models/model.pt", weights_only=True))
    return network.eval()


def assert_program_matches_eager(program: Path, eager: torch.nn.Module, windows: list[torch.Tensor]) -> None:
    reloaded = torch.export.load(program).module()
    with torch.no_grad():
        for x in windows:
            torch.testing.assert_close(reloaded(x), eager(x), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synthetic_dataset) -> Path:
    """A tiny SelfReg run (SegResNet, init_filters 8, 32^3 crops; 1 epoch) exported by the documented command:
    its bundle_root, holding models/model.pt, model_settings.json and model.pt2."""
    root = tmp_path_factory.mktemp("export") / "run"
    with in_bundle(SELFREG_BUNDLE):
        flow = workflow(SELFREG_BUNDLE, SELFREG.training.configs, "train", run_id=SELFREG.training.run_id,
                        bundle_root=str(root), dataset_dir=str(synthetic_dataset), max_epochs=1, **small_run(SELFREG))
        flow.run()
        flow.finalize()
    run_bundle(SELFREG_BUNDLE, EXPORT_CONFIGS, "--bundle_root", str(root), run_id="export")
    return root


def test_export_writes_a_program_with_dynamic_sizes_that_matches_eager(exported, real_volume):
    """The program takes a batch of windows of any multiple of SegResNet's divisor (8) within its bounds, and
    matches eager within 1e-4 on real MRI windows of four shapes; the bounds travel inside the .pt2."""
    extra = {"bounds.json": ""}
    torch.export.load(exported / "models/model.pt2", extra_files=extra)
    bounds = json.loads(extra["bounds.json"])
    assert {k: bounds[k] for k in ("divisor", "min_size", "max_size", "max_batch", "spatial_dims", "device")} == {
        "divisor": 8, "min_size": 16, "max_size": 256, "max_batch": 64, "spatial_dims": 3, "device": "cpu"}
    with in_bundle(SELFREG_BUNDLE):
        windows = [bundle_input_window(SELFREG_BUNDLE, real_volume, shape)
                   for shape in ([32, 32, 32], [48, 16, 24], [16, 64, 40])]
    windows.append(torch.cat(windows[:1] * 3))  # three windows at once, as the sliding-window inferer batches them
    assert_program_matches_eager(exported / "models/model.pt2", eager_network(exported), windows)


def infer(root: Path, images: Path, out: Path, **overrides) -> dict[str, np.ndarray]:
    with in_bundle(SELFREG_BUNDLE):
        flow = workflow(SELFREG_BUNDLE, ["inference.json"], "infer", bundle_root=str(root), dataset_dir=str(images),
                        output_dir=str(out), num_workers=0, **overrides)
        flow.run()
        flow.finalize()
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(out.glob("*_seg.nii.gz"))}


def test_inference_through_the_program_writes_the_eager_segmentation(exported, real_volume, tmp_path):
    """One override runs inference.json through the program: on the real MRI slab (sliding 32^3 windows, two at
    once, a smaller last batch), the written segmentation equals the eager one voxel for voxel."""
    images = tmp_path / "data" / "imagesTs"
    images.mkdir(parents=True)
    shutil.copy(real_volume, images)
    eager = infer(exported, images.parent, tmp_path / "eager")
    program = infer(exported, images.parent, tmp_path / "program",
                    network_program=str(exported / "models/model.pt2"))
    assert list(eager) == list(program) == [real_volume.name.replace(".nii.gz", "_seg.nii.gz")]
    name = list(eager)[0]
    assert len(np.unique(eager[name])) > 1  # a real segmentation, not one label everywhere
    np.testing.assert_array_equal(program[name], eager[name])


@pytest.mark.parametrize("override, message", [
    ({"roi_size": [8, 8, 8]}, "roi_size [8, 8, 8] is not made of multiples of 8 from 16 to 256"),
    ({"sw_batch_size": 65}, "sw_batch_size 65 is above the program's largest batch 64"),
])
def test_inference_refuses_a_window_the_program_cannot_take(exported, synthetic_dataset, override, message):
    with in_bundle(SELFREG_BUNDLE):
        text = refusal_in_process(SELFREG_BUNDLE, ["inference.json"], "run", "evaluator", bundle_root=str(exported),
                                  dataset_dir=str(synthetic_dataset), network_program=str(exported / "models/model.pt2"),
                                  num_workers=0, **override)
    assert f"{exported / 'models/model.pt2'} cannot run this sliding window: {message}" in text
    assert "--export_max_size" in text


def test_inference_refuses_a_program_exported_from_other_weights(exported, synthetic_dataset, tmp_path):
    """A model retrained after its export: inference loads models/model.pt into the program's place and refuses
    weights that differ from the exported ones, instead of running the stale program."""
    root = tmp_path / "run"
    shutil.copytree(exported / "models", root / "models")
    weights = torch.load(root / "models/model.pt", weights_only=True)
    weights["convInit.conv.weight"] += 0.01
    torch.save(weights, root / "models/model.pt")
    with pytest.raises(RuntimeError) as refusal:  # the config's run expression, raised from the loader's refusal
        infer(root, synthetic_dataset, tmp_path / "out", network_program=str(root / "models/model.pt2"))
    assert "are not the ones it was exported with (1 tensors differ, e.g. convInit.conv.weight)" in str(
        refusal.value.__cause__)
    assert not list((tmp_path / "out").glob("*"))


def test_export_never_replaces_a_program_silently(exported, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(exported / "models", root / "models")
    before = (root / "models/model.pt2").read_bytes()
    with in_bundle(SELFREG_BUNDLE):
        text = refusal_in_process(SELFREG_BUNDLE, EXPORT_CONFIGS, "export", "evaluator", bundle_root=str(root))
    assert f"{root / 'models/model.pt2'} exists and is not overwritten" in text and "--overwrite True" in text
    assert (root / "models/model.pt2").read_bytes() == before
    assert sorted(p.name for p in (root / "models").iterdir()) == sorted(p.name for p in (exported / "models").iterdir())


def test_unet_program_takes_multiples_of_its_stride_product(real_volume, tmp_path):
    """UNet (four strides of 2: divisor 16) through the same export function, from a checkpoint of seeded weights."""
    export = bundle_scripts_module(SELFREG_BUNDLE, "export")
    torch.manual_seed(0)
    unet = small_backbone("unet").eval()
    torch.save(unet.state_dict(), tmp_path / "model.pt")
    program = tmp_path / "model.pt2"
    export.export_network(small_backbone("unet"), str(tmp_path / "model.pt"), str(program), roi_size=[32, 32, 32],
                          sw_batch_size=2, in_channels=1)
    with in_bundle(SELFREG_BUNDLE):
        windows = [bundle_input_window(SELFREG_BUNDLE, real_volume, shape) for shape in ([32, 32, 32], [64, 32, 48])]
    assert_program_matches_eager(program, unet, windows)
    with pytest.raises(ValueError, match="multiples of 16 from 32 to 256"):
        export.load_program(str(program), "cpu", roi_size=[16, 32, 32], sw_batch_size=2, in_channels=1)


def test_swinunetr_is_refused_with_the_cause(tmp_path):
    """SwinUNETR's window padding is plain Python arithmetic on the input size, which torch.export fixes: the tool
    refuses it before exporting (measured in docs/export.md: a 64^3 export took 10 minutes on this machine and its
    program failed at 64 x 64 x 96)."""
    export = bundle_scripts_module(SELFREG_BUNDLE, "export")
    torch.save(small_backbone("swinunetr").state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"SwinUNETR cannot be exported with dynamic sizes: .*int\(np.ceil"):
        export.export_network(small_backbone("swinunetr"), str(tmp_path / "model.pt"), str(tmp_path / "model.pt2"),
                              roi_size=[64, 64, 64], sw_batch_size=2, in_channels=1)
    assert list(tmp_path.iterdir()) == [tmp_path / "model.pt"]


def test_package_includes_the_program_listed_with_its_hash(exported, tmp_path, capsys):
    """``package --weights RUN --program RUN`` puts models/model.pt2 in the zip, with its sha256 in
    large_files.yml; a program exported from other weights is refused, and nothing is written."""
    bundle = Path(shutil.copytree(SELFREG_BUNDLE, tmp_path / SELFREG_BUNDLE.name,
                                  ignore=shutil.ignore_patterns("__pycache__")))
    edit = json.loads((bundle / "configs/inference.json").read_text())
    edit["backbones"]["segresnet"]["init_filters"] = 8  # the trained run's network
    (bundle / "configs/inference.json").write_text(json.dumps(edit, indent=4))
    dist = tmp_path / "dist"
    assert package_bundle.main(["package", str(bundle), "--out", str(dist), "--weights", str(exported),
                                "--program", str(exported)]) == 0
    (zip_path,) = dist.glob("*.zip")
    with zipfile.ZipFile(zip_path) as zf:
        program = zf.read(f"{bundle.name}/models/model.pt2")
        large = yaml.safe_load(zf.read(f"{bundle.name}/large_files.yml"))["large_files"]
    assert program == (exported / "models/model.pt2").read_bytes()
    entry = next(e for e in large if e["path"] == "models/model.pt2")
    assert entry["hash_val"] == package_bundle.file_digest(exported / "models/model.pt2", "sha256")
    other = tmp_path / "other.pt"
    weights = torch.load(exported / "models/model.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, other)
    assert package_bundle.main(["package", str(bundle), "--out", str(tmp_path / "dist2"), "--weights", str(other),
                                "--program", str(exported)]) == 1
    assert "was exported from other weights than" in capsys.readouterr().err
    assert not (tmp_path / "dist2").exists()
