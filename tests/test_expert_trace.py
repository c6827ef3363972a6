"""Routing traces (--expert-trace), their replay through cache policies, and `plan --hit-curve`.

The recorder must keep what every router chose, in order; the simulator's LRU must count
exactly what the real slot pools count on the same run (misses, hits, rounds, at budgets
that make steps run in rounds); Belady's MIN must never lose to another policy; and plan's
figures must follow from the curve it is given.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from minimax_m3_mlx import load_model, synthetic
from minimax_m3_mlx.convert import run as conv
from test_experts import _generate
from minimax_m3_mlx.io.reader import locate
from minimax_m3_mlx.model.expert_trace import ExpertTrace, LoadedTrace, load_trace
from minimax_m3_mlx.model.experts import EXPERTS, POLICIES, POLICY
from minimax_m3_mlx.model.moe import Router

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import expert_policies as ep  # noqa: E402

TOP_K, N_EXPERTS = 2, 16
CHUNKS = [(0, 13), (13, 14), (14, 45)]
SEQ = 70


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    config = synthetic.tiny_config({"num_local_experts": N_EXPERTS, "num_experts_per_tok": TOP_K})
    synthetic.write_checkpoint(root / "src", config, synthetic.random_weights(config, seed=7), "original")
    conv.convert(str(root / "src"), str(root / "q4"), quantize=True, q_bits=4, q_group_size=32, progress=False,
                 log=lambda *a: None)
    return root / "q4"


def slot_bytes(folder) -> int:
    return sum(t.row_nbytes for k, t in locate(folder).items() if EXPERTS in k)


def run(model, tokens) -> np.ndarray:
    """Chunked prefill of two rows, then token-by-token decode through the cache."""
    cache = model.make_cache()
    parts = [model(tokens[:, a:b], cache=cache) for a, b in CHUNKS]
    parts += [model(tokens[:, i:i + 1], cache=cache) for i in range(CHUNKS[-1][1], SEQ)]
    return np.array(mx.concatenate(parts, axis=1))


@pytest.fixture(scope="module")
def tokens():
    return mx.array(np.random.default_rng(1).integers(0, 256, (2, SEQ)))


def traced(model, tokens, tmp_path) -> tuple:
    trace = ExpertTrace(N_EXPERTS, TOP_K, source="test")
    model.record_experts(trace)
    logits = run(model, tokens)
    model.record_experts(None)
    return logits, load_trace(trace.save(tmp_path / "t.npz"))


def test_trace_round_trip_keeps_every_routers_choices_in_order(folder, tokens, tmp_path, monkeypatch):
    model, _ = load_model(folder)
    want = run(model, tokens)  # untraced: decode runs compiled
    seen = []
    route = Router.route

    def spy(self, logits):
        inds, w = route(self, logits)
        seen.append(np.array(inds))
        return inds, w

    monkeypatch.setattr(Router, "route", spy)
    got, trace = traced(model, tokens, tmp_path)
    assert np.array_equal(got, want)  # recording changes nothing
    moe = [i for i, layer in enumerate(model.layers) if layer.is_moe]
    steps = len(CHUNKS) + SEQ - CHUNKS[-1][1]
    assert trace.layer.tolist() == moe * steps and trace.step.tolist() == [s for s in range(steps) for _ in moe]
    assert trace.batch.tolist() == [2] * len(trace.layer)
    assert trace.length.tolist() == [b - a for a, b in CHUNKS for _ in moe] + [1] * (len(trace.layer) - 3 * len(moe))
    records = list(trace.records())
    assert len(records) == len(seen) and (trace.n_experts, trace.top_k, trace.source) == (N_EXPERTS, TOP_K, "test")
    for r, s in zip(records, seen):
        np.testing.assert_array_equal(r.experts, s.reshape(-1))


def test_a_file_that_is_not_a_trace_is_refused_by_name(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="x.npz: not an expert trace"):
        load_trace(bad)


@pytest.mark.parametrize("slots", [2, 3, 5, 9])
@pytest.mark.parametrize("policy", POLICIES)
def test_simulated_policy_counts_what_the_slot_pools_count(folder, tokens, tmp_path, slots, policy, monkeypatch):
    """The simulator models pools filled only on demand, in rounds of all the slots: the copy
    path (on the direct path a wrong guess stays in the pool and rounds take half the slots)."""
    from minimax_m3_mlx.model import experts

    monkeypatch.setattr(experts, "writes_in_place", lambda: False)
    model, _ = load_model(folder, expert_memory=slots * slot_bytes(folder))
    assert model.expert_streamer.policy == POLICY
    model.expert_streamer.policy = policy  # before any expert is read
    stats = model.expert_streamer.stats
    _, trace = traced(model, tokens, tmp_path)
    sim = ep.replay(trace, slots, policy)
    assert (sim.total_hits, sim.total_misses, sim.rounds) == (stats.hits, stats.misses, stats.rounds)
    assert stats.hits > 0 and stats.rounds > 0  # evictions and steps in rounds were exercised
    # The rounds' order matters: in expert-id order (the pools' old order) prefill hits fewer.
    assert ep.replay(trace, slots, policy, order="sorted").hits["prefill"] < sim.hits["prefill"]


def random_trace(rng, n_calls: int, n_experts: int, top_k: int, rows: int, skew: float) -> LoadedTrace:
    """Decode-like calls of `rows` tokens, experts drawn with weights 1/rank**skew."""
    p = 1 / np.arange(1, n_experts + 1) ** skew
    p = p[rng.permutation(n_experts)] / p.sum()
    experts = np.concatenate([rng.choice(n_experts, top_k, replace=False, p=p) for _ in range(n_calls * rows)])
    ones = np.ones(n_calls, np.int32)
    return LoadedTrace(np.zeros(n_calls, np.int16), np.arange(n_calls), ones * rows, ones, experts.astype(np.uint16),
                       n_experts, top_k, "random")


@pytest.mark.parametrize("skew", [0.0, 1.2])
def test_belady_never_loses_to_another_policy(skew):
    rng = np.random.default_rng(int(skew * 10))
    for rows in (1, 3):
        trace = random_trace(rng, 300, 32, 4, rows, skew)
        for slots in (4 * rows + 1, 8, 16, 24):  # more slots than a call needs: a choice to make
            if slots <= 4 * rows:
                continue
            best = ep.replay(trace, slots, "belady").total_hits
            others = {p: ep.replay(trace, slots, p).total_hits for p in ep.POLICIES}
            assert all(best >= h for h in others.values()), (rows, slots, best, others)
            assert best > others["lru"]  # a bound that is never reached would test nothing


def test_curve_json_has_a_point_per_budget_and_policy(tmp_path):
    trace = random_trace(np.random.default_rng(0), 200, 32, 4, 1, 1.0)
    out = ep.curves(trace, progress=False)
    assert set(out["curves"]) == {*ep.POLICIES, "lru-sorted-rounds"}
    for name, points in out["curves"].items():
        assert [f for f, _ in points] == [s / 32 for s in out["slots"]]
        rates = [r for _, r in points]
        assert rates[-1] == pytest.approx((200 * 4 - 32) / (200 * 4), abs=0.01) or name == "belady"


def _plan(capsys, *extra):
    from minimax_m3_mlx.cli import plan

    assert plan.main(["--hosts", "1x128", "--recipe", "mac-256gb", "--ssd-gbs", "5", *extra]) == 1  # does not fit
    return capsys.readouterr().out


def test_plan_reads_hit_rate_and_speed_off_the_curve(capsys, tmp_path):
    fractions, rates = [0.1, 0.3, 0.6, 0.9], [0.32, 0.58, 0.81, 0.97]
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps({"source": "SYNTHETIC: a test curve",
                                 "curves": {POLICY: [[f, r] for f, r in zip(fractions, rates)]}}))
    out = _plan(capsys, "--hit-curve", str(curve))
    budget = int(re.findall(r"--expert-memory (\d+)GB", out)[0])
    bank = float(re.findall(r"bank ([\d.]+) GB", out)[0])
    per_token = float(re.findall(r"a token uses ([\d.]+) GB", out)[0])
    share = float(re.findall(r"(\d+)% of the bank in memory", out)[0]) / 100
    assert abs(share - budget / bank) < 0.01 and "measured curve (SYNTHETIC: a test curve)" in out
    i = np.searchsorted(fractions, share)  # the two measured budgets around the share
    want = rates[i - 1] + (rates[i] - rates[i - 1]) * (share - fractions[i - 1]) / (fractions[i] - fractions[i - 1])
    hit, read, speed = (float(x) for x in re.findall(r"hits ([\d.]+)% at .*reads ([\d.]+) GB per token; "
                                                      r"at 5 GB/s: ([\d.]+) tok/s", out)[0])
    assert abs(hit / 100 - want) < 0.01, (hit, want)
    assert abs(read - (1 - want) * per_token) < 0.05 and abs(speed - 5 / ((1 - want) * per_token)) < 0.15
    uniform = float(re.findall(r"at 5 GB/s: ([\d.]+) tok/s\n", out)[0])
    assert speed > uniform  # the curve hits more than the budget's share: fewer reads


@pytest.mark.parametrize("content, expect", [
    ("{", "not a hit-rate curve"), ({"curves": {"other": []}}, f"needs curves.{POLICY}"),
    ({"curves": {POLICY: [[0.5, 0.2], [0.2, 0.4]]}}, "increasing fractions"),
    ({"curves": {POLICY: [[0.5, 1.2]]}}, "hit rates in [0, 1]"),
    ({"curves": {POLICY: [[0.5, 0.6]]}, "n_experts": 16, "top_k": 2},
     "routes 2 of 16 experts; this one routes 4 of 128"),
])
def test_plan_refuses_a_bad_curve_in_one_line(capsys, tmp_path, content, expect):
    from minimax_m3_mlx import cli

    f = tmp_path / "c.json"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    assert cli.main(["plan", "--hosts", "1x128", "--hit-curve", str(f)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minimax-m3 plan: error: --hit-curve") and expect in err[0], err


def test_generate_saves_the_trace_of_its_run(folder, capsys, tmp_path):
    rc, want, _ = _generate(capsys, folder)
    f = tmp_path / "run.npz"
    rc, got, _ = _generate(capsys, folder, "--expert-trace", str(f), "--expert-memory", str(3 * slot_bytes(folder)))
    assert rc == 0
    text = lambda out: out.split("=" * 10)[1]  # noqa: E731
    assert text(got) == text(want)
    trace = load_trace(f)
    n_moe = len(trace.moe_layers)
    generated = int(re.findall(r"Generation: (\d+) tokens", got)[0])
    prompt = int(re.findall(r"Prompt: (\d+) tokens", got)[0])
    through = int((trace.batch * trace.length).sum()) // n_moe  # tokens through each MoE layer
    assert prompt + generated - 1 <= through <= prompt + generated  # the last token may not be fed back
    assert f"{trace.source}".startswith(f"minimax-m3 generate --model {folder}: {prompt} prompt tokens")
    assert f"Expert trace: {len(trace.layer)} layer calls" in got


def test_generate_refuses_a_trace_path_in_a_missing_folder(folder, capsys, tmp_path):
    rc, _, err = _generate(capsys, folder, "--expert-trace", str(tmp_path / "nope" / "t.npz"))
    lines = [x for x in err.splitlines() if "error:" in x]
    assert rc != 0 and len(lines) == 1 and "--expert-trace" in lines[0] and "no folder" in lines[0], err


def test_chat_saves_the_trace_of_the_whole_conversation(folder, capsys, tmp_path):
    from minimax_m3_mlx.serving import chat

    f = tmp_path / "chat.npz"
    lines = iter(["hello", "and again", "/exit"])
    assert chat.main(["--model", str(folder), "-m", "3", "--thinking", "disabled", "--expert-trace", str(f)],
                     input_fn=lambda _: next(lines)) == 0
    out = capsys.readouterr().out
    trace = load_trace(f)
    assert trace.source == f"minimax-m3 chat --model {folder}" and f"Expert trace: {len(trace.layer)}" in out
    assert (trace.length > 1).sum() >= 2 * len(trace.moe_layers)  # both turns' prompts were prefilled
