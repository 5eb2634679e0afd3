"""Where bench/bench_sp_memory.py's peak is: the same run (same arguments, sp=1 then sp=2), each
rank printing, per step, the heap growth (glibc mallinfo2 after every aten op) at the end of the
forward (what autograd saved), the backward's peak and the op it came at, and the level when the
peak's experts backward started (the last aten.split before the peak: the experts' backward
begins by splitting the gate/up projection). What docs/benchmarks.md ("Sequence parallelism:
memory per rank") quotes for the plan's "backward transient of one layer" line.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/sp_memory_phases.py --tokens 4096 --vision-layers 2
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.bench_sp_memory as sp_memory  # noqa: E402
from bench.common import heap_used_bytes as _used  # noqa: E402


def step_phases_mib(model, inputs: dict, normaliser: float, device: torch.device) -> float:
    """bench_sp_memory.step_peak_mib (CPU) with the forward and backward apart; prints them."""
    trace: list[tuple[bool, str, int]] = []  # (in backward, op, heap in use after it)
    backward = [False]

    class _Sampler(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            trace.append((backward[0], str(func), _used()))
            return out

    model.zero_grad(set_to_none=True)
    base = _used()
    with _Sampler():
        out = model(**inputs, loss_normalizer=normaliser, return_logits=False)
        after_forward = _used()
        backward[0] = True
        out.loss.backward()
    mib = lambda u: (u - base) / 2**20  # noqa: E731
    peak = max(range(len(trace)), key=lambda i: trace[i][2])
    bwd_peak = max((i for i in range(len(trace)) if trace[i][0]), key=lambda i: trace[i][2])
    splits = [i for i in range(bwd_peak) if trace[i][0] and trace[i][1] == "aten.split.Tensor"]
    start = f"{mib(trace[splits[-1]][2]):.0f}" if splits else "-"
    print(f"rank {torch.distributed.get_rank()}, {inputs['input_ids'].shape[1]} tokens: after forward "
          f"{mib(after_forward):.0f} MiB, backward peak {mib(trace[bwd_peak][2]):.0f} MiB at {trace[bwd_peak][1]}, "
          f"level when its experts' backward started {start} MiB, step peak {mib(trace[peak][2]):.0f} MiB", flush=True)
    return mib(trace[peak][2])


if __name__ == "__main__":
    if torch.cuda.is_available():
        raise SystemExit("CPU only (glibc heap); on CUDA run bench/bench_sp_memory.py.")
    sp_memory.step_peak_mib = step_phases_mib
    sp_memory.main()
