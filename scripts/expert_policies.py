"""Replay a routing trace (--expert-trace) through expert-cache policies: the hit rate per budget.

Each MoE layer's pool of `slots` experts is simulated as model/experts.py's LayerExperts
runs it: a call's experts, unique, in rounds of at most `slots` (a step that needs more
experts than there are slots), empty slots filled first, the experts of a round never
evicted by that round. Policies choose which resident expert leaves:

  lru      least recently used (what LayerExperts ran first)
  lrfu     the least often used lately: counts per expert halving every experts.HALF_LIFE (16)
           calls of the layer, LRU on ties (what LayerExperts runs by default)
  lfu      the same with counts halving every 1024 calls: frequency over a long window
  belady   the one used furthest in the future (Belady's MIN): the best any policy can do

LayerExperts's counts (misses, hits, rounds) are reproduced exactly under lru and lrfu
for pools filled only on demand (the copy path, expert_copies.py). On the direct path
(where the backend writes the pool in place, as on a Mac) a step in rounds uses half the
slots per round, and an expert read on the next layer's guess stays in the pool even when
unused: the curve is then an estimate.

A call's rounds start with the experts already in the pool, as LayerExperts runs them;
`lru-sorted-rounds` is LRU with the rounds in expert-id order, as LayerExperts ran them
before (an early round then evicts experts that a later round of the same call needs, and
a prefill chunk misses on every expert).

Hits are counted per phase: decode (one new token per row) and prefill (chunks). The curve
(fraction of the bank in memory -> decode hit rate, per policy) goes to --json, for
`minimax-m3 plan --hit-curve FILE`.

  python scripts/expert_policies.py trace.npz --json curve.json
  python scripts/expert_policies.py --record trace.npz --routing zipf --decode 400 --prefill 2048 --chunk 512
      (--record: a small random model with the real routing shape (128 experts, top-4),
       routers and token embeddings as bench_experts.py sets them; random tokens, or with
       --tokens text this repository's README and BENCHMARKS words; its routing is synthetic)
  python scripts/expert_policies.py --record shift.npz --routing shift --period 20   # no model
  python scripts/expert_policies.py --record t.npz --overhead    # also: decode speed without the recorder
  python scripts/expert_policies.py --victim-cost                # the pools' victim choice, timed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minimax_m3_mlx.model import experts  # noqa: E402
from minimax_m3_mlx.model.expert_trace import LoadedTrace, load_trace  # noqa: E402

POLICIES = ("lru", "lrfu", "lfu", "belady")
HALF_LIFE = {"lfu": 1024, "lrfu": experts.HALF_LIFE}  # in calls of the layer


@dataclass
class Counts:
    hits: Dict[str, int] = field(default_factory=lambda: {"decode": 0, "prefill": 0})
    misses: Dict[str, int] = field(default_factory=lambda: {"decode": 0, "prefill": 0})
    rounds: int = 0

    def add(self, other: "Counts") -> None:
        for phase in self.hits:
            self.hits[phase] += other.hits[phase]
            self.misses[phase] += other.misses[phase]
        self.rounds += other.rounds

    def hit_rate(self, phase: str = "decode") -> float:
        n = self.hits[phase] + self.misses[phase]
        return self.hits[phase] / n if n else 0.0

    @property
    def total_hits(self) -> int:
        return sum(self.hits.values())

    @property
    def total_misses(self) -> int:
        return sum(self.misses.values())


def layer_calls(trace: LoadedTrace) -> Dict[int, List]:
    """Per layer, its calls in order: (sorted unique experts, whether a decode step)."""
    calls: Dict[int, List] = {}
    for r in trace.records():
        calls.setdefault(r.layer, []).append((np.unique(r.experts), r.decode))
    return calls


def split(needed: np.ndarray, slots: int, slot_of: np.ndarray, order: str) -> List[np.ndarray]:
    """One call's rounds. resident-first: the experts already in the pool make the first
    round (what LayerExperts does); sorted: by expert id (what it did before)."""
    if order == "resident-first" and needed.size > slots:
        r = slot_of[needed] >= 0
        needed = np.concatenate([needed[r], needed[~r]])
    return [needed[i:i + slots] for i in range(0, needed.size, slots)]


def next_uses(calls, n_experts: int) -> np.ndarray:
    """[call, expert]: the next call after this one that uses the expert (inf: never). With
    resident-first rounds this is exact for Belady: every resident expert a call needs is in
    its first round, so an expert evicted by a call is next needed by a later call."""
    out = np.empty((len(calls), n_experts), np.float64)
    nxt = np.full(n_experts, np.inf)
    for i in range(len(calls) - 1, -1, -1):
        out[i] = nxt
        nxt[calls[i][0]] = i
    return out


def simulate(calls, slots: int, n_experts: int, policy: str, order: str = "resident-first") -> Counts:
    """One layer's pool of `slots` under `policy` over its calls (belady: resident-first rounds)."""
    future = next_uses(calls, n_experts) if policy == "belady" else None
    decay = 0.5 ** (1 / HALF_LIFE[policy]) if policy in HALF_LIFE else None
    slot_of = np.full(n_experts, -1, np.int64)
    expert_in = np.full(slots, -1, np.int64)
    used_at = np.full(slots, -1, np.int64)  # as LayerExperts: empty slots (-1) first, ties by slot
    freq = np.zeros(n_experts)
    c, t = Counts(), -1
    for call, (needed_all, decode) in enumerate(calls):
        phase = "decode" if decode else "prefill"
        groups = split(needed_all, slots, slot_of, "resident-first" if future is not None else order)
        c.rounds += len(groups) - 1
        for needed in groups:
            t += 1
            resident = slot_of[needed] >= 0
            hits, misses = needed[resident], needed[~resident]
            used_at[slot_of[hits]] = t
            c.hits[phase] += int(hits.size)
            c.misses[phase] += int(misses.size)
            if decay is not None:
                freq *= decay
                freq[needed] += 1
            if misses.size == 0:
                continue
            free = np.ones(slots, bool)
            free[slot_of[hits]] = False
            cand = np.nonzero(free)[0]
            held = np.maximum(expert_in[cand], 0)
            if policy == "lru":
                order_ = np.argsort(used_at[cand], kind="stable")
            elif policy == "belady":  # empty first, then the furthest next use
                order_ = np.lexsort((-future[call][held], expert_in[cand] >= 0))
            else:  # empty first, then the lowest count, then the least recent
                order_ = np.lexsort((used_at[cand], freq[held], expert_in[cand] >= 0))
            victims = cand[order_[:misses.size]]
            old = expert_in[victims]
            slot_of[old[old >= 0]] = -1
            expert_in[victims] = misses
            slot_of[misses] = victims
            used_at[victims] = t
    return c


def replay(trace: LoadedTrace, slots: int, policy: str, calls=None, order: str = "resident-first") -> Counts:
    """Every layer of the trace with `slots` slots each, summed."""
    total = Counts()
    for layer_calls_ in (calls or layer_calls(trace)).values():
        total.add(simulate(layer_calls_, slots, trace.n_experts, policy, order))
    return total


def slot_range(n_experts: int, top_k: int) -> List[int]:
    """Budgets from the least one token needs to the whole bank: 1/32, 1/16, ... of it."""
    fractions = (0.03125, 0.0625, 0.09375, 0.125, 0.1875, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    return sorted({max(top_k, round(f * n_experts)) for f in fractions})


def curves(trace: LoadedTrace, policies=POLICIES, slots=None, progress=True) -> dict:
    calls = layer_calls(trace)
    slots = slots or slot_range(trace.n_experts, trace.top_k)
    decode_tokens = int(sum(trace.batch[trace.length == 1])) // max(1, len(calls))
    prefill_tokens = int((trace.batch * trace.length)[trace.length > 1].sum()) // max(1, len(calls))
    out = {"source": trace.source, "n_experts": trace.n_experts, "top_k": trace.top_k, "moe_layers": len(calls),
           "decode_tokens": decode_tokens, "prefill_tokens": prefill_tokens, "phase": "decode",
           "slots": slots, "curves": {}, "prefill": {}, "rounds": {}}
    runs = [(p, p, "resident-first") for p in policies]
    if "lru" in policies:
        runs.append(("lru-sorted-rounds", "lru", "sorted"))
    for name, p, order in runs:
        t0 = time.perf_counter()
        res = [replay(trace, s, p, calls, order) for s in slots]
        out["curves"][name] = [[s / trace.n_experts, c.hit_rate("decode")] for s, c in zip(slots, res)]
        out["prefill"][name] = [[s / trace.n_experts, c.hit_rate("prefill")] for s, c in zip(slots, res)]
        out["rounds"][name] = [c.rounds for c in res]
        if progress:
            print(f"  {name}: {len(slots)} budgets in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def table(result: dict) -> str:
    pols = list(result["curves"])
    head = "| slots | share of bank | " + " | ".join(f"{p} decode" for p in pols) + " | " + \
        " | ".join(f"{p} prefill" for p in pols) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, s in enumerate(result["slots"]):
        dec = " | ".join(f"{result['curves'][p][i][1]:.1%}" for p in pols)
        pre = " | ".join(f"{result['prefill'][p][i][1]:.1%}" for p in pols) if result["prefill_tokens"] else \
            " | ".join("-" for _ in pols)
        lines.append(f"| {s} | {s / result['n_experts']:.1%} | {dec} | {pre} |")
    return "\n".join(lines)


# -- a trace from a small random model (--record) -------------------------------------------------------
EMBED_SCALE = 30.0  # token embeddings well above the attention output (bench_experts.random_routers: why)


def small_model(n_layers: int, routing: str, seed: int = 0):
    """A random model with the real routing shape (128 experts, top-4) and small widths."""
    import mlx.core as mx

    from minimax_m3_mlx import synthetic
    from minimax_m3_mlx.config import ModelArgs
    from minimax_m3_mlx.model import Model

    cfg = synthetic.tiny_config({"hidden_size": 256, "num_local_experts": 128, "num_experts_per_tok": 4,
                                 "num_hidden_layers": n_layers, "moe_layer_freq": [1] * n_layers,
                                 "vocab_size": 8192, "max_position_embeddings": 1 << 16})
    cfg.pop("vision_config")
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(cfg))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        gate = layer.mlp.gate
        gate.weight = mx.random.normal(gate.weight.shape) / gate.weight.shape[1] ** 0.5
        if routing == "zipf":  # as bench_experts.zipf_bias: a bias falling as 1/rank, experts shuffled
            E = gate.e_score_correction_bias.shape[0]
            bias = np.zeros(E, np.float32)
            bias[rng.permutation(E)] = 0.5 / np.arange(1, E + 1)
            gate.e_score_correction_bias = mx.array(bias)
    emb = model.language_model.model.embed_tokens
    emb.weight = emb.weight * EMBED_SCALE
    return model, cfg["text_config"]["vocab_size"]


def text_tokens(n: int, vocab: int) -> np.ndarray:
    """The words of this repository's README and BENCHMARKS, hashed into the vocabulary: a
    token stream with the repetitions of real text (the routing is still a random model's)."""
    words = " ".join((ROOT / f).read_text() for f in ("README.md", "BENCHMARKS.md")).split()
    if len(words) < n:
        raise SystemExit(f"--tokens text: the texts have {len(words)} words, {n} asked for")
    return np.array([zlib.crc32(w.encode()) % vocab for w in words[:n]])


def record(path: Path, routing: str, tokens: str, decode: int, prefill: int, chunk: int, n_layers: int,
           overhead: bool = False, seed: int = 0) -> None:
    """A prompt of `prefill` tokens in chunks of `chunk`, then `decode` tokens one by one
    (random ones, or the words that follow in the text). overhead: also decode without the
    trace first, and print both speeds."""
    import mlx.core as mx

    from minimax_m3_mlx.model.expert_trace import ExpertTrace

    model, vocab = small_model(n_layers, routing, seed)
    trace = ExpertTrace(128, 4, source=f"SYNTHETIC: a random model (128 experts, top-4, {n_layers} MoE layers), "
                                       f"{routing} routing, {tokens} tokens (expert_policies.py --record)")
    rng = np.random.default_rng(seed + 1)
    n = max(1, prefill) + decode
    stream = rng.integers(0, vocab, n) if tokens == "random" else text_tokens(n, vocab)
    prompt, rest = stream[None, :n - decode], stream[n - decode:]
    for traced in ([False, True] if overhead else [True]):  # untraced first: the same tokens, timed
        model.record_experts(trace if traced else None)
        cache = model.make_cache()
        for a in range(0, prompt.shape[1], chunk):
            mx.eval(model(mx.array(prompt[:, a:a + chunk]), cache=cache))
        t0 = time.perf_counter()
        for i, tok in enumerate(rest.reshape(-1, 1, 1)):
            mx.eval(model(mx.array(tok), cache=cache))
            if (i + 1) % 100 == 0:
                print(f"  {i + 1}/{decode} decode tokens ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                      flush=True)
        dt = time.perf_counter() - t0
        print(f"decode {'with' if traced else 'without'} the trace: {decode / dt:.1f} tok/s")
    print(f"{trace.save(path)}: {len(trace)} layer calls over {trace.step + 1} steps")


def record_shifting(path: Path, decode: int, prefill: int, chunk: int, n_layers: int, period: int,
                    seed: int = 0) -> None:
    """No model: each layer's tokens choose 4 of 128 experts with Zipf weights (1/rank) over an
    order of the experts drawn anew every `period` tokens: skewed routing whose favourites
    change, the case where counting past uses misleads."""
    import mlx.core as mx

    from minimax_m3_mlx.model.expert_trace import ExpertTrace

    E, k = 128, 4
    rng = np.random.default_rng(seed)
    w = 1 / np.arange(1, E + 1)
    trace = ExpertTrace(E, k, source=f"SYNTHETIC: no model, Zipf routing whose favourites change every {period} "
                                     f"tokens, {n_layers} layers (expert_policies.py --routing shift)")
    sizes = [min(chunk, prefill - a) for a in range(0, prefill, chunk)] + [1] * decode
    total = sum(sizes)
    choices = np.empty((n_layers, total, k), np.int64)
    for layer in range(n_layers):
        for a in range(0, total, period):
            p = w[rng.permutation(E)]
            for t in range(a, min(a + period, total)):
                choices[layer, t] = rng.choice(E, k, replace=False, p=p / p.sum())
    done = 0
    for n in sizes:
        for layer in range(n_layers):
            trace.record(layer, mx.array(choices[layer, None, done:done + n]))
        done += n
    print(f"{trace.save(path)}: {len(trace)} layer calls over {trace.step + 1} steps")


def victim_cost(n: int = 20000) -> None:
    """The pools' own victim choice (experts.choose_victims) per policy, side by side, and the
    per-call decay and count of lrfu's use counts: 4 victims among 60 candidates of 128."""
    import timeit

    rng = np.random.default_rng(0)
    held, used, uses = rng.permutation(128)[:60], rng.integers(0, 1000, 60), rng.random(128)
    for p in experts.POLICIES:
        t = timeit.timeit(lambda: experts.choose_victims(p, held, used, uses, 4), number=n) / n
        print(f"choose_victims {p}: {t * 1e6:.1f} us")

    def count():
        uses[:] *= 0.5 ** (1 / experts.HALF_LIFE)
        uses[held[:4]] += 1

    print(f"decay and count: {timeit.timeit(count, number=n) / n * 1e6:.1f} us")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", nargs="?", help="a trace written by --expert-trace (or --record)")
    p.add_argument("--json", help="write the hit-rate curves here (for plan --hit-curve)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--slots", help="slot counts per layer, comma-separated (default: 1/32 .. all of the bank)")
    p.add_argument("--record", metavar="FILE", help="record a trace from a small random model instead")
    p.add_argument("--routing", choices=("uniform", "zipf", "shift"), default="uniform",
                   help="with --record: random routers, biased as bench_experts.py --routing zipf, or no "
                        "model: Zipf routing whose favourites change every --period tokens")
    p.add_argument("--period", type=int, default=50, help="with --routing shift")
    p.add_argument("--overhead", action="store_true",
                   help="with --record: time the decode without the trace too (the recorder's cost)")
    p.add_argument("--tokens", choices=("random", "text"), default="random",
                   help="with --record: random tokens, or this repository's README and BENCHMARKS words")
    p.add_argument("--decode", type=int, default=400, help="with --record: decode tokens")
    p.add_argument("--prefill", type=int, default=2048, help="with --record: prompt tokens")
    p.add_argument("--chunk", type=int, default=512, help="with --record: prefill chunk tokens")
    p.add_argument("--layers", type=int, default=4, help="with --record: MoE layers")
    p.add_argument("--victim-cost", action="store_true", help="time the pools' victim choice per policy")
    a = p.parse_args(argv)
    if a.victim_cost:
        victim_cost()
        return 0
    if a.record and a.routing == "shift":
        record_shifting(Path(a.record), a.decode, a.prefill, a.chunk, a.layers, a.period)
        return 0
    if a.record:
        record(Path(a.record), a.routing, a.tokens, a.decode, a.prefill, a.chunk, a.layers, a.overhead)
        return 0
    if not a.trace:
        p.error("give a trace file (or --record FILE)")
    policies = a.policies.split(",")
    unknown = set(policies) - set(POLICIES)
    if unknown:
        p.error(f"--policies: unknown {sorted(unknown)}; choose from {', '.join(POLICIES)}")
    try:
        trace = load_trace(a.trace)
    except ValueError as e:
        p.error(str(e))
    try:
        slots = sorted({int(s) for s in a.slots.split(",")}) if a.slots else None
    except ValueError:
        p.error(f"--slots {a.slots}: expected slot counts such as 8,16,32")
    if slots and not 1 <= slots[0] <= slots[-1] <= trace.n_experts:
        p.error(f"--slots: each between 1 and the {trace.n_experts} experts of a layer")
    result = curves(trace, policies, slots)
    result["trace"] = str(a.trace)
    print(f"{a.trace}: {trace.source}; {result['moe_layers']} MoE layers, {trace.n_experts} experts, top-{trace.top_k};"
          f" {result['prefill_tokens']} prefill and {result['decode_tokens']} decode tokens per layer")
    print(table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
