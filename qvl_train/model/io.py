"""Hub-format weights in and out: config.json + sharded safetensors + model.safetensors.index.json.

Loading builds the model on the meta device, allocates it once on the target device, then
copies tensors in shard by shard, so peak memory is one model plus one tensor, never two
models. Every key goes through state_dict_adapter (the one place that knows Hub layouts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import state_dict_adapter as adapter
from .build import reset_buffers
from .config import ModelConfig
from .model import Qwen3VLMoe

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_config(path: str | os.PathLike) -> ModelConfig:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} has no config.json; point model paths at a local Hugging Face model directory.")
    return ModelConfig.from_hf_dict(json.loads(cfg_file.read_text()))


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise ValueError(f"{path} has neither {INDEX_FILE} nor {SINGLE_FILE}.")


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    expert_layout: adapter.ExpertLayout | None = None,
) -> Qwen3VLMoe:
    """Load a Hub-format Qwen3-VL-MoE directory (either expert layout, either config spelling)."""
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    cfg = load_config(path)
    with torch.device("meta"):
        model = Qwen3VLMoe(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    reset_buffers(model)
    load_into(dict(model.named_parameters()), path, cfg, expert_layout=expert_layout)
    return model


def load_into(
    targets: dict[str, torch.Tensor],
    path: str | os.PathLike,
    cfg: ModelConfig,
    *,
    expert_layout: adapter.ExpertLayout | None = None,
    expert_range: tuple[int, int] | None = None,
) -> None:
    """Copy every checkpoint tensor into targets[our name], file by file. With `expert_range`
    (e0, e1) only those experts of each routed-expert tensor are read (get_slice), for ranks that
    hold an expert-parallel slice."""
    loaded: set[str] = set()
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                if expert_range and hf_name.endswith((adapter.GATE_UP, adapter.DOWN)):
                    e0, e1 = expert_range
                    name, tensor = adapter.expert_slice_from_hf(hf_name, f.get_slice(hf_name)[e0:e1], cfg, expert_layout)
                else:
                    name, tensor = adapter.from_hf(hf_name, f.get_tensor(hf_name), cfg, expert_layout)
                if name not in targets:
                    if cfg.tie_word_embeddings and name == "lm_head.weight":
                        continue
                    raise ValueError(f"{file.name} has unexpected tensor {hf_name!r} for this config.")
                if tuple(tensor.shape) != tuple(targets[name].shape):
                    raise ValueError(
                        f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(targets[name].shape)}."
                    )
                with torch.no_grad():
                    targets[name].copy_(tensor)
                loaded.add(name)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted(set(targets) - loaded - tied)
    if missing:
        raise ValueError(f"{path} is missing {len(missing)} tensors, e.g. {missing[:5]}.")


def save_pretrained(
    model: Qwen3VLMoe,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None,
) -> Path:
    """Write config.json (Hub spelling), sharded safetensors (Hub layout) and the index file.

    `state_dict` lets callers pass gathered tensors (e.g. from ZeRO-3) instead of the model's own:
    a dict, or an iterable of (name, tensor) pairs that is consumed once and written shard by
    shard (at most one shard of tensors alive; e.g. qvl_train.parallel's iter_full_state_dict).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    source = model.state_dict() if state_dict is None else state_dict
    pairs = source.items() if isinstance(source, Mapping) else source
    return _save_streaming(model, path, pairs, max_shard_bytes=max_shard_bytes, dtype=dtype)


def _save_streaming(model, path: Path, pairs, *, max_shard_bytes: int, dtype: torch.dtype | None) -> Path:
    """Convert (name, tensor) pairs one at a time and write shards as they fill (at most one
    shard of converted copies alive), under temporary names renamed model-0000i-of-0000N once N
    is known."""
    cfg = model.config
    weight_map, total, files, shard, size = {}, 0, [], {}, 0
    out_dtype = dtype

    def flush():
        nonlocal shard, size
        tmp = path / f"model-part-{len(files) + 1:05d}.safetensors.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        files.append((tmp, list(shard)))
        shard, size = {}, 0

    for name, tensor in pairs:
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        out_dtype = out_dtype or tensor.dtype
        nbytes = tensor.numel() * out_dtype.itemsize
        if shard and size + nbytes > max_shard_bytes:
            flush()
        hf_name, hf_tensor = adapter.to_hf(name, tensor.detach(), cfg)
        shard[hf_name] = hf_tensor.to("cpu", out_dtype).contiguous()
        size += nbytes
        total += nbytes
    if shard or not files:
        flush()
    for i, (tmp, names) in enumerate(files):
        fname = SINGLE_FILE if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(tmp, path / fname)
        weight_map.update({n: fname for n in names})
    if len(files) > 1:
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    dtype_name = {v: k for k, v in _DTYPES.items()}[out_dtype or torch.float32]
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(dtype=dtype_name), indent=2))
    _write_generation_config(cfg, path)
    return path


def _write_generation_config(cfg: ModelConfig, path: Path) -> None:
    t = cfg.text
    gen = {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
