"""What a run on several processes, on one node or on several, needs beyond torch.distributed: the GPU of this
process on its node, and a check that every node sees the folder that rank 0 writes to.

torchrun numbers the processes of a run twice: globally (``RANK``, 0 to nodes x processes per node - 1) and on their
node (``LOCAL_RANK``, 0 to processes per node - 1). A GPU index is a node's own, so a process's GPU is its
``LOCAL_RANK``, never its global rank, which exceeds the node's GPU count from the second node on (the model zoo's
multi-node fix, Project-MONAI/model-zoo#444). Only global rank 0 writes checkpoints, ``model.pt``,
``model_settings.json`` and the TensorBoard logs, while every rank reads the plan and resumes from the checkpoints:
every node must therefore see the same ``bundle_root`` (:func:`check_shared_folder`).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist


def local_rank() -> int:
    """This process's index on its node, which is its GPU's index: ``LOCAL_RANK``, which torchrun sets for every
    process it starts.

    Without ``LOCAL_RANK`` (a process started by srun, mpirun or a Kubernetes operator without torchrun) it is 0
    where at most one GPU is visible (one process per GPU, the scheduler choosing the GPU through
    ``CUDA_VISIBLE_DEVICES``). Raises RuntimeError where the GPU cannot be told (several visible and no
    ``LOCAL_RANK``) or does not exist (``LOCAL_RANK`` beyond the visible GPUs).
    """
    visible = torch.cuda.device_count()
    value = os.environ.get("LOCAL_RANK")
    if value is None:
        if visible > 1:
            raise RuntimeError(
                f"LOCAL_RANK is not set and {visible} GPUs are visible, so this process's GPU is unknown: launch "
                "with torchrun, which sets LOCAL_RANK for each process it starts, or set LOCAL_RANK yourself (under "
                "srun: LOCAL_RANK=$SLURM_LOCALID), or make one GPU visible to each process (CUDA_VISIBLE_DEVICES)"
            )
        return 0
    rank = int(value)
    if visible and not 0 <= rank < visible:
        raise RuntimeError(
            f"LOCAL_RANK is {rank} but this node has {visible} visible GPU(s) (0 to {visible - 1}): start at most "
            f"{visible} processes per node (torchrun --nproc_per_node {visible})"
        )
    return rank


def check_shared_folder(folder: str | os.PathLike, wait: float = 5.0) -> None:
    """Refuse a run whose ranks do not share ``folder`` (``ckpt_dir``): rank 0 creates a marker file with a random
    name in its ``folder``, and every rank must see it in its own ``folder`` within ``wait`` seconds. A collective:
    every rank calls it, after ``init_process_group``. Raises RuntimeError on every rank, naming the ranks and hosts
    that do not see the file."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    name = [f".shared-check-{secrets.token_hex(8)}"]
    dist.broadcast_object_list(name, src=0)
    marker = Path(folder, name[0])  # each rank looks in its own folder of that path
    if dist.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
        marker.touch()
    dist.barrier()
    deadline = time.monotonic() + wait
    while not marker.exists() and time.monotonic() < deadline:  # a network file system may show it a little late
        time.sleep(0.1)
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (marker.exists(), socket.gethostname()))
    if dist.get_rank() == 0:
        marker.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for rank, (found, host) in enumerate(seen) if not found]
    if blind:
        raise RuntimeError(
            f"{folder} is not one folder shared by every node: {', '.join(blind)} cannot see the file that rank 0 "
            f"({seen[0][1]}) wrote there. Only rank 0 writes checkpoints and model.pt, and every rank reads the "
            "plan and resumes from the checkpoints, so --bundle_root must be on a file system that every node "
            "mounts at the same path (NFS, Lustre, a Kubernetes ReadWriteMany volume)."
        )
