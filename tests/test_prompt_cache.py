"""The prompt cache's tiers (serving/prompt_cache.py, block_store.py): caches restored from
disk are exact for every cache kind, bad block files are never loaded, the directory keeps
its budget, two writers share it, and the memory tier keeps its byte bound."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import threading

import mlx.core as mx
import numpy as np
import pytest

from minimax_m3_mlx import load_model, synthetic
from minimax_m3_mlx.serving import block_store
from minimax_m3_mlx.serving.prompt_cache import TieredPromptCache
from minimax_m3_mlx.serving.reasoning_memory import ReasoningMemory, message_key

BLOCK = 256
TOKENS = [int(t) for t in np.random.default_rng(11).integers(0, 256, 900)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, default_case):
    path = tmp_path_factory.mktemp("pc_model")
    synthetic.write_checkpoint(path, default_case.config, default_case.weights, "original")
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt)[0]


@pytest.fixture(scope="module")
def bf16(tmp_path_factory, default_case):
    """The same model with real bf16 tensors (what converted folders hold)."""
    path = tmp_path_factory.mktemp("pc_bf16")
    synthetic.write_checkpoint(path, default_case.config, default_case.weights, "original", dtype="bfloat16")
    return path, load_model(path)[0]


def store(path, model, ckpt, kv_bits=None, **kw) -> TieredPromptCache:
    pc = TieredPromptCache(directory=str(path), block_tokens=BLOCK, **kw)
    pc.attach(model, ckpt, kv_bits=kv_bits, kv_group_size=32)
    return pc


def prefill(model, pc, tokens, kv_bits=None):
    """What a server turn does: fetch, feed the rest, insert."""
    cache, rest = pc.fetch_nearest_cache("m", tokens)
    cache = cache if cache is not None else model.make_cache(kv_bits=kv_bits, kv_group_size=32)
    model(mx.array([rest]), cache=cache)
    mx.eval([c.state for c in cache])
    pc.insert_cache("m", tokens, cache)
    pc.flush()
    return cache


def continued(model, cache, rest):
    return np.array(model(mx.array([rest]), cache=cache)[0, -1].astype(mx.float32))


def fresh(model, tokens, kv_bits=None):
    cache = model.make_cache(kv_bits=kv_bits, kv_group_size=32)
    return np.array(model(mx.array([tokens]), cache=cache)[0, -1].astype(mx.float32))


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("kv_bits", [None, 8, 4])
def test_restored_from_disk_is_exact(model, ckpt, tmp_path, kv_bits):
    """A new cache object (as after a restart) restores the stored blocks; the logits after
    the restored prefix equal those of a cache that computed the same prefix (selection
    active: 900 tokens against blocks of 4 x top-3)."""
    prefill(model, store(tmp_path, model, ckpt, kv_bits), TOKENS[:700], kv_bits)
    pc = store(tmp_path, model, ckpt, kv_bits)
    cache, rest = pc.fetch_nearest_cache("m", TOKENS)
    assert len(TOKENS) - len(rest) == 2 * BLOCK and pc.source_of(TOKENS).disk == 2 * BLOCK
    ref = model.make_cache(kv_bits=kv_bits, kv_group_size=32)
    model(mx.array([TOKENS[:2 * BLOCK]]), cache=ref)
    assert rel(continued(model, cache, rest), continued(model, ref, rest)) < 1e-4
    if kv_bits is None:  # and the whole prompt as one forward pass
        cache, rest = pc.fetch_nearest_cache("m", TOKENS)
        assert rel(continued(model, cache, rest), fresh(model, TOKENS)) < 1e-4


def test_bf16_blocks_round_trip(bf16, tmp_path):
    path, model = bf16
    prefill(model, store(tmp_path, model, path), TOKENS[:600])
    cache, rest = store(tmp_path, model, path).fetch_nearest_cache("m", TOKENS[:600])
    assert len(rest) == 600 - 2 * BLOCK
    assert any(getattr(c, "keys", None) is not None and c.keys.dtype == mx.bfloat16 for c in cache)
    ref = model.make_cache()
    model(mx.array([TOKENS[:2 * BLOCK]]), cache=ref)
    for a, b in zip(cache, ref):  # bit for bit the computed rows
        for x, y in zip(a.state[:2], b.state[:2]):
            assert mx.array_equal(x[..., :2 * BLOCK, :], y[..., :2 * BLOCK, :]).item()


def test_turns_write_only_new_blocks_and_files_are_private(model, ckpt, tmp_path):
    pc = store(tmp_path, model, ckpt)
    prefill(model, pc, TOKENS[:300])
    first = pc.store.bytes_written
    prefill(model, pc, TOKENS[:600])
    files = sorted(pc.store.dir.glob("*.safetensors"))
    assert len(files) == 2 and pc.store.bytes_written < 2.2 * first  # block 0 not written again
    assert stat.S_IMODE(pc.store.dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


def _corrupt(f):
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))


def _foreign(f, other):
    shutil.copy(other, f)


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "swap", "foreign", "garbage"])
def test_bad_block_is_removed_and_recomputed(model, ckpt, tmp_path, damage, caplog):
    pc = store(tmp_path / "a", model, ckpt)
    prefill(model, pc, TOKENS[:800])
    blocks = sorted(pc.store.dir.glob("*.safetensors"))
    assert len(blocks) == 3
    bad = blocks[1]
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:-1000])
    elif damage == "corrupt":
        _corrupt(bad)
    elif damage == "swap":
        _foreign(bad, blocks[2])
    elif damage == "foreign":  # another model's block under this name
        other = store(tmp_path / "b", model, ckpt, kv_bits=8)
        prefill(model, other, TOKENS[:800], kv_bits=8)
        _foreign(bad, sorted(other.store.dir.glob("*.safetensors"))[1])
    else:
        bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    pc2 = store(tmp_path / "a", model, ckpt)
    with caplog.at_level(logging.WARNING):
        cache, rest = pc2.fetch_nearest_cache("m", TOKENS)
    assert len(TOKENS) - len(rest) == BLOCK  # the prefix before the bad block
    assert not bad.exists() and "removed" in caplog.text
    ref = model.make_cache()
    model(mx.array([TOKENS[:BLOCK]]), cache=ref)
    assert rel(continued(model, cache, rest), continued(model, ref, rest)) < 1e-4
    prefill(model, pc2, TOKENS)  # recomputed and stored again
    assert len(TOKENS) - len(store(tmp_path / "a", model, ckpt).fetch_nearest_cache("m", TOKENS)[1]) == 3 * BLOCK


def test_disk_budget_evicts_least_recently_used(model, ckpt, tmp_path):
    pc = store(tmp_path, model, ckpt)
    prefill(model, pc, TOKENS[:300])
    one = next(pc.store.dir.glob("*.safetensors")).stat().st_size
    pc = store(tmp_path, model, ckpt, disk_bytes=int(2.5 * one))
    other = [int(t) for t in np.random.default_rng(12).integers(0, 256, 900)]
    prefill(model, pc, other)
    total = sum(f.stat().st_size for f in tmp_path.rglob("*.safetensors"))
    assert total <= 2.5 * one and len(list(pc.store.dir.glob("*.safetensors"))) == 2


def test_full_disk_is_logged_once_and_serving_goes_on(model, ckpt, tmp_path, monkeypatch, caplog):
    pc = store(tmp_path, model, ckpt)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pc.store, "_write_block", full)
    with caplog.at_level(logging.WARNING):
        prefill(model, pc, TOKENS[:600])
        prefill(model, pc, TOKENS[:900])
    assert caplog.text.count("the disk is full") == 1
    cache, rest = pc.fetch_nearest_cache("m", TOKENS[:900])  # memory still serves
    assert cache is not None and len(rest) == 0  # an exact hit, as mlx-lm answers it


def test_two_writers_share_a_directory(model, ckpt, tmp_path):
    a, b = store(tmp_path, model, ckpt), store(tmp_path, model, ckpt)
    threads = [threading.Thread(target=prefill, args=(model, pc, TOKENS)) for pc in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not list(tmp_path.rglob("*.tmp"))
    cache, rest = store(tmp_path, model, ckpt).fetch_nearest_cache("m", TOKENS)
    assert len(TOKENS) - len(rest) == 3 * BLOCK
    ref = model.make_cache()
    model(mx.array([TOKENS[:3 * BLOCK]]), cache=ref)
    assert rel(continued(model, cache, rest), continued(model, ref, rest)) < 1e-4


def test_memory_tier_keeps_its_byte_bound(model, ckpt):
    pc = TieredPromptCache(max_bytes=10**12)
    pc.attach(model, ckpt)
    one = prefill(model, pc, TOKENS[:300])
    bound = int(1.5 * sum(c.nbytes for c in one))
    pc = TieredPromptCache(max_bytes=bound)
    pc.attach(model, ckpt)
    for i in range(4):
        prefill(model, pc, [i] + TOKENS[:299])
    assert 0 < pc.nbytes <= bound and len(pc) == 1


def test_reasoning_memory_matches_only_its_own_messages(tmp_path):
    history = [{"role": "user", "content": "list files"}]
    calls = [{"id": "c1", "type": "function", "function": {"name": "ls", "arguments": '{"path": "."}'}}]
    mem = ReasoningMemory(tmp_path)
    mem.remember(history, "", calls, "I should look at the folder.")
    echoed = {"role": "assistant", "content": None,
              "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "ls", "arguments": {"path": "."}}}]}
    other = {"role": "assistant", "content": "hello"}
    msgs = [*history, echoed, {"role": "tool", "content": "a.txt"}, other]
    assert ReasoningMemory(tmp_path).restore(msgs) == 1  # from disk, after a restart
    assert msgs[1]["reasoning_content"] == "I should look at the folder." and "reasoning_content" not in msgs[3]
    changed = [{"role": "user", "content": "list all files"}, {k: v for k, v in echoed.items() if k != "reasoning_content"}]
    assert mem.restore(changed) == 0 and "reasoning_content" not in changed[1]
    assert message_key(history, "", calls) != message_key(history, "x", calls)


def test_readme_snippet_restores_across_instances(ckpt, tmp_path, monkeypatch):
    """README's TieredPromptCache snippet, as written, twice: the second run (a new cache
    object on the same folder, as after a restart) finds the first run's blocks on disk."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "TieredPromptCache(" in b]
    shutil.copytree(ckpt, tmp_path / "MiniMax-M3-mac-256gb")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    snippet = snippet.replace('"Hello"', '"Hello " * 300')  # a prompt of whole blocks
    first, second = {}, {}
    exec(compile(snippet, "README.md", "exec"), first)
    first["prompts"].flush()
    exec(compile(snippet, "README.md", "exec"), second)
    assert len(second["prompt"]) - len(second["rest"]) >= BLOCK
    assert second["prompts"].source_of(second["prompt"]).disk >= BLOCK
