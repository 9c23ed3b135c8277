"""A train handler that tests/test_random_state.py adds to a bundle's training through a config overlay (it imports
this module from PYTHONPATH): for every iteration it appends one JSON line to ``path`` with the rank, epoch,
iteration, a digest of the batch's image (the crop after every random transform), the loss at full precision and
the initial seed of each torch generator that the loss and ``prepare_batch`` hold (found as the bundle's
``scripts.random_state`` finds them); ``stop_after_epochs`` ends the run after that many epochs (after the epoch's checkpoint), as a killed run would."""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events


class RandomStreamProbe:
    def __init__(self, path: str, stop_after_epochs: int | None = None) -> None:
        self.path = path
        self.stop_after_epochs = stop_after_epochs
        self._image = ""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._digest)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._stop)

    def _digest(self, engine: Engine) -> None:
        image = engine.state.batch["image"]
        array = torch.as_tensor(image).detach().cpu().contiguous().numpy()
        self._image = hashlib.sha256(array.tobytes()).hexdigest()[:16]

    def _record(self, engine: Engine) -> None:
        output = engine.state.output
        loss = (output[0] if isinstance(output, list) else output)["loss"]
        line = {"rank": dist.get_rank() if dist.is_initialized() else 0, "epoch": engine.state.epoch,
                "iteration": engine.state.iteration, "image": self._image, "loss": float(loss),
                "generators": self._generator_seeds(engine)}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    @staticmethod
    def _generator_seeds(engine: Engine) -> dict[str, int]:
        from scripts.random_state import find_generators  # the bundle's own package: the run's cwd is the bundle

        seeds = {}
        for part in ("loss_function", "prepare_batch"):
            for steps, generator in find_generators(getattr(engine, part, None)):
                if isinstance(generator, torch.Generator):
                    seeds[part + "".join(f"/{value}" for _, value in steps)] = generator.initial_seed()
        return seeds

    def _stop(self, engine: Engine) -> None:
        if self.stop_after_epochs is not None and engine.state.epoch >= self.stop_after_epochs:
            engine.terminate()
