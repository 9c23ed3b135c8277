"""Measurement machinery shared by the cost benchmarks (``benchmark_segresnet_vae.py``, ``benchmark_selfreg.py``,
``benchmark_reseg.py``, ``benchmark_semsim.py``).

Each benchmark compares variants of a training setup ("arms", two or more) and reports their ratios. This module
holds what does not depend on the method: the run options (device, AMP, threads, iterations), interleaved timing
with paired ratios, a training step on a synthetic batch as SupervisedTrainer runs it, whole-volume inference runs
and their output difference, the peak memory of a training step in a fresh spawned process, the activations
autograd saves for backward, and a description of the machine. It is imported as a top-level module from the
benchmarks' own folder:

    from benchmark_common import interleaved_timing, step_memory
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

SEED = 0
# The bundles read the class count from the datalist; 3 is the tissue task's (background, grey and white matter).
NUM_CLASSES = 3
# CPU-friendly sizes for --small, half of the bundles' train.json; they also say which setting is "the size" of each
# backbone.
SMALL = {
    "segresnet": {"init_filters": 8},
    "unet": {"channels": [8, 16, 32, 64, 128]},
    "swinunetr": {"feature_size": 12},
}
# Adam allocates its state on the first step, so the peak of a training step is reached by the second.
MEMORY_STEPS = 2
MMAP_THRESHOLD = 64 * 1024

Settings = TypeVar("Settings")
# Builds, in a fresh process, one arm's training step from the benchmark's picklable settings and the arm's name;
# it must be a module-level function (spawn pickles it by name) and configure torch (seed, threads) itself.
StepFactory = Callable[[Settings, str], Callable[[], object]]


@dataclass(frozen=True)
class Timing:
    """Interleaved timings of two arms in milliseconds; ratios are first / second."""

    median_ms: dict[str, float]
    min_ms: dict[str, float]
    max_ms: dict[str, float]
    ratio_of_medians: float
    median_paired_ratio: float


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark has: device, AMP, repetitions, torch threads, JSON output."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--iters", type=int, default=10, help="timed training steps and volumes per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps and volumes per model first")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast + GradScaler as the bundle's trainer (default: on for CUDA; CUDA only)")
    # With other jobs on the cores, torch's default team of one thread per core stalls at every barrier whenever
    # one of its threads is descheduled (2-3x slower, run-to-run spread 10x on a loaded 2-core machine); one
    # thread is not, and the ratios between arms, which are what the benchmarks measure, hardly depend on the
    # thread count.
    parser.add_argument("--threads", type=int, default=1,
                        help=f"torch CPU threads (default 1, steady on a shared machine; all cores: {os.cpu_count()})")
    parser.add_argument("--json", type=Path, help="also write the results here")


def check_run_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, bool]:
    """Validate the options of :func:`add_run_options`; returns the device and whether AMP is on."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    amp = device == "cuda" if args.amp is None else args.amp
    if amp and device != "cuda":
        parser.error("--amp needs CUDA (the bundle enables AMP only there)")
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--iters and --threads must be >= 1, --warmup >= 0")
    return device, amp


def configure_torch(threads: int) -> None:
    """Seed and thread count, in the main process and in each memory subprocess alike."""
    torch.manual_seed(SEED)
    torch.set_num_threads(threads)


def sync(device: str) -> None:
    """Wait for queued CUDA kernels, so that a wall-clock time covers the work (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1000


def interleaved_times(fns: dict[str, Callable[[], object]], device: str, iters: int,
                      warmup: int) -> dict[str, list[float]]:
    """Warm all up, then time them in rounds, one run of each per round, reversing the order every other round so
    that of any two neither always runs right after the other; returns each one's times (ms) in round order, so
    that times of the same round, which saw the same machine load, can be paired (:func:`median_paired_ratio`)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(iters):
        for name in names if round_ % 2 == 0 else reversed(names):
            times[name].append(time_once(fns[name], device))
    return times


def median_paired_ratio(times: dict[str, list[float]], first: str, second: str) -> float:
    """The median over rounds of first's time / second's time in the same round (:func:`interleaved_times`)."""
    return statistics.median(a / b for a, b in zip(times[first], times[second]))


def interleaved_timing(fns: dict[str, Callable[[], object]], device: str, iters: int, warmup: int) -> Timing:
    """Two arms timed by :func:`interleaved_times`, with their ratios first / second; the per-round ratio compares
    two runs that saw the same machine load."""
    first, second = fns
    times = interleaved_times(fns, device, iters, warmup)
    return Timing(
        median_ms={n: statistics.median(t) for n, t in times.items()},
        min_ms={n: min(t) for n, t in times.items()},
        max_ms={n: max(t) for n, t in times.items()},
        ratio_of_medians=statistics.median(times[first]) / statistics.median(times[second]),
        median_paired_ratio=median_paired_ratio(times, first, second),
    )


def median_time_ms(fn: Callable[[], object], device: str, iters: int, warmup: int) -> float:
    """Median wall-clock time of ``fn`` in milliseconds over ``iters`` runs after ``warmup`` untimed ones: the
    time of one part of an arm (e.g. a forward pass inside its step), which has nothing to alternate with."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(iters))


def print_timing(title: str, timing: Timing, ratio_label: str) -> None:
    print(f"{title} (ms):")
    for name, median in timing.median_ms.items():
        print(f"  {name:<13} median {median:8.1f}  min {timing.min_ms[name]:8.1f}  max {timing.max_ms[name]:8.1f}")
    print(f"  {ratio_label}: ratio of medians {timing.ratio_of_medians:.2f}, median of paired ratios "
          f"{timing.median_paired_ratio:.2f}", flush=True)


def memory_method(device: str, unit: str = "model") -> str:
    """How :func:`step_memory` measures on ``device``, for the output; ``unit`` names what gets its own process."""
    if device == "cuda":
        return (f"torch.cuda.max_memory_allocated over {MEMORY_STEPS} training steps minus memory_allocated after "
                f"building model, optimizer and batch, one fresh process per {unit}")
    return (f"peak RSS (VmHWM, reset via /proc/self/clear_refs) over {MEMORY_STEPS} training steps minus RSS after "
            f"building model, optimizer and batch, one fresh process per {unit}, glibc MALLOC_MMAP_THRESHOLD_="
            f"{MMAP_THRESHOLD} so that freed memory leaves RSS")


def step_memory_in_child(make_step: StepFactory[Settings], settings: Settings, name: str, device: str) -> float:
    """Run in a fresh process: memory growth in MiB over a few training steps, from just after the model, its
    optimizer and the batch exist (weights excluded; gradients, Adam state, activations and scratch included)."""
    step = make_step(settings, name)
    if device == "cuda":
        sync(device)
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(MEMORY_STEPS):
            step()
        sync(device)
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    baseline_kib = proc_status_kib("VmRSS")
    # Reset the high-water mark to the current RSS: the process-lifetime peak would include importing torch, and
    # ru_maxrss of a spawned child even starts at the parent's peak (Linux carries it across exec).
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(MEMORY_STEPS):
        step()
    return (proc_status_kib("VmHWM") - baseline_kib) / 1024


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


@contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Set environment variables for processes started inside the block."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def step_memory(make_step: StepFactory[Settings], settings: Settings, names: Sequence[str],
                device: str) -> dict[str, float]:
    """Peak training-step memory of each arm in MiB, each in its own spawned process: in one process, memory
    the allocator kept from the first arm would serve the second and hide part of its peak."""
    context = multiprocessing.get_context("spawn")
    mib = {}
    # glibc otherwise keeps freed blocks below a threshold it raises as it goes, so that RSS ends up following the
    # allocation history more than live memory (+-70 MiB from run to run, swamping the differences measured here);
    # with every block of 64 KiB or more mapped and unmapped on its own, the peak RSS is the peak of live memory.
    with environment(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD)):
        for name in names:
            with context.Pool(1) as pool:
                mib[name] = pool.apply(step_memory_in_child, (make_step, settings, name, device))
    return mib


def saved_for_backward_mib(forward_loss: Callable[[], object], parameters: Iterable[torch.Tensor]) -> float:
    """MiB of activations autograd keeps for the backward pass of one ``forward_loss()`` (``parameters``
    excluded; storages counted once). Allocator- and device-independent, so it shows an arm's share of training
    memory even where the CPU peak RSS is dominated by convolution scratch buffers."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward_loss()
    return sum(storages.values()) / 2**20


class TrainingStep:
    """One training iteration on a fixed synthetic batch (batch 1 unless ``batch_size``), as MONAI's
    SupervisedTrainer runs it: ``prepare_batch`` (:meth:`batch`), then forward and loss under autocast, a
    GradScaler-scaled backward and an optimizer step.

    ``model`` is put on ``device`` in training mode; the batch is an image (batch_size, in_channels, *roi) of
    Gaussian noise and a label (batch_size, 1, *roi) of uniform class indices, drawn after the model and optimizer
    exist. A subclass whose trainer has a ``prepare_batch`` (e.g. one that builds a dict of network inputs) overrides
    :meth:`batch`.
    """

    def __init__(self, model: torch.nn.Module, loss: Callable[[object, torch.Tensor], torch.Tensor],
                 optimizer: torch.optim.Optimizer, device: str, amp: bool, in_channels: int, roi: Sequence[int],
                 num_classes: int, batch_size: int = 1) -> None:
        self.model = model.to(device).train()
        self.loss, self.optimizer = loss, optimizer
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=amp)
        self.device_type, self.amp = torch.device(device).type, amp
        self.image = torch.randn(batch_size, in_channels, *roi, device=device)
        self.label = torch.randint(0, num_classes, (batch_size, 1, *roi), device=device).float()

    def batch(self) -> tuple[object, torch.Tensor]:
        """The network input and the label of one iteration, as the trainer's ``prepare_batch`` returns them: the
        fixed image and label here."""
        return self.image, self.label

    def forward_loss(self, inputs: object = None, label: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and loss on ``inputs`` and ``label``, by default a fresh :meth:`batch`."""
        if inputs is None:
            inputs, label = self.batch()
        with torch.autocast(self.device_type, enabled=self.amp):  # the trainer computes the loss under autocast too
            return self.loss(self.model(inputs), label)

    def __call__(self) -> None:
        inputs, label = self.batch()  # before zero_grad and outside autocast, as in the trainer
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(self.forward_loss(inputs, label)).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def inference_runs(models: dict[str, torch.nn.Module], inferer: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor],
                   volume: torch.Tensor, device: str, amp: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """One whole-volume prediction per model (in eval mode), under inference mode and autocast as the bundles'
    evaluators run it."""

    def run(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def infer() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device, enabled=amp):
                return inferer(volume, model)
        return infer

    return {name: run(model.eval()) for name, model in models.items()}


def max_output_difference(runs: dict[str, Callable[[], torch.Tensor]], first: str, second: str) -> float:
    """Largest absolute output difference between two inference runs: 0 when the two models compute the same."""
    return (runs[first]().float() - runs[second]().float()).abs().max().item()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back below
    return platform.processor() or platform.machine()


def machine(device: str) -> dict[str, object]:
    """What the numbers were measured on; the load average tells how much other work shared the CPU."""
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "load_average_1min_at_start": os.getloadavg()[0],
    }


def print_machine(info: dict[str, object]) -> None:
    print("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)


def hardware(info: dict[str, object]) -> str:
    """Where the numbers of :func:`machine` were measured, in a few words for the head of a markdown table."""
    if info["gpu"]:
        return f"{info['gpu']} (CUDA)"
    return f"{info['cpu']} CPU ({info['cpu_cores']} cores), torch threads {info['torch_threads']}"
