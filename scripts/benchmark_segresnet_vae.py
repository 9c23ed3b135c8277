"""What the VAE branch of the SegResNet-VAE bundle costs, against a plain SegResNet with the same settings.

Measured in one run, on synthetic data:

1. training step time (forward, loss, backward, Adam step): the bundle's ``scripts.vae.SegResNetVAE`` with
   ``SegResNetVAELoss`` (Dice + 0.1 L2 + 0.1 KL) against ``monai.networks.nets.SegResNet`` with the same loss fed
   plain logits, which makes it Dice only. The two models alternate step by step, so machine noise hits both;
2. training memory: the peak of a training step, each model in a fresh subprocess (CUDA: peak allocated; CPU:
   peak RSS), and the activations autograd saves for backward (exact, and the same on any device);
3. sliding-window inference time per volume: the VAE network in eval mode against the plain SegResNet that
   inference.json builds, loaded with the VAE network's exported weights (the times should be equal);
4. parameter counts.

Network, loss, optimizer and sliding-window settings are read from the bundle's configs/train.json; the options
below override the size-related ones. Runs one torch thread by default (``--threads``): steady timings on a shared
machine. Prints the machine first and a markdown table for the docs last.

    .venv/bin/python scripts/benchmark_segresnet_vae.py
    .venv/bin/python scripts/benchmark_segresnet_vae.py --device cuda --init-filters 32 --json vae_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "segresnet_vae_segmentation"
# Position 0: the bundle's ``scripts`` package must win over this repository's top-level scripts/ folder.
sys.path.insert(0, str(BUNDLE))

import torch  # noqa: E402
from monai.inferers import SlidingWindowInferer  # noqa: E402
from monai.networks import nets  # noqa: E402

from benchmark_common import (  # noqa: E402
    NUM_CLASSES,
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
from scripts.vae import SegResNetVAE, SegResNetVAELoss  # noqa: E402

VAE, PLAIN = "SegResNetVAE", "SegResNet"
RATIO_LABEL = "VAE/plain"


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
    init_filters: int
    in_channels: int
    blocks_down: tuple[int, ...]
    blocks_up: tuple[int, ...]
    vae_nz: int
    vae_estimate_std: bool
    dropout_prob: float
    learning_rate: float
    weight_decay: float
    l2_weight: float
    kl_weight: float
    sw_batch_size: int
    sw_overlap: float


def load_train_config() -> dict:
    return json.loads((BUNDLE / "configs" / "train.json").read_text())


def parse_args(argv: Sequence[str] | None, config: dict) -> tuple[Settings, Path | None]:
    """The run's settings (train.json's, overridden by the options) and where to write JSON, if anywhere."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser)
    parser.add_argument("--roi", type=int, nargs=3, default=config["roi_size"], help="training crop = VAE input")
    parser.add_argument("--init-filters", type=int, default=config["init_filters"], help="32 in the paper")
    parser.add_argument("--volume", type=int, nargs=3, default=(96, 112, 96),
                        help="inference volume (default: the MNI brain at 2 mm)")
    args = parser.parse_args(argv)

    device, amp = check_run_options(parser, args)
    # The bundle's rule (scripts.vae.check_training_crop): the VAE's dense layers see the crop / 2**len(blocks_down).
    factor = 2 ** len(config["blocks_down"])
    if any(size % factor for size in args.roi):
        parser.error(f"--roi {args.roi}: every size must be divisible by {factor}")

    return Settings(
        device=device, amp=amp, threads=args.threads, iters=args.iters, warmup=args.warmup, roi=tuple(args.roi),
        volume=tuple(args.volume), init_filters=args.init_filters, in_channels=config["in_channels"],
        blocks_down=tuple(config["blocks_down"]), blocks_up=tuple(config["blocks_up"]), vae_nz=config["vae_nz"],
        vae_estimate_std=config["vae_estimate_std"], dropout_prob=config["dropout_prob"],
        learning_rate=config["learning_rate"], weight_decay=config["weight_decay"],
        l2_weight=config["l2_weight"], kl_weight=config["kl_weight"], sw_batch_size=config["sw_batch_size"],
        sw_overlap=config["sw_overlap"],
    ), args.json


def segresnet_kwargs(s: Settings) -> dict:
    """Arguments shared by the training network and inference.json's network."""
    return {"spatial_dims": 3, "init_filters": s.init_filters, "in_channels": s.in_channels,
            "out_channels": NUM_CLASSES, "blocks_down": s.blocks_down, "blocks_up": s.blocks_up}


def build_model(s: Settings, name: str) -> torch.nn.Module:
    """The training network of ``name``, as train.json builds it (the plain one with the same dropout)."""
    if name == VAE:
        return SegResNetVAE(input_image_size=s.roi, vae_nz=s.vae_nz, vae_estimate_std=s.vae_estimate_std,
                            dropout_prob=s.dropout_prob, **segresnet_kwargs(s))
    return nets.SegResNet(dropout_prob=s.dropout_prob, **segresnet_kwargs(s))


def train_step(model: torch.nn.Module, s: Settings) -> TrainingStep:
    """One training iteration of ``model`` with the bundle's loss and Adam, as SupervisedTrainer runs it."""
    return TrainingStep(model, SegResNetVAELoss(l2_weight=s.l2_weight, kl_weight=s.kl_weight),
                        torch.optim.Adam(model.parameters(), lr=s.learning_rate, weight_decay=s.weight_decay),
                        s.device, s.amp, s.in_channels, s.roi, NUM_CLASSES)


def memory_step(s: Settings, name: str) -> TrainingStep:
    """The training step of ``name`` as a fresh memory subprocess builds it."""
    configure_torch(s.threads)
    return train_step(build_model(s, name), s)


def inference_network(s: Settings, vae: SegResNetVAE) -> nets.SegResNet:
    """inference.json's network (no dropout argument) loaded strictly with the VAE network's exported weights,
    which fails if the export is not exactly a plain SegResNet."""
    plain = nets.SegResNet(**segresnet_kwargs(s))
    plain.load_state_dict(vae.segmentation_network().state_dict(), strict=True)
    return plain.to(s.device).eval()


def sliding_window_runs(s: Settings, vae: SegResNetVAE) -> dict[str, Callable[[], torch.Tensor]]:
    """One whole-volume sliding-window prediction per model, as the bundle's validation and inference run it."""
    inferer = SlidingWindowInferer(roi_size=s.roi, sw_batch_size=s.sw_batch_size, overlap=s.sw_overlap,
                                   mode="gaussian")
    volume = torch.randn(1, s.in_channels, *s.volume, device=s.device)
    models = {VAE: vae.to(s.device), PLAIN: inference_network(s, vae)}
    return inference_runs(models, inferer, volume, s.device, s.amp)


def parameter_counts(vae: SegResNetVAE, s: Settings) -> dict[str, int]:
    return {
        VAE: count_parameters(vae),
        "exported inference model": count_parameters(vae.segmentation_network()),
        PLAIN: count_parameters(nets.SegResNet(**segresnet_kwargs(s))),
    }


@dataclass
class Results:
    """Everything measured; written as JSON with ``--json``."""

    machine: dict[str, object]
    settings: Settings
    training_step: Timing
    training_step_memory_mib: dict[str, float]
    memory_method: str
    saved_for_backward_mib: dict[str, float]
    sliding_window_inference: Timing
    max_inference_logit_difference: float
    parameters: dict[str, int]
    load_average_1min_at_end: float
    wall_s: float


def markdown_table(r: Results) -> str:
    s, info = r.settings, r.machine
    memory_kind = "peak allocated growth" if s.device == "cuda" else "peak RSS growth"

    def row(label: str, values: dict, fmt: str, ratio: float | None = None) -> str:
        ratio = values[VAE] / values[PLAIN] if ratio is None else ratio
        return f"| {label} | {values[VAE]:{fmt}} | {values[PLAIN]:{fmt}} | {ratio:.2f} |"

    train, infer = r.training_step, r.sliding_window_inference
    roi, volume = "x".join(map(str, s.roi)), "x".join(map(str, s.volume))
    return "\n".join([
        f"{hardware(info)}; torch {info['torch']}; init_filters {s.init_filters}; AMP {'on' if s.amp else 'off'}; "
        f"1-min load average {info['load_average_1min_at_start']:.1f} at start, {r.load_average_1min_at_end:.1f} "
        f"at end; times are medians of {s.iters} interleaved runs after {s.warmup} warm-up, their ratios the "
        "median of the per-round ratios (each VAE run against the plain run beside it, under the same load).",
        "",
        "| | SegResNetVAE (training network) | SegResNet (same settings) | VAE / plain |",
        "|---|---:|---:|---:|",
        row(f"training step, batch 1, crop {roi} (ms)", train.median_ms, ".0f", train.median_paired_ratio),
        row(f"training-step memory, {memory_kind} (MiB)", r.training_step_memory_mib, ".0f"),
        row("activations saved for backward (MiB)", r.saved_for_backward_mib, ".0f"),
        row(f"sliding-window inference, {volume} volume (ms)", infer.median_ms, ".0f", infer.median_paired_ratio),
        row("parameters", {name: r.parameters[name] for name in (VAE, PLAIN)}, ","),
        "",
        f"Memory: {r.memory_method}. Inference: the VAE network in eval mode against the plain SegResNet loaded "
        f"with its exported weights (max logit difference {r.max_inference_logit_difference:.3g}). The exported "
        f"inference model (`segmentation_network()`, models/model.pt) is that plain SegResNet: "
        f"{r.parameters['exported inference model']:,} parameters.",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    started = time.perf_counter()
    s, json_path = parse_args(argv, load_train_config())
    configure_torch(s.threads)
    info = machine(s.device)
    print_machine(info)
    print(f"Device {s.device}, AMP {s.amp}, crop {list(s.roi)}, volume {list(s.volume)}, "
          f"init_filters {s.init_filters}, iters {s.iters}, warmup {s.warmup}", flush=True)

    steps = {name: train_step(build_model(s, name), s) for name in (VAE, PLAIN)}
    train = interleaved_timing(steps, s.device, s.iters, s.warmup)
    print_timing("Training step", train, RATIO_LABEL)
    saved = {name: saved_for_backward_mib(step.forward_loss, step.model.parameters()) for name, step in steps.items()}
    print(f"Activations saved for backward (MiB): {VAE} {saved[VAE]:.0f}, {PLAIN} {saved[PLAIN]:.0f}")

    memory = step_memory(memory_step, s, (VAE, PLAIN), s.device)
    print(f"Training-step memory (MiB): {VAE} {memory[VAE]:.0f}, {PLAIN} {memory[PLAIN]:.0f} "
          f"[{memory_method(s.device)}]", flush=True)

    vae = steps[VAE].model
    runs = sliding_window_runs(s, vae)
    difference = max_output_difference(runs, VAE, PLAIN)
    infer = interleaved_timing(runs, s.device, s.iters, s.warmup)
    print_timing("Sliding-window inference per volume", infer, RATIO_LABEL)
    print(f"  max |logit difference|, eval-mode VAE vs exported SegResNet: {difference:.3g}")

    params = parameter_counts(vae, s)
    print("Parameters: " + ", ".join(f"{name} {count:,}" for name, count in params.items()))

    results = Results(machine=info, settings=s, training_step=train, training_step_memory_mib=memory,
                      memory_method=memory_method(s.device), saved_for_backward_mib=saved,
                      sliding_window_inference=infer, max_inference_logit_difference=difference, parameters=params,
                      load_average_1min_at_end=os.getloadavg()[0], wall_s=time.perf_counter() - started)
    print(f"\nWall time {results.wall_s:.0f} s\n")
    print(markdown_table(results))
    if json_path is not None:
        json_path.write_text(json.dumps(asdict(results), indent=2) + "\n")


if __name__ == "__main__":
    main()
