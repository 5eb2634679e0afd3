"""torch._grouped_mm fallbacks (MoE experts' probe, LoRA experts' call): only a missing kernel
falls back, with one warning naming the fallback and its cost; any other error (out of memory
included) reaches the caller."""

import warnings

import pytest
import torch

from qvl_train.model import moe
from qvl_train.peft import experts as lora_experts

E, D, I = 4, 16, 8


@pytest.fixture
def fresh_caches(monkeypatch):
    monkeypatch.setattr(moe, "_GROUPED_MM_OK", {})
    monkeypatch.setattr(moe, "_WARNED", set())
    monkeypatch.setattr(lora_experts, "_GMM_OK", {})


def _raising(err):
    def grouped_mm(*args, **kwargs):
        raise err

    return grouped_mm


def _moe_operands():
    counts = torch.tensor([3, 0, 2, 1])
    return (torch.randn(int(counts.sum()), D), torch.rand(int(counts.sum())), torch.randn(E, 2 * I, D),
            torch.randn(E, D, I), counts)


def _lora_operands():
    counts = [3, 0, 2, 1]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    return torch.randn(sum(counts), D), torch.randn(E, I, D), offs, counts


_OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
_OTHER = RuntimeError("CUDA error: an illegal memory access was encountered")
_NO_KERNEL = RuntimeError("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double")


@pytest.mark.parametrize("err", [_OOM, _OTHER], ids=["oom", "cuda_fault"])
def test_real_errors_propagate_and_nothing_is_cached(fresh_caches, monkeypatch, err):
    monkeypatch.setattr(torch, "_grouped_mm", _raising(err))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(type(err), match=str(err)[:20]):
            moe.experts_swiglu(*_moe_operands())
        a, b, offs, counts = _lora_operands()
        with pytest.raises(type(err), match=str(err)[:20]):
            lora_experts._gmm("nt", a, b, offs, counts)
    assert moe._GROUPED_MM_OK == {} and lora_experts._GMM_OK == {}


def test_missing_kernel_falls_back_exactly_and_warns_once(fresh_caches, monkeypatch):
    x, w, w_gu, w_d, counts = _moe_operands()
    a, b, offs, lora_counts = _lora_operands()
    expected_moe = moe.experts_swiglu(x, w, w_gu, w_d, counts)  # the grouped kernel, on this machine
    expected_lora = lora_experts._gmm("nt", a, b, offs, lora_counts)
    monkeypatch.setattr(moe, "_GROUPED_MM_OK", {})
    monkeypatch.setattr(lora_experts, "_GMM_OK", {})
    monkeypatch.setattr(torch, "_grouped_mm", _raising(_NO_KERNEL))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(moe.experts_swiglu(x, w, w_gu, w_d, counts), expected_moe)
            torch.testing.assert_close(lora_experts._gmm("nt", a, b, offs, lora_counts), expected_lora)
    messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(messages) == 2, messages
    moe_msg, lora_msg = messages
    assert "padded batched matmul" in moe_msg and "host" in moe_msg and "Float32" in moe_msg
    assert "one matmul per expert" in lora_msg and "sync" in lora_msg


def test_only_kernel_errors_count_as_missing_kernels():
    assert moe.is_missing_kernel(_NO_KERNEL)
    assert moe.is_missing_kernel(RuntimeError("strides should be multiple of 16 bytes"))
    assert moe.is_missing_kernel(NotImplementedError("Could not run 'aten::_grouped_mm' with arguments"))
    assert not moe.is_missing_kernel(_OOM)
    assert not moe.is_missing_kernel(_OTHER)
    assert not moe.is_missing_kernel(ValueError("not supported"))
