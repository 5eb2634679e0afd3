"""Setup checks of a local model directory, before any loader gets a chance to misreport them
(transformers takes a missing dir for a Hub repo id, and builds an empty tokenizer from a dir
without tokenizer files)."""

from __future__ import annotations

from pathlib import Path

from .io import INDEX_FILE, SINGLE_FILE

# A usable tokenizer dir has the fast tokenizer file, or the slow BPE pair.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def _existing_dir(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{key}={path}: not found. Point it at a local Hugging Face model directory "
                         "(Hub ids are not downloaded: fetch the model first, e.g. `hf download ORG/NAME --local-dir DIR`).")
    if not p.is_dir():
        raise ValueError(f"{key}={path} is a file; it must be a directory.")
    return p


def check_model_dir(path: str) -> None:
    """model.path: exists, has config.json and weights."""
    p = _existing_dir(path, "model.path")
    if not (p / "config.json").is_file():
        raise ValueError(f"model.path={path} has no config.json: it is not a Hugging Face model directory.")
    if not ((p / INDEX_FILE).is_file() or (p / SINGLE_FILE).is_file()):
        raise ValueError(f"model.path={path} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE} is there.")


def check_tokenizer_dir(path: str, *, key: str) -> None:
    """The tokenizer dir (model.tokenizer_path, else model.path) has tokenizer files."""
    p = _existing_dir(path, key)
    if any(all((p / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS):
        return
    missing = sorted({name for names in TOKENIZER_FILE_SETS for name in names if not (p / name).is_file()})
    raise ValueError(
        f"{key}={path} has no tokenizer: missing {', '.join(missing)} (tokenizer.json, or vocab.json and "
        "merges.txt). Copy the model's tokenizer files there, or set model.tokenizer_path=DIR to a directory "
        "that has them."
    )
