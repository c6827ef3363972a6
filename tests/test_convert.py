"""minimax-m3 convert: every source layout, recipe and q-mode, checked against the reference.

Each converted tiny model is loaded with minimax_m3_mlx.load_model and with mlx-lm's
load_model (our classes via get_model_classes, and the folder's model_file via
trust_remote_code), and its logits over 300 positions are compared with the transformers
reference built on the dequantised source weights:
- unquantised: the streaming path must be exact (relative error < 1e-4);
- quantised: no worse than quantising the same dequantised weights in memory with
  nn.quantize at the same bits / group size / mode (1.05x slack on the relative error,
  0.02 on top-1 agreement); both figures are printed (pytest -s);
- 8-bit affine: within 2e-2 absolute, on a variant of the tiny config without discrete
  choices (all experts active, every block kept). With routing and block selection
  active, a random tiny model turns 8-bit weight noise into flipped choices and ~0.2
  logit error whatever the converter does (nn.quantize in memory gives the same).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map_with_path

import minimax_m3_mlx
from minimax_m3_mlx import convert as conv
from minimax_m3_mlx import synthetic
from minimax_m3_mlx.convert import recipes
from minimax_m3_mlx import CheckpointError, load_model
from reference import build_reference, reference_logits, rel_err

ROOT = Path(__file__).resolve().parents[1]
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 150))  # 300 positions; selection is active
CONFIGS = {
    "tiny": synthetic.tiny_config(),
    # No discrete choice left to flip: every expert is used, every block is kept.
    "smooth": synthetic.tiny_config({"num_experts_per_tok": 8, "sparse_attention_config": {"sparse_topk_blocks": 64}}),
}
# Layouts whose dequantised weights are the same (same quantiser): one reference each.
REF_KEY = {"original": "float", "resave": "float", "mxfp8": "mx", "fp8_ue8m0": "mx", "fp8": "fp8"}
FP8_BLOCK = (24, 40)  # ragged 128x128-style blocks on the tiny shapes
QUIET = dict(progress=False, log=lambda *a: None)


# -- sources, references and baselines (cached per module) ---------------------------------------------
class Store:
    def __init__(self, root: Path):
        self.root = root
        self.sources, self.refs, self.ref_weights = {}, {}, {}
        self.weights = {k: synthetic.random_weights(c, seed=1) for k, c in CONFIGS.items()}

    def source(self, layout: str, cfg: str = "tiny") -> Path:
        """A tiny checkpoint in `layout` (several shards, with vision tensors on the original one)."""
        key = (layout, cfg)
        if key not in self.sources:
            path = self.root / f"src-{cfg}-{layout}"
            weights = dict(self.weights[cfg])
            if layout == "original":  # vision tensors must be set aside, not choke the converter
                _, vision = build_reference(CONFIGS[cfg], weights)
                weights.update(vision)
            ref = synthetic.write_checkpoint(path, CONFIGS[cfg], weights, layout, shard_bytes=150_000,
                                             fp8_block=FP8_BLOCK)
            self.ref_weights[(REF_KEY[layout], cfg)] = {k: v for k, v in ref.items()
                                                        if not k.startswith(("model.vision", "model.multi"))}
            self.sources[key] = path
        return self.sources[key]

    def reference(self, layout: str, cfg: str = "tiny") -> np.ndarray:
        self.source(layout, cfg)
        key = (REF_KEY[layout], cfg)
        if key not in self.refs:
            model, _ = build_reference(CONFIGS[cfg], self.ref_weights[key])
            self.refs[key] = reference_logits(model, TOKENS)
        return self.refs[key]

    def baseline(self, layout: str, policy, dtype: str, cfg: str = "tiny") -> np.ndarray:
        """The same dequantised weights quantised in memory with nn.quantize (what conversion must match)."""
        self.source(layout, cfg)
        path = self.root / f"deq-{cfg}-{REF_KEY[layout]}"
        if not path.exists():
            synthetic.write_checkpoint(path, CONFIGS[cfg], self.ref_weights[(REF_KEY[layout], cfg)], "resave",
                                       tokenizer=False)
        model, _ = load_model(path)
        cast = model.cast_predicate
        target = getattr(mx, dtype)
        model.update(tree_map_with_path(lambda k, v: v.astype(target) if cast(k) else v, model.parameters()))

        def predicate(p, m):
            if not hasattr(m, "to_quantized") or policy is None:
                return False
            spec = policy.spec_for(p, m.weight.shape[-1])
            return spec.as_config() if spec else False

        nn.quantize(model, class_predicate=predicate)
        return np.array(model(mx.array(TOKENS)).astype(mx.float32))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("convert"))


def logits_all_loaders(path: Path) -> np.ndarray:
    """Logits through our loader and mlx-lm's two routes; all three must agree exactly."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    toks = mx.array(TOKENS)
    ours, _ = load_model(path)
    via_classes, _ = mlx_lm_load_model(path, get_model_classes=minimax_m3_mlx.get_model_classes,
                                       model_config={"model_file": None})
    via_file, _ = mlx_lm_load_model(path, trust_remote_code=True)
    assert type(via_file).__module__ == "minimax_m3_mlx.model.model"  # our implementation, not mlx-lm's port
    out = [np.array(m(toks).astype(mx.float32)) for m in (ours, via_classes, via_file)]
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    return out[0]


def top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def shard_digests(path: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.glob("*.safetensors"))}


def file_tensors(path: Path) -> dict:
    out = {}
    for f in path.glob("*.safetensors"):
        out.update(mx.load(str(f)))
    return out


# -- parity -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", synthetic.LAYOUTS)
def test_unquantised_conversion_is_exact(store, layout, tmp_path):
    if layout == "original":  # the case streaming must handle: one layer's experts in several shards
        index = json.loads((store.source(layout) / "model.safetensors.index.json").read_text())["weight_map"]
        assert len({f for k, f in index.items() if "layers.1.block_sparse_moe.experts." in k}) > 1
    out = tmp_path / "out"
    conv.convert(str(store.source(layout)), str(out), shard_bytes=60_000, **QUIET)
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert not list(out.glob(".*")) and not list(tmp_path.glob(".*")), "bookkeeping left behind"
    err = rel_err(logits_all_loaders(out), store.reference(layout))
    print(f"\n{layout:10} unquantised: rel err {err:.2e}")
    assert err < 1e-4


QUANT_CASES = [
    ("original", dict(quantize=True, q_bits=8, q_group_size=32)),
    ("original", dict(recipe="mac-192gb", q_group_size=32)),
    ("original", dict(quantize=True, q_bits=4, q_group_size=32, dtype="bfloat16")),
    ("resave", dict(quantize=True, q_mode="mxfp4")),
    ("resave", dict(recipe="mac-256gb", q_group_size=32)),
    ("mxfp8", dict(quantize=True, q_bits=4, q_group_size=32)),
    ("mxfp8", dict(quantize=True, q_mode="mxfp8")),
    ("mxfp8", dict(recipe="mac-512gb", q_group_size=32)),
    ("fp8_ue8m0", dict(quantize=True, q_mode="nvfp4")),
    ("fp8_ue8m0", dict(quantize=True, q_bits=3, q_group_size=32)),
    ("fp8", dict(recipe="mac-256gb", q_group_size=32)),
    ("fp8", dict(quantize=True, q_bits=2, q_group_size=64)),
]


@pytest.mark.parametrize("layout,flags", QUANT_CASES, ids=[f"{l}-{'-'.join(map(str, f.values()))}"
                                                           for l, f in QUANT_CASES])
def test_quantised_conversion_matches_in_memory_quantisation(store, layout, flags, tmp_path):
    out = tmp_path / "out"
    r = conv.convert(str(store.source(layout)), str(out), shard_bytes=80_000, **flags, **QUIET)
    ref = store.reference(layout)
    got = logits_all_loaders(out)
    policy = recipes.make_policy(flags.get("quantize", False), flags.get("q_bits"), flags.get("q_group_size"),
                                 flags.get("q_mode", "affine"), flags.get("recipe"))
    base = store.baseline(layout, policy, flags.get("dtype", "float32"))
    err, base_err = rel_err(got, ref), rel_err(base, ref)
    agree, base_agree = top1(got, ref), top1(base, ref)
    print(f"\n{layout:10} {str(flags):55} rel err {err:.4f} (nn.quantize {base_err:.4f}), top-1 {agree:.3f} "
          f"(nn.quantize {base_agree:.3f}) over {TOKENS.size} positions, {r.bits_per_weight:.2f} bits/weight")
    assert err <= 1.05 * base_err + 1e-5
    assert agree >= base_agree - 0.02
    assert err > 1e-4, "quantisation left no trace: was anything quantised?"


@pytest.mark.parametrize("layout", ["original", "mxfp8", "fp8"])
def test_8bit_affine_within_2e2(store, layout, tmp_path):
    out = tmp_path / "out"
    conv.convert(str(store.source(layout, "smooth")), str(out), quantize=True, q_bits=8, q_group_size=32, **QUIET)
    got, ref = logits_all_loaders(out), store.reference(layout, "smooth")
    err = rel_err(got, ref)
    print(f"\n{layout:10} 8-bit affine g32 (all experts, all blocks): rel err {err:.4f}, top-1 {top1(got, ref):.3f}")
    assert err < 2e-2


@pytest.mark.parametrize("layout", ["fp8", "mxfp8"])
def test_row_blocks_give_the_same_files(store, layout, tmp_path):
    """Big matrices are read in row blocks (FP8 blocks kept whole): the files must not change."""
    src = str(store.source(layout))
    whole = conv.convert(src, str(tmp_path / "whole"), recipe="mac-256gb", q_group_size=32, **QUIET)
    rows = conv.convert(src, str(tmp_path / "rows"), recipe="mac-256gb", q_group_size=32, chunk_elements=1024, **QUIET)
    assert rows.items_run > whole.items_run + 20
    assert shard_digests(tmp_path / "rows") == shard_digests(tmp_path / "whole")


# -- what lands in the files -------------------------------------------------------------------------------
def test_mxfp8_source_to_4bit_has_no_8bit_left(store, tmp_path):
    """The failure this converter exists for: MXFP8 layers must really become 4-bit."""
    out = tmp_path / "out"
    conv.convert(str(store.source("mxfp8")), str(out), quantize=True, q_bits=4, q_group_size=32, **QUIET)
    t = file_tensors(out)
    cfg = CONFIGS["tiny"]["text_config"]
    H, I, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    w = t["language_model.model.layers.1.mlp.switch_mlp.gate_proj.weight"]
    assert w.shape == (E, I, H * 4 // 32) and w.dtype == mx.uint32
    assert not [k for k, v in t.items() if k.endswith(".scales") and v.dtype == mx.uint8], "mxfp8 scales left"
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (4, 32, "affine")
    assert not [k for k, v in q.items() if isinstance(v, dict)], "per-layer overrides in a uniform conversion"


def test_mxfp8_to_mxfp8_copies_packed_bytes(store, tmp_path):
    """An MXFP8 layer with an mxfp8 target is copied bit for bit (no dequantise/requantise rounding)."""
    src = store.source("mxfp8")
    out = tmp_path / "out"
    conv.convert(str(src), str(out), quantize=True, q_mode="mxfp8", **QUIET)
    source = file_tensors(src)
    t = file_tensors(out)
    E = CONFIGS["tiny"]["text_config"]["num_local_experts"]
    base = "language_model.model.layers.2.block_sparse_moe.experts"
    for ours, w in (("gate_proj", "w1"), ("down_proj", "w2")):
        got = t[f"language_model.model.layers.2.mlp.switch_mlp.{ours}.weight"]
        want = mx.stack([source[f"{base}.{e}.{w}.weight"] for e in range(E)])
        np.testing.assert_array_equal(np.array(got.view(mx.uint8)), np.array(want))
        scales = mx.stack([source[f"{base}.{e}.{w}.weight_scale_inv"] for e in range(E)])
        np.testing.assert_array_equal(np.array(t[f"language_model.model.layers.2.mlp.switch_mlp.{ours}.scales"]),
                                      np.array(scales))


def test_recipe_bits_per_part(store, tmp_path):
    out = tmp_path / "out"
    conv.convert(str(store.source("resave")), str(out), recipe="mac-256gb", q_group_size=32, **QUIET)
    t = file_tensors(out)
    H = CONFIGS["tiny"]["text_config"]["hidden_size"]
    L = "language_model.model.layers"

    def bits(path):
        w = t[f"{path}.weight"]
        assert w.dtype == mx.uint32, f"{path} is not quantised"
        in_dim = t[f"{path}.scales"].shape[-1] * 32
        return w.shape[-1] * 32 // in_dim

    assert bits(f"{L}.1.mlp.switch_mlp.up_proj") == 3 and bits(f"{L}.3.mlp.switch_mlp.down_proj") == 3
    for path in (f"{L}.0.self_attn.q_proj", f"{L}.2.self_attn.o_proj", f"{L}.1.self_attn.indexer.q_proj",
                 f"{L}.1.mlp.shared_experts.down_proj", f"{L}.0.mlp.gate_proj",
                 "language_model.model.embed_tokens", "language_model.lm_head"):
        assert bits(path) == 6, path
    # the router stays high precision; its bias stays float32
    assert t[f"{L}.1.mlp.gate.weight"].dtype == mx.float32 and t[f"{L}.1.mlp.gate.weight"].shape[-1] == H
    assert f"{L}.1.mlp.gate.scales" not in t
    assert t[f"{L}.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q[f"{L}.1.mlp.switch_mlp.up_proj"] == {"group_size": 32, "bits": 3, "mode": "affine"}
    assert q["bits"] == 6 and f"{L}.1.mlp.gate" not in q


def test_router_bias_stays_float32_with_bfloat16_output(store, tmp_path):
    out = tmp_path / "out"
    conv.convert(str(store.source("original")), str(out), recipe="mac-512gb", dtype="bfloat16", **QUIET)
    t = file_tensors(out)
    assert t["language_model.model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    assert t["language_model.model.layers.1.mlp.gate.weight"].dtype == mx.bfloat16
    assert t["language_model.model.norm.weight"].dtype == mx.bfloat16
    assert t["language_model.model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16


@pytest.mark.parametrize("flags", [dict(recipe=n, q_group_size=32) for n in recipes.RECIPES]
                         + [dict(quantize=True, q_mode="nvfp4"), dict(quantize=False, dtype="bfloat16")],
                         ids=lambda f: "-".join(map(str, f.values())))
def test_estimated_size_matches_files(store, flags, tmp_path):
    out = tmp_path / "out"
    r = conv.convert(str(store.source("original")), str(out), shard_bytes=100_000, **QUIET, **flags)
    files = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert files == r.file_bytes
    policy = recipes.make_policy(flags.get("quantize", False), None, flags.get("q_group_size"),
                                 flags.get("q_mode", "affine"), flags.get("recipe"))
    est = recipes.estimate_size(CONFIGS["tiny"], policy, flags.get("dtype", "float32"), shard_bytes=100_000)
    assert abs(est.file_bytes - files) / files < 0.02, (est.file_bytes, files)
    assert est.tensor_bytes == r.tensor_bytes and est.params == r.params


def test_list_recipes_sizes_the_real_model(capsys):
    assert conv.main(["--list-recipes"]) == 0
    text = capsys.readouterr().out
    real = recipes.load_config(recipes.REAL_CONFIG)
    sizes = {n: recipes.estimate_size(real, p).file_bytes / 1e9 for n, p in recipes.RECIPES.items()}
    for name, gb in sizes.items():
        assert any(line.startswith(name) and f" {gb:.1f} " in line for line in text.splitlines()), name
    # The real model: 428e9 parameters (426e9 text), 4-bit g64 ~ 4.5 bits ~ 241 GB, 3-bit experts ~ 187 GB
    assert 235 < sizes["mac-512gb"] < 245
    assert sizes["mac-192gb"] < sizes["mac-256gb"] < sizes["mac-512gb"]
    for name, p in recipes.RECIPES.items():
        assert sizes[name] < 0.8 * p.mac_gb * 2**30 / 1e9, f"{name} leaves no room for the KV cache and macOS"
    # The sizes count the vision tower (real vision_config: ~0.87e9 parameters, 8-bit affine g64
    # ~0.92 GB in every recipe); --drop-vision leaves it out.
    assert "include the vision tower" in text
    text_only = {n: recipes.estimate_size(real, p, vision=False).file_bytes / 1e9 for n, p in recipes.RECIPES.items()}
    for name in sizes:
        assert 0.85 < sizes[name] - text_only[name] < 1.0, (name, sizes[name], text_only[name])
    assert conv.main(["--list-recipes", "--drop-vision"]) == 0
    text = capsys.readouterr().out
    for name, gb in text_only.items():
        assert any(line.startswith(name) and f" {gb:.1f} " in line for line in text.splitlines()), name


# -- safety ------------------------------------------------------------------------------------------------
def test_interrupted_run_resumes_from_verified_shards(store, tmp_path, monkeypatch):
    src = store.source("fp8")
    flags = dict(recipe="mac-256gb", q_group_size=32, shard_bytes=20_000)
    clean = conv.convert(str(src), str(tmp_path / "clean"), **flags, **QUIET)
    assert clean.shards >= 6

    out = tmp_path / "out"
    finished = []
    real_finish = conv.writer.finish_shard

    def crash_after_three(folder, shard, manifest):
        if len(finished) == 3:
            raise RuntimeError("simulated crash")
        real_finish(folder, shard, manifest)
        finished.append(shard.name)

    monkeypatch.setattr(conv.writer, "finish_shard", crash_after_three)
    with pytest.raises(RuntimeError, match="simulated crash"):
        conv.convert(str(src), str(out), **flags, **QUIET)
    assert not out.exists(), "a failed run left an output folder"
    partial = tmp_path / ".out.partial"
    manifest = json.loads((partial / conv.MANIFEST).read_text())
    assert sorted(manifest["shards"]) == sorted(finished)
    # damage one finished shard without changing its size: the hash must catch it
    victim = partial / finished[1]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))

    monkeypatch.setattr(conv.writer, "finish_shard", real_finish)
    logs = []
    r = conv.convert(str(src), str(out), **flags, progress=False, log=logs.append)
    assert r.shards_reused == 2
    assert r.items_run < clean.items_run
    assert any("sha256" in line for line in logs)
    assert shard_digests(out) == shard_digests(tmp_path / "clean")
    assert not partial.exists()


def test_stale_partial_folder_from_other_options_is_discarded(store, tmp_path, monkeypatch):
    src = store.source("original")
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "model-00001-of-00009.safetensors").write_bytes(b"junk")
    (partial / conv.MANIFEST).write_text(json.dumps({"plan": "other", "shards": {}}))
    conv.convert(str(src), str(tmp_path / "out"), quantize=True, q_bits=4, q_group_size=32, **QUIET)
    assert not (tmp_path / "out" / "model-00001-of-00009.safetensors").exists()
    load_model(tmp_path / "out")


def test_second_conversion_to_the_same_output_is_refused(store, tmp_path):
    import fcntl

    with open(tmp_path / ".out.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(conv.ConvertError, match="another conversion is writing"):
            conv.convert(str(store.source("original")), str(tmp_path / "out"), **QUIET)
    assert not (tmp_path / "out").exists()


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _convert_fails(src: Path, out: Path, match: str):
    with pytest.raises(CheckpointError, match=match):
        conv.convert(str(src), str(out), quantize=True, **QUIET)
    assert not out.exists()


def test_truncated_shard_is_named(store, tmp_path):
    src = _copy(store.source("mxfp8"), tmp_path / "src")
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _convert_fails(src, tmp_path / "out", f"{shard.name}.*truncated")


def test_corrupt_header_is_named(store, tmp_path):
    src = _copy(store.source("original"), tmp_path / "src")
    shard = sorted(src.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json at "
    shard.write_bytes(bytes(data))
    _convert_fails(src, tmp_path / "out", f"{shard.name}.*corrupt safetensors header")


def test_index_naming_a_missing_file_is_named(store, tmp_path):
    src = _copy(store.source("resave"), tmp_path / "src")
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.unlink()
    _convert_fails(src, tmp_path / "out", f"names shard.*{shard.name}")


def _drop_from_shard(src, name):
    """Delete tensor `name` from its shard (the index still names it); returns the shard."""
    from safetensors.numpy import load_file, save_file

    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"][name]
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard))
    return shard


def _drop_from_index(src, name):
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))


def test_missing_tensor_is_named(store, tmp_path):
    src = _copy(store.source("original"), tmp_path / "src")
    name = "language_model.model.layers.2.self_attn.k_proj.weight"
    shard = _drop_from_shard(src, name)
    # the index still places it there: the shard is named
    _convert_fails(src, tmp_path / "out", f"{shard.name}.*{name}")
    # gone from the index too: the tensor is named
    _drop_from_index(src, name)
    _convert_fails(src, tmp_path / "out", f"lacks 1 tensor.*{name}")


def test_missing_expert_is_named(store, tmp_path):
    src = _copy(store.source("original"), tmp_path / "src")
    name = "language_model.model.layers.3.block_sparse_moe.experts.5.w3.weight"
    _drop_from_shard(src, name)
    _drop_from_index(src, name)
    _convert_fails(src, tmp_path / "out", r"layers\.3\.mlp\.switch_mlp\.up_proj.*rows 5\.\.6")


def test_refuses_to_overwrite_unless_asked(store, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(conv.ConvertError, match="already exists"):
        conv.convert(str(store.source("original")), str(out), **QUIET)
    assert (out / "keep.txt").read_text() == "precious"
    assert not (tmp_path / ".out.partial").exists()
    conv.convert(str(store.source("original")), str(out), overwrite=True, quantize=True, q_group_size=32, **QUIET)
    assert not (out / "keep.txt").exists()
    load_model(out)


def test_cli_errors_and_success(store, tmp_path, capsys):
    from minimax_m3_mlx.cli import main

    src = str(store.source("fp8_ue8m0"))
    assert main(["convert", "--hf-path", src, "--mlx-path", str(tmp_path / "a"), "--recipe", "mac-256gb",
                 "--q-bits", "4"]) == 1
    assert "--q-bits" in capsys.readouterr().err
    assert main(["convert", "--hf-path", src, "--mlx-path", str(tmp_path / "a"), "-q", "--q-mode", "mxfp4",
                 "--q-bits", "3"]) == 1
    assert "mxfp4" in capsys.readouterr().err
    assert main(["convert", "--hf-path", src, "--mlx-path", str(tmp_path / "a"), "-q", "--q-group-size", "32",
                 "--no-progress"]) == 0
    assert "bits/weight" in capsys.readouterr().out
    assert main(["convert", "--hf-path", src, "--mlx-path", str(tmp_path / "a"), "-q"]) == 1
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: only 8 or 16
        main(["convert", "--hf-path", src, "--mlx-path", str(tmp_path / "b"), "-q", "--vision-bits", "4"])
    assert "--vision-bits" in capsys.readouterr().err


def test_repo_id_goes_through_snapshot_download(store, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        return str(store.source("mxfp8"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    conv.convert("MiniMaxAI/MiniMax-M3-MXFP8", str(tmp_path / "out"), quantize=True, q_group_size=32, **QUIET)
    assert calls and calls[0][0] == "MiniMaxAI/MiniMax-M3-MXFP8"
    assert "*.safetensors" in calls[0][2] and "*.json" in calls[0][2]
    load_model(tmp_path / "out")


def test_model_file_without_the_package_says_how_to_install_it(monkeypatch):
    """The hint in a converted folder's model file names a way to install that works (the
    package is not on PyPI)."""
    from minimax_m3_mlx.convert import run as conv_run

    monkeypatch.setitem(sys.modules, "minimax_m3_mlx.config", None)  # import fails as without the package
    with pytest.raises(ImportError) as e:
        exec(compile(conv_run.MODEL_FILE_TEXT, conv.MODEL_FILE, "exec"), {})
    assert "pip install -e /path/to/minimax_m3_mlx" in str(e.value) and "not on PyPI" in str(e.value)


# -- tokenizer, chat template, mlx_lm.generate ------------------------------------------------------------
def test_tokenizer_and_chat_template_copied_and_mlx_lm_generate_runs_ours(store, tmp_path):
    from mlx_lm.generate import generate

    src = _copy(store.source("mxfp8"), tmp_path / "src")
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    out = tmp_path / "out"
    conv.convert(str(src), str(out), recipe="mac-256gb", q_group_size=32, **QUIET)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", conv.MODEL_FILE):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_file"] == conv.MODEL_FILE

    prompt = "hello there"
    model, tokenizer = minimax_m3_mlx.load(out)
    expected = generate(model, tokenizer, prompt=tokenizer.encode(prompt, add_special_tokens=True), max_tokens=8)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(out), "--trust-remote-code",
                          "--prompt", prompt, "--max-tokens", "8", "--ignore-chat-template"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    text = res.stdout.split("==========")[1].strip("\n")
    assert text == expected
    assert "Generation:" in res.stdout


# -- the vision tower ----------------------------------------------------------------------------------------
VISION_FLAGS = dict(recipe="mac-512gb", q_group_size=32)  # 4-bit everywhere in the text model


class VisionSources:
    """A tiny checkpoint with every vision tensor random (test_vision's case) in several layouts.

    projector_hidden_size 64 (test_vision uses 48) so that every vision Linear's input width
    is a multiple of the group size 32 and all of them can be quantised.
    """

    def __init__(self, root: Path):
        from test_vision import random_vision_weights, vision_config

        self.root = root
        self.config = vision_config()
        self.config["projector_hidden_size"] = 64
        self.text = synthetic.random_weights(self.config, seed=3)
        _, init = build_reference(self.config, self.text)
        self.vision = random_vision_weights(init, seed=4)
        self.paths, self.features = {}, {}

    def source(self, layout: str) -> Path:
        """'original' (published vision names), 'resave' (transformers names), or 'fp8-vision':
        the FP8 128x128-style layout with a vision fc1 FP8-quantised too."""
        if layout not in self.paths:
            path = self.root / f"vsrc-{layout}"
            weights = {**self.text, **self.vision}
            if layout != "fp8-vision":
                synthetic.write_checkpoint(path, self.config, weights, layout, shard_bytes=150_000)
            else:
                tensors, cfg, _ = synthetic.layout_tensors(self.config, weights, "fp8", FP8_BLOCK)
                name = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
                q, s, _ = synthetic.quantize_fp8_blocks(tensors[name][0], FP8_BLOCK)
                tensors[name] = (q, "F8_E4M3")
                tensors[name.replace(".weight", ".weight_scale_inv")] = (s, "F32")
                path.mkdir()
                synthetic.write_safetensors(path / "model.safetensors", tensors)
                (path / "config.json").write_text(json.dumps(cfg))
                synthetic.write_tiny_tokenizer(path, cfg)  # convert refuses a source without one
            self.paths[layout] = path
        return self.paths[layout]

    def features_of(self, layout: str, bits: int = 16) -> np.ndarray:
        """The image features of the source loaded as it is (float32; FP8 dequantised exactly),
        or with its vision Linear layers quantised in memory by nn.quantize (8-bit affine g32)."""
        if (layout, bits) not in self.features:
            from minimax_m3_mlx.model.vision import encode_grids
            from test_vision import media

            model = load_model(self.source(layout))[0]
            if bits != 16:
                nn.quantize(model, group_size=32, bits=bits,
                            class_predicate=lambda p, m: p.startswith(("vision_tower.", "multi_modal_projector."))
                            and hasattr(m, "to_quantized"))
            img, img_grid, _, _ = media()
            self.features[(layout, bits)] = np.array(encode_grids(model, img, img_grid))
        return self.features[(layout, bits)]


@pytest.fixture(scope="module")
def vision_sources(tmp_path_factory):
    return VisionSources(tmp_path_factory.mktemp("vision"))


def vision_linears(model) -> dict:
    return {p: m for p, m in model.named_modules()
            if p.startswith(("vision_tower.", "multi_modal_projector."))
            and isinstance(m, (nn.Linear, nn.QuantizedLinear))}


@pytest.mark.parametrize("layout,vision_bits,chunk", [("original", 8, None), ("resave", 8, None),
                                                      ("fp8-vision", 8, 512), ("original", 16, None)])
def test_vision_tower_kept_at_8_bits_or_unquantised(vision_sources, layout, vision_bits, chunk, tmp_path):
    """4-bit text, vision Linear layers 8-bit affine (or unquantised with --vision-bits 16); the patch
    embedding and LayerNorms float; both loaders build the tower; features near the unquantised ones."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from minimax_m3_mlx.model.vision import encode_grids
    from test_vision import media

    out = tmp_path / "out"
    extra = {"chunk_elements": chunk} if chunk else {}  # 512: vision matrices in row blocks (FP8 blocks whole)
    r = conv.convert(str(vision_sources.source(layout)), str(out), vision_bits=vision_bits, shard_bytes=60_000,
                     **VISION_FLAGS, **extra, **QUIET)
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"] == vision_sources.config["vision_config"]
    assert config["projector_hidden_size"] == 64
    t = file_tensors(out)
    patch = t["vision_tower.embeddings.proj.weight"]
    assert patch.dtype == mx.float32 and patch.ndim == 5 and patch.shape[-4:] == (3, 2, 14, 14)  # 1176 wide
    assert t["vision_tower.layers.0.layer_norm1.weight"].dtype == mx.float32
    assert "vision_tower.embeddings.proj.scales" not in t and "vision_tower.pre_layrnorm.scales" not in t
    q = config["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 32)
    # the size estimate counts the tower (2% check; the tensor bytes exactly)
    policy = recipes.make_policy(recipe="mac-512gb", group_size=32, vision_bits=vision_bits)
    est = recipes.estimate_size(vision_sources.config, policy, "float32", shard_bytes=60_000)
    files = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert abs(est.file_bytes - files) / files < 0.02 and est.tensor_bytes == r.tensor_bytes
    assert est.params == r.params and est.by_category["vision"][0] > 0

    img, img_grid, _, _ = media()
    want = vision_sources.features_of(layout)
    feats = []
    for model in (load_model(out)[0],
                  mlx_lm_load_model(out, get_model_classes=minimax_m3_mlx.get_model_classes,
                                    model_config={"model_file": None})[0]):
        assert model.has_vision
        linears = vision_linears(model)
        assert len(linears) == 2 * 6 + 4  # q/k/v/out, fc1/fc2 per layer; the projector's four
        for path, m in linears.items():
            if vision_bits == 8:
                assert isinstance(m, nn.QuantizedLinear) and (m.bits, m.group_size, m.mode) == (8, 32, "affine"), path
            else:
                assert type(m) is nn.Linear and m.weight.dtype == mx.float32, path
        assert type(model.vision_tower.embeddings.proj.weight) is mx.array
        assert model.vision_tower.embeddings.proj.weight.shape == patch.shape
        assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
        assert model.layers[0].self_attn.q_proj.bits == 4
        feats.append(np.array(encode_grids(model, img, img_grid)))
    np.testing.assert_array_equal(feats[0], feats[1])
    err = rel_err(feats[0], want)
    if vision_bits == 8:  # and no worse than nn.quantize on the same weights in memory
        base = rel_err(vision_sources.features_of(layout, 8), want)
        print(f"\n{layout:10} vision 8-bit g32 (text 4-bit g32): feature rel err {err:.2e} "
              f"(nn.quantize {base:.2e}), {r.bits_per_weight:.2f} bits/weight")
        assert 1e-4 < err < 2e-2 and err <= 1.05 * base
    else:
        assert err < 1e-6


def test_unquantised_conversion_keeps_the_multimodal_model_exact(vision_sources, tmp_path):
    """No -q: the converted folder's logits on a prompt with two images and a video equal
    transformers' reference (float32, 1e-4), as the source's do (tests/test_vision.py)."""
    from test_vision import media, ours_logits, prompt, reference_logits

    out = tmp_path / "out"
    conv.convert(str(vision_sources.source("resave")), str(out), **QUIET)
    reference, _ = build_reference(vision_sources.config, {**vision_sources.text, **vision_sources.vision})
    img, img_grid, vid, vid_grid = media()
    ids = prompt()
    ref = reference_logits(reference, ids, img, img_grid, vid, vid_grid)
    err = rel_err(ours_logits(load_model(out)[0], ids, img, img_grid, vid, vid_grid), ref)
    assert err < 1e-4, f"rel err {err:.2e}"


def test_drop_vision_gives_a_text_only_model(vision_sources, tmp_path):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    src = vision_sources.source("original")
    out = tmp_path / "out"
    logs = []
    r = conv.convert(str(src), str(out), drop_vision=True, **VISION_FLAGS, progress=False, log=logs.append)
    assert any("--drop-vision" in line for line in logs)
    config = json.loads((out / "config.json").read_text())
    assert "vision_config" not in config and "projector_hidden_size" not in config
    t = file_tensors(out)
    assert not [k for k in t if k.startswith(("vision_tower", "multi_modal_projector"))]
    assert not [k for k in config["quantization"] if k.startswith(("vision_tower", "multi_modal_projector"))]
    for model in (load_model(out)[0],
                  mlx_lm_load_model(out, get_model_classes=minimax_m3_mlx.get_model_classes,
                                    model_config={"model_file": None})[0]):
        assert not model.has_vision
    policy = recipes.make_policy(recipe="mac-512gb", group_size=32)
    est = recipes.estimate_size(vision_sources.config, policy, "float32", vision=False)
    assert est.tensor_bytes == r.tensor_bytes and "vision" not in est.by_category
    with pytest.raises(conv.ConvertError, match="--vision-bits"):
        conv.convert(str(src), str(tmp_path / "x"), drop_vision=True, vision_bits=8, **VISION_FLAGS, **QUIET)
    # vision tensors beside a config without vision_config are left out, as the loader does
    cfg_less = _copy(src, tmp_path / "src")
    cfg = json.loads((cfg_less / "config.json").read_text())
    del cfg["vision_config"]
    (cfg_less / "config.json").write_text(json.dumps(cfg))
    conv.convert(str(cfg_less), str(tmp_path / "out2"), **VISION_FLAGS, **QUIET)
    assert not [k for k in file_tensors(tmp_path / "out2") if k.startswith("vision_tower")]


def test_missing_vision_tensor_is_named(vision_sources, tmp_path):
    weights = {**vision_sources.text, **vision_sources.vision}
    del weights["model.multi_modal_projector.merge_linear_1.bias"]
    synthetic.write_checkpoint(tmp_path / "src", vision_sources.config, weights, "resave")
    _convert_fails(tmp_path / "src", tmp_path / "out", r"lacks 1 tensor.*multi_modal_projector\.merge_linear_1\.bias")
