"""Read element ranges of safetensors tensors with plain file reads; write a file tensor by tensor.

Written here rather than using safetensors' safe_open because safe_open memory-maps the whole
file: every page a rank touches then counts in its resident set until the file is closed (up to
a 4 GB shard per rank), while a read() lands in the page cache, which the kernel shares and
reclaims. A range is what a ZeRO-3 partition (a flat slice of the tensor) or an expert-parallel
slice (rows e0:e1 of dim 0) needs, so no rank reads more than it keeps.
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
        numel = self.numel(name)
        count = numel - start if count is None else count
        if not 0 <= start <= start + count <= numel:
            raise ValueError(f"{name}: range [{start}, {start + count}) outside its {numel} elements.")
        dtype = self.dtype(name)
        size = dtype.itemsize
        out = torch.empty(count * size, dtype=torch.uint8)
        offset = self._data_start + self._entries[name]["data_offsets"][0] + start * size
        with open(self.path, "rb", buffering=0) as f:
            f.seek(offset)
            view, done = memoryview(out.numpy()), 0
            while done < len(view):  # readinto may return less than asked (large reads, signals)
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"{self.path} ends inside tensor {name!r} (truncated file).")
                done += got
        return out.view(dtype)

    def read(self, name: str) -> torch.Tensor:
        return self.read_flat(name).view(self.shape(name))

    def read_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of dim 0 (contiguous in the file), e.g. one rank's experts."""
        shape = self.shape(name)
        row = math.prod(shape[1:])
        return self.read_flat(name, r0 * row, (r1 - r0) * row).view(r1 - r0, *shape[1:])
