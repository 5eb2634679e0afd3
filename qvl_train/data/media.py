"""Image and video decoding, Qwen3-VL resizing and patchify.

Design choices
- Images match transformers' Qwen2-VL image processor numerically. AutoImageProcessor picks
  Qwen2VLImageProcessorPil for Qwen3-VL when torchvision is absent (our CPU setup), so the
  reference is: convert to RGB (alpha composited onto white), PIL bicubic resize to
  smart_resize(factor 32), rescale 1/255 in float64 -> float32, (x - mean) / std in float32.
  The last two steps are defined by a 256-entry lookup table built with exactly those dtype
  steps; where u8 / a - b in float32 reproduces that table for every byte (checked once per
  config; true for Qwen's 0.5/0.5) it is computed that way, else by gathering from the table. (The torchvision "fast"
  processor resizes with torchvision's bicubic; its values differ slightly from PIL's.)
- EXIF orientation is applied on decode (the transformers processor does not; we feed it the
  transposed image in tests).
- Patchify is one reshape/transpose on uint8, then the normalisation (no per-patch Python
  loop): rows are patches in merge-block order (t, h/2, w/2, 2, 2), each flattened as
  (C, T=2, 16, 16). An image is the T=2 case with its frame repeated (normalised once, then
  broadcast-copied into both temporal slots).
- Videos (PyAV): frames sampled as transformers' Qwen3VLVideoProcessor.sample_frames does
  (fps default 2, n = int(total / video_fps * fps) clamped to [min_frames, max_frames] and to the
  frame count, indices = linspace(0, total-1, n).round()); an odd count repeats the last frame;
  resize = the video smart_resize (pixel limits on t*h*w) then PIL bicubic per frame (transformers
  uses torchvision's bicubic here: same sizes and layout, slightly different pixel values).
  Timestamps are Qwen3VLProcessor._calculate_timestamps: mean of each temporal pair's idx/fps.
  A list of frame images is a video whose frames were taken at the element's "fps" (default
  2.0, as qwen-vl-utils assumes); all of its frames are used up to max_frames.
  A one-frame video is repeated to two frames (transformers raises on it).
- Budgets. `video_max_frame_pixels` caps each frame's pixels (total cap = cap * frames).
  `max_visual_tokens` caps one sample's visual tokens (images + videos); images are never
  shrunk. When videos do not fit: (1) every video gets the same per-frame pixel allowance
  p = remaining_tokens * 32*32 * 2 / total_padded_frames, if p >= `video_min_frame_pixels`;
  (2) otherwise, or if rounding still overflows, frames are held at `video_min_frame_pixels`
  and the video with most tokens loses 2 sampled frames (resampled with linspace) until it
  fits; (3) if every video is down to 2 frames and it still does not fit -> BadSample("too_long").
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# ---- errors ---------------------------------------------------------------------------------


class BadSample(ValueError):
    """A sample that cannot be encoded. `reason` is a short machine-readable code.

    Codes: bad_json, bad_format, unknown_content_type, no_assistant_turn, placeholder_mismatch,
    missing_media, corrupt_media, too_long. The loader catches this, adds file and line, and
    applies its skip policy.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"[{reason}] {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.reason, self.message))


# ---- config ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaConfig:
    """Image/video preprocessing options. Defaults are Qwen3-VL's published image values and
    transformers' Qwen3VLVideoProcessor defaults; a model dir's processor configs override them."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_min_pixels: int = 65_536
    image_max_pixels: int = 16_777_216
    # Video pixel limits apply to t * h * w (all sampled frames together), as in transformers.
    video_min_pixels: int = 128 * 32 * 32
    video_max_pixels: int = 768 * 32 * 32
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    video_max_frame_pixels: int | None = None
    video_min_frame_pixels: int = 128 * 128
    max_visual_tokens: int | None = None
    # Where the defaults came from (for error messages); not an option.
    source: str = field(default="defaults", compare=False)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def tokens_per_pixel_block(self) -> int:
        return self.factor * self.factor

    def replace(self, **changes: Any) -> "MediaConfig":
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike | None, **overrides: Any) -> "MediaConfig":
        return _config_from_dir(str(model_dir) if model_dir else "").replace(**overrides)


@functools.lru_cache(maxsize=16)
def _config_from_dir(model_dir: str) -> MediaConfig:
    cfg: dict[str, Any] = {}
    image = _read_json(Path(model_dir) / "preprocessor_config.json") if model_dir else None
    video = _read_json(Path(model_dir) / "video_preprocessor_config.json") if model_dir else None
    if image:
        cfg.update(_common_fields(image))
        lo, hi = _pixel_limits(image, MediaConfig.image_min_pixels, MediaConfig.image_max_pixels)
        cfg["image_min_pixels"], cfg["image_max_pixels"] = lo, hi
    if video:
        lo, hi = _pixel_limits(video, MediaConfig.video_min_pixels, MediaConfig.video_max_pixels)
        cfg["video_min_pixels"], cfg["video_max_pixels"] = lo, hi
        for key in ("fps", "min_frames", "max_frames"):
            if video.get(key) is not None:
                cfg[key] = video[key]
    if image or video:
        cfg["source"] = model_dir
    return MediaConfig(**cfg)


def _pixel_limits(d: dict, lo: int, hi: int) -> tuple[int, int]:
    # Old configs spell them min_pixels/max_pixels; new ones size.shortest_edge/longest_edge.
    size = d.get("size") or {}
    return (
        int(d.get("min_pixels") or size.get("shortest_edge") or lo),
        int(d.get("max_pixels") or size.get("longest_edge") or hi),
    )


def _common_fields(d: dict) -> dict:
    out = {}
    for key in ("patch_size", "merge_size", "temporal_patch_size", "rescale_factor"):
        if d.get(key) is not None:
            out[key] = d[key]
    for key in ("image_mean", "image_std"):
        if d.get(key) is not None:
            v = d[key]
            out[key] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
    return out


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text())


# ---- smart resize (copied rules from transformers) ------------------------------------------


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65_536, max_pixels: int = 16_777_216):
    """Image resize target, exactly transformers' qwen2_vl smart_resize."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int = 2,
    factor: int = 32,
    min_pixels: int = 128 * 32 * 32,
    max_pixels: int = 768 * 32 * 32,
):
    """Video resize target, exactly transformers' qwen3_vl video smart_resize (limits on t*h*w)."""
    if num_frames < temporal_factor:
        raise ValueError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---- image decode ---------------------------------------------------------------------------


def resolve_path(ref: str | os.PathLike, base_dir: str | os.PathLike | None) -> Path:
    s = os.fspath(ref)
    if s.startswith("file://"):
        s = s[len("file://") :]
    p = Path(s).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return p


def _data_uri_bytes(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or ";base64" not in header:
        raise BadSample("corrupt_media", "data URI must look like 'data:image/png;base64,<payload>'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadSample("corrupt_media", f"data URI payload is not valid base64 ({e})") from None


def media_bytes_or_path(src: Any, base_dir: str | os.PathLike | None, what: str) -> bytes | Path:
    """Normalise a media reference to raw bytes or an existing file path (BadSample otherwise)."""
    if isinstance(src, dict):  # HF datasets Image feature: {"bytes": ..., "path": ...}
        src = src.get("bytes") or src.get("path")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        if s.startswith("data:"):
            return _data_uri_bytes(s)
        if s.startswith(("http://", "https://")):
            raise BadSample("missing_media", f"{what} {s!r} is a URL; download it and use a local path")
        p = resolve_path(s, base_dir)
        if not p.is_file():
            raise BadSample("missing_media", f"{what} file not found: {p} (relative paths resolve against base_dir)")
        return p
    raise BadSample("bad_format", f"{what} must be a path, bytes or data URI, got {type(src).__name__}")


def load_image(src: Any, base_dir: str | os.PathLike | None = None) -> Image.Image:
    """Decode to an RGB PIL image with EXIF orientation applied. `src`: path | bytes | data URI | PIL."""
    if isinstance(src, Image.Image):
        img = src
        owned = False
    else:
        data = media_bytes_or_path(src, base_dir, "image")
        try:
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            name = "bytes" if isinstance(data, bytes) else str(data)
            raise BadSample("corrupt_media", f"cannot decode image {name}: {e}") from None
        owned = True
    try:
        if img.getexif().get(0x0112, 1) != 1:  # orientation tag; skip the copy when upright
            img = ImageOps.exif_transpose(img)
    except Exception as e:  # a malformed EXIF block is a property of the file
        raise BadSample("corrupt_media", f"bad EXIF data in image: {e}") from None
    rgb = to_rgb(img)
    if rgb is img and not owned:
        rgb = img.copy()
    return rgb


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB conversion as transformers does it: transparency composited onto white."""
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# ---- patchify -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _lut(rescale_factor: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: the rescale+normalise result for each byte value, per channel.

    Same dtype steps as transformers' numpy path: float64 * scale -> float32, then (x-mean)/std
    in float32. This table is the definition of "bit-identical"; _affine checks against it.
    """
    x = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    return np.stack([(x - np.float32(m)) / np.float32(s) for m, s in zip(mean, std)])


def _affine_apply(pixels_u8: np.ndarray, div: Any, sub: Any) -> np.ndarray:
    out = np.divide(pixels_u8, div, dtype=np.float32)
    return np.subtract(out, sub, out=out)


@functools.lru_cache(maxsize=8)
def _affine(rescale_factor: float, mean: tuple[float, ...], std: tuple[float, ...]):
    """float32 (div, sub) per channel with u8 / div - sub == the lookup table for all 256 bytes, or None.

    Two SIMD float32 passes are ~3x faster than numpy's gather (which first widens every uint8
    index to intp). For (x/255 - 0.5)/0.5 they are exact: dividing by 127.5 is x/255 scaled by
    an exact power of two. Used only when verified exact here, byte by byte and per channel.
    """
    lut = _lut(rescale_factor, mean, std)
    div = (np.asarray(std, np.float64) / rescale_factor).astype(np.float32)  # u * scale / std
    sub = (np.asarray(mean, np.float64) / np.asarray(std, np.float64)).astype(np.float32)
    every_byte = np.arange(256, dtype=np.uint8)[None, :]
    if np.array_equal(_affine_apply(every_byte, div[:, None], sub[:, None]), lut):
        return div, sub
    return None


def normalise(pixels_u8: np.ndarray, cfg: MediaConfig, channel_axis: int = -1) -> np.ndarray:
    """uint8 -> float32 rescaled and normalised, bit-identical to the lookup table."""
    stats = (cfg.rescale_factor, tuple(cfg.image_mean), tuple(cfg.image_std))
    channel_axis %= pixels_u8.ndim
    affine = _affine(*stats)
    if affine is not None:
        div, sub = affine
        if np.all(div == div[0]) and np.all(sub == sub[0]):
            return _affine_apply(pixels_u8, div[0], sub[0])
        shape = (-1,) + (1,) * (pixels_u8.ndim - 1 - channel_axis)  # broadcast along the channel axis
        return _affine_apply(pixels_u8, div.reshape(shape), sub.reshape(shape))
    lut = _lut(*stats)
    if np.all(lut == lut[:1]):
        return lut[0][pixels_u8]
    out = np.empty(pixels_u8.shape, np.float32)
    for c in range(pixels_u8.shape[channel_axis]):
        index = (slice(None),) * channel_axis + (c,)
        out[index] = lut[c][pixels_u8[index]]
    return out


def patchify(frames_THWC: np.ndarray, cfg: MediaConfig, repeat: int = 1) -> np.ndarray:
    """uint8 frames (T, H, W, C) -> float32 (N, C*2*16*16); each frame used `repeat` times.

    T * repeat must be even and H, W multiples of 32. The layout change runs on uint8 (a quarter
    of the bytes of float32), then each byte is normalised once; an image repeated into its 2
    temporal slots is normalised once and broadcast-copied into both.
    """
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    x = frames_THWC
    if repeat > 1 and not (x.shape[0] == 1 and repeat == tp):
        x, repeat = np.repeat(x, repeat, axis=0), 1  # general case: materialise (uint8, cheap)
    T, H, W, C = x.shape
    frames_per_patch = tp if repeat == 1 else 1  # 1: a single frame fills all tp slots
    gt, gh, gw = T * repeat // tp, H // p, W // p
    x = x.reshape(gt, frames_per_patch, gh // m, m, p, gw // m, m, p, C)
    # -> (gt, gh/m, gw/m, m, m, C, tp, p, p): merge-block order, each patch as (C, T, ph, pw)
    x = np.ascontiguousarray(x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7))
    values = normalise(x, cfg, channel_axis=5)
    if frames_per_patch != tp:
        out = np.empty((*values.shape[:6], tp, p, p), np.float32)
        out[...] = values  # broadcast over the tp slots
        values = out
    return values.reshape(gt * gh * gw, C * tp * p * p)


def grid_tokens(grid_thw: tuple[int, int, int], merge_size: int) -> int:
    t, h, w = grid_thw
    return t * h * w // (merge_size * merge_size)


@dataclass
class ImageItem:
    pixel_values: np.ndarray  # (N, 1536) float32
    grid_thw: tuple[int, int, int]
    num_tokens: int


def image_target_size(width: int, height: int, cfg: MediaConfig) -> tuple[int, int]:
    """(height, width) after smart_resize; BadSample on an impossible aspect ratio."""
    try:
        return smart_resize(height, width, cfg.factor, cfg.image_min_pixels, cfg.image_max_pixels)
    except (ValueError, ZeroDivisionError) as e:
        raise BadSample("corrupt_media", f"image of {width}x{height} cannot be used: {e}") from None


def process_image(img: Image.Image, cfg: MediaConfig) -> ImageItem:
    """RGB PIL image -> patches and grid (matches Qwen2VLImageProcessorPil)."""
    h, w = image_target_size(img.width, img.height, cfg)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    grid = (1, h // cfg.patch_size, w // cfg.patch_size)
    pixels = patchify(np.asarray(img)[None], cfg, repeat=cfg.temporal_patch_size)
    return ImageItem(pixels, grid, grid_tokens(grid, cfg.merge_size))


# ---- video ----------------------------------------------------------------------------------


@dataclass
class VideoInfo:
    """What is known about a video before decoding it."""

    source: Any  # Path | bytes (file) or list of frame refs
    is_frame_list: bool
    total_frames: int
    video_fps: float
    height: int
    width: int


@dataclass
class VideoPlan:
    info: VideoInfo
    indices: list[int]  # sampled frame indices (before padding to even)
    height: int  # resized
    width: int
    frame_pixels_cap: int | None  # per-frame pixel cap used to make this plan

    @property
    def num_frames(self) -> int:
        return len(self.indices)

    @property
    def padded_frames(self) -> int:
        return self.num_frames + (-self.num_frames % 2)

    def grid_thw(self, cfg: MediaConfig) -> tuple[int, int, int]:
        p = cfg.patch_size
        return (self.padded_frames // cfg.temporal_patch_size, self.height // p, self.width // p)

    def num_tokens(self, cfg: MediaConfig) -> int:
        return grid_tokens(self.grid_thw(cfg), cfg.merge_size)

    def timestamps(self, cfg: MediaConfig) -> list[float]:
        return calculate_timestamps(self.indices, self.info.video_fps, cfg.temporal_patch_size)


def calculate_timestamps(indices: list[int], video_fps: float, merge_size: int = 2) -> list[float]:
    """Exactly transformers' Qwen3VLProcessor._calculate_timestamps."""
    indices = list(indices)
    if len(indices) % merge_size != 0:
        indices.extend(indices[-1] for _ in range(merge_size - len(indices) % merge_size))
    timestamps = [idx / video_fps for idx in indices]
    return [(timestamps[i] + timestamps[i + merge_size - 1]) / 2 for i in range(0, len(timestamps), merge_size)]


def sample_indices(total_frames: int, video_fps: float, cfg: MediaConfig, fps: float | None = None) -> list[int]:
    """transformers' Qwen3VLVideoProcessor.sample_frames (fps-based)."""
    fps = cfg.fps if fps is None else fps
    n = int(total_frames / video_fps * fps)
    n = min(max(n, cfg.min_frames), cfg.max_frames, total_frames)
    return linspace_indices(total_frames, n)


def linspace_indices(total_frames: int, n: int) -> list[int]:
    return np.linspace(0, total_frames - 1, n).round().astype(int).tolist()


def probe_video(src: Any, base_dir: str | os.PathLike | None, frame_list_fps: float | None = None) -> VideoInfo:
    """Frame count, fps and size without decoding. `src`: path/bytes/data URI or a list of frames."""
    if isinstance(src, (list, tuple)):
        if not src:
            raise BadSample("corrupt_media", "video frame list is empty")
        first = load_image(src[0], base_dir)
        fps = float(frame_list_fps) if frame_list_fps else 2.0
        return VideoInfo(list(src), True, len(src), fps, first.height, first.width)
    data = media_bytes_or_path(src, base_dir, "video")
    import av

    try:
        with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as container:
            if not container.streams.video:
                raise BadSample("corrupt_media", f"no video stream in {_name(data)}")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            total = int(stream.frames or 0)
            if total <= 0:  # some containers do not store a frame count: count packets instead
                total = sum(1 for pkt in container.demux(stream) if pkt.size)
            height, width = stream.height, stream.width
    except av.error.FFmpegError as e:
        raise BadSample("corrupt_media", f"cannot open video {_name(data)}: {e}") from None
    if total <= 0 or height <= 0 or width <= 0:
        raise BadSample("corrupt_media", f"video {_name(data)} has no frames")
    if fps <= 0:
        fps = 24.0  # transformers' fallback when fps is unknown
    return VideoInfo(data, False, total, fps, height, width)


def _name(data: bytes | Path) -> str:
    return "<bytes>" if isinstance(data, bytes) else str(data)


def plan_video(
    info: VideoInfo,
    cfg: MediaConfig,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    frame_pixels_cap: int | None = None,
) -> VideoPlan:
    """Choose frame indices and the resized size for one video."""
    if num_frames is not None:
        indices = linspace_indices(info.total_frames, num_frames)
    elif info.is_frame_list:
        indices = linspace_indices(info.total_frames, min(info.total_frames, cfg.max_frames))
    else:
        indices = sample_indices(info.total_frames, info.video_fps, cfg, fps)
    cap = frame_pixels_cap if frame_pixels_cap is not None else cfg.video_max_frame_pixels
    h, w = _video_size(info, len(indices), cap, cfg)
    return VideoPlan(info, indices, h, w, cap)


def _video_size(info: VideoInfo, num_frames: int, cap: int | None, cfg: MediaConfig) -> tuple[int, int]:
    n = max(num_frames, cfg.temporal_patch_size)  # a 1-frame video is repeated to 2 frames
    max_pixels = cfg.video_max_pixels if cap is None else min(cfg.video_max_pixels, cap * n)
    min_pixels = min(cfg.video_min_pixels, max_pixels)
    try:
        return smart_resize_video(
            n, info.height, info.width, cfg.temporal_patch_size, cfg.factor, min_pixels, max_pixels
        )
    except (ValueError, ZeroDivisionError) as e:
        raise BadSample("corrupt_media", f"video of {info.width}x{info.height} cannot be used: {e}") from None


def fit_visual_budget(fixed_tokens: int, plans: list[VideoPlan], cfg: MediaConfig) -> list[VideoPlan]:
    """Shrink videos so images + videos fit cfg.max_visual_tokens (rule in the module docstring)."""
    budget = cfg.max_visual_tokens
    if budget is None:
        return plans

    def total(ps: list[VideoPlan]) -> int:
        return fixed_tokens + sum(p.num_tokens(cfg) for p in ps)

    if total(plans) <= budget:
        return plans
    if fixed_tokens > budget:
        raise BadSample(
            "too_long",
            f"images need {fixed_tokens} visual tokens, over max_visual_tokens={budget}; "
            "raise max_visual_tokens or lower image_max_pixels",
        )
    # Step 1: one per-frame pixel allowance for all videos.
    frames = sum(p.padded_frames for p in plans)
    allowance = (budget - fixed_tokens) * cfg.tokens_per_pixel_block * cfg.temporal_patch_size // frames
    if allowance >= cfg.video_min_frame_pixels:
        shrunk = [_replan(p, cfg, cap=_tighter(p, allowance)) for p in plans]
        if total(shrunk) <= budget:
            return shrunk
    # Step 2: floor resolution, then drop frames from the most expensive video.
    floor = cfg.video_min_frame_pixels
    ps = [_replan(p, cfg, cap=_tighter(p, floor)) for p in plans]
    while total(ps) > budget:
        candidates = [i for i, p in enumerate(ps) if p.num_frames > cfg.temporal_patch_size]
        if not candidates:
            raise BadSample(
                "too_long",
                f"videos do not fit max_visual_tokens={budget} even at 2 frames of "
                f"{floor} pixels; raise max_visual_tokens or lower video_min_frame_pixels",
            )
        j = max(candidates, key=lambda i: (ps[i].num_tokens(cfg), -i))
        n = ps[j].padded_frames - cfg.temporal_patch_size
        ps[j] = _replan(ps[j], cfg, cap=ps[j].frame_pixels_cap, num_frames=n)
    return ps


def _tighter(p: VideoPlan, cap: int) -> int:
    return cap if p.frame_pixels_cap is None else min(cap, p.frame_pixels_cap)


def _replan(p: VideoPlan, cfg: MediaConfig, *, cap: int | None, num_frames: int | None = None) -> VideoPlan:
    if num_frames is None:  # same frames, new size
        h, w = _video_size(p.info, p.num_frames, cap, cfg)
        return VideoPlan(p.info, p.indices, h, w, cap)
    return plan_video(p.info, cfg, num_frames=min(num_frames, p.info.total_frames), frame_pixels_cap=cap)


def decode_video(plan: VideoPlan, base_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Decode the planned frames, resized: uint8 (T_even, h, w, 3)."""
    size = (plan.width, plan.height)
    if plan.info.is_frame_list:
        frames = [_resize(load_image(plan.info.source[i], base_dir), size) for i in plan.indices]
    else:
        frames = _decode_file_frames(plan, size)
    if len(frames) % 2:
        frames.append(frames[-1])
    return np.stack(frames)


def _resize(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    if img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img)


def _decode_file_frames(plan: VideoPlan, size: tuple[int, int]) -> list[np.ndarray]:
    import av

    wanted = set(plan.indices)
    last = max(plan.indices)
    got: dict[int, np.ndarray] = {}
    data = plan.info.source
    try:
        with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    got[i] = _resize(frame.to_image(), size)
                if i >= last:
                    break
    except av.error.FFmpegError as e:
        raise BadSample("corrupt_media", f"cannot decode video {_name(data)}: {e}") from None
    if not got:
        raise BadSample("corrupt_media", f"video {_name(data)} decoded no frames")
    # A container that promises more frames than it decodes: repeat the last decoded frame.
    out, prev = [], None
    for i in plan.indices:
        prev = got.get(i, prev if prev is not None else next(iter(got.values())))
        out.append(prev)
    return out


@dataclass
class VideoItem:
    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    num_tokens: int
    timestamps: list[float]


def process_video(plan: VideoPlan, cfg: MediaConfig, base_dir: str | os.PathLike | None = None) -> VideoItem:
    frames = decode_video(plan, base_dir)
    grid = plan.grid_thw(cfg)
    return VideoItem(patchify(frames, cfg), grid, grid_tokens(grid, cfg.merge_size), plan.timestamps(cfg))
