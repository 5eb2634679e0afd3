"""Export a full Hub-layout checkpoint with a LoRA adapter merged into the base weights.

    python launch/export.py --base BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR [--dtype auto]

Loads the base once (qvl_train.model.from_pretrained: one model in memory, never two), adds the
PEFT-format adapter (qvl_train.peft.load_adapter), folds it in module by module and expert by
expert (qvl_train.peft.merge_lora: the largest temporary is one expert's [out, in] delta), writes
the checkpoint shard by shard (qvl_train.model.save_pretrained) and copies the tokenizer /
processor / generation files of the base directory. The result loads in transformers'
Qwen3VLMoeForConditionalGeneration.from_pretrained with the logits of PeftModel(base) + adapter.

Structure: each source of trained weights is one `load_*` function that returns our model with
the trained weights in place (`SOURCES`); `export()` merges and writes whatever it returns. A
DeepSpeed ZeRO checkpoint source (deepspeed.utils.zero_to_fp32) belongs there as one more loader.
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

from qvl_train.model import from_pretrained, save_pretrained
from qvl_train.peft import load_adapter, merge_lora

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


SOURCES = {"adapter": load_adapter_source}


def copy_side_files(base: Path, out: Path) -> list[str]:
    """Tokenizer, processor, chat template and generation files of the base (not its weights)."""
    copied = []
    for f in sorted(base.iterdir()):
        if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return copied


def export(args) -> Path:
    t0 = time.perf_counter()
    source = next(name for name in SOURCES if getattr(args, name, None))
    model = SOURCES[source](args)
    merge_lora(model)
    out = Path(args.out)
    save_pretrained(model, out, max_shard_bytes=int(args.max_shard_gb * 1024**3), dtype=args.torch_dtype)
    copied = copy_side_files(Path(args.base), out)
    print(f"wrote {out} ({source} merged, {args.torch_dtype}, copied {len(copied)} side files) "
          f"in {time.perf_counter() - t0:.1f} s")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, type=Path, help="Hub-format base model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", type=Path, help="PEFT-format LoRA directory (qvl_train.peft.save_adapter)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES], help="auto: the base's declared dtype")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    args = p.parse_args(argv)
    args.torch_dtype = base_dtype(args.base) if args.dtype == "auto" else _DTYPES[args.dtype]
    if args.out.resolve() == args.base.resolve():
        p.error("--out must differ from --base")
    return args


def main(argv=None) -> None:
    export(parse_args(argv))


if __name__ == "__main__":
    main()
