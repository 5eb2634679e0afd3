"""Multimodal data pipeline: tokenizer, media decoding, sample encoding."""

from qvl_train.data.encode import IGNORE_INDEX, encode_sample, to_messages
from qvl_train.data.media import BadSample, MediaConfig
from qvl_train.data.tokenizer import build_tiny_tokenizer, load_tokenizer, write_processor_configs

# Sources, configuration, packing and the loader (the data-pipeline side).
from qvl_train.data.config import DataConfig, DatasetConfig, ImageConfig, VideoConfig, load_data_config, register_configs
from qvl_train.data.loader import MixtureLoader, SampleEncoder, build_loader
from qvl_train.data.packing import collate, model_inputs, plan_batches
from qvl_train.data.sources import Mixture, RawSample, Shard, build_mixture, open_source

__all__ = [
    "BadSample",
    "DataConfig",
    "DatasetConfig",
    "IGNORE_INDEX",
    "ImageConfig",
    "MediaConfig",
    "Mixture",
    "MixtureLoader",
    "RawSample",
    "SampleEncoder",
    "Shard",
    "VideoConfig",
    "build_loader",
    "build_mixture",
    "build_tiny_tokenizer",
    "collate",
    "encode_sample",
    "load_data_config",
    "load_tokenizer",
    "model_inputs",
    "open_source",
    "plan_batches",
    "register_configs",
    "to_messages",
    "write_processor_configs",
]
