"""Every mistake a user can make at the command line ends in one `error:` line and a non-zero exit.

The table runs each command in this process through `minimax_m3_mlx.cli.main` (as the
`minimax-m3` script does) with one bad input: wrong types, out-of-range values, missing,
unreadable or broken files, existing outputs, inputs past a limit. A few more run in a
real subprocess: the one-line error there, `--verbose` and MINIMAX_M3_VERBOSE for the
traceback, and Ctrl-C in `convert` (which then resumes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from signals import sigint_as_in_a_terminal

from minimax_m3_mlx import cli, synthetic

ROOT = Path(__file__).resolve().parents[1]
LONG_PROMPT = " ".join(["word"] * 120)  # past the small model's 400-token context (the template's is 311)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A good tiny checkpoint and one broken copy per kind of breakage."""
    root = tmp_path_factory.mktemp("user_errors")
    config = synthetic.tiny_config()
    weights = synthetic.random_weights(config, seed=2)
    good = root / "good"
    synthetic.write_checkpoint(good, config, weights, "original")
    small = root / "small"  # a 400-token context
    synthetic.write_checkpoint(small, synthetic.tiny_config({"max_position_embeddings": 400}), weights, "original")

    def variant(name, edit):
        path = root / name
        synthetic.write_checkpoint(path, config, weights, "original")
        edit(path)
        return path

    def set_config(text):
        return lambda p: (p / "config.json").write_text(text)

    def four(p):
        c = json.loads((p / "config.json").read_text())
        c["text_config"]["num_hidden_layers"] = "four"
        (p / "config.json").write_text(json.dumps(c))

    def truncate(p):
        shard = sorted(p.glob("*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:-100])

    def wrong_shape(p):
        c = json.loads((p / "config.json").read_text())
        c["text_config"]["shared_intermediate_size"] = 16  # the tensors are 32 wide
        (p / "config.json").write_text(json.dumps(c))

    def config_folder(p):
        (p / "config.json").unlink()
        (p / "config.json").mkdir()

    def binary_config(p):
        (p / "config.json").write_bytes(b"\xff\xfe\x00garbage")

    def no_tokenizer(p):
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            (p / f).unlink(missing_ok=True)

    def no_tokenizer_json(p):
        (p / "tokenizer.json").unlink()

    def garbage_shard(p):
        sorted(p.glob("*.safetensors"))[0].write_text("hello, this was never a safetensors file")

    from minimax_m3_mlx.cli.demo import demo_checkpoint
    from minimax_m3_mlx.convert import convert

    demo = root / "demo"  # heads of 64 and a vision tower
    synthetic.write_checkpoint(demo, *demo_checkpoint(seed=2), "original")
    (root / "garbage.mp4").write_bytes(b"\x00\x00\x00 not a video")
    q4 = root / "q4_wide"  # a 4-bit conversion whose config says hidden_size 96 (the tensors are 64 wide)
    convert(str(good), str(q4), quantize=True, q_bits=4, q_group_size=64, progress=False, log=lambda *a: None)
    c = json.loads((q4 / "config.json").read_text())
    c["text_config"]["hidden_size"] = 96
    (q4 / "config.json").write_text(json.dumps(c))

    (root / "a_file").write_text("not a folder")
    (root / "not_empty").mkdir()
    (root / "not_empty" / "model.safetensors").write_text("someone's weights")
    (root / "empty.png").write_bytes(b"")
    (root / "bad.json").write_text("{not json")
    (root / "empty.json").write_text("{}")
    (root / "garbage.safetensors").write_text("garbage")
    return {
        "good": good, "small": small, "root": root,
        "empty_config": variant("empty_config", set_config("{}")),
        "bad_json": variant("bad_json", set_config("{not json")),
        "four": variant("four", four),
        "truncated": variant("truncated", truncate),
        "no_tokenizer": variant("no_tokenizer", no_tokenizer),
        "wrong_shape": variant("wrong_shape", wrong_shape),
        "config_folder": variant("config_folder", config_folder),
        "binary_config": variant("binary_config", binary_config),
        "no_tokenizer_json": variant("no_tokenizer_json", no_tokenizer_json),
        "garbage_shard": variant("garbage_shard", garbage_shard),
        "demo": demo, "q4_wide": q4,
    }


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


# (id, argv with {placeholders} for the fixture's folders, text the error line must hold)
CASES = [
    # -- any command -------------------------------------------------------------------------------
    ("unknown-command", ["generat", "--model", "{good}"], "unknown command 'generat'"),
    # -- generate: the model folder ---------------------------------------------------------------
    ("gen-no-folder", ["generate", "--model", "{root}/no/such/model"], "not a local folder"),
    ("gen-file", ["generate", "--model", "{root}/a_file"], "is a file"),
    ("gen-empty-config", ["generate", "--model", "{empty_config}"], "vocab_size: required"),
    ("gen-bad-json", ["generate", "--model", "{bad_json}"], "not valid JSON"),
    ("gen-mistyped-config", ["generate", "--model", "{four}"], "num_hidden_layers: must be an integer"),
    ("gen-truncated", ["generate", "--model", "{truncated}"], "truncated safetensors file"),
    ("gen-no-tokenizer", ["generate", "--model", "{no_tokenizer}"], "no tokenizer files"),
    ("gen-no-tokenizer-json", ["generate", "--model", "{no_tokenizer_json}"], "no tokenizer.json"),
    ("gen-garbage-shard", ["generate", "--model", "{garbage_shard}"], "not a safetensors file"),
    ("gen-config-not-the-weights", ["generate", "--model", "{q4_wide}"], "config.json does not match the weights"),
    ("gen-wrong-shape", ["generate", "--model", "{wrong_shape}"], "model expects"),
    ("gen-config-is-folder", ["generate", "--model", "{config_folder}"], "cannot be read"),
    ("gen-config-binary", ["generate", "--model", "{binary_config}"], "config.json"),
    ("gen-missing-model-flag", ["generate", "-p", "hi"], "--model"),
    ("gen-unknown-flag", ["generate", "--model", "{good}", "--tmep", "1"], "unrecognized arguments: --tmep 1"),
    # -- generate: values ------------------------------------------------------------------------
    ("gen-temp", ["generate", "--model", "{good}", "--temp", "-1"], "--temp: must be in [0, inf]"),
    ("gen-temp-nan", ["generate", "--model", "{good}", "--temp", "nan"], "--temp: must be in"),
    ("gen-temp-text", ["generate", "--model", "{good}", "--temp", "hot"], "'hot' is not a number"),
    ("gen-top-p", ["generate", "--model", "{good}", "--top-p", "5"], "--top-p: must be in (0, 1]"),
    ("gen-top-p-zero", ["generate", "--model", "{good}", "--top-p", "0"], "--top-p: must be in (0, 1]"),
    ("gen-top-k", ["generate", "--model", "{good}", "--top-k", "-3"], "--top-k: must be in [0, inf]"),
    ("gen-min-p", ["generate", "--model", "{good}", "--min-p", "2"], "--min-p: must be in [0, 1]"),
    ("gen-seed", ["generate", "--model", "{good}", "--seed", "-1"], "--seed: must be in [0,"),
    ("gen-seed-huge", ["generate", "--model", "{good}", "--seed", str(2**64)], "--seed: must be in [0,"),
    ("gen-prefill", ["generate", "--model", "{good}", "--prefill-step-size", "0"], "--prefill-step-size: must be"),
    ("gen-max-tokens-zero", ["generate", "--model", "{good}", "-m", "0"], "--max-tokens/-m: must be in [1, inf] or -1"),
    ("gen-max-tokens-neg", ["generate", "--model", "{good}", "-m", "-5"], "--max-tokens/-m: must be in [1, inf] or -1"),
    ("gen-max-tokens-text", ["generate", "--model", "{good}", "-m", "many"], "'many' is not an integer"),
    ("gen-video-fps", ["generate", "--model", "{good}", "--video-fps", "0", "--video", "{root}/empty.png"],
     "--video-fps: must be in (0, inf]"),
    ("gen-thinking", ["generate", "--model", "{good}", "--thinking", "sometimes"], "invalid choice: 'sometimes'"),
    ("gen-parallel", ["generate", "--model", "{good}", "--parallel", "diagonal"], "invalid choice: 'diagonal'"),
    ("gen-image-missing", ["generate", "--model", "{good}", "--image", "{root}/no.png"], "--image"),
    ("gen-video-missing", ["generate", "--model", "{good}", "--video", "{root}/no.mp4"], "--video"),
    ("gen-image-folder", ["generate", "--model", "{good}", "--image", "{root}"], "--image {root}: a folder, not a file"),
    ("gen-video-garbage", ["generate", "--model", "{demo}", "--video", "{root}/garbage.mp4"],
     "not a video PyAV can decode"),
    ("gen-kv-group-size", ["generate", "--model", "{good}", "--kv-bits", "4"],
     "--kv-group-size 64 does not divide head_dim=32: pass --kv-group-size 32"),
    ("gen-kv-start", ["generate", "--model", "{good}", "--quantized-kv-start", "-5"], "--quantized-kv-start: must be"),
    ("gen-index-bits", ["generate", "--model", "{good}", "--index-bits", "4"], "--index-bits 4 quantizes"),
    ("chat-kv-group-size", ["chat", "--model", "{good}", "--kv-bits", "8"], "--kv-group-size 64 does not divide"),
    ("gen-image-and-cache", ["generate", "--model", "{good}", "--image", "{root}/empty.png",
                             "--prompt-cache-file", "{root}/c.safetensors"], "cannot use --prompt-cache-file"),
    ("gen-image-raw", ["generate", "--model", "{good}", "--image", "{root}/empty.png", "--ignore-chat-template"],
     "--ignore-chat-template"),
    ("gen-image-text-only", ["generate", "--model", "{good}", "--image", "{root}/empty.png"], "no vision tower"),
    ("gen-cache-no-folder", ["generate", "--model", "{good}", "--prompt-cache-file", "{root}/no/c.safetensors"],
     "no folder"),
    ("gen-cache-garbage", ["generate", "--model", "{good}", "--prompt-cache-file", "{root}/garbage.safetensors"],
     "not a prompt cache file"),
    ("gen-cache-is-folder", ["generate", "--model", "{good}", "--prompt-cache-file", "{root}"], "a folder"),
    ("gen-prompt-past-context", ["generate", "--model", "{small}", "-p", LONG_PROMPT],
     "the model's context holds 400"),
    ("gen-prompt-past-context-raw", ["generate", "--model", "{small}", "-p", LONG_PROMPT, "--ignore-chat-template"],
     "the model's context holds 400"),
    # -- chat ---------------------------------------------------------------------------------------
    ("chat-no-folder", ["chat", "--model", "{root}/no/such/model"], "not a local folder"),
    ("chat-truncated", ["chat", "--model", "{truncated}"], "truncated safetensors file"),
    ("chat-temp", ["chat", "--model", "{good}", "--temp", "-1"], "--temp: must be in"),
    ("chat-top-k", ["chat", "--model", "{good}", "--top-k", "1.5"], "'1.5' is not an integer"),
    ("chat-seed", ["chat", "--model", "{good}", "--seed", "-1"], "--seed: must be in"),
    # -- server -------------------------------------------------------------------------------------
    ("server-no-folder", ["server", "--model", "{root}/no/such/model"], "not a local folder"),
    ("server-truncated", ["server", "--model", "{truncated}"], "truncated safetensors file"),
    ("server-empty-config", ["server", "--model", "{empty_config}"], "vocab_size: required"),
    ("server-no-tokenizer", ["server", "--model", "{no_tokenizer}"], "no tokenizer files"),
    ("server-wrong-shape", ["server", "--model", "{wrong_shape}", "--port", "0"], "model expects"),
    ("server-port-range", ["server", "--model", "{good}", "--port", "70000"], "--port: must be in [0, 65535]"),
    ("server-port-negative", ["server", "--model", "{good}", "--port", "-1"], "--port: must be in [0, 65535]"),
    ("server-port-busy", ["server", "--model", "{good}", "--port", "{busy_port}"], "cannot listen on"),
    ("server-template-args", ["server", "--model", "{good}", "--chat-template-args", "[1]"],
     "must be a JSON object"),
    ("server-template-args-json", ["server", "--model", "{good}", "--chat-template-args", "nope"], "not JSON"),
    ("server-cache-bytes", ["server", "--model", "{good}", "--prompt-cache-bytes", "lots"], "is not a size"),
    ("server-max-tokens", ["server", "--model", "{good}", "--max-tokens", "0"], "--max-tokens: must be in [1"),
    ("server-top-p", ["server", "--model", "{good}", "--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    ("server-cache-size", ["server", "--model", "{good}", "--prompt-cache-size", "-1"], "--prompt-cache-size"),
    ("server-log-level", ["server", "--model", "{good}", "--log-level", "LOUD"], "invalid choice: 'LOUD'"),
    # -- convert ------------------------------------------------------------------------------------
    ("convert-no-source", ["convert", "--mlx-path", "{root}/out"], "--hf-path is required"),
    ("convert-missing-source", ["convert", "--hf-path", "{root}/no/such/model", "--mlx-path", "{root}/o1"],
     "not a local folder"),
    ("convert-file-source", ["convert", "--hf-path", "{root}/a_file", "--mlx-path", "{root}/o2"], "a file"),
    ("convert-empty-config", ["convert", "--hf-path", "{empty_config}", "--mlx-path", "{root}/o3"],
     "vocab_size: required"),
    ("convert-bad-json", ["convert", "--hf-path", "{bad_json}", "--mlx-path", "{root}/o4"], "not valid JSON"),
    ("convert-truncated", ["convert", "--hf-path", "{truncated}", "--mlx-path", "{root}/o5"], "truncated"),
    ("convert-no-tokenizer", ["convert", "--hf-path", "{no_tokenizer}", "--mlx-path", "{root}/o6"],
     "pass --tokenizer FOLDER"),
    ("convert-tokenizer-missing", ["convert", "--hf-path", "{no_tokenizer}", "--mlx-path", "{root}/o7",
                                   "--tokenizer", "{root}/no/such"], "--tokenizer"),
    ("convert-tokenizer-empty", ["convert", "--hf-path", "{no_tokenizer}", "--mlx-path", "{root}/o8",
                                 "--tokenizer", "{empty_config}/.."], "no tokenizer files"),
    ("convert-existing-output", ["convert", "--hf-path", "{good}", "--mlx-path", "{root}/not_empty"],
     "already exists"),
    ("convert-output-in-source", ["convert", "--hf-path", "{good}", "--mlx-path", "{good}/out"],
     "overlaps the source"),
    ("convert-revision-local", ["convert", "--hf-path", "{good}", "--mlx-path", "{root}/o12", "--revision", "v2"],
     "is a local folder"),
    ("convert-list-recipes-missing", ["convert", "--list-recipes", "--hf-path", "{root}/no/such/model"],
     "not a local folder"),
    ("convert-shard-zero", ["convert", "--hf-path", "{good}", "--shard-size-gb", "0"], "--shard-size-gb: must be"),
    ("convert-shard-negative", ["convert", "--hf-path", "{good}", "--shard-size-gb", "-1"], "--shard-size-gb"),
    ("convert-q-bits-zero", ["convert", "--hf-path", "{good}", "-q", "--q-bits", "0"], "--q-bits: must be"),
    ("convert-q-bits-odd", ["convert", "--hf-path", "{good}", "--mlx-path", "{root}/o9", "-q", "--q-bits", "7"],
     "bits"),
    ("convert-group-zero", ["convert", "--hf-path", "{good}", "-q", "--q-group-size", "0"], "--q-group-size"),
    ("convert-dtype", ["convert", "--hf-path", "{good}", "--dtype", "int8"], "invalid choice: 'int8'"),
    ("convert-recipe", ["convert", "--hf-path", "{good}", "--recipe", "mac-1gb"], "invalid choice: 'mac-1gb'"),
    ("convert-vision-bits", ["convert", "--hf-path", "{good}", "-q", "--vision-bits", "4"], "invalid choice: 4"),
    ("convert-vision-conflict", ["convert", "--hf-path", "{good}", "--mlx-path", "{root}/o10", "--drop-vision",
                                 "--vision-bits", "16"], "--vision-bits"),
    ("convert-recipe-and-bits", ["convert", "--hf-path", "{good}", "--mlx-path", "{root}/o11",
                                 "--recipe", "mac-256gb", "--q-bits", "4"], "--q-bits"),
    # -- plan ---------------------------------------------------------------------------------------
    ("plan-no-hosts", ["plan"], "--hosts"),
    ("plan-hosts-text", ["plan", "--hosts", "lots"], "expected NxGB"),
    ("plan-hosts-zero", ["plan", "--hosts", "0x192"], "no hosts"),
    ("plan-hosts-reserve", ["plan", "--hosts", "2x8"], "nothing left after --reserve-gb"),
    ("plan-context-zero", ["plan", "--hosts", "2x192", "--context", "0"], "--context: must be"),
    ("plan-context-past", ["plan", "--hosts", "2x192", "--context", "2000000"], "past the model's context"),
    ("plan-batch", ["plan", "--hosts", "2x192", "--batch", "0"], "--batch: must be"),
    ("plan-chunk", ["plan", "--hosts", "2x192", "--prefill-chunk", "-4"], "--prefill-chunk: must be"),
    ("plan-reserve", ["plan", "--hosts", "2x192", "--reserve-gb", "-1"], "--reserve-gb: must be"),
    ("plan-recipe", ["plan", "--hosts", "2x192", "--recipe", "q9"], "unknown; choose from"),
    ("plan-layout", ["plan", "--hosts", "192", "--layout", "both"], "not possible with 1 host"),
    ("plan-model-missing", ["plan", "--hosts", "2x192", "--model", "{root}/no/such/model"], "not a local folder"),
    ("plan-model-empty-config", ["plan", "--hosts", "2x192", "--model", "{empty_config}"], "vocab_size: required"),
    ("plan-model-and-recipe", ["plan", "--hosts", "2x192", "--model", "{good}", "--recipe", "q4"], "not allowed"),
    ("plan-config-missing", ["plan", "--hosts", "2x192", "--config", "{root}/no.json"], "No such file"),
    ("plan-config-bad", ["plan", "--hosts", "2x192", "--config", "{root}/bad.json"], "not valid JSON"),
    ("plan-config-empty", ["plan", "--hosts", "2x192", "--config", "{root}/empty.json"], "vocab_size: required"),
    # -- demo ---------------------------------------------------------------------------------------
    ("demo-keep-not-empty", ["demo", "--keep", "{root}/not_empty"], "not empty"),
    ("demo-keep-file", ["demo", "--keep", "{root}/a_file"], "a file"),
    ("demo-max-tokens", ["demo", "--max-tokens", "0"], "--max-tokens: must be"),
    ("demo-layout", ["demo", "--layout", "gguf"], "invalid choice: 'gguf'"),
    ("demo-seed", ["demo", "--seed", "-1"], "--seed: must be"),
]


def run_cli(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse refuses before the command runs
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_error_line(rc, err, expect):
    """stderr is one line, `minimax-m3 CMD: error: ...` (no usage, no library warning before it)."""
    assert rc not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(r"minimax-m3( [a-z]+)?: error: ", lines[0]), lines[0]
    assert expect in lines[0], (expect, lines[0])


@pytest.mark.parametrize("name, argv, expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(name, argv, expect, folders, capfd):
    """capfd: what reaches the file descriptors, library log handlers and C++ included."""
    busy = _busy_port() if "{busy_port}" in argv else None
    try:
        values = {**{k: str(v) for k, v in folders.items()}, "busy_port": str(busy.getsockname()[1]) if busy else ""}
        argv = [a.format(**values) for a in argv]
        rc, _, err = run_cli(argv, capfd)
    finally:
        if busy is not None:
            busy.close()
    assert_one_error_line(rc, err, expect.format(**values))


def test_every_flag_has_help_and_there_is_a_version(capsys):
    import minimax_m3_mlx
    from minimax_m3_mlx.cli import demo, plan
    from minimax_m3_mlx.convert import cli as convert_cli
    from minimax_m3_mlx.serving import chat, generate, server

    for parser in (demo.build_parser(), plan.build_parser(), convert_cli.build_parser(),
                   generate.setup_arg_parser(), chat.setup_arg_parser(), server.setup_arg_parser()):
        assert [a.option_strings for a in parser._actions if not a.help] == [], parser.prog
    rc, out, err = run_cli(["--version"], capsys)
    assert rc == 0 and out == f"minimax-m3 {minimax_m3_mlx.__version__}\n" and not err


def test_nothing_is_written_by_a_refused_convert(folders):
    root = folders["root"]
    assert not any((root / f"o{i}").exists() for i in range(1, 13))
    assert (root / "not_empty" / "model.safetensors").read_text() == "someone's weights"
    assert sorted(p.name for p in (root / "not_empty").iterdir()) == ["model.safetensors"]


def test_unexpected_error_says_so_and_verbose_shows_the_traceback(folders, capsys, monkeypatch):
    from minimax_m3_mlx.serving import generate

    def broken(*a, **k):
        raise KeyError("weights")

    monkeypatch.setattr(generate, "load", broken)
    rc, _, err = run_cli(["generate", "--model", str(folders["good"])], capsys)
    assert rc == 1 and err.strip().splitlines() == [
        "minimax-m3 generate: error: KeyError: 'weights' (unexpected; rerun with --verbose for the traceback)"]
    rc, _, err = run_cli(["generate", "--model", str(folders["good"]), "--verbose"], capsys)
    assert rc == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("minimax-m3 generate: error:")
    monkeypatch.setenv("MINIMAX_M3_VERBOSE", "1")
    rc, _, err = run_cli(["generate", "--model", str(folders["good"])], capsys)
    assert rc == 1 and "Traceback" in err


def test_ctrl_c_in_generate_is_one_line(folders, capsys, monkeypatch):
    from minimax_m3_mlx.serving import generate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "stream_generate", interrupted)
    rc, _, err = run_cli(["generate", "--model", str(folders["good"])], capsys)
    assert rc == 130 and err.strip().splitlines() == ["minimax-m3 generate: interrupted"]


def test_context_limit_at_and_past_the_edge(folders):
    from minimax_m3_mlx.serving import generate

    import mlx.core as mx

    model, tok = generate.load(str(folders["small"]))
    eos = mx.array(sorted(tok.eos_token_ids))

    def no_eos(tokens, logits):  # the reply must run until a limit
        return logits.at[..., eos].add(-1e9)

    ids = [int(t) for t in tok.encode(LONG_PROMPT * 2)][:399]
    gen = generate.generate(model, tok, ids, max_tokens=10, logits_processors=[no_eos])  # one token of room
    assert len(gen.tokens) == 1 and gen.context_full and gen.finish_reason == "length"
    gen = generate.generate(model, tok, ids[:390], max_tokens=10, logits_processors=[no_eos])  # exactly the room
    assert len(gen.tokens) == 10 and not gen.context_full
    with pytest.raises(generate.ContextLimitError, match="the prompt has 400 tokens"):
        generate.generate(model, tok, ids + [ids[0]], max_tokens=1)


def test_empty_prompt_from_stdin(folders, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc, _, err = run_cli(["generate", "--model", str(folders["good"]), "-p", "-", "--ignore-chat-template"], capsys)
    assert_one_error_line(rc, err, "empty prompt")


def test_generate_stops_at_the_context_limit(folders, capsys):
    rc, out, err = run_cli(["generate", "--model", str(folders["small"]), "-p", "hi", "-m", "5000",
                            "--thinking", "disabled"], capsys)
    assert rc == 0, err
    assert "[stopped at the context limit: 400 tokens]" in err
    prompt = int(out.split("Prompt: ")[1].split(" tokens")[0])
    generated = int(out.split("Generation: ")[1].split(" tokens")[0])
    assert prompt + generated == 400


def test_chat_refuses_a_message_past_the_context_and_keeps_the_conversation(folders, capsys):
    from minimax_m3_mlx.serving import chat, generate

    lines = iter(["hello", LONG_PROMPT, "again", "/exit"])
    sessions = []
    real = chat.ChatSession

    class Recorded(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            sessions.append(self)

    chat.ChatSession = Recorded
    try:
        rc = chat.main(["--model", str(folders["small"]), "-m", "2", "--thinking", "disabled"],
                       input_fn=lambda _: next(lines))
    finally:
        chat.ChatSession = real
    out = capsys.readouterr().out
    assert rc == 0
    assert "the model's context holds 400" in out and "the message was not sent" in out
    msgs = sessions[0].messages
    assert [m["content"] for m in msgs if m["role"] == "user"] == ["hello", "again"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    # the cache still holds exactly the conversation: a fresh session gives the same last reply
    model, tok = generate.load(str(folders["small"]), thinking="disabled")
    fresh = generate.generate(model, tok, generate.chat_prompt(tok, msgs[:3], thinking="disabled"), max_tokens=2)
    assert fresh.text == msgs[3]["content"]


def test_demo_keep_writes_into_a_new_folder(tmp_path, capsys):
    rc, out, err = run_cli(["demo", "--keep", str(tmp_path / "new"), "--max-tokens", "2"], capsys)
    assert rc == 0, err
    assert (tmp_path / "new" / "config.json").exists()
    # what README shows on the kept folder: a 4-bit cache (the default group of 64) and an image
    pytest.importorskip("torchvision")
    from PIL import Image

    import numpy as np

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    prompts = []
    for extra in (["--kv-bits", "4"], ["--image", str(tmp_path / "a.png")]):
        rc, out, err = run_cli(["generate", "--model", str(tmp_path / "new"), "-m", "2", *extra], capsys)
        assert rc == 0 and "Generation: 2 tokens" in out, err
        prompts.append(int(out.split("Prompt: ")[1].split(" tokens")[0]))
    assert prompts[1] > prompts[0] + 4  # the image's placeholders are in the prompt
    rc, _, err = run_cli(["demo", "--keep", str(tmp_path / "new"), "--max-tokens", "2"], capsys)
    assert_one_error_line(rc, err, "not empty")


# -- real subprocesses -------------------------------------------------------------------------------
def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "MINIMAX_M3_VERBOSE"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_subprocess_error_is_one_line_and_verbose_adds_the_traceback(folders):
    cmd = [sys.executable, "-m", "minimax_m3_mlx", "generate", "--model", str(folders["truncated"])]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    assert plain.returncode == 1
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()]
    assert plain.stderr.startswith("minimax-m3 generate: error: ") and "truncated" in plain.stderr
    verbose = subprocess.run(cmd + ["--verbose"], capture_output=True, text=True, env=_env(), timeout=120)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_no_library_warning_before_the_error_line(folders):
    """In a real process: transformers' log handler keeps the stderr of the process that made
    it, which a test's capture does not see. Its sequence-length warning came first here."""
    res = subprocess.run([sys.executable, "-m", "minimax_m3_mlx", "generate", "--model", str(folders["small"]),
                          "-p", LONG_PROMPT], capture_output=True, text=True, env=_env(), timeout=120)
    assert_one_error_line(res.returncode, res.stderr, "the model's context holds 400")


# Converts with a pause after each finished shard, so that Ctrl-C lands mid-run.
SLOW_CONVERT = """
import sys, time
from minimax_m3_mlx import cli
from minimax_m3_mlx.convert import writer
real = writer.finish_shard
finished = []
def slow(*a, **k):
    real(*a, **k)
    finished.append(1)
    print("shard done", flush=True)
    if len(finished) == 2:
        time.sleep(120)  # Ctrl-C lands here, mid-conversion, however loaded the machine is
writer.finish_shard = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_in_convert_says_rerun_to_resume(folders, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["convert", "--hf-path", str(folders["good"]), "--mlx-path", str(out), "--shard-size-gb", "0.00002",
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), preexec_fn=sigint_as_in_a_terminal)
    try:
        done = 0
        while done < 2:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            done += line.startswith("shard done")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("minimax-m3 convert: interrupted; rerun the same command to resume "
                                           "(the shards written so far are kept)")
    assert not out.exists() and (tmp_path / ".out.partial").is_dir()
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "resuming: " in stdout and "reused from an interrupted run" in stdout
