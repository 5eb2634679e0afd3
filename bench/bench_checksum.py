"""Cost of the checkpoint manifest's checksum: zlib.crc32 vs hashlib.blake2b, streamed in 8 MiB
chunks over the same file, against reading the file alone (the baseline in the same process).
The file is read once beforehand, so all three run from the page cache (the checkpoint was just
written, or is about to be loaded).

    python bench/bench_checksum.py [--mib 512]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import zlib
from pathlib import Path

from common import timed_interleaved

CHUNK = 8 << 20


def read_only(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass


def crc32(path: Path) -> None:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)


def blake2b(path: Path) -> None:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "blob.bin"
        with open(path, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        read_only(path)
        times = timed_interleaved({"read": lambda: read_only(path), "crc32": lambda: crc32(path),
                                   "blake2b": lambda: blake2b(path)}, warmup=1, iters=5)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in ("read", "crc32", "blake2b"):
        print(f"{name:8s} {med[name] * 1e3:8.1f} ms  {args.mib / med[name]:8.0f} MiB/s  "
              f"{med[name] / med['read']:5.2f}x the read alone")
    print(f"crc32 is {med['blake2b'] / med['crc32']:.2f}x faster than blake2b")


if __name__ == "__main__":
    main()
