"""Checkpoints that survive a crash and never run code when loaded.

MONAI's CheckpointSaver writes in place (``atomic=False``), and ignite deletes the checkpoint it replaces before
writing the new one, so a run killed while saving could be left with a truncated checkpoint and none before it.
:class:`AtomicCheckpointSaver` writes through :func:`safe_io.replacing` and deletes the older file only once the new
one is complete. MONAI's CheckpointLoader already reads with ``torch.load(weights_only=True)``;
:class:`WeightsOnlyCheckpointLoader` turns its refusal of a file that needs code into a message that says so.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from .safe_io import replacing
from .settings import SETTINGS_FILENAME, write_settings


class AtomicDiskSaver(DiskSaver):
    """ignite's DiskSaver that writes each checkpoint through :func:`replacing` and removes a replaced checkpoint
    only after its successor is on disk, so one complete checkpoint exists at every moment.

    ``filename``, if given, is used for every save instead of ignite's generated name (MONAI's fixed
    ``model.pt``). ``settings``, if given, are written (atomically too) to ``model_settings.json`` in the same
    folder just before each checkpoint: the settings that travel with the model (``scripts/settings.py``).
    """

    def __init__(self, dirname: str | Path, filename: str | None = None, settings: dict | None = None) -> None:
        super().__init__(dirname, require_empty=False)
        self.filename = filename
        self.settings = settings
        self._replaced: list[str] = []

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        filename = self.filename or filename
        if idist.get_rank() == self.save_on_rank:
            if self.settings is not None:
                write_settings(str(self.dirname / SETTINGS_FILENAME), self.settings)
            with replacing(self.dirname / filename) as partial, open(partial, "wb") as f:
                torch.save(checkpoint, f)  # to a file object: torch would name the records after the random name
            for old in self._replaced:
                if old != filename:
                    (self.dirname / old).unlink(missing_ok=True)
        self._replaced.clear()

    def remove(self, filename: str) -> None:
        # ignite calls this just before writing the successor: postpone it to after the write
        self._replaced.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's CheckpointSaver (same arguments) whose files are written by :class:`AtomicDiskSaver`, and whose
    best key-metric record can be saved with the trainer's checkpoint (``state_dict``/``load_state_dict``), so
    that a resumed run replaces ``model.pt`` only with a better model and logs the best metric of the whole run.
    ``settings``: written to ``model_settings.json`` beside every key-metric checkpoint (``model.pt``).
    ``resumed_from``: the interval checkpoint this run resumed from (``checkpoint_epoch=N.pt``), or None. A new
    saver's list of files to replace starts empty, so without it the resumed file, and any older one a crash left
    beside it, would stay forever; with it they count against ``n_saved`` and go once a newer one is written.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        *,
        final_filename: str | None = None,
        key_metric_filename: str | None = None,
        settings: dict | None = None,
        resumed_from: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            save_dir, save_dict, final_filename=final_filename, key_metric_filename=key_metric_filename, **kwargs
        )
        # MONAI keeps its three ignite Checkpoints in these attributes (monai is pinned in requirements.txt)
        for checkpoint, filename in (
            (self._final_checkpoint, final_filename),
            (self._key_metric_checkpoint, key_metric_filename),
            (self._interval_checkpoint, None),
        ):
            if checkpoint is not None:
                key_metric = checkpoint is self._key_metric_checkpoint
                checkpoint.save_handler = AtomicDiskSaver(save_dir, filename, settings if key_metric else None)
        self._engine: Engine | None = None
        if resumed_from is not None and self._interval_checkpoint is not None:
            self._adopt(Path(resumed_from))

    def _adopt(self, resumed: Path) -> None:
        """Count ``resumed`` as the newest interval checkpoint saved so far; older ones of the same name pattern
        (``<prefix>=<epoch>.pt``) are removed with the next save, after the new file is complete."""
        prefix = resumed.name.rsplit("=", 1)[0]
        checkpoint = self._interval_checkpoint
        checkpoint._saved.append(Checkpoint.Item(checkpoint_number(resumed), resumed.name))
        for stale in resumed.parent.glob(f"{prefix}=*.pt"):
            if checkpoint_number(stale) < checkpoint_number(resumed):
                checkpoint.save_handler.remove(stale.name)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        self._engine = engine

    def state_dict(self) -> dict:
        """The key-metric files kept so far and the best metric of the engine this saver is attached to."""
        if self._key_metric_checkpoint is None:
            raise ValueError("AtomicCheckpointSaver has no state to save without save_key_metric=True")
        state = self._engine.state if self._engine is not None else None
        return {
            "key_metric": self._key_metric_checkpoint.state_dict(),
            "best_metric": getattr(state, "best_metric", -1),
            "best_metric_epoch": getattr(state, "best_metric_epoch", -1),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict["key_metric"])
        if self._engine is not None:  # ranks > 0 of a multi-GPU run validate without this saver
            self._engine.state.best_metric = state_dict["best_metric"]
            self._engine.state.best_metric_epoch = state_dict["best_metric_epoch"]


def checkpoint_number(path: Path) -> int:
    """The epoch (or iteration) in an interval checkpoint's name: 3 for ``checkpoint_epoch=3.pt``."""
    return int(re.findall(r"\d+", path.name)[-1])


# How torch's weights-only unpickler refuses a reference to a Python class or function (not a damaged file).
_CODE_REFERENCE = re.compile(r"GLOBAL (\S+)|unrecognized function|allowlisted")


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects that only Python code can rebuild, so loading it could run that code."""

    def __init__(self, path: str | Path, error: pickle.UnpicklingError) -> None:
        # both arguments go to the base class, so that pickle and copy rebuild the error as it was
        super().__init__(path, error)
        self.path, self.error = path, error

    def __str__(self) -> str:
        found = _CODE_REFERENCE.search(str(self.error))
        needs = f" (it refers to {found.group(1)})" if found and found.group(1) else ""
        return (
            f"{self.path} is refused: it holds Python objects that need code to load{needs}, and loading it could "
            "run that code. A checkpoint this bundle saves holds only tensors, numbers and strings; use one you "
            "trained yourself or from a source you trust, saved as a state dict."
        )


def _refuse_code(path: str | Path, error: pickle.UnpicklingError) -> None:
    if _CODE_REFERENCE.search(str(error)):
        raise UntrustedCheckpointError(path, error) from error


def load_weights(path: str | Path, map_location=None):
    """``torch.load(path, weights_only=True)``; a file that needs code to load raises UntrustedCheckpointError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        _refuse_code(path, error)
        raise


class WeightsOnlyCheckpointLoader(CheckpointLoader):
    """MONAI's CheckpointLoader (same arguments; it reads with ``torch.load(weights_only=True)``) whose refusal of
    a checkpoint that needs code to load names the file and says why (UntrustedCheckpointError), instead of
    torch's advice to load it without ``weights_only``."""

    def __call__(self, engine: Engine) -> None:
        try:
            super().__call__(engine)
        except pickle.UnpicklingError as error:  # only torch.load raises it here
            _refuse_code(self.load_path, error)
            raise
