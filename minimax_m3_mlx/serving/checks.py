"""The server's checks of a request's messages, tools, stop words and thinking mode: a
malformed request is a 400 with a message naming the field, not an error from deep inside
generation."""

from __future__ import annotations

import json
from typing import Any, Optional

from mlx_lm.server import _image_url

from ..chat_format.markers import THINKING_MODES
from ..chat_format.tokenizer import resolve_thinking_mode

ROLES = ("system", "developer", "root", "user", "assistant", "tool")
REASONING_EFFORT = {"none": "disabled", "minimal": "disabled", "low": "adaptive", "medium": "adaptive",
                    "high": "enabled", "xhigh": "enabled"}


def thinking_from_request(body: dict) -> Optional[str]:
    """The thinking mode a request asks for (None: the server's default); ValueError if malformed."""
    kwargs = body.get("chat_template_kwargs") or {}
    asked = {}
    if "thinking_mode" in kwargs or "enable_thinking" in kwargs:
        asked["chat_template_kwargs"] = resolve_thinking_mode(kwargs.get("thinking_mode"), kwargs.get("enable_thinking"))
    thinking = body.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else thinking
        if kind not in THINKING_MODES:
            raise ValueError(f"thinking.type must be one of {', '.join(THINKING_MODES)}, got {kind!r}")
        asked["thinking"] = kind
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_EFFORT:
            raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORT)}, got {effort!r}")
        asked["reasoning_effort"] = REASONING_EFFORT[effort]
    modes = set(asked.values()) - {None}
    if len(modes) > 1:
        raise ValueError(f"conflicting thinking modes in one request: {asked}")
    return modes.pop() if modes else None


def check_messages(messages: Any, images: bool = False) -> None:
    """`images`: the served model takes image parts (image_url, as mlx-lm reads them)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts")
        if content is None and m["role"] != "assistant":  # only a reply with tool calls may have none
            raise ValueError(f"messages[{i}].content must be given for role {m['role']!r}")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    if not (images and isinstance(part, dict) and isinstance(_image_url(part), str)):
                        raise ValueError(f"messages[{i}].content[{j}]: " + (
                            "only text and image parts are supported" if images else
                            "only text parts are supported (this model, or this install, takes no images)"))
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            raise ValueError(f"messages[{i}].tool_calls must be a list")
        for j, call in enumerate(m.get("tool_calls") or []):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f"messages[{i}].tool_calls[{j}] must have function.name")
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError as e:
                    raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: {e}") from None
            if args is not None and not isinstance(args, dict):
                raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object")


def check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")


def check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(w, str) and w for w in stop):
        raise ValueError("stop must be a string or a list of non-empty strings")
