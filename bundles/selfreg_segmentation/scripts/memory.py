# Generated from bundles/template/scripts/memory.py by scripts/generate_bundles.py: edit those, not this file.
"""Free memory now: the host's (what the plan's cache and the sliding window's stitching may use) and a CUDA
device's. Both in bytes."""

from __future__ import annotations

import os

import torch


def free_memory(device: torch.device | str) -> int:
    """Free bytes on ``device``: CUDA's free memory, or the host's available memory (``MemAvailable``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_available_memory()


def host_available_memory() -> int:
    """The bytes the host can still give without swapping (``/proc/meminfo`` ``MemAvailable``; else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
