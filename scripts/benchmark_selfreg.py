"""What the SelfReg regulariser costs, against the same backbone trained with the plain DiceCE loss.

For each backbone (SegResNet, UNet, SwinUNETR), measured in one run, on synthetic data:

1. training step time (forward, loss, backward, Adam step; AMP + GradScaler on CUDA as the bundle's
   SupervisedTrainer): ``SelfRegLoss`` with train.json's selfreg_weight (0.015) and ``SelfRegTaps`` on the network,
   against ``SelfRegLoss`` with selfreg_weight 0 and no taps, which is the DiceCE baseline. The two start from the
   same weights and alternate step by step, so machine noise hits both;
2. training memory: the peak of a training step, each arm in a fresh subprocess (CUDA: peak allocated; CPU: peak
   RSS), and the activations autograd saves for backward (exact, and the same on any device);
3. sliding-window inference time per volume: the SelfReg-trained network in eval mode with its taps still attached
   (the hooks store nothing outside training) against the same weights in a freshly built plain backbone; the
   times should be equal and the logits identical;
4. parameter counts (equal: SelfReg adds no parameters).

The issue's target is a regulariser that costs at most 10 % of a training step; the output says, per backbone,
whether the measured step ratio meets it. Network, loss, optimizer and sliding-window settings are read from the
bundle's configs/train.json (``backbones``, ``selfreg_*``, ...); ``--small`` shrinks the networks for a CPU.
Runs one torch thread by default (``--threads``): steady timings on a shared machine. Prints the machine first and
a markdown table for the docs last.

    .venv/bin/python scripts/benchmark_selfreg.py --small
    .venv/bin/python scripts/benchmark_selfreg.py --backbones segresnet unet --iters 5 --warmup 1
    .venv/bin/python scripts/benchmark_selfreg.py --device cuda --json selfreg_bench.json
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
BUNDLE = REPO / "bundles" / "selfreg_segmentation"
# Position 0: the bundle's ``scripts`` package must win over this repository's top-level scripts/ folder.
sys.path.insert(0, str(BUNDLE))

import torch  # noqa: E402
from monai.inferers import SlidingWindowInferer  # noqa: E402
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
    memory_method,
    print_machine,
    print_timing,
    saved_for_backward_mib,
    step_memory,
)
from scripts.backbones import check_roi_size, required_divisor  # noqa: E402
from scripts.selfreg import SelfRegLoss, SelfRegTaps  # noqa: E402

SELFREG, BASELINE, PLAIN = "SelfReg", "baseline", "plain"
# The budget: the regulariser may add at most 10 % to a training step.
TARGET_STEP_RATIO = 1.10


@dataclass(frozen=True)
class NetworkSpec:
    """A backbone as train.json builds it: ``monai.networks.nets.<target>(**kwargs)``."""

    target: str
    kwargs: dict[str, object]


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
    networks: dict[str, NetworkSpec]
    in_channels: int
    learning_rate: float
    weight_decay: float
    selfreg_weight: float
    selfreg_blocks: tuple[str, ...]
    selfreg_layout: dict | None
    channel_selection: str
    ce_weight: float
    dice_weight: float
    seed: int
    sw_batch_size: int
    sw_overlap: float


@dataclass(frozen=True)
class Case:
    """One backbone of a run: what a memory subprocess needs to build either arm's training step."""

    settings: Settings
    backbone: str


def load_train_config() -> dict:
    return json.loads((BUNDLE / "configs" / "train.json").read_text())


def resolve(config: dict, value: object) -> object:
    """A backbone setting of train.json: a literal, or an ``@name`` reference to a top-level entry (num_classes:
    NUM_CLASSES, since the bundle counts the datalist's classes). Expressions are refused rather than guessed."""
    if isinstance(value, str) and value.startswith("@"):
        name = value[1:]
        return NUM_CLASSES if name == "num_classes" else resolve(config, config[name])
    if isinstance(value, str) and value.startswith("$"):
        raise ValueError(f"train.json backbone setting {value!r}: expressions are not supported here")
    return value


def network_spec(config: dict, backbone: str, small: bool) -> NetworkSpec:
    """train.json's ``backbones[backbone]``, with the --small sizes if asked."""
    entry = config["backbones"][backbone]
    kwargs = {key: resolve(config, value) for key, value in entry.items() if key not in ("_target_", "_disabled_")}
    if small:
        kwargs.update(SMALL[backbone])
    return NetworkSpec(target=entry["_target_"], kwargs=kwargs)


def build_network(spec: NetworkSpec) -> torch.nn.Module:
    return getattr(nets, spec.target)(**spec.kwargs)


def size_label(backbone: str, spec: NetworkSpec) -> str:
    """The backbone's size setting, e.g. ``init_filters 16``."""
    return ", ".join(f"{key} {spec.kwargs[key]}" for key in SMALL[backbone])


def roi_problem(network: torch.nn.Module, roi: Sequence[int]) -> str | None:
    """Why a training crop does not suit the network, or None: the bundle's divisibility rule, and, for UNet and
    SwinUNETR, more than one voxel at the bottleneck, which they normalise per sample and channel in training."""
    try:
        check_roi_size(network, roi)
    except ValueError as error:
        return str(error)
    bottleneck = math.prod(size // required_divisor(network) for size in roi)
    if isinstance(network, (nets.UNet, nets.SwinUNETR)) and bottleneck < 2:
        return (f"crop {list(roi)} leaves one voxel at the bottleneck of {type(network).__name__}: make one size at "
                f"least {2 * required_divisor(network)}")
    return None


def parse_args(argv: Sequence[str] | None, config: dict) -> tuple[Settings, Path | None]:
    """The run's settings (train.json's, overridden by the options) and where to write JSON, if anywhere."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser)
    parser.add_argument("--backbones", nargs="+", choices=tuple(SMALL), default=list(SMALL), help="default: all")
    parser.add_argument("--roi", type=int, nargs=3, default=config["roi_size"], help="training crop = window size")
    parser.add_argument("--volume", type=int, nargs=3, default=(96, 112, 96),
                        help="inference volume (default: the MNI brain at 2 mm)")
    parser.add_argument("--small", action="store_true",
                        help="CPU-friendly networks: " + "; ".join(
                            f"{name} " + ", ".join(f"{k} {v}" for k, v in sizes.items())
                            for name, sizes in SMALL.items()))
    args = parser.parse_args(argv)

    device, amp = check_run_options(parser, args)
    networks = {backbone: network_spec(config, backbone, args.small) for backbone in dict.fromkeys(args.backbones)}
    for backbone, spec in networks.items():
        problem = roi_problem(build_network(spec), args.roi)
        if problem:
            parser.error(f"--roi, {backbone}: {problem}")

    return Settings(
        device=device, amp=amp, threads=args.threads, iters=args.iters, warmup=args.warmup, roi=tuple(args.roi),
        volume=tuple(args.volume), small=args.small, networks=networks, in_channels=config["in_channels"],
        learning_rate=config["learning_rate"], weight_decay=config["weight_decay"],
        selfreg_weight=config["selfreg_weight"], selfreg_blocks=tuple(config["selfreg_blocks"]),
        selfreg_layout=config["selfreg_layout"], channel_selection=config["selfreg_channel_selection"],
        ce_weight=config["ce_weight"], dice_weight=config["dice_weight"], seed=config["seed"],
        sw_batch_size=config["sw_batch_size"], sw_overlap=config["sw_overlap"],
    ), args.json


class TrainStep(TrainingStep):
    """One training iteration of a network with the bundle's loss and Adam, as SupervisedTrainer runs it: taps and
    selfreg_weight for the SelfReg arm, neither for the baseline."""

    def __init__(self, network: torch.nn.Module, arm: str, s: Settings) -> None:
        selfreg = arm == SELFREG
        self.taps = SelfRegTaps(network, s.selfreg_blocks, s.selfreg_layout) if selfreg else None
        loss = SelfRegLoss(self.taps, selfreg_weight=s.selfreg_weight if selfreg else 0.0, ce_weight=s.ce_weight,
                           dice_weight=s.dice_weight, channel_selection=s.channel_selection, seed=s.seed)
        optimizer = torch.optim.Adam(network.parameters(), lr=s.learning_rate, weight_decay=s.weight_decay)
        super().__init__(network, loss, optimizer, s.device, s.amp, s.in_channels, s.roi, NUM_CLASSES)


def training_steps(s: Settings, backbone: str) -> dict[str, TrainStep]:
    """Both arms on the same initial weights, SelfReg first (the timing ratios are SelfReg / baseline)."""
    baseline = build_network(s.networks[backbone])
    selfreg = build_network(s.networks[backbone])
    selfreg.load_state_dict(baseline.state_dict())
    return {SELFREG: TrainStep(selfreg, SELFREG, s), BASELINE: TrainStep(baseline, BASELINE, s)}


def memory_step(case: Case, arm: str) -> TrainStep:
    """The training step of ``arm`` as a fresh memory subprocess builds it."""
    configure_torch(case.settings.threads)
    return TrainStep(build_network(case.settings.networks[case.backbone]), arm, case.settings)


def sliding_window_runs(s: Settings, backbone: str, trained: torch.nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """One whole-volume sliding-window prediction, as the bundle's validation and inference run it, by the trained
    network (taps attached) and by a fresh plain backbone loaded strictly with its weights."""
    inferer = SlidingWindowInferer(roi_size=s.roi, sw_batch_size=s.sw_batch_size, overlap=s.sw_overlap,
                                   mode="gaussian")
    volume = torch.randn(1, s.in_channels, *s.volume, device=s.device)
    plain = build_network(s.networks[backbone])
    plain.load_state_dict(trained.state_dict(), strict=True)
    return inference_runs({SELFREG: trained, PLAIN: plain.to(s.device)}, inferer, volume, s.device, s.amp)


@dataclass
class BackboneResults:
    """Everything measured on one backbone; ratios are SelfReg / baseline (inference: SelfReg / plain)."""

    network: NetworkSpec
    taps: int
    training_step: Timing
    meets_target: bool
    training_step_memory_mib: dict[str, float]
    saved_for_backward_mib: dict[str, float]
    sliding_window_inference: Timing
    max_inference_logit_difference: float
    parameters: dict[str, int]


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
    spec = s.networks[backbone]
    print(f"\n== {backbone}: {spec.target}, {size_label(backbone, spec)} ==", flush=True)
    steps = training_steps(s, backbone)
    taps = steps[SELFREG].taps
    n_taps = len(taps.layout.names(taps.blocks))
    train = interleaved_timing(steps, s.device, s.iters, s.warmup)
    print_timing(f"Training step, {n_taps} taps", train, "SelfReg/baseline")
    meets = train.median_paired_ratio <= TARGET_STEP_RATIO
    print(f"  target <= {TARGET_STEP_RATIO:.2f}: {'met' if meets else 'NOT met'}")
    saved = {arm: saved_for_backward_mib(step.forward_loss, step.model.parameters()) for arm, step in steps.items()}
    print(f"Activations saved for backward (MiB): {SELFREG} {saved[SELFREG]:.0f}, {BASELINE} {saved[BASELINE]:.0f}")

    memory = step_memory(memory_step, Case(s, backbone), (SELFREG, BASELINE), s.device)
    print(f"Training-step memory (MiB): {SELFREG} {memory[SELFREG]:.0f}, {BASELINE} {memory[BASELINE]:.0f}",
          flush=True)

    trained = steps[SELFREG].model
    runs = sliding_window_runs(s, backbone, trained)
    difference = max_output_difference(runs, SELFREG, PLAIN)
    infer = interleaved_timing(runs, s.device, s.iters, s.warmup)
    print_timing("Sliding-window inference per volume", infer, "SelfReg/plain")
    print(f"  max |logit difference|, trained network with taps vs fresh plain backbone: {difference:.3g}")

    params = {SELFREG: count_parameters(trained), BASELINE: count_parameters(steps[BASELINE].model)}
    print("Parameters: " + ", ".join(f"{arm} {count:,}" for arm, count in params.items()))
    return BackboneResults(network=spec, taps=n_taps, training_step=train, meets_target=meets,
                           training_step_memory_mib=memory, saved_for_backward_mib=saved,
                           sliding_window_inference=infer, max_inference_logit_difference=difference,
                           parameters=params)


def markdown_table(r: Results) -> str:
    s, info = r.settings, r.machine
    roi, volume = "x".join(map(str, s.roi)), "x".join(map(str, s.volume))

    def triple(values: dict[str, float], ratio: float | None = None) -> str:
        ratio = values[SELFREG] / values[BASELINE] if ratio is None else ratio
        return f"{values[BASELINE]:.0f} | {values[SELFREG]:.0f} | {ratio:.2f}"

    def row(backbone: str, b: BackboneResults) -> str:
        train = b.training_step
        return (f"| {backbone} ({size_label(backbone, b.network)}) | "
                f"{triple(train.median_ms, train.median_paired_ratio)} | {triple(b.training_step_memory_mib)} | "
                f"{triple(b.saved_for_backward_mib)} | {b.sliding_window_inference.median_paired_ratio:.2f} | "
                f"{'yes' if b.meets_target else 'no'} |")

    params = "; ".join(f"{backbone} {b.parameters[SELFREG]:,}" for backbone, b in r.backbones.items())
    differences = ", ".join(f"{b.max_inference_logit_difference:.3g}" for b in r.backbones.values())
    return "\n".join([
        f"{hardware(info)}; torch {info['torch']}; {'--small' if s.small else 'train.json'} network sizes; "
        f"AMP {'on' if s.amp else 'off'}; batch 1, crop {roi}; selfreg_weight {s.selfreg_weight} against 0 "
        f"(no taps); 1-min load average {info['load_average_1min_at_start']:.1f} at start, "
        f"{r.load_average_1min_at_end:.1f} at end; times are medians of {s.iters} interleaved runs after "
        f"{s.warmup} warm-up, their ratios the median of the per-round ratios (each SelfReg run against the "
        "baseline run beside it, under the same load).",
        "",
        "| backbone | step ms, baseline | step ms, SelfReg | ratio | memory MiB, baseline | memory MiB, SelfReg "
        "| ratio | saved for backward MiB, baseline | saved for backward MiB, SelfReg | ratio | inference ratio "
        f"| step ratio <= {TARGET_STEP_RATIO:.2f} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
        *(row(backbone, b) for backbone, b in r.backbones.items()),
        "",
        f"Memory: {r.memory_method}. Saved for backward: the activations autograd keeps in one forward + loss "
        f"(parameters excluded). Inference: a {volume} volume by sliding window, the SelfReg-trained "
        "network in eval mode with its taps attached against a fresh plain backbone loaded with its weights (max "
        f"logit difference {differences}). Parameters, equal in both arms: {params}.",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    started = time.perf_counter()
    s, json_path = parse_args(argv, load_train_config())
    configure_torch(s.threads)
    info = machine(s.device)
    print_machine(info)
    print(f"Device {s.device}, AMP {s.amp}, crop {list(s.roi)}, volume {list(s.volume)}, "
          f"{'--small' if s.small else 'train.json'} network sizes, selfreg_weight {s.selfreg_weight} vs 0, "
          f"iters {s.iters}, warmup {s.warmup}", flush=True)
    print(f"Memory: {memory_method(s.device, unit='arm')}", flush=True)

    backbones = {backbone: benchmark_backbone(s, backbone) for backbone in s.networks}
    results = Results(machine=info, settings=s, memory_method=memory_method(s.device, unit="arm"),
                      target_step_ratio=TARGET_STEP_RATIO, backbones=backbones,
                      load_average_1min_at_end=os.getloadavg()[0], wall_s=time.perf_counter() - started)
    print(f"\nWall time {results.wall_s:.0f} s\n")
    print(markdown_table(results))
    if json_path is not None:
        json_path.write_text(json.dumps(asdict(results), indent=2) + "\n")


if __name__ == "__main__":
    main()
