"""MiniMax-M3 tool calls -> OpenAI-style calls, in the shape mlx-lm's server expects.

The model writes (see tokenizer.py), every structural tag preceded by NS = `]<]minimax[>[`:

    NS<tool_call>
    NS<invoke name="get_weather">NS<city>Paris NS</city>NS<days>3NS</days>NS</invoke>
    NS<invoke name="plot">NS<points>NS<item>NS<x>1NS</x>NS<y>2NS</y>NS</item>NS</points>NS</invoke>
    NS</tool_call>

An argument is an element named after the parameter. Only tags after NS are structure, so
a value may contain text that looks like a tag; without any NS in the text every tag is
structure (MiniMax-M2's `<invoke name=..><parameter name="k">v</parameter>` also parses).
Values follow the tool's JSON schema (type, type lists, enum, anyOf/oneOf/allOf, items,
properties, additionalProperties): an element with children is a list when the schema
says array (its children are the items, whatever their tag: `<item>` or repeated
`<x>`), an object otherwise; a leaf is converted to the schema's type.

Rules where the serving projects disagree (each is tested in tests/test_tool_vectors.py):

- types: the first type of the schema, in declared order, that reads the text wins
  (`["integer", "string"]` reads "42" as 42, `["string", "integer"]` as "42"); an enum
  value written out is that value (`enum: [1, 2]` reads "2" as 2); a value no type reads
  stays text. A value written on lines of its own (`<shape>\\nrectangle\\n</shape>`) loses
  those two newlines, as vLLM trims them; a value that only ends in a newline (a file's
  last line) keeps it; typed values lose all outer whitespace. Values are taken as
  written: the template writes them without escaping.
- null: the text `null` is None only where the schema allows null or has no string type;
  `none`, `nil` and a `null` for a plain string stay strings (SGLang).
- no schema: where the request declares tools, a value its schema does not type (an
  undeclared parameter, a key of an object that declares no properties, an unknown
  tool's arguments) stays text, as vLLM and rtp-llm read it; only when the request
  declares no tools at all is such a value read as JSON where it parses.
- repeated sibling tags make a list (`<tag>a</tag><tag>b</tag>` -> ["a", "b"], vLLM); a
  single leaf of an array parameter that is not a JSON list is a one-item list.
- mixed text inside a parameter: for a string parameter the inner text as written (tags
  included, NS removed: e.g. HTML in an M2 value); otherwise the text goes to a "$text"
  key of the object ("$$text" if a child is named "$text"), as vLLM does.
- malformed structure: a closing tag closes the elements still open inside it and they
  keep their values; a stray closing tag is ignored (SGLang); an opening tag that the open
  element's schema does not declare but an enclosing element's does closes the open
  elements first (rtp-llm's repair of a dropped `</rest_days>`), never out of an object
  that declares no properties. Text between arguments of an invoke is ignored and the
  arguments after it still count (vLLM drops them).
- truncated output (max_tokens): a block with an invoke that was cut off (never closed,
  neither by `</invoke>` nor by the block's end marker) holds no call at all: the server
  returns its text, markers included, as content with finish_reason "length" (SGLang).
  vLLM instead emits the cut-off call with the arguments complete so far; an agent that
  ignores finish_reason would then run a call with arguments missing, which is worse
  than no call, so nothing of a cut-off block is executed and nothing is lost.
- text after a tool block is content (mlx-lm's text state machine; vLLM drops it).
- unknown tool names: the call is returned as written (vLLM) and the client answers
  "no such tool"; rtp-llm drops it. A name that matches exactly one declared tool when
  case is ignored takes that tool's spelling (SGLang); nothing else is renamed.
- lenient forms (seen in real output): the invoke name may be single-quoted or unquoted
  with spaces around `=`; an `<invoke ...>` or `</invoke>` without NS counts where no
  argument is open. Nothing else without NS is structure.

`parse_tool_call(text, tools)` follows mlx-lm's tool-parser contract: it gets the text
between the start and end markers and returns {"name", "arguments"} (or a list of them),
raising ValueError when the text holds no call. `split_reply` splits a whole reply into
content, reasoning and calls the way the server's streaming path does.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .markers import NS_TOKEN, THINK_END, THINK_START

tool_call_start = NS_TOKEN + "<tool_call>"
tool_call_end = NS_TOKEN + "</tool_call>"

_VALUE = r'(?:"[^"]*"|\'[^\']*\'|[^\s"\'<>]+)'
_TAG = re.compile(r'<(/?)([^\s<>/"\'=]+)((?:\s+[\w.:-]+\s*=\s*' + _VALUE + r')*)\s*>')
_ATTR = re.compile(r'([\w.:-]+)\s*=\s*("[^"]*"|\'[^\']*\'|[^\s"\'<>]+)')
_BARE_INVOKE = re.compile(r'<invoke(?:\s+[\w.:-]+\s*=\s*' + _VALUE + r')*\s*>|</invoke\s*>')
_INTEGER = re.compile(r"[-+]?\d+")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_TYPE_ALIASES = {"int": "integer", "float": "number", "double": "number", "bool": "boolean", "str": "string",
                 "text": "string", "dict": "object", "map": "object", "list": "array", "arr": "array"}


class _Node:
    __slots__ = ("name", "attrs", "children", "text", "closed", "schema", "begin", "end")

    def __init__(self, name: str, attrs: Dict[str, str], schema: Any, begin: int):
        self.name, self.attrs, self.schema = name, attrs, schema
        self.children: List["_Node"] = []
        self.text: List[str] = []
        self.closed = False
        self.begin, self.end = begin, begin  # the inner text: source[begin:end]

    @property
    def key(self) -> str:
        # MiniMax-M2 spells an argument <parameter name="k">; M3 names the element itself.
        return self.attrs["name"] if self.name == "parameter" and "name" in self.attrs else self.name


# -- schemas ------------------------------------------------------------------------------------
def _alternatives(schema: dict) -> List[dict]:
    return [s for key in ("anyOf", "oneOf", "allOf") for s in (schema.get(key) or []) if isinstance(s, dict)]


def _types(schema: Any) -> List[str]:
    """The JSON types a schema allows, in declared order (type, enum values, anyOf/oneOf/allOf)."""
    if not isinstance(schema, dict):
        return []
    out: List[str] = []
    t = schema.get("type")
    for name in [t] if isinstance(t, str) else t if isinstance(t, list) else []:
        if isinstance(name, str):
            out.append(_TYPE_ALIASES.get(name.strip().lower(), name.strip().lower()))
    if not out:
        for v in schema.get("enum") or []:
            out.append({type(None): "null", bool: "boolean", int: "integer", float: "number",
                        list: "array", dict: "object"}.get(type(v), "string"))
        if not out and isinstance(schema.get("properties"), dict):
            out.append("object")
        if not out and "items" in schema:
            out.append("array")
    for sub in _alternatives(schema):
        out += _types(sub)
    return list(dict.fromkeys(out))


def _container(schema: Any) -> Optional[str]:
    """"array" or "object" (the first the schema allows), else None."""
    return next((t for t in _types(schema) if t in ("array", "object")), None)


def _sub_schema(schema: Any, key: Optional[str]) -> Any:
    """The schema of an object's property (key) or of a list's items (key None)."""
    if not isinstance(schema, dict):
        return None
    if key is None:
        if isinstance(schema.get("items"), dict):
            return schema["items"]
    else:
        props = schema.get("properties")
        if isinstance(props, dict) and key in props:
            return props[key]
    for alt in _alternatives(schema):
        found = _sub_schema(alt, key)
        if found is not None:
            return found
    if key is not None and isinstance(schema.get("additionalProperties"), dict):
        return schema["additionalProperties"]
    return None


def _declares(schema: Any, key: str) -> bool:
    """Whether an element of this schema has a child named `key` by declaration."""
    if not isinstance(schema, dict):
        return False
    props = schema.get("properties")
    if isinstance(props, dict) and key in props:
        return True
    if key == "item" and _container(schema) == "array":
        return True
    return any(_declares(alt, key) for alt in _alternatives(schema))


def _free_form(schema: Any) -> bool:
    """No schema, or an object that declares no properties: any child belongs to it."""
    if not isinstance(schema, dict) or not _types(schema):
        return True
    if _container(schema) != "object":
        return False

    def has_properties(s):
        return isinstance(s.get("properties"), dict) and bool(s["properties"]) or any(
            has_properties(a) for a in _alternatives(s))

    return not has_properties(schema)


def _schemas(tools: Optional[list]) -> Dict[str, dict]:
    out = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = params if isinstance(params, dict) else {}
    return out


def _tool_name(name: str, schemas: Dict[str, dict]) -> str:
    if name in schemas:
        return name
    same = [declared for declared in schemas if declared.lower() == name.lower()]
    return same[0] if len(same) == 1 else name


# -- structure ----------------------------------------------------------------------------------
def _tags(text: str):
    """(start, end, closing, name, attrs, bare) for every tag that may be structure."""
    out = []
    if NS_TOKEN not in text:
        for m in _TAG.finditer(text):
            out.append((m.start(), m.end(), m.group(1) == "/", m.group(2), m.group(3), False))
        return out
    pos = text.find(NS_TOKEN)
    while pos >= 0:
        m = _TAG.match(text, pos + len(NS_TOKEN))
        if m:
            out.append((pos, m.end(), m.group(1) == "/", m.group(2), m.group(3), False))
        pos = text.find(NS_TOKEN, m.end() if m else pos + len(NS_TOKEN))
    starts = [s for s, *_ in out]  # NS tags do not overlap: sorted by start and by end
    for m in _BARE_INVOKE.finditer(text):
        i = bisect.bisect_right(starts, m.start()) - 1
        if i < 0 or m.start() >= out[i][1]:
            tag = _TAG.fullmatch(m.group(0))
            out.append((m.start(), m.end(), tag.group(1) == "/", tag.group(2), tag.group(3), True))
    return sorted(out)


def _attrs(source: str) -> Dict[str, str]:
    return {k: v[1:-1] if v[:1] in "\"'" else v for k, v in _ATTR.findall(source or "")}


def _tree(text: str, schemas: Dict[str, dict], complete: bool = True) -> _Node:
    """The elements of the call text. In a complete block (its end marker seen) the end
    closes what is still open, like any closing tag; in a cut-off one those elements
    stay `closed=False`."""
    root = _Node("", {}, None, 0)
    stack = [root]
    pos = 0

    def close(depth: int, at: int):
        for node in stack[depth:]:
            node.closed, node.end = True, at
        del stack[depth:]

    def invoke_depth():
        return next((d for d in range(len(stack) - 1, 0, -1) if stack[d].name == "invoke"), None)

    for start, end, closing, name, attr_text, bare in _tags(text):
        if start < pos:
            continue
        inv = invoke_depth()
        if bare and (inv is None or len(stack) - 1 != inv if closing else inv is not None):
            continue  # an invoke tag without NS where an argument (or no invoke) is open is text
        stack[-1].text.append(text[pos:start])
        pos = end
        if closing:
            # A closing tag closes its element and the open ones inside it; a stray one is dropped.
            lowest = 1 if name == "invoke" or inv is None else inv
            depth = next((d for d in range(len(stack) - 1, lowest - 1, -1) if stack[d].name == name), None)
            if depth is not None:
                close(depth, start)
            continue
        attrs = _attrs(attr_text)
        if name == "invoke":
            if inv is not None:
                close(inv, start)  # invokes do not nest: the open one ended without </invoke>
            fn = _tool_name((attrs.get("name") or "").strip(), schemas)
            attrs["name"] = fn
            node = _Node(name, attrs, schemas.get(fn, {}), end)
        else:
            key = attrs["name"] if name == "parameter" and "name" in attrs else name
            if inv is not None and len(stack) - 1 > inv:
                top = stack[-1]
                if not _declares(top.schema, key) and not _free_form(top.schema):
                    # The open element cannot hold this key but an enclosing one declares it:
                    # its closing tag was dropped.
                    for depth in range(len(stack) - 2, inv - 1, -1):
                        if _declares(stack[depth].schema, key):
                            close(depth + 1, start)
                            break
            parent = stack[-1]
            schema = _sub_schema(parent.schema, None if _container(parent.schema) == "array" else key)
            node = _Node(name, attrs, schema, end)
        stack[-1].children.append(node)
        stack.append(node)
    stack[-1].text.append(text[pos:])
    if complete:
        close(1, len(text))
    for node in stack[1:]:
        node.end = len(text)
    return root


# -- values -------------------------------------------------------------------------------------
def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def _read(text: str, t: str) -> Any:
    """`text` read as JSON type `t`, or a ValueError."""
    s = text.strip()
    if t == "string":
        return text
    if t == "integer" and _INTEGER.fullmatch(s):
        return int(s)
    if t == "number" and _NUMBER.fullmatch(s):
        if _INTEGER.fullmatch(s):
            return int(s)
        v = float(s)
        if math.isfinite(v):
            return v
    if t == "boolean" and s.lower() in ("true", "false", "1", "0"):
        return s.lower() in ("true", "1")
    if t == "null" and s.lower() == "null":
        return None
    if t in ("object", "array"):
        v = _json(s)
        if isinstance(v, dict if t == "object" else list):
            return v
    raise ValueError(t)


def _unwrap_lines(text: str) -> str:
    """The value without the newlines that put it on lines of its own, if it has both."""
    head = 2 if text.startswith("\r\n") else 1 if text.startswith("\n") else 0
    tail = 2 if text.endswith("\r\n") else 1 if text.endswith("\n") else 0
    return text[head:len(text) - tail] if head and tail and len(text) >= head + tail else text


def _leaf(text: str, schema: Any, guess: bool) -> Any:
    text = _unwrap_lines(text)
    types = _types(schema)
    if not types:
        return _json(text) if guess else text
    s = text.strip()
    if isinstance(schema, dict):
        for v in schema.get("enum") or []:
            if s == (json.dumps(v) if not isinstance(v, str) else v) or (
                    isinstance(v, (int, float)) and not isinstance(v, bool) and _NUMBER.fullmatch(s) and float(s) == v):
                return v
    if s.lower() == "null" and ("null" in types or "string" not in types):
        return None
    container = _container(schema)
    if s == "" and container:
        return [] if container == "array" else {}
    for t in types:
        try:
            return _read(text, t)
        except ValueError:
            continue
    if "array" in types:
        return [_leaf(text, _sub_schema(schema, None), guess)]
    return _json(s)


def _value(node: _Node, schema: Any, source: str, guess: bool) -> Any:
    kids = [c for c in node.children if c.closed]
    text = "".join(node.text)
    if not kids:
        return _leaf(text, schema, guess)
    types = _types(schema)
    if types and types[0] == "string" and not _container(schema):
        return _unwrap_lines(source[node.begin:node.end].replace(NS_TOKEN, ""))
    container = _container(schema) or ("array" if all(c.name == "item" for c in kids) else "object")
    if container == "array":
        items = _sub_schema(schema, None)
        return [_value(c, items, source, guess) for c in kids]
    out = _members(kids, schema, source, guess)
    if text.strip():
        name = "$text"
        while name in out:
            name = "$" + name
        out[name] = text.strip()
    return out


def _members(kids: List[_Node], schema: Any, source: str, guess: bool) -> Dict[str, Any]:
    """An object from its member elements; repeated members make a list."""
    groups: Dict[str, List[_Node]] = {}
    for c in kids:
        groups.setdefault(c.key, []).append(c)
    out: Dict[str, Any] = {}
    for key, nodes in groups.items():
        sub = _sub_schema(schema, key)
        if len(nodes) == 1:
            out[key] = _value(nodes[0], sub, source, guess)
        else:
            each = _sub_schema(sub, None) if _container(sub) == "array" else sub
            out[key] = [_value(n, each, source, guess) for n in nodes]
    return out


def parse_tool_calls(text: str, tools: Optional[list] = None, complete: bool = True) -> List[Dict[str, Any]]:
    """Every invoke in `text`: [{"name", "arguments"}, ...]; none if any invoke was cut off.

    complete: the block's end marker followed `text` (mlx-lm hands its parser only such
    blocks); False for a block that generation cut off."""
    schemas = _schemas(tools)
    guess = not schemas
    calls = []
    cut_off = False

    def visit(node: _Node):
        nonlocal cut_off
        for child in node.children:
            if child.name == "invoke":
                cut_off |= not child.closed
                if child.attrs.get("name"):
                    args = _members([a for a in child.children if a.closed], child.schema, text, guess)
                    calls.append({"name": child.attrs["name"], "arguments": args})
            else:
                visit(child)

    visit(_tree(text, schemas, complete))
    return [] if cut_off else calls


def parse_tool_call(text: str, tools: Optional[list] = None, complete: bool = True):
    """mlx-lm's tool-parser entry point: one call as a dict, several as a list."""
    calls = parse_tool_calls(text, tools, complete)
    if not calls:
        raise ValueError(f"no complete MiniMax tool call (an invoke with its name) in {text[:200]!r}")
    return calls[0] if len(calls) == 1 else calls


def unparsed_block(body: str, closed: bool) -> str:
    """A tool-call block that holds no call, as the model wrote it (it goes back as content)."""
    return tool_call_start + body + (tool_call_end if closed else "")


# -- whole replies ------------------------------------------------------------------------------
@dataclass
class Reply:
    content: str = ""
    reasoning: str = ""
    calls: List[Dict[str, Any]] = field(default_factory=list)


def split_reply(text: str, tools: Optional[list] = None, state: str = "normal") -> Reply:
    """A whole reply split as the server splits it while streaming.

    `state` is where the reply starts: "reasoning" when the prompt left `<mm:think>` open,
    else "normal". A reply that opens with a bare `</mm:think>` (the trained form of "no
    reasoning") loses it; any other `</mm:think>` in the answer is kept as text.
    """
    out = Reply()
    content, reasoning = [], []
    if state == "normal" and text.startswith(THINK_END):
        text = text[len(THINK_END):]
    pos = 0
    while pos <= len(text):
        if state == "tool":
            end = text.find(tool_call_end, pos)
            body = text[pos:] if end < 0 else text[pos:end]
            calls = parse_tool_calls(body, tools, complete=end >= 0)
            out.calls += calls
            if not calls:
                content.append(unparsed_block(body, end >= 0))
            if end < 0:
                break
            pos, state = end + len(tool_call_end), "normal"
            continue
        marks = [(THINK_END if state == "reasoning" else THINK_START), tool_call_start]
        found = [(text.find(m, pos), m) for m in marks]
        found = [(i, m) for i, m in found if i >= 0]
        i, mark = min(found) if found else (len(text), None)
        (reasoning if state == "reasoning" else content).append(text[pos:i])
        if mark is None:
            break
        state = {THINK_START: "reasoning", THINK_END: "normal", tool_call_start: "tool"}[mark]
        pos = i + len(mark)
    out.content, out.reasoning = "".join(content), "".join(reasoning)
    return out


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
        found = parse_tool_calls(body, tools, complete=end >= 0)
        calls += found
        if not found:
            content.append(unparsed_block(body, end >= 0))
        if end < 0:
            break
        pos = end + len(tool_call_end)
    return "".join(content), calls
