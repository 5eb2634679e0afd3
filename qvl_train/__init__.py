"""qvl_train: fine-tune Qwen3-VL-MoE with LoRA or full SFT on DeepSpeed ZeRO-3 + expert parallelism."""
