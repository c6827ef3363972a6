"""Distributed inference on localhost: `mlx.launch --backend ring` with 2 and 4 processes.

One launch per process count runs every case in tests/dist_worker.py (loading is the
expensive part of a launch: ~4 s of imports per process); each test below checks one
property of the results against the single-process model (minimax_m3_mlx.load_model) run
here. Checkpoints are tiny but selection is active: a 66-token prompt over blocks of 4
with top-3 blocks keeps 3 of 17 blocks per query and KV group.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from minimax_m3_mlx.io import reader
from minimax_m3_mlx.loading import sharded
from minimax_m3_mlx.model import collectives
from minimax_m3_mlx.parallel import sizing
from minimax_m3_mlx.weights import sharding
from minimax_m3_mlx import synthetic
from minimax_m3_mlx.cli import plan
from minimax_m3_mlx import load_model
from minimax_m3_mlx.config import ModelArgs

sys.path.insert(0, str(Path(__file__).parent))
from ring import launch_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "dist_worker.py"
TOL = 1e-5
HEADS4 = {"num_key_value_heads": 4, "sparse_attention_config": {"sparse_num_index_heads": 4}}
# Intermediate sizes that split into whole quantisation groups (32) over 4 ranks.
WIDE = dict(HEADS4, intermediate_size=128, shared_intermediate_size=128, dense_intermediate_size=128)
PROMPT = np.random.default_rng(5).integers(0, 256, 66).tolist()
DECODE = np.random.default_rng(6).integers(0, 256, 8).tolist()
GEN_PREFILL_STEP = 16  # mlx-lm's generate loop, prefill in 16-token chunks (only caches evaluated)

# checkpoint -> (how plan.recipe_table describes it)
# (None: the converted folder's own 4-bit g32; "folder": what the folder's headers say)
RECIPE = {"f32": "bf16", "mxfp8": "mxfp8", "affine": None, "mlx-vlm": "folder", "mlx-lm": "folder"}

# Every mode at both process counts, each quantised format sharded at least once by
# tensor parallelism (4 ranks: affine; 2 ranks: both formats), mlx-lm's generate loop
# through the pipeline's point-to-point transfers, and the refusals. Kept small: every
# case costs collectives, and CI has 2 cores for 4 processes.
CASES = {
    2: [
        {"name": "tensor-f32", "ck": "f32", "mode": "tensor"},
        {"name": "pipeline-f32", "ck": "f32", "mode": "pipeline", "generate": GEN_PREFILL_STEP},
        {"name": "tensor-mxfp8", "ck": "mxfp8", "mode": "tensor"},
        {"name": "pipeline-mxfp8", "ck": "mxfp8", "mode": "pipeline"},
        {"name": "tensor-affine", "ck": "affine", "mode": "tensor"},
        {"name": "shard-loaded-mxfp8", "ck": "mxfp8", "api": "shard"},
        {"name": "pipeline-loaded-f32", "ck": "f32", "api": "pipeline"},
        {"name": "both-refused", "ck": "f32", "mode": "both", "expect_error": True},
        # folders written by mlx-vlm's and mlx-lm's converters (4-bit g32, 8-bit router;
        # mlx-vlm's shared expert packed into the routed bank)
        {"name": "tensor-mlx-vlm", "ck": "mlx-vlm", "mode": "tensor"},
        {"name": "pipeline-mlx-lm", "ck": "mlx-lm", "mode": "pipeline"},
        {"name": "tensor-vision", "ck": "vision", "mode": "tensor", "vision": True},
        {"name": "pipeline-vision", "ck": "vision", "mode": "pipeline", "vision": True},
    ],
    4: [
        {"name": "tensor-affine", "ck": "affine", "mode": "tensor"},
        {"name": "pipeline-f32", "ck": "f32", "mode": "pipeline", "generate": GEN_PREFILL_STEP},
        {"name": "both-f32", "ck": "f32", "mode": "both", "generate": GEN_PREFILL_STEP},
        {"name": "both-mxfp8", "ck": "mxfp8", "mode": "both"},
        {"name": "tensor-kv2-refused", "ck": "kv2", "mode": "tensor", "expect_error": True},
        {"name": "shard-kv2-refused", "ck": "kv2", "mode": "tensor", "expect_error": True, "shard_loaded": True},
    ],
}


def _write_affine(src: Path, dst: Path):
    """A converted MLX folder as mlx-lm's convert writes one: 4-bit affine g32, our names."""
    model, config = load_model(src)
    nn.quantize(model, group_size=32, bits=4, class_predicate=model.quant_predicate)
    dst.mkdir(parents=True)
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine"}
    (dst / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cfg = synthetic.tiny_config(HEADS4)
    # transformers 5.x re-save: fused expert and MLP gate_up tensors split per segment
    synthetic.write_checkpoint(root / "f32", cfg, synthetic.random_weights(cfg, 11), "resave", shard_bytes=200_000)
    wide = synthetic.tiny_config(WIDE)
    synthetic.write_checkpoint(root / "mxfp8", wide, synthetic.random_weights(wide, 12), "mxfp8", shard_bytes=200_000)
    synthetic.write_checkpoint(root / "wide", wide, synthetic.random_weights(wide, 13), "original")
    _write_affine(root / "wide", root / "affine")
    _write_community(root, wide)
    kv2 = synthetic.tiny_config()
    synthetic.write_checkpoint(root / "kv2", kv2, synthetic.random_weights(kv2, 14), "original")
    _write_vision(root / "vision")
    return root


def _write_community(root: Path, wide: dict):
    """Folders as mlx-lm's and mlx-vlm's converters write them (`-q --q-bits 4 --q-group-size 32`)."""
    from mlx_lm.convert import convert as mlx_lm_convert
    from mlx_vlm.convert import convert as mlx_vlm_convert

    src = root / "wide-src"  # the published config's use_sparse_attention: mlx-vlm's port needs it
    cfg = json.loads(json.dumps(wide))
    cfg["text_config"]["sparse_attention_config"]["use_sparse_attention"] = True
    synthetic.write_checkpoint(src, cfg, synthetic.random_weights(cfg, 16), "original")
    mlx_vlm_convert(str(src), str(root / "mlx-vlm"), quantize=True, q_bits=4, q_group_size=32)
    mlx_lm_convert(str(src), str(root / "mlx-lm"), quantize=True, q_bits=4, q_group_size=32)


def _write_vision(path):
    """A checkpoint with a vision tower, as the releases hold one."""
    sys.path.insert(0, str(Path(__file__).parent))
    from reference import build_reference

    cfg = synthetic.tiny_config()
    w = synthetic.random_weights(cfg, 15)
    _, vision = build_reference(cfg, w)
    synthetic.write_checkpoint(path, cfg, {**w, **vision}, "original")


def single_process(path):
    """Prefill + 8 decode logits, and mlx-lm's generate loop, on the whole model in this process."""
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import forward_logits, generate_tokens

    model, _ = load_model(path)
    logits, cache_nbytes, _ = forward_logits(model, PROMPT, DECODE)
    toks, lps = generate_tokens(model, PROMPT, len(DECODE), GEN_PREFILL_STEP)
    return {"logits": logits, "gen_tokens": np.array(toks), "gen_logprobs": lps}


@pytest.fixture(scope="module")
def reference(ckpts):
    return {ck: single_process(ckpts / ck) for ck in ("f32", "mxfp8", "affine", "mlx-vlm", "mlx-lm")}


def launch(n, ckpts, out: Path):
    out.mkdir()
    cases = [dict(c, path=str(ckpts / c["ck"])) for c in CASES[n]]
    spec = {"out": str(out), "prompt": PROMPT, "decode": DECODE, "cases": cases, "line_check": n == 4, "seed_check": n == 2}
    (out / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [*launch_args(n), str(WORKER), str(out / "spec.json")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
        log, _ = proc.communicate()
        pytest.fail(f"mlx.launch -n {n} timed out (a deadlock?):\n{log.decode()[-4000:]}")
    text = log.decode()
    results = []
    for r in range(n):
        f = out / f"result.rank{r}.json"
        assert f.exists(), f"rank {r} wrote no result (exit {proc.returncode}):\n{text[-4000:]}"
        res = json.loads(f.read_text())
        assert "fatal" not in res, f"rank {r} failed:\n{res['fatal']}"
        results.append(res)
    assert proc.returncode == 0, text[-4000:]
    by_case = {c["name"]: [res["cases"][i] for res in results] for i, c in enumerate(CASES[n])}
    arrays = {c["name"]: [dict(np.load(out / f"{c['name']}.rank{r}.npz")) for r in range(n)]
              for c in CASES[n] if not c.get("expect_error")}
    return {"cases": by_case, "arrays": arrays, "results": results}


@pytest.fixture(scope="module")
def runs(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return {n: launch(n, ckpts, out / f"n{n}") for n in (2, 4)}


def _cases(pred=lambda c: True):
    return [pytest.param(n, c, id=f"n{n}-{c['name']}") for n in CASES for c in CASES[n] if pred(c)]


# -- logits --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,case", _cases(lambda c: not c.get("expect_error") and not c.get("vision")))
def test_logits_equal_single_process(runs, reference, n, case):
    """Prefill (66 tokens, selection active) and 8 decode steps: every rank returns the
    single-process logits within 1e-5, and all ranks bitwise the same (they must sample
    the same token)."""
    ref = reference[case["ck"]]["logits"]
    assert ref.shape == (len(PROMPT) + len(DECODE), 320)
    per_rank = runs[n]["arrays"][case["name"]]
    for r, a in enumerate(per_rank):
        err = np.abs(a["logits"] - ref).max()
        assert err <= TOL, f"rank {r}: max |logits - single process| = {err:.3g}"
        assert np.array_equal(a["logits"], per_rank[0]["logits"]), f"rank {r} differs from rank 0"


@pytest.mark.parametrize("n,case", _cases(lambda c: c.get("vision")))
def test_images_equal_single_process(runs, ckpts, n, case):
    """An image prompt under both layouts: the ranks that embed tokens hold the whole vision
    tower (every rank in tensor mode, the first stage in pipeline mode), the others none, and
    every rank returns the single-process logits (prefill with the image rows, then decode)."""
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import image_logits

    ref = image_logits(load_model(ckpts / case["ck"])[0], DECODE)
    for r, (res, a) in enumerate(zip(runs[n]["cases"][case["name"]], runs[n]["arrays"][case["name"]])):
        assert res["has_tower"] == res["has_embed"] == (case["mode"] == "tensor" or r == n - 1), res
        assert (res["vision_bytes"] > 0) == res["has_tower"], res
        err = np.abs(a["logits"] - ref).max()
        assert err <= TOL, f"rank {r}: max |logits - single process| = {err:.3g}"
        assert np.array_equal(a["logits"], runs[n]["arrays"][case["name"]][0]["logits"]), f"rank {r} differs"


@pytest.mark.parametrize("n,case", _cases(lambda c: c.get("generate")))
def test_generate_loop_equal_single_process(runs, reference, n, case):
    """mlx-lm's generate_step (chunked prefill evaluates only the caches: the pipeline's
    sends must still happen) gives the single-process greedy tokens and log-probs."""
    ref = reference[case["ck"]]
    for r, a in enumerate(runs[n]["arrays"][case["name"]]):
        assert a["gen_tokens"].tolist() == ref["gen_tokens"].tolist(), f"rank {r}"
        assert np.abs(a["gen_logprobs"] - ref["gen_logprobs"]).max() <= TOL, f"rank {r}"


# -- what each rank loads --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _full_table(path):
    return sharded.inspect_checkpoint(path).table


LOADED = lambda c: not c.get("expect_error") and not c.get("api") and not c.get("vision")  # noqa: E731


@pytest.mark.parametrize("n,case", _cases(LOADED))
def test_rank_reads_only_its_part(runs, ckpts, n, case):
    """Bytes read from the files == parameter bytes kept == MLX memory held after the load;
    tensor parallel: exactly the replicated tensors + 1/T of the sharded ones; pipeline:
    each layer on exactly one stage, stages balanced to the optimum."""
    res = runs[n]["cases"][case["name"]]
    table = _full_table(ckpts / case["ck"])
    args = ModelArgs.from_file(ckpts / case["ck"])
    T, P = res[0]["tensor"], res[0]["pipeline"]
    assert T * P == n
    for r in res:
        assert r["bytes_read"] == r["param_bytes"], r
        # What MLX holds after the load is the parameters (the reads were freed).
        assert r["param_bytes"] <= r["active_bytes"] <= r["param_bytes"] * 1.02 + 65536, r
    layer_full = sharding.layer_bytes(table, args.num_hidden_layers)
    nonlayer = {k: i for k, i in table.items() if sharding.layer_of(k) is None}
    sharded = sum(i.nbytes for k, i in table.items() if sharding.tensor_rule(k))
    replicated = sum(i.nbytes for k, i in table.items() if not sharding.tensor_rule(k))
    if P == 1:
        for r in res:
            assert r["param_bytes"] == replicated + sharded // T
            assert r["sharded_bytes"] == sharded // T
    else:
        stages = {}
        for r in res:
            stages.setdefault(r["rank"] // T, r["layers"])
            assert r["layers"] == stages[r["rank"] // T]  # one stage, one set of layers
            assert r["has_embed"] == (r["rank"] // T == P - 1)
        spans = sorted(tuple(s) for s in stages.values())
        assert [i for a, b in spans for i in range(a, b)] == list(range(args.num_hidden_layers))
        embed_bytes = sum(i.nbytes for k, i in nonlayer.items() if sharding.is_embedding(k))
        loads = [sum(layer_full[a:b]) + (embed_bytes if a == 0 else 0) for a, b in spans]
        assert max(loads) == _brute_force_max_load(layer_full, P, embed_bytes)
        heads = sum(i.nbytes for k, i in nonlayer.items() if not sharding.is_embedding(k))
        for r in res:
            a, b = r["layers"]
            layer_tensors = {k: i for k, i in table.items() if sharding.layer_of(k) in range(a, b)}
            lay_sh = sum(i.nbytes for k, i in layer_tensors.items() if sharding.tensor_rule(k))
            lay_rep = sum(i.nbytes for k, i in layer_tensors.items() if not sharding.tensor_rule(k))
            embed = sum(i.nbytes for k, i in nonlayer.items() if sharding.is_embedding(k)) if r["has_embed"] else 0
            assert r["param_bytes"] == heads + embed + lay_rep + (lay_sh // T if T > 1 else lay_sh)


def _brute_force_max_load(per_layer, stages, embed):
    import itertools

    n = len(per_layer)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        b = (0, *cuts, n)
        loads = [sum(per_layer[b[i]:b[i + 1]]) + (embed if i == 0 else 0) for i in range(stages)]
        best = max(loads) if best is None else min(best, max(loads))
    return best


@pytest.mark.parametrize("n,case", _cases(LOADED))
def test_plan_matches_measured(runs, ckpts, n, case):
    """`minimax-m3 plan`'s per-rank weight and cache bytes, computed from the config and
    the recipe alone, equal what the ranks loaded and what their caches allocated."""
    path = ckpts / case["ck"]
    config = json.loads((path / "config.json").read_text())
    args = ModelArgs.from_dict(config)
    if RECIPE[case["ck"]] == "folder":  # plan --model's table, from the folder's headers
        table = _full_table(path)
    elif RECIPE[case["ck"]] is None:  # the converted folder: its own quantization
        from minimax_m3_mlx.convert.recipes import model_layout, output_tensors, uniform_policy

        shapes, quantisable = model_layout(config)
        table = sizing.table_from_shapes(output_tensors(shapes, quantisable, uniform_policy(4, 32, "affine"), "float32"))
    else:
        table = plan.recipe_table(config, RECIPE[case["ck"]], "float32")
    res = runs[n]["cases"][case["name"]]
    T, P = res[0]["tensor"], res[0]["pipeline"]
    caps = [1 << 40] * n
    planned = plan.plan_for(args, table, T, P, caps, len(PROMPT) + len(DECODE), dtype_bytes=4)
    assert planned.error is None
    for r, rp in zip(res, planned.ranks):
        assert tuple(r["layers"]) == rp.layers
        assert r["param_bytes"] == rp.weights, (r["rank"], r["param_bytes"], rp.weights)
        assert r["cache_bytes"] == rp.kv + rp.index, (r["rank"], r["cache_bytes"], rp.kv, rp.index)


# -- refusals ------------------------------------------------------------------------------------
def test_refused_layouts(runs):
    """Rank counts that cannot work fail on every rank with a clear error, before anything
    is changed (model.shard on a loaded model leaves it untouched)."""
    for r in runs[4]["cases"]["tensor-kv2-refused"]:
        assert r["error"] and "4 does not divide num_key_value_heads=2, index_n_heads=2" in r["error"]
        assert "1 or 2 ranks" in r["error"]
    for r in runs[4]["cases"]["shard-kv2-refused"]:
        assert r["error"] and "does not divide num_key_value_heads=2" in r["error"]
        assert r["unchanged"] is True
    for r in runs[2]["cases"]["both-refused"]:
        assert r["error"] and "mode='both' needs at least 2 tensor-parallel ranks" in r["error"]


def test_line_all_sum(runs):
    """The point-to-point sum used inside pipeline stages (no Group.split on ring) equals
    all_sum over 4 ranks and is bitwise the same on every rank."""
    for res in runs[4]["results"]:
        assert res["line"]["line_vs_allsum"] <= 1e-6
        assert res["line"]["line_ranks_equal"] is True


# -- in-process ------------------------------------------------------------------------------------
def test_ranks_sample_alike(runs):
    """`generate` without --seed under mlx.launch: every rank's random state is seeded alike,
    so at temperature > 0 every rank samples the same token (tests/dist_worker.py seed_check)."""
    for res in runs[2]["results"]:
        assert res["seed"]["same_draws"], res["rank"]


def test_tensor_rules_all_spellings():
    """Every checkpoint spelling of a tensor gets the same split (published, transformers
    5.x re-save, converted MLX names, FP8 scales)."""
    col, row, fused = sharding.Rule(sharding.COL), sharding.Rule(sharding.ROW), sharding.Rule(sharding.COL, 2)
    L = "language_model.model.layers.7."
    cases = {
        L + "self_attn.q_proj.weight": col, L + "self_attn.k_proj.scales": col, L + "self_attn.v_proj.biases": col,
        L + "self_attn.o_proj.weight": row, L + "self_attn.o_proj.weight_scale_inv": row,
        L + "self_attn.index_q_proj.weight": col, L + "self_attn.indexer.q_proj.weight": col,
        L + "self_attn.index_k_proj.weight": None, L + "self_attn.indexer.k_proj.weight": None,
        L + "self_attn.q_norm.weight": None, L + "self_attn.indexer.q_norm.weight": None,
        L + "block_sparse_moe.experts.3.w1.weight": col, L + "block_sparse_moe.experts.3.w3.weight_scale_inv": col,
        L + "block_sparse_moe.experts.3.w2.weight": row, L + "block_sparse_moe.gate.weight": None,
        L + "block_sparse_moe.e_score_correction_bias": None,
        L + "block_sparse_moe.shared_experts.up_proj.weight": col,
        L + "block_sparse_moe.shared_experts.down_proj.weight": row,
        "model.language_model.layers.7.mlp.experts.gate_up_proj": fused,
        "model.language_model.layers.7.mlp.experts.down_proj": row,
        "model.language_model.layers.7.mlp.shared_experts.gate_up_proj.weight": fused,
        "model.language_model.layers.7.mlp.gate_up_proj.weight": fused,
        "model.language_model.layers.7.mlp.gate.weight": None,
        "model.language_model.layers.7.mlp.gate.e_score_correction_bias": None,
        L + "mlp.switch_mlp.gate_proj.scales": col, L + "mlp.switch_mlp.down_proj.biases": row,
        L + "mlp.gate_proj.weight": col, L + "mlp.down_proj.weight": row, L + "mlp.gate.weight": None,
        "language_model.model.embed_tokens.weight": None, "language_model.lm_head.weight": None,
        L + "input_layernorm.weight": None,
    }
    for name, rule in cases.items():
        assert sharding.tensor_rule(name) == rule, name
    # Fused [E, 2I, H] -> each rank gets its part of gate and of up, not all gate rows.
    x = np.arange(2 * 8).reshape(1, 16, 1)
    part = sharding.take_slice(x, fused, 2, 1, lambda p, a: np.concatenate(p, axis=a))
    assert part[0, :, 0].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


def test_balanced_split_is_optimal():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 9))
        P = int(rng.integers(1, n + 1))
        per = rng.integers(1, 100, n).tolist()
        embed = int(rng.integers(0, 100))
        split = sharding.balanced_split(per, P, embed)
        assert sum(split) == n and all(s >= 1 for s in split) and len(split) == P
        loads = []
        for s in range(P):
            a, b = sharding.stage_layers(split, s)
            loads.append(sum(per[a:b]) + (embed if a == 0 else 0))
        assert max(loads) == _brute_force_max_load(per, P, embed)
    with pytest.raises(sharding.ShardingError, match="at least one layer per stage"):
        sharding.balanced_split([1, 2, 3], 4)


def test_plan_real_model(capsys):
    """The real model: KV and index figures worked out by hand (2 KiB K+V per token and layer); 2x192 fits the
    192 GB recipe with tensor parallel; 3 Macs cannot be tensor parallel."""
    from minimax_m3_mlx.convert.recipes import REAL_CONFIG

    args = ModelArgs.from_file(REAL_CONFIG)
    kv, idx = sizing.cache_bytes(args, 131072, 1, dtype_bytes=2)
    assert kv == 60 * 131072 * 2 * 4 * 128 * 2  # 2 KiB per token and layer
    assert idx == 57 * 131072 * 128 * 2  # model-dtype (bf16) index keys on the 57 sparse layers
    assert sizing.cache_bytes(args, 131072, 1, dtype_bytes=2, index_bits=32)[1] == 2 * idx  # float32
    kv4, idx8 = sizing.cache_bytes(args, 131072, 1, dtype_bytes=2, kv_bits=4)
    assert (kv4, idx8) == (60 * 131072 * 576, 57 * 131072 * 136)  # --kv-bits 4: 4-bit K/V, 8-bit index
    kv2, idx2 = sizing.cache_bytes(args, 131072, 2, dtype_bytes=2)
    assert kv2 * 2 == kv and idx2 == idx  # K/V split by KV head; index keys replicated
    assert plan.main(["--hosts", "2x192", "--recipe", "mac-192gb", "--context", "131072"]) == 0
    out = capsys.readouterr().out
    assert "Recommended: tensor" in out and "tensor: fits" in out
    assert plan.main(["--hosts", "3x128", "--recipe", "mac-256gb", "--context", "1000000", "--index-bits", "32"]) == 1
    out = capsys.readouterr().out
    assert "tensor: not possible" in out and "3 does not divide" in out and "pipeline: DOES NOT FIT" in out
    # the default bf16 index keys (half of float32's) leave room for the same context
    assert plan.main(["--hosts", "3x128", "--recipe", "mac-256gb", "--context", "1000000"]) == 0
    assert "pipeline: fits" in capsys.readouterr().out
    assert plan.main(["--hosts", "2x192", "--recipe", "mac-192gb", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    tensor = next(p for p in data["plans"] if p["name"] == "tensor")
    w = [r["weights"] for r in tensor["ranks"]]
    table = plan.recipe_table(json.loads(REAL_CONFIG.read_text()), "mac-192gb")
    rep = sum(i.nbytes for k, i in table.items() if not sharding.tensor_rule(k))
    sh = sum(i.nbytes for k, i in table.items() if sharding.tensor_rule(k))
    assert w == [rep + sh // 2] * 2 and 60e9 < w[0] < 80e9


def test_plan_wording(capsys):
    """The largest context is the fitting layouts' (never "0 tokens" for a cluster that fits),
    and a layout the rank count rules out is not answered with "a smaller recipe"."""
    from minimax_m3_mlx.cli import plan

    assert plan.main(["--hosts", "2x128", "--recipe", "mac-256gb"]) == 0
    out = capsys.readouterr().out
    contexts = {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"largest context with (\w+): about ([\d,]+)", out)}
    assert set(contexts) == {"tensor", "pipeline"} and min(contexts.values()) > 32768
    assert " 0 tokens" not in out
    assert plan.main(["--hosts", "3x192", "--layout", "tensor"]) == 1
    out = capsys.readouterr().out
    assert "smaller recipe" not in out and "--layout pipeline takes any number of Macs" in out


def test_activation_estimate_bounds_measured(ckpts):
    """The plan's activation figure bounds the measured transient memory of a prefill."""
    model, _ = load_model(ckpts / "f32")
    args = model.args
    for L in (66, 200):
        cache = model.make_cache()
        mx.eval(model.parameters())
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        logits = model(mx.array([PROMPT * (L // len(PROMPT)) + PROMPT[: L % len(PROMPT)]]), cache=cache)
        mx.eval(logits, [c.state for c in cache])
        transient = mx.get_peak_memory() - base - sum(c.nbytes for c in cache)
        est = sizing.activation_bytes(args, L, 1, 1, 4, L)
        assert 0 < transient <= est, (L, transient, est)
        del logits, cache


class _Ranks:
    """Stands in for an mx.distributed group of `n` ranks: the refusals below must come
    before any communication (and before any tensor is read)."""

    def __init__(self, n, rank=0):
        self.n, self.r = n, rank

    def size(self):
        return self.n

    def rank(self):
        return self.r


def test_refusals_before_loading(ckpts, monkeypatch):
    def no_reads(*a, **k):
        raise AssertionError("a tensor was read before the layout was checked")

    monkeypatch.setattr(reader.TensorReader, "read", no_reads)
    with pytest.raises(sharding.ShardingError, match="8 stages needs at least one layer per stage; the model has 4"):
        sharded.load_sharded(ckpts / "f32", _Ranks(8), "pipeline")
    with pytest.raises(sharding.ShardingError,
                       match=r"8 does not divide num_key_value_heads=4, index_n_heads=4.*1, 2 or 4 ranks"):
        sharded.load_sharded(ckpts / "f32", _Ranks(8), "tensor")
    # heads divide, but a quantisation group would straddle two ranks (128 / 8 = 16 < 32)
    wide8 = synthetic.tiny_config(dict(WIDE, num_attention_heads=16, num_key_value_heads=8,
                                       sparse_attention_config={"sparse_num_index_heads": 8}))
    table = plan.recipe_table(wide8, "mxfp8", "float32")
    with pytest.raises(sharding.ShardingError, match="quantisation groups must not straddle ranks"):
        sharding.check_tensor_parallel(ModelArgs.from_dict(wide8), table, 8)
    with pytest.raises(sharding.ShardingError, match="6 ranks do not split into stages of 4"):
        sharded.load_sharded(ckpts / "f32", _Ranks(6), "both", tensor=4)
    with pytest.raises(sharding.ShardingError, match="3 does not divide num_attention_heads=8"):
        sharded.load_sharded(ckpts / "f32", _Ranks(6), "both", tensor=3)


def test_generate_cli_under_mlx_launch(ckpts):
    """`minimax-m3 generate` under mlx.launch (2 ranks, tensor parallel): rank 0 prints the
    same greedy text as one process, the other rank prints nothing."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["-m", "minimax_m3_mlx", "generate", "--model", str(ckpts / "f32"), "--prompt", "hello there",
            "--max-tokens", "10", "--thinking", "disabled"]

    def answer(text):
        return text.split("=" * 10)[1]

    alone = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr
    both = subprocess.run([*launch_args(2), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert both.returncode == 0, both.stdout[-2000:] + both.stderr[-2000:]
    assert both.stdout.count("=" * 10) == 2  # one rank printed
    assert answer(both.stdout) == answer(alone.stdout)
    assert "[ring]" not in both.stderr, both.stderr[-2000:]  # the ranks end together, no socket errors


def test_generate_images_cli_under_mlx_launch(ckpts, tmp_path, capsys):
    """`minimax-m3 generate --image A --image B` under mlx.launch, pipeline parallel (the
    stage without the tower takes the prompt's length only): the single-process greedy text."""
    from test_vision import _processors_or_skip

    _processors_or_skip()
    from PIL import Image

    rng = np.random.default_rng(4)
    images = []
    for i, (h, w) in enumerate(((60, 90), (100, 40))):
        images += ["--image", str(tmp_path / f"img{i}.png")]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images[-1])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["-m", "minimax_m3_mlx", "generate", "--model", str(ckpts / "vision"), "--prompt", "what is this?",
            *images, "--max-tokens", "8", "--thinking", "disabled", "--parallel", "pipeline"]
    from minimax_m3_mlx.serving import generate

    assert generate.main(args[3:]) == 0  # one process: this one
    alone = capsys.readouterr().out
    both = subprocess.run([*launch_args(2), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = both.stdout + both.stderr
    assert both.returncode == 0 and "exited with code" not in out and "[ring]" not in out, out[-3000:]
    assert both.stdout.count("=" * 10) == 2  # one rank printed
    assert both.stdout.split("=" * 10)[1] == alone.split("=" * 10)[1]


def test_generate_cli_under_mlx_launch_fails_on_every_rank(tmp_path):
    """A mistake under mlx.launch: a rank prints one error line and exits 1 (mlx.launch 0.32
    itself exits 0 whatever its ranks do, but names each rank that failed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([*launch_args(2), "-m", "minimax_m3_mlx",
                          "generate", "--model", str(tmp_path / "missing")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=240)
    out = run.stdout + run.stderr
    assert "Traceback" not in out
    assert out.count("minimax-m3 generate: error: ") >= 1 and "not a local folder" in out
    # the first rank to fail exits 1; the launcher then stops the other (-15) unless it failed too
    codes = dict(re.findall(r"rank (\d) exited with code (-?\d+)", out))
    assert set(codes) == {"0", "1"} and set(codes.values()) <= {"1", "-15"} and "1" in codes.values(), out


def test_sharded_load_sets_vision_aside(tmp_path):
    """Published checkpoints hold the vision tower: the per-rank loader (text-only) must
    still load them, and give the text model's logits."""
    sys.path.insert(0, str(Path(__file__).parent))
    from reference import build_reference

    cfg = synthetic.tiny_config()
    w = synthetic.random_weights(cfg, 3)
    _, vision = build_reference(cfg, w)
    synthetic.write_checkpoint(tmp_path, cfg, {**w, **vision}, "original")
    model, _ = sharded.load_sharded(tmp_path, mx.distributed.init(), mode="tensor")
    whole, _ = load_model(tmp_path)
    toks = mx.array([[5, 9, 200, 17, 3, 44, 91, 12, 8, 100, 7, 66, 2, 1, 0, 250, 33, 19]])
    np.testing.assert_allclose(np.array(model(toks)), np.array(whole(toks)), rtol=1e-5, atol=1e-5)
