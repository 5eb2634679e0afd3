"""Typed data configuration and its Hydra registration (config group ``data``).

Design choices:
- One small dataclass per concern (a dataset, image options, video options, the pipeline).
  Hydra validates YAML against them, so a typo in a key is an error, not a silent default.
- Dataset weights are *repeat factors per epoch* (weight 2.0 = every sample twice, 0.5 = a
  seeded half of the samples); see ``qvl_train.data.sources``. Weight 1 everywhere means each
  sample exactly once per epoch.
- Media budgets live here and are handed to the encoder by ``media_options()`` under the
  encoder's MediaConfig names; unset (None) ones fall back to the model dir's processor configs.
- ``validate`` raises ValueError naming the key and the fix; it runs when a loader is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BAD_SAMPLE_POLICIES = ("error", "skip")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DATASET_FORMATS = ("auto", "jsonl", "hf")


@dataclass
class DatasetConfig:
    """One source of conversations.

    path: a .jsonl file (read by us: line numbers in errors), or a local file/folder that
      Hugging Face ``datasets`` reads (.json, .parquet, .arrow, a ``save_to_disk`` folder).
      Relative paths resolve against the working directory, then the repository root.
    name: label used in stats, errors and the held-out hash (default: file stem).
    weight: repeat factor per epoch (see module docstring).
    format: "auto" picks from the suffix; "jsonl" or "hf" force a reader.
    streaming: read sequentially without an index (data larger than memory, or a folder of
      shards); shuffling then uses a buffer and weights are applied per record.
    base_dir: folder that relative media paths resolve against (default: the file's folder).
    """

    path: str = "???"
    name: str | None = None
    weight: float = 1.0
    format: str = "auto"
    split: str = "train"  # the split name for HF ``load_dataset``
    streaming: bool = False
    base_dir: str | None = None


@dataclass
class ImageConfig:
    """Pixel limits per image after smart_resize (factor 32). None = the model dir's processor
    config (Qwen3-VL: 65,536 to 16,777,216)."""

    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclass
class VideoConfig:
    """Frame sampling and pixel budgets. None = the model dir's video processor config.

    min_pixels / max_pixels bound all sampled frames together (t*h*w, as transformers does);
    max_frame_pixels caps each frame; max_visual_tokens caps one sample's visual tokens (images
    and videos): videos shrink (pixels per frame, then frames) to fit, so long videos cannot OOM
    (complaint: video OOM and frame-budget confusion). See qvl_train.data.media for the rule.
    """

    fps: float | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    min_frame_pixels: int | None = None
    max_frame_pixels: int | None = None
    max_visual_tokens: int | None = None


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    # Explicit evaluation sets. When empty, eval_fraction of every train dataset is held out.
    eval_datasets: list[DatasetConfig] = field(default_factory=list)
    eval_fraction: float = 0.0
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    # Longest encoded sample. The encoder truncates longer ones at a media boundary and raises
    # BadSample("too_long") only when no trained token would be left.
    max_length: int = 4096
    packing: bool = True
    # Tokens per batch (B * L slots). Packed: rows of max_length, B = tokens_per_batch //
    # max_length (at least 1). Not packed: as many samples as fit when padded to the longest.
    tokens_per_batch: int = 8192
    buffer_size: int = 64  # samples encoded together before packing / length grouping
    shuffle_buffer: int = 1024  # streaming datasets only: records in the shuffle buffer
    pad_to_multiple_of: int = 1
    num_workers: int = 0
    prefetch: int = 2  # batches prefetched per worker (only with num_workers > 0)
    # A worker that produces nothing for this long raises instead of hanging the run. It must cover
    # encoding one buffer (buffer_size samples, e.g. long videos). 0 disables it.
    worker_timeout_s: float = 900.0
    seed: int = 0
    shuffle: bool = True
    on_bad_sample: str = "error"
    train_on_prompt: bool = False

    def media_options(self) -> dict[str, Any]:
        """Keyword options for ``encode_sample`` (MediaConfig field names; unset ones omitted)."""
        names = {
            "image_min_pixels": self.image.min_pixels,
            "image_max_pixels": self.image.max_pixels,
            "fps": self.video.fps,
            "min_frames": self.video.min_frames,
            "max_frames": self.video.max_frames,
            "video_min_pixels": self.video.min_pixels,
            "video_max_pixels": self.video.max_pixels,
            "video_min_frame_pixels": self.video.min_frame_pixels,
            "video_max_frame_pixels": self.video.max_frame_pixels,
            "max_visual_tokens": self.video.max_visual_tokens,
        }
        options = {k: v for k, v in names.items() if v is not None}
        return {**options, "max_length": self.max_length, "train_on_prompt": self.train_on_prompt}


def validate(cfg: DataConfig) -> None:
    """Raise ValueError for user mistakes, naming the key and the fix."""
    if not cfg.datasets:
        raise ValueError("data.datasets is empty: add at least one {path: ..., weight: ...} entry.")
    for i, ds in enumerate([*cfg.datasets, *cfg.eval_datasets]):
        if ds.weight < 0:
            raise ValueError(f"dataset #{i} ({ds.path}) has weight {ds.weight}: weights must be >= 0.")
        if ds.format not in DATASET_FORMATS:
            raise ValueError(f"dataset #{i} ({ds.path}) has format {ds.format!r}: use one of {DATASET_FORMATS}.")
    if cfg.on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"data.on_bad_sample={cfg.on_bad_sample!r}: use one of {BAD_SAMPLE_POLICIES}.")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction={cfg.eval_fraction}: use a fraction in [0, 1).")
    if cfg.max_length <= 0 or cfg.tokens_per_batch <= 0:
        raise ValueError("data.max_length and data.tokens_per_batch must be positive.")
    if cfg.tokens_per_batch < cfg.max_length:
        raise ValueError(
            f"data.tokens_per_batch={cfg.tokens_per_batch} < data.max_length={cfg.max_length}: a "
            "sample of max_length would not fit in a batch; raise tokens_per_batch or lower max_length."
        )
    if (
        cfg.buffer_size < 1
        or cfg.shuffle_buffer < 1
        or cfg.num_workers < 0
        or cfg.prefetch < 1
        or cfg.pad_to_multiple_of < 1
        or cfg.worker_timeout_s < 0
    ):
        raise ValueError(
            "data.buffer_size, data.shuffle_buffer, data.prefetch, data.pad_to_multiple_of must be >= 1; "
            "data.num_workers and data.worker_timeout_s >= 0."
        )


def register_configs() -> None:
    """Register the schema as ``data/schema`` so YAML files in configs/data can extend it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="data", name="schema", node=DataConfig)


register_configs()  # importing the schema makes configs/data/*.yaml composable (they extend data/schema)


def load_data_config(name: str, overrides: list[str] | None = None) -> DataConfig:
    """Compose configs/data/<name>.yaml (with ``data.key=value`` overrides) into a DataConfig."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(overrides=[f"+data={name}", *(overrides or [])])
    return OmegaConf.to_object(cfg.data)
