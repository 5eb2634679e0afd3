"""The processor files an export carries mean to transformers what the media settings meant to
training: transformers' own Qwen2VLImageProcessorPil (built from the written file) and
Qwen3VLVideoProcessor's frame sampling and token count (its methods run on the written values:
the class itself cannot be instantiated without torchvision) against qvl_train.data.media."""

import dataclasses
import json
import types

import numpy as np
import pytest
from PIL import Image

from qvl_train.checkpoint import serving
from qvl_train.data.media import MediaConfig, VideoInfo, plan_video, process_image

DEMO = MediaConfig(image_min_pixels=8192, image_max_pixels=20480, fps=2.0, min_frames=4, max_frames=8,
                   video_min_pixels=4096, video_max_pixels=32768, video_max_frame_pixels=4096, max_visual_tokens=64)
# a per-frame cap where transformers' floor (1.05 x 4096 px) never binds: 4300 <= min(8192, 131072 // 16)
CAPPED = dataclasses.replace(MediaConfig(), video_min_pixels=4096, video_max_pixels=131072, video_max_frame_pixels=8192,
                             max_frames=16)
VIDEOS = [(48, 24.0, 64, 64), (240, 30.0, 360, 640), (21, 10.0, 100, 180), (600, 25.0, 720, 1280), (9, 3.0, 40, 300)]


@pytest.mark.parametrize("media", [MediaConfig(), CAPPED], ids=["uncapped", "capped"])
def test_video_file_samples_and_sizes_as_training(media):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    _, video = serving.processor_configs(media)
    written = types.SimpleNamespace(**json.loads(json.dumps(video)))  # what from_pretrained would read
    for total, fps, h, w in VIDEOS:
        plan = plan_video(VideoInfo(None, False, total, fps, h, w), media)
        indices = Qwen3VLVideoProcessor.sample_frames(written, VideoMetadata(total_num_frames=total, fps=fps, width=w, height=h))
        assert plan.indices == indices.tolist()
        t, gh, gw = plan.grid_thw(media)
        assert Qwen3VLVideoProcessor.get_num_of_video_patches(written, plan.num_frames, h, w) == t * gh * gw


def test_image_file_resizes_as_training(tmp_path):
    from transformers import AutoImageProcessor

    image, _ = serving.processor_configs(DEMO)
    (tmp_path / serving.IMAGE_PROCESSOR_FILE).write_text(json.dumps(image))
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    for h, w in [(64, 96), (128, 96), (300, 40), (1000, 1000)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = process_image(img, DEMO)
        theirs = processor(images=[img], return_tensors="np")
        assert tuple(theirs["image_grid_thw"][0]) == ours.grid_thw
        np.testing.assert_array_equal(theirs["pixel_values"], ours.pixel_values)


def test_settings_files_cannot_carry_are_named_and_the_rest_reads_back(tmp_path):
    notes = serving.untranslated_settings(DEMO)
    assert any("max_visual_tokens=64" in n for n in notes) and any("max_frame_pixels=4096" in n for n in notes)
    assert serving.untranslated_settings(MediaConfig()) == []
    image, video = serving.processor_configs(DEMO)
    (tmp_path / serving.IMAGE_PROCESSOR_FILE).write_text(json.dumps(image))
    (tmp_path / serving.VIDEO_PROCESSOR_FILE).write_text(json.dumps(video))
    # what launch/export.py and chat.py read back from an export: all but the per-sample budget
    back = serving.media_from_export(tmp_path)
    assert dataclasses.replace(back, source="defaults") == dataclasses.replace(DEMO, max_visual_tokens=None)
