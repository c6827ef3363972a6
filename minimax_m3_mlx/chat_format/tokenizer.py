"""MiniMax-M3's chat format on mlx-lm's tokenizer wrapper: thinking modes and tool-call markers.

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

The tiny byte-level tokenizer and chat template the tests and the demo use are in
synthetic/tokenizer.py.
"""

from __future__ import annotations

from typing import Any, Optional

from mlx_lm.tokenizer_utils import TokenizerWrapper

from .markers import NS_TOKEN, THINK_END, THINK_START, THINKING_MODES, TOOL_CALL_END, TOOL_CALL_START
from .tool_parser import parse_tool_call


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
    tok = tokenizer if isinstance(tokenizer, MiniMaxM3Tokenizer) else MiniMaxM3Tokenizer.from_wrapper(tokenizer)
    tok.default_thinking_mode = thinking
    # The model's context is enforced where a prompt meets the model (one clear error, or a
    # reply cut at the limit); transformers' own length check would only log a warning
    # line before that error, so it is turned off.
    tok._tokenizer.model_max_length = NO_LENGTH_LIMIT
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


NO_LENGTH_LIMIT = int(1e30)  # transformers' own "no limit" (VERY_LARGE_INTEGER)


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
