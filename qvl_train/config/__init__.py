"""Run configuration: typed schemas, Hydra registration (recipes into the `recipe` group)."""

from .schema import RootConfig, validate
from .store import CONFIG_DIR, RECIPE_DIR, compose, register, to_config

__all__ = ["CONFIG_DIR", "RECIPE_DIR", "RootConfig", "compose", "register", "to_config", "validate"]
