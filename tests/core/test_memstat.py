"""Peak-RSS bookkeeping used by the healing report and the benchmark: a reset starts a new peak."""

from __future__ import annotations

import torch

from layerfold.core.memstat import peak_rss_mib, proc_status_bytes, reset_rss_peak


def test_peak_grows_with_an_allocation_and_resets_after_it_is_freed() -> None:
    assert reset_rss_peak(), "Linux /proc/self/clear_refs should be writable by the process itself"
    base = peak_rss_mib()
    assert base >= proc_status_bytes("VmRSS") / 2**20 - 1
    x = torch.ones(64 << 20, dtype=torch.float32)  # 256 MiB, every page written
    assert peak_rss_mib() >= base + 200
    del x  # a large block goes back to the OS
    reset_rss_peak()
    assert peak_rss_mib() < base + 100
