"""The DeepSpeed config dict for a run (ZeRO stage, offload, precision, accumulation, clipping).

bf16 runs keep bf16 weights and activations but fp32 gradients where they are summed: the
reduce-scatter / all-reduce over ranks (`communication_data_type`) and the accumulation over
micro-batches (`data_types.grad_accum_dtype`; DeepSpeed 0.19.8 honours it in ZeRO 1-3, and
raises NotImplementedError for it without ZeRO, hence ZeRO >= 1 for bf16). The optimizer is
torch's AdamW, `fused=True` on GPU: a prebuilt kernel, where DeepSpeed's FusedAdam is compiled
with nvcc on the first step."""

from __future__ import annotations

import torch

from qvl_train.config.schema import RootConfig


def deepspeed_config(cfg: RootConfig, *, dtype: torch.dtype, on_gpu: bool) -> dict:
    p, o = cfg.parallel, cfg.optim
    if (p.offload_optimizer or p.offload_params) and not on_gpu:
        raise ValueError("parallel.offload_* moves GPU state to host memory; on a CPU-only machine set them false.")
    if p.offload_params and p.zero_stage != 3:
        raise ValueError("parallel.offload_params needs parallel.zero_stage=3.")
    bf16 = dtype == torch.bfloat16
    if bf16 and p.zero_stage == 0:
        raise ValueError("model.dtype=bfloat16 needs parallel.zero_stage >= 1 (fp32 gradient accumulation); "
                         "set parallel.zero_stage=1 (or 2, 3) or model.dtype=float32.")
    zero: dict = {"stage": p.zero_stage, "contiguous_gradients": True, "overlap_comm": on_gpu}
    if p.zero_stage == 3:
        # gathered weights for export come from GatheredParameters, not from DeepSpeed's 16-bit save
        zero.update({"stage3_gather_16bit_weights_on_model_save": False, "stage3_param_persistence_threshold": 1e4})
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": 1,  # batches are token-budgeted; DeepSpeed only counts them
        "gradient_accumulation_steps": o.grad_accum,
        "gradient_clipping": o.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        **({"communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # DeepSpeed's FusedAdam / CPUAdam are JIT-built on first use; torch's are prebuilt
                "torch_adam": True,
                "fused": on_gpu,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
