"""The compute device a user asked for, checked before any work: one this torch build and machine have."""

from __future__ import annotations

import os

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


def memory_total(device: torch.device) -> int:
    """Bytes of memory on ``device`` (the GPU's, or the host's physical memory); 0 where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def kv_cache_bytes(spec, batch: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of a static KV cache of ``batch`` rows x ``max_len`` slots (K and V of every attention layer, each
    sized by its own KV heads): what the Runtime, the StreamedRuntime and bench allocate."""
    size = torch.empty((), dtype=dtype).element_size()
    return batch * max_len * sum(2 * l.n_kv_heads * l.head_dim for l in spec.layers if l.has_attn) * size


def check_kv_fits(spec, batch: int, max_len: int, dtype: torch.dtype, device: torch.device, fix: str) -> None:
    """A ValueError naming ``fix`` when that cache alone is larger than the device's memory (it could only end in
    an out-of-memory crash after the model is loaded)."""
    kv, total = kv_cache_bytes(spec, batch, max_len, dtype), memory_total(device)
    if total and kv > total:
        raise ValueError(f"{batch} rows x {max_len} tokens need a {kv / 2**30:.1f} GiB KV cache, more than the "
                         f"{total / 2**30:.1f} GiB of memory of {device}. Fix: {fix}")


__all__ = ["check_device", "check_kv_fits", "kv_cache_bytes", "memory_total"]
