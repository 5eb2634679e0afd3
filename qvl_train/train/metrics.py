"""Per-step training metrics, reduced over data-parallel ranks: losses, throughput, MFU,
packing efficiency, memory, skipped samples, and per-layer expert load."""

from __future__ import annotations

import resource

import torch
import torch.distributed as dist

from qvl_train.model import ModelConfig

# dense bf16 peak per device, for MFU (users on other hardware set train.peak_tflops)
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "B200": 2250.0}


def active_parameters(cfg: ModelConfig) -> int:
    """Parameters one text token touches: everything in the decoder except the unrouted experts."""
    t = cfg.text
    attn = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) + 2 * t.head_dim
    moe = t.num_experts_per_tok * 3 * t.hidden_size * t.moe_intermediate_size + t.num_experts * t.hidden_size
    dense = 3 * t.hidden_size * t.intermediate_size
    layers = sum(moe if t.is_moe_layer(i) else dense for i in range(t.num_hidden_layers))
    per_layer_rest = t.num_hidden_layers * (attn + 2 * t.hidden_size)
    return layers + per_layer_rest + t.vocab_size * t.hidden_size  # + lm_head (embeddings are lookups)


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class StepAccumulator:
    """Sums over the micro-batches of the steps since the last read-back on this rank; `reduce`
    sums over ranks. Losses and expert load are added on the device (no host sync per step):
    the trainer reads them back once per log interval."""

    DEVICE_KEYS = ("loss", "ce", "aux")
    HOST_KEYS = ("real_tokens", "slots", "trained_tokens", "samples", "visual_tokens", "micro")
    KEYS = DEVICE_KEYS + HOST_KEYS

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.HOST_KEYS, 0.0)
        self.losses: torch.Tensor | None = None  # (loss, ce, aux) summed, on the device
        self.expert_load: torch.Tensor | None = None
        self.data_wait_s = 0.0  # time this rank waited for its micro-batches
        self.seconds = 0.0  # time in training steps (evaluation and checkpoints excluded)
        self.steps = 0

    def add(self, out, stats: dict) -> None:
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros_like(out.ce_loss)
        losses = torch.stack([out.loss.detach().float(), out.ce_loss.detach().float(), aux.detach().float()])
        self.losses = losses if self.losses is None else self.losses + losses
        s = self.sums
        s["real_tokens"] += stats["real_tokens"]
        s["slots"] += stats["slots"]
        s["trained_tokens"] += stats["trained_tokens"]
        s["samples"] += stats["num_samples"]
        s["visual_tokens"] += stats["visual_tokens"]
        s["micro"] += 1
        if out.expert_load is not None:
            load = out.expert_load.detach().float()
            self.expert_load = load if self.expert_load is None else self.expert_load + load

    def reduce(self, device: torch.device) -> tuple[dict, torch.Tensor | None]:
        host = torch.tensor([self.sums[k] for k in self.HOST_KEYS], dtype=torch.float64, device=device)
        losses = self.losses.to(device, torch.float64) if self.losses is not None else host.new_zeros(3)
        vec = torch.cat([losses, host])
        dist.all_reduce(vec)
        total = dict(zip(self.KEYS, vec.tolist()))
        load = None
        if self.expert_load is not None:
            load = self.expert_load.to(device)
            dist.all_reduce(load)
            load = load.cpu()
        return total, load


def step_metrics(total: dict, load: torch.Tensor | None, *, seconds: float, world: int, active_params: int,
                 peak: float | None, steps: int = 1) -> dict[str, float]:
    """Metrics of `steps` optimizer steps that took `seconds` (losses: mean per micro-batch)."""
    micro = max(total["micro"], 1.0)
    tokens_per_s = total["real_tokens"] / seconds
    m = {
        "train/loss": total["loss"] / micro,
        "train/ce": total["ce"] / micro,
        "train/aux": total["aux"] / micro,
        "perf/tokens_per_s": tokens_per_s,
        "perf/tokens_per_s_per_device": tokens_per_s / world,
        "perf/samples_per_s": total["samples"] / seconds,
        "perf/step_s": seconds / max(steps, 1),
        "data/packing_efficiency": total["real_tokens"] / max(total["slots"], 1.0),
        "data/trained_tokens": total["trained_tokens"],
        "data/visual_tokens": total["visual_tokens"],
    }
    if peak:
        m["perf/mfu"] = 6 * active_params * tokens_per_s / (peak * 1e12 * world)
    if load is not None:
        m.update(expert_load_metrics(load))
    return m


def expert_load_metrics(load_LE: torch.Tensor) -> dict[str, float]:
    """Per MoE layer and overall: the coefficient of variation of tokens per expert (0 = perfectly
    balanced), the most and least loaded expert relative to the uniform share 1/E (1 = balanced;
    max_load bounds how long an expert-parallel step waits for its busiest expert), and dead
    experts (no token in the interval). The overall keys sit in W&B's `experts` section beside the
    load chart; the per-layer ones in `experts_by_layer`."""
    mean = load_LE.mean(-1).clamp(min=1e-9)
    cv = load_LE.std(-1, unbiased=False) / mean
    rel = load_LE / mean[:, None]
    top, bottom = rel.max(-1).values, rel.min(-1).values
    dead = (load_LE == 0).sum(-1)
    m = {"experts/cv_mean": float(cv.mean()), "experts/cv_max": float(cv.max()), "experts/dead_total": float(dead.sum()),
         "experts/max_load": float(top.max()), "experts/min_load": float(bottom.min())}
    for i in range(load_LE.shape[0]):
        m[f"experts_by_layer/layer_{i:02d}/cv"] = float(cv[i])
        m[f"experts_by_layer/layer_{i:02d}/max_load"] = float(top[i])
        m[f"experts_by_layer/layer_{i:02d}/min_load"] = float(bottom[i])
        m[f"experts_by_layer/layer_{i:02d}/dead"] = float(dead[i])
    return m
