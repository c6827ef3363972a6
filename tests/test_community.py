"""Folders written by mlx-lm's and mlx-vlm's converters (the community MLX conversions), made as users make them.

`mlx_lm.convert` and mlx-vlm's `convert` run in this process on tiny checkpoints of the
released layouts they read (original BF16-style names, the official MXFP8), with
`-q --q-bits 4`, `--q-bits 8`, other affine widths, `--q-mode mxfp4` / `nvfp4`, the
`mixed_3_6` predicate, and unquantized. Our logits on each folder equal mlx-lm's own
port loaded from the same folder (float32, selection active: 70 tokens >> block 4 x top-3),
and are as close to the transformers reference as that port is. The mlx-vlm folder's
vision tower matches mlx-vlm's own on images.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
import numpy as np
import pytest
from conftest import Case
from reference import reference_logits, rel_err

from minimax_m3_mlx import CheckpointError, load_model
from minimax_m3_mlx.loading import check_folder
from minimax_m3_mlx.io.reader import locate
from minimax_m3_mlx.model.moe import QuantizedRouter
from minimax_m3_mlx.weights import layouts

TOL = 1e-5
# Widths every quantization group divides (the tiny default leaves down projections of
# width 32 unquantized at group 64, as mlx-lm's converter skips them; one case keeps that).
WIDE = {"intermediate_size": 64, "shared_intermediate_size": 64, "dense_intermediate_size": 128,
        # the published config says so; mlx-vlm's port builds no indexer without it
        "sparse_attention_config": {"use_sparse_attention": True}}
SEQ = 70

# name -> (source layout, mlx_lm.convert keyword arguments)
MLX_LM = {
    "q4": ("original", dict(quantize=True, q_bits=4)),
    "q8": ("original", dict(quantize=True, q_bits=8)),
    "q2": ("original", dict(quantize=True, q_bits=2)),
    "q3-g32": ("original", dict(quantize=True, q_bits=3, q_group_size=32)),
    "q5": ("original", dict(quantize=True, q_bits=5)),
    "q6": ("original", dict(quantize=True, q_bits=6)),
    "mxfp4": ("original", dict(quantize=True, q_mode="mxfp4")),
    "nvfp4": ("original", dict(quantize=True, q_mode="nvfp4")),
    "mixed_3_6": ("original", dict(quantize=True, quant_predicate="mixed_3_6")),
    "mxfp8-q4": ("mxfp8", dict(quantize=True, q_bits=4)),  # mxfp8 kept, the rest 4-bit, router 8-bit
    "unquantized": ("original", dict()),
}
MLX_VLM = {
    "q4": dict(quantize=True, q_bits=4),
    "mxfp4": dict(quantize=True, q_mode="mxfp4", q_bits=4, q_group_size=32),
    "mixed_3_6": dict(quantize=True, quant_predicate="mixed_3_6"),
    "nvfp4": dict(quantize=True, q_mode="nvfp4", q_bits=4, q_group_size=16),
    "unquantized": dict(),
}


@pytest.fixture(scope="module")
def case():
    from test_vision import random_vision_weights

    c = Case(WIDE, seed=7)
    c.vision = random_vision_weights(c.vision, seed=8)  # LayerNorm scales and biases too
    return c


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(3).integers(0, 256, (2, SEQ))


@pytest.fixture(scope="module")
def sources(case, tmp_path_factory):
    root = tmp_path_factory.mktemp("community_src")
    refs = {layout: case.write(root / layout, layout) for layout in ("original", "mxfp8")}
    return root, refs


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return {"root": tmp_path_factory.mktemp("community")}


def mlx_lm_folder(made, sources, name) -> Path:
    from mlx_lm.convert import convert

    key = ("mlx-lm", name)
    if key not in made:
        layout, kw = MLX_LM[name]
        made[key] = made["root"] / f"lm-{name}"
        convert(str(sources[0] / layout), str(made[key]), **kw)
    return made[key]


def mlx_vlm_folder(made, sources, name) -> Path:
    from mlx_vlm.convert import convert

    key = ("mlx-vlm", name)
    if key not in made:
        made[key] = made["root"] / f"vlm-{name}"
        convert(str(sources[0] / "original"), str(made[key]), **MLX_VLM[name])
    return made[key]


def port_logits(path, tokens) -> np.ndarray:
    """mlx-lm's own minimax_m3_vl port, loaded from the folder by mlx-lm's loader."""
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(Path(path))
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def file_tensor_bytes(path) -> int:
    return sum(t.nbytes for k, t in locate(path).items() if not k.startswith(("vision_tower.", "multi_modal_projector.",
                                                                              "patch_merge_mlp.")))


def text_param_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for k, v in tree_flatten(model.language_model.parameters()))


def check_against_port(model, path, tokens, reference):
    ours = np.array(model(mx.array(tokens)).astype(mx.float32))
    port = port_logits(path, tokens)
    ref = reference_logits(reference, tokens)
    err, ours_ref, port_ref = rel_err(ours, port), rel_err(ours, ref), rel_err(port, ref)
    print(f"{path.name}: {model.checkpoint_layout}\n  vs mlx-lm's port {err:.2e}; vs the reference: "
          f"ours {ours_ref:.3e}, mlx-lm's port {port_ref:.3e}")
    assert err < TOL, f"{path.name}: {err:.3g} from mlx-lm's port"
    assert ours_ref <= port_ref * 1.001 + TOL, (ours_ref, port_ref)
    return ours_ref


@pytest.mark.parametrize("name", list(MLX_LM))
def test_mlx_lm_folder_equals_mlx_lm_port(case, sources, made, tokens, name):
    path = mlx_lm_folder(made, sources, name)
    model, _ = load_model(path)
    assert model.checkpoint_layout.startswith(layouts.MLX_LM)
    assert "vision_tower" not in model  # mlx-lm's port writes no tower: a text-only folder
    # Nothing dequantized or re-quantized: the weights are the folder's bytes.
    assert text_param_bytes(model) == file_tensor_bytes(path)
    gate = model.layers[1].mlp.gate
    if MLX_LM[name][1].get("quantize"):  # the port's predicate: 8-bit affine (the mixed recipe's own bits)
        assert isinstance(gate, QuantizedRouter) and gate.mode == "affine"
        assert gate.bits == (3 if name == "mixed_3_6" else 8)
    if name == "mxfp8-q4":  # the folder: mxfp8 experts and attention, 4-bit index and head
        assert model.layers[1].mlp.switch_mlp.gate_proj.mode == "mxfp8"
        idx = model.layers[1].self_attn.indexer.q_proj
        assert (idx.mode, idx.bits) == ("affine", 4)
        assert model.language_model.lm_head.bits == 4
    if name == "mixed_3_6":
        bits = {m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
        assert {3, 6} <= bits
    reference = sources[1]["mxfp8" if name.startswith("mxfp8") else "original"]
    check_against_port(model, path, tokens, reference)


@pytest.mark.parametrize("name", list(MLX_VLM))
def test_mlx_vlm_folder_equals_mlx_lm_port(case, sources, made, tokens, name):
    """mlx-vlm packs the shared expert into the routed bank (fused gate/up): split exactly.
    mlx-lm's port reads these folders too, and is the one that matches the reference with
    selection active; mlx-vlm's own port is compared where no block is dropped."""
    from mlx_vlm.utils import load_model as mlx_vlm_load

    path = mlx_vlm_folder(made, sources, name)
    model, _ = load_model(path)
    assert model.checkpoint_layout.startswith(layouts.MLX_VLM)
    assert model.has_vision
    assert text_param_bytes(model) == file_tensor_bytes(path)
    check_against_port(model, path, tokens, sources[1]["original"])
    short = tokens[:, :12]  # block 4 x top-3: every block kept
    theirs = mlx_vlm_load(path)
    vlm = np.array(theirs(mx.array(short)).logits.astype(mx.float32))
    err = rel_err(np.array(model(mx.array(short))), vlm)
    long_err = rel_err(np.array(theirs(mx.array(tokens)).logits.astype(mx.float32)),
                       reference_logits(sources[1]["original"], tokens))
    print(f"  mlx-vlm's port: {err:.2e} from ours on 12 tokens; {long_err:.3e} from the reference on {SEQ}")
    assert err < TOL


def test_mlx_vlm_vision_tower_equals_mlx_vlm(case, sources, made):
    """The tower (+ projector and patch merge) of an mlx-vlm folder on two images, against
    mlx-vlm's own tower loaded from the same folder. Every vision weight is random."""
    from mlx_vlm.utils import load_model as mlx_vlm_load

    from minimax_m3_mlx.model.vision import encode_grids

    path = mlx_vlm_folder(made, sources, "q4")
    model, _ = load_model(path)
    theirs = mlx_vlm_load(path)
    rng = np.random.default_rng(0)
    for grid in ([1, 4, 6], [2, 4, 4]):
        pix = rng.normal(0, 1, (int(np.prod(grid)), 3 * 2 * 14 * 14)).astype(np.float32)
        ours = np.array(encode_grids(model, pix, np.array([grid])))
        vlm = np.array(theirs.encode_image(mx.array(pix), mx.array([grid])))
        assert ours.shape == vlm.shape
        print(f"vision tower, grid {grid}: {rel_err(ours, vlm):.2e} from mlx-vlm's")
        assert rel_err(ours, vlm) < TOL, rel_err(ours, vlm)
    # the folder's tower is the one compared: a changed weight shows
    fc1 = model.vision_tower.layers[0].mlp.fc1
    fc1.bias = fc1.bias + 0.1
    assert rel_err(np.array(encode_grids(model, pix, np.array([grid]))), vlm) > 1e-3


def upcast(model):
    model.update(tree_map(lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
                          model.parameters()))
    return model


def test_bfloat16_mlx_lm_folder(case, sources, made, tokens):
    """Real bf16 tensors (mlx-lm's --dtype bfloat16 -q 4): loaded as written (bf16 scales and
    norms), they equal mlx-lm's port once both are upcast to float32, and in bf16 both stay
    as close to that float32 evaluation as each other (the tiny random model amplifies bf16
    rounding through routing and block choices, so the bf16 error itself is large)."""
    from mlx_lm.convert import convert
    from mlx_lm.utils import load_model as mlx_lm_load

    path = made["root"] / "lm-bf16-q4"
    convert(str(sources[0] / "original"), str(path), quantize=True, q_bits=4, dtype="bfloat16")
    model, _ = load_model(path)
    assert model.language_model.model.norm.weight.dtype == mx.bfloat16
    assert model.layers[1].self_attn.q_proj.scales.dtype == mx.bfloat16
    assert text_param_bytes(model) == file_tensor_bytes(path)
    port, _ = mlx_lm_load(path)
    ours_bf16 = np.array(model(mx.array(tokens)).astype(mx.float32))
    port_bf16 = np.array(port(mx.array(tokens)).astype(mx.float32))
    exact = np.array(upcast(model)(mx.array(tokens)))
    assert rel_err(exact, np.array(upcast(port)(mx.array(tokens)))) < TOL
    ours_err, port_err = rel_err(ours_bf16, exact), rel_err(port_bf16, exact)
    print(f"bf16 folder: from the float32 evaluation, ours {ours_err:.3e}, mlx-lm's port {port_err:.3e}")
    assert ours_err <= 1.2 * port_err + 1e-2, (ours_err, port_err)


def test_unknown_layout_is_one_line(case, sources, tmp_path, capsys):
    """A folder whose names match no known layout: one error naming what it lacks."""
    import shutil

    src = sources[0] / "original"
    dst = tmp_path / "odd"
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    from minimax_m3_mlx.io.reader import load_arrays

    arrays = {k.replace("embed_tokens", "tok_embeddings"): v for k, v in load_arrays(dst).items()}
    for f in dst.glob("*.safetensors"):
        f.unlink()
    mx.save_safetensors(str(dst / "model.safetensors"), arrays, metadata={"format": "pt"})
    index["weight_map"] = {k: "model.safetensors" for k in arrays}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="matches no known MiniMax-M3 layout: it lacks the token embedding"):
        load_model(dst)
    # the server checks the folder's headers before it listens
    with pytest.raises(CheckpointError, match="matches no known MiniMax-M3 layout"):
        check_folder(dst)
    from minimax_m3_mlx.cli import main

    assert main(["generate", "--model", str(dst), "--prompt", "hi", "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minimax-m3 generate: error: ") and "lacks the token embedding" in err[0]
    lacking = {k: v for k, v in arrays.items() if "experts" not in k and "switch_mlp" not in k}
    lacking = {k.replace("tok_embeddings", "embed_tokens"): v for k, v in lacking.items()}
    with pytest.raises(CheckpointError, match="lacks the routed experts of its 3 MoE layer"):
        from minimax_m3_mlx.loading.checkpoint import prepare_model, read_config

        config, args = read_config(dst)
        prepare_model(config, args, lacking)


def test_layout_detection_names():
    def names(layer):
        return [f"language_model.model.layers.1.{n}" for n in layer] + ["language_model.model.embed_tokens.weight"]

    assert layouts.detect_layout(names(["block_sparse_moe.experts.0.w1.weight"])) == layouts.ORIGINAL
    assert layouts.detect_layout(names(["block_sparse_moe.switch_mlp.gate_proj.weight"])) == layouts.MLX_LM
    assert layouts.detect_layout(names(["block_sparse_moe.switch_mlp.gate_up_proj.weight"])) == layouts.MLX_VLM
    assert layouts.detect_layout(names(["mlp.switch_mlp.gate_proj.weight"])) == layouts.OURS
    assert layouts.detect_layout(["model.language_model.layers.1.mlp.experts.gate_up_proj"]) == layouts.RESAVE


def test_plan_and_debug_log_name_the_layout(sources, made, capsys, caplog):
    import logging

    from minimax_m3_mlx.cli import main

    path = mlx_lm_folder(made, sources, "mxfp8-q4")
    assert main(["plan", "--model", str(path), "--hosts", "64", "--context", "1024"]) == 0
    out = capsys.readouterr().out
    assert layouts.MLX_LM in out and "mxfp8" in out and "4-bit affine g64" in out and "8-bit affine g64" in out
    with caplog.at_level(logging.DEBUG, logger="minimax_m3_mlx"):
        load_model(path)
    assert any(layouts.MLX_LM in r.getMessage() for r in caplog.records)
    caplog.clear()
    logger = logging.getLogger("minimax_m3_mlx")
    level, handlers = logger.level, list(logger.handlers)
    try:  # --verbose turns the package's debug log on
        assert main(["plan", "--model", str(path), "--hosts", "64", "--context", "1024", "--verbose"]) == 0
        assert any(r.getMessage().startswith("checkpoint layout: " + layouts.MLX_LM) for r in caplog.records)
    finally:
        logger.setLevel(level)
        logger.handlers[:] = handlers


def test_convert_refuses_a_quantized_community_folder(sources, made, tmp_path, capsys):
    """Re-quantizing a quantized folder would quantize twice (not exact): refused in one line,
    nothing written."""
    from minimax_m3_mlx.cli import main

    path = mlx_lm_folder(made, sources, "q4")
    out = tmp_path / "requant"
    assert main(["convert", "--hf-path", str(path), "--mlx-path", str(out), "-q", "--q-bits", "8"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minimax-m3 convert: error: ") and "mlx-lm" in err[0], err
    assert "4-bit affine" in err[0]
    assert not out.exists()


def test_convert_requantizes_an_unquantized_community_folder(sources, made, tmp_path, tokens):
    """An unquantized mlx-lm or mlx-vlm folder is as good a source as the release:
    `minimax-m3 convert -q` on it gives exactly what it gives on the release it came from."""
    from minimax_m3_mlx.cli import main

    paths = {"mlx-lm": mlx_lm_folder(made, sources, "unquantized"),
             "mlx-vlm": mlx_vlm_folder(made, sources, "unquantized"), "release": sources[0] / "original"}
    logits = {}
    for name, src in paths.items():
        out = tmp_path / name
        # mlx-vlm's config says no dtype (the converter's default is then bfloat16): say float32
        assert main(["convert", "--hf-path", str(src), "--mlx-path", str(out), "-q", "--q-bits", "4",
                     "--drop-vision", "--no-progress", "--dtype", "float32"]) == 0
        model, _ = load_model(out)
        logits[name] = np.array(model(mx.array(tokens)))
    assert np.array_equal(logits["mlx-lm"], logits["release"])
    assert np.array_equal(logits["mlx-vlm"], logits["release"])


def test_mlx_lm_loader_with_our_classes(sources, made, tokens):
    """mlx-lm's own loader with this package's classes (Model.sanitize maps the names; its
    loader reads each module's quantization back from the tensors too) equals ours."""
    from mlx_lm.utils import load_model as mlx_lm_load

    import minimax_m3_mlx

    path = mlx_lm_folder(made, sources, "mxfp8-q4")
    theirs, _ = mlx_lm_load(path, get_model_classes=minimax_m3_mlx.get_model_classes,
                            model_config={"model_file": None})
    ours, _ = load_model(path)
    assert np.array_equal(np.array(theirs(mx.array(tokens))), np.array(ours(mx.array(tokens))))


def test_broken_quantized_tensors_are_named(sources, made, tmp_path):
    """A quantized layer without its biases, or with scales that do not fit: one line naming it."""
    import shutil

    from minimax_m3_mlx.io.reader import load_arrays

    path = mlx_lm_folder(made, sources, "q4")
    for what, edit, msg in (
        ("biases", lambda a: a.pop(f"{L}.self_attn.q_proj.biases"), "needs biases"),
        ("scales", lambda a: a.__setitem__(f"{L}.self_attn.q_proj.scales", a[f"{L}.self_attn.q_proj.scales"][:, :0]),
         "does not pack"),
    ):
        dst = tmp_path / what
        shutil.copytree(path, dst)
        arrays = load_arrays(dst)
        edit(arrays)
        for f in dst.glob("*.safetensors"):
            f.unlink()
        mx.save_safetensors(str(dst / "model.safetensors"), arrays, metadata={"format": "mlx"})
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in arrays}}))
        with pytest.raises(CheckpointError, match=f"language_model.model.layers.1.self_attn.q_proj: .*{msg}"):
            load_model(dst)


L = "language_model.model.layers.1"


def test_generate_from_community_folders(sources, made, tmp_path, capsys):
    """The commands read these folders as they are, with the tokenizer and processor files
    their converters wrote: text from an mlx-lm folder, an image prompt from an mlx-vlm one."""
    from PIL import Image

    from minimax_m3_mlx.cli import main

    image = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((56, 84, 3)) * 255).astype(np.uint8)).save(image)
    text_only = ["--model", str(mlx_lm_folder(made, sources, "q4"))]
    with_image = ["--model", str(mlx_vlm_folder(made, sources, "q4")), "--image", str(image)]
    prompt_tokens = []
    for extra in (text_only, with_image):
        assert main(["generate", *extra, "--prompt", "what is this", "--max-tokens", "3"]) == 0
        out = capsys.readouterr().out
        assert "Generation: 3 tokens" in out, out
        prompt_tokens.append(int(out.split("Prompt: ")[1].split(" tokens")[0]))
    assert prompt_tokens[1] > prompt_tokens[0]  # the image's placeholder tokens


@pytest.mark.parametrize("converter", ["mlx-lm", "mlx-vlm"])
def test_community_folder_streams_its_experts(sources, made, tokens, converter):
    """--expert-memory on a folder mlx-lm's converter wrote (experts stacked as ours, under
    `block_sparse_moe.switch_mlp`: here of two bit widths) or mlx-vlm's (gate and up fused,
    the shared expert packed in as one more expert): a pool of a few experts gives the
    resident logits. A fused folder is refused under tensor parallelism, in one line."""
    from minimax_m3_mlx.io.reader import locate
    from minimax_m3_mlx.loading.streamed import stored_tensors
    from minimax_m3_mlx.model.experts import ExpertMemoryError, layer_parts, layer_tensors

    path = (mlx_lm_folder(made, sources, "mixed_3_6") if converter == "mlx-lm"
            else mlx_vlm_folder(made, sources, "q4"))
    want = np.array(load_model(path)[0](mx.array(tokens)))
    model, _ = load_model(path, expert_memory=10**9)
    layer = model.expert_streamer.layers[0]
    slot = sum(lay.expert_nbytes for lay in model.expert_streamer.layers)  # one expert in every layer
    model, _ = load_model(path, expert_memory=3 * slot)
    got = np.array(model(mx.array(tokens)))
    assert model.expert_streamer.n_slots == 3 and model.expert_streamer.stats.misses > 0
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-6
    fused = any("gate_up_proj" in k for k in locate(path))
    assert fused == (converter == "mlx-vlm")
    if fused:
        from minimax_m3_mlx.loading.sharded import check_experts

        moe = next(i for i, lay in enumerate(model.layers) if lay.is_moe)
        with pytest.raises(ExpertMemoryError, match="does not run tensor parallel on a folder whose gate and up"):
            layer_parts(layer_tensors(stored_tensors(path), moe), 2, 0)

        class TwoRanks:  # an mx.distributed group's shape, for the check each rank makes from the headers
            size, rank = (lambda self: 2), (lambda self: 0)

        # Pipeline (tensor mode is refused above): the shared expert is inside the tensors the ranks would skip.
        with pytest.raises(ExpertMemoryError, match="runs on one Mac for a folder whose gate and up are fused"):
            check_experts(path, TwoRanks(), mode="pipeline", expert_memory=10**9)
