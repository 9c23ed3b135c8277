"""What a SemSim training step costs, against plain FixMatch and supervised-only training of the same backbone.

For each backbone (SegResNet, UNet, SwinUNETR), measured in one run, on synthetic data, three arms that differ only
in the loss weights of configs/train.json (everything else is the bundle's):

- SemSim: unlabeled_weight 0.5, intra_weight 0.25, cross_weight 0.25 (train.json's): the backbone on labeled +
  weak views, on both strong views and on the feature-perturbed weak view, the Spatial-aware Fusion Module (SFM)
  on the encoder features, and the FixMatch, intra-image and cross-image terms;
- FixMatch: unlabeled_weight 0.5, intra_weight = cross_weight = 0, the bundle's plain weak-to-strong arm: the same
  views and batch (CutMix, the feature-perturbation pass, UniMatch's L_u), no SFM and no strong view 2;
- supervised: all three weights 0, supervised-only: the labeled volumes alone through the backbone (DiceCE).

1. training step time, as MONAI's SupervisedTrainer runs it with the bundle's ``prepare_batch``
   (``SemiSupervisedBatch``: CutMix of the strong views), network (``SemSimNetwork``), loss (``SemSimLoss``) and
   Adam (AMP + GradScaler on CUDA), on train.json's batch (2 labeled + 2 unlabeled volumes, each unlabeled one
   with its weak and two strong views; the supervised arm gets the labeled part). The arms start from the same
   backbone weights and run in interleaved rounds, so machine noise hits all three; each ratio is the median of
   the per-round ratios;
2. training memory: the activations autograd saves for backward on the timing crop (exact, and the same on any
   device), and the peak of a training step, each arm in a fresh subprocess (CUDA: peak allocated; CPU: peak RSS),
   on a crop of its own (``--memory-roi``, default the issue's 96^3), since the issue asks for the memory of 96^3
   crops while a CPU times steps on smaller ones. An arm whose saved activations, scaled by the voxel count to the
   memory crop, would exceed 2/3 of the memory available (CPU: MemAvailable; CUDA: free device memory) is skipped
   with a message rather than run into the out-of-memory killer of a shared machine (on a CPU with ~16 GiB free,
   96^3 is out of reach for SemSim on every backbone: pass a smaller ``--memory-roi`` there). The timed steps are
   not guarded: on a CPU their process's RSS grows to a multiple of the live memory (glibc's heap; SwinUNETR: 16
   GB at 64x32x32, over 20 GB at 64x64x32), so on a small machine time on a smaller ``--roi`` and say so: the
   ratios change with the crop (on a 2-core CPU, SemSim/FixMatch came out 15-25 % lower at 64x32x32 than in a
   shorter run at 64x64x32);
3. parameter counts: the backbone (the same in all arms, and the only network saved and deployed) and the SFM,
   which exists only in SemSim training.

Inference is not measured: the trained and exported network is the plain backbone (the SFM, the taps and the
dropout hooks exist only in training), so it costs exactly what the backbone costs.

Everything is built by the bundle's own configs/train.json through MONAI's ConfigParser, as ``monai.bundle run``
builds it (``network``, ``loss``, ``optimizer``, ``train#prepare_batch``), with the arm's weights, the device, the
crop and the class count (3; the bundle reads it from the datalist) overridden as on the command line.
``--small`` overrides the backbone's size setting as the CLI would (``--backbones#segresnet#init_filters 8``).

The issue's target is a SemSim step at most 1.3 times a FixMatch step; the output says, per backbone, whether the
measured ratio meets it. Runs one torch thread by default (``--threads``): steady timings on a shared machine.
Prints the machine first and a markdown table for the docs last.

    .venv/bin/python scripts/benchmark_semsim.py --roi 64 32 32 --memory-roi 64 32 32 --iters 3 --warmup 1
    .venv/bin/python scripts/benchmark_semsim.py --backbones segresnet unet --memory-roi 64 64 64
    .venv/bin/python scripts/benchmark_semsim.py --device cuda --roi 96 96 96 --json semsim_bench.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "semsim_segmentation"
# Position 0: the bundle's ``scripts`` package must win over this repository's top-level scripts/ folder.
sys.path.insert(0, str(BUNDLE))

import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.networks import nets  # noqa: E402

from benchmark_common import (  # noqa: E402
    NUM_CLASSES,
    SMALL,
    TrainingStep,
    add_run_options,
    check_run_options,
    configure_torch,
    count_parameters,
    hardware,
    interleaved_times,
    machine,
    median_paired_ratio,
    memory_method,
    print_machine,
    saved_for_backward_mib,
    step_memory,
)
from scripts.backbones import required_divisor  # noqa: E402
from scripts.semsim_training import UNLABELED_KEYS  # noqa: E402

TRAIN_CONFIG = BUNDLE / "configs" / "train.json"
SEMSIM, FIXMATCH, SUPERVISED = "SemSim", "FixMatch", "supervised"
# Each arm's loss weights (unlabeled_weight, intra_weight, cross_weight); SemSim's are train.json's (checked).
WEIGHTS = {SEMSIM: (0.5, 0.25, 0.25), FIXMATCH: (0.5, 0.0, 0.0), SUPERVISED: (0.0, 0.0, 0.0)}
WEIGHT_KEYS = ("unlabeled_weight", "intra_weight", "cross_weight")
# The ratios reported, numerator / denominator.
PAIRS = ((SEMSIM, FIXMATCH), (SEMSIM, SUPERVISED), (FIXMATCH, SUPERVISED))
# The budget: a SemSim training step may cost at most 1.3 times a FixMatch step.
TARGET_STEP_RATIO = 1.30
# An arm is measured at the memory crop only if its scaled saved activations stay below this share of the
# available memory: the peak adds gradients, optimizer state and scratch to them.
MEMORY_HEADROOM = 2 / 3


@dataclass(frozen=True)
class Settings:
    """Everything one benchmark run depends on; picklable, so that memory subprocesses get the same."""

    device: str
    amp: bool
    threads: int
    iters: int
    warmup: int
    roi: tuple[int, ...]
    memory_roi: tuple[int, ...]
    small: bool
    backbones: tuple[str, ...]
    # config ids set before parsing (device, class count, sizes); the crop and the arm's weights are set per use
    overrides: dict[str, object]
    labeled_batch: int
    unlabeled_batch: int
    in_channels: int


@dataclass(frozen=True)
class Case:
    """One backbone of a run: what a memory subprocess needs to build any arm's training step."""

    settings: Settings
    backbone: str


def train_config(s: Settings, backbone: str, arm: str, roi: Sequence[int]) -> ConfigParser:
    """configs/train.json for one arm and crop, parsed lazily as ``monai.bundle run`` does."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    overrides = {**s.overrides, "backbone": backbone, "roi_size": list(roi), **dict(zip(WEIGHT_KEYS, WEIGHTS[arm]))}
    for key, value in overrides.items():
        parser[key] = value
    return parser


def size_label(backbone: str, config: ConfigParser) -> str:
    """The backbone's size setting, e.g. ``init_filters 16``."""
    return ", ".join(f"{key} {config.get_parsed_content(f'backbones#{backbone}#{key}')}" for key in SMALL[backbone])


def roi_problem(config: ConfigParser, roi: Sequence[int]) -> str | None:
    """Why a crop does not suit the SemSim arm (the strictest), or None: the bundle's own checks (``check_roi``,
    ``check_fusion``), and, for UNet and SwinUNETR, more than one voxel at the bottleneck, which they normalise per
    sample and channel."""
    try:
        config.get_parsed_content("check_roi")
        config.get_parsed_content("check_fusion")
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
    parser.add_argument("--roi", type=int, nargs=3, default=defaults["roi_size"],
                        help="training crop of the timed steps (default: train.json's)")
    parser.add_argument("--memory-roi", type=int, nargs=3, default=(96, 96, 96),
                        help="training crop of the peak-memory steps (default: the issue's 96 96 96)")
    parser.add_argument("--small", action="store_true",
                        help="CPU-friendly networks: " + "; ".join(
                            f"{name} " + ", ".join(f"{k} {v}" for k, v in sizes.items())
                            for name, sizes in SMALL.items()))
    args = parser.parse_args(argv)

    device, amp = check_run_options(parser, args)
    configured = tuple(defaults[key] for key in WEIGHT_KEYS)
    if configured != WEIGHTS[SEMSIM]:
        parser.error(f"train.json's weights {dict(zip(WEIGHT_KEYS, configured))} are not SemSim's "
                     f"{dict(zip(WEIGHT_KEYS, WEIGHTS[SEMSIM]))}: update WEIGHTS in this script")
    overrides: dict[str, object] = {"device": f"$torch.device('{device}')", "num_classes": NUM_CLASSES}
    if args.small:
        overrides.update({f"backbones#{b}#{key}": value for b, sizes in SMALL.items() for key, value in sizes.items()})
    s = Settings(device=device, amp=amp, threads=args.threads, iters=args.iters, warmup=args.warmup,
                 roi=tuple(args.roi), memory_roi=tuple(args.memory_roi), small=args.small,
                 backbones=tuple(dict.fromkeys(args.backbones)), overrides=overrides,
                 labeled_batch=defaults["batch_size"] * defaults["num_samples"],
                 unlabeled_batch=defaults["unlabeled_batch_size"] * defaults["num_samples"],
                 in_channels=defaults["in_channels"])
    for backbone in s.backbones:
        for option, roi in (("--roi", s.roi), ("--memory-roi", s.memory_roi)):
            problem = roi_problem(train_config(s, backbone, SEMSIM, roi), roi)
            if problem:
                parser.error(f"{option}, {backbone}: {problem}")
    return s, args.json


class TrainStep(TrainingStep):
    """One training iteration with the objects train.json builds for ``arm``, as SupervisedTrainer runs it:
    ``prepare_batch`` (SemiSupervisedBatch) on a fixed synthetic batch, SemSimNetwork, SemSimLoss, Adam.

    The batch is what the bundle's SemiSupervisedLoader yields: "image" (B_l, C, *roi) Gaussian noise, "label"
    (B_l, 1, *roi) uniform class indices and, unless the arm is supervised-only, the unlabeled views
    "unlabeled_image", "unlabeled_strong1", "unlabeled_strong2" (B_u, C, *roi), Gaussian noise each.
    """

    def __init__(self, config: ConfigParser, s: Settings, roi: Sequence[int]) -> None:
        self.config = config
        super().__init__(config.get_parsed_content("network"), config.get_parsed_content("loss"),
                         config.get_parsed_content("optimizer"), s.device, s.amp, s.in_channels, roi, NUM_CLASSES,
                         batch_size=s.labeled_batch)
        self.prepare_batch = config.get_parsed_content("train#prepare_batch")
        self.batchdata = {"image": self.image, "label": self.label}
        if config.get_parsed_content("uses_unlabeled"):
            self.batchdata.update({key: torch.randn(s.unlabeled_batch, s.in_channels, *roi, device=s.device)
                                   for key in UNLABELED_KEYS})

    def batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.prepare_batch(self.batchdata, self.image.device)


def training_steps(s: Settings, backbone: str) -> dict[str, TrainStep]:
    """All arms on the same initial backbone weights, in the order SemSim, FixMatch, supervised."""
    steps = {arm: TrainStep(train_config(s, backbone, arm, s.roi), s, s.roi) for arm in WEIGHTS}
    for arm in (SEMSIM, FIXMATCH):
        steps[arm].model.backbone.load_state_dict(steps[SUPERVISED].model.backbone.state_dict())
    return steps


def memory_step(case: Case, arm: str) -> TrainStep:
    """The training step of ``arm`` at the memory crop, as a fresh memory subprocess builds it."""
    s = case.settings
    configure_torch(s.threads)
    return TrainStep(train_config(s, case.backbone, arm, s.memory_roi), s, s.memory_roi)


def available_mib(device: str) -> float:
    """Memory a step may still take: CUDA free device memory, or the kernel's MemAvailable estimate."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] / 2**20
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return math.inf  # not Linux: no guard


@dataclass
class StepTiming:
    """Interleaved step times of the arms in milliseconds; ratios are keyed "numerator/denominator"."""

    median_ms: dict[str, float]
    min_ms: dict[str, float]
    max_ms: dict[str, float]
    ratio_of_medians: dict[str, float]
    median_paired_ratio: dict[str, float]


def step_timing(steps: dict[str, TrainStep], s: Settings) -> StepTiming:
    times = interleaved_times(steps, s.device, s.iters, s.warmup)
    medians = {arm: statistics.median(t) for arm, t in times.items()}
    return StepTiming(
        median_ms=medians, min_ms={arm: min(t) for arm, t in times.items()},
        max_ms={arm: max(t) for arm, t in times.items()},
        ratio_of_medians={f"{a}/{b}": medians[a] / medians[b] for a, b in PAIRS},
        median_paired_ratio={f"{a}/{b}": median_paired_ratio(times, a, b) for a, b in PAIRS},
    )


@dataclass
class BackboneResults:
    """Everything measured on one backbone."""

    size: str
    fusion_stages: list[str]
    fusion_channels: list[int]
    perturbed_stages: list[str]
    training_step: StepTiming
    step_ratio_semsim_fixmatch: float
    meets_target: bool
    saved_for_backward_mib: dict[str, float]
    # saved_for_backward_mib scaled by the voxel count to the memory crop: the guard's estimate, a lower bound
    memory_crop_activations_estimate_mib: dict[str, float]
    # None where the arm was skipped (memory_skipped says why)
    training_step_memory_mib: dict[str, float | None]
    memory_ratio: dict[str, float | None]
    memory_skipped: dict[str, str]
    backbone_parameters: int
    sfm_parameters: int


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


def fmt_roi(roi: Sequence[int]) -> str:
    return "x".join(map(str, roi))


def fmt_mib(mib: float | None) -> str:
    return "skipped" if mib is None else f"{mib:.0f}"


def fmt_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}"


def benchmark_backbone(s: Settings, backbone: str) -> BackboneResults:
    """All measurements of one backbone, printed as they come."""
    steps = training_steps(s, backbone)
    semsim = steps[SEMSIM]
    network, config = semsim.model, semsim.config
    size = size_label(backbone, config)
    channels = list(network.sfm.in_channels)
    perturbed = config.get_parsed_content("semsim_network#perturbed")
    print(f"\n== {backbone}: {type(network.backbone).__name__}, {size}; SFM on {network.fusion} ({channels} -> "
          f"{network.sfm.feature_size} channels); feature perturbation on {perturbed} ==", flush=True)
    params = {arm: count_parameters(step.model.backbone) for arm, step in steps.items()}
    assert len(set(params.values())) == 1
    sfm_params = count_parameters(network.sfm)

    # Before the timed steps: on a CPU, glibc's heap grows over the steps to a multiple of the live memory (one run,
    # SwinUNETR at 64x64x32: 20 GB of RSS for SemSim's 7 GB of activations), and this forward on top of it was
    # killed for lack of memory.
    saved = {arm: saved_for_backward_mib(step.forward_loss, step.model.parameters()) for arm, step in steps.items()}
    print(f"Activations saved for backward, crop {fmt_roi(s.roi)} (MiB): "
          + ", ".join(f"{arm} {mib:.0f}" for arm, mib in saved.items()), flush=True)

    train = step_timing(steps, s)
    print(f"Training step, {s.labeled_batch} labeled + {s.unlabeled_batch} unlabeled, crop {fmt_roi(s.roi)} (ms):")
    for arm, median in train.median_ms.items():
        print(f"  {arm:<13} median {median:8.1f}  min {train.min_ms[arm]:8.1f}  max {train.max_ms[arm]:8.1f}")
    ratio = train.median_paired_ratio[f"{SEMSIM}/{FIXMATCH}"]
    meets = ratio <= TARGET_STEP_RATIO
    for pair, paired in train.median_paired_ratio.items():
        target = f"  (target <= {TARGET_STEP_RATIO:.2f}: {'met' if meets else 'NOT met'})" if pair == (
            f"{SEMSIM}/{FIXMATCH}") else ""
        print(f"  {pair}: ratio of medians {train.ratio_of_medians[pair]:.2f}, median of paired ratios "
              f"{paired:.2f}{target}", flush=True)
    fusion = list(network.fusion)
    del steps, semsim, network  # free them before the memory subprocesses need the memory
    gc.collect()

    scale = math.prod(s.memory_roi) / math.prod(s.roi)
    estimate = {arm: mib * scale for arm, mib in saved.items()}
    available = available_mib(s.device)
    skipped = {arm: (f"skipped: about {mib / 1024:.1f} GiB of activations alone at {fmt_roi(s.memory_roi)}, more "
                     f"than {MEMORY_HEADROOM:.0%} of the {available / 1024:.1f} GiB available; pass a smaller "
                     "--memory-roi or run on a GPU")
               for arm, mib in estimate.items() if mib > MEMORY_HEADROOM * available}
    for arm, why in skipped.items():
        print(f"Training-step memory of {arm}, crop {fmt_roi(s.memory_roi)}: {why}", flush=True)
    measured = step_memory(memory_step, Case(s, backbone), tuple(a for a in WEIGHTS if a not in skipped), s.device)
    memory = {arm: measured.get(arm) for arm in WEIGHTS}
    memory_ratio = {f"{a}/{b}": None if memory[a] is None or memory[b] is None else memory[a] / memory[b]
                    for a, b in PAIRS}
    print(f"Training-step memory, crop {fmt_roi(s.memory_roi)} (MiB): "
          + ", ".join(f"{arm} {fmt_mib(mib)}" for arm, mib in memory.items()) + "; "
          + ", ".join(f"{pair} {fmt_ratio(r)}" for pair, r in memory_ratio.items()), flush=True)

    print(f"Parameters: backbone {params[SEMSIM]:,} (all arms; the saved model); SFM {sfm_params:,} "
          "(SemSim training only)")
    return BackboneResults(size=size, fusion_stages=fusion, fusion_channels=channels,
                           perturbed_stages=list(perturbed), training_step=train, step_ratio_semsim_fixmatch=ratio,
                           meets_target=meets, saved_for_backward_mib=saved,
                           memory_crop_activations_estimate_mib=estimate, training_step_memory_mib=memory,
                           memory_ratio=memory_ratio, memory_skipped=skipped,
                           backbone_parameters=params[SEMSIM], sfm_parameters=sfm_params)


def markdown_table(r: Results) -> str:
    s, info = r.settings, r.machine
    pairs = [f"{a}/{b}" for a, b in PAIRS]

    def row(backbone: str, b: BackboneResults) -> str:
        t = b.training_step
        return " | ".join([
            f"| {backbone} ({b.size})",
            *(f"{t.median_ms[arm]:.0f}" for arm in WEIGHTS),
            *(f"{t.median_paired_ratio[pair]:.2f}" for pair in pairs),
            "yes" if b.meets_target else "no",
            *(f"{b.saved_for_backward_mib[arm]:.0f}" for arm in WEIGHTS),
            *(fmt_mib(b.training_step_memory_mib[arm]) for arm in WEIGHTS),
            *(fmt_ratio(b.memory_ratio[pair]) for pair in pairs),
        ]) + " |"

    params = "; ".join(f"{backbone} {b.backbone_parameters:,} (SFM {b.sfm_parameters:,})"
                       for backbone, b in r.backbones.items())
    return "\n".join([
        f"{hardware(info)}; torch {info['torch']}; {'--small' if s.small else 'train.json'} network sizes; "
        f"AMP {'on' if s.amp else 'off'}; {s.labeled_batch} labeled + {s.unlabeled_batch} unlabeled volumes (the "
        f"supervised arm: the labeled ones), {NUM_CLASSES} classes; SemSim = train.json's weights "
        f"(lambda_u, lambda_intra, lambda_cross) = {WEIGHTS[SEMSIM]}, FixMatch = {WEIGHTS[FIXMATCH]} (same views, "
        f"CutMix and feature-perturbation pass, no SFM), supervised = {WEIGHTS[SUPERVISED]}; 1-min load average "
        f"{info['load_average_1min_at_start']:.1f} at start, {r.load_average_1min_at_end:.1f} at end; step times "
        f"on a {fmt_roi(s.roi)} crop are medians of {s.iters} interleaved rounds after {s.warmup} warm-up, their "
        "ratios the median of the per-round ratios (runs of the same round saw the same load).",
        "",
        "| backbone | step ms, SemSim | step ms, FixMatch | step ms, supervised | SemSim/FixMatch | SemSim/supervised "
        f"| FixMatch/supervised | SemSim/FixMatch <= {TARGET_STEP_RATIO:.2f} | saved for backward MiB, SemSim "
        "| saved MiB, FixMatch | saved MiB, supervised | peak memory MiB, SemSim | peak MiB, FixMatch "
        "| peak MiB, supervised | SemSim/FixMatch | SemSim/supervised | FixMatch/supervised |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(row(backbone, b) for backbone, b in r.backbones.items()),
        "",
        f"Saved for backward: the activations autograd keeps in one forward + loss on the {fmt_roi(s.roi)} crop "
        f"(parameters excluded). Peak memory: of a training step on a {fmt_roi(s.memory_roi)} crop, same batch; "
        f"{r.memory_method}; skipped where the saved activations scaled to that crop would exceed "
        f"{MEMORY_HEADROOM:.0%} of the available memory. "
        f"Parameters of the backbone, equal in all arms and the only network saved: {params}; the SFM exists in "
        "SemSim training only. Inference is the plain backbone's in every arm, so it is not measured.",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    started = time.perf_counter()
    s, json_path = parse_args(argv)
    configure_torch(s.threads)
    info = machine(s.device)
    print_machine(info)
    print(f"Device {s.device}, AMP {s.amp}, {s.labeled_batch} labeled + {s.unlabeled_batch} unlabeled volumes, "
          f"step crop {list(s.roi)}, memory crop {list(s.memory_roi)}, "
          f"{'--small' if s.small else 'train.json'} network sizes, iters {s.iters}, warmup {s.warmup}; "
          + "; ".join(f"{arm} {dict(zip(WEIGHT_KEYS, w))}" for arm, w in WEIGHTS.items()), flush=True)
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
