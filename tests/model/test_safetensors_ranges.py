"""model.safetensors_ranges: element ranges read into a caller's tensor, values and memory.

read_flat_into must give read_flat's values for every destination (the file's dtype, another
dtype, a strided 1-D view) and add no buffer of the destination's size: straight into its memory
when the dtypes match (the resharding load's fp32 pieces into fp32 partitions), one bounded
chunk at a time when they differ (a bf16 checkpoint into fp32 partitions)."""

import pytest
import torch

from qvl_train.model.safetensors_ranges import SafetensorsRanges, write_streamed

from ..host_memory import added_peak_bytes

MiB = 2**20


def _file(tmp_path, tensors: dict[str, torch.Tensor]) -> SafetensorsRanges:
    path = tmp_path / "t.safetensors"
    write_streamed(path, [(n, t.dtype, list(t.shape)) for n, t in tensors.items()], tensors.values())
    return SafetensorsRanges(path)


def test_read_flat_into_gives_read_flats_values_for_any_destination(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 301, generator=g)
    b = torch.randn(5, 1000, generator=g).to(torch.bfloat16)
    f = _file(tmp_path, {"a": a, "b": b})
    for name, ref in (("a", a.reshape(-1)), ("b", b.reshape(-1))):
        for start, count in ((0, ref.numel()), (13, 777), (ref.numel() - 5, 5), (100, 0)):
            want = ref[start:start + count]
            assert torch.equal(f.read_flat(name, start, count), want)
            same = torch.full((count,), 7.0, dtype=ref.dtype)  # straight into the memory
            f.read_flat_into(name, start, same)
            assert torch.equal(same, want)
            wide = torch.full((count,), 7.0, dtype=torch.float64)  # converted, chunks of 64 elements
            f.read_flat_into(name, start, wide, chunk_bytes=64 * ref.element_size())
            assert torch.equal(wide, want.double())
            host = torch.full((count, 3), 7.0, dtype=ref.dtype)  # a strided 1-D view: column 1
            f.read_flat_into(name, start, host[:, 1], chunk_bytes=100)
            assert torch.equal(host[:, 1], want) and (host[:, 0] == 7).all() and (host[:, 2] == 7).all()
    with pytest.raises(ValueError, match="outside its"):
        f.read_flat_into("a", a.numel() - 3, torch.empty(4))
    with pytest.raises(ValueError, match="non-contiguous"):
        f.read_flat_into("a", 0, torch.empty(4, 4).t())
    path = tmp_path / "t.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # truncated in b
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsRanges(path).read_flat_into("b", 0, torch.empty(b.numel(), dtype=torch.bfloat16))


@pytest.mark.parametrize("on_disk", [torch.float32, torch.bfloat16], ids=["fp32_into_fp32", "bf16_into_fp32"])
def test_read_flat_into_adds_no_buffer_of_the_destinations_size(tmp_path, on_disk):
    """64 MiB fp32 destination: the read may add a bounded chunk (2 MiB here) when converting,
    never the tensor's size (before read_flat_into, a temporary of the range's size was read and
    then copied: +64 MiB, or +32 MiB of bf16)."""
    numel = 16 * MiB
    f = _file(tmp_path, {"w": torch.arange(numel, dtype=torch.float32).to(on_disk)})
    dest = torch.full((numel,), -1.0)  # touched: resident before the measurement
    added = added_peak_bytes(lambda: f.read_flat_into("w", 0, dest, chunk_bytes=2 * MiB))
    assert torch.equal(dest, torch.arange(numel, dtype=torch.float32).to(on_disk).float())
    assert added < 6 * MiB, f"reading {numel * 4 / MiB:.0f} MiB added {added / MiB:.1f} MiB"
