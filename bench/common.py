"""Shared measuring helpers for the bench/ scripts (ratios in one process, never absolute claims)."""

from __future__ import annotations

import functools
import os
import resource
import time
from pathlib import Path

import torch


def timed_interleaved(fns: dict, *, warmup: int, iters: int, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call for each candidate; they take turns, so machine noise hits them alike.
    clock=time.process_time counts this process's CPU time only (not the time other jobs take)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(clock() - t0)
    return times


def saved_mb(fn, model) -> float:
    """Bytes autograd keeps for backward, not counting tensors that are model parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.device.type != "meta" and t.untyped_storage().data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved) / 2**20


def cuda_peak_mb(fn) -> float:
    """Peak CUDA allocation (MiB) of fn() above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@functools.cache
def _mallinfo2():
    import ctypes

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2


def heap_used_bytes() -> int:
    """Bytes glibc's malloc has handed out and not freed (mallinfo2: arenas + mmapped; Linux)."""
    m = _mallinfo2()()
    return m.uordblks + m.hblkhd


def peak_mb(fn) -> float:
    """Peak heap growth (MiB) of fn() over what was allocated before it: glibc's mallinfo2 is
    sampled after every aten op (CPU; Linux). Counts everything the call allocates, parameters'
    gradients and temporaries included, not only what autograd saves."""
    from torch.utils._python_dispatch import TorchDispatchMode

    used = heap_used_bytes

    class _Sampler(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            _Sampler.peak = max(_Sampler.peak, used())
            return out

    base = used()
    _Sampler.peak = base
    with _Sampler():
        fn()
    return (_Sampler.peak - base) / 2**20


# ---- host memory of this process (Linux /proc) ----------------------------------------------


def rss_bytes() -> int:
    """Resident set now (statm: cheap enough for a sampling thread)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def proc_status_kib(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB, e.g. VmRSS, VmHWM (the peak resident set), RssAnon."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            out[key] = int(rest.split()[0])
    return out


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current resident set (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """VmHWM since the last reset_peak_rss(); ru_maxrss (never reset) where /proc has no VmHWM."""
    kib = proc_status_kib("VmHWM").get("VmHWM")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mapped_file_kib(path: str | os.PathLike) -> dict[str, int]:
    """This process's mappings of one file, summed over /proc/self/smaps (KiB): Rss (pages of the
    file it has resident), Pss (Rss divided among the processes sharing each page: half of Rss when
    two processes map the same pages), Private_Dirty (pages it wrote: copy-on-write copies, not
    shared). Zeros when it does not map the file."""
    target = os.path.realpath(path)
    out = {"Rss": 0, "Pss": 0, "Private_Dirty": 0}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
            inside = len(head) >= 6 and head[5] == target
        elif inside and head and head[0].rstrip(":") in out:
            out[head[0].rstrip(":")] += int(head[1])
    return out
