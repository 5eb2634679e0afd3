"""The DeepSpeed config dict for a run (ZeRO stage, offload, precision, accumulation, clipping)."""

from __future__ import annotations

import torch

from qvl_train.config.schema import RootConfig


def deepspeed_config(cfg: RootConfig, *, dtype: torch.dtype, on_gpu: bool) -> dict:
    p, o = cfg.parallel, cfg.optim
    if (p.offload_optimizer or p.offload_params) and not on_gpu:
        raise ValueError("parallel.offload_* moves GPU state to host memory; on a CPU-only machine set them false.")
    if p.offload_params and p.zero_stage != 3:
        raise ValueError("parallel.offload_params needs parallel.zero_stage=3.")
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
        "bf16": {"enabled": dtype == torch.bfloat16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # the fused CPU/GPU Adam kernels need a build step; torch's AdamW needs none
                "torch_adam": not on_gpu,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
