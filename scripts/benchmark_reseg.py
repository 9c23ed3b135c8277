"""What ReSeg's stage-2 loss costs, against the same backbone trained with the plain DiceCE loss.

For each backbone (SegResNet, UNet, SwinUNETR), measured in one run, on synthetic data:

1. stage-2 training step time (forward, ``ReSegLoss`` including the frozen teacher's forward on the encoded label
   under ``no_grad`` in eval mode, backward, Adam step; AMP + GradScaler on CUDA as the bundle's SupervisedTrainer):
   train.json's reseg_weight (a = 0.035) with the student and teacher taps, against reseg_weight 0, which is the
   bundle's baseline (no teacher, no hooks, exactly the DiceCE loss). The two start from the same weights and
   alternate step by step, so machine noise hits both. The teacher's no-grad forward is also timed on its own,
   as the main part of the difference;
2. training memory: the peak of a training step, each arm in a fresh subprocess (CUDA: peak allocated; CPU: peak
   RSS; the teacher's weights, like the network's, are built before the baseline is taken, its activations and
   features are counted), and the activations autograd saves for backward (exact, and the same on any device;
   the teacher's features enter the MSE terms and are saved with them);
3. sliding-window inference time per volume: the ReSeg-trained segmentation network in eval mode with its taps
   still attached (they store nothing outside training) against a fresh plain backbone built by
   configs/inference.json and loaded strictly with its weights; the times should be equal and the logits identical;
4. parameter counts: the segmentation network (the same in both arms, and the only network saved and deployed),
   and the teacher, which exists only in stage-2 training (frozen: no gradients, no optimizer state).

The teacher is randomly initialised, not trained by stage 1: the cost of a forward pass of a fixed architecture
does not depend on its weights, so no stage-1 checkpoint is needed. Stage 1 itself (training the reconstruction
network, the same backbone with the one-hot label as input and the image as target) is not measured.

Everything is built by the bundle's own configs through MONAI's ConfigParser, as ``monai.bundle run`` builds it:
configs/train.json's ``network`` (``backbones``), ``teacher`` (``reconstruction_backbones``: in_channels = number
of classes for the default one-hot label, out_channels = image channels, architecture taken from ``backbones``),
``reseg_pairs``, the taps, ``loss``, ``optimizer`` and the validation sliding-window inferer; the class count is
fixed to 3 (the bundle reads it from the datalist). ``--small`` overrides the backbone's size setting as the CLI
would (``--backbones#segresnet#init_filters 8``), which changes the teacher alike.

The issue's target is a stage-2 step at most 1.4 times the baseline's; the output says, per backbone, whether the
measured step ratio meets it. Runs one torch thread by default (``--threads``): steady timings on a shared
machine. Prints the machine first and a markdown table for the docs last.

    .venv/bin/python scripts/benchmark_reseg.py --small
    .venv/bin/python scripts/benchmark_reseg.py --backbones segresnet unet --iters 3 --warmup 1
    .venv/bin/python scripts/benchmark_reseg.py --device cuda --json reseg_bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "reseg_segmentation"
# Position 0: the bundle's ``scripts`` package must win over this repository's top-level scripts/ folder.
sys.path.insert(0, str(BUNDLE))

import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.networks import nets  # noqa: E402

from benchmark_common import (  # noqa: E402
    NUM_CLASSES,
    SMALL,
    Timing,
    TrainingStep,
    add_run_options,
    check_run_options,
    configure_torch,
    count_parameters,
    hardware,
    inference_runs,
    interleaved_timing,
    machine,
    max_output_difference,
    median_time_ms,
    memory_method,
    print_machine,
    print_timing,
    saved_for_backward_mib,
    step_memory,
)
from scripts.backbones import required_divisor  # noqa: E402
from scripts.reseg import encode_label  # noqa: E402

TRAIN_CONFIG = BUNDLE / "configs" / "train.json"
INFERENCE_CONFIG = BUNDLE / "configs" / "inference.json"
RESEG, BASELINE, PLAIN = "ReSeg", "baseline", "plain"
# The budget: a stage-2 training step may cost at most 1.4 times the baseline's.
TARGET_STEP_RATIO = 1.40


@dataclass(frozen=True)
class Settings:
    """Everything one benchmark run depends on; picklable, so that memory subprocesses get the same."""

    device: str
    amp: bool
    threads: int
    iters: int
    warmup: int
    roi: tuple[int, ...]
    volume: tuple[int, ...]
    small: bool
    backbones: tuple[str, ...]
    # config ids set before parsing, in train.json and inference.json alike (device, class count, crop, sizes)
    overrides: dict[str, object]
    reseg_weight: float
    in_channels: int


@dataclass(frozen=True)
class Case:
    """One backbone of a run: what a memory subprocess needs to build either arm's training step."""

    settings: Settings
    backbone: str


def bundle_config(path: Path, s: Settings, backbone: str, **overrides: object) -> ConfigParser:
    """One of the bundle's config files with the run's overrides, parsed lazily as ``monai.bundle run`` does."""
    parser = ConfigParser()
    parser.read_config(str(path))
    for key, value in {**s.overrides, "backbone": backbone, **overrides}.items():
        parser[key] = value
    return parser


def train_config(s: Settings, backbone: str, arm: str) -> ConfigParser:
    """configs/train.json for one arm: its reseg_weight for ReSeg, 0 (the bundle's baseline) otherwise."""
    return bundle_config(TRAIN_CONFIG, s, backbone, **({} if arm == RESEG else {"reseg_weight": 0}))


def size_label(backbone: str, config: ConfigParser) -> str:
    """The backbone's size setting, e.g. ``init_filters 16``."""
    return ", ".join(f"{key} {config.get_parsed_content(f'backbones#{backbone}#{key}')}" for key in SMALL[backbone])


def roi_problem(config: ConfigParser, roi: Sequence[int]) -> str | None:
    """Why a training crop does not suit the network, or None: the bundle's own check (its ``check_roi``), and,
    for UNet and SwinUNETR, more than one voxel at the bottleneck, which they normalise per sample and channel."""
    try:
        config.get_parsed_content("check_roi")
    except Exception as error:  # the ConfigParser wraps the bundle's ValueError
        return str(error.__cause__ or error).splitlines()[0]
    network = config.get_parsed_content("network_def")
    bottleneck = math.prod(size // required_divisor(network) for size in roi)
    if isinstance(network, (nets.UNet, nets.SwinUNETR)) and bottleneck < 2:
        return (f"crop {list(roi)} leaves one voxel at the bottleneck of {type(network).__name__}: make one size at "
                f"least {2 * required_divisor(network)}")
    return None


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None]:
    """The run's settings (train.json's, overridden by the options) and where to write JSON, if anywhere."""
    defaults = json.loads(TRAIN_CONFIG.read_text())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser)
    parser.add_argument("--backbones", nargs="+", choices=tuple(SMALL), default=list(SMALL), help="default: all")
    parser.add_argument("--roi", type=int, nargs=3, default=defaults["roi_size"], help="training crop = window size")
    parser.add_argument("--volume", type=int, nargs=3, default=(96, 112, 96),
                        help="inference volume (default: the MNI brain at 2 mm)")
    parser.add_argument("--small", action="store_true",
                        help="CPU-friendly networks (teacher alike): " + "; ".join(
                            f"{name} " + ", ".join(f"{k} {v}" for k, v in sizes.items())
                            for name, sizes in SMALL.items()))
    args = parser.parse_args(argv)

    device, amp = check_run_options(parser, args)
    overrides: dict[str, object] = {"device": f"$torch.device('{device}')", "num_classes": NUM_CLASSES,
                                    "roi_size": list(args.roi)}
    if args.small:
        overrides.update({f"backbones#{b}#{key}": value for b, sizes in SMALL.items() for key, value in sizes.items()})
    s = Settings(device=device, amp=amp, threads=args.threads, iters=args.iters, warmup=args.warmup,
                 roi=tuple(args.roi), volume=tuple(args.volume), small=args.small,
                 backbones=tuple(dict.fromkeys(args.backbones)), overrides=overrides,
                 reseg_weight=defaults["reseg_weight"], in_channels=defaults["in_channels"])
    if not s.reseg_weight:
        parser.error("train.json's reseg_weight is 0: nothing to compare with the baseline")
    for backbone in s.backbones:
        problem = roi_problem(train_config(s, backbone, BASELINE), s.roi)
        if problem:
            parser.error(f"--roi, {backbone}: {problem}")
    return s, args.json


class TrainStep(TrainingStep):
    """One stage-2 training iteration with the objects train.json builds for ``arm``, as SupervisedTrainer runs
    it: network, loss (ReSeg: taps on both networks and the frozen teacher; baseline: reseg_weight 0, neither) and
    Adam optimizer."""

    def __init__(self, config: ConfigParser, s: Settings) -> None:
        self.config = config
        super().__init__(config.get_parsed_content("network"), config.get_parsed_content("loss"),
                         config.get_parsed_content("optimizer"), s.device, s.amp, s.in_channels, s.roi, NUM_CLASSES)

    def teacher_forward(self) -> None:
        """The teacher's part of the ReSeg loss on its own: its no-grad forward on the encoded label."""
        with torch.no_grad(), torch.autocast(self.device_type, enabled=self.amp):
            self.loss.teacher(encode_label(self.label, self.loss.num_classes, self.loss.label_encoding))
        self.loss.teacher_taps.pop()


def training_steps(s: Settings, backbone: str) -> dict[str, TrainStep]:
    """Both arms on the same initial segmentation weights, ReSeg first (the timing ratios are ReSeg / baseline)."""
    baseline = TrainStep(train_config(s, backbone, BASELINE), s)
    reseg = TrainStep(train_config(s, backbone, RESEG), s)
    reseg.model.load_state_dict(baseline.model.state_dict())
    return {RESEG: reseg, BASELINE: baseline}


def memory_step(case: Case, arm: str) -> TrainStep:
    """The training step of ``arm`` as a fresh memory subprocess builds it."""
    configure_torch(case.settings.threads)
    return TrainStep(train_config(case.settings, case.backbone, arm), case.settings)


def sliding_window_runs(s: Settings, backbone: str, trained: TrainStep) -> dict[str, Callable[[], torch.Tensor]]:
    """One whole-volume sliding-window prediction with train.json's validation inferer, by the trained network
    (taps attached) and by a fresh plain backbone from configs/inference.json loaded strictly with its weights."""
    inferer = trained.config.get_parsed_content("validate#inferer")
    volume = torch.randn(1, s.in_channels, *s.volume, device=s.device)
    plain = bundle_config(INFERENCE_CONFIG, s, backbone).get_parsed_content("network")
    plain.load_state_dict(trained.model.state_dict(), strict=True)
    return inference_runs({RESEG: trained.model, PLAIN: plain}, inferer, volume, s.device, s.amp)


@dataclass
class BackboneResults:
    """Everything measured on one backbone; ratios are ReSeg / baseline (inference: ReSeg / plain)."""

    size: str
    pairs: list[tuple[str, str]]
    training_step: Timing
    teacher_forward_ms: float
    meets_target: bool
    training_step_memory_mib: dict[str, float]
    saved_for_backward_mib: dict[str, float]
    sliding_window_inference: Timing
    max_inference_logit_difference: float
    segmentation_parameters: int
    teacher_parameters: int


@dataclass
class Results:
    """Everything measured; written as JSON with ``--json``."""

    machine: dict[str, object]
    settings: Settings
    memory_method: str
    target_step_ratio: float
    backbones: dict[str, BackboneResults]
    load_average_1min_at_end: float
    wall_s: float


def benchmark_backbone(s: Settings, backbone: str) -> BackboneResults:
    """All measurements of one backbone, printed as they come."""
    steps = training_steps(s, backbone)
    reseg = steps[RESEG]
    teacher = reseg.loss.teacher
    size = size_label(backbone, reseg.config)
    print(f"\n== {backbone}: {type(reseg.model).__name__}, {size}; teacher {type(teacher).__name__} "
          f"({reseg.config.get_parsed_content('reconstruction_in_channels')} -> {s.in_channels} channels, "
          f"{reseg.loss.label_encoding} label), {len(reseg.loss.pairs)} pairs ==", flush=True)
    train = interleaved_timing(steps, s.device, s.iters, s.warmup)
    print_timing(f"Stage-2 training step, a = {s.reseg_weight} vs 0", train, "ReSeg/baseline")
    meets = train.median_paired_ratio <= TARGET_STEP_RATIO
    print(f"  target <= {TARGET_STEP_RATIO:.2f}: {'met' if meets else 'NOT met'}")
    teacher_ms = median_time_ms(reseg.teacher_forward, s.device, s.iters, s.warmup)
    print(f"  of which the teacher's no-grad forward: median {teacher_ms:.1f} ms")
    saved = {arm: saved_for_backward_mib(step.forward_loss, step.model.parameters()) for arm, step in steps.items()}
    print(f"Activations saved for backward (MiB): {RESEG} {saved[RESEG]:.0f}, {BASELINE} {saved[BASELINE]:.0f}")

    memory = step_memory(memory_step, Case(s, backbone), (RESEG, BASELINE), s.device)
    print(f"Training-step memory (MiB): {RESEG} {memory[RESEG]:.0f}, {BASELINE} {memory[BASELINE]:.0f}", flush=True)

    runs = sliding_window_runs(s, backbone, reseg)
    difference = max_output_difference(runs, RESEG, PLAIN)
    infer = interleaved_timing(runs, s.device, s.iters, s.warmup)
    print_timing("Sliding-window inference per volume", infer, "ReSeg/plain")
    print(f"  max |logit difference|, trained network with taps vs fresh plain backbone: {difference:.3g}")

    params = {RESEG: count_parameters(reseg.model), BASELINE: count_parameters(steps[BASELINE].model)}
    assert params[RESEG] == params[BASELINE]
    teacher_params = count_parameters(teacher)
    print(f"Parameters: segmentation network {params[RESEG]:,} (both arms); teacher {teacher_params:,} "
          "(stage-2 training only, frozen)")
    return BackboneResults(size=size, pairs=reseg.loss.pairs, training_step=train, teacher_forward_ms=teacher_ms,
                           meets_target=meets, training_step_memory_mib=memory, saved_for_backward_mib=saved,
                           sliding_window_inference=infer, max_inference_logit_difference=difference,
                           segmentation_parameters=params[RESEG], teacher_parameters=teacher_params)


def markdown_table(r: Results) -> str:
    s, info = r.settings, r.machine
    roi, volume = "x".join(map(str, s.roi)), "x".join(map(str, s.volume))

    def triple(values: dict[str, float], ratio: float | None = None) -> str:
        ratio = values[RESEG] / values[BASELINE] if ratio is None else ratio
        return f"{values[BASELINE]:.0f} | {values[RESEG]:.0f} | {ratio:.2f}"

    def row(backbone: str, b: BackboneResults) -> str:
        train = b.training_step
        return (f"| {backbone} ({b.size}) | {triple(train.median_ms, train.median_paired_ratio)} | "
                f"{b.teacher_forward_ms:.0f} | {triple(b.training_step_memory_mib)} | "
                f"{triple(b.saved_for_backward_mib)} | {b.sliding_window_inference.median_paired_ratio:.2f} | "
                f"{'yes' if b.meets_target else 'no'} |")

    params = "; ".join(f"{backbone} {b.segmentation_parameters:,} (teacher {b.teacher_parameters:,})"
                       for backbone, b in r.backbones.items())
    differences = ", ".join(f"{b.max_inference_logit_difference:.3g}" for b in r.backbones.values())
    return "\n".join([
        f"{hardware(info)}; torch {info['torch']}; {'--small' if s.small else 'train.json'} network sizes; "
        f"AMP {'on' if s.amp else 'off'}; batch 1, crop {roi}, {NUM_CLASSES} classes; stage 2 with "
        f"reseg_weight {s.reseg_weight} (7 pairs, randomly initialised teacher on the one-hot label) against 0 (no "
        f"teacher, no taps); 1-min load average {info['load_average_1min_at_start']:.1f} at start, "
        f"{r.load_average_1min_at_end:.1f} at end; times are medians of {s.iters} interleaved runs after "
        f"{s.warmup} warm-up, their ratios the median of the per-round ratios (each ReSeg run against the "
        "baseline run beside it, under the same load).",
        "",
        "| backbone | step ms, baseline | step ms, ReSeg | ratio | of which teacher forward ms "
        "| memory MiB, baseline | memory MiB, ReSeg | ratio | saved for backward MiB, baseline "
        "| saved for backward MiB, ReSeg | ratio | inference ratio "
        f"| step ratio <= {TARGET_STEP_RATIO:.2f} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
        *(row(backbone, b) for backbone, b in r.backbones.items()),
        "",
        f"Memory: {r.memory_method}. Saved for backward: the activations autograd keeps in one forward + loss "
        f"(parameters excluded; the teacher's features enter the MSE terms). Teacher forward: its no-grad forward "
        f"alone, median of {s.iters}. Inference: a {volume} volume by sliding window, the ReSeg-trained "
        "network in eval mode with its taps attached against a fresh plain backbone from configs/inference.json "
        f"loaded with its weights (max logit difference {differences}). Parameters of the segmentation network, "
        f"equal in both arms and the only one saved: {params}; the teacher is used in stage-2 training only.",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    started = time.perf_counter()
    s, json_path = parse_args(argv)
    configure_torch(s.threads)
    info = machine(s.device)
    print_machine(info)
    print(f"Device {s.device}, AMP {s.amp}, crop {list(s.roi)}, volume {list(s.volume)}, "
          f"{'--small' if s.small else 'train.json'} network sizes, reseg_weight {s.reseg_weight} vs 0, "
          f"iters {s.iters}, warmup {s.warmup}", flush=True)
    print(f"Memory: {memory_method(s.device, unit='arm')}", flush=True)

    backbones = {backbone: benchmark_backbone(s, backbone) for backbone in s.backbones}
    results = Results(machine=info, settings=s, memory_method=memory_method(s.device, unit="arm"),
                      target_step_ratio=TARGET_STEP_RATIO, backbones=backbones,
                      load_average_1min_at_end=os.getloadavg()[0], wall_s=time.perf_counter() - started)
    print(f"\nWall time {results.wall_s:.0f} s\n")
    print(markdown_table(results))
    if json_path is not None:
        json_path.write_text(json.dumps(asdict(results), indent=2) + "\n")


if __name__ == "__main__":
    main()
