"""The resident memory a call adds on top of what is live (Linux: VmHWM, reset via clear_refs).

Exact and independent of other processes and of CPU load: the kernel's own high-water mark of
this process's resident set. Freed heap memory is handed back first (malloc_trim), so a buffer
the call allocates touches fresh pages and shows up, whatever glibc kept from earlier tests.
"""

from __future__ import annotations

import gc
from pathlib import Path

from qvl_train.parallel.zero3_load import release_host_memory


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def added_peak_bytes(fn) -> int:
    """Peak resident set during fn() minus the resident set just before it."""
    gc.collect()
    release_host_memory()
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from the current resident set
    fn()
    return _status_bytes("VmHWM") - before
