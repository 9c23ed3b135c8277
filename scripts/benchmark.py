"""What each arm of a method bundle costs: training step time and memory, sliding-window inference, parameters.

Every arm is a set of the bundle's command-line overrides (``--arm NAME=OVERRIDES``, as ``accuracy_study.py``
takes them; default: the method registry's arms). Its training objects are built by the bundle's own configs
(``configs/train.json`` and the method's other training configs, as ``python -m monai.bundle run`` builds them
through ``ConfigWorkflow``), on a tiny synthetic dataset that ``make_dataset.py`` writes to a temporary folder, so
that the real ``train#trainer`` with its ``prepare_batch``, inferer, loss, optimizer and AMP setting runs (SemSim's
semi-supervised batches included; a method with a prerequisite stage, ReSeg's teacher, gets it from one epoch of
that stage on the same data: a step costs the same whatever the teacher learnt). Measured per arm:

1. ``step_ms``: one training iteration, ``trainer._iteration`` on one fixed batch of the trainer's own data loader,
   the arms alternating step by step (order reversed every other round) after ``--warmup`` untimed steps;
   ``step_ratio``: the median over rounds of the arm's time / the ``--against`` arm's time in the same round (the
   two saw the same machine load);
2. ``peak_memory_mib``: the growth of memory over two training steps, from just after the trainer and its batch
   exist, each arm in a fresh process (CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS with glibc
   mapping every block of 64 KiB or more on its own, so that the peak follows live memory);
   ``saved_for_backward_mib``: the activations autograd keeps for one iteration (exact and device-independent);
3. ``inference_ms``: the network of ``configs/inference.json`` with the arm's trained weights (strictly loaded), by
   that config's sliding-window inferer on a synthetic ``--volume``, eager, interleaved like the steps;
   ``inference_max_abs_difference``: its logits against the training-side segmentation network (taps attached):
   0 when the method leaves nothing behind in the deployed model;
4. ``parameters``: the deployed network; ``training_parameters``: everything the trainer updates or runs (e.g.
   SemSim's fusion module, ReSeg's frozen teacher).

Writes ``--json`` ``{"machine", "settings", "against", "memory_method", "arms": {name: {...}}, "wall_s"}`` and prints
a markdown table. One torch thread by default (steady on a shared machine; the ratios hardly depend on it).

    python scripts/benchmark.py --method selfreg --small --iters 5 --warmup 1
    python scripts/benchmark.py --method semsim --against fixmatch --device cuda --roi 96 96 96 --json semsim.json
    python scripts/benchmark.py --bundle bundles/selfreg_segmentation --arm "plain=--selfreg_weight 0" \\
        --arm "unet=--backbone unet --selfreg_weight 0"
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# scripts/ is this script's folder, first on sys.path: its tools import as top-level modules
import make_dataset
import method_registry
from accuracy_study import cpu_model, parse_arm, parse_overrides
from bundle_env import bundle_imports

REPO = Path(__file__).resolve().parents[1]
# --small: the backbones at half the width of the bundles' train.json (applied where the config has them), and
# then the registry's small_run overrides for the method's own parts.
SMALL_BACKBONES = {"backbones#segresnet#init_filters": 8, "backbones#unet#channels": [8, 16, 32, 64, 128],
                   "backbones#swinunetr#feature_size": 12}
# Adam allocates its state on the first step, so the peak of a training step is reached by the second.
MEMORY_STEPS = 2
MMAP_THRESHOLD = 64 * 1024
MEMORY_CHILD = "--memory-child"
DATASET = {"num_cases": 7, "num_classes": 3, "seed": 0}  # 4 training, 2 validation, 1 test


def literal(text: str) -> Any:
    """A command-line override value as ``python -m monai.bundle`` reads it: a Python literal, else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def overrides_of(text: str) -> dict[str, Any]:
    return {key: literal(value) for key, value in parse_overrides(text).items()}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1000


def interleaved_times(fns: dict[str, Callable[[], object]], device: str, iters: int,
                      warmup: int) -> dict[str, list[float]]:
    """Each function's times (ms) over ``iters`` rounds of one run each, the order reversed every other round, so
    that times of one round, which saw the same load, pair up."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(iters):
        for name in list(fns) if round_ % 2 == 0 else reversed(list(fns)):
            times[name].append(timed_ms(fns[name], device))
    return times


def paired_ratio(times: dict[str, list[float]], arm: str, against: str) -> float:
    return statistics.median(a / b for a, b in zip(times[arm], times[against]))


def count_parameters(*modules: object) -> int:
    params = {id(p): p for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters()}
    return sum(p.numel() for p in params.values())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--method", choices=[m.name for m in method_registry.all_methods()],
                        help="a method of the registry (bundles/methods/<method>/method.json)")
    source.add_argument("--bundle", type=Path, help="any bundle folder (then give --arm, at least one)")
    parser.add_argument("--arm", action="append", type=parse_arm, metavar="NAME=OVERRIDES",
                        help="an arm and its bundle overrides; repeat (default: the registry's arms)")
    parser.add_argument("--against", help="the arm the ratios are taken against (default: the first)")
    parser.add_argument("--extra", type=overrides_of, default={}, help="bundle overrides for every arm")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--iters", type=int, default=10, help="timed steps and volumes per arm (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps and volumes per arm first (default 2)")
    parser.add_argument("--threads", type=int, default=1, help=f"torch CPU threads (default 1 of {os.cpu_count()})")
    parser.add_argument("--small", action="store_true",
                        help="CPU-sized networks: " + ", ".join(f"{k} {v}" for k, v in SMALL_BACKBONES.items())
                             + " and the registry's small_run overrides")
    parser.add_argument("--roi", type=int, nargs="+",
                        help="training crop = inference window (default: the bundle's roi_size)")
    parser.add_argument("--volume", type=int, nargs="+", default=[96, 112, 96],
                        help="synthetic inference volume (default 96 112 96: the MNI brain at 2 mm)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    args.method = method_registry.by_name(args.method) if args.method else None
    args.bundle = (args.method.bundle_dir if args.method else args.bundle).resolve()
    if args.method and not args.arm:
        args.arm = [parse_arm(f"{name}={text}") for name, text in args.method.arms.items()]
    if not args.arm:
        parser.error("--bundle needs at least one --arm")
    names = [arm.name for arm in args.arm]
    if len(set(names)) != len(names):
        parser.error(f"arm names repeat: {names}")
    args.against = args.against or names[0]
    if args.against not in names:
        parser.error(f"--against {args.against!r} is not one of the arms {names}")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--iters and --threads must be >= 1, --warmup >= 0")
    return args


def configure(parser: Any, spec: dict[str, Any], **more: Any) -> Any:
    """Apply an arm's overrides to a ConfigParser: those every arm shares (and ``more``), the --small sizes where
    the config has them, then the arm's own."""
    parser.update({**spec["overrides"], **more})
    parser.update({key: value for key, value in spec["small"].items() if key in parser})
    parser.update(spec["arm"])
    return parser


class ArmRun:
    """One arm's training objects as ``monai.bundle run`` builds them (``ConfigWorkflow`` + ``initialize`` +
    ``preflight``), and one fixed batch of its trainer's data loader. Build inside :func:`bundle_imports`."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from monai.bundle import ConfigWorkflow

        bundle = Path(spec["bundle"])
        self.device = spec["device"]
        self.workflow = ConfigWorkflow([str(bundle / c) for c in spec["configs"]],
                                       meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False,
                                       workflow_type=None)
        self.parser = configure(self.workflow.parser, spec)
        self.workflow.initialize()
        if "preflight" in self.parser:
            self.parser.get_parsed_content("preflight")
        self.trainer = self.parser.get_parsed_content("train#trainer")
        self.batch = next(iter(self.trainer.data_loader))

    def step(self) -> None:
        self.trainer._iteration(self.trainer, self.batch)

    def saved_for_backward_mib(self) -> float:
        """MiB of tensors autograd saves for backward in one iteration (parameters excluded, storages once)."""
        skip = {p.untyped_storage().data_ptr() for p in self.trainer.network.parameters()}
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in skip:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            self.step()
        return sum(storages.values()) / 2**20


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_method(device: str) -> str:
    if device == "cuda":
        return (f"torch.cuda.max_memory_allocated over {MEMORY_STEPS} training steps minus memory_allocated once "
                "trainer and batch exist, one fresh process per arm")
    return (f"peak RSS (VmHWM, reset via /proc/self/clear_refs) over {MEMORY_STEPS} training steps minus RSS once "
            f"trainer and batch exist, one fresh process per arm, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}")


def memory_child(path: Path) -> None:
    """In a fresh process: the memory growth (MiB) of two training steps of the arm that ``path`` describes."""
    spec = json.loads(path.read_text())
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    with bundle_imports(Path(spec["bundle"])):
        arm = ArmRun(spec)
        if spec["device"] == "cuda":
            sync("cuda")
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(MEMORY_STEPS):
                arm.step()
            sync("cuda")
            mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            base_kib = proc_status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # the high-water mark back to the current RSS
            for _ in range(MEMORY_STEPS):
                arm.step()
            mib = (proc_status_kib("VmHWM") - base_kib) / 1024
    path.with_suffix(".result").write_text(json.dumps({"peak_memory_mib": mib}))


def peak_memory_mib(spec: dict[str, Any], folder: Path, name: str) -> float:
    path = folder / f"memory_{name}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, MEMORY_CHILD, str(path)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"memory of arm {name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-4000:]}")
    return json.loads(path.with_suffix(".result").read_text())["peak_memory_mib"]


def prepare_arm_folder(args: argparse.Namespace, spec: dict[str, Any]) -> None:
    """The registry's prerequisite stage (ReSeg's teacher) for one arm, one epoch on the benchmark's data, into the
    arm's own bundle_root; an arm that does not need it skips it by its own config (weight 0)."""
    stage = args.method.stage1 if args.method else None
    if stage is None:
        return
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow([str(args.bundle / c) for c in stage.configs],
                              meta_file=str(args.bundle / "configs" / "metadata.json"), logging_file=False,
                              run_id=stage.run_id, workflow_type=None)
    configure(workflow.parser, spec, max_epochs=1, val_interval=1)
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def inference_network(args: argparse.Namespace, spec: dict[str, Any], arm: ArmRun) -> tuple[Any, torch.nn.Module]:
    """configs/inference.json's inferer and network, with the arm's trained segmentation weights (strict)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(args.bundle / "configs" / "inference.json"))
    parser.read_meta(str(args.bundle / "configs" / "metadata.json"))
    configure(parser, spec, num_classes=arm.parser.get_parsed_content("num_classes"))
    network = parser.get_parsed_content("network")
    network.load_state_dict(arm.parser.get_parsed_content("segmentation_network").state_dict(), strict=True)
    return parser.get_parsed_content("inferer"), network.eval()


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    machine = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "load_average_1min_at_start": os.getloadavg()[0]}
    configs = list(args.method.training.configs) if args.method else ["configs/train.json"]
    labeled = 2 if args.method and args.method.needs_unlabeled else None  # a full labeled batch, the rest unlabeled
    size = max(24, *(args.roi or [0]))
    task = "synthetic2d" if args.roi and len(args.roi) == 2 else "synthetic"  # a 2D crop: 2D slices to train on
    data = make_dataset.make_dataset(task, work / "data", size=size, labeled=labeled, **DATASET).path
    common = {"dataset_dir": str(data), "device": f"$torch.device('{args.device}')", "amp": args.device == "cuda",
              "num_workers": 0, "progress_bar": False, "resume": False, **args.extra}
    if args.roi:
        common["roi_size"] = list(args.roi)
    small = dict(SMALL_BACKBONES) if args.small else {}
    if args.small and args.method:
        small.update(overrides_of(" ".join(args.method.small_run)))
    specs = {arm.name: {"bundle": str(args.bundle), "configs": configs, "device": args.device,
                        "threads": args.threads, "small": small,
                        "overrides": {**common, "bundle_root": str(work / arm.name)},
                        "arm": {k: literal(v) for k, v in arm.overrides.items()}} for arm in args.arm}

    results: dict[str, dict[str, Any]] = {}
    with bundle_imports(args.bundle):
        runs = {}
        for name, spec in specs.items():
            print(f"building arm {name}: {spec['arm'] or 'the bundle defaults'}", flush=True)
            prepare_arm_folder(args, spec)
            torch.manual_seed(0)
            runs[name] = ArmRun(spec)
        steps = interleaved_times({n: r.step for n, r in runs.items()}, args.device, args.iters, args.warmup)
        volume = torch.randn(1, runs[args.against].parser.get_parsed_content("in_channels"), *args.volume,
                             device=args.device)
        inferers, differences = {}, {}
        for name, arm in runs.items():
            inferer, network = inference_network(args, specs[name], arm)
            trained = arm.parser.get_parsed_content("segmentation_network").eval()

            def infer(net: torch.nn.Module = network, inferer: Any = inferer) -> torch.Tensor:
                with torch.inference_mode(), torch.autocast(args.device, enabled=args.device == "cuda"):
                    return inferer(volume, net)

            inferers[name] = infer
            differences[name] = (infer().float() - infer(trained).float()).abs().max().item()
            results[name] = {
                "overrides": specs[name]["arm"],
                "backbone": arm.parser.get_parsed_content("backbone") if "backbone" in arm.parser else None,
                "parameters": count_parameters(network),
                "training_parameters": count_parameters(arm.trainer.network, arm.trainer.loss_function),
            }
        inference = interleaved_times(inferers, args.device, args.iters, min(args.warmup, 1))
        for name, arm in runs.items():
            results[name]["saved_for_backward_mib"] = arm.saved_for_backward_mib()
        del runs
    memory = {name: peak_memory_mib(spec, work, name) for name, spec in specs.items()}
    for name, result in results.items():
        result.update({
            "step_ms": statistics.median(steps[name]), "step_ms_min": min(steps[name]),
            "step_ms_max": max(steps[name]), "step_ratio": paired_ratio(steps, name, args.against),
            "peak_memory_mib": memory[name],
            "memory_ratio": memory[name] / memory[args.against] if memory[args.against] > 0 else None,
            "inference_ms": statistics.median(inference[name]),
            "inference_ratio": paired_ratio(inference, name, args.against),
            "inference_max_abs_difference": differences[name],
        })
    machine["load_average_1min_at_end"] = os.getloadavg()[0]
    return {
        "machine": machine,
        "settings": {"method": args.method.name if args.method else None, "bundle": str(args.bundle),
                     "configs": configs, "device": args.device, "amp": args.device == "cuda", "iters": args.iters,
                     "warmup": args.warmup, "threads": args.threads, "small": small, "roi": args.roi,
                     "volume": args.volume, "common_overrides": {k: v for k, v in common.items()
                                                                 if k != "dataset_dir"}},
        "against": args.against,
        "memory_method": memory_method(args.device),
        "arms": results,
        "wall_s": time.perf_counter() - started,
    }


def markdown(result: dict[str, Any]) -> str:
    m, s, against = result["machine"], result["settings"], result["against"]
    where = f"{m['gpu']} (CUDA)" if m["gpu"] else f"{m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} threads)"
    lines = [
        f"{s['method'] or s['bundle']}: {where}, torch {m['torch']}, AMP {'on' if s['amp'] else 'off'}, "
        f"{'--small' if s['small'] else 'config'} network sizes, crop {s['roi'] or 'of the bundle'}, volume "
        f"{'x'.join(map(str, s['volume']))}; medians of {s['iters']} interleaved rounds after {s['warmup']} warm-up, "
        f"ratios against {against} (median of paired ratios); load {m['load_average_1min_at_start']:.1f} -> "
        f"{m['load_average_1min_at_end']:.1f}.",
        "",
        "| arm | step ms | step ratio | peak memory MiB | memory ratio | saved for backward MiB | inference ms "
        "| inference ratio | max logit difference | parameters | training parameters |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in result["arms"].items():
        memory_ratio = "–" if a["memory_ratio"] is None else f"{a['memory_ratio']:.2f}"
        lines.append(f"| {name} | {a['step_ms']:.1f} | {a['step_ratio']:.2f} | {a['peak_memory_mib']:.0f} | "
                     f"{memory_ratio} | {a['saved_for_backward_mib']:.0f} | {a['inference_ms']:.1f} | "
                     f"{a['inference_ratio']:.2f} | {a['inference_max_abs_difference']:.3g} | {a['parameters']:,} | "
                     f"{a['training_parameters']:,} |")
    lines += ["", f"Memory: {result['memory_method']}."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [MEMORY_CHILD]:  # a fresh process of peak_memory_mib
        memory_child(Path(argv[1]))
        return None
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="benchmark_") as work:
        result = run(args, Path(work))
    print(f"\nWall time {result['wall_s']:.0f} s\n\n{markdown(result)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
