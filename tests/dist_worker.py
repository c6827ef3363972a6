"""One rank of the distributed tests, run under `mlx.launch --backend ring -n N`.

    mlx.launch --backend ring -n 4 --python PY tests/dist_worker.py SPEC.json

SPEC.json: {"out": folder, "prompt": [...], "decode": [...], "cases": [...]}. Each case
loads a checkpoint with loading.sharded.load_sharded (or checks that a layout is refused),
runs a prefill and the decode steps, and writes this rank's logits (npz) and figures
(json) to `out`; tests/test_distributed.py compares them with the single-process model.
"""

from __future__ import annotations

import sys
import time

T_START = time.perf_counter()
# Nothing here needs torch, which mlx_lm's import of transformers would load (~1.5 s of
# CPU per rank, and CI has 2 cores for 4 ranks): make transformers see it as absent.
sys.modules.setdefault("torch", None)

import gc  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from minimax_m3_mlx.io import reader  # noqa: E402
from minimax_m3_mlx.loading import sharded  # noqa: E402
from minimax_m3_mlx.model import collectives  # noqa: E402
from minimax_m3_mlx.parallel import sizing  # noqa: E402
from minimax_m3_mlx.weights import sharding  # noqa: E402


def forward_logits(model, prompt, decode):
    cache = model.make_cache()
    pre = model(mx.array([prompt]), cache=cache)
    steps = []
    for t in decode:
        steps.append(model(mx.array([[t]]), cache=cache)[0, -1])
    out = mx.concatenate([pre[0], mx.stack(steps)], axis=0).astype(mx.float32)
    mx.eval(out)
    return np.array(out), sum(c.nbytes for c in cache), cache[0].offset


def generate_tokens(model, prompt, n, prefill_step):
    """mlx-lm's generate loop (chunked prefill evaluates only the caches) with greedy sampling."""
    from mlx_lm.generate import generate_step

    toks, lps = [], []
    for tok, logprobs in generate_step(mx.array(prompt), model, max_tokens=n,
                                       sampler=lambda x: mx.argmax(x, axis=-1), prefill_step_size=prefill_step):
        toks.append(int(tok))
        lps.append(np.array(logprobs.astype(mx.float32)))
    return toks, np.stack(lps)


IMAGE_GRIDS = [(1, 4, 6), (1, 6, 4)]  # two images of 6 placeholder tokens each (merge 2)


def image_prompt(image_token: int, patch_dim: int):
    """ids with two images' placeholders, their pixel rows and grids (the same on every rank)."""
    rng = np.random.default_rng(8)
    t = lambda n: rng.integers(0, 256, n).tolist()  # noqa: E731
    ids = t(9) + [image_token] * 6 + t(5) + [image_token] * 6 + t(40)
    pix = rng.normal(0, 1, (sum(a * b * c for a, b, c in IMAGE_GRIDS), patch_dim)).astype(np.float32)
    return np.array([ids]), pix, np.array(IMAGE_GRIDS)


def image_logits(model, decode):
    """Prefill of an image prompt (its rows from the vision tower) and decode steps."""
    vc = model.args.vision_config
    ids, pix, grid = image_prompt(model.args.image_token_index,
                                  vc["num_channels"] * vc["temporal_patch_size"] * vc["patch_size"] ** 2)
    emb = model.get_input_embeddings(ids, pix, grid)
    cache = model.make_cache()
    pre = model(mx.array(ids), cache=cache, input_embeddings=emb)
    steps = [model(mx.array([[t]]), cache=cache)[0, -1] for t in decode]
    out = mx.concatenate([pre[0], mx.stack(steps)], axis=0).astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def run_case(case, spec, group, out: Path):
    rank = group.rank()
    name = case["name"]
    res = {"name": name, "rank": rank}
    if case.get("expect_error"):
        try:
            if case.get("shard_loaded"):
                from minimax_m3_mlx import load_model

                model, _ = load_model(case["path"])
                before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
                heads = [(l.self_attn.n_heads, l.self_attn.n_kv_heads) for l in model.layers]
                try:
                    model.shard(group)
                finally:
                    after = dict(tree_flatten(model.parameters()))
                    res["unchanged"] = (
                        set(before) == set(after)
                        and all(np.array_equal(before[k], np.array(after[k])) for k in before)
                        and heads == [(l.self_attn.n_heads, l.self_attn.n_kv_heads) for l in model.layers]
                        and type(model.layers[0].self_attn.o_proj).__name__ == "Linear"
                    )
            else:
                sharded.load_sharded(case["path"], group, case["mode"], case.get("tensor"))
            res["error"] = None
        except sharding.ShardingError as e:
            res["error"] = str(e)
        return res

    gc.collect()
    mx.clear_cache()
    if case.get("api"):  # the whole model loaded, then Model.shard / Model.pipeline (mlx-lm's way)
        from minimax_m3_mlx import load_model

        model, _ = load_model(case["path"])
        getattr(model, case["api"])(group)
        res["n_local_layers"] = len(model.layers)
        logits, res["cache_bytes"], _ = forward_logits(model, spec["prompt"], spec["decode"])
        np.savez(out / f"{name}.rank{rank}.npz", logits=logits)
        return res
    if case.get("vision"):  # the tower on the ranks that embed tokens; an image prompt's logits
        model, _ = sharded.load_sharded(case["path"], group, case["mode"])
        res.update(has_embed=model.language_model.model.embed_tokens is not None,
                   has_tower="vision_tower" in model, vision_bytes=model.load_stats.vision_bytes)
        np.savez(out / f"{name}.rank{rank}.npz", logits=image_logits(model, spec["decode"]))
        return res
    mem0 = mx.get_active_memory()
    t0 = time.perf_counter()
    model, _ = sharded.load_sharded(case["path"], group, case["mode"], case.get("tensor"))
    res["load_s"] = time.perf_counter() - t0
    gc.collect()
    mx.clear_cache()
    res["active_bytes"] = mx.get_active_memory() - mem0
    st = model.load_stats
    res.update(
        tensor=st.tensor, pipeline=st.pipeline, layers=list(st.layers), bytes_read=st.bytes_read,
        param_bytes=st.param_bytes, replicated_bytes=st.expected.replicated_bytes,
        sharded_bytes=st.expected.sharded_bytes, n_local_layers=len(model.layers),
        has_embed=model.language_model.model.embed_tokens is not None,
    )
    t0 = time.perf_counter()
    logits, cache_nbytes, offset = forward_logits(model, spec["prompt"], spec["decode"])
    res["forward_s"] = time.perf_counter() - t0
    res["cache_bytes"] = cache_nbytes
    res["cache_offset"] = offset
    arrays = {"logits": logits}
    if case.get("generate"):
        toks, lps = generate_tokens(model, spec["prompt"], len(spec["decode"]), case["generate"])
        arrays["gen_tokens"] = np.array(toks)
        arrays["gen_logprobs"] = lps
    np.savez(out / f"{name}.rank{rank}.npz", **arrays)
    del model
    return res


def line_sum_check(group):
    """Line.all_sum over all ranks equals mx.distributed.all_sum, bitwise equal on every rank."""
    line = collectives.ChainGroup(group, range(group.size()))
    x = mx.random.normal((3, 5), key=mx.random.key(group.rank() + 1))
    a = line.all_sum(x)
    b = mx.distributed.all_sum(x, group=group)
    # every rank must hold bitwise the same sum: compare against rank 0's copy
    g = mx.distributed.all_gather(a[None], group=group)
    mx.eval(a, b, g)
    return {
        "line_vs_allsum": float(mx.abs(a - b).max()),
        "line_ranks_equal": bool(all(mx.array_equal(g[i], g[0]).item() for i in range(group.size()))),
    }


def seed_check(group):
    """After generate's seed_ranks without a seed, every rank draws the same samples."""
    from minimax_m3_mlx.serving.generate import seed_ranks

    seed_ranks(group, None)
    draws = mx.random.categorical(mx.random.normal((4, 320)), num_samples=8)
    every = mx.distributed.all_gather(draws[None], group=group)
    return {"same_draws": bool(all(mx.array_equal(every[i], every[0]).item() for i in range(group.size())))}


def main(argv):
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["out"])
    group = mx.distributed.init(strict=True)
    results = {"rank": group.rank(), "size": group.size(), "cases": [], "import_s": time.perf_counter() - T_START}
    try:
        if spec.get("line_check"):
            results["line"] = line_sum_check(group)
        if spec.get("seed_check"):
            results["seed"] = seed_check(group)
        for case in spec["cases"]:
            results["cases"].append(run_case(case, spec, group, out))
    except Exception:
        results["fatal"] = traceback.format_exc()
        (out / f"result.rank{group.rank()}.json").write_text(json.dumps(results, indent=1))
        raise
    results["total_s"] = time.perf_counter() - T_START
    (out / f"result.rank{group.rank()}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
