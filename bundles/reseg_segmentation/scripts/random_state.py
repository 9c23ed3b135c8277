# Generated from bundles/template/scripts/random_state.py by scripts/generate_bundles.py: edit those, not this file.
"""The random state of a training run, saved with its checkpoint so that a resumed run draws what the uninterrupted
run would have drawn.

A checkpoint of the network, optimiser, scheduler and trainer alone resumes with the random streams of a fresh
start: crops, flips and intensity jitter, the dropout masks and VAE noise drawn from torch's global generator, and
the generators a method keeps for itself (SemSim's CutMix boxes, SelfReg's channel selection) all begin again from
the seed. :class:`RandomState` (in ``checkpoint_objects``) saves and restores:

- torch's global CPU generator (and every CUDA device's, where CUDA is available), numpy's and Python's global
  generators;
- every generator reachable from the trainer's data loader, ``prepare_batch``, loss function, network and inferer:
  each ``Randomizable`` transform's ``R`` (MONAI's DataLoader seeds the transforms of the main process once, when
  it is built, so a worker-less loader never reseeds them), ``torch.Generator`` objects (also those a method
  creates lazily, which are created again on loading), ``numpy.random.Generator`` and ``random.Random``. They are
  found by walking attributes, lists and dicts, so a method's code needs nothing to take part;
- the pass count of every :class:`~scripts.sampling.EpochBatchSampler` reachable from there: a DistributedSampler
  shuffles each pass by that count (``set_epoch``), so without it a resumed run under torchrun would repeat the first
  passes' shard orders;
- the trainer's AMP GradScaler (MONAI creates it when the run starts, so it cannot be a checkpoint object itself).

The state is taken at the end of each epoch by a handler that :class:`RandomState` attaches to the trainer when it is
built: after the trainer's own handlers (the validation run, which draws from torch's generator when it iterates its
loader) and before the checkpoint saver, which is attached after the checkpoint objects exist. Under
``torch.distributed`` every rank takes its own state and rank 0 gathers them, so that the checkpoint, saved by rank 0
only, resumes each rank with its own streams. Everything is stored as tensors, numbers, strings, lists and dicts,
which ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

import json
import logging
import random
import types
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from .sampling import EpochBatchSampler

logger = logging.getLogger(__name__)

# The trainer's attributes whose objects hold the run's own generators (MONAI Workflow names).
TRAINER_PARTS = ("data_loader", "prepare_batch", "loss_function", "network", "inferer")
# Values never walked into: they hold no generator, or are too large to walk (tensors, arrays).
_LEAVES = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    bool,
    type(None),
    torch.Tensor,
    np.ndarray,
    np.generic,
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.GeneratorType,
    torch.device,
    torch.dtype,
)
_GENERATORS = (torch.Generator, np.random.RandomState, np.random.Generator, random.Random)
# Streams whose position is a count rather than a generator state; they are walked into as well.
_COUNTED = (EpochBatchSampler,)
_STREAMS = _GENERATORS + _COUNTED
# How deep the search goes below a root (a transform inside a Compose inside a dataset inside a loader is 6 deep).
MAX_DEPTH = 40


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# A path is a list of steps from a root: ["attr", name], ["index", i] or ["key", token] with the token of a dict key.
def _key_token(key: Any) -> str:
    """A dict key as a string that is the same in every run: ``str:name``, ``int:3``, ``device:cuda:0``."""
    if isinstance(key, torch.device):
        return f"device:{key}"
    if isinstance(key, (str, int)):
        return f"{type(key).__name__}:{key}"
    return f"repr:{key!r}"


def _token_key(token: str) -> Any:
    kind, _, value = token.partition(":")
    if kind == "device":
        return torch.device(value)
    if kind == "int":
        return int(value)
    if kind == "str":
        return value
    raise KeyError(token)


def _path_name(root: str, steps: list[list]) -> str:
    name = root
    for kind, value in steps:
        name += f".{value}" if kind == "attr" else f"[{value}]"
    return name


def find_generators(root: Any) -> Iterator[tuple[list[list], Any]]:
    """``(path, stream)`` for every torch / numpy / Python generator and every epoch batch sampler reachable from
    ``root`` through object attributes, lists, tuples and dicts, each once (by its first path, depth first, in
    attribute order)."""
    seen: set[int] = set()

    def walk(obj: Any, steps: list[list]) -> Iterator[tuple[list[list], Any]]:
        if isinstance(obj, _LEAVES) or id(obj) in seen or len(steps) > MAX_DEPTH:
            return
        seen.add(id(obj))
        if isinstance(obj, _STREAMS):
            yield steps, obj
            if isinstance(obj, _GENERATORS):
                return
        if isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                yield from walk(item, [*steps, ["index", i]])
            return
        if isinstance(obj, Mapping):
            for key, item in list(obj.items()):
                yield from walk(item, [*steps, ["key", _key_token(key)]])
            return
        try:
            attributes = vars(obj)
        except TypeError:  # no __dict__ (C++ objects, slots)
            return
        for name, item in list(attributes.items()):
            yield from walk(item, [*steps, ["attr", name]])

    yield from walk(root, [])


def _generator_state(generator: Any) -> dict:
    if isinstance(generator, EpochBatchSampler):
        return {"type": "batch_sampler_passes", "state": generator.passes}
    if isinstance(generator, torch.Generator):
        return {"type": "torch", "device": str(generator.device), "state": generator.get_state()}
    if isinstance(generator, np.random.RandomState):
        return {"type": "numpy", "state": _numpy_state(generator.get_state())}
    if isinstance(generator, np.random.Generator):
        return {"type": "numpy_generator", "state": json.dumps(generator.bit_generator.state)}
    return {"type": "python", "state": _python_state(generator.getstate())}


def _set_generator_state(generator: Any, state: dict) -> None:
    if state["type"] == "batch_sampler_passes":
        generator.passes = int(state["state"])
    elif state["type"] == "torch":
        generator.set_state(state["state"].cpu())
    elif state["type"] == "numpy":
        generator.set_state(_numpy_tuple(state["state"]))
    elif state["type"] == "numpy_generator":
        generator.bit_generator.state = json.loads(state["state"])
    else:
        generator.setstate(_python_tuple(state["state"]))


def _numpy_state(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached_gaussian = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_tuple(state: dict) -> tuple:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]


def _python_state(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def _python_tuple(state: list) -> tuple:
    version, internal, gauss_next = state
    return version, tuple(internal), gauss_next


def _scaler(trainer: Any) -> Any:
    for name in ("scaler", "scaler_"):  # MONAI 1.6 names it ``scaler``
        scaler = getattr(trainer, name, None)
        if scaler is not None:
            return scaler
    return None


class RandomState:
    """The random state of one training run, as a checkpoint object (``state_dict`` / ``load_state_dict``).

    Args:
        trainer: the SupervisedTrainer; the generators reachable from its ``data_loader``, ``prepare_batch``,
            ``loss_function``, ``network`` and ``inferer`` are saved, and its AMP GradScaler.
        objects: further roots to search for generators, by name.

    It attaches its end-of-epoch :meth:`snapshot` to ``trainer`` when built, which must happen on every rank (a
    config builds it on every rank as part of ``checkpoint_objects``, which the saver and the resume loader name).
    """

    def __init__(self, trainer: Any, objects: Mapping[str, Any] | None = None) -> None:
        self.trainer = trainer
        self.objects = dict(objects or {})
        self._snapshot: dict | None = None
        self.attach(trainer)

    def roots(self) -> dict[str, Any]:
        parts = {name: getattr(self.trainer, name, None) for name in TRAINER_PARTS}
        return {name: obj for name, obj in {**parts, **self.objects}.items() if obj is not None}

    def attach(self, engine: Engine) -> None:
        if isinstance(engine, Engine) and not engine.has_event_handler(self.snapshot, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.snapshot)

    def capture(self) -> dict:
        """This process's random state now."""
        generators = {}
        for root, obj in self.roots().items():
            for steps, generator in find_generators(obj):
                generators[_path_name(root, steps)] = {"root": root, "steps": steps, **_generator_state(generator)}
        scaler = _scaler(self.trainer)
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state(np.random.get_state()),
            "python": _python_state(random.getstate()),
            "generators": generators,
            "grad_scaler": scaler.state_dict() if scaler is not None else {},
        }

    def snapshot(self, engine: Engine | None = None) -> None:
        """Take every rank's state (a collective under torch.distributed: all ranks must call it)."""
        state = self.capture()
        if _world_size() > 1:
            ranks: list[Any] = [None] * _world_size()
            dist.all_gather_object(ranks, state)
        else:
            ranks = [state]
        self._snapshot = {"ranks": ranks}

    def state_dict(self) -> dict:
        """The state of every rank at the last :meth:`snapshot`; this process's state now if none was taken."""
        return self._snapshot if self._snapshot is not None else {"ranks": [self.capture()]}

    def load_state_dict(self, state_dict: Mapping) -> None:
        ranks = state_dict["ranks"]
        rank = _rank()
        if rank >= len(ranks):
            logger.warning(
                f"the checkpoint holds the random state of {len(ranks)} process(es): rank {rank} keeps the streams "
                "of its seed (resuming with more processes than saved)"
            )
            return
        state = ranks[rank]
        torch.set_rng_state(state["torch"].cpu())
        if state["cuda"] and torch.cuda.is_available():
            if len(state["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
            else:
                logger.warning("the checkpoint's CUDA random state is of another number of devices: not restored")
        np.random.set_state(_numpy_tuple(state["numpy"]))
        random.setstate(_python_tuple(state["python"]))
        roots = self.roots()
        for name, saved in state["generators"].items():
            if not self._restore(roots.get(saved["root"]), saved):
                logger.warning(f"random state of {name} not restored: the run has no such generator")
        scaler = _scaler(self.trainer)
        if scaler is not None and state["grad_scaler"]:
            scaler.load_state_dict(state["grad_scaler"])

    @staticmethod
    def _restore(root: Any, saved: dict) -> bool:
        """Set the generator at ``saved``'s path under ``root``; one missing from a dict (made when first used) and
        saved from torch is created there."""
        obj, steps = root, saved["steps"]
        for i, (kind, value) in enumerate(steps):
            if obj is None:
                return False
            if kind == "attr":
                obj = vars(obj).get(value) if hasattr(obj, "__dict__") else None
            elif kind == "index":
                obj = obj[value] if isinstance(obj, (list, tuple)) and value < len(obj) else None
            else:
                if not isinstance(obj, Mapping):
                    return False
                found = [k for k in obj if _key_token(k) == value]
                if found:
                    obj = obj[found[0]]
                elif i == len(steps) - 1 and saved["type"] == "torch" and isinstance(obj, dict):
                    device = torch.device(saved["device"])
                    if device.type == "cuda" and not torch.cuda.is_available():
                        return False
                    try:
                        key = _token_key(value)
                    except KeyError:
                        return False
                    obj[key] = torch.Generator(device=device)
                    obj = obj[key]
                else:
                    return False
        if not isinstance(obj, _STREAMS) or _generator_state(obj)["type"] != saved["type"]:
            return False
        _set_generator_state(obj, saved)
        return True
