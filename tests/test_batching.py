"""Batched generation: BatchSparseCache's operations, batched decode, and the server batching.

Each sequence in a batch must get what it gets alone: its own blocks (anchored at its
own positions), its own top-k, none of another row's padding. The tiny config's blocks
of 4 keys with top-3 make selection drop blocks from the 13th token on, so every case
below with prompts of tens to hundreds of tokens runs with selection active.
"""

from __future__ import annotations

import concurrent.futures

import mlx.core as mx
import numpy as np
import openai
import pytest
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models.cache import BatchKVCache

from minimax_m3_mlx import synthetic
from minimax_m3_mlx.model.batch_cache import BatchSparseCache
from minimax_m3_mlx.model.cache import SparseKVCache
from minimax_m3_mlx.model.kvquant import QuantizedSparseKVCache
from test_decode import rel, tiny_model

LENGTHS = [5, 37, 230, 100]  # one row below top-k blocks, the others above; 225 tokens apart


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _prompts(seed=1, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n).tolist() for n in lengths]


def _filled(model, prompt):
    cache = model.make_cache()
    model(mx.array([prompt]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def _single(n, seed, block_size=4, dim=8):
    """A SparseKVCache holding n random tokens."""
    c = SparseKVCache(block_size)
    if n:
        r = np.random.default_rng(seed)
        k, v, i = (mx.array(r.standard_normal((1, h, n, dim)).astype(np.float32)) for h in (2, 2, 1))
        c.update_index(i)
        c.update_and_fetch(k, v)
    return c


def _assert_row_is(batch: BatchSparseCache, row: int, single: SparseKVCache):
    n = single.offset
    assert batch.lengths[row] == n and int(batch.offset[row]) == n
    if n:
        for got, want in zip(batch.extract(row).state[:3], single.state[:3]):
            assert mx.array_equal(got, want)


def test_merge_extend_filter_extract_equal_single_caches():
    singles = [_single(n, s) for s, n in enumerate([0, 3, 17, 300])]
    batch = SparseKVCache.merge(singles)
    assert isinstance(batch, BatchSparseCache)
    for i, s in enumerate(singles):
        _assert_row_is(batch, i, s)
    more = [_single(n, 10 + s) for s, n in enumerate([600, 1])]
    batch.extend(SparseKVCache.merge(more))
    for i, s in enumerate(singles + more):
        _assert_row_is(batch, i, s)
    batch.filter([4, 1])  # the longest row first, then a short one: capacity follows the rows kept
    _assert_row_is(batch, 0, more[0])
    _assert_row_is(batch, 1, singles[1])
    batch.filter([1])
    _assert_row_is(batch, 0, singles[1])
    assert batch.keys.shape[2] == batch.step  # 600 tokens of capacity given back
    empty = SparseKVCache.merge([_single(0, 0), _single(0, 1)])
    assert empty.keys is None and empty.lengths == [0, 0]
    empty.extend(SparseKVCache.merge([_single(5, 2)]))
    _assert_row_is(empty, 2, _single(5, 2))


def test_writes_land_at_each_rows_own_position():
    singles = [_single(n, s) for s, n in enumerate([2, 9])]
    batch = SparseKVCache.merge(singles)
    r = np.random.default_rng(7)
    for L in (1, 3):  # one token (scatter), then a chunk (per-row slices)
        k, v, i = (mx.array(r.standard_normal((2, h, L, 8)).astype(np.float32)) for h in (2, 2, 1))
        batch.update_index(i)
        batch.update_and_fetch(k, v)
        for b, s in enumerate(singles):
            s.update_index(i[b:b + 1])
            s.update_and_fetch(k[b:b + 1], v[b:b + 1])
    for b, s in enumerate(singles):
        _assert_row_is(batch, b, s)
    # a right-padded chunk: rows advance by their real lengths only
    batch.prepare(lengths=[2, 4], right_padding=[2, 0])
    k, v, i = (mx.array(r.standard_normal((2, h, 4, 8)).astype(np.float32)) for h in (2, 2, 1))
    batch.update_index(i)
    batch.update_and_fetch(k, v)
    batch.finalize()
    for b, (s, n) in enumerate(zip(singles, (2, 4))):
        s.update_index(i[b:b + 1, :, :n])
        s.update_and_fetch(k[b:b + 1, :, :n], v[b:b + 1, :, :n])
        _assert_row_is(batch, b, s)
    with pytest.raises(ValueError, match="left padding"):
        SparseKVCache.merge([_single(0, 0)]).prepare(left_padding=[1])


def test_batched_decode_logits_equal_each_sequence_alone(model):
    """Prompts prefilled alone, merged, then decoded together (float32, rel < 1e-4)."""
    prompts, steps = _prompts(), 8
    nxt = mx.array(np.random.default_rng(2).integers(0, 256, size=(len(prompts), steps)))
    alone = []
    for i, p in enumerate(prompts):
        cache = _filled(model, p)
        alone.append(np.array(mx.concatenate([model(nxt[i:i + 1, t:t + 1], cache=cache) for t in range(steps)], 1)))
    caches = [_filled(model, p) for p in prompts]
    batch = [type(c).merge([cs[j] for cs in caches]) for j, c in enumerate(caches[0])]
    assert isinstance(batch[0], BatchKVCache) and isinstance(batch[1], BatchSparseCache)
    out = np.array(mx.concatenate([model(nxt[:, t:t + 1], cache=batch) for t in range(steps)], 1))
    for i in range(len(prompts)):
        assert rel(out[i], alone[i][0]) < 1e-4, (LENGTHS[i], rel(out[i], alone[i][0]))


def test_batch_generator_tokens_equal_each_sequence_alone(model):
    """mlx-lm's BatchGenerator as the server drives it: right-padded prefill in chunks,
    requests joining while others decode (2 prompts at a time), rows leaving as they end."""
    prompts = _prompts(seed=4)
    max_tokens = [20, 9, 20, 14]
    alone = [[t for (t, _), _ in zip(generate_step(mx.array(p), model, max_tokens=n), range(n))]
             for p, n in zip(prompts, max_tokens)]
    gen = BatchGenerator(model, completion_batch_size=4, prefill_batch_size=2, prefill_step_size=64)
    uids = gen.insert(prompts, max_tokens)
    got = {u: [] for u in uids}
    widest, interleaved = 0, False
    while True:
        prompt_responses, responses = gen.next()
        if not prompt_responses and not responses:
            break
        widest = max(widest, len(responses))
        # a prompt chunk of a later request in the same call as decode steps of earlier ones
        interleaved |= any(not r.end_of_prompt for r in prompt_responses) and bool(responses)
        for r in responses:
            got[r.uid].append(r.token)
    gen.close()
    assert widest >= 3 and interleaved  # decoded together, prefill between decode steps
    for u, want in zip(uids, alone):
        assert got[u] == want


# -- quantized (--kv-bits) -------------------------------------------------------------------------

GS = 32  # the tiny heads are 32 wide


def _quantized_single(n, seed, bits=4, index_bits=8):
    return _single(n, seed, dim=GS).to_quantized(GS, bits) if n else QuantizedSparseKVCache(4, GS, bits, index_bits)


def _parts(buf):
    return list(buf) if isinstance(buf, tuple) else [buf]


def test_quantized_merge_extend_filter_extract_equal_single_caches():
    singles = [_quantized_single(n, s) for s, n in enumerate([0, 3, 17, 300])]
    batch = QuantizedSparseKVCache.merge(singles)
    assert isinstance(batch, BatchSparseCache) and batch.kv_quant == (GS, 4) and batch.index_quant == (GS, 8)

    def same(row, single):
        got = batch.extract(row)
        assert isinstance(got, QuantizedSparseKVCache) and got.offset == single.offset
        if single.offset:
            for g, w in zip(got.state[:3], single.state[:3]):
                assert all(mx.array_equal(a, b) for a, b in zip(_parts(g), _parts(w)))

    for i, c in enumerate(singles):
        same(i, c)
    more = [_quantized_single(n, 10 + s) for s, n in enumerate([600, 1])]
    batch.extend(QuantizedSparseKVCache.merge(more))
    rows = singles + more
    for i, c in enumerate(rows):
        same(i, c)
    batch.filter([4, 1])
    same(0, more[0])
    same(1, singles[1])
    # a plain cache among quantized ones is quantized as mlx-lm's to_quantized would
    mixed = BatchSparseCache.merge([_single(9, 5, dim=GS), _quantized_single(3, 6)])
    assert mixed.kv_quant == (GS, 4)
    want = _single(9, 5, dim=GS).to_quantized(GS, 4)
    assert all(mx.array_equal(a, b) for a, b in zip(mixed.extract(0).state[0], want.state[0]))


@pytest.mark.parametrize("bits,dtype,tol", [(4, mx.float32, 1e-4), (8, mx.float32, 1e-4), (4, mx.bfloat16, 3e-2)])
def test_quantized_batched_decode_logits_equal_each_sequence_alone(model, bits, dtype, tol):
    """--kv-bits with batching: every layer's rows quantized as alone (float32: rel < 1e-4;
    bf16, the dtype users run: within bf16's rounding of the batched matmuls)."""
    model.set_dtype(dtype)
    try:
        _quantized_batch_vs_alone(model, bits, tol)
    finally:
        model.set_dtype(mx.float32)


def _quantized_batch_vs_alone(model, bits, tol):
    prompts, steps = _prompts(), 6
    nxt = mx.array(np.random.default_rng(2).integers(0, 256, size=(len(prompts), steps)))

    def filled(p):
        cache = model.make_cache(kv_bits=bits, kv_group_size=GS)
        model(mx.array([p]), cache=cache)
        return cache

    alone = []
    for i, p in enumerate(prompts):
        cache = filled(p)
        assert all(isinstance(c, QuantizedSparseKVCache) for c in cache)
        alone.append(np.array(mx.concatenate([model(nxt[i:i + 1, t:t + 1], cache=cache) for t in range(steps)],
                                             1).astype(mx.float32)))
    caches = [filled(p) for p in prompts]
    batch = [type(c).merge([cs[j] for cs in caches]) for j, c in enumerate(caches[0])]
    assert all(isinstance(b, BatchSparseCache) and b.kv_quant == (GS, bits) for b in batch)
    assert batch[1].index_quant == (GS, 8) and batch[1].index_keys is not None and batch[0].index_keys is None
    out = np.array(mx.concatenate([model(nxt[:, t:t + 1], cache=batch) for t in range(steps)], 1).astype(mx.float32))
    for i in range(len(prompts)):
        assert rel(out[i], alone[i][0]) < tol, (LENGTHS[i], rel(out[i], alone[i][0]))
    back = batch[1].extract(2)
    assert isinstance(back, QuantizedSparseKVCache) and back.offset == LENGTHS[2] + steps


def test_quantized_batch_generator_tokens_equal_each_sequence_alone(model):
    """BatchGenerator over caches quantized from the first token (what the server makes
    under --kv-bits): right-padded prefill in chunks, rows joining and leaving."""
    prompts = _prompts(seed=4)
    max_tokens = [12, 5, 12, 8]

    def fresh():
        return model.make_cache(kv_bits=4, kv_group_size=GS)

    alone = [[t for (t, _), _ in zip(generate_step(mx.array(p), model, max_tokens=n, prompt_cache=fresh()), range(n))]
             for p, n in zip(prompts, max_tokens)]
    gen = BatchGenerator(model, completion_batch_size=4, prefill_batch_size=2, prefill_step_size=64)
    uids = gen.insert(prompts, max_tokens, caches=[fresh() for _ in prompts])
    got = {u: [] for u in uids}
    while True:
        prompt_responses, responses = gen.next()
        if not prompt_responses and not responses:
            break
        for r in responses:
            got[r.uid].append(r.token)
    gen.close()
    for u, want in zip(uids, alone):
        assert got[u] == want


# -- the server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_batch_server")
    config = synthetic.tiny_config()
    synthetic.write_checkpoint(path, config, synthetic.random_weights(config, seed=11), "original")
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    from minimax_m3_mlx.serving.server import Server, setup_arg_parser

    srv = Server(setup_arg_parser().parse_args(
        ["--model", str(ckpt), "--port", "0", "--decode-concurrency", "6", "--prompt-concurrency", "2",
         "--prompt-cache-size", "0"])).start()
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0, timeout=120)


def _ask(client, content, max_tokens):
    r = client.chat.completions.create(model="default_model", max_tokens=max_tokens,
                                       messages=[{"role": "user", "content": content}])
    return r.choices[0].message.content, r.usage.completion_tokens


def _concurrently(fn, args):
    with concurrent.futures.ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(lambda a: fn(*a), args))


def _batch_widths(monkeypatch) -> list:
    """The rows of every batched cache write from now on (how wide the batches were)."""
    widest = []
    write = BatchSparseCache.update_and_fetch

    def recording(self, k, v):
        widest.append(k.shape[0])
        return write(self, k, v)

    monkeypatch.setattr(BatchSparseCache, "update_and_fetch", recording)
    return widest


def test_concurrent_requests_get_what_they_get_alone(client, ckpt, monkeypatch):
    from minimax_m3_mlx import load
    from minimax_m3_mlx.serving.generate import chat_prompt, generate

    widest = _batch_widths(monkeypatch)
    words = "the quick brown fox jumps over a lazy dog".split()
    contents = ["Hi", " ".join(words * 2), " ".join(words * 9), "Tell me a story", " ".join(words * 4), "ok"]
    budgets = [24, 16, 24, 20, 12, 24]
    model, tok = load(str(ckpt))
    want = []
    for c, n in zip(contents, budgets):
        prompt = chat_prompt(tok, [{"role": "user", "content": c}])
        g = generate(model, tok, prompt, max_tokens=n)
        want.append((g.text, len(g.tokens), len(prompt)))
    assert want[2][2] - want[0][2] > 300  # prompts hundreds of tokens apart
    got = _concurrently(lambda c, n: _ask(client, c, n), list(zip(contents, budgets)))
    assert max(widest) >= 3
    assert got == [(text, n) for text, n, _ in want]


def test_same_length_requests_at_once_are_batched_and_equal_alone(client, monkeypatch):
    """6 requests of the same length at once: decoded together (a batch wider than one) and
    each reply the one it gets alone. The throughput this buys is a timing, measured by
    scripts/bench_server_batch.py (BENCHMARKS.md), not asserted here."""
    contents = [f"Request number {i} about batching" for i in range(6)]
    alone = [_ask(client, c, 16) for c in contents]
    widest = _batch_widths(monkeypatch)
    together = _concurrently(lambda c: _ask(client, c, 16), [(c,) for c in contents])
    assert max(widest) > 1
    assert together == alone


def test_kv_bits_server_batches_quantized_caches(ckpt, monkeypatch):
    """--kv-bits with batching: concurrent replies equal the same requests one at a time,
    decoded together over quantized batch caches on every layer, reusing the quantized
    prompt caches the first round left (mlx-lm's LRU prompt cache: trimmed deep copies)."""
    from minimax_m3_mlx.serving.server import Server, setup_arg_parser

    seen = []
    write = BatchSparseCache.update_and_fetch

    def recording(self, k, v):
        seen.append((k.shape[0], self.kv_quant))
        return write(self, k, v)

    monkeypatch.setattr(BatchSparseCache, "update_and_fetch", recording)
    srv = Server(setup_arg_parser().parse_args(
        ["--model", str(ckpt), "--port", "0", "--kv-bits", "4", "--kv-group-size", "32",
         "--decode-concurrency", "4"])).start()
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="none", max_retries=0, timeout=120)
        words = "the quick brown fox jumps over a lazy dog".split()
        # long enough to overlap even with the prompts cached (a slow machine served short
        # ones two at a time)
        asks = [("Hi", 40), (" ".join(words * 9), 32), ("Tell me a story", 40), (" ".join(words * 3), 24)]

        def ask(text, n):
            r = c.chat.completions.create(model="default_model", max_tokens=n,
                                          messages=[{"role": "user", "content": text}])
            return r.choices[0].message.content, r.usage.completion_tokens, r.usage.prompt_tokens_details.cached_tokens

        alone = [ask(*a) for a in asks]
        seen.clear()
        together = _concurrently(ask, asks)
        # a seeded request runs on mlx-lm's one-at-a-time path, over the same quantized caches
        r = c.chat.completions.create(model="default_model", max_tokens=asks[0][1], seed=1,
                                      messages=[{"role": "user", "content": asks[0][0]}])
        assert (r.choices[0].message.content, r.usage.completion_tokens) == alone[0][:2]
    finally:
        srv.shutdown()
    assert max(b for b, _ in seen) >= 2 and {q for _, q in seen} == {(32, 4)}
    assert [t[:2] for t in together] == [t[:2] for t in alone]
    assert all(t[2] > 0 for t in together)  # each prompt served from its quantized cache
