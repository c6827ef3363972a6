"""An agent's session against `minimax-m3 server --prompt-cache-dir`: each turn computes only
its new tokens, a restarted server restores the conversation from disk, replies are the
replies without any cache, the server's own reasoning is put back into histories that
dropped it, and a request whose cache cannot fit in memory gets 503."""

from __future__ import annotations

import logging
import time

import mlx.core as mx
import openai
import pytest

from minimax_m3_mlx import synthetic
from minimax_m3_mlx.chat_format.markers import THINK_END, THINK_START
from minimax_m3_mlx.serving.generate import chat_prompt, generate

MAX_TOKENS = 6
BLOCK = 256
SYSTEM = "You are a coding agent. " + "Repository context: " + "def f(x): return x * 2\n" * 40


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("session_model")
    config = synthetic.tiny_config()
    synthetic.write_checkpoint(path, config, synthetic.random_weights(config, seed=7), "original")
    return path


@pytest.fixture(scope="module")
def direct(ckpt):
    from minimax_m3_mlx import load

    return load(str(ckpt))


def start(ckpt, cache_dir, *extra):
    from minimax_m3_mlx.serving.server import Server, setup_arg_parser

    args = ["--model", str(ckpt), "--port", "0", "--max-tokens", str(MAX_TOKENS), "--thinking", "disabled",
            "--prompt-cache-dir", str(cache_dir), *extra]
    srv = Server(setup_arg_parser().parse_args(args)).start()
    return srv, openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="none", max_retries=0, timeout=60)


def expected(direct, messages, **kw):
    model, tok = direct
    prompt = chat_prompt(tok, messages, thinking="disabled")
    return prompt, generate(model, tok, prompt, max_tokens=MAX_TOKENS, **kw)


def turn(i: int) -> dict:
    return {"role": "user", "content": f"Tool result {i}: " + f"line {i} of the output\n" * (8 + 3 * i)}


@pytest.mark.parametrize("extra", [[], ["--kv-bits", "8", "--kv-group-size", "32"]], ids=["bf16", "kv-bits-8"])
def test_agent_session_survives_a_restart(ckpt, direct, tmp_path, extra, caplog):
    messages = [{"role": "system", "content": SYSTEM}]
    srv, client = start(ckpt, tmp_path / "cache", *extra)
    try:
        prev = 0
        for i in range(3):
            messages.append(turn(i))
            r = client.chat.completions.create(model="default_model", messages=messages)
            prompt, gen = expected(direct, messages)
            assert r.choices[0].message.content == gen.text or extra  # quantized K/V: its own replies
            cached = r.usage.prompt_tokens_details.cached_tokens
            if i:  # computed this turn: at most the new tokens plus one block
                assert r.usage.prompt_tokens - cached <= r.usage.prompt_tokens - prev + BLOCK
            messages.append({"role": "assistant", "content": r.choices[0].message.content})
            prev = r.usage.prompt_tokens
        srv.prompt_cache.flush()
    finally:
        srv.shutdown()
    messages.append(turn(3))
    srv, client = start(ckpt, tmp_path / "cache", *extra)
    try:
        with caplog.at_level(logging.INFO):
            r = client.chat.completions.create(model="default_model", messages=messages)
        prompt, gen = expected(direct, messages)
        cached = r.usage.prompt_tokens_details.cached_tokens
        assert cached >= prev - BLOCK and cached % BLOCK == 0  # whole blocks, from disk
        for _ in range(100):  # the handler logs its line after the reply has left
            if f"{cached} from disk" in caplog.text:
                break
            time.sleep(0.05)
        assert f"{cached} from disk" in caplog.text
        if not extra:  # greedy: token for token the reply without any cache
            assert r.choices[0].message.content == gen.text
        else:  # the same reply as a server with no disk tier gives
            srv2, c2 = start(ckpt, tmp_path / "other", *extra)
            try:
                alone = c2.chat.completions.create(model="default_model", messages=messages)
            finally:
                srv2.shutdown()
            assert r.choices[0].message.content == alone.choices[0].message.content
    finally:
        srv.shutdown()


def test_restored_rows_batch_and_stream_their_usage(ckpt, direct, tmp_path):
    """After a restart, concurrent requests whose prefixes come from disk join one batch and
    each gets its reply alone; streamed usage reports the cached tokens."""
    import concurrent.futures as cf

    convs = [[{"role": "system", "content": SYSTEM}, turn(i)] for i in range(3)]
    srv, client = start(ckpt, tmp_path)
    try:
        for m in convs:
            client.chat.completions.create(model="default_model", messages=m)
        srv.prompt_cache.flush()
    finally:
        srv.shutdown()
    srv, client = start(ckpt, tmp_path)
    try:
        def ask(m):
            return client.chat.completions.create(model="default_model", messages=m)

        with cf.ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(ask, convs))
        for m, r in zip(convs, replies):
            assert r.choices[0].message.content == expected(direct, m)[1].text
            assert r.usage.prompt_tokens_details.cached_tokens >= BLOCK
        chunks = list(client.chat.completions.create(model="default_model", messages=convs[0], stream=True,
                                                     stream_options={"include_usage": True}))
        usage = [c.usage for c in chunks if c.usage is not None][-1]
        assert usage.prompt_tokens_details.cached_tokens > 0
    finally:
        srv.shutdown()


def _force(monkeypatch, tokenizer, text):
    """The next request's reply is `text` (then end of turn)."""
    import mlx_lm.server

    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    original, state = mlx_lm.server._make_logits_processors, {"i": 0, "used": False}

    def with_script(args):
        processors = original(args)
        if not state["used"]:
            state["used"] = True

            def forced(tokens, logits):
                t = ids[min(state["i"], len(ids) - 1)]
                state["i"] += 1
                return mx.where(mx.arange(logits.shape[-1]) == t, logits, -mx.inf)

            processors.append(forced)
        return processors

    monkeypatch.setattr(mlx_lm.server, "_make_logits_processors", with_script)


@pytest.mark.parametrize("restore", [True, False])
def test_dropped_reasoning_is_put_back(ckpt, direct, tmp_path, monkeypatch, restore):
    extra = ["--thinking", "adaptive", "--decode-concurrency", "1"] + ([] if restore else ["--no-restore-reasoning"])
    srv, client = start(ckpt, tmp_path, *extra)
    try:
        messages = [{"role": "system", "content": SYSTEM}, turn(0)]
        _force(monkeypatch, direct[1], f"{THINK_START}I should read the output first.{THINK_END}Done.")
        r = client.chat.completions.create(model="default_model", messages=messages, max_tokens=60)
        msg = r.choices[0].message
        assert msg.content == "Done." and "read the output" in msg.reasoning_content
        monkeypatch.undo()
        # The client sends the reply back without its reasoning.
        messages += [{"role": "assistant", "content": msg.content}, turn(1)]
        first = r.usage.prompt_tokens
        r2 = client.chat.completions.create(model="default_model", messages=messages)
        cached = r2.usage.prompt_tokens_details.cached_tokens
        with_reasoning = [*messages[:2], {"role": "assistant", "content": msg.content,
                                         "reasoning_content": msg.reasoning_content}, messages[3]]
        model, tok = direct
        want = chat_prompt(tok, with_reasoning if restore else messages, thinking="adaptive")
        assert r2.usage.prompt_tokens == len(want)
        if restore:  # the history is the tokens the server cached: only the new turn is computed
            assert cached > first
        else:
            assert cached <= first  # the reply is recomputed from its first token on
        assert r2.choices[0].message.content == generate(model, tok, want, max_tokens=MAX_TOKENS).text
    finally:
        srv.shutdown()


def test_request_that_cannot_fit_gets_503(ckpt, tmp_path, monkeypatch):
    from minimax_m3_mlx.serving import memory

    srv, client = start(ckpt, tmp_path)
    try:
        monkeypatch.setattr(memory, "usable_memory", lambda: mx.get_active_memory() + 1000)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="default_model", messages=[turn(0)])
        assert e.value.status_code == 503
        err = e.value.body if isinstance(e.value.body, dict) else {}
        err = err.get("error", err)
        assert err.get("code") == "insufficient_memory" and "GB are free" in err.get("message", "")
        monkeypatch.undo()
        assert client.chat.completions.create(model="default_model", messages=[turn(0)]).choices[0].message.content
    finally:
        srv.shutdown()


def test_default_memory_bound_is_set_and_reported(ckpt, tmp_path, caplog):
    from minimax_m3_mlx.serving.memory import default_prompt_cache_bytes

    with caplog.at_level(logging.INFO):
        srv, _ = start(ckpt, tmp_path)
    try:
        bound = srv.prompt_cache.max_bytes
        assert bound == default_prompt_cache_bytes(srv.provider.model) and 0 < bound < 1 << 62
        assert "prompt cache: up to" in caplog.text and "GB in memory" in caplog.text
    finally:
        srv.shutdown()
