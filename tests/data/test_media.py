"""Media decoding, smart_resize, patchify and video sampling vs transformers' Qwen3-VL processors."""

import base64
import io
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers.models.qwen2_vl.image_processing_pil_qwen2_vl as ref_image  # noqa: E402
import transformers.models.qwen3_vl.video_processing_qwen3_vl as ref_video  # noqa: E402
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor  # noqa: E402
from transformers.video_utils import VideoMetadata  # noqa: E402

from qvl_train.data import media  # noqa: E402
from qvl_train.data.media import (  # noqa: E402
    BadSample,
    MediaConfig,
    calculate_timestamps,
    decode_video,
    fit_visual_budget,
    load_image,
    patchify,
    plan_video,
    probe_video,
    process_image,
    process_video,
    sample_indices,
    smart_resize,
    smart_resize_video,
)
from qvl_train.data.tokenizer import write_processor_configs  # noqa: E402

from .clips import write_clip

CFG = MediaConfig()


def reference_image_processor(**kw):
    return ref_image.Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": kw.pop("min_pixels", 65_536), "longest_edge": kw.pop("max_pixels", 16_777_216)},
    )


def random_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)




# ---- smart_resize -------------------------------------------------------------------------


def test_smart_resize_equals_transformers():
    sizes = [(48, 64), (33, 47), (1000, 20), (720, 1280), (5000, 4000), (31, 31), (4000, 30)]
    for h, w in sizes:
        for lo, hi in [(65_536, 16_777_216), (1024, 200_000), (4096, 50_000)]:
            assert smart_resize(h, w, 32, lo, hi) == ref_image.smart_resize(h, w, 32, lo, hi)
    with pytest.raises(ValueError):
        smart_resize(10, 2500)


def test_video_smart_resize_equals_transformers():
    for t in (2, 3, 5, 16, 768):
        for h, w in [(48, 64), (20, 90), (720, 1280), (1080, 1920)]:
            for lo, hi in [(131_072, 786_432), (4096, 25_165_824)]:
                assert smart_resize_video(t, h, w, 2, 32, lo, hi) == ref_video.smart_resize(t, h, w, 2, 32, lo, hi)


# ---- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("size", [(64, 48), (97, 203), (300, 41)])
def test_process_image_equals_transformers(size, mode):
    img = random_image(*size, mode=mode, seed=size[0])
    rgb = load_image(img)
    ours = process_image(rgb, CFG)
    ref = reference_image_processor()(images=[img], return_tensors="np")
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    assert ours.pixel_values.dtype == np.float32
    np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)
    assert ours.num_tokens == np.prod(ours.grid_thw) // 4


def test_downscale_branch_equals_transformers():
    img = random_image(400, 260, seed=3)
    cfg = CFG.replace(image_min_pixels=1024, image_max_pixels=128 * 96)
    ours = process_image(load_image(img), cfg)
    ref = reference_image_processor(min_pixels=1024, max_pixels=128 * 96)(images=[img], return_tensors="np")
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)


def test_patchify_layout_is_merge_block_order():
    # A frame whose value encodes (row, col) shows where every pixel lands.
    H, W = 64, 96
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    frame = np.stack([rows, cols, (rows + cols) % 256], -1).astype(np.uint8)
    cfg = CFG.replace(rescale_factor=1.0, image_mean=(0.0,) * 3, image_std=(1.0,) * 3)
    out = patchify(frame[None], cfg, repeat=2)
    assert out.shape == (H // 16 * W // 16, 3 * 2 * 16 * 16)
    patch = out.reshape(-1, 3, 2, 16, 16)
    # Row 1 is the second patch of the first 2x2 merge block: patch (h=0, w=1).
    assert patch[1, 0, 0, 0, 0] == 0 and patch[1, 1, 0, 0, 0] == 16
    # Row 2 is patch (h=1, w=0); row 4 starts the next merge block, patch (h=0, w=2).
    assert patch[2, 0, 0, 0, 0] == 16 and patch[2, 1, 0, 0, 0] == 0
    assert patch[4, 0, 0, 0, 0] == 0 and patch[4, 1, 0, 0, 0] == 32
    assert np.array_equal(patch[:, :, 0], patch[:, :, 1])  # the image is tiled to 2 frames


def test_video_patchify_equals_transformers_patchify():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (4, 64, 96, 3), dtype=np.uint8)
    ours = patchify(frames, CFG)
    normalised = (frames.astype(np.float32) / 255 - 0.5) / 0.5
    videos = torch.from_numpy(normalised).permute(0, 3, 1, 2)[None].contiguous()  # (B, T, C, H, W)
    ref, gt, gh, gw = ref_video.Qwen3VLVideoProcessor.patchify(None, videos, 16, 2, 2)
    assert (gt, gh, gw) == (2, 4, 6)
    np.testing.assert_allclose(ours, ref[0].numpy(), rtol=0, atol=1e-6)


CLIP_STATS = {"image_mean": (0.48145466, 0.4578275, 0.40821073), "image_std": (0.26862954, 0.26130258, 0.27577711)}


@pytest.mark.parametrize("stats", [{}, {"image_mean": (0.5, 0.4, 0.3)}, CLIP_STATS, {"rescale_factor": 1.0}])
def test_patchify_is_bit_identical_to_lookup_then_transpose(stats):
    # The definition: transformers' dtype steps as a per-byte table, then the merge-block layout.
    # patchify may compute it arithmetically (when verified exact) or by gather; either way, equal.
    cfg = CFG.replace(**stats)
    lut = media._lut(cfg.rescale_factor, tuple(cfg.image_mean), tuple(cfg.image_std))
    rng = np.random.default_rng(2)
    for frames, repeat in [(rng.integers(0, 256, (1, 64, 96, 3), dtype=np.uint8), 2),
                           (rng.integers(0, 256, (4, 32, 64, 3), dtype=np.uint8), 1),
                           (rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8), 4)]:
        x = np.stack([lut[c][frames[..., c]] for c in range(3)], -1)
        x = np.repeat(x, repeat, axis=0)
        T, H, W, C = x.shape
        x = x.reshape(T // 2, 2, H // 32, 2, 16, W // 32, 2, 16, C).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
        expected = x.reshape(-1, C * 2 * 16 * 16)
        out = patchify(frames, cfg, repeat=repeat)
        assert out.dtype == np.float32 and out.flags.c_contiguous
        assert np.array_equal(out, expected)


def test_arithmetic_normalisation_is_used_only_when_exact():
    qwen = media._affine(CFG.rescale_factor, tuple(CFG.image_mean), tuple(CFG.image_std))
    assert qwen is not None  # Qwen's 1/255, 0.5, 0.5: the fast path
    div, sub = qwen
    every_byte = np.arange(256, dtype=np.uint8)
    assert np.array_equal(every_byte / div[0] - sub[0], media._lut(CFG.rescale_factor, (0.5,) * 3, (0.5,) * 3)[0])
    clip = CFG.replace(**CLIP_STATS)
    assert media._affine(clip.rescale_factor, clip.image_mean, clip.image_std) is None  # falls back to the table


# ---- image decoding -------------------------------------------------------------------------


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_path_bytes_and_data_uri_decode_identically(tmp_path):
    img = random_image(40, 30)
    (tmp_path / "a.png").write_bytes(_png_bytes(img))
    uri = "data:image/png;base64," + base64.b64encode(_png_bytes(img)).decode()
    a = np.asarray(load_image("a.png", tmp_path))
    b = np.asarray(load_image(_png_bytes(img)))
    c = np.asarray(load_image(uri))
    d = np.asarray(load_image(f"file://{tmp_path / 'a.png'}"))
    assert np.array_equal(a, np.asarray(img)) and np.array_equal(a, b) and np.array_equal(a, c) and np.array_equal(a, d)


def test_exif_orientation_is_applied():
    img = random_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    out = load_image(buf.getvalue())
    assert out.size == (20, 40)
    plain = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    assert np.array_equal(np.asarray(out), np.asarray(plain.transpose(Image.Transpose.ROTATE_270)))


@pytest.mark.parametrize(
    "src,reason",
    [
        ("nope.png", "missing_media"),
        ("http://example.com/a.png", "missing_media"),
        (b"not an image at all", "corrupt_media"),
        ("data:image/png;base64,@@@", "corrupt_media"),
        ("data:image/png,rawpayload", "corrupt_media"),
    ],
)
def test_bad_images_raise_bad_sample(tmp_path, src, reason):
    with pytest.raises(BadSample) as e:
        load_image(src, tmp_path)
    assert e.value.reason == reason and isinstance(e.value, ValueError)


def test_truncated_png_is_corrupt():
    data = _png_bytes(random_image(64, 64))
    with pytest.raises(BadSample) as e:
        load_image(data[: len(data) // 2])
    assert e.value.reason == "corrupt_media"


# ---- video ----------------------------------------------------------------------------------


def _colour_index(frame):
    return int(round(frame[0, 0, 0] / 10))


@pytest.mark.parametrize("container,codec", [("mkv", "ffv1"), ("mp4", "mpeg4")])
def test_probe_and_sampling_match_transformers(tmp_path, container, codec):
    path = write_clip(tmp_path / f"clip.{container}", codec=codec)
    info = probe_video(path.name, tmp_path)
    assert (info.total_frames, info.video_fps, info.height, info.width) == (16, 4.0, 48, 64)
    ns = types.SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    for fps in (0.5, 1, 2, 3, 4):
        md = VideoMetadata(total_num_frames=16, fps=4.0)
        ref = ref_video.Qwen3VLVideoProcessor.sample_frames(ns, md, fps=fps).tolist()
        assert sample_indices(16, 4.0, CFG, fps) == ref
        ts = Qwen3VLProcessor._calculate_timestamps(None, np.array(ref), 4.0, 2)
        assert calculate_timestamps(ref, 4.0) == ts


def test_decoded_frames_are_the_sampled_ones(tmp_path):
    path = write_clip(tmp_path / "clip.mkv")
    cfg = CFG.replace(video_min_pixels=1024)
    plan = plan_video(probe_video(path, None), cfg)  # 16 frames at 4 fps, sampled at 2 fps -> 8
    assert plan.indices == [0, 2, 4, 6, 9, 11, 13, 15]
    assert (plan.height, plan.width) == (64, 64)
    frames = decode_video(plan)
    assert frames.shape == (8, 64, 64, 3)
    assert [_colour_index(f) for f in frames] == plan.indices
    item = process_video(plan, cfg)
    assert item.grid_thw == (4, 4, 4) and item.num_tokens == 16
    assert item.pixel_values.shape == (64, 1536)
    assert item.timestamps == pytest.approx([0.25, 1.25, 2.5, 3.5])  # mean of (i/4, j/4) pairs


def test_odd_frame_count_repeats_last_frame(tmp_path):
    path = write_clip(tmp_path / "clip.mkv", n=10, fps=2)
    cfg = CFG.replace(video_min_pixels=1024, max_frames=5)
    plan = plan_video(probe_video(path, None), cfg)
    assert plan.num_frames == 5 and plan.padded_frames == 6
    frames = decode_video(plan)
    assert len(frames) == 6 and np.array_equal(frames[-1], frames[-2])
    assert plan.grid_thw(cfg)[0] == 3
    assert plan.timestamps(cfg) == Qwen3VLProcessor._calculate_timestamps(None, plan.indices, 2.0, 2)


def test_frame_list_video(tmp_path):
    paths = []
    for i in range(6):
        img = Image.new("RGB", (64, 48), (10 * i, 255 - 10 * i, 100))
        img.save(tmp_path / f"f{i}.png")
        paths.append(f"f{i}.png")
    info = probe_video(paths, tmp_path, frame_list_fps=1.0)
    assert (info.total_frames, info.video_fps) == (6, 1.0)
    plan = plan_video(info, CFG.replace(video_min_pixels=1024))
    assert plan.indices == list(range(6))  # a frame list keeps all its frames
    frames = decode_video(plan, tmp_path)
    assert [_colour_index(f) for f in frames] == list(range(6))
    assert plan.timestamps(CFG) == [0.5, 2.5, 4.5]


def test_bad_videos(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(BadSample) as e:
        probe_video("junk.mp4", tmp_path)
    assert e.value.reason == "corrupt_media"
    with pytest.raises(BadSample) as e:
        probe_video("missing.mp4", tmp_path)
    assert e.value.reason == "missing_media"


# ---- budgets --------------------------------------------------------------------------------


def _info(total=64, fps=4.0, h=480, w=640):
    from qvl_train.data.media import VideoInfo

    return VideoInfo("x", False, total, fps, h, w)


def test_per_frame_pixel_cap():
    cfg = CFG.replace(video_max_pixels=10**9, video_max_frame_pixels=128 * 96)
    plan = plan_video(_info(), cfg)
    assert plan.height * plan.width <= 128 * 96
    assert plan.num_frames == 32


def test_budget_shrinks_resolution_first():
    cfg = CFG.replace(max_visual_tokens=300, video_min_frame_pixels=64 * 64)
    before = plan_video(_info(), cfg)
    assert 100 + before.num_tokens(cfg) > 300
    (after,) = fit_visual_budget(100, [before], cfg)
    assert after.indices == before.indices  # frames kept
    assert after.height * after.width < before.height * before.width
    assert 100 + after.num_tokens(cfg) <= 300


def test_budget_then_drops_frames_and_finally_gives_up():
    cfg = CFG.replace(max_visual_tokens=40, video_min_frame_pixels=128 * 128)
    plans = [plan_video(_info(), cfg), plan_video(_info(total=40, fps=2.0), cfg)]
    out = fit_visual_budget(4, plans, cfg)
    assert 4 + sum(p.num_tokens(cfg) for p in out) <= 40
    assert all(p.height * p.width <= 128 * 128 for p in out)
    assert sum(p.num_frames for p in out) < sum(p.num_frames for p in plans)
    with pytest.raises(BadSample) as e:
        fit_visual_budget(4, plans, cfg.replace(max_visual_tokens=10))
    assert e.value.reason == "too_long"
    with pytest.raises(BadSample) as e:
        fit_visual_budget(50, [], cfg)
    assert e.value.reason == "too_long"


# ---- config ---------------------------------------------------------------------------------


def test_config_from_model_dir(tmp_path):
    assert MediaConfig.from_model_dir(None) == MediaConfig()
    write_processor_configs(tmp_path, image={"size": {"shortest_edge": 1024, "longest_edge": 4096}}, video={"fps": 1})
    cfg = MediaConfig.from_model_dir(tmp_path, max_frames=8)
    assert (cfg.image_min_pixels, cfg.image_max_pixels, cfg.fps, cfg.max_frames) == (1024, 4096, 1, 8)
    assert (cfg.video_min_pixels, cfg.video_max_pixels) == (128 * 32 * 32, 768 * 32 * 32)
