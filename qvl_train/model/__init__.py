"""The native Qwen3-VL-MoE model (single-device; parallelism is applied from outside)."""

from .build import build_model, count_parameters, init_weights
from .config import ModelConfig, TextConfig, VisionConfig, preset
from .generate import generate
from .io import from_pretrained, load_config, save_pretrained
from .model import ModelOutput, Qwen3VLMoe, causal_lm_loss
from .rope import get_rope_index

__all__ = [
    "ModelConfig",
    "ModelOutput",
    "Qwen3VLMoe",
    "TextConfig",
    "VisionConfig",
    "build_model",
    "causal_lm_loss",
    "count_parameters",
    "from_pretrained",
    "generate",
    "get_rope_index",
    "init_weights",
    "load_config",
    "preset",
    "save_pretrained",
]
