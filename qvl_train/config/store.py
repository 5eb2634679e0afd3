"""Hydra registration: the root schema, group schemas, and the top-level recipes/ directory as
the `recipe` group (so `+recipe=vqa` works from the command line and from `compose`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from qvl_train.data.config import register_configs as register_data

from .schema import GROUP_SCHEMAS, RootConfig, validate

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs"
RECIPE_DIR = REPO / "recipes"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="root_schema", node=RootConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)
    register_data()
    # Hydra only looks for groups under config roots; recipes/ sits beside configs/, so each
    # recipe file is stored into the `recipe` group (its `# @package _global_` header kept).
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
    _registered = True


def compose(overrides: list[str] | None = None):
    """The composed DictConfig, exactly as `launch/sft.py` would see it (for tests and tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name="sft", overrides=overrides or [])


def to_config(dict_config) -> RootConfig:
    cfg: RootConfig = OmegaConf.to_object(dict_config)
    unknown = _dropped_keys(OmegaConf.to_container(dict_config), OmegaConf.to_container(OmegaConf.structured(cfg)))
    if unknown:
        raise ValueError(
            f"unknown config key(s): {', '.join(unknown)}. A '+key=value' override adds a key, but only the "
            "schema's keys are used (qvl_train/config/schema.py, configs/); fix the spelling and drop the '+'."
        )
    validate(cfg)
    return cfg


def _dropped_keys(given, kept, prefix: str = "") -> list[str]:
    """Keys of the composed config that the typed schema dropped (Hydra's '+' lets any key in)."""
    import difflib

    if isinstance(given, dict) and isinstance(kept, dict):
        out = []
        for key, value in given.items():
            if key not in kept:
                close = difflib.get_close_matches(str(key), [str(k) for k in kept], n=1)
                out.append(f"{prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
            else:
                out += _dropped_keys(value, kept[key], f"{prefix}{key}.")
        return out
    if isinstance(given, list) and isinstance(kept, list):
        return [k for i, (a, b) in enumerate(zip(given, kept)) for k in _dropped_keys(a, b, f"{prefix}{i}.")]
    return []
