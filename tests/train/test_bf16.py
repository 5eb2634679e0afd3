"""bf16 training numerics: the DeepSpeed config reduces and accumulates gradients in fp32, the
rope frequencies stay fp32 after deepspeed.initialize, and the optimizer is torch's (fused on
GPU: no JIT build on the first step)."""

import pytest
import torch

from qvl_train.config import compose, to_config
from qvl_train.model import build_model
from qvl_train.parallel.deepspeed_config import deepspeed_config
from qvl_train.train.optim import param_groups

from ..model.reference import rank_batch, tiny_config


def _cfg(*overrides):
    return to_config(compose(["+recipe=vqa", *overrides]))


def test_bf16_config_sums_gradients_in_fp32_and_uses_torch_adamw():
    ds = deepspeed_config(_cfg(), dtype=torch.bfloat16, on_gpu=True)
    assert ds["bf16"] == {"enabled": True}
    assert ds["communication_data_type"] == "fp32" and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["optimizer"]["params"]["torch_adam"] and ds["optimizer"]["params"]["fused"]
    fp32 = deepspeed_config(_cfg(), dtype=torch.float32, on_gpu=False)
    assert "data_types" not in fp32 and not fp32["optimizer"]["params"]["fused"]
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(_cfg("parallel.zero_stage=0"), dtype=torch.bfloat16, on_gpu=False)


def test_bf16_engine_keeps_rope_fp32_and_accumulates_fp32_grads(runtime):
    import deepspeed

    cfg = _cfg("optim.grad_accum=2")
    model = build_model(tiny_config(), dtype=torch.bfloat16, seed=0)
    model.run_vision_always = True
    assert model.model.language_model.inv_freq.dtype == torch.float32  # already after model.to(bf16)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim),
        config=deepspeed_config(cfg, dtype=torch.bfloat16, on_gpu=False))
    text = engine.module.model.language_model
    assert text.inv_freq.dtype == torch.float32
    assert engine.module.lm_head.weight.dtype == torch.bfloat16
    assert engine.communication_data_type == torch.float32
    assert optimizer.gradient_accumulation_dtype == torch.float32
    assert isinstance(optimizer.optimizer, torch.optim.AdamW)
    for micro in range(2):  # two micro-batches accumulate, then one optimizer step
        out = engine(**rank_batch(tiny_config(), micro, 1), loss_normalizer=10.0, return_logits=False)
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        engine.backward(out.loss)
        engine.step()
    assert optimizer.grad_partitions_flat_buffer.dtype == torch.float32
    assert engine.global_steps == 1 and torch.isfinite(torch.tensor(float(engine.get_global_grad_norm())))
