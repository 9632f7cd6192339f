"""Process memory figures on Linux: current and peak resident set size, and a reset of the peak.

The peak (VmHWM) is process-wide; ``reset_rss_peak`` (writing 5 to /proc/self/clear_refs) starts a new
high-water mark, so a stage of a longer run (a healing stage, a benchmarked generation) can report its
own peak instead of the process's. Elsewhere the figures fall back to getrusage (peak only, no reset).
"""

from __future__ import annotations

import resource


def proc_status_bytes(key: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM, ...) in bytes; 0 where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_rss_peak() -> bool:
    """Start a new RSS high-water mark; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak RSS since the last reset (or process start), MiB."""
    hwm = proc_status_bytes("VmHWM")
    if hwm:
        return hwm / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


__all__ = ["peak_rss_mib", "proc_status_bytes", "reset_rss_peak"]
