"""MiniMax-M3's chat format: thinking modes, tool-call markers, and a tiny tokenizer for tests.

The published MiniMax-M3 checkpoints ship their own `chat_template.jinja`; what matters to
this package is the format it renders and the model writes back:

- turns are `]~b]ROLE\\n ... [e~[\\n` (`]~!b[` opens the document once); the template
  writes a `system` turn (identity + thinking instructions), then a `developer` turn (the
  caller's system prompt and the tool list), then the conversation, the assistant's role
  being `ai`;
- reasoning sits between `<mm:think>` and `</mm:think>`. The template variable
  `thinking_mode` is "enabled" (the generation prompt ends with `<mm:think>`: the model
  must think), "disabled" (it ends with `</mm:think>`: no reasoning) or "adaptive" (no
  prefix: the model decides; also what an undefined `thinking_mode` means). Earlier
  assistant turns are rendered with their reasoning, or with a bare `</mm:think>`;
- tool calls are XML in which every structural tag is preceded by the namespace token
  `]<]minimax[>[`: `NS<tool_call>\\n NS<invoke name="f"> NS<arg>value NS</arg> ...
  NS</invoke>\\n NS</tool_call>`; nested objects become nested elements and lists
  `NS<item>` elements (see tool_parser.py).

mlx-lm knows none of this (it looks for `<think>` and guesses a JSON tool parser from the
template's text), so `configure_tokenizer` turns its `TokenizerWrapper` into a
`MiniMaxM3Tokenizer` with the right markers, the MiniMax-M3 tool parser and the
thinking mode mapped onto `thinking_mode`.

The real tokenizer (200K tokens) cannot be downloaded here, so tests and the demo use a
byte-level tokenizer (256 byte tokens plus MiniMax's special tokens) and a chat template
written for this package that renders the same structure as the published one, with
shorter instruction text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from mlx_lm.tokenizer_utils import TokenizerWrapper

NS_TOKEN = "]<]minimax[>["
THINK_START = "<mm:think>"
THINK_END = "</mm:think>"
TOOL_CALL_START = NS_TOKEN + "<tool_call>"
TOOL_CALL_END = NS_TOKEN + "</tool_call>"
THINKING_MODES = ("enabled", "adaptive", "disabled")

SPECIAL_TOKENS = {
    "]!p~[": 256,  # pad
    "]~!b[": 257,  # beginning of document (bos)
    "[e~[": 258,  # eos / end of turn
    "]~b]": 259,  # role start
    "<think>": 260,  # MiniMax-M2's reasoning tags (kept: same ids as before)
    "</think>": 261,
    "<minimax:tool_call>": 262,  # MiniMax-M2's tool-call tags
    "</minimax:tool_call>": 263,
    THINK_START: 264,  # MiniMax-M3's reasoning tags
    THINK_END: 265,
    NS_TOKEN: 266,  # MiniMax-M3's namespace token before every tool-call tag
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


# -- thinking modes and the mlx-lm tokenizer wrapper -------------------------------------------
class ThinkingModeError(ValueError):
    """A thinking mode that is not one of THINKING_MODES, or two that contradict each other."""


def resolve_thinking_mode(thinking_mode: Any = None, enable_thinking: Any = None,
                          default: Optional[str] = None) -> Optional[str]:
    """The template's `thinking_mode` from either spelling a caller may use.

    `thinking_mode` ("enabled" / "adaptive" / "disabled") is the template's own variable;
    `enable_thinking` (a bool, mlx-lm's and Qwen's spelling) maps to "enabled"/"disabled".
    Neither: `default` (None leaves the template's own default, adaptive).
    """
    if thinking_mode is not None:
        if thinking_mode not in THINKING_MODES:
            raise ThinkingModeError(
                f"thinking_mode must be one of {', '.join(THINKING_MODES)}, got {thinking_mode!r}")
        if enable_thinking is not None and (thinking_mode == "disabled") == bool(enable_thinking):
            raise ThinkingModeError(
                f"enable_thinking={enable_thinking!r} contradicts thinking_mode={thinking_mode!r}")
        return thinking_mode
    if enable_thinking is not None:
        if not isinstance(enable_thinking, bool):
            raise ThinkingModeError(f"enable_thinking must be true or false, got {enable_thinking!r}")
        return "enabled" if enable_thinking else "disabled"
    if default is not None and default not in THINKING_MODES:
        raise ThinkingModeError(f"thinking mode must be one of {', '.join(THINKING_MODES)}, got {default!r}")
    return default


def is_m3_template(template: Any) -> bool:
    return isinstance(template, str) and (THINK_START in template or NS_TOKEN in template)


class MiniMaxM3Tokenizer(TokenizerWrapper):
    """mlx-lm's TokenizerWrapper with MiniMax-M3's thinking and tool-call conventions.

    `apply_chat_template` takes `thinking_mode` or `enable_thinking` (see
    resolve_thinking_mode) and falls back to `default_thinking_mode`; everything else is
    mlx-lm's wrapper (detokenizer, eos ids, think/tool markers used by mlx-lm's server).
    """

    @classmethod
    def from_wrapper(cls, wrapper: TokenizerWrapper) -> "MiniMaxM3Tokenizer":
        obj = cls.__new__(cls)
        obj.__dict__.update(wrapper.__dict__)
        obj._default_thinking_mode = None
        return obj

    @property
    def default_thinking_mode(self) -> Optional[str]:
        return self._default_thinking_mode

    @default_thinking_mode.setter
    def default_thinking_mode(self, mode: Optional[str]) -> None:
        self._default_thinking_mode = resolve_thinking_mode(default=mode)

    def apply_chat_template(self, *args, tokenize=True, thinking_mode=None, enable_thinking=None, **kwargs):
        mode = resolve_thinking_mode(thinking_mode, enable_thinking, self._default_thinking_mode)
        if mode is not None:
            kwargs["thinking_mode"] = mode
            # For templates that read mlx-lm's variable instead (e.g. a --chat-template override).
            kwargs["enable_thinking"] = mode != "disabled"
        if self._chat_template is not None:
            out = self._chat_template(*args, **kwargs)
            return self._tokenizer.encode(out, add_special_tokens=False) if tokenize else out
        kwargs["return_dict"] = False
        return self._tokenizer.apply_chat_template(*args, tokenize=tokenize, **kwargs)


def configure_tokenizer(tokenizer: TokenizerWrapper, thinking: Optional[str] = None) -> MiniMaxM3Tokenizer:
    """MiniMax-M3's markers, tool parser and thinking modes on a loaded mlx-lm tokenizer.

    With an M3-style chat template (`<mm:think>` / `]<]minimax[>[`), the wrapper's reasoning
    markers become `<mm:think>`/`</mm:think>` (the bare `</mm:think>` a reply opens with, the
    trained form of "no reasoning this turn", is dropped by BareThinkEnd; a later one in an
    answer is text), its tool-call markers
    `]<]minimax[>[<tool_call>` / `]<]minimax[>[</tool_call>` and its tool parser
    `tool_parser.parse_tool_call`. Other templates (e.g. MiniMax-M2's) keep mlx-lm's
    inference. `thinking` sets the default thinking mode.
    """
    from .tool_parser import parse_tool_call

    tok = tokenizer if isinstance(tokenizer, MiniMaxM3Tokenizer) else MiniMaxM3Tokenizer.from_wrapper(tokenizer)
    tok.default_thinking_mode = thinking
    template = tok._tokenizer.chat_template
    if is_m3_template(template):
        enc = tok._tokenizer

        def ids(text):
            return tuple(enc.encode(text, add_special_tokens=False))

        tok._think_start, tok._think_end = THINK_START, THINK_END
        tok._think_start_tokens, tok._think_end_tokens = ids(THINK_START), ids(THINK_END)
        tok._tool_call_start, tok._tool_call_end = TOOL_CALL_START, TOOL_CALL_END
        tok._tool_call_start_tokens, tok._tool_call_end_tokens = ids(TOOL_CALL_START), ids(TOOL_CALL_END)
        tok._tool_parser = parse_tool_call
    return tok


class BareThinkEnd:
    """Drops the bare `</mm:think>` a reply opens with when it does not reason.

    That one is the trained form of "no reasoning this turn" (adaptive mode); a
    `</mm:think>` later in an answer is text and stays, as vLLM keeps `XXX</mm:think>YYY`.
    mlx-lm's text state machine cannot tell the first from the others (a structural marker
    is stripped everywhere), so reply text passes through this before it. `active`: the
    reply starts outside reasoning with MiniMax-M3's markers.
    """

    def __init__(self, active: bool):
        self._held: Optional[str] = "" if active else None

    @classmethod
    def for_reply(cls, tokenizer, initial_state: str) -> "BareThinkEnd":
        return cls(initial_state == "normal" and getattr(tokenizer, "think_end", None) == THINK_END)

    def __call__(self, text: str, final: bool = False) -> str:
        if self._held is None:
            return text
        held = self._held + text
        if held.startswith(THINK_END):
            self._held = None
            return held[len(THINK_END):]
        if THINK_END.startswith(held) and not final:
            self._held = held
            return ""
        self._held = None
        return held
