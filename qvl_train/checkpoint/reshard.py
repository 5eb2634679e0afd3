"""Checkpoints that any layout can resume from (world size, ep_size, node count): the trainable
state as pieces of FULL logical tensors, written by every rank in parallel, read back by every
rank into whatever partitions its new layout gives it.

What it holds, per trainable parameter, in our model's names and full shapes (routed experts as
[E, ...] whatever the ep; AutoEP's w1 / w3 / w2 mapped back to gate_up_proj / down_proj): the fp32
master weight ("param") and Adam's exp_avg and exp_avg_sq, plus Adam's step count. Frozen
weights are not saved: they are the base's (model.path, or the preset's seeded init), which the
resumed run loads as usual. Step, LR schedule, engine counters, every rank's loader state and the
layout go in train_state.json (rank 0); RNG per rank in rank_<r>.pt (state.py).

Files (in the step directory; manifest.json and COMPLETE as for every checkpoint, see state.py):
- shard_<r>.safetensors: rank r's pieces, 1-D fp32 tensors named "<kind>/<name>@<offset>": the
  elements [offset, offset + n) of the flattened logical tensor;
- reshard_index.json: every logical tensor's shape and which shard holds which element range.

Why ranges of the FLATTENED tensor, in our own safetensors layout, and not
torch.distributed.checkpoint (DCP): a ZeRO-3 partition is a flat element range of a parameter
(not a rectangular chunk), and an AutoEP expert partition is a flat range of w1 [El, I, D], which
lands in gate_up_proj [E, 2I, D] as one piece per expert. As 1-D pieces both are plain ranges;
DCP could take them as 1-D chunks too, but its file reader reads each saved chunk whole before
narrowing it, while our reader (model.safetensors_ranges, the one the model loader uses) reads
only the bytes a rank needs, and the files stay safetensors that export reads with no process
group and no pickle.

Only ZeRO-3 (every trainable parameter partitioned, `ds_id`) with torch's Adam/AdamW is handled;
state.py keeps DeepSpeed's own checkpoints for ZeRO 0-2 (checkpoint.format).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from qvl_train.model.safetensors_ranges import SafetensorsRanges, write_streamed

INDEX = "reshard_index.json"
TRAIN_STATE = "train_state.json"
KINDS = ("param", "exp_avg", "exp_avg_sq")
VERSION = 1

Segments = list[tuple[int, int, int]]  # (offset in the local partition's flat range, logical offset, length)


def shard_file(rank: int) -> str:
    return f"shard_{rank}.safetensors"


# ---- which logical range each local partition element is --------------------------------------


@dataclass
class Target:
    """One trainable ZeRO-3 parameter of this rank and where its partition lies in the logical tensor."""

    name: str  # logical name (our model's)
    shape: tuple[int, ...]  # logical shape
    param: torch.Tensor
    to_logical: Callable[[int, int], Segments]  # (first flat element of the partition, count) -> segments


def _identity(start: int, count: int) -> Segments:
    return [(0, start, count)] if count else []


def _expert_rows(*, e0: int, rows: int, cols: int, total_rows: int, row0: int) -> Callable[[int, int], Segments]:
    """A local [El, rows, cols] expert tensor that is rows row0:row0+rows of experts e0.. of a
    logical [E, total_rows, cols] one: flat ranges split where an expert ends."""
    per_expert = rows * cols

    def segments(start: int, count: int) -> Segments:
        out: Segments = []
        k, end = start, start + count
        while k < end:
            e, rem = divmod(k, per_expert)
            n = min(end, (e + 1) * per_expert) - k
            logical = ((e0 + e) * total_rows + row0) * cols + rem
            if out and out[-1][1] + out[-1][2] == logical:  # contiguous in the logical tensor: merge
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
            else:
                out.append((k - start, logical, n))
            k += n
        return out

    return segments


def targets(model: torch.nn.Module) -> list[Target]:
    """Every trainable parameter of a ZeRO-3 model, AutoEP layers mapped back to our names."""
    from qvl_train.parallel.expert_parallel import is_autoep_layer

    out: list[Target] = []
    autoep = {n: m for n, m in model.named_modules() if is_autoep_layer(m)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not hasattr(p, "ds_id"):
            raise ValueError(f"{name} is trainable but not a ZeRO-3 parameter: the resharding checkpoint needs "
                             "parallel.zero_stage=3 (or set checkpoint.format=deepspeed).")
        prefix = next((n for n in autoep if name.startswith(n + ".")), None)
        if prefix is None:
            out.append(Target(name, tuple(p.ds_shape), p, _identity))
            continue
        layer, local = autoep[prefix], name[len(prefix) + 1:]
        if local == "router.gate.weight":
            out.append(Target(f"{prefix}.gate.weight", tuple(p.ds_shape), p, _identity))
            continue
        el, rows, cols = p.ds_shape
        num_experts, e0 = el * layer.ep_size, layer.ep_rank * el
        if local in ("experts.w1", "experts.w3"):  # gate rows then up rows of gate_up_proj [E, 2I, D]
            seg = _expert_rows(e0=e0, rows=rows, cols=cols, total_rows=2 * rows, row0=0 if local.endswith("w1") else rows)
            out.append(Target(f"{prefix}.experts.gate_up_proj", (num_experts, 2 * rows, cols), p, seg))
        elif local == "experts.w2":
            seg = _expert_rows(e0=e0, rows=rows, cols=cols, total_rows=rows, row0=0)
            out.append(Target(f"{prefix}.experts.down_proj", (num_experts, rows, cols), p, seg))
        else:
            raise NotImplementedError(f"AutoEP parameter {name}: no logical name for it (shared experts, gate bias?).")
    return out


def partition(p: torch.Tensor) -> tuple[int, int]:
    """(first flat element, count) of this rank's ZeRO-3 partition of p (the last one is padded)."""
    size = p.ds_tensor.ds_numel
    start = dist.get_rank(group=p.ds_process_group) * size
    return start, max(0, min(size, p.ds_numel - start))


def local_state(optimizer, p: torch.Tensor, kind: str) -> torch.Tensor:
    """The live fp32 tensor of this rank's partition (a view into DeepSpeed's flat sub-group
    buffers: writes go straight into the optimizer), real elements only. DeepSpeed's public
    safe_get_local_* return `.to(accelerator)` of it, a copy when the optimizer is offloaded to
    the host, into which a load would write in vain: hence the method behind them."""
    view = optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False,
                                                    optim_state_key=None if kind == "param" else kind)[0]
    return view[:partition(p)[1]]


# ---- writing -------------------------------------------------------------------------------------


def _pieces(optimizer, tgts: list[Target], kinds: tuple[str, ...]) -> Iterator[tuple[str, str, int, torch.Tensor]]:
    for t in tgts:
        start, count = partition(t.param)
        for kind in kinds:
            values = local_state(optimizer, t.param, kind)
            for local, logical, n in t.to_logical(start, count):
                yield kind, t.name, logical, values[local:local + n]


def adam_step(optimizer) -> int | None:
    """Adam's step count (the same in every sub-group: every sub-group steps together); None before
    the first step (no moments yet)."""
    inner = optimizer.optimizer
    steps = {float(inner.state[g]["step"]) for g in optimizer.fp32_partitioned_groups_flat if g in inner.state}
    if not steps:
        return None
    if len(steps) != 1 or len([g for g in optimizer.fp32_partitioned_groups_flat if g in inner.state]) != len(
            optimizer.fp32_partitioned_groups_flat):
        raise RuntimeError(f"Adam sub-groups disagree on the step count ({sorted(steps)}); cannot checkpoint them as one.")
    return int(steps.pop())


def planned_bytes(engine) -> int:
    """The bytes this rank's shard file will take (data only): checked against free space."""
    step = adam_step(engine.optimizer)
    kinds = KINDS if step is not None else KINDS[:1]
    return sum(partition(t.param)[1] * 4 * len(kinds) for t in targets(engine.module))


def save(engine, ckpt_dir: Path, *, rank: int, train_state: dict) -> None:
    """Collective. This rank writes its pieces; rank 0 writes the index (from everyone's piece
    lists, all_gather_object of small lists) and train_state.json."""
    optimizer = engine.optimizer
    tgts = targets(engine.module)
    step = adam_step(optimizer)
    kinds = KINDS if step is not None else KINDS[:1]
    pieces = list(_pieces(optimizer, tgts, kinds))  # views of the live state: nothing copied
    # streamed, 1-D fp32, fsynced: the rank's share is never copied whole
    write_streamed(ckpt_dir / shard_file(rank), [(f"{kind}/{name}@{logical}", torch.float32, [v.numel()])
                                                 for kind, name, logical, v in pieces],
                   (v for *_, v in pieces), fsync=True)
    mine = [(name, logical, v.numel()) for kind, name, logical, v in pieces if kind == "param"]
    shapes = {t.name: list(t.shape) for t in tgts}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, shapes))
    if rank != 0:
        return
    index = {"version": VERSION, "kinds": list(kinds), "adam_step": step, "tensors": {}}
    for r, (chunks, shp) in enumerate(gathered):
        for name, shape in shp.items():
            entry = index["tensors"].setdefault(name, {"shape": shape, "chunks": []})
            if entry["shape"] != shape:
                raise RuntimeError(f"{name}: ranks disagree on its logical shape ({entry['shape']} vs {shape}).")
        for name, logical, n in chunks:
            index["tensors"][name]["chunks"].append([logical, n, r])
    for name, entry in index["tensors"].items():
        entry["chunks"].sort()
        _check_coverage(name, entry)
    (ckpt_dir / INDEX).write_text(json.dumps(index))
    (ckpt_dir / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))


def _check_coverage(name: str, entry: dict) -> None:
    """Every element of the logical tensor in exactly one piece: a save that misses or duplicates
    a range is a bug, caught before the checkpoint is marked complete."""
    pos = 0
    for logical, n, r in entry["chunks"]:
        if logical != pos:
            raise RuntimeError(f"{name}: pieces leave a gap or overlap at element {pos} (next piece at {logical}, rank {r}).")
        pos += n
    if pos != math.prod(entry["shape"]):
        raise RuntimeError(f"{name}: pieces cover {pos} of {math.prod(entry['shape'])} elements.")


# ---- reading -------------------------------------------------------------------------------------


class Reader:
    """A resharding checkpoint directory: element ranges of any logical tensor, read from the
    shard files that hold them (only those bytes)."""

    def __init__(self, ckpt_dir: Path) -> None:
        self.dir = Path(ckpt_dir)
        self.index = json.loads((self.dir / INDEX).read_text())
        self.train_state = json.loads((self.dir / TRAIN_STATE).read_text())
        self._files: dict[int, SafetensorsRanges] = {}
        self._starts = {n: [c[0] for c in e["chunks"]] for n, e in self.index["tensors"].items()}

    @property
    def names(self) -> list[str]:
        return list(self.index["tensors"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.index["tensors"][name]["shape"])

    def _file(self, rank: int) -> SafetensorsRanges:
        if rank not in self._files:
            self._files[rank] = SafetensorsRanges(self.dir / shard_file(rank))
        return self._files[rank]

    def read_into(self, kind: str, name: str, logical: int, out: torch.Tensor) -> None:
        """out[:] = elements [logical, logical + out.numel()) of the flattened logical tensor (1-D
        `out`), read straight into out's memory: the live partition, with no temporary of its size
        (read_flat_into)."""
        chunks, base, end = self.index["tensors"][name]["chunks"], logical, logical + out.numel()
        i = max(0, bisect.bisect_right(self._starts[name], logical) - 1)
        while logical < end:
            c0, n, r = chunks[i]
            lo, hi = max(c0, logical), min(c0 + n, end)
            self._file(r).read_flat_into(f"{kind}/{name}@{c0}", lo - c0, out[lo - base:hi - base])
            logical, i = hi, i + 1

    def read(self, kind: str, name: str) -> torch.Tensor:
        """The whole logical tensor (export; tests)."""
        out = torch.empty(math.prod(self.shape(name)), dtype=torch.float32)
        self.read_into(kind, name, 0, out)
        return out.view(self.shape(name))


def load(engine, ckpt_dir: Path, *, layout: dict | None = None, reader: Reader | None = None) -> dict:
    """Read this rank's partitions of every trainable parameter's fp32 master and Adam moments
    straight from the shards, set the low-precision partitions and Adam's step from them, and
    return train_state. Every rank calls it (the persistent parameters' all-gather is collective).
    Raises ValueError naming both sides (`layout`: this run's) when the checkpoint's tensors are
    not this model's."""
    reader = reader or Reader(ckpt_dir)
    optimizer = engine.optimizer
    tgts = targets(engine.module)
    check_tensors(reader, tgts, ckpt_dir, current=layout or {})
    step = reader.index["adam_step"]
    if step is not None:
        _init_adam_state(optimizer, step)
    kinds = tuple(reader.index["kinds"])
    with torch.no_grad():
        for t in tgts:
            start, count = partition(t.param)
            for kind in kinds:
                dest = local_state(optimizer, t.param, kind)
                for local, logical, n in t.to_logical(start, count):
                    reader.read_into(kind, t.name, logical, dest[local:local + n])
        _refresh_low_precision(optimizer)
    return reader.train_state


def check_tensors(reader: Reader, tgts: list[Target], ckpt_dir: Path, *, current: dict) -> None:
    """The checkpoint's trainable tensors must be this model's, by name and logical shape."""
    saved = {n: reader.shape(n) for n in reader.names}
    wanted = {t.name: t.shape for t in tgts}
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    reshaped = sorted(n for n in set(wanted) & set(saved) if wanted[n] != saved[n])
    if missing or extra or reshaped:
        layout = reader.train_state.get("layout", {})
        peft = (f" It was trained with peft={layout['peft']} and this run has peft={current['peft']}: set "
                f"peft={layout['peft']}." if "peft" in layout and "peft" in current and layout["peft"] != current["peft"] else "")
        parts = [f"{len(missing)} trainable tensors of this run are not in it (e.g. {missing[:3]})" if missing else "",
                 f"it has {len(extra)} this run does not train (e.g. {extra[:3]})" if extra else "",
                 "shapes differ: " + ", ".join(f"{n} saved {saved[n]} now {wanted[n]}" for n in reshaped[:3]) if reshaped else ""]
        raise ValueError(
            f"checkpoint {ckpt_dir} does not match this run's trainable parameters: {'; '.join(p for p in parts if p)}.{peft} "
            f"It was saved by a run with {describe_layout(layout)}; this run has {describe_layout(current)}. Any world "
            "size and parallel.ep_size can resume "
            "it, but the model and what is trained (model config, peft.method, LoRA rank and targets, optim.freeze_*) "
            "must match the saving run; set them as it had them, or start a new run (checkpoint.resume=none).")


def describe_layout(layout: dict) -> str:
    keys = ("world_size", "num_nodes", "ep_size", "zero_stage", "peft")
    return ", ".join(f"{k}={layout[k]}" for k in keys if k in layout) or "an unknown layout"


def _init_adam_state(optimizer, step: int) -> None:
    """Adam creates its state on the first step; a resumed engine has not stepped yet, so create
    it here as torch.optim.Adam does (zeros, step as a float32 scalar), for the loads to fill
    (an engine that has its state already keeps its tensors: no second copy of the moments)."""
    inner = optimizer.optimizer
    if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
        raise ValueError(f"the resharding checkpoint handles torch Adam/AdamW, not {type(inner).__name__}.")
    for group in inner.param_groups:
        if group.get("amsgrad"):
            raise ValueError("the resharding checkpoint does not hold amsgrad's max_exp_avg_sq; set amsgrad off.")
    fused = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
    for flat in optimizer.fp32_partitioned_groups_flat:
        have = inner.state.get(flat, {})
        if all(k in have for k in ("step", "exp_avg", "exp_avg_sq")):  # an engine that has stepped: overwrite in place
            have["step"].fill_(float(step))
            continue
        inner.state[flat] = {
            "step": torch.tensor(float(step), dtype=torch.float32, device=flat.device if fused else "cpu"),
            "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format),
        }


def _refresh_low_precision(optimizer) -> None:
    """The model's (bf16) partitions from the fp32 masters, as DeepSpeed does after a step: the
    flat low-precision buffer backs every partition (ds_tensor), then ZeRO's persistent (small,
    kept whole) parameters are all-gathered."""
    for low, fp32 in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
        if low is None:
            raise ValueError("the resharding checkpoint does not handle parameters swapped to NVMe.")
        if fp32.numel():
            low.data.copy_(fp32.data)
    if optimizer.persistent_parameters:
        optimizer.persistent_parameters[0].all_gather(optimizer.persistent_parameters)
