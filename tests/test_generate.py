"""Generation, chat, the MiniMax-M3 chat format and its tool-call parser, on a tiny checkpoint."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from minimax_m3_mlx import synthetic  # noqa: E402
from minimax_m3_mlx.chat_format.markers import (  # noqa: E402
    NS_TOKEN,
    THINK_END,
    THINK_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
)
from minimax_m3_mlx.chat_format.tokenizer import ThinkingModeError, resolve_thinking_mode  # noqa: E402
from minimax_m3_mlx.synthetic import SPECIAL_TOKENS  # noqa: E402
from minimax_m3_mlx.chat_format.tool_parser import parse_tool_call, split_tool_calls  # noqa: E402

SMALL_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "zip": {"type": "string"},
                "ratio": {"type": "number"},
                "hourly": {"type": "boolean"},
                "note": {"type": ["string", "null"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "points": {"type": "array", "items": {"type": "object", "properties": {
                    "x": {"type": "integer"}, "label": {"type": "string"}}}},
                "opts": {"type": "object", "properties": {"unit": {"type": "string"}, "depth": {"type": "integer"}}},
            },
        },
    },
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    config = synthetic.tiny_config()
    weights = synthetic.random_weights(config, seed=3)
    ref_weights = synthetic.write_checkpoint(path, config, weights, "original")
    return path, config, ref_weights


@pytest.fixture(scope="module")
def loaded(ckpt):
    from minimax_m3_mlx import load

    return load(str(ckpt[0]))


def user(text):
    return [{"role": "user", "content": text}]


# -- chat format ----------------------------------------------------------------------------
def test_special_tokens_keep_their_ids_and_encode_whole(loaded):
    _, tok = loaded
    for text, i in SPECIAL_TOKENS.items():
        assert tok.encode(text, add_special_tokens=False) == [i], text
    assert tok.convert_tokens_to_ids("]<]image[>[") == 300
    assert tok.eos_token_id == 258 and tok.bos_token == "]~!b["


def test_tokenizer_gets_minimax_m3_markers(loaded):
    _, tok = loaded
    assert tok.has_thinking and tok.think_start == THINK_START and tok.think_end == THINK_END
    assert tok.think_start_id == SPECIAL_TOKENS[THINK_START]
    assert tok.has_tool_calling and tok.tool_call_start == TOOL_CALL_START and tok.tool_call_end == TOOL_CALL_END
    assert tok.tool_parser is parse_tool_call


@pytest.mark.parametrize("mode, suffix, line", [
    ("enabled", "]~b]ai\n" + THINK_START, "Current thinking mode: enabled."),
    ("adaptive", "]~b]ai\n", "Current thinking mode: adaptive."),
    ("disabled", "]~b]ai\n" + THINK_END, "Current thinking mode: disabled."),
])
def test_thinking_mode_drives_the_template(loaded, mode, suffix, line):
    _, tok = loaded
    text = tok.apply_chat_template(user("hi"), add_generation_prompt=True, tokenize=False, thinking_mode=mode)
    assert text.startswith("]~!b[]~b]system\n") and text.endswith("]~b]user\nhi[e~[\n" + suffix)
    assert line in text
    # mlx-lm's boolean spelling maps onto the same variable
    if mode != "adaptive":
        same = tok.apply_chat_template(user("hi"), add_generation_prompt=True, tokenize=False,
                                       enable_thinking=mode == "enabled")
        assert same == text


def test_thinking_mode_default_and_errors(loaded):
    _, tok = loaded
    plain = tok.apply_chat_template(user("hi"), add_generation_prompt=True, tokenize=False)
    assert plain.endswith("]~b]ai\n") and "thinking mode: adaptive" in plain
    assert resolve_thinking_mode(None, None, "disabled") == "disabled"
    with pytest.raises(ThinkingModeError, match="thinking_mode must be one of"):
        tok.apply_chat_template(user("hi"), thinking_mode="sometimes")
    with pytest.raises(ThinkingModeError, match="contradicts"):
        resolve_thinking_mode("disabled", True)
    with pytest.raises(ThinkingModeError, match="true or false"):
        resolve_thinking_mode(None, "yes")


def test_history_roles_reasoning_and_tool_results(loaded):
    _, tok = loaded
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "22C"},
        {"role": "assistant", "content": "Sunny, 22C."},
        {"role": "user", "content": "Thanks"},
    ]
    text = tok.apply_chat_template(msgs, tools=[WEATHER], add_generation_prompt=True, tokenize=False,
                                   thinking_mode="disabled")
    assert "]~b]developer\nBe brief.\n\n# Tools\n" in text
    assert '<tool>{"name": "get_weather"' in text
    assert ("]~b]ai\n" + THINK_START + "Need the tool." + THINK_END + TOOL_CALL_START + "\n" + NS_TOKEN
            + '<invoke name="get_weather">' + NS_TOKEN + "<city>Paris" + NS_TOKEN + "</city>" + NS_TOKEN
            + "</invoke>\n" + TOOL_CALL_END + "[e~[\n") in text
    assert "]~b]tool\n<response>sunny</response>\n<response>22C</response>[e~[\n" in text
    assert "]~b]ai\n" + THINK_END + "Sunny, 22C.[e~[\n" in text  # a turn without reasoning
    with pytest.raises(Exception, match="tool message must follow"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# -- tool-call parser -----------------------------------------------------------------------
def test_tool_calls_round_trip_through_the_template(loaded):
    """What the template writes for a call is what the parser reads back, types included."""
    _, tok = loaded
    args = {"city": "Paris <b>Île</b>", "days": 3, "zip": "007", "ratio": 0.5, "hourly": True,
            "tags": ["a", "b c"], "points": [{"x": 1, "label": "p"}, {"x": -2, "label": "q"}],
            "opts": {"unit": "C", "depth": 2}}
    msgs = user("x") + [{"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": args}},
        {"type": "function", "function": {"name": "noop", "arguments": {}}},
    ]}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    reply = text[text.rindex("]~b]ai\n") + len("]~b]ai\n"):]
    content, calls = split_tool_calls(reply, [WEATHER])
    assert content == THINK_END + "Let me check.[e~[\n"
    assert calls == [{"name": "get_weather", "arguments": args}, {"name": "noop", "arguments": {}}]


def test_tool_parser_types_forms_and_failures():
    ns = NS_TOKEN
    body = (f'\n{ns}<invoke name="get_weather">{ns}<days>4{ns}</days>{ns}<zip>0123{ns}</zip>'
            f'{ns}<note>null{ns}</note>{ns}<tags>{ns}</tags>{ns}<extra>{{"k": [1, 2]}}{ns}</extra>'
            f'{ns}<free>plain text{ns}</free>{ns}</invoke>\n')
    # parameters the schema does not declare stay text (tests/test_tool_vectors.py has the rules)
    assert parse_tool_call(body, [WEATHER]) == {"name": "get_weather", "arguments": {
        "days": 4, "zip": "0123", "note": None, "tags": [], "extra": '{"k": [1, 2]}', "free": "plain text"}}
    # without any tools declared: JSON when it parses, else the text
    untyped = parse_tool_call(body)["arguments"]
    assert untyped["days"] == 4 and untyped["zip"] == "0123" and untyped["free"] == "plain text"
    # MiniMax-M2's spelling (no namespace token, <parameter name=...>)
    m2 = '<invoke name="f">\n<parameter name="a">1</parameter>\n<parameter name="b">x y</parameter>\n</invoke>'
    assert parse_tool_call(m2) == {"name": "f", "arguments": {"a": 1, "b": "x y"}}
    # several calls come back as a list
    two = f'{ns}<invoke name="f">{ns}</invoke>\n{ns}<invoke name="g">{ns}<a>1{ns}</a>{ns}</invoke>'
    assert parse_tool_call(two) == [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"a": 1}}]
    # the block's end marker closes what is open; a block cut off by max_tokens holds no call
    open_city = f'\n{ns}<invoke name="get_weather">{ns}<days>2{ns}</days>{ns}<city>Par'
    assert parse_tool_call(open_city, [WEATHER]) == {"name": "get_weather", "arguments": {"days": 2, "city": "Par"}}
    with pytest.raises(ValueError, match="no complete MiniMax tool call"):
        parse_tool_call(open_city, [WEATHER], complete=False)
    with pytest.raises(ValueError, match="no complete MiniMax tool call"):
        parse_tool_call(f'\n{ns}<invoke name="get_wea')
    with pytest.raises(ValueError):
        parse_tool_call("prose where a call should be")


# -- generation -----------------------------------------------------------------------------
def test_greedy_generation_matches_transformers(ckpt, loaded):
    """32 greedy tokens equal transformers' generate(do_sample=False), token for token.

    The prompt (44 tokens, a chat turn) and the reply span 19 blocks of 4 against a top-k
    of 3, so the sparse layers' block selection is active for every generated token.
    """
    import torch
    from reference import build_reference

    from minimax_m3_mlx.serving.generate import generate

    _, config, ref_weights = ckpt
    model, tok = loaded
    prompt = tok.encode("]~!b[]~b]user\nTell me about sparse attention.[e~[\n]~b]ai\n", add_special_tokens=False)
    assert len(prompt) == 44
    ours = generate(model, tok, prompt, max_tokens=32)
    again = generate(model, tok, prompt, max_tokens=32)
    assert ours.tokens == again.tokens  # deterministic at temperature 0
    eos = config["text_config"]["eos_token_id"]
    assert len(ours.tokens) == 32 and ours.finish_reason == "length" and eos not in ours.tokens

    ref, _ = build_reference(config, ref_weights)
    out = ref.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                       max_new_tokens=32, do_sample=False)
    assert out[0, len(prompt):].tolist() == ours.tokens
    assert ours.prompt_tokens == len(prompt) and ours.generation_tokens == 32 and ours.peak_memory > 0


def test_enabled_thinking_puts_the_output_in_reasoning(loaded):
    from minimax_m3_mlx.serving.generate import chat_prompt, generate

    model, tok = loaded
    prompt = chat_prompt(tok, user("hi"), thinking="enabled")
    gen = generate(model, tok, prompt, max_tokens=12)
    assert gen.reasoning == _detok(tok, gen.tokens) and gen.text == ""  # the random model never closes it
    disabled = generate(model, tok, chat_prompt(tok, user("hi"), thinking="disabled"), max_tokens=12)
    assert disabled.reasoning == "" and disabled.text == _detok(tok, disabled.tokens)


def _detok(tok, tokens):
    d = tok.detokenizer
    for t in tokens:
        d.add_token(t)
    d.finalize()
    return d.text


def test_scripted_output_is_split_and_tool_calls_parsed(loaded):
    """Reasoning, answer and a tool call forced through the sampler come back apart."""
    from minimax_m3_mlx.serving.generate import chat_prompt, generate

    model, tok = loaded
    script = (THINK_START + "plan" + THINK_END + "Checking." + TOOL_CALL_START + "\n" + NS_TOKEN
              + '<invoke name="get_weather">' + NS_TOKEN + "<city>Oslo" + NS_TOKEN + "</city>" + NS_TOKEN
              + "<days>2" + NS_TOKEN + "</days>" + NS_TOKEN + "</invoke>\n" + TOOL_CALL_END)
    ids = tok.encode(script, add_special_tokens=False) + [tok.eos_token_id]
    gen = generate(model, tok, chat_prompt(tok, user("weather?")), max_tokens=len(ids) + 5,
                   logits_processors=[_forcing(ids)], tools=[SMALL_TOOL])
    assert gen.tokens == ids and gen.finish_reason == "stop"
    assert gen.reasoning == "plan" and gen.text == "Checking."
    assert gen.tool_calls == [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]


def test_a_tool_block_cut_off_by_max_tokens_holds_no_call(loaded):
    """As the server: the block cut inside <city>Par comes back as text, with no call."""
    from minimax_m3_mlx.serving.generate import chat_prompt, generate

    model, tok = loaded
    start = "Checking." + TOOL_CALL_START + "\n" + NS_TOKEN + '<invoke name="get_weather">' + NS_TOKEN + "<city>Par"
    ids = tok.encode(start + "is" + NS_TOKEN + "</city>", add_special_tokens=False)
    n = len(tok.encode(start, add_special_tokens=False))
    gen = generate(model, tok, chat_prompt(tok, user("weather?"), thinking="disabled"), max_tokens=n,
                   logits_processors=[_forcing(ids)], tools=[SMALL_TOOL])
    assert gen.tokens == ids[:n] and gen.finish_reason == "length"
    assert gen.tool_calls == [] and len(gen.unparsed_tool_calls) == 1
    assert gen.text == start and gen.unparsed_tool_calls[0].endswith("<city>Par")
    # the whole block, closed, is a call
    whole = tok.encode(start + "is" + NS_TOKEN + "</city>" + NS_TOKEN + "</invoke>\n" + TOOL_CALL_END,
                       add_special_tokens=False) + [tok.eos_token_id]
    gen = generate(model, tok, chat_prompt(tok, user("weather?"), thinking="disabled"), max_tokens=len(whole) + 2,
                   logits_processors=[_forcing(whole)], tools=[SMALL_TOOL])
    assert gen.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}] and gen.text == "Checking."


def test_only_a_leading_think_end_is_dropped(loaded):
    """The bare </mm:think> an adaptive reply opens with goes; one inside the answer is text."""
    from minimax_m3_mlx.serving.generate import chat_prompt, generate

    model, tok = loaded
    ids = tok.encode(THINK_END + "A" + THINK_END + "B ]", add_special_tokens=False) + [tok.eos_token_id]
    gen = generate(model, tok, chat_prompt(tok, user("x"), thinking="adaptive"), max_tokens=len(ids) + 2,
                   logits_processors=[_forcing(ids)])
    assert gen.finish_reason == "stop" and gen.reasoning == "" and gen.text == "A" + THINK_END + "B ]"


def _forcing(ids):
    import mlx.core as mx

    state = {"i": 0}

    def processor(tokens, logits):
        t = ids[min(state["i"], len(ids) - 1)]
        state["i"] += 1
        return mx.where(mx.arange(logits.shape[-1]) == t, logits, -mx.inf)

    return processor


def test_generate_cli_output_stats_and_prompt_cache_file(ckpt, loaded, tmp_path, capsys):
    from minimax_m3_mlx.serving import generate as gen_mod

    path = str(ckpt[0])
    model, tok = loaded
    expected = gen_mod.generate(model, tok, gen_mod.chat_prompt(tok, user("Hi there"), thinking="disabled"),
                                max_tokens=16)
    cache_file = tmp_path / "session.safetensors"
    args = ["--model", path, "--prompt", "Hi there", "--max-tokens", "16", "--thinking", "disabled",
            "--prompt-cache-file", str(cache_file)]
    outputs = []
    for _ in range(2):
        assert gen_mod.main(args) == 0
        outputs.append(capsys.readouterr().out)
    for out in outputs:
        body = out.split("=" * 10 + "\n")[1]
        assert body == expected.text + "\n"
        assert re.search(r"^Prompt: \d+ tokens, [\d.]+ tokens-per-sec", out, re.M)
        assert re.search(r"^Generation: 16 tokens, [\d.]+ tokens-per-sec$", out, re.M)
        assert re.search(r"^Peak memory: [\d.]+ GB$", out, re.M)
    assert cache_file.exists() and "from the prompt cache" not in outputs[0]
    n_prompt = len(gen_mod.chat_prompt(tok, user("Hi there"), thinking="disabled"))
    assert re.search(rf"^Prompt: 1 tokens, .* \({n_prompt - 1} more from the prompt cache\)", outputs[1], re.M)

    # enabled: the reasoning is shown apart from the answer, or dropped with --hide-thinking
    thinking = gen_mod.generate(model, tok, gen_mod.chat_prompt(tok, user("Hi there"), thinking="enabled"),
                                max_tokens=8).reasoning
    assert gen_mod.main(["--model", path, "--prompt", "Hi there", "-m", "8", "--thinking", "enabled"]) == 0
    shown = capsys.readouterr().out
    assert f"--- thinking ---\n{thinking}\n--- answer ---" in shown
    assert gen_mod.main(["--model", path, "--prompt", "Hi there", "-m", "8", "--thinking", "enabled",
                         "--hide-thinking"]) == 0
    hidden = capsys.readouterr().out
    assert "--- thinking ---" not in hidden and thinking not in hidden


def test_chat_reuses_the_cache_and_matches_a_fresh_run(loaded):
    from minimax_m3_mlx.serving.chat import ChatSession
    from minimax_m3_mlx.serving.generate import chat_prompt, generate

    model, tok = loaded
    session = ChatSession(model, tok, thinking="disabled", system_prompt="Be brief.", max_tokens=10)
    first = session.ask("Hello")
    second = session.ask("And again?")
    full = chat_prompt(tok, session.messages[:-1], thinking="disabled")
    assert second.cached_tokens > len(full) // 2 and second.prompt_tokens == len(full) - second.cached_tokens
    fresh = generate(model, tok, full, max_tokens=10)
    assert second.tokens == fresh.tokens and second.text == fresh.text
    assert session.messages[2] == {"role": "assistant", "content": first.text}
    session.thinking = "enabled"
    third = session.ask("Think now.")
    assert third.reasoning and session.messages[-1]["reasoning_content"] == third.reasoning


def test_chat_cli_commands(ckpt, capsys):
    from minimax_m3_mlx.serving import chat

    lines = iter(["hi", "/think disabled", "/think sometimes", "hello", "/reset", "/exit"])
    assert chat.main(["--model", str(ckpt[0]), "-m", "4", "--stats"], input_fn=lambda _: next(lines)) == 0
    out = capsys.readouterr().out
    assert "[thinking disabled]" in out and "choose one of enabled, adaptive, disabled" in out
    assert "[conversation reset]" in out and out.count("[prompt: ") == 2


def test_chat_ctrl_c_stops_the_reply_and_keeps_the_conversation(ckpt, loaded, capsys, monkeypatch):
    """Ctrl-C mid-reply: the session goes on from the conversation before that message (the
    layers the stopped reply reached are trimmed back), and an unknown /command is a hint."""
    from minimax_m3_mlx.serving import chat, generate as gen_mod

    real, calls = gen_mod.stream_generate, []

    def stopped_on_second_reply(*a, **k):
        calls.append(1)
        for i, resp in enumerate(real(*a, **k)):
            if len(calls) == 2 and i == 3:
                # mid-step, as a real Ctrl-C lands: one layer has taken a token the others have not
                cache = k["prompt_cache"]
                cache[1].update_and_fetch(*(mx.zeros((1, 2, 1, 32)),) * 2)
                raise KeyboardInterrupt
            yield resp

    import mlx.core as mx

    monkeypatch.setattr(gen_mod, "stream_generate", stopped_on_second_reply)
    sessions = []
    real_session = chat.ChatSession

    class Recorded(real_session):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            sessions.append(self)

    monkeypatch.setattr(chat, "ChatSession", Recorded)
    lines = iter(["hello", "tell me more", "/thnik enabled", "//slash", "/exit"])
    assert chat.main(["--model", str(ckpt[0]), "-m", "6", "--thinking", "disabled"],
                     input_fn=lambda _: next(lines)) == 0
    out = capsys.readouterr().out
    assert "[reply stopped; the conversation is as it was before this message]" in out
    assert "[unknown command /thnik;" in out
    msgs = sessions[0].messages
    assert [m["content"] for m in msgs if m["role"] == "user"] == ["hello", "/slash"]
    model, tok = loaded
    fresh = gen_mod.generate(model, tok, gen_mod.chat_prompt(tok, msgs[:3], thinking="disabled"), max_tokens=6)
    assert fresh.text == msgs[3]["content"]


def test_prefill_progress(ckpt, loaded, capsys, monkeypatch):
    """generate() reports each prefill chunk; the CLI shows it as one tqdm line on stderr (tokens,
    tokens/s), and only for a prefill that takes longer than progress.DELAY_S."""
    import io

    from minimax_m3_mlx.serving import generate as gen_mod, progress

    model, tok = loaded
    prompt = gen_mod.chat_prompt(tok, user("word " * 60))
    calls = []
    gen_mod.generate(model, tok, prompt, max_tokens=2, prefill_step_size=64, prompt_progress=lambda *a: calls.append(a))
    n = len(prompt)
    assert calls[0] == (0, n) and calls[-1] == (n, n) and (64, n) in calls and (128, n) in calls
    for delay, shown in ((0, True), (3600, False)):
        out = io.StringIO()
        bar = progress.PrefillProgress(file=out, delay=delay)
        for done in (0, 64, 128, n, n):
            bar(done, n)
        assert ("prefill" in out.getvalue() and "tok/s" in out.getvalue()) == shown, out.getvalue()
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    assert gen_mod.main(["--model", str(ckpt[0]), "-p", "word " * 60, "-m", "2", "--prefill-step-size", "64"]) == 0
    err = capsys.readouterr().err
    assert "prefill" in err and "tok/s" in err


def test_prompt_cache_file_is_tied_to_its_model(ckpt, loaded, tmp_path):
    """A cache file written for one model is refused for another."""
    from minimax_m3_mlx.serving.generate import PromptCache

    model, _ = loaded
    f = tmp_path / "c.safetensors"
    cache = PromptCache(model)
    cache.save(str(f), str(ckpt[0]))
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((ckpt[0] / "config.json").read_text())
    cfg["text_config"]["rope_theta"] = 1.0
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="written for another model"):
        PromptCache.load(str(f), model, str(other))
    assert PromptCache.load(str(f), model, str(ckpt[0])).tokens == []


def test_printer_dims_reasoning_on_a_terminal():
    import io

    from minimax_m3_mlx.serving.generate import DIM, RESET, Generation, Printer

    out = io.StringIO()
    p = Printer(out, color=True)
    for state, text in [("reasoning", "a"), ("reasoning", "b"), ("normal", "c"), ("tool", "<x>"), ("normal", "d")]:
        p(state, text)
    p.finish(Generation(tool_calls=[{"name": "f", "arguments": {"k": 1}}], unparsed_tool_calls=["<cut"]))
    assert out.getvalue() == f'{DIM}ab{RESET}\n\ncd\n[tool call] f({{"k": 1}})\n[unparsed tool call] <cut\n'
    hidden = io.StringIO()
    p = Printer(hidden, hide_thinking=True, color=True)
    p("reasoning", "secret")
    p("normal", "answer")
    p.finish(Generation())
    assert hidden.getvalue() == "answer\n"
