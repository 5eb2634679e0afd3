"""Read element ranges of safetensors tensors with plain file reads; write a file tensor by tensor.

Written here rather than using safetensors' safe_open because safe_open memory-maps the whole
file: every page a rank touches then counts in its resident set until the file is closed (up to
a 4 GB shard per rank), while a read() lands in the page cache, which the kernel shares and
reclaims. A range is what a ZeRO-3 partition (a flat slice of the tensor) or an expert-parallel
slice (rows e0:e1 of dim 0) needs, so no rank reads more than it keeps; read_flat_into reads it
into the destination's own memory (the live partition), so no buffer of its size comes and goes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable

import torch

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


_CODES = {dtype: code for code, dtype in _DTYPES.items()}

CHUNK_BYTES = 16 * 2**20  # the read buffer where bytes cannot land in the destination as they are


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor as writable bytes (any dtype: bf16 has no numpy type)."""
    dense = t.detach().as_strided((t.numel(),), (1,))  # (a 1-element "contiguous" view may keep any stride)
    return memoryview(dense.view(torch.uint8).numpy())


def write_streamed(path: str | os.PathLike, entries: list[tuple[str, torch.dtype, list[int]]],
                   tensors: Iterable[torch.Tensor], *, metadata: dict[str, str] | None = None,
                   fsync: bool = False) -> int:
    """A safetensors file written one tensor at a time: `entries` (name, dtype, shape) in file
    order, `tensors` yields each one's values in that order (made or fetched as it is written).
    Written here because safetensors' save_file builds the whole file in memory first, a second
    copy of everything written. Returns the file's size in bytes."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, dtype, shape), t in zip(entries, tensors, strict=True):
            t = t.detach().to("cpu", dtype).contiguous()
            assert list(t.shape) == list(shape), (name, t.shape, shape)
            f.write(memoryview(t.view(torch.uint8).numpy()))
            del t
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return 8 + len(blob) + offset


class SafetensorsRanges:
    """One .safetensors file: keys in file order, shapes, dtypes, and reads of element ranges."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        # file order (by offset) is the order every rank walks, so collective steps line up
        self._entries = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))
        for name, e in self._entries.items():
            if e["dtype"] not in _DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}.")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._entries[name]["dtype"]]

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def read_flat(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start + count) of the flattened tensor, as a new 1-D tensor."""
        count = self.numel(name) - start if count is None else count
        self._check_range(name, start, count)
        out = torch.empty(count, dtype=self.dtype(name))
        self.read_flat_into(name, start, out)
        return out

    def read_flat_into(self, name: str, start: int, out: torch.Tensor, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        """out[:] = elements [start, start + out.numel()) of the flattened tensor, with no buffer
        of out's size: the file's bytes go straight into out's memory when out is a contiguous CPU
        tensor of the file's dtype, else through one buffer of at most `chunk_bytes`, converted
        and copied chunk by chunk (another dtype, a strided view, a GPU tensor)."""
        count, dtype = out.numel(), self.dtype(name)
        self._check_range(name, start, count)
        offset = self._data_start + self._entries[name]["data_offsets"][0] + start * dtype.itemsize
        with open(self.path, "rb", buffering=0) as f:
            if out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous():
                self._readinto(f, offset, _bytes_of(out), name)
                return
            if not (out.is_contiguous() or out.dim() == 1):
                raise ValueError(f"{name}: reading into a non-contiguous {out.dim()}-D tensor is not supported; "
                                 "pass a contiguous tensor or a 1-D view.")
            flat = out.view(-1) if out.is_contiguous() else out  # 1-D strided: slices index it directly
            step = max(1, chunk_bytes // dtype.itemsize)
            buf = torch.empty(min(step, count), dtype=dtype)
            for k in range(0, count, step):
                n = min(step, count - k)
                self._readinto(f, offset + k * dtype.itemsize, _bytes_of(buf[:n]), name)
                flat[k:k + n].copy_(buf[:n])  # converts the dtype / crosses to the device

    def _check_range(self, name: str, start: int, count: int) -> None:
        if not 0 <= start <= start + count <= self.numel(name):
            raise ValueError(f"{name}: range [{start}, {start + count}) outside its {self.numel(name)} elements.")

    def _readinto(self, f, offset: int, view: memoryview, name: str) -> None:
        f.seek(offset)
        done = 0
        while done < len(view):  # readinto may return less than asked (large reads, signals)
            got = f.readinto(view[done:])
            if not got:
                raise ValueError(f"{self.path} ends inside tensor {name!r} (truncated file).")
            done += got

    def read(self, name: str) -> torch.Tensor:
        return self.read_flat(name).view(self.shape(name))

    def read_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of dim 0 (contiguous in the file), e.g. one rank's experts."""
        shape = self.shape(name)
        row = math.prod(shape[1:])
        return self.read_flat(name, r0 * row, (r1 - r0) * row).view(r1 - r0, *shape[1:])
