"""Where a calibration keeps its buffers: the hidden states, the window ring and the CKA store.

On a GPU each goes to device memory while the buffers fit ``device_budget`` (default: the larger of
``DEFAULT_DEVICE_BUDGET`` and ``DEVICE_SHARE`` of the GPU's memory, never more than half of what is free;
GPU run 3 on an H200: 64 x 2048 tokens of the 7B shape put its 8.6 GB ring in pinned memory under the
old fixed 4 GiB while 130 GB were free), in the order of how often a byte of it is read per layer: the CKA store
(every stored Gram at every CKA point), the hidden states (read and written at every layer), then the
ring (W slots read at every layer). What does not fit goes to pinned host memory (asynchronous copies),
or, where the host has too little memory free (or ``offload="disk"``), to a disk memmap. On a CPU they
live in host memory (or on disk with ``offload="disk"``). The choice is reported in
``stats.meta["buffers"]`` and the bytes in ``stats.meta["buffer_bytes"]``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEFAULT_DEVICE_BUDGET = 4 << 30  # bytes of device memory the statistics' buffers may take on any GPU
DEVICE_SHARE = 0.15  # ... or this share of a larger GPU's memory (at most half of what is free)
ORDER = ("cka", "hidden", "ring")
HOST_SHARE = 0.7  # at most this share of the host's available memory goes to host buffers before disk


def host_available() -> int:
    """MemAvailable from /proc/meminfo (bytes); a large number where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def default_device_budget(device: torch.device) -> int:
    """Bytes of device memory the buffers may take when the caller names no budget (module docstring)."""
    if device.type != "cuda":
        return DEFAULT_DEVICE_BUDGET
    free, total = torch.cuda.mem_get_info(device)
    return max(DEFAULT_DEVICE_BUDGET, min(int(DEVICE_SHARE * total), free // 2))


def place(sizes: dict[str, int], device: torch.device, offload: str, budget: int | None) -> dict[str, str]:
    """name -> "device" | "pinned" | "host" | "disk" for each buffer (see the module docstring)."""
    out: dict[str, str] = {}
    left = default_device_budget(device) if budget is None else budget
    host_left = int(host_available() * HOST_SHARE)
    for name in ORDER:
        if name not in sizes:
            continue
        size = sizes[name]
        if device.type == "cuda" and size <= left:
            out[name], left = "device", left - size
        elif offload == "disk" or size > host_left:
            out[name] = "disk"
        else:
            out[name], host_left = ("pinned" if device.type == "cuda" else "host"), host_left - size
    return out


def allocate(shape: tuple[int, ...], dtype: torch.dtype, where: str, device: torch.device, tmp: Path | None,
             name: str, zero: bool = False) -> Tensor:
    """A buffer where ``place`` put it. Uninitialised unless ``zero``: the hidden states and CKA store are
    written before they are read; the ring is read whole (unused slots ignored), so garbage there could
    hold inf/nan. Pinned memory that cannot be had falls back to ordinary host memory."""
    make = torch.zeros if zero else torch.empty
    if where == "device":
        return make(shape, dtype=dtype, device=device)
    if where == "disk":
        assert tmp is not None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        arr = np.memmap(tmp / f"{name}.bin", dtype=np.uint8, mode="w+", shape=(max(nbytes, 1),))
        return torch.from_numpy(arr)[:nbytes].view(dtype).view(shape)
    if where == "pinned":
        try:
            return make(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:
            pass
    return make(shape, dtype=dtype)


__all__ = ["DEFAULT_DEVICE_BUDGET", "DEVICE_SHARE", "allocate", "default_device_budget", "host_available", "place"]
