"""Images and video into a prompt: transformers' MiniMax-M3 processors -> MLX embeddings.

    processor = load_processor(model_path, tokenizer)          # once
    p = prepare(model, processor, prompt_text, images=["a.png", "b.jpg"], videos=["c.mp4"])
    for tok, _ in mlx_lm.generate.generate_step(p.input_ids, model, input_embeddings=p.embeddings): ...

`prompt_text` holds one image marker `]<]image[>[` per image and one video marker
`]<]video[>[` per video, in order (MiniMax-M3's chat template writes them for
{"type": "image"} / {"type": "video"} content parts). The processor (transformers'
MiniMaxM3VLProcessor with MiniMaxM3VLImageProcessor / MiniMaxM3VLVideoProcessor: their
resizing, normalisation and patch layout, nothing re-implemented here) expands each marker
to its placeholder tokens; the model's vision tower then fills them (vision.py).

Videos given as files are decoded with PyAV (`pip install av`) at `video_fps` frames per
second (transformers' load_video), then resized by the video processor (smart_resize within
its min/max pixels) and cut into segments of `vision_segment_max_frames` temporal patches.
Each frame pair gets the processor's timestamp marker.

Requirements: Pillow, and torchvision for transformers' MiniMax-M3 processors (they are
torchvision-backed only). On macOS `pip install torchvision` matching torch works. On Linux
with the CPU-only torch build, PyPI's torchvision wheels are CUDA builds that fail to import:
install the CPU wheel of the same version from https://download.pytorch.org/whl/cpu.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

IMAGE_MARKER = "]<]image[>["
VIDEO_MARKER = "]<]video[>["
DEFAULT_VIDEO_FPS = 1.0  # MiniMaxM3VLVideoProcessor.fps


class Prepared(NamedTuple):
    input_ids: mx.array  # [L] int32: the prompt with the placeholders expanded
    embeddings: mx.array  # [L, hidden]: pass as input_embeddings (mlx-lm's generate_step shape)
    media_key: str  # digest of the pixels fed: a prompt cache must key on it, not on the ids alone


def _processor_classes():
    try:  # the modules themselves: transformers' top-level names import lazily and fail later
        from transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl import MiniMaxM3VLImageProcessor
        from transformers.models.minimax_m3_vl.processing_minimax_m3_vl import MiniMaxM3VLProcessor
        from transformers.models.minimax_m3_vl.video_processing_minimax_m3_vl import MiniMaxM3VLVideoProcessor
    except (ImportError, RuntimeError) as e:
        raise ImportError(
            "images and video need transformers' MiniMax-M3 processors, which need torchvision, Pillow "
            "and PyAV: in the package's source folder, pip install -e \".[vision]\" (it pins a torch/torchvision "
            f"pair that imports together; a CPU-only torch build cannot load PyPI's torchvision) "
            f"({type(e).__name__}: {e})"
        ) from None
    return MiniMaxM3VLProcessor, MiniMaxM3VLImageProcessor, MiniMaxM3VLVideoProcessor


def _image_processor(ImageProc, path: Path, sizes: dict):
    f = path / "preprocessor_config.json"
    if not f.exists():
        return ImageProc(**sizes)
    size = json.loads(f.read_text()).get("size")
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        # mlx-vlm's processor saves the release's unused `size: [672, 672]` as a dict, which
        # transformers' processor would mix with min/max_pixels and refuse; it drops the list
        # form for the same reason (min/max_pixels bound the resize), so drop this one too.
        return ImageProc.from_pretrained(str(path), size=None)
    return ImageProc.from_pretrained(str(path))


def load_processor(model_path, tokenizer=None):
    """transformers' MiniMaxM3VLProcessor for a checkpoint folder.

    Uses the folder's preprocessor_config.json / video_preprocessor_config.json where present
    (published checkpoints ship them), else the processors' defaults with the patch, temporal
    and merge sizes of config.json's vision_config. `tokenizer`: a Hugging Face tokenizer or
    mlx-lm's TokenizerWrapper (default: the folder's tokenizer).
    """
    Proc, ImageProc, VideoProc = _processor_classes()
    path = Path(model_path)
    config = json.loads((path / "config.json").read_text())
    vc = config.get("vision_config") or {}
    sizes = {k: vc[v] for k, v in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                                   ("merge_size", "spatial_merge_size")) if v in vc}
    image = _image_processor(ImageProc, path, sizes)
    video = (VideoProc.from_pretrained(str(path)) if (path / "video_preprocessor_config.json").exists()
             else VideoProc(**sizes))
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if isinstance(tokenizer, TokenizerWrapper):
        tokenizer = tokenizer._tokenizer  # the Hugging Face tokenizer inside
    return Proc(image_processor=image, tokenizer=tokenizer, video_processor=video)


def _not_a_file(path) -> str:
    return "a folder, not a file" if Path(path).is_dir() else "no such file"


def _load_image(item):
    if isinstance(item, (str, Path)):
        from transformers.image_utils import load_image

        if not Path(item).is_file():
            raise FileNotFoundError(f"image {item}: {_not_a_file(item)}")
        try:
            return load_image(str(item))
        except Exception as e:  # PIL's UnidentifiedImageError, truncated files, ...
            raise ValueError(f"image {item}: not an image Pillow can read ({e})") from None
    return item  # PIL image or array: the processor takes them as they are


def _load_video(item, fps: float):
    """(frames [T, H, W, 3] uint8, metadata or None)."""
    if isinstance(item, (str, Path)):
        from transformers.video_utils import load_video

        if not Path(item).is_file():
            raise FileNotFoundError(f"video {item}: {_not_a_file(item)}")
        try:
            frames, metadata = load_video(str(item), fps=fps, backend="pyav")
        except Exception as e:  # PyAV's InvalidDataError; transformers' "total_num_frames=0" for no stream
            raise ValueError(f"video {item}: not a video PyAV can decode ({e})") from None
        if len(frames) == 0:
            raise ValueError(f"video {item}: no frames decoded")
        return frames, metadata
    frames = np.asarray(item)
    if frames.ndim != 4:
        raise ValueError(f"a video array must be [frames, height, width, channels], got shape {frames.shape}")
    return frames, None


def media_key(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            a = np.ascontiguousarray(a)
            h.update(repr((a.shape, str(a.dtype))).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def prepare(model, processor, prompt: str, images: Optional[Sequence[Any]] = None,
            videos: Optional[Sequence[Any]] = None, *, feature_cache=None,
            video_fps: float = DEFAULT_VIDEO_FPS, **processor_kwargs) -> Prepared:
    """Prompt text with image/video markers + the media -> Prepared(input_ids, embeddings, media_key).

    images: paths, PIL images or arrays; videos: paths (decoded at `video_fps`) or
    [T, H, W, 3] frame arrays. `feature_cache` (vision.FeatureCache) reuses the tower's
    features of media seen before. `processor_kwargs` go to the processor call (e.g.
    `max_pixels`-style size overrides, `vision_segment_max_frames`).
    """
    images, videos = list(images or []), list(videos or [])
    if not isinstance(prompt, str):
        raise TypeError("prepare needs the prompt as text (apply the chat template with tokenize=False)")
    for marker, items, what in ((IMAGE_MARKER, images, "image"), (VIDEO_MARKER, videos, "video")):
        n = prompt.count(marker)
        if n != len(items):
            raise ValueError(
                f"the prompt has {n} {what} marker(s) {marker!r} for {len(items)} {what}(s): put one marker "
                f"where each {what} goes (the chat template writes it for a {{'type': '{what}'}} content part)"
            )
    if (images or videos) and not model.has_vision:
        raise ValueError("this model has no vision tower (text-only config or checkpoint): images and "
                         "video need a checkpoint with the vision weights")
    kwargs = dict(processor_kwargs)
    if images:
        kwargs["images"] = [_load_image(i) for i in images]
    if videos:
        loaded = [_load_video(v, video_fps) for v in videos]
        kwargs["videos"] = [f for f, _ in loaded]
        if all(m is not None for _, m in loaded):
            kwargs["video_metadata"] = [m for _, m in loaded]  # timestamps in the prompt
        # The processor's call leaves video frames at their size by default (it expects
        # them pre-sized); let its video processor resize them as it does images.
        kwargs.setdefault("do_resize", True)
    out = processor(text=[prompt], return_tensors="np", **kwargs)
    ids = np.asarray(out["input_ids"])
    pix, pix_grid = out.get("pixel_values"), out.get("image_grid_thw")
    vid, vid_grid = out.get("pixel_values_videos"), out.get("video_grid_thw")
    embeddings = model.get_input_embeddings(ids, pix, pix_grid, vid, vid_grid, feature_cache=feature_cache)
    return Prepared(mx.array(ids[0].astype(np.int32)), embeddings[0],
                    media_key(pix, pix_grid, vid, vid_grid))


class ServerImages:
    """transformers' processor as mlx-lm's server calls one: `(prompt text, [RGB arrays]) ->
    (text with each image marker expanded to its placeholders, [(pixel rows, grid) per image])`.

    The expansion is the processor's own (`replace_image_token`); the server then tokenizes
    that text and hands the pixels of the images after its cached prefix to
    `Model.embed_inputs`. Under mlx.launch every rank runs it on the same image bytes.
    """

    def __init__(self, processor):
        self.processor = processor
        self.image_token = processor.image_token  # the placeholder (mlx-lm finds each image's run of it)

    def __call__(self, text: str, images: Sequence[Any]):
        pieces = text.split(IMAGE_MARKER)
        if len(pieces) != len(images) + 1:
            raise ValueError(f"the prompt has {len(pieces) - 1} image marker(s) for {len(images)} image(s)")
        out = self.processor.image_processor(images=[np.array(i) for i in images], return_tensors="np")  # writable
        grids = np.asarray(out["image_grid_thw"])
        text = pieces[0] + "".join(self.processor.replace_image_token(out, i) + pieces[i + 1]
                                   for i in range(len(images)))
        bounds = np.cumsum([0] + [int(np.prod(g)) for g in grids])
        pix = np.asarray(out["pixel_values"])
        return text, [(pix[bounds[i]:bounds[i + 1]], grids[i]) for i in range(len(images))]


def server_images(model, model_path, tokenizer) -> Optional[ServerImages]:
    """The server's image processor: None for a model without a vision tower, or (with a
    warning) where transformers' processors cannot be imported; images are then refused."""
    if not model.has_vision:
        return None
    try:
        return ServerImages(load_processor(model_path, tokenizer))
    except ImportError as e:
        import logging

        logging.warning(f"the server takes no images: {e}")
        return None
