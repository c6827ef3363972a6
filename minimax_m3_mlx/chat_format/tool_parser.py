"""MiniMax-M3 tool calls -> OpenAI-style calls, in the shape mlx-lm's server expects.

The model writes (see tokenizer.py), every structural tag preceded by NS = `]<]minimax[>[`:

    NS<tool_call>
    NS<invoke name="get_weather">NS<city>Paris NS</city>NS<days>3NS</days>NS</invoke>
    NS<invoke name="plot">NS<points>NS<item>NS<x>1NS</x>NS<y>2NS</y>NS</item>NS</points>NS</invoke>
    NS</tool_call>

An argument is an element named after the parameter; an element whose children are all
`<item>` is a list, one with other children an object, one without children a scalar
(converted by the tool's JSON schema: "string" keeps the text as written; integer,
number, boolean, null, object and array are read as such; without a schema, JSON if it
parses, else the text). Only tags after NS are structure, so a value may contain text
that looks like a tag. Without any NS in the text, every tag is structure (MiniMax-M2's
`<invoke name=..><parameter name="k">v</parameter>` also parses).

`parse_tool_call(text, tools)` follows mlx-lm's tool-parser contract: it gets the text
between the start and end markers and returns {"name", "arguments"} (or a list of them),
raising ValueError when the text holds no complete call.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional

from .markers import NS_TOKEN

tool_call_start = NS_TOKEN + "<tool_call>"
tool_call_end = NS_TOKEN + "</tool_call>"

_TAG = r'<(/?)([^\s<>/"=]+)((?:\s+[\w.:-]+\s*=\s*"[^"]*")*)\s*>'
_NS_TAG = re.compile(re.escape(NS_TOKEN) + _TAG)
_ANY_TAG = re.compile(_TAG)
_ATTR = re.compile(r'([\w.:-]+)\s*=\s*"([^"]*)"')


class _Node:
    __slots__ = ("name", "attrs", "children", "text", "closed")

    def __init__(self, name: str, attrs: Dict[str, str]):
        self.name, self.attrs = name, attrs
        self.children: List["_Node"] = []
        self.text: List[str] = []
        self.closed = False


def _tree(text: str) -> _Node:
    """Elements of the call text; unclosed elements stay `closed=False`."""
    tag_re = _NS_TAG if NS_TOKEN in text else _ANY_TAG
    root = _Node("", {})
    stack = [root]
    pos = 0
    for m in tag_re.finditer(text):
        stack[-1].text.append(text[pos:m.start()])
        pos = m.end()
        closing, name, attrs = m.group(1) == "/", m.group(2), dict(_ATTR.findall(m.group(3) or ""))
        if not closing:
            node = _Node(name, attrs)
            stack[-1].children.append(node)
            stack.append(node)
            continue
        # A closing tag closes its element and any unclosed ones inside it; a stray one is dropped.
        for depth in range(len(stack) - 1, 0, -1):
            if stack[depth].name == name:
                stack[depth].closed = True
                del stack[depth:]
                break
    stack[-1].text.append(text[pos:])
    return root


def _strip_newlines(s: str) -> str:
    if s.startswith("\n"):
        s = s[1:]
    if s.endswith("\n"):
        s = s[:-1]
    return s


def _types(schema: Any) -> List[str]:
    """The JSON types a schema allows (type, type lists, enum values, anyOf/oneOf/allOf)."""
    if not isinstance(schema, dict):
        return []
    out: List[str] = []
    t = schema.get("type")
    out += [t] if isinstance(t, str) else [x for x in t if isinstance(x, str)] if isinstance(t, list) else []
    for v in schema.get("enum") or []:
        out.append({type(None): "null", bool: "boolean", int: "integer", float: "number",
                    str: "string", list: "array", dict: "object"}.get(type(v), "string"))
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key) or []:
            out += _types(sub)
    return out


def _scalar(text: str, schema: Any) -> Any:
    types = _types(schema)
    if not types:
        try:
            return json.loads(text)
        except (json.JSONDecodeError, ValueError):
            return text
    s = text.strip()
    if "null" in types and s.lower() in ("null", "none"):
        return None
    for t in ("integer", "number", "boolean", "object", "array"):
        if t not in types:
            continue
        try:
            if t == "integer":
                return int(s)
            if t == "number":
                v = float(s)
                return int(v) if v.is_integer() and re.fullmatch(r"-?\d+", s) else v
            if t == "boolean" and s.lower() in ("true", "false"):
                return s.lower() == "true"
            if t in ("object", "array"):
                v = json.loads(s)
                if isinstance(v, dict if t == "object" else list):
                    return v
        except (ValueError, json.JSONDecodeError):
            continue
    if "string" in types:
        return text
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def _sub_schema(schema: Any, key: Optional[str]) -> Any:
    """The schema of an object's property (key) or of a list's items (key None)."""
    if not isinstance(schema, dict):
        return None
    if key is None:
        if isinstance(schema.get("items"), dict):
            return schema["items"]
    elif isinstance(schema.get("properties"), dict) and key in schema["properties"]:
        return schema["properties"][key]
    for alt in schema.get("anyOf", []) + schema.get("oneOf", []):
        found = _sub_schema(alt, key)
        if found is not None:
            return found
    return None


def _value(node: _Node, schema: Any) -> Any:
    kids = [c for c in node.children if c.closed]
    if not kids:
        text = _strip_newlines("".join(node.text))
        types = _types(schema)
        if text == "" and types and types[0] in ("array", "object"):
            return [] if types[0] == "array" else {}
        return _scalar(text, schema)
    if all(c.name == "item" for c in kids):
        return [_value(c, _sub_schema(schema, None)) for c in kids]
    return {c.name: _value(c, _sub_schema(schema, c.name)) for c in kids}


def _arg_name(node: _Node) -> str:
    # MiniMax-M2 spells an argument <parameter name="k">; M3 names the element itself.
    return node.attrs["name"] if node.name == "parameter" and "name" in node.attrs else node.name


def _schemas(tools: Optional[list]) -> Dict[str, dict]:
    out = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = params if isinstance(params, dict) else {}
    return out


def parse_tool_calls(text: str, tools: Optional[list] = None) -> List[Dict[str, Any]]:
    """Every complete `<invoke>` in `text`: [{"name": str, "arguments": dict}, ...]."""
    schemas = _schemas(tools)
    calls = []

    def visit(node: _Node):
        for child in node.children:
            if child.name == "invoke":
                if child.closed and child.attrs.get("name"):
                    name = child.attrs["name"].strip()
                    schema = schemas.get(name, {})
                    args = {}
                    for arg in child.children:
                        if arg.closed:
                            key = _arg_name(arg)
                            args[key] = _value(arg, _sub_schema(schema, key))
                    calls.append({"name": name, "arguments": args})
            else:
                visit(child)

    visit(_tree(text))
    return calls


def parse_tool_call(text: str, tools: Optional[list] = None):
    """mlx-lm's tool-parser entry point: one call as a dict, several as a list."""
    calls = parse_tool_calls(text, tools)
    if not calls:
        raise ValueError(f"no complete MiniMax tool call in {text[:200]!r}")
    return calls[0] if len(calls) == 1 else calls


def split_tool_calls(text: str, tools: Optional[list] = None):
    """(text outside tool-call blocks, parsed calls) for a whole model output."""
    content, calls = [], []
    pos = 0
    while True:
        start = text.find(tool_call_start, pos)
        if start < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        end = text.find(tool_call_end, start)
        body = text[start + len(tool_call_start): end if end >= 0 else len(text)]
        calls += parse_tool_calls(body, tools)
        if end < 0:
            break
        pos = end + len(tool_call_end)
    return "".join(content), calls
