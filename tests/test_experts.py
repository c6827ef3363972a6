"""--expert-memory: routed experts streamed from a converted folder equal the resident model.

A tiny model with 16 experts per layer (top-2), converted to 4 bits as `convert` writes it,
loaded whole and with budgets of a few experts per layer: misses, evictions and rounds
(a step that needs more experts than there are slots) on every path, and the logits must
stay those of the resident model. Also: the minimum budget, and expert files that break
after loading.
"""

from __future__ import annotations

import os
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest

from minimax_m3_mlx import load_model, synthetic
from minimax_m3_mlx.convert import run as conv
from minimax_m3_mlx.io import CheckpointError
from minimax_m3_mlx.io.reader import locate
from minimax_m3_mlx.model.batch_cache import BatchSparseCache
from minimax_m3_mlx.model.experts import EXPERTS, ExpertMemoryError

TOP_K, EXPERTS_PER_LAYER = 2, 16
CHUNKS = [(0, 13), (13, 14), (14, 45)]  # then decode to SEQ
SEQ = 70  # >> block_size (4) x topk (3): sparse selection drops blocks


def _convert(root, name, **flags):
    out = root / name
    conv.convert(str(root / "src"), str(out), quantize=True, q_bits=4, q_group_size=32, progress=False,
                 log=lambda *a: None, **flags)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    config = synthetic.tiny_config({"num_local_experts": EXPERTS_PER_LAYER, "num_experts_per_tok": TOP_K})
    synthetic.write_checkpoint(root / "src", config, synthetic.random_weights(config, seed=5), "original")
    return {"float32": _convert(root, "q4"), "bfloat16": _convert(root, "q4-bf16", dtype="bfloat16"),
            "src": root / "src"}


def slot_bytes(folder) -> int:
    """Bytes of one expert in every MoE layer: the budget of one slot per layer."""
    return sum(t.row_nbytes for k, t in locate(folder).items() if EXPERTS in k)


@pytest.fixture(scope="module")
def tokens():
    return mx.array(np.random.default_rng(0).integers(0, 256, (2, SEQ)))


def run_all(model, tokens, kv_bits=None) -> np.ndarray:
    """Full forward, then chunked prefill and token-by-token decode through the cache, concatenated."""
    full = model(tokens)
    cache = model.make_cache(kv_bits=kv_bits, kv_group_size=32)
    parts = [model(tokens[:, a:b], cache=cache) for a, b in CHUNKS]
    parts += [model(tokens[:, i:i + 1], cache=cache) for i in range(CHUNKS[-1][1], SEQ)]
    return np.array(mx.concatenate([full, *parts], axis=1).astype(mx.float32))


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(params=["direct", "copies"])
def path(request, monkeypatch):
    """Both ways a miss gets into the pool: read straight into the slot's memory (where the
    backend allows it, as MLX's CPU does), or read into buffers and copied (elsewhere)."""
    from minimax_m3_mlx.model import experts

    monkeypatch.setattr(experts, "writes_in_place", lambda: request.param == "direct")
    return request.param


@pytest.mark.parametrize("dtype, slots, kv_bits", [
    ("float32", 2, None), ("float32", 5, None), ("float32", 16, None), ("float32", 3, 8), ("bfloat16", 2, None),
])
def test_streamed_logits_equal_resident(folders, tokens, dtype, slots, kv_bits, path):
    folder = folders[dtype]
    resident, _ = load_model(folder)
    want = run_all(resident, tokens, kv_bits)
    model, _ = load_model(folder, expert_memory=slots * slot_bytes(folder))
    stats = model.expert_streamer.stats
    assert model.expert_streamer.n_slots == slots
    got = run_all(model, tokens, kv_bits)
    assert rel(got, want) < 1e-6, rel(got, want)
    layers = model.expert_streamer.layers
    assert stats.misses > 0 and stats.bytes_read == stats.reads * layers[0].expert_nbytes
    if slots < EXPERTS_PER_LAYER:
        assert stats.hits > 0 and stats.rounds > 0  # evictions, and steps in rounds
    else:  # each expert read once and never evicted; the copy path drops the guesses no step used
        resident = sum(int((layer.slot_of >= 0).sum()) for layer in layers)
        assert stats.reads - (stats.guessed_unused if path == "copies" else 0) == resident


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_copies_in_pieces_and_small_batches_equal_resident(folders, tokens, monkeypatch, share):
    """The copy path with pieces of one row, and the tightest read-ahead (share 0: one token's
    top-k experts of a layer; misses are committed a batch at a time) or a wide one (runs
    of several experts, each read row by row). The read buffers outside the pools never
    exceed the read-ahead and one more run; none are left when a step ends."""
    from minimax_m3_mlx.model import expert_copies, experts

    folder = folders["float32"]
    want = run_all(load_model(folder)[0], tokens)
    monkeypatch.setattr(experts, "writes_in_place", lambda: False)
    monkeypatch.setattr(experts, "PIECE", 1)
    monkeypatch.setattr(experts, "READ_AHEAD_SHARE", share)
    made = []
    init = expert_copies.RunRead.__init__
    monkeypatch.setattr(expert_copies.RunRead, "__init__", lambda self, *a: (init(self, *a), made.append(self))[0])
    model, _ = load_model(folder, expert_memory=5 * slot_bytes(folder))
    streamer = model.expert_streamer
    per = streamer.layers[0].expert_nbytes
    assert streamer.read_ahead == (TOP_K * per if share == 0 else 5 * per * len(streamer.layers))
    got = run_all(model, tokens)
    assert rel(got, want) < 1e-6, rel(got, want)
    stats = streamer.stats
    assert stats.rounds > 0 and stats.misses > 0
    several = [r for r in made if r.b - r.a > 1]
    assert bool(several) == (share > 0)
    assert all(len(r.futures) == (r.b - r.a) * len(streamer.layers[0].tensors) for r in made)  # a read per row
    assert 0 < stats.peak_staged_bytes <= 1.5 * streamer.read_ahead
    assert streamer.staged_bytes == 0 and not any(layer.staged for layer in streamer.layers)


def test_direct_reads_in_pieces_equal_resident(folders, tokens, monkeypatch):
    """Reads straight into the slots, each row in pieces of 48 bytes (several threads write
    one slot), rounds of half the slots with the next round read meanwhile: exact, and no
    slot is left marked as being written once the reads are done."""
    from minimax_m3_mlx.model import experts

    folder = folders["float32"]
    want = run_all(load_model(folder)[0], tokens)
    monkeypatch.setattr(experts, "writes_in_place", lambda: True)
    monkeypatch.setattr(experts, "PIECE", 48)
    model, _ = load_model(folder, expert_memory=4 * slot_bytes(folder))
    streamer = model.expert_streamer
    assert all(isinstance(layer, experts.DirectLayerExperts) for layer in streamer.layers)
    assert max(t.row_nbytes for t in streamer.layers[0].tensors.values()) > 3 * 48
    got = run_all(model, tokens)
    assert rel(got, want) < 1e-6, rel(got, want)
    assert streamer.stats.rounds > 0 and streamer.stats.prefetched > 0
    streamer.executor.shutdown(wait=True)
    for layer in streamer.layers:
        layer.drop_staged()
        assert not layer.staged and not (layer.expert_in == experts.IN_FLUX).any()
        held = layer.expert_in[layer.expert_in >= 0]
        assert (layer.slot_of[held] == np.nonzero(layer.expert_in >= 0)[0]).all()


def test_batched_decode_equals_resident(folders, path):
    """Rows prefilled alone, merged into batch caches, decoded together (batch_decode.step)."""
    folder = folders["float32"]
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 37, 60)]
    nxt = mx.array(rng.integers(0, 256, (len(prompts), 6)))

    def batched(model):
        caches = []
        for p in prompts:
            cache = model.make_cache()
            model(mx.array([p]), cache=cache)
            caches.append(cache)
        batch = [type(c).merge([cs[j] for cs in caches]) for j, c in enumerate(caches[0])]
        assert isinstance(batch[1], BatchSparseCache)
        return np.array(mx.concatenate([model(nxt[:, t:t + 1], cache=batch) for t in range(nxt.shape[1])], 1))

    want = batched(load_model(folder)[0])
    model, _ = load_model(folder, expert_memory=3 * slot_bytes(folder))  # 3 rows x top-2 > 3 slots
    assert rel(batched(model), want) < 1e-6
    assert model.expert_streamer.stats.rounds > 0


def test_least_recently_used_expert_is_evicted(folders):
    model, _ = load_model(folders["float32"], expert_memory=3 * slot_bytes(folders["float32"]))
    model.expert_streamer.policy = "lru"
    layer = model.expert_streamer.layers[0]
    mlp = model.layers[1].mlp.switch_mlp
    for group in ([0, 1], [2], [0], [5]):  # 1 is the least recently used when 5 arrives
        layer.ensure(mlp, np.array(group))
    assert sorted(np.nonzero(layer.slot_of >= 0)[0].tolist()) == [0, 2, 5]
    stored = locate(folders["float32"])
    for e, slot in ((0, layer.slot_of[0]), (5, layer.slot_of[5])):  # the slots hold those experts' bytes
        t = stored[f"language_model.model.layers.1{EXPERTS}down_proj.weight"]
        np.testing.assert_array_equal(np.array(mlp.down_proj.weight[int(slot)]),
                                      np.array(mx.load(str(t.file))[t.name][e]))


def test_lrfu_keeps_the_often_used_expert_that_lru_would_evict(folders):
    for policy, kept in (("lru", [1, 2, 3]), ("lrfu", [0, 2, 3])):
        model, _ = load_model(folders["float32"], expert_memory=3 * slot_bytes(folders["float32"]))
        model.expert_streamer.policy = policy
        layer = model.expert_streamer.layers[0]
        for group in ([0], [0], [0], [1], [2], [3]):  # 0: used most, least recently
            layer.ensure(model.layers[1].mlp.switch_mlp, np.array(group))
        assert sorted(np.nonzero(layer.slot_of >= 0)[0].tolist()) == kept, policy


def test_budget_below_one_token_is_refused_naming_the_minimum(folders):
    folder = folders["float32"]
    least = TOP_K * slot_bytes(folder)
    with pytest.raises(ExpertMemoryError, match=f"below the minimum of {least} bytes"):
        load_model(folder, expert_memory=least - 1)
    assert load_model(folder, expert_memory=least)[0].expert_streamer.n_slots == TOP_K


def test_unconverted_folder_is_refused(folders):
    with pytest.raises(ExpertMemoryError, match="stacked per layer as `minimax-m3 convert` .or mlx-lm.s"):
        load_model(folders["src"], expert_memory=10**9)


def _expert_file(folder):
    return next(t.file for k, t in locate(folder).items() if EXPERTS in k)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_expert_file_broken_after_loading_names_the_file(folders, tokens, tmp_path, damage, path):
    folder = tmp_path / "m"
    shutil.copytree(folders["float32"], folder)
    want = np.array(load_model(folder)[0](tokens))
    model, _ = load_model(folder, expert_memory=2 * slot_bytes(folder))
    f = _expert_file(folder)
    saved = f.read_bytes()
    if damage == "truncated":
        os.truncate(f, len(saved) // 2)
    else:
        f.unlink()
    with pytest.raises(CheckpointError, match=f.name):
        model(tokens)
    f.write_bytes(saved)  # the pool was left as it was: with the file back, the logits are right
    assert rel(np.array(model(tokens)), want) < 1e-6


# -- the commands ---------------------------------------------------------------------------------------------
def _generate(capsys, folder, *extra):
    from minimax_m3_mlx import cli

    argv = ["generate", "--model", str(folder), "--prompt", "hello there", "-m", "12", "--thinking", "disabled", *extra]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's refusals
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_with_expert_memory_writes_the_resident_text(folders, capsys):
    folder = folders["float32"]
    rc, want, _ = _generate(capsys, folder)
    assert rc == 0
    rc, got, _ = _generate(capsys, folder, "--expert-memory", str(TOP_K * slot_bytes(folder)))
    assert rc == 0
    text = lambda out: out.split("=" * 10)[1]  # noqa: E731
    assert text(got) == text(want) and text(got).strip()
    assert f"Experts: {TOP_K} slots per layer" in got


@pytest.mark.parametrize("value, expect", [
    ("20000", "below the minimum of"), ("lots", "'lots' is not a size"),
])
def test_generate_refuses_a_bad_expert_memory_in_one_line(folders, capsys, value, expect):
    rc, _, err = _generate(capsys, folders["float32"], "--expert-memory", value)
    errors = [line for line in err.splitlines() if "error:" in line]  # argparse's usage lines aside
    assert rc not in (0, None) and "Traceback" not in err and len(errors) == 1, err
    assert "minimax-m3 generate: error:" in errors[0] and expect in errors[0], err


def test_server_streams_experts_and_says_so(folders, caplog):
    """`server --expert-memory`: the reply is the resident model's, the start says how many
    experts stay in memory, and each request's line carries the hit rate so far."""
    import logging

    import openai

    from minimax_m3_mlx import load
    from minimax_m3_mlx.serving.generate import chat_prompt, generate
    from minimax_m3_mlx.serving.server import Server, setup_arg_parser

    folder = folders["float32"]
    messages = [{"role": "user", "content": "Say something about experts and disks."}]
    model, tok = load(str(folder))
    want = generate(model, tok, chat_prompt(tok, messages, thinking="disabled"), max_tokens=8)
    args = ["--model", str(folder), "--port", "0", "--max-tokens", "8", "--thinking", "disabled",
            "--expert-memory", str(3 * slot_bytes(folder))]
    with caplog.at_level(logging.INFO):
        srv = Server(setup_arg_parser().parse_args(args)).start()
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="none", max_retries=0)
            got = client.chat.completions.create(model="default_model", messages=messages, temperature=0)
        finally:
            srv.shutdown()
    assert got.choices[0].message.content == want.text and want.text
    assert f"experts: 3 of {EXPERTS_PER_LAYER} per layer in memory" in caplog.text
    line = next(x for x in caplog.text.splitlines() if "request:" in x)
    assert re.search(r"experts so far \d+\.\d% hits, [\d.]+ (MB|GB|bytes) read", line), line


def test_server_refuses_a_small_budget_before_listening(folders):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "minimax_m3_mlx", "server", "--model", str(folders["float32"]),
                        "--port", "0", "--expert-memory", "20000"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "minimax-m3 server: error:" in lines[0], p.stderr
    assert "below the minimum of" in lines[0]


def test_auto_takes_what_is_left_after_the_rest_the_kv_cache_and_a_margin(folders):
    from minimax_m3_mlx.loading.streamed import MARGIN, auto_expert_memory
    from minimax_m3_mlx.parallel.sizing import cache_bytes

    model, _ = load_model(folders["float32"])
    kv = sum(cache_bytes(model.args, 1000))
    assert auto_expert_memory(model.args, 5_000_000, context=1000, memory=10**8) == \
        int(10**8 * (1 - MARGIN)) - 5_000_000 - kv
    with pytest.raises(ExpertMemoryError, match="nothing is left for experts"):
        auto_expert_memory(model.args, 10**8, context=1000, memory=10**8)
    streamed, _ = load_model(folders["float32"], expert_memory="auto")  # this machine: every expert fits
    assert streamed.expert_streamer.n_slots == EXPERTS_PER_LAYER


def test_plan_offers_expert_memory_on_a_mac_too_small_for_the_model(capsys):
    from minimax_m3_mlx.cli import plan

    assert plan.main(["--hosts", "1x128", "--recipe", "mac-256gb", "--ssd-gbs", "6"]) == 1  # the model does not fit
    out = capsys.readouterr().out
    bank = float(re.findall(r"bank ([\d.]+) GB", out)[0])
    budget = int(re.findall(r"--expert-memory (\d+)GB", out)[0])
    share = float(re.findall(r"(\d+)% of the bank in memory", out)[0]) / 100
    per_token, missed = (float(x) for x in re.findall(r"uses ([\d.]+) GB.*reads ([\d.]+) GB per token", out)[0])
    speed = float(re.findall(r"at 6 GB/s: ([\d.]+) tok/s", out)[0])
    assert 0 < budget < bank and abs(share - budget / bank) < 0.01
    assert abs(missed - (1 - share) * per_token) < 0.05 and abs(speed - 6 / missed) < 0.1
