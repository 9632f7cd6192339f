"""The compute device a user asked for, checked before any work: one this torch build and machine have."""

from __future__ import annotations

import torch


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device; a ValueError naming the cause and the fix when layerfold cannot run there
    (not a device, not cpu/cuda, a torch without CUDA, no visible GPU, an index past the count)."""
    text = str(device)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{text!r} is not a device. Fix: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"{text!r}: layerfold runs on cpu and cuda devices. Fix: use cpu or cuda")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"{text!r}: {why} (torch {torch.__version__}). Fix: use the cpu device (--device cpu), "
                         "or run where a GPU and a CUDA build of torch are installed")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise ValueError(f"{text!r}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}. Fix: pick one of "
                         "those")
    return dev


__all__ = ["check_device"]
