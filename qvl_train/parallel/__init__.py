"""Expert parallelism for ZeRO-3 training (see expert_parallel.py's docstring for the two paths).

Trainer checklist:
- ds_config.update(autoep_config(model.config, ep_size, world_size=world))  # trainable experts
- frozen experts (LoRA): ep_info = build_ep_groups(ep, num_experts=E); shard_experts_for_ep(model,
  ep_info) or model = from_pretrained_ep(path, ep_info), BEFORE deepspeed.initialize
- model.run_vision_always = True; then deepspeed.initialize(...)
- install_autoep_router_capture(engine)  # after initialize (no-op without AutoEP)
- export: save_full_pretrained(engine, out_dir, ep_info=...) on ALL ranks
"""

from .expert_parallel import (
    AllToAllDispatcher,
    ShardedExperts,
    autoep_config,
    from_pretrained_ep,
    install_autoep_router_capture,
    iter_full_state_dict,
    load_local_expert_slices,
    save_full_pretrained,
    shard_experts_for_ep,
)
from .groups import EPInfo, build_ep_groups, dist_info, ep_info_from_deepspeed, validate_ep_size

__all__ = [
    "AllToAllDispatcher",
    "EPInfo",
    "ShardedExperts",
    "autoep_config",
    "build_ep_groups",
    "dist_info",
    "ep_info_from_deepspeed",
    "from_pretrained_ep",
    "install_autoep_router_capture",
    "iter_full_state_dict",
    "load_local_expert_slices",
    "save_full_pretrained",
    "shard_experts_for_ep",
    "validate_ep_size",
]
