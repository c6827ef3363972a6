"""A tiny byte-level tokenizer and chat template standing in for MiniMax-M3's (tests, demo).

The real tokenizer (200K tokens) cannot be downloaded here, so tests and the demo use a
byte-level tokenizer (256 byte tokens plus MiniMax's special tokens) and a chat template
written for this package that renders the same structure as the published one (see
chat_format/tokenizer.py), with shorter instruction text. The markers are spelled out
rather than imported: this stands for the release's files, which the package must read.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

SPECIAL_TOKENS = {
    "]!p~[": 256,  # pad
    "]~!b[": 257,  # beginning of document (bos)
    "[e~[": 258,  # eos / end of turn
    "]~b]": 259,  # role start
    "<think>": 260,  # MiniMax-M2's reasoning tags (kept: same ids as before)
    "</think>": 261,
    "<minimax:tool_call>": 262,  # MiniMax-M2's tool-call tags
    "</minimax:tool_call>": 263,
    "<mm:think>": 264,  # MiniMax-M3's reasoning tags
    "</mm:think>": 265,
    "]<]minimax[>[": 266,  # MiniMax-M3's namespace token before every tool-call tag
}

# Written for this package; renders the structure of MiniMax-M3's published template.
CHAT_TEMPLATE = r"""
{%- set ns = ']<]minimax[>[' -%}
{%- set think_open = '<mm:think>' -%}
{%- set think_close = '</mm:think>' -%}
{%- set call_open = ns ~ '<tool_call>' -%}
{%- set call_close = ns ~ '</tool_call>' -%}
{%- if thinking_mode is defined and thinking_mode -%}
    {%- if thinking_mode not in ['enabled', 'adaptive', 'disabled'] -%}
        {{- raise_exception('thinking_mode must be enabled, adaptive or disabled, not ' ~ thinking_mode) -}}
    {%- endif -%}
    {%- set mode = thinking_mode -%}
{%- else -%}
    {%- set mode = 'adaptive' -%}
{%- endif -%}
{%- macro text_of(content) -%}
    {%- if content is none -%}
    {%- elif content is string -%}{{- content -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part is string -%}{{- part -}}
            {%- elif part.type == 'text' -%}{{- part.text -}}
            {%- elif part.type in ['image', 'image_url'] -%}{{- ']<]image[>[' -}}
            {%- elif part.type == 'video' -%}{{- ']<]video[>[' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- macro as_xml(value) -%}
    {%- if value is mapping -%}
        {%- for key, item in value.items() if item is not none -%}
            {{- ns ~ '<' ~ key ~ '>' ~ as_xml(item) ~ ns ~ '</' ~ key ~ '>' -}}
        {%- endfor -%}
    {%- elif value is iterable and value is not string -%}
        {%- for item in value -%}
            {{- ns ~ '<item>' ~ as_xml(item) ~ ns ~ '</item>' -}}
        {%- endfor -%}
    {%- elif value is boolean -%}{{- value | tojson -}}
    {%- elif value is not none -%}{{- value -}}
    {%- endif -%}
{%- endmacro -%}
{%- set messages_left = messages -%}
{%- set root = none -%}
{%- set developer = none -%}
{%- if messages_left and messages_left[0].role == 'root' -%}
    {%- set root = messages_left[0] -%}
    {%- set messages_left = messages_left[1:] -%}
{%- endif -%}
{%- if messages_left and messages_left[0].role in ['system', 'developer'] -%}
    {%- set developer = messages_left[0] -%}
    {%- set messages_left = messages_left[1:] -%}
{%- endif -%}
{{- ']~!b[]~b]system\n' -}}
{%- if root and root.content -%}{{- text_of(root.content) -}}
{%- else -%}{{- 'You are MiniMax-M3, a model made by MiniMax.' -}}
{%- endif -%}
{{- '\n\n<thinking_instructions>\nYou can reason step by step inside ' ~ think_open ~ think_close -}}
{{- ' before you answer. With thinking disabled, answer right after ' ~ think_close ~ '.\n' -}}
{%- if mode == 'enabled' -%}{{- 'Current thinking mode: enabled. Think before every answer.\n' -}}
{%- elif mode == 'disabled' -%}{{- 'Current thinking mode: disabled. Do not think.\n' -}}
{%- else -%}{{- 'Current thinking mode: adaptive. Think when the task needs it.\n' -}}
{%- endif -%}
{{- '</thinking_instructions>[e~[\n' -}}
{{- ']~b]developer\n' -}}
{%- if developer and developer.content -%}{{- text_of(developer.content) -}}
{%- else -%}{{- 'You are a helpful assistant.' -}}
{%- endif -%}
{%- if tools -%}
    {{- '\n\n# Tools\nYou may call the tools below (JSON Schema):\n<tools>\n' -}}
    {%- for tool in tools -%}
        {{- '<tool>' ~ ((tool.function if tool.function is defined else tool) | tojson) ~ '</tool>\n' -}}
    {%- endfor -%}
    {{- '</tools>\nWrap all calls in one ' ~ call_open ~ call_close ~ ' block; nested objects and lists' -}}
    {{- ' become nested elements. Example:\n' ~ call_open ~ '\n' -}}
    {{- ns ~ '<invoke name="tool-name">' ~ ns ~ '<param>value' ~ ns ~ '</param>' ~ ns ~ '</invoke>\n' -}}
    {{- call_close -}}
{%- endif -%}
{{- '[e~[\n' -}}
{%- set last_call = namespace(name=none) -%}
{%- for message in messages_left -%}
    {%- if message.role == 'user' -%}
        {{- ']~b]user\n' ~ text_of(message.content) ~ '[e~[\n' -}}
    {%- elif message.role == 'assistant' -%}
        {%- set content = text_of(message.content) -%}
        {%- set reasoning = '' -%}
        {%- if message.reasoning_content is string -%}
            {%- set reasoning = message.reasoning_content -%}
        {%- elif message.reasoning is string -%}
            {%- set reasoning = message.reasoning -%}
        {%- elif think_close in content -%}
            {%- set reasoning = content.split(think_close)[0].split(think_open)[-1] -%}
            {%- set content = content.split(think_close)[-1] -%}
        {%- endif -%}
        {%- set reasoning = reasoning.strip('\n') -%}
        {{- ']~b]ai\n' -}}
        {%- if reasoning -%}{{- think_open ~ reasoning ~ think_close -}}
        {%- else -%}{{- think_close -}}
        {%- endif -%}
        {{- content.strip('\n') -}}
        {%- if message.tool_calls -%}
            {{- call_open ~ '\n' -}}
            {%- for call in message.tool_calls -%}
                {%- set call = call.function if call.function is defined else call -%}
                {%- if call.arguments is string -%}
                    {{- raise_exception('tool call arguments must be an object, not a JSON string') -}}
                {%- endif -%}
                {{- ns ~ '<invoke name="' ~ call.name ~ '">' -}}
                {%- if call.arguments -%}{{- as_xml(call.arguments) -}}{%- endif -%}
                {{- ns ~ '</invoke>\n' -}}
                {%- set last_call.name = call.name -%}
            {%- endfor -%}
            {{- call_close -}}
        {%- endif -%}
        {{- '[e~[\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if last_call.name is none -%}
            {{- raise_exception('a tool message must follow an assistant message with tool calls') -}}
        {%- endif -%}
        {%- if loop.first or messages_left[loop.index0 - 1].role != 'tool' -%}{{- ']~b]tool' -}}{%- endif -%}
        {{- '\n<response>' ~ text_of(message.content) ~ '</response>' -}}
        {%- if loop.last or messages_left[loop.index0 + 1].role != 'tool' -%}{{- '[e~[\n' -}}{%- endif -%}
    {%- else -%}
        {{- raise_exception('unknown role ' ~ message.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- ']~b]ai\n' -}}
    {%- if mode == 'enabled' -%}{{- think_open -}}
    {%- elif mode == 'disabled' -%}{{- think_close -}}
    {%- endif -%}
{%- endif -%}
""".strip()


def write_tiny_tokenizer(path: Path, config: dict) -> None:
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
    # Every id the model can emit must decode (mlx-lm's streaming detokenizer fails on a
    # hole): the ids no token above names become reserved tokens, as in padded real vocabs.
    taken = set(vocab.values())
    for i in range(text.get("vocab_size", 0)):
        if i not in taken:
            vocab[f"<reserved_{i}>"] = i
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
