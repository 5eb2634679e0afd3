"""Write a random Qwen3-VL-MoE model directory in the published format, at any width and depth.

    python -m qvl_train.model.random_checkpoint --preset 30B-A3B --layers 2 --vision-layers 2 --out DIR

The directory looks like a published one: config.json in the Hub spelling, sharded safetensors
(model-0000i-of-0000N.safetensors + model.safetensors.index.json) in the Hub expert layout, the
tokenizer files with a chat template, preprocessor_config.json, video_preprocessor_config.json
and generation_config.json. `--layout transformers5` writes what transformers 5 save_pretrained
writes instead (experts [E, 2I, D] / [E, D, I], num_local_experts, rope_parameters).

The tokenizer is the repo's byte-level BPE padded so that Qwen's added tokens sit at the ids the
config names (151,643.. for the real presets, 1000.. for tiny), so the data pipeline and
launch/sft.py run on the directory unchanged. Users and tests can so dry-run a recipe at real
width (e.g. 1-2 layers) on any machine.

Tensors are generated and written one at a time (peak memory: the largest tensor). safetensors'
save_file needs a whole shard in memory; the format is a JSON header plus raw bytes, so with the
shapes known up front (a meta-device build) each file is written tensor by tensor instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import state_dict_adapter as adapter
from .config import ModelConfig, preset
from .io import INDEX_FILE, SINGLE_FILE
from .model import Qwen3VLMoe
from .safetensors_ranges import write_streamed
from .text import RMSNorm

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class TensorSpec:
    name: str  # the checkpoint key
    shape: tuple[int, ...]
    init: str  # normal | ones | zeros


def cut_config(cfg: ModelConfig, *, layers: int | None = None, vision_layers: int | None = None) -> ModelConfig:
    """`cfg` with fewer decoder layers / vision blocks, every width unchanged. DeepStack keeps as
    many levels as fit (at most one per vision block and per decoder layer)."""
    text, vision = cfg.text, cfg.vision
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers {layers}: need at least 1 decoder layer.")
        mlp_only = [i for i in text.mlp_only_layers if i < layers]
        text = dataclasses.replace(text, num_hidden_layers=layers, mlp_only_layers=mlp_only)
    if vision_layers is not None:
        if vision_layers < 1:
            raise ValueError(f"--vision-layers {vision_layers}: need at least 1 vision block.")
        vision = dataclasses.replace(vision, depth=vision_layers)
    levels = vision.deepstack_visual_indexes
    if any(i >= vision.depth for i in levels) or len(levels) > text.num_hidden_layers:
        n = min(len(levels), vision.depth, text.num_hidden_layers)
        vision = dataclasses.replace(vision, deepstack_visual_indexes=[k * vision.depth // n for k in range(n)])
    return cfg.replace(text=text, vision=vision)


def tensor_specs(cfg: ModelConfig, *, expert_layout: adapter.ExpertLayout = "hub") -> list[TensorSpec]:
    """Every checkpoint tensor of `cfg` in file order, from a meta-device build (no memory)."""
    with torch.device("meta"):
        model = Qwen3VLMoe(cfg)
    init = _init_rule(model)
    specs = []
    for name, param in model.named_parameters():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        hf_name, hf_meta = adapter.to_hf(name, param, cfg, expert_layout=expert_layout)
        specs.append(TensorSpec(hf_name, tuple(hf_meta.shape), init[name]))
    return specs


def _init_rule(model: nn.Module) -> dict[str, str]:
    """The same rule as build.init_weights: norms' weights one, biases zero, the rest normal."""
    rule = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias":
                rule[full] = "zeros"
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                rule[full] = "ones"
            else:
                rule[full] = "normal"
    return rule


def _random_tensor(spec: TensorSpec, *, dtype: torch.dtype, std: float, seed: int) -> torch.Tensor:
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    # One generator per tensor, seeded by its name: values do not depend on order or sharding.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    return torch.empty(spec.shape, dtype=dtype).normal_(0.0, std, generator=gen)


def plan_shards(specs: list[TensorSpec], *, itemsize: int, max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = _numel(spec.shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_safetensors(path: Path, specs: list[TensorSpec], *, dtype: torch.dtype, std: float, seed: int) -> int:
    """One safetensors file, header first, then each tensor's bytes as it is generated; returns
    the tensors' bytes."""
    write_streamed(path, [(spec.name, dtype, list(spec.shape)) for spec in specs],
                   (_random_tensor(spec, dtype=dtype, std=std, seed=seed) for spec in specs), metadata={"format": "pt"})
    return sum(_numel(spec.shape) for spec in specs) * dtype.itemsize


def write_random_checkpoint(
    cfg: ModelConfig,
    out: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 4 * 10**9,
    seed: int = 0,
    expert_layout: adapter.ExpertLayout = "hub",
) -> Path:
    """Random weights (std = the config's initializer_range) plus config, tokenizer and
    processor files in `out`. Several shards get an index; one shard is model.safetensors."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(cfg, expert_layout=expert_layout)
    shards = plan_shards(specs, itemsize=dtype.itemsize, max_shard_bytes=max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(out / fname, shard, dtype=dtype, std=cfg.text.initializer_range, seed=seed)
        weight_map.update({s.name: fname for s in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    spelling = "hub" if expert_layout == "hub" else "transformers5"
    dtype_name = {v: k for k, v in _DTYPES.items()}[dtype]
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(dtype=dtype_name, spelling=spelling), indent=2) + "\n")
    write_generation_config(cfg, out)
    write_tokenizer_files(cfg, out)
    return out


def write_generation_config(cfg: ModelConfig, out: Path) -> None:
    """The published Qwen3-VL-Instruct generation_config.json (sampling values and stop ids)."""
    t = cfg.text
    eos = [t.eos_token_id] if isinstance(t.eos_token_id, int) else list(t.eos_token_id or [])
    if t.bos_token_id is not None and t.bos_token_id not in eos:
        eos.append(t.bos_token_id)  # Qwen stops on <|im_end|> and <|endoftext|>
    gen = {"bos_token_id": t.bos_token_id, "pad_token_id": t.bos_token_id, "eos_token_id": eos, "do_sample": True,
           "top_k": 20, "top_p": 0.8, "temperature": 0.7, "repetition_penalty": 1.0}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def write_tokenizer_files(cfg: ModelConfig, out: Path) -> None:
    """The repo tokenizer with Qwen's added tokens at the config's ids, and the processor configs."""
    from qvl_train.data import tokenizer as repo_tok

    base = cfg.image_token_id - [t for t, _ in repo_tok.QWEN_ADDED_TOKENS].index("<|image_pad|>")
    if base < repo_tok.NUM_REGULAR_TOKENS:  # the repo BPE has that many tokens below the specials
        raise ValueError(
            f"image_token_id={cfg.image_token_id} puts Qwen's specials at {base}, below the repo tokenizer's "
            f"{repo_tok.NUM_REGULAR_TOKENS} regular tokens."
        )
    repo_tok.build_tokenizer(out, num_regular_tokens=base, vocab_size=cfg.text.vocab_size)
    repo_tok.write_processor_configs(out)
    tok = repo_tok.load_tokenizer(out)
    expected = {"<|image_pad|>": cfg.image_token_id, "<|video_pad|>": cfg.video_token_id,
                "<|vision_start|>": cfg.vision_start_token_id, "<|vision_end|>": cfg.vision_end_token_id,
                "<|im_end|>": cfg.text.eos_token_id if isinstance(cfg.text.eos_token_id, int) else None}
    wrong = {k: (tok.convert_tokens_to_ids(k), v) for k, v in expected.items()
             if v is not None and tok.convert_tokens_to_ids(k) != v}
    if wrong:
        raise ValueError(f"The config's token ids do not follow Qwen's order from {base}: (tokenizer, config) {wrong}.")


def parse_size(text: str) -> int:
    """'4GB' -> 4e9 bytes (also KB, MB, GiB, MiB, KiB, or plain bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"Shard size {text!r}: write e.g. 4GB, 500MB or a number of bytes.")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help="tiny, 30B-A3B or 235B-A22B")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    p.add_argument("--vision-layers", type=int, default=None, help="vision blocks (default: the preset's)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    p.add_argument("--shard-size", default="4GB", help="largest shard, e.g. 4GB (as the Hub) or 200MB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default="hub", choices=["hub", "transformers5"],
                   help="hub: as published; transformers5: as transformers 5 save_pretrained writes")
    args = p.parse_args(argv)
    cfg = cut_config(preset(args.preset), layers=args.layers, vision_layers=args.vision_layers)
    out = write_random_checkpoint(cfg, args.out, dtype=_DTYPES[args.dtype], max_shard_bytes=parse_size(args.shard_size),
                                  seed=args.seed, expert_layout=args.layout)
    n = sum(_numel(s.shape) for s in tensor_specs(cfg))
    print(f"wrote {out}: {n:,} parameters, {cfg.text.num_hidden_layers} layers, {cfg.vision.depth} vision blocks")
    return out


if __name__ == "__main__":
    main()
