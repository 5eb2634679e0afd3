"""Export a full Hub-layout checkpoint with a LoRA adapter merged into the base weights.

    python launch/export.py --base BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR [--dtype auto]

Loads the base once (qvl_train.model.from_pretrained: one model in memory, never two), adds the
PEFT-format adapter (qvl_train.peft.load_adapter), folds it in module by module and expert by
expert (qvl_train.peft.merge_lora: the largest temporary is one expert's [out, in] delta), writes
the checkpoint shard by shard (qvl_train.model.save_pretrained), copies the other files of the
base directory and writes the serving files (qvl_train.checkpoint.serving: tokenizer, chat
template and processor configs of the training run, generation config, model card). The result
loads in transformers' Qwen3VLMoeForConditionalGeneration.from_pretrained with the logits of
PeftModel(base) + adapter, and its processor encodes media as training did.

    python launch/export.py --checkpoint RUN/checkpoints/step_00000600 --out OUT_DIR [--adapter-only]

converts a training checkpoint of launch/sft.py (full or LoRA) into the same HF export, or with
--adapter-only (LoRA runs) into the PEFT adapter alone. Resharding checkpoints (the default under
ZeRO-3, qvl_train.checkpoint.reshard) are read tensor by tensor in their full logical shapes, any
ep_size included, with no process group and no DeepSpeed; DeepSpeed-format checkpoints
(checkpoint.format=deepspeed) go through DeepSpeed's zero_to_fp32 (not full-SFT runs with
ep_size > 1, whose AutoEP layout only the run's own exports gather).

Structure: each source of trained weights is one `load_*` function that returns our model with
the trained weights in place (`SOURCES`); `export()` merges and writes whatever it returns.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf

from qvl_train.checkpoint import serving
from qvl_train.config.schema import RootConfig
from qvl_train.data import load_tokenizer
from qvl_train.model import from_pretrained, save_pretrained
from qvl_train.peft import LoraSettings, apply_lora, load_adapter, merge_lora

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_NOT_COPIED = {"config.json"}  # written by save_pretrained


def base_dtype(base: Path) -> torch.dtype:
    """The dtype the base checkpoint declares (config.json torch_dtype / dtype), else float32."""
    cfg = json.loads((base / "config.json").read_text())
    for d in (cfg, cfg.get("text_config") or {}):
        name = d.get("torch_dtype") or d.get("dtype")
        if name in _DTYPES:
            return _DTYPES[name]
    return torch.float32


def load_adapter_source(args) -> torch.nn.Module:
    model = from_pretrained(args.base, dtype=args.torch_dtype)
    return load_adapter(model, args.adapter)


def run_config(checkpoint: Path) -> RootConfig:
    """The resolved config the trainer saved beside its checkpoints (<run>/config.yaml)."""
    path = checkpoint.resolve().parent.parent / "config.yaml"
    if not path.exists():
        raise ValueError(f"{checkpoint} is not inside a qvl_train run directory (no {path}).")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RootConfig), OmegaConf.load(path)))


def _run_model(cfg: RootConfig, args) -> torch.nn.Module:
    """The run's model before training: its base (model.path or --base), else the preset's seeded init."""
    from qvl_train.model import build_model

    if args.base is not None:
        return from_pretrained(args.base, dtype=torch.float32)
    return build_model(cfg.model.preset, seed=cfg.model.init_seed)


def load_resharding_source(args, cfg: RootConfig) -> torch.nn.Module:
    """A resharding checkpoint (reshard.py): the run's model (LoRA runs: its base plus adapters of
    the run's settings), each trained tensor read whole from the pieces, one at a time."""
    from qvl_train.checkpoint.reshard import Reader

    model = _run_model(cfg, args)
    if cfg.peft.method == "lora":
        apply_lora(model, LoraSettings.from_section(cfg.peft))
    reader = Reader(args.deepspeed_checkpoint)
    params = dict(model.named_parameters())
    unknown = sorted(set(reader.names) - set(params))
    if unknown:
        raise ValueError(f"{args.deepspeed_checkpoint} holds tensors the run's model does not have (e.g. {unknown[:3]}); "
                         "is --base the run's base model?")
    with torch.no_grad():
        for name in reader.names:
            value = reader.read("param", name)
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(params[name].shape)}; "
                                 "is --base the run's base model?")
            params[name].copy_(value)
            del value
    return model


def load_deepspeed_source(args) -> torch.nn.Module:
    """A training checkpoint written by launch/sft.py (<run>/checkpoints/step_N). Resharding
    format: load_resharding_source. DeepSpeed format: fp32 weights rebuilt from the ZeRO
    partitions by DeepSpeed's zero_to_fp32, onto the run's model (LoRA runs: the run's base plus
    adapters of the run's settings, merged by export())."""
    from qvl_train.checkpoint.reshard import INDEX

    ckpt = args.deepspeed_checkpoint
    if not (ckpt / "COMPLETE").exists():
        raise ValueError(f"{ckpt} is not a complete training checkpoint (no COMPLETE marker).")
    cfg = run_config(ckpt)
    if (ckpt / INDEX).is_file():
        return load_resharding_source(args, cfg).to(args.torch_dtype)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lora = cfg.peft.method == "lora"
    if cfg.parallel.ep_size > 1 and not lora:
        raise ValueError(
            "This checkpoint comes from a full-SFT run with parallel.ep_size > 1, whose experts DeepSpeed "
            "AutoEP stores in its own sharded layout; use the HF exports that run writes "
            "(checkpoint.export_every / export_at_end), which are gathered from the shards."
        )
    model = _run_model(cfg, args)
    if lora:
        apply_lora(model, LoraSettings.from_section(cfg.peft))
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    result = model.load_state_dict(state, strict=False)
    expected = {n for n, p in model.named_parameters() if p.requires_grad} if lora else set(model.state_dict())
    missing = expected & set(result.missing_keys)
    if result.unexpected_keys or missing:
        raise ValueError(f"checkpoint does not match the run's model: missing {sorted(missing)[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return model.to(args.torch_dtype)


SOURCES = {"adapter": load_adapter_source, "deepspeed_checkpoint": load_deepspeed_source}


def copy_side_files(base: Path, out: Path) -> list[str]:
    """Tokenizer, processor, chat template and generation files of the base (not its weights)."""
    copied = []
    for f in sorted(base.iterdir()):
        if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return copied


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file()


def serving_sources(args) -> tuple[object, object, serving.ModelCard] | None:
    """(tokenizer, media settings, model card) of the training run behind this export; None when
    neither the adapter nor the base has a tokenizer (an adapter of another tool on a bare base)."""
    if args.deepspeed_checkpoint is not None:
        ckpt = args.deepspeed_checkpoint.resolve()
        cfg = run_config(ckpt)
        tokenizer = load_tokenizer(args.side_files)
        step = int(ckpt.name.rpartition("_")[2]) if ckpt.name.rpartition("_")[2].isdigit() else None
        summary_file = ckpt.parent.parent / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        figures = {k: v for k, v in summary.items() if k.startswith("eval/")} if summary.get("step") == step else {}
        lora = cfg.peft.method == "lora"
        card = serving.ModelCard(
            kind="merged" if lora else "full", base_model=str(args.base or f"model.preset={cfg.model.preset} (random init)"),
            datasets=[(d.path, None) for d in cfg.data.datasets], eval_datasets=[(d.path, None) for d in cfg.data.eval_datasets],
            steps=step, eval=figures, source=f"launch/export.py --deepspeed-checkpoint {ckpt}")
        return tokenizer, serving.training_media(cfg.data, args.side_files), card
    # an adapter of this repo carries its run's tokenizer and processor files; else the base's
    src = args.adapter if (args.adapter / serving.IMAGE_PROCESSOR_FILE).is_file() else args.base
    if not _has_tokenizer(src):
        return None
    card = serving.ModelCard(kind="merged", base_model=str(args.base),
                             source=f"launch/export.py --adapter {args.adapter.resolve()} (data and figures: its README.md)")
    return load_tokenizer(src), serving.media_from_export(src), card


def export(args) -> Path:
    t0 = time.perf_counter()
    source = next(name for name in SOURCES if getattr(args, name, None))
    model = SOURCES[source](args)
    out = Path(args.out)
    if args.adapter_only:
        return export_adapter(model, args, out, t0)
    merge_lora(model)
    save_pretrained(model, out, max_shard_bytes=int(args.max_shard_gb * 1024**3), dtype=args.torch_dtype)
    copied = copy_side_files(Path(args.side_files), out)
    sources = serving_sources(args)
    if sources is None:
        print(f"WARNING: no tokenizer in {args.adapter} or {args.base}: wrote the weights and copied the base's files, "
              "but no processor configs, chat template, generation config or model card of the training run")
    else:
        tokenizer, media, card = sources
        t = model.config.text
        serving.write_serving_files(out, tokenizer=tokenizer, media=media, card=card, bos_token_id=t.bos_token_id,
                                    model_eos=t.eos_token_id)
    print(f"wrote {out} ({source} merged, {args.torch_dtype}, copied {len(copied)} side files) "
          f"in {time.perf_counter() - t0:.1f} s")
    return out


def export_adapter(model, args, out: Path, t0: float) -> Path:
    """--adapter-only: the PEFT adapter of a LoRA run's checkpoint (and the run's serving files)."""
    from qvl_train.peft import save_adapter

    cfg = run_config(args.deepspeed_checkpoint)
    if cfg.peft.method != "lora":
        raise ValueError(f"--adapter-only needs a LoRA run's checkpoint; {args.deepspeed_checkpoint} is from a "
                         f"peft.method={cfg.peft.method} run: drop --adapter-only to export the full model.")
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}  # what the run trained
    save_adapter(model, out, base_model_name_or_path=str(Path(args.base).resolve()), state_dict=trained,
                 dtype=args.torch_dtype)
    tokenizer, media, card = serving_sources(args)
    card.kind, card.lora_rank = "adapter", cfg.peft.rank
    t = model.config.text
    serving.write_serving_files(out, tokenizer=tokenizer, media=media, card=card, bos_token_id=t.bos_token_id,
                                model_eos=t.eos_token_id)
    print(f"wrote {out} (adapter of {args.deepspeed_checkpoint}) in {time.perf_counter() - t0:.1f} s")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, help="Hub-format base model directory (default with "
                   "--deepspeed-checkpoint: the run's model.path, or the base a tiny LoRA run exported)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", type=Path, help="PEFT-format LoRA directory (qvl_train.peft.save_adapter)")
    src.add_argument("--checkpoint", "--deepspeed-checkpoint", dest="deepspeed_checkpoint", type=Path,
                     help="a training checkpoint of launch/sft.py: <run>/checkpoints/step_N (either format)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES], help="auto: the base's declared dtype")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--adapter-only", action="store_true", help="with --checkpoint of a LoRA run: write the PEFT "
                   "adapter (for --base) instead of merging it")
    args = p.parse_args(argv)
    args.side_files = args.base
    if args.deepspeed_checkpoint is not None:
        cfg = run_config(args.deepspeed_checkpoint)
        run_dir = args.deepspeed_checkpoint.resolve().parent.parent
        if args.base is None and cfg.model.path:
            args.base = Path(cfg.model.path)
        elif args.base is None and cfg.peft.method == "lora":
            args.base = run_dir / "base"
        args.side_files = Path(cfg.model.tokenizer_path or cfg.model.path or run_dir / "tokenizer")
    elif args.base is None:
        p.error("--adapter needs --base")
    if args.adapter_only and args.deepspeed_checkpoint is None:
        p.error("--adapter-only goes with --checkpoint (a LoRA run's training checkpoint)")
    if args.dtype != "auto":
        args.torch_dtype = _DTYPES[args.dtype]
    else:
        args.torch_dtype = base_dtype(args.base) if args.base is not None else torch.float32
    if args.base is not None and args.out.resolve() == args.base.resolve():
        p.error("--out must differ from --base")
    return args


def main(argv=None) -> None:
    export(parse_args(argv))


if __name__ == "__main__":
    main()
