"""The vision side against transformers' MiniMaxM3SparseForConditionalGeneration (float32).

A tiny config (2 vision layers, head_dim 16 so 3-D RoPE rotates 12 channels and passes 4,
a projector width unlike the text width, a non-default vision RoPE theta) with every
vision parameter random (LayerNorm scales and all biases included). Inputs are processor-
shaped patches: two images of transposed grids and a video in two chunks (the video
processor's segments), so per-entry attention, the t/h/w axes and chunking all count.
"""

from __future__ import annotations

import copy
import json
import os

import mlx.core as mx
import numpy as np
import pytest
import torch
from reference import build_reference, rel_err

from minimax_m3_mlx import CheckpointError, load_model, synthetic
from minimax_m3_mlx.model.vision import FeatureCache, PlaceholderMismatch, encode_grids
from minimax_m3_mlx.weights.vision_names import sanitize_vision

TOL = 1e-4
IMG, VID = 300, 301  # image_token_index / video_token_index of synthetic.tiny_config
IMAGE_GRIDS = [(1, 4, 6), (1, 6, 4)]
VIDEO_GRIDS = [(2, 4, 4), (1, 4, 4)]  # one video, two attention segments


def vision_config():
    cfg = synthetic.tiny_config()
    cfg["vision_config"].update(num_hidden_layers=2, rope_parameters={"rope_theta": 500.0})
    cfg["projector_hidden_size"] = 48
    return cfg


def random_vision_weights(reference_vision: dict, seed: int) -> dict:
    """Every vision tensor random, in transformers' names (shapes from the reference)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, v in reference_vision.items():
        if "norm" in name and name.endswith(".weight"):
            w = 1.0 + rng.normal(0.0, 0.3, v.shape)
        elif name.endswith(".bias"):
            w = rng.normal(0.0, 0.2, v.shape)
        else:
            w = rng.normal(0.0, 1.0 / np.sqrt(np.prod(v.shape[1:])), v.shape)
        out[name] = w.astype(np.float32)
    return out


def media(seed=0):
    rng = np.random.default_rng(seed)
    dim = 3 * 2 * 14 * 14
    img = rng.normal(0, 1, (sum(t * h * w for t, h, w in IMAGE_GRIDS), dim)).astype(np.float32)
    vid = rng.normal(0, 1, (sum(t * h * w for t, h, w in VIDEO_GRIDS), dim)).astype(np.float32)
    return img, np.array(IMAGE_GRIDS), vid, np.array(VIDEO_GRIDS)


def prompt(seed=0, drop_image_tokens=0):
    """Text, image 1 (6 tokens), text, image 2 (6), text, the video (8 + 4), text: 72 tokens."""
    rng = np.random.default_rng(seed)
    t = lambda n: list(rng.integers(0, 256, n))  # noqa: E731
    ids = t(9) + [IMG] * 6 + t(5) + [IMG] * (6 - drop_image_tokens) + t(4) + [VID] * 12 + t(30)
    return np.array([ids])


class VisionCase:
    def __init__(self):
        self.config = vision_config()
        self.text = synthetic.random_weights(self.config, seed=3)
        _, init_vision = build_reference(self.config, self.text)
        self.vision = random_vision_weights(init_vision, seed=4)
        self.reference, _ = build_reference(self.config, {**self.text, **self.vision})

    def write(self, path, layout="original", **kw):
        """Write the checkpoint; returns the reference on its (dequantised) weights."""
        ref_w = synthetic.write_checkpoint(path, self.config, {**self.text, **self.vision}, layout, **kw)
        if all(np.array_equal(ref_w[k], v) for k, v in {**self.text, **self.vision}.items()):
            return self.reference
        return build_reference(self.config, ref_w)[0]


@pytest.fixture(scope="module")
def case():
    return VisionCase()


@pytest.fixture(scope="module")
def loaded(case, tmp_path_factory):
    path = tmp_path_factory.mktemp("vision_original")
    case.write(path, "original")
    model, _ = load_model(path)
    return model


def reference_logits(ref, ids, img, img_grid, vid, vid_grid):
    out = ref(
        input_ids=torch.from_numpy(ids.astype(np.int64)),
        pixel_values=None if img is None else torch.from_numpy(img),
        image_grid_thw=None if img_grid is None else torch.from_numpy(img_grid.astype(np.int64)),
        pixel_values_videos=None if vid is None else torch.from_numpy(vid),
        video_grid_thw=None if vid_grid is None else torch.from_numpy(vid_grid.astype(np.int64)),
        use_cache=False,
    )
    return out.logits.float().numpy()


def ours_logits(model, ids, img, img_grid, vid, vid_grid, **kw):
    emb = model.get_input_embeddings(ids, img, img_grid, vid, vid_grid, **kw)
    return np.array(model(mx.array(ids), input_embeddings=emb))


# -- the tower and projector ------------------------------------------------------------------------
def vision_hidden_states(model, pix: np.ndarray, grid: np.ndarray) -> mx.array:
    """The tower's last hidden states for all grid entries, concatenated (no projector)."""
    out, start = [], 0
    for g in grid.reshape(-1, 3).tolist():
        n = g[0] * g[1] * g[2]
        out.append(model.vision_tower(mx.array(pix[start:start + n]), g))
        start += n
    return mx.concatenate(out, axis=0)


def test_vision_features_match_reference(case, loaded):
    img, img_grid, vid, vid_grid = media()
    ref = case.reference.model
    for pix, grid in ((img, img_grid), (vid, vid_grid)):
        out = ref.get_image_features(torch.from_numpy(pix), torch.from_numpy(grid.astype(np.int64)))
        hidden_ref = out.last_hidden_state.squeeze(0).numpy()
        feats_ref = torch.cat(out.pooler_output).numpy()
        hidden = np.array(vision_hidden_states(loaded, pix, grid))
        feats = np.array(encode_grids(loaded, pix, grid))
        assert hidden.shape == hidden_ref.shape and feats.shape == feats_ref.shape
        assert rel_err(hidden, hidden_ref) < TOL, f"tower rel err {rel_err(hidden, hidden_ref):.2e}"
        assert rel_err(feats, feats_ref) < TOL, f"projected rel err {rel_err(feats, feats_ref):.2e}"


def test_segments_do_not_attend_to_each_other(loaded):
    """Each grid entry alone gives the same features as inside a batch of entries."""
    img, img_grid, _, _ = media()
    both = np.array(encode_grids(loaded, img, img_grid))
    n0 = int(np.prod(IMAGE_GRIDS[0]))
    first = np.array(encode_grids(loaded, img[:n0], img_grid[:1]))
    second = np.array(encode_grids(loaded, img[n0:], img_grid[1:]))
    np.testing.assert_allclose(both, np.concatenate([first, second]), rtol=1e-5, atol=1e-5)
    # and the positions matter: the second image read with the first grid's shape differs
    swapped = np.array(encode_grids(loaded, img[n0:], np.array([IMAGE_GRIDS[0]])))
    assert rel_err(swapped, second) > 1e-2


def test_query_blocks_equal_one_call(loaded, monkeypatch):
    """Long entries attend in query blocks (bounded score memory): same features."""
    from minimax_m3_mlx.model.vision import VisionAttention

    _, _, vid, vid_grid = media()
    whole = np.array(encode_grids(loaded, vid, vid_grid))
    monkeypatch.setattr(VisionAttention, "query_block", 7)  # 32 and 16 patches: ragged blocks
    np.testing.assert_allclose(np.array(encode_grids(loaded, vid, vid_grid)), whole, rtol=1e-5, atol=1e-6)


def test_bfloat16_model(case, loaded, tmp_path):
    """In bf16 the features and embeddings stay bf16 and near the float32 ones."""
    img, img_grid, vid, vid_grid = media()
    f32 = np.array(loaded.get_input_embeddings(prompt(), img, img_grid, vid, vid_grid))
    case.write(tmp_path, "original")
    bf, _ = load_model(tmp_path)
    bf.set_dtype(mx.bfloat16)
    emb = bf.get_input_embeddings(prompt(), img, img_grid, vid, vid_grid)
    assert emb.dtype == mx.bfloat16
    assert rel_err(np.array(emb.astype(mx.float32)), f32) < 5e-2


# -- the prompt ---------------------------------------------------------------------------------------------
def test_prompt_logits_two_images_and_a_video(case, loaded):
    img, img_grid, vid, vid_grid = media()
    ids = prompt()
    ref = reference_logits(case.reference, ids, img, img_grid, vid, vid_grid)
    text_only = reference_logits(case.reference, ids, None, None, None, None)
    assert rel_err(text_only, ref) > 1e-2  # the features really change the logits
    full = ours_logits(loaded, ids, img, img_grid, vid, vid_grid)
    assert rel_err(full, ref) < TOL, f"full rel err {rel_err(full, ref):.2e}"

    # chunked prefill of the embeddings through the cache, then decode by token ids
    emb = loaded.get_input_embeddings(ids, img, img_grid, vid, vid_grid)
    cache = loaded.make_cache()
    parts = []
    for a, b in ((0, 17), (17, 18), (18, 50)):
        parts.append(np.array(loaded(mx.array(ids[:, a:b]), cache=cache, input_embeddings=emb[:, a:b])))
    for i in range(50, ids.shape[1]):
        parts.append(np.array(loaded(mx.array(ids[:, i:i + 1]), cache=cache)))
    inc = np.concatenate(parts, axis=1)
    assert rel_err(inc, ref) < TOL, f"chunked + decode rel err {rel_err(inc, ref):.2e}"


def test_batch_of_two_prompts(case, loaded):
    """Features fill the placeholders in row-major order across the batch, as masked_scatter."""
    img, img_grid, vid, vid_grid = media(1)
    rng = np.random.default_rng(5)
    row0 = list(rng.integers(0, 256, 4)) + [IMG] * 6 + list(rng.integers(0, 256, 30)) + [VID] * 12
    row1 = [IMG] * 6 + list(rng.integers(0, 256, 46))
    ids = np.array([row0, row1])
    ref = reference_logits(case.reference, ids, img, img_grid, vid, vid_grid)
    assert rel_err(ours_logits(loaded, ids, img, img_grid, vid, vid_grid), ref) < TOL


def test_mlx_lm_generate_step_with_embeddings(case, loaded):
    """mlx-lm's generate_step takes our embeddings (chunked prefill): greedy = the reference's."""
    from mlx_lm.generate import generate_step

    img, img_grid, vid, vid_grid = media()
    ids = prompt()
    emb = loaded.get_input_embeddings(ids, img, img_grid, vid, vid_grid)
    ref_ids = ids.copy()
    want = []
    for _ in range(3):  # the reference's greedy continuation
        nxt = int(reference_logits(case.reference, ref_ids, img, img_grid, vid, vid_grid)[0, -1].argmax())
        want.append(nxt)
        ref_ids = np.concatenate([ref_ids, [[nxt]]], axis=1)
    got = [int(t) for (t, _), _ in zip(generate_step(mx.array(ids[0]), loaded, input_embeddings=emb[0],
                                                prefill_step_size=16, max_tokens=3), range(3))]
    assert got == want


def test_placeholder_mismatch_is_a_clear_error(loaded):
    img, img_grid, vid, vid_grid = media()
    with pytest.raises(PlaceholderMismatch, match=r"image.*6 image placeholder token.*12 feature"):
        loaded.get_input_embeddings(prompt(drop_image_tokens=6), img, img_grid, vid, vid_grid)
    with pytest.raises(PlaceholderMismatch, match="11 image placeholder"):
        loaded.get_input_embeddings(prompt(drop_image_tokens=1), img, img_grid, vid, vid_grid)
    with pytest.raises(PlaceholderMismatch, match="12 video placeholder.*0 feature"):
        loaded.get_input_embeddings(prompt(), img, img_grid)  # the video left out
    with pytest.raises(ValueError, match="grids describe"):
        loaded.get_input_embeddings(prompt(), img[:-1], img_grid, vid, vid_grid)


def test_feature_cache(loaded):
    img, img_grid, vid, vid_grid = media()
    cache = FeatureCache()
    first = np.array(loaded.get_input_embeddings(prompt(), img, img_grid, vid, vid_grid, feature_cache=cache))
    assert (cache.hits, cache.misses, len(cache)) == (0, 4, 4)  # 2 images + 2 video chunks
    again = np.array(loaded.get_input_embeddings(prompt(), img, img_grid, vid, vid_grid, feature_cache=cache))
    assert cache.hits == 4 and np.array_equal(first, again)
    img2 = img.copy()
    img2[0, 0] += 1.0  # one changed pixel of image 1: a miss for it only
    changed = np.array(loaded.get_input_embeddings(prompt(), img2, img_grid, vid, vid_grid, feature_cache=cache))
    assert cache.misses == 5 and cache.hits == 7 and not np.array_equal(changed, first)
    small = FeatureCache(max_bytes=1)  # LRU by bytes keeps only the newest entry
    encode_grids(loaded, img, img_grid, small)
    assert len(small) == 1


# -- checkpoints ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", synthetic.LAYOUTS)
def test_every_layout_loads_the_tower(case, layout, tmp_path):
    """Both loaders, each layout: the prompt's logits equal the reference's (on the
    dequantised text weights; the releases leave the vision tower unquantised)."""
    from mlx_lm.utils import load_model as lm_load_model

    from minimax_m3_mlx import get_model_classes

    reference = case.write(tmp_path, layout, fp8_block=(24, 40))
    img, img_grid, vid, vid_grid = media()
    ids = prompt()
    ref = reference_logits(reference, ids, img, img_grid, vid, vid_grid)
    for model in (load_model(tmp_path)[0], lm_load_model(tmp_path, get_model_classes=get_model_classes)[0]):
        assert model.has_vision
        err = rel_err(ours_logits(model, ids, img, img_grid, vid, vid_grid), ref)
        assert err < TOL, f"{layout}: rel err {err:.2e}"


def test_quantised_vision_tensors_are_dequantised(case, tmp_path):
    """A source that quantised vision tensors too (FP8 128x128 scales here) loads them exactly."""
    tensors, cfg, ref_w = synthetic.layout_tensors(case.config, {**case.text, **case.vision}, "fp8", (24, 40))
    name = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    q, s, deq = synthetic.quantize_fp8_blocks(tensors[name][0], (24, 40))
    tensors[name] = (q, "F8_E4M3")
    tensors[name.replace(".weight", ".weight_scale_inv")] = (s, "F32")
    ref_w = dict(ref_w)
    ref_w["model.vision_tower.layers.1.mlp.fc1.weight"] = deq
    synthetic.write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    reference, _ = build_reference(case.config, ref_w)
    model, _ = load_model(tmp_path)
    img, img_grid, vid, vid_grid = media()
    ids = prompt()
    ref = reference_logits(reference, ids, img, img_grid, vid, vid_grid)
    assert rel_err(ours_logits(model, ids, img, img_grid, vid, vid_grid), ref) < TOL


def test_converted_model_with_8bit_vision(case, loaded, tmp_path):
    """A converted folder (our names, MLX "quantization", vision Linear layers at 8 bits) loads
    through both loaders with its vision tower quantised, the features near the float ones."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model as lm_load_model

    from minimax_m3_mlx import get_model_classes

    case.write(tmp_path / "src", "original")
    model, config = load_model(tmp_path / "src")
    nn.quantize(model, group_size=32, bits=8,
                class_predicate=lambda p, m: p.startswith(("vision_tower.", "multi_modal_projector.")) and
                hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    out = tmp_path / "converted"
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = {**config, "quantization": {"group_size": 32, "bits": 8}}
    (out / "config.json").write_text(json.dumps(config))
    img, img_grid, _, _ = media()
    want = np.array(encode_grids(loaded, img, img_grid))
    for m in (load_model(out)[0], lm_load_model(out, get_model_classes=get_model_classes)[0]):
        assert isinstance(m.vision_tower.layers[0].mlp.fc1, nn.QuantizedLinear)
        assert isinstance(m.multi_modal_projector.merge_linear_1, nn.QuantizedLinear)
        assert not isinstance(m.layers[0].self_attn.q_proj, nn.QuantizedLinear)
        assert rel_err(np.array(encode_grids(m, img, img_grid)), want) < 2e-2


def test_text_only_checkpoints(case, tmp_path):
    """No vision tensors (vision_config kept, or dropped as convert does): a text model that
    says so when given images; vision tensors beside a config without vision_config are set aside."""
    img, img_grid, _, _ = media()
    synthetic.write_checkpoint(tmp_path / "a", case.config, case.text, "mxfp8")
    model, _ = load_model(tmp_path / "a")
    assert not model.has_vision
    with pytest.raises(ValueError, match="no vision tower"):
        model.get_input_embeddings(prompt(), img, img_grid)
    ids = prompt()[:, :9]
    emb = model.get_input_embeddings(ids)  # text only: the plain embeddings
    np.testing.assert_array_equal(np.array(model(mx.array(ids), input_embeddings=emb)), np.array(model(mx.array(ids))))

    synthetic.write_checkpoint(tmp_path / "b", case.config, {**case.text, **case.vision}, "original")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg.pop("vision_config")
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    model, _ = load_model(tmp_path / "b")
    assert not model.has_vision


def test_synthetic_vision_weights_have_the_reference_names_and_shapes(case):
    """synthetic.random_vision_weights (the demo's tower) writes what the reference holds."""
    _, init_vision = build_reference(case.config, case.text)
    drawn = synthetic.random_vision_weights(case.config, seed=1)
    assert {k: v.shape for k, v in drawn.items()} == {k: v.shape for k, v in init_vision.items()}


def test_vision_names(case):
    """Published and transformers 5.x names map to the same; ours pass through; unknown is an error."""
    orig = {k: mx.array(v) for k, v in synthetic.to_original_names(case.vision).items()}
    resave = {k: mx.array(v) for k, v in case.vision.items()}
    a, b = sanitize_vision(orig), sanitize_vision(resave)
    assert sorted(a) == sorted(b) and len(a) == len(case.vision)
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    assert sorted(sanitize_vision(a)) == sorted(a)
    assert "vision_tower.embeddings.proj.weight" in a and "multi_modal_projector.merge_linear_2.bias" in a
    with pytest.raises(CheckpointError, match="vision_tower.vision_model.post_layernorm.weight"):
        sanitize_vision({**orig, "vision_tower.vision_model.post_layernorm.weight": mx.zeros((32,))})
    dup = {**orig, "model.vision_tower.pre_layrnorm.bias": resave["model.vision_tower.pre_layrnorm.bias"]}
    with pytest.raises(CheckpointError, match="twice"):
        sanitize_vision(dup)


def test_missing_vision_tensor_is_named(case, tmp_path):
    w = {**case.text, **case.vision}
    del w["model.multi_modal_projector.merge_linear_1.bias"]
    synthetic.write_checkpoint(tmp_path, case.config, w, "resave")
    with pytest.raises(CheckpointError, match="merge_linear_1.bias"):
        load_model(tmp_path)


def test_bad_vision_config(case, tmp_path):
    from minimax_m3_mlx import ConfigError

    cfg = copy.deepcopy(case.config)
    cfg["vision_config"]["num_attention_heads"] = 3
    synthetic.write_checkpoint(tmp_path, cfg, {**case.text, **case.vision}, "original")
    with pytest.raises(ConfigError, match="vision_config.num_attention_heads"):
        load_model(tmp_path)


# -- preprocessing ------------------------------------------------------------------------------------------
def test_prepare_checks_markers(loaded):
    """One marker per image / video, before any processing (no processor needed to refuse)."""
    from minimax_m3_mlx.serving.multimodal import prepare

    with pytest.raises(ValueError, match=r"1 image marker.*for 2 image"):
        prepare(loaded, None, "look ]<]image[>[ here", images=["a.png", "b.png"])
    with pytest.raises(ValueError, match=r"0 video marker.*for 1 video"):
        prepare(loaded, None, "no marker", videos=["c.mp4"])


def _processors_or_skip():
    """transformers' MiniMax-M3 processors need torchvision, Pillow and PyAV (the `vision`
    extra, which the `test` extra includes). Where they cannot be imported the tests that
    drive them are skipped, except under CI, where that is a broken install and fails."""
    from minimax_m3_mlx.serving import multimodal

    try:
        multimodal._processor_classes()
        import av  # noqa: F401
        from PIL import Image  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"image/video processors unavailable (the `vision` extra): {str(e).split('(')[0]}")


def media_files(folder, seed=7):
    """Two PNG images and a 3 s MPEG-4 clip (4 fps, 64x48), made here."""
    import av
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(((60, 90), (100, 40))):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    video = folder / "clip.mp4"
    with av.open(str(video), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for _ in range(12):  # 3 s at 4 fps: 3 frames at 1 fps, padded to 2 temporal patches
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return paths, video


def test_prepare_with_transformers_processors(case, loaded, tmp_path):
    """Files -> transformers' MiniMax-M3 processors -> our embeddings -> the reference's logits
    on the same processor outputs."""
    from minimax_m3_mlx.serving import multimodal

    _processors_or_skip()
    from PIL import Image

    synthetic.write_checkpoint(tmp_path, case.config, case.text, "original")  # config + tokenizer
    processor = multimodal.load_processor(tmp_path)
    paths, video = media_files(tmp_path)
    text = "a ]<]image[>[ b ]<]image[>[ c ]<]video[>[ d"
    cache = FeatureCache()
    p = multimodal.prepare(loaded, processor, text, images=paths, videos=[video], feature_cache=cache,
                           vision_segment_max_frames=1)
    ids = np.array(p.input_ids)[None]
    assert (ids == IMG).sum() == sum(int(np.prod(g)) // 4 for g in processor.image_processor(
        [Image.open(q) for q in paths], return_tensors="np")["image_grid_thw"])
    assert (ids == VID).sum() > 0 and len(cache) == 2 + 2  # two images, two video segments
    assert "seconds" in processor.tokenizer.decode(ids[0])  # timestamps from the video's metadata
    # the reference on the same processor outputs
    out = processor(text=[text], images=[Image.open(q).convert("RGB") for q in paths],
                    videos=[multimodal._load_video(video, 1.0)[0]],
                    video_metadata=[multimodal._load_video(video, 1.0)[1]], do_resize=True,
                    vision_segment_max_frames=1, return_tensors="np")
    np.testing.assert_array_equal(out["input_ids"], ids)
    ref = reference_logits(case.reference, ids, out["pixel_values"], out["image_grid_thw"],
                           out["pixel_values_videos"], out["video_grid_thw"])
    ours = np.array(loaded(p.input_ids[None], input_embeddings=p.embeddings[None]))
    assert rel_err(ours, ref) < TOL


def test_generate_cli_with_images_and_video(case, tmp_path, monkeypatch, capsys):
    """`minimax-m3 generate --image A --image B --video C`: the chat template gets one marker
    per medium, and the reply is the reference's greedy continuation of that prompt. Only the
    processor step is replaced (torchvision cannot be imported here): it expands each marker
    to the grids' placeholder tokens and feeds the same pixels the reference sees."""
    from minimax_m3_mlx.serving import generate, multimodal

    case.write(tmp_path, "original")
    img, img_grid, vid, vid_grid = media()
    seen = {}

    def fake_prepare(model, processor, text, images=None, videos=None, **kw):
        seen.update(text=text, images=images, videos=videos)
        tok = generate.load(str(tmp_path))[1]
        ids = tok.encode(text, add_special_tokens=False)
        expanded = []
        for t in ids:  # 6 + 6 placeholder tokens per image, 12 for the video's two chunks
            if t == IMG:
                expanded += [IMG] * 6
            elif t == VID:
                expanded += [VID] * 12
            else:
                expanded.append(t)
        arr = np.array([expanded])
        emb = model.get_input_embeddings(arr, img, img_grid, vid, vid_grid)
        return multimodal.Prepared(mx.array(arr[0], dtype=mx.int32), emb[0], "test")

    monkeypatch.setattr(multimodal, "load_processor", lambda *a, **k: None)
    monkeypatch.setattr(multimodal, "prepare", fake_prepare)
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.png", "c.mp4"):  # generate checks that the files exist
        (tmp_path / name).write_bytes(b"")
    rc = generate.main(["--model", str(tmp_path), "--prompt", "describe", "--image", "a.png", "--image", "b.png",
                        "--video", "c.mp4", "--max-tokens", "3", "--thinking", "disabled"])
    assert rc == 0
    assert seen["text"].count(multimodal.IMAGE_MARKER) == 2 and seen["text"].count(multimodal.VIDEO_MARKER) == 1
    assert seen["images"] == ["a.png", "b.png"] and seen["videos"] == ["c.mp4"]
    # the reference's greedy continuation of the same expanded prompt and pixels
    ids = fake_prepare(load_model(tmp_path)[0], None, seen["text"]).input_ids.tolist()
    ref_ids = np.array([ids])
    want = []
    for _ in range(3):
        nxt = int(reference_logits(case.reference, ref_ids, img, img_grid, vid, vid_grid)[0, -1].argmax())
        want.append(nxt)
        ref_ids = np.concatenate([ref_ids, [[nxt]]], axis=1)
    tok = generate.load(str(tmp_path))[1]
    out = capsys.readouterr().out
    assert tok.decode(want) in out


def test_images_and_video_through_the_cli_and_the_python_api(case, tmp_path, capsys):
    """A real PNG pair and an MPEG-4 clip through `minimax-m3 generate --image --video` (the
    processors, the vision tower and generation, nothing replaced), and the same request
    through the Python API: the same greedy reply."""
    from minimax_m3_mlx import cli
    from minimax_m3_mlx.serving import generate, multimodal

    _processors_or_skip()
    case.write(tmp_path / "model", "original")
    paths, video = media_files(tmp_path)
    rc = cli.main(["generate", "--model", str(tmp_path / "model"), "--prompt", "What happens here?",
                   "--image", str(paths[0]), "--image", str(paths[1]), "--video", str(video),
                   "--max-tokens", "5", "--thinking", "disabled", "--video-fps", "1"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "Generation: 5 tokens" in out.out

    model, tokenizer = generate.load(str(tmp_path / "model"), thinking="disabled")
    markers = multimodal.IMAGE_MARKER * 2 + multimodal.VIDEO_MARKER
    text = tokenizer.apply_chat_template([{"role": "user", "content": markers + "What happens here?"}],
                                         add_generation_prompt=True, tokenize=False, thinking_mode="disabled")
    processor = multimodal.load_processor(tmp_path / "model", tokenizer)
    prepared = multimodal.prepare(model, processor, text, images=paths, videos=[video], video_fps=1.0)
    assert (np.array(prepared.input_ids) == IMG).sum() > 0 and (np.array(prepared.input_ids) == VID).sum() > 0
    gen = generate.generate(model, tokenizer, prepared.input_ids.tolist(), max_tokens=5,
                            input_embeddings=prepared.embeddings)
    assert len(gen.tokens) == 5
    assert gen.text and gen.text in out.out
