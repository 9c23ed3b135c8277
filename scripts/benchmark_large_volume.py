"""Sliding-window inference of one CT-sized volume (default 512 x 512 x 600): peak memory and time of each stitching
arm against MONAI's default (window and output on the input's device), each arm in a fresh process, and the
largest absolute difference of its output from the default's (must be <= 1e-5).

    OMP_NUM_THREADS=1 python scripts/benchmark_large_volume.py --out /tmp/large_volume

Arms: ``default`` (``SlidingWindowInferer`` without device arguments), ``bundle`` (what the bundles' automatic
choice, ``scripts/sliding_window.py``, picks here from the volume, the classes and the free memory) and
``buffered`` (``buffer_steps`` rows stitched on the window device first). With CUDA also ``cpu_stitch`` (network on
the GPU, output stitched in host memory) and ``cpu_stitch_buffered``. The network is a tiny two-layer convolution, so
that the stitching, not the network, is what is measured; the volume is random (seeded) noise. Each arm writes its
output as float32 ``.npy`` under ``--out`` (2 GB each for 3 classes), compared slab by slab without loading it whole.
Not a test: a measurement, printed and written to ``<out>/benchmark_large_volume.json`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "bundles" / "template"
TOLERANCE = 1e-5


def tiny_network(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, num_classes, 1)
    ).eval()


def arm_arguments(arm: str, args: argparse.Namespace, device: torch.device) -> dict:
    """The ``SlidingWindowInferer`` device arguments of ``arm``."""
    if arm == "default":
        return {}
    if arm == "bundle":
        sys.path.insert(0, str(TEMPLATE))
        from scripts.memory import free_memory, host_available_memory
        from scripts.sliding_window import stitching_for

        choice = stitching_for(args.shape, args.classes, args.roi, args.sw_batch_size, args.overlap, device,
                               free_memory(device), host_available_memory())
        print(f"bundle choice: {choice['why']}", flush=True)
        return {k: choice[k] for k in ("sw_device", "device", "buffer_steps")}
    if arm == "buffered":
        return {"sw_device": device, "device": device, "buffer_steps": args.buffer_steps}
    if arm == "cpu_stitch":
        return {"sw_device": device, "device": "cpu"}
    return {"sw_device": device, "device": "cpu", "buffer_steps": args.buffer_steps}  # cpu_stitch_buffered


def run_arm(arm: str, args: argparse.Namespace) -> None:
    """One arm in this process: infer, save the output, write ``<arm>.json`` (seconds, peak RSS, peak CUDA)."""
    from monai.inferers import SlidingWindowInferer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = tiny_network(args.classes).to(device)
    image = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, *args.shape), dtype=np.float32))
    image = image.to(device)
    inferer = SlidingWindowInferer(args.roi, args.sw_batch_size, args.overlap, mode="gaussian",
                                   **arm_arguments(arm, args, device))
    start = time.perf_counter()
    with torch.no_grad():
        output = inferer(image, network)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    np.save(args.out / f"{arm}.npy", output[0].cpu().numpy())
    result = {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "output_device": str(output.device)}
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (args.out / f"{arm}.json").write_text(json.dumps(result))


def max_abs_difference(a: Path, b: Path) -> float:
    """The largest |a - b| of two saved outputs, a slab of classes x rows at a time."""
    x, y = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    step = max(1, x.shape[1] // 16)
    return max(float(np.abs(x[:, i : i + step] - y[:, i : i + step]).max()) for i in range(0, x.shape[1], step))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB, {gpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the arms' outputs and the results")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 600])
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--roi", type=int, nargs=3, default=[96, 96, 96])
    parser.add_argument("--sw_batch_size", type=int, default=2)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--buffer_steps", type=int, default=2)
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # set for the child process that runs one arm
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.arm:
        run_arm(args.arm, args)
        return
    arms = ["default", "bundle", "buffered"]
    if torch.cuda.is_available():
        arms += ["cpu_stitch", "cpu_stitch_buffered"]
    load_before = os.getloadavg()
    results = {}
    for arm in arms:
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--arm", arm], check=True)
        results[arm] = json.loads((args.out / f"{arm}.json").read_text())
        if arm != "default":
            results[arm]["max_abs_difference"] = max_abs_difference(args.out / "default.npy", args.out / f"{arm}.npy")
            (args.out / f"{arm}.npy").unlink()
    (args.out / "default.npy").unlink()
    base = results["default"]
    for result in results.values():
        result["time_ratio"] = result["seconds"] / base["seconds"]
        result["rss_ratio"] = result["peak_rss_mib"] / base["peak_rss_mib"]
        if "peak_cuda_mib" in result:
            result["cuda_ratio"] = result["peak_cuda_mib"] / base["peak_cuda_mib"]
    report = {"machine": machine(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "threads": torch.get_num_threads(), "settings": {k: v for k, v in vars(args).items() if k != "arm"},
              "arms": results}
    (args.out / "benchmark_large_volume.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"{report['machine']}; load {load_before} -> {report['load_average_after']}")
    for arm, r in results.items():
        cuda = f", CUDA {r['peak_cuda_mib']:.0f} MiB (x{r['cuda_ratio']:.2f})" if "peak_cuda_mib" in r else ""
        diff = f", max |diff| {r['max_abs_difference']:.1e}" if "max_abs_difference" in r else ""
        print(f"{arm:20s} {r['seconds']:7.1f} s (x{r['time_ratio']:.2f}), peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(x{r['rss_ratio']:.2f}){cuda}{diff}")
    worst = max((r.get("max_abs_difference", 0.0) for r in results.values()), default=0.0)
    if worst > TOLERANCE:
        sys.exit(f"an arm's output differs from the default's by {worst:.1e} > {TOLERANCE:g}")


if __name__ == "__main__":
    main()
