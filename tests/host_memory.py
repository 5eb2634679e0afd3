"""The resident memory a call adds on top of what is live (Linux: VmHWM, reset via clear_refs).

Exact and independent of other processes and of CPU load: the kernel's own high-water mark of
this process's resident set. Freed heap memory is handed back first (malloc_trim), so a buffer
the call allocates touches fresh pages and shows up, whatever glibc kept from earlier tests.
The /proc readers are bench/common.py's, which the bench scripts measure with.
"""

from __future__ import annotations

import gc

from bench.common import peak_rss_bytes, proc_status_kib, reset_peak_rss
from qvl_train.parallel.zero3_load import release_host_memory


def added_peak_bytes(fn) -> int:
    """Peak resident set during fn() minus the resident set just before it."""
    gc.collect()
    release_host_memory()
    before = proc_status_kib("VmRSS")["VmRSS"] * 1024
    reset_peak_rss()  # VmHWM starts again from the current resident set
    fn()
    return peak_rss_bytes() - before
