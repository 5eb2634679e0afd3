"""Checkpoint integrity: manifest.json lists every file of a checkpoint with its size and CRC-32,
written before the COMPLETE marker and verified before a resume.

CRC-32 (zlib, streamed) rather than a cryptographic hash: it catches truncation and overwritten
bytes, which is what disks and killed writers produce, and it is the fastest checksum in the
standard library (bench/bench_checksum.py; docs/benchmarks.md). The files are split over
the ranks (largest first, round robin), so each rank reads about 1/world of the checkpoint, on
write and on verify, and the results are gathered.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch.distributed as dist

MANIFEST = "manifest.json"
CHUNK = 8 << 20


def crc32_file(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _my_share(names_sizes: list[tuple[str, int]]) -> list[str]:
    rank, world = _world()
    ordered = sorted(names_sizes, key=lambda x: (-x[1], x[0]))
    return [name for name, _ in ordered[rank::world]]


def write(ckpt_dir: Path, *, exclude: tuple[str, ...]) -> dict | None:
    """Collective: every rank checksums its share; rank 0 writes the manifest (and returns it)."""
    files = sorted(p for p in ckpt_dir.iterdir() if p.is_file() and p.name not in (*exclude, MANIFEST))
    sizes = {p.name: p.stat().st_size for p in files}
    mine = {name: {"bytes": sizes[name], "crc32": crc32_file(ckpt_dir / name)} for name in _my_share(list(sizes.items()))}
    merged = {k: v for part in _gather(mine) for k, v in part.items()}
    if _world()[0] != 0:
        return None
    manifest = {"version": 1, "files": dict(sorted(merged.items()))}
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(ckpt_dir / MANIFEST)
    return manifest


def problems(ckpt_dir: Path) -> list[str]:
    """What is wrong with the checkpoint's files (empty: intact). Collective when a process group
    exists, so every rank gets the same answer; each rank reads its share of the files."""
    path = ckpt_dir / MANIFEST
    try:
        files = json.loads(path.read_text())["files"]
    except FileNotFoundError:
        return []  # written before manifests existed: COMPLETE is all there is to check
    except (OSError, ValueError, KeyError) as e:
        return [f"{path}: unreadable manifest ({e})"]
    found = []
    for name in _my_share([(n, e["bytes"]) for n, e in files.items()]):
        f, entry = ckpt_dir / name, files[name]
        if not f.is_file():
            found.append(f"{f}: missing")
        elif (size := f.stat().st_size) != entry["bytes"]:
            found.append(f"{f}: {size} bytes, the manifest says {entry['bytes']} (truncated or partly written)")
        elif (crc := crc32_file(f)) != entry["crc32"]:
            found.append(f"{f}: checksum {crc} != {entry['crc32']} in the manifest (the bytes changed after the save)")
    return sorted(p for part in _gather(found) for p in part)
