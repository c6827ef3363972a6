"""A tiny byte-level tokenizer in the shape of MiniMax's, made on the spot.

The real tokenizer (200K tokens) cannot be downloaded here, so tests and the demo use
256 byte tokens plus MiniMax's special tokens at the ids the tiny config names. Built
with the `tokenizers` library and loaded back through transformers/mlx-lm like any
released tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = {
    "]!p~[": 256,  # pad
    "]~!b[": 257,  # bos
    "[e~[": 258,  # eos / end of turn
    "]~b]": 259,  # role start
    "<think>": 260,
    "</think>": 261,
    "<minimax:tool_call>": 262,
    "</minimax:tool_call>": 263,
}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}]~b]{{ m['role'] }}\n{{ m['content'] }}[e~[\n{% endfor %}"
    "{% if add_generation_prompt %}]~b]ai\n{% endif %}"
)


def write_tiny_tokenizer(path: Path, config: dict) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    path = Path(path)
    byte_chars = ByteLevel.alphabet()
    # Order byte symbols by the byte they stand for so that id == byte value.
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    extra = {}
    text = config.get("text_config", config)
    for tok, i in SPECIAL_TOKENS.items():
        vocab[tok] = i
    for name, key in (("]<]image[>[", "image_token_index"), ("]<]video[>[", "video_token_index")):
        if key in config and config[key] < text.get("vocab_size", 1 << 30):
            vocab[name] = config[key]
            extra[name] = config[key]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS) + list(extra))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "]~!b[", "eos_token": "[e~[", "pad_token": "]!p~[",
        "add_bos_token": False, "model_max_length": text.get("max_position_embeddings", 4096),
        "chat_template": CHAT_TEMPLATE,
    }, indent=1))


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
