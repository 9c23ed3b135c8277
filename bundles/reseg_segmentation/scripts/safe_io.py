# Generated from bundles/template/scripts/safe_io.py by scripts/generate_bundles.py: edit those, not this file.
"""Writing files so that no reader ever sees a partial one, and saving predictions that never replace a file by
accident.

A file is written under a hidden temporary name in its own folder, flushed to disk and renamed onto its final name
(``os.replace`` is atomic on one file system): a crash, a kill or an error mid-write leaves the earlier file, or no
file, never a truncated one.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SaveImage, SaveImaged
from monai.utils import MetaKeys, PostFix

# MONAI's metadata key postfix ("meta_dict"), as SaveImaged's default.
DEFAULT_POST_FIX = PostFix.meta()

logger = logging.getLogger(__name__)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes only writable handles
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; when the block ends without error the file is flushed to
    disk and renamed to ``path``, otherwise it is removed and ``path`` is left as it was.

    ``suffix`` ends the temporary name too, for writers that choose the format by the extension (``.nii.gz``).
    """
    target = Path(path)
    stem = target.name[: -len(suffix)] if suffix and target.name.endswith(suffix) else target.name
    partial = target.with_name(f".{stem}.partial-{secrets.token_hex(4)}{suffix}")
    try:
        yield partial
        _fsync(partial)  # the data reaches the disk before the new name does, so a power cut cannot empty the file
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        _fsync(target.parent)


class AtomicSaveImage(SaveImage):
    """MONAI's SaveImage that writes each file through :func:`replacing` and refuses to replace an existing file
    unless ``overwrite`` is True. Takes SaveImage's arguments."""

    def __init__(self, *args, overwrite: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.overwrite = overwrite
        # the writer would log the temporary name: log the final one instead
        self.print_log = bool(self.write_kwargs.get("verbose"))
        self.write_kwargs["verbose"] = False

    def __call__(
        self, img: torch.Tensor | np.ndarray, meta_data: dict | None = None, filename: str | os.PathLike | None = None
    ):
        meta_data = img.meta if isinstance(img, MetaTensor) else meta_data
        if filename is not None:
            target = Path(f"{filename}{self.output_ext}")
        else:
            target = Path(self.folder_layout.filename(**self.fname_formatter(meta_data, self)))
        if target.exists() and not self.overwrite:
            raise FileExistsError(
                f"{target} exists and is not overwritten: choose another --output_dir, remove the file, or pass "
                "--overwrite True to replace it"
            )
        with replacing(target, suffix=self.output_ext) as partial:
            stem = str(partial)[: -len(self.output_ext)] if self.output_ext else str(partial)
            super().__call__(img, meta_data, filename=stem)  # SaveImage appends output_ext
        if self.savepath_in_metadict and meta_data is not None:
            meta_data[MetaKeys.SAVED_TO] = str(target)
        if self.print_log:
            logger.info(f"writing: {target}")
        return img


class AtomicSaveImaged(SaveImaged):
    """MONAI's SaveImaged with :class:`AtomicSaveImage` as its saver: each output is written under a temporary
    name and renamed when complete, and an existing output is refused unless ``overwrite`` is True.

    MONAI Label drops SaveImaged (and so this subclass) from a bundle's post-transforms, as before.
    """

    def __init__(
        self,
        keys: Hashable | list[Hashable],
        meta_keys: Hashable | list[Hashable] | None = None,
        meta_key_postfix: str = DEFAULT_POST_FIX,
        allow_missing_keys: bool = False,
        overwrite: bool = False,
        **save_image_args,
    ) -> None:
        super().__init__(keys, meta_keys, meta_key_postfix, allow_missing_keys=allow_missing_keys, **save_image_args)
        self.saver = AtomicSaveImage(overwrite=overwrite, **save_image_args)
