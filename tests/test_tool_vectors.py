"""The tool-call and reasoning vectors of tool_vectors.py, run every way a reply is read.

Each vector goes through the non-streaming reader (tool_parser.split_reply) and through
the server's streaming path (server._ReplyTracker on mlx-lm's text state machine, with
this package's tokenizer wiring) cut into chunks several ways: whole, one character at
a time, random cuts (fixed seeds), words and markers, and the tiny tokenizer's own tokens
through its streaming detokenizer. All must give the vector's content, reasoning and
calls, types included (compared as JSON, so 5 and 5.0 or 1 and true differ).

Reply-level cases (a final `]` or `<`, finish_reason, content/reasoning split, truncated
and unparsed calls) go through the real server and the `openai` client, streamed and not;
the tiny random model is made to write the exact text by a logits processor that forces
its tokens (test_server.py's `force`), so sampling, detokenizing, the handler and its
state machine all run as in production.
"""

from __future__ import annotations

import collections
import json
import random
import re
from types import SimpleNamespace

import pytest
from test_server import ckpt, client, force, server  # noqa: F401  (fixtures)
from tool_vectors import TOOLS, VECTORS

from minimax_m3_mlx.chat_format.tool_parser import parse_tool_call, split_reply

MARKERS = re.compile(r"(\]<\]minimax\[>\[|</?mm:think>|\s+|\w+|.)", re.S)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from mlx_lm.tokenizer_utils import load

    from minimax_m3_mlx import synthetic
    from minimax_m3_mlx.chat_format.tokenizer import configure_tokenizer

    path = tmp_path_factory.mktemp("vector_tokenizer")
    synthetic.write_tiny_tokenizer(path, synthetic.tiny_config())
    return configure_tokenizer(load(path))


def _json(x):
    return json.dumps(x, sort_keys=True, ensure_ascii=False)


def _tools(v):
    return TOOLS[v["tools"]] if v["tools"] else None


def _chunkings(tok, text):
    yield "whole", [text]
    yield "chars", list(text)
    for seed in (0, 1):
        rng, cuts, pos = random.Random(seed), [], 0
        while pos < len(text):
            step = rng.randint(1, 9)
            cuts.append(text[pos:pos + step])
            pos += step
        yield f"random{seed}", cuts
    yield "words", MARKERS.findall(text)
    detok = tok.detokenizer
    detok.reset()
    pieces = []
    for t in tok.encode(text, add_special_tokens=False):
        detok.add_token(t)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    yield "tokens", pieces


def _stream(tok, chunks, tools, state):
    """The server's reading of a reply arriving in `chunks`, ended by EOS."""
    from mlx_lm.generate import make_text_state_machine
    from mlx_lm.server import Response

    from minimax_m3_mlx.serving.server import _ReplyTracker

    ctx = SimpleNamespace(text_sm=make_text_state_machine(tok), initial_state=state, tool_parser=tok.tool_parser)
    tracker = _ReplyTracker(ctx, tok, tools)
    gens = [Response(c, 1, 0.0, None, ()) for c in chunks] + [Response("", tok.eos_token_id, 0.0, "stop", ())]
    seen = list(tracker.follow(gens))
    assert seen[-1].finish_reason == "length" and tracker.stopped_at_eos  # the handler flushes, the reply says stop
    return tracker.take_content(), "".join(tracker.reasoning), tracker.calls


@pytest.mark.parametrize("v", VECTORS, ids=[v["id"] for v in VECTORS])
def test_vector(tok, v):
    tools = _tools(v)
    whole = split_reply(v["text"], tools, v["state"])
    assert (whole.content, whole.reasoning) == (v["content"], v["reasoning"]), v["note"]
    assert _json(whole.calls) == _json(v["calls"]), v["note"]
    for name, chunks in _chunkings(tok, v["text"]):
        assert "".join(chunks) == v["text"]
        content, reasoning, calls = _stream(tok, chunks, tools, v["state"])
        assert (content, reasoning) == (v["content"], v["reasoning"]), name
        assert _json(calls) == _json(v["calls"]), name


def test_vector_sources_and_ids():
    ids = [v["id"] for v in VECTORS]
    assert len(ids) == len(set(ids))
    counts = collections.Counter(v["source"] for v in VECTORS)
    assert set(counts) == {"vllm-py", "vllm-rust", "sglang", "rtp-llm", "real", "issue-15", "rule"}, counts


def test_parser_contract():
    """mlx-lm's contract: one call a dict, several a list, none a ValueError naming the text."""
    body = '<invoke name="f"><a>1</a></invoke>'
    assert parse_tool_call(body) == {"name": "f", "arguments": {"a": 1}}
    assert parse_tool_call(body + body) == [{"name": "f", "arguments": {"a": 1}}] * 2
    with pytest.raises(ValueError, match="no complete MiniMax tool call.*'junk'"):
        parse_tool_call("junk")


# -- reply level, through the server -------------------------------------------------------------
BY_ID = {v["id"]: v for v in VECTORS}
REPLIES = [
    # (vector, cut at max_tokens)
    ("issue-trailing-bracket", False),
    ("issue-trailing-angle", False),
    ("sglang-finish-releases-ns-prefix", False),
    ("rule-think-end-prefix-is-text", False),
    ("issue-inner-think-end", False),
    ("vllm-reason-leading-end", False),
    ("vllm-reason-enabled", False),
    ("rule-reasoning-ends-in-angle", False),
    ("real-minimax-m3-31-thinking", False),
    ("rule-unparsed-block-in-place", False),
    ("issue-truncated-named", True),
    ("issue-truncated-in-name", True),
]


def _ask(client, v, stream, max_tokens):
    kwargs = dict(model="default_model", messages=[{"role": "user", "content": "Go."}], max_tokens=max_tokens,
                  extra_body={"chat_template_kwargs": {
                      "thinking_mode": "enabled" if v["state"] == "reasoning" else "adaptive"}})
    if v["tools"]:
        kwargs["tools"] = TOOLS[v["tools"]]
    r = client.chat.completions.create(stream=stream, **kwargs)
    if not stream:
        msg = r.choices[0].message
        calls = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in msg.tool_calls or []]
        return msg.content, (msg.model_extra or {}).get("reasoning_content"), calls, r.choices[0].finish_reason
    chunks = [c for c in r if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    content = "".join(d.content or "" for d in deltas) or None
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) or None
    calls = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)}
             for d in deltas for c in d.tool_calls or []]
    return content, reasoning, calls, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("vid, cut", REPLIES, ids=[r[0] for r in REPLIES])
def test_reply_through_server(client, force, tok, vid, cut):  # noqa: F811
    v = BY_ID[vid]
    ids = tok.encode(v["text"], add_special_tokens=False)
    # cut: the reply ends at max_tokens right after the text; else the model ends it (EOS)
    finish = "length" if cut else "tool_calls" if v["calls"] else "stop"
    for stream in (False, True):
        force(tok, v["text"])
        got = _ask(client, v, stream, max_tokens=len(ids) if cut else len(ids) + 8)
        want = (v["content"] or None, v["reasoning"] or None, v["calls"], finish)
        assert _json(got) == _json(want), (stream, got)


def test_stop_word_keeps_unparsed_block_and_says_stop(client, force, tok):  # noqa: F811
    """A stop word ends the reply (no flush there: the held text is the stop word's start)."""
    from tool_vectors import END, START

    force(tok, f"A{START}junk{END}B ]STOP and more")
    r = client.chat.completions.create(model="default_model", messages=[{"role": "user", "content": "Go."}],
                                       max_tokens=60, stop=["STOP"], tools=TOOLS["review"])
    assert r.choices[0].message.content == f"A{START}junk{END}B ]"
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
