"""Typed model config for Qwen3-VL-MoE, its Hub config.json spelling, and named presets.

The Hub files (and transformers 4.57) spell the expert count `num_experts` and the rope settings
`rope_theta` + `rope_scaling`; transformers 5.x writes `num_local_experts` and `rope_parameters`.
`ModelConfig.from_hf_dict` reads both; `to_hf_dict` always writes the Hub spelling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    moe_intermediate_size: int = 768
    num_experts: int = 128
    num_experts_per_tok: int = 8
    router_aux_loss_coef: float = 0.001
    rope_theta: float = 5_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [24, 20, 20])
    mrope_interleaved: bool = True
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


@dataclass
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        validate(self)

    # ---- Hub config.json ----------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        if hf.get("model_type") not in (None, "qwen3_vl_moe"):
            raise ValueError(
                f"config.json has model_type={hf.get('model_type')!r}; qvl_train loads Qwen3-VL-MoE "
                "checkpoints (model_type 'qwen3_vl_moe') only."
            )
        return cls(
            text=_text_from_hf(hf.get("text_config") or {}),
            vision=_vision_from_hf(hf.get("vision_config") or {}),
            image_token_id=hf.get("image_token_id", 151655),
            video_token_id=hf.get("video_token_id", 151656),
            vision_start_token_id=hf.get("vision_start_token_id", 151652),
            vision_end_token_id=hf.get("vision_end_token_id", 151653),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )

    def to_hf_dict(self, dtype: str = "float32", spelling: str = "hub") -> dict[str, Any]:
        """config.json as a dict: the Hub spelling, or (`spelling="transformers5"`) the one
        transformers 5 save_pretrained writes (for writing test checkpoints like its own)."""
        t, v = self.text, self.vision
        text = {
            "model_type": "qwen3_vl_moe_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "attention_bias": t.attention_bias,
            "attention_dropout": 0.0,
            "decoder_sparse_step": t.decoder_sparse_step,
            "mlp_only_layers": list(t.mlp_only_layers),
            "moe_intermediate_size": t.moe_intermediate_size,
            "num_experts": t.num_experts,
            "num_experts_per_tok": t.num_experts_per_tok,
            "norm_topk_prob": True,
            "router_aux_loss_coef": t.router_aux_loss_coef,
            "rope_theta": t.rope_theta,
            "rope_scaling": {
                "rope_type": "default",
                "mrope_section": list(t.mrope_section),
                "mrope_interleaved": t.mrope_interleaved,
            },
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": t.pad_token_id,
            "initializer_range": t.initializer_range,
            "use_cache": True,
            "dtype": dtype,
        }
        vision = {
            "model_type": "qwen3_vl_moe",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "out_hidden_size": v.out_hidden_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            "hidden_act": v.hidden_act,
            "initializer_range": v.initializer_range,
        }
        if spelling == "transformers5":
            text["num_local_experts"] = text.pop("num_experts")
            text["rope_parameters"] = {**text.pop("rope_scaling"), "rope_theta": text.pop("rope_theta")}
        elif spelling != "hub":
            raise ValueError(f"spelling={spelling!r}: use 'hub' or 'transformers5'.")
        return {
            "architectures": ["Qwen3VLMoeForConditionalGeneration"],
            "model_type": "qwen3_vl_moe",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": dtype,
        }

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _pick(d: dict[str, Any], cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names and v is not None}


def _text_from_hf(d: dict[str, Any]) -> TextConfig:
    kwargs = _pick(d, TextConfig)
    if "num_local_experts" in d:  # transformers 5.x spelling
        kwargs["num_experts"] = d["num_local_experts"]
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = rope.get("rope_theta", d.get("rope_theta"))
    if theta is None:
        raise ValueError(
            "config.json text_config has no rope_theta (neither top-level nor in rope_parameters); "
            "its default differs between transformers versions, so set it explicitly."
        )
    kwargs["rope_theta"] = float(theta)
    if "mrope_section" in rope:
        kwargs["mrope_section"] = list(rope["mrope_section"])
    kwargs["mrope_interleaved"] = bool(rope.get("mrope_interleaved", True))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"Unsupported text rope_type {rope['rope_type']!r}: only 'default' MRoPE is implemented.")
    if d.get("head_dim") is None:
        kwargs["head_dim"] = kwargs.get("hidden_size", 2048) // kwargs.get("num_attention_heads", 32)
    if d.get("norm_topk_prob") is False:
        raise ValueError("norm_topk_prob=False is not Qwen3-VL-MoE routing; refusing to load silently-wrong weights.")
    return TextConfig(**kwargs)


def _vision_from_hf(d: dict[str, Any]) -> VisionConfig:
    kwargs = _pick(d, VisionConfig)
    rope = d.get("rope_parameters") or {}
    if "rope_theta" in rope:
        kwargs["rope_theta"] = float(rope["rope_theta"])
    for key in ("patch_size", "temporal_patch_size"):
        if isinstance(kwargs.get(key), (list, tuple)):
            kwargs[key] = int(kwargs[key][0])
    if "deepstack_visual_indexes" in kwargs:
        kwargs["deepstack_visual_indexes"] = list(kwargs["deepstack_visual_indexes"])
    return VisionConfig(**kwargs)


def validate(cfg: ModelConfig) -> None:
    t, v = cfg.text, cfg.vision
    if t.num_attention_heads % t.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({t.num_attention_heads}) must be a multiple of num_key_value_heads "
            f"({t.num_key_value_heads})."
        )
    if t.num_experts and not 0 < t.num_experts_per_tok <= t.num_experts:
        raise ValueError(f"num_experts_per_tok={t.num_experts_per_tok} must be in [1, num_experts={t.num_experts}].")
    if sum(t.mrope_section) != t.head_dim // 2:
        raise ValueError(f"sum(mrope_section)={sum(t.mrope_section)} must equal head_dim/2={t.head_dim // 2}.")
    if v.hidden_size % v.num_heads or (v.hidden_size // v.num_heads) % 4:
        raise ValueError("vision hidden_size/num_heads must be an integer divisible by 4 (2D rotary).")
    if any(i >= v.depth for i in v.deepstack_visual_indexes):
        raise ValueError(f"deepstack_visual_indexes {v.deepstack_visual_indexes} must be < vision depth {v.depth}.")
    if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
        raise ValueError("More DeepStack levels than decoder layers to inject them into.")
    if v.out_hidden_size != t.hidden_size:
        raise ValueError(
            f"vision out_hidden_size ({v.out_hidden_size}) must equal text hidden_size ({t.hidden_size})."
        )


# ---- presets --------------------------------------------------------------------------------

# The tiny model's token ids follow the repo tokenizer (qvl_train.data.tokenizer): 1000 regular
# tokens, then Qwen's special tokens in Qwen's order starting at TINY_SPECIAL_BASE.
TINY_SPECIAL_BASE = 1000


def _tiny() -> ModelConfig:
    b = TINY_SPECIAL_BASE
    return ModelConfig(
        # I=48, 2I=96 differ from H=64 so the expert layout is never ambiguous.
        text=TextConfig(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            moe_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[],
            decoder_sparse_step=1,
            rope_theta=10000.0,
            mrope_section=[4, 2, 2],
            bos_token_id=b,
            eos_token_id=b + 2,
            pad_token_id=b,
            router_aux_loss_coef=0.01,
        ),
        vision=VisionConfig(
            depth=3,
            hidden_size=32,
            intermediate_size=80,
            num_heads=2,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=b + 12,
        video_token_id=b + 13,
        vision_start_token_id=b + 9,
        vision_end_token_id=b + 10,
    )


def _qwen3_vl_30b_a3b() -> ModelConfig:
    return ModelConfig(text=TextConfig(), vision=VisionConfig(out_hidden_size=2048))


def _qwen3_vl_235b_a22b() -> ModelConfig:
    return ModelConfig(
        text=TextConfig(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=94,
            num_attention_heads=64,
            num_key_value_heads=4,
            head_dim=128,
            moe_intermediate_size=1536,
            num_experts=128,
            num_experts_per_tok=8,
        ),
        vision=VisionConfig(out_hidden_size=4096),
    )


PRESETS = {"tiny": _tiny, "30B-A3B": _qwen3_vl_30b_a3b, "235B-A22B": _qwen3_vl_235b_a22b}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]()
