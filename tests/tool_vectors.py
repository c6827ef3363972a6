"""MiniMax-M3 tool-call and reasoning test vectors, re-expressed as data.

Each vector is a reply the model could write and what a client must get back:
`{"id", "source", "text", "tools", "state", "content", "reasoning", "calls"}`; `tools`
names a tool set below (None: the request declares no tools), `state` is where the reply
starts ("reasoning" when the prompt opened `<mm:think>`, as thinking_mode="enabled"
does). `source` says whose test or which real output the case comes from:

- vllm-py: vLLM tests/tool_parsers/test_minimax_m3_tool_parser.py and
  tests/reasoning/test_minimax_m3_reasoning_parser.py
- vllm-rust: vLLM rust/src/tool-parser/src/minimax_m3.rs and parameters.rs unit tests
- sglang: SGLang's MinimaxM3Detector tests (plus the later "finish releases held marker
  prefix" and lenient-invoke cases named in issue #15)
- rtp-llm: rtp-llm's MiniMaxM3Detector / reasoning parser tests
- real: model outputs quoted in mlx-lm PR #1416, llama.cpp PR #24523, MiniMax-M3 issue #31
- issue-15: the failures listed in this package's issue #15
- rule: this package's rule where the peers disagree (tool_parser.py's docstring)

The cases are written from what those tests check; no code of theirs is used. Where our
rule differs from a peer's on purpose, `note` says so.
"""

NS = "]<]minimax[>["
START, END = NS + "<tool_call>", NS + "</tool_call>"


def el(name, body=""):
    return f"{NS}<{name}>{body}{NS}</{name}>"


def inv(name, body=""):
    return f'{NS}<invoke name="{name}">{body}{NS}</invoke>'


def block(*invokes, sep="\n"):
    return START + sep + sep.join(invokes) + sep + END


def fn(name, properties=None, **extra):
    params = {"type": "object", "properties": properties or {}, **extra}
    return {"type": "function", "function": {"name": name, "parameters": params}}


S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}

ORDER = fn("create_order", {
    "user_id": I, "urgent": B, "note": S,
    "shipping": {"type": "object", "properties": {"city": S, "zip": I}},
    "items": {"type": "array", "items": {"type": "object", "properties": {"sku": S, "qty": I}}},
    "metadata": {"type": "object", "additionalProperties": S},
    "duplicate_demo": {"type": "object"},
})
ORDER_RUST = fn("create_order", {
    "user_id": I, "urgent": B, "note": S,
    "shipping": {"type": "object", "properties": {"city": S, "zip": I}},
    "items": {"type": "array", "items": {"type": "object", "properties": {"sku": S, "qty": I}}},
    "metadata": {"type": "object", "additionalProperties": I},
    "duplicate_demo": {"type": "object", "properties": {"tag": S}},
    "schema_mismatch_array": {"type": "array", "items": I},
})
WEATHER = fn("get_weather", {"city": S, "days": I})
CONVERT = fn("convert", {"whole": N, "flag": B, "payload": {"type": "object"}, "items": {"type": "array"},
                         "empty": S})
AREA = fn("calculate_area", {"shape": S, "dimensions": {"type": "object"}, "precision": I})
TYPES = fn("types", {
    "int_first": {"type": ["integer", "string"]}, "str_first": {"type": ["string", "integer"]},
    "choice": {"anyOf": [I, S]}, "fallback": {"oneOf": [{"type": "mystery"}]},
    "i": {"type": "int"}, "d": {"type": "double"}, "b": {"type": "bool"}, "o": {"type": "dict"},
    "l": {"type": "list"}, "e": {"enum": ["a", "b"]}, "arr": {"items": I}, "obj": {"properties": {"x": I}},
    "n": N, "count": I, "tags": {"type": "array", "items": S}, "flag": B,
})
SGLANG = [
    fn("get_current_date"),
    fn("get_weather", {"city": S}, required=["city"]),
    fn("search", {"query": S, "count": I, "ratio": N, "verbose": B}),
    fn("create_event", {"title": S, "location": {"type": "object", "properties": {"city": S, "zip": I}},
                        "tags": {"type": "array", "items": S}}),
    fn("add_note", {"note": S}),
    fn("configure", {"mode": {"type": "string", "enum": ["none", "low", "high"]}, "optional": {"type": ["string", "null"]}}),
]
PLAN = fn("make_plan", {
    "start_date": S, "session_minutes": I, "score": N, "include_buffer": B, "priority": {"enum": [1, 2, 3]},
    "note": {"anyOf": [S, {"type": "null"}]}, "rest_days": {"type": "array", "items": S},
    "preferences": {"type": "object", "properties": {"algorithm": S, "retries": I}},
    "subjects": {"type": "array", "items": {"type": "object", "properties": {"name": S, "hours": N}}},
}, required=["start_date"])
COMMENTS = fn("post_review", {
    "comments": {"type": "array", "items": {"type": "object", "properties": {"path": S, "body": S}}},
    "xs": {"type": "array", "items": I}, "optional": {"type": ["string", "null"]},
    "shape": S, "extras": {"type": "object"}, "city": S, "days": I, "note": S,
})

TOOLS = {
    "order": [ORDER, WEATHER],
    "order_rust": [ORDER_RUST, WEATHER, CONVERT, AREA],
    "types": [TYPES],
    "sglang": SGLANG,
    "plan": [PLAN],
    "plan_extras": [fn("make_plan", {"extras": {"type": "object"}})],
    "plan_shadow": [fn("make_plan", {"name": S, "inner": {"type": "object", "properties": {"name": S}}})],
    "review": [COMMENTS, WEATHER],
    "ambiguous": [fn("get_weather", {"city": S}), fn("GET_WEATHER", {"city": S})],
    "read_file": [fn("read_file", {"path": S, "start_line": I, "end_line": I})],
    "bash": [fn("bash", {"command": S})],
    "weather_location": [fn("get_weather", {"location": S, "days": I})],
    "m2": [fn("f", {"html": S, "n": I})],
}

ORDER_ARGS = (el("user_id", "42") + el("urgent", "true") + el("note", "Please leave at front desk.")
              + el("shipping", el("city", "Singapore") + el("zip", "018956"))
              + el("items", el("item", el("sku", "book-001") + el("qty", "2"))
                   + el("item", el("sku", "pen-007") + el("qty", "5"))))
PLAN_ARGS = (el("start_date", "2025-11-10") + el("session_minutes", "45") + el("score", "18.5")
             + el("include_buffer", "true") + el("priority", "2") + el("note", "null")
             + el("rest_days", el("item", "Sun") + el("item", "Sat"))
             + el("preferences", el("algorithm", "SM2") + el("retries", "3"))
             + el("subjects", el("item", el("name", "Calculus") + el("hours", "30"))
                  + el("item", el("name", "History") + el("hours", "18"))))
PLAN_EXPECTED = {"start_date": "2025-11-10", "session_minutes": 45, "score": 18.5, "include_buffer": True,
                 "priority": 2, "note": None, "rest_days": ["Sun", "Sat"],
                 "preferences": {"algorithm": "SM2", "retries": 3},
                 "subjects": [{"name": "Calculus", "hours": 30}, {"name": "History", "hours": 18}]}
ORDER_EXPECTED = {"user_id": 42, "urgent": True, "note": "Please leave at front desk.",
                  "shipping": {"city": "Singapore", "zip": 18956},
                  "items": [{"sku": "book-001", "qty": 2}, {"sku": "pen-007", "qty": 5}]}


def call(_name, **arguments):
    return {"name": _name, "arguments": arguments}


def V(id, source, text, *, tools=None, state="normal", content="", reasoning="", calls=(), note=""):
    return {"id": id, "source": source, "text": text, "tools": tools, "state": state, "content": content,
            "reasoning": reasoning, "calls": list(calls), "note": note}


def _order_call():
    return block(inv("create_order", ORDER_ARGS + el("metadata", el("source", "mobile") + el("campaign", "may-launch"))
                     + el("duplicate_demo", el("tag", "a") + el("tag", "b"))))


VECTORS = [
    # -- vLLM, Python tool-parser tests ----------------------------------------------------------
    V("vllm-nested-call", "vllm-py", "I will create it.\n" + _order_call(), tools="order",
      content="I will create it.\n",
      calls=[call("create_order", **ORDER_EXPECTED, metadata={"source": "mobile", "campaign": "may-launch"},
                  duplicate_demo={"tag": ["a", "b"]})]),
    V("vllm-plain", "vllm-py", "plain response", tools="order", content="plain response"),
    V("vllm-two-invokes", "vllm-py", block(inv("create_order", el("user_id", "1")), inv("create_order", el("user_id", "2"))),
      tools="order", calls=[call("create_order", user_id=1), call("create_order", user_id=2)]),
    V("vllm-partial-start-flushed", "vllm-py", f"plain {NS}<tool_ca", tools="order", content=f"plain {NS}<tool_ca"),
    V("vllm-second-invoke-truncated", "vllm-py",
      f'plain {START}\n' + inv("create_order", el("user_id", "1")) + f'\n{NS}<invoke name="create_order">{NS}<user_id>2',
      tools="order",
      content=f'plain {START}\n' + inv("create_order", el("user_id", "1")) + f'\n{NS}<invoke name="create_order">{NS}<user_id>2',
      note="vLLM returns the first call and the cut-off invoke as content; a cut-off block is all content here"),
    V("vllm-parse-error-then-text", "vllm-py", f"{START}\n{NS}</user_id> after error", tools="order",
      content=f"{START}\n{NS}</user_id> after error",
      note="vLLM drops the start marker from the text it returns; we return the block as written"),
    V("vllm-reason-block", "vllm-py", "<mm:think>plan</mm:think>answer", reasoning="plan", content="answer"),
    V("vllm-reason-none", "vllm-py", "plain answer", content="plain answer"),
    V("vllm-reason-leading-end", "vllm-py", "</mm:think>answer", content="answer"),
    V("vllm-reason-inner-end-is-content", "vllm-py", "XXX</mm:think>YYY", content="XXX</mm:think>YYY"),
    V("vllm-reason-enabled", "vllm-py", "plan</mm:think>answer", state="reasoning", reasoning="plan", content="answer"),
    V("vllm-reason-open", "vllm-py", "<mm:think>still thinking", reasoning="still thinking"),
    V("vllm-reason-enabled-split", "vllm-py", "Reasoning content</mm:think>content", state="reasoning",
      reasoning="Reasoning content", content="content"),
    # -- vLLM, Rust parser tests -----------------------------------------------------------------
    V("rust-no-call", "vllm-rust", "Hello, world!", tools="order_rust", content="Hello, world!"),
    V("rust-single", "vllm-rust", block(inv("get_weather", el("city", "Seattle") + el("days", "5"))),
      tools="order_rust", calls=[call("get_weather", city="Seattle", days=5)]),
    V("rust-trailing-text", "vllm-rust",
      "Let me check. " + block(inv("get_weather", el("city", "Seattle"))) + " This trailing text is ignored.",
      tools="order_rust", content="Let me check.  This trailing text is ignored.",
      calls=[call("get_weather", city="Seattle")], note="vLLM drops text after the block; it is content here"),
    V("rust-two-invokes", "vllm-rust",
      block(inv("get_weather", el("city", "Seattle")), inv("get_weather", el("city", "NYC"))),
      tools="order_rust", calls=[call("get_weather", city="Seattle"), call("get_weather", city="NYC")]),
    V("rust-junk-in-invoke", "vllm-rust",
      block(inv("get_weather", el("city", "Seattle") + "I need to use the city above." + el("days", "5"))),
      tools="order_rust", calls=[call("get_weather", city="Seattle", days=5)],
      note="vLLM drops the arguments after the junk; we keep them"),
    V("rust-convert-types", "vllm-rust",
      block(inv("convert", el("whole", "5.0") + el("flag", "true") + el("payload", '{"nested":true}')
                + el("items", "[1,2]") + el("empty", "42"))),
      tools="order_rust", calls=[call("convert", whole=5.0, flag=True, payload={"nested": True}, items=[1, 2], empty="42")]),
    V("rust-nested", "vllm-rust",
      block(inv("create_order", ORDER_ARGS + el("metadata", el("score", "42") + el("rank", "7"))
                + el("duplicate_demo", el("tag", "a") + el("tag", "b"))
                + el("schema_mismatch_array", el("x", "1") + el("x", "2"))
                + el("unknown_struct", el("a", "1") + el("a", "2")))),
      tools="order_rust",
      calls=[call("create_order", **ORDER_EXPECTED, metadata={"score": 42, "rank": 7}, duplicate_demo={"tag": ["a", "b"]},
                  schema_mismatch_array=[1, 2], unknown_struct={"a": ["1", "2"]})]),
    V("rust-multiline-leaf", "vllm-rust",
      block(inv("calculate_area", el("shape", "\nrectangle\n") + el("dimensions", '{"width":10,"height":20}')
                + el("precision", "2"))),
      tools="order_rust",
      calls=[call("calculate_area", shape="rectangle", dimensions={"width": 10, "height": 20}, precision=2)],
      note="vLLM's Rust parser keeps the newlines; its Python parser and this package trim them"),
    V("rust-invoke-open-at-end", "vllm-rust", f'{START}{NS}<invoke name="get_weather">', tools="order_rust",
      content=f'{START}{NS}<invoke name="get_weather">', note="vLLM emits nothing for it; we return the text"),
    V("rust-text-after-block", "vllm-rust", block(inv("get_weather", el("city", "Seattle"))) + " ignored",
      tools="order_rust", content=" ignored", calls=[call("get_weather", city="Seattle")]),
    V("rust-bare-start", "vllm-rust", START, tools="order_rust", content=START,
      note="a block with no call comes back as written"),
    V("rust-invoke-whitespace-tail", "vllm-rust", f"{START}\n" + inv("get_weather", el("city", "Seattle")) + "\n  \n",
      tools="order_rust", calls=[call("get_weather", city="Seattle")]),
    V("rust-partial-end-marker", "vllm-rust", f"{START}\n" + inv("get_weather", el("city", "Seattle")) + "\n" + END[:3],
      tools="order_rust", calls=[call("get_weather", city="Seattle")]),
    V("rust-malformed-block", "vllm-rust", f"{START}{NS}<bad>{END}", tools="order_rust", content=f"{START}{NS}<bad>{END}"),
    V("rust-mixed-text", "vllm-rust",
      block(inv("convert", el("payload", "text before " + el("child", "value") + " text after"))),
      tools="order_rust", calls=[call("convert", payload={"child": "value", "$text": "text before  text after"})]),
    V("rust-mixed-text-collision", "vllm-rust",
      block(inv("convert", el("payload", "text" + el("$text", "child text") + el("child", "value")))),
      tools="order_rust", calls=[call("convert", payload={"$text": "child text", "$$text": "text", "child": "value"})]),
    V("rust-union-order", "vllm-rust", block(inv("types", el("int_first", "42") + el("str_first", "42"))),
      tools="types", calls=[call("types", int_first=42, str_first="42")]),
    V("rust-composite", "vllm-rust", block(inv("types", el("choice", "42") + el("fallback", '{"x":1}'))),
      tools="types", calls=[call("types", choice=42, fallback={"x": 1})]),
    V("rust-aliases", "vllm-rust",
      block(inv("types", el("i", "7") + el("d", "7.5") + el("b", "true") + el("o", '{"x":1}') + el("l", "[1]"))),
      tools="types", calls=[call("types", i=7, d=7.5, b=True, o={"x": 1}, l=[1])]),
    V("rust-shape-without-type", "vllm-rust", block(inv("types", el("e", "a") + el("arr", "[1,2]") + el("obj", '{"x":1}'))),
      tools="types", calls=[call("types", e="a", arr=[1, 2], obj={"x": 1})]),
    V("rust-number-spellings", "vllm-rust", block(inv("types", el("n", "5.")) + inv("types", el("n", "+1"))),
      tools="types", calls=[call("types", n=5.0), call("types", n=1)]),
    # -- SGLang detector tests -------------------------------------------------------------------
    V("sglang-single", "sglang", block(inv("get_weather", el("city", "Beijing")), sep=""), tools="sglang",
      calls=[call("get_weather", city="Beijing")]),
    V("sglang-zero-arg", "sglang", block(inv("get_current_date"), sep=""), tools="sglang", calls=[call("get_current_date")]),
    V("sglang-two-blocks", "sglang",
      block(inv("get_weather", el("city", "Beijing")), sep="") + block(inv("get_weather", el("city", "Tokyo")), sep=""),
      tools="sglang", calls=[call("get_weather", city="Beijing"), call("get_weather", city="Tokyo")]),
    V("sglang-two-invokes", "sglang",
      block(inv("get_weather", el("city", "Beijing")), inv("get_weather", el("city", "Tokyo")), sep=""),
      tools="sglang", calls=[call("get_weather", city="Beijing"), call("get_weather", city="Tokyo")]),
    V("sglang-content-before", "sglang",
      "Let me check the weather." + block(inv("get_weather", el("city", "Paris")), sep=""),
      tools="sglang", content="Let me check the weather.", calls=[call("get_weather", city="Paris")]),
    V("sglang-typed", "sglang",
      block(inv("search", el("query", "pizza") + el("count", "7") + el("ratio", "0.5") + el("verbose", "true")), sep=""),
      tools="sglang", calls=[call("search", query="pizza", count=7, ratio=0.5, verbose=True)]),
    V("sglang-nested", "sglang",
      block(inv("create_event", el("title", "Standup") + el("location", el("city", "NYC") + el("zip", "10001"))
                + el("tags", el("item", "red") + el("item", "blue"))), sep=""),
      tools="sglang",
      calls=[call("create_event", title="Standup", location={"city": "NYC", "zip": 10001}, tags=["red", "blue"])]),
    V("sglang-special-chars", "sglang",
      block(inv("add_note", el("note", 'a "quoted" word with \\ backslash and\nnewline')), sep=""),
      tools="sglang", calls=[call("add_note", note='a "quoted" word with \\ backslash and\nnewline')]),
    *[V(f"sglang-enum-{v}-stays-string", "sglang", block(inv("configure", el("mode", v)), sep=""), tools="sglang",
        calls=[call("configure", mode=v)]) for v in ("none", "nil", "null")],
    V("sglang-nullable-null", "sglang", block(inv("configure", el("optional", "null")), sep=""), tools="sglang",
      calls=[call("configure", optional=None)]),
    V("sglang-nullable-none", "sglang", block(inv("configure", el("optional", "none")), sep=""), tools="sglang",
      calls=[call("configure", optional="none")]),
    V("sglang-truncated", "sglang", f'{START}{NS}<invoke name="get_weather">{NS}<city>Beijing', tools="sglang",
      content=f'{START}{NS}<invoke name="get_weather">{NS}<city>Beijing'),
    V("sglang-wrong-closing-tag", "sglang",
      f'{START}{NS}<invoke name="get_weather">{NS}<city>Beijing{NS}</wrong>{NS}</invoke>{END}', tools="sglang",
      calls=[call("get_weather", city="Beijing")]),
    V("sglang-no-call", "sglang", "The weather in Beijing is sunny.", tools="sglang",
      content="The weather in Beijing is sunny."),
    V("sglang-name-case", "sglang", block(inv("Get_Weather", el("city", "Oslo"))), tools="sglang",
      calls=[call("get_weather", city="Oslo")]),
    V("sglang-invoke-single-quotes", "sglang",
      f"{START}{NS}<invoke name='get_weather'>" + el("city", "Oslo") + f"{NS}</invoke>{END}",
      tools="sglang", calls=[call("get_weather", city="Oslo")]),
    V("sglang-invoke-unquoted-spaced", "sglang", f"{START}{NS}<invoke  name = get_weather >" + el("city", "Oslo")
      + f"{NS}</invoke>{END}", tools="sglang", calls=[call("get_weather", city="Oslo")]),
    V("sglang-finish-releases-bracket", "sglang", "[SILENCE]", content="[SILENCE]"),
    V("sglang-finish-releases-angle", "sglang", "if a <", content="if a <"),
    V("sglang-finish-releases-ns-prefix", "sglang", "text ]<]mini", tools="sglang", content="text ]<]mini"),
    # -- rtp-llm tests ---------------------------------------------------------------------------
    V("rtp-nested-types", "rtp-llm", "Here you go." + START + "\n" + inv("make_plan", PLAN_ARGS) + "\n" + END, tools="plan",
      content="Here you go.", calls=[call("make_plan", **PLAN_EXPECTED)]),
    V("rtp-parallel", "rtp-llm",
      START + "\n" + inv("make_plan", el("start_date", "2025-01-01")) + "\n"
      + inv("make_plan", el("start_date", "2025-02-02")) + "\n" + END, tools="plan",
      calls=[call("make_plan", start_date="2025-01-01"), call("make_plan", start_date="2025-02-02")]),
    V("rtp-angle-brackets", "rtp-llm", block(inv("make_plan", el("start_date", "a < b > c"))), tools="plan",
      calls=[call("make_plan", start_date="a < b > c")]),
    V("rtp-unknown-tool", "rtp-llm", block(inv("no_such_tool", el("start_date", "2025-11-10"))), tools="plan",
      calls=[call("no_such_tool", start_date="2025-11-10")],
      note="rtp-llm drops the call; we return it as written and the client answers 'no such tool'"),
    V("rtp-no-call", "rtp-llm", "just prose", tools="plan", content="just prose"),
    V("rtp-partial-begin-token", "rtp-llm", "done]" + block(inv("make_plan", el("start_date", "2025-11-10"))), tools="plan",
      content="done]", calls=[call("make_plan", start_date="2025-11-10")]),
    V("rtp-dropped-array-close", "rtp-llm", block(inv("make_plan", PLAN_ARGS.replace(NS + "</rest_days>", "", 1))),
      tools="plan", calls=[call("make_plan", **PLAN_EXPECTED)]),
    V("rtp-dropped-object-close", "rtp-llm", block(inv("make_plan", PLAN_ARGS.replace(NS + "</preferences>", "", 1))),
      tools="plan", calls=[call("make_plan", **PLAN_EXPECTED)]),
    V("rtp-stray-close", "rtp-llm",
      block(inv("make_plan", PLAN_ARGS.replace(NS + "<score>", NS + "</bogus>" + NS + "<score>", 1))),
      tools="plan", calls=[call("make_plan", **PLAN_EXPECTED)]),
    V("rtp-schemaless-object", "rtp-llm", block(inv("make_plan", el("extras", el("whatever", "1") + el("other", "2")))),
      tools="plan_extras", calls=[call("make_plan", extras={"whatever": "1", "other": "2"})]),
    V("rtp-shadowed-key", "rtp-llm", block(inv("make_plan", el("name", "outer") + el("inner", el("name", "nested")))),
      tools="plan_shadow", calls=[call("make_plan", name="outer", inner={"name": "nested"})]),
    V("rtp-streaming-prefix", "rtp-llm", "thinking out loud" + block(inv("make_plan", el("start_date", "2025-11-10"))),
      tools="plan", content="thinking out loud", calls=[call("make_plan", start_date="2025-11-10")]),
    V("rtp-reason-split", "rtp-llm", "<mm:think>weighing options</mm:think>the answer",
      reasoning="weighing options", content="the answer"),
    V("rtp-reason-bare-end", "rtp-llm", "</mm:think>the answer", content="the answer"),
    V("rtp-reason-unterminated", "rtp-llm", "<mm:think>still working on it", reasoning="still working on it"),
    V("rtp-reason-steps", "rtp-llm", "<mm:think>step one step two</mm:think>final words",
      reasoning="step one step two", content="final words"),
    # -- real model outputs ----------------------------------------------------------------------
    V("real-mlx-lm-1416", "real",
      f'I\'ll check the time.{START}\n{NS}<invoke name="get_weather">\n{NS}<location>Paris{NS}</location>\n'
      f'{NS}<days>3{NS}</days>\n{NS}</invoke>\n{END}', tools="weather_location",
      content="I'll check the time.", calls=[call("get_weather", location="Paris", days=3)]),
    V("real-llama-cpp-24523", "real",
      f'{START}\n{NS}<invoke name="bash">{NS}<command>date{NS}</command>{NS}</invoke>\n{END}', tools="bash",
      calls=[call("bash", command="date")]),
    V("real-minimax-m3-31", "real",
      "Let me read that part to confirm.\nI need to continue with Step 1. Let me read the run_one function to find "
      f'where to add the state initialization Tuner.{START}\n{NS}<invoke name="read_file">{NS}<path>C:\\encher\\src\\main.rs'
      f'{NS}</path>{NS}<start_line>130{NS}</start_line>{NS}<end_line>165{NS}</end_line>{NS}</invoke>\n{END}',
      tools="read_file",
      content="Let me read that part to confirm.\nI need to continue with Step 1. Let me read the run_one function to "
              "find where to add the state initialization Tuner.",
      calls=[call("read_file", path="C:\\encher\\src\\main.rs", start_line=130, end_line=165)]),
    V("real-minimax-m3-31-thinking", "real",
      f'<mm:think>The user wants line 130.</mm:think>{START}\n{NS}<invoke name="read_file">{NS}<path>src/main.rs'
      f'{NS}</path>{NS}</invoke>\n{END}', tools="read_file", reasoning="The user wants line 130.",
      calls=[call("read_file", path="src/main.rs")]),
    # -- issue #15 -------------------------------------------------------------------------------
    V("issue-wrong-closing-tag", "issue-15", block(inv("get_weather", f"{NS}<city>Beijing{NS}</wrong>")), tools="sglang",
      calls=[call("get_weather", city="Beijing")]),
    V("issue-repeated-siblings", "issue-15", block(inv("f", el("tag", "a") + el("tag", "b"))), tools=None,
      calls=[call("f", tag=["a", "b"])]),
    V("issue-array-of-comments", "issue-15",
      block(inv("post_review", el("comments", el("comment", el("path", "a.py") + el("body", "typo"))
                                  + el("comment", el("path", "b.py") + el("body", "nit"))))),
      tools="review",
      calls=[call("post_review", comments=[{"path": "a.py", "body": "typo"}, {"path": "b.py", "body": "nit"}])]),
    V("issue-array-of-x", "issue-15", block(inv("post_review", el("xs", el("x", "1") + el("x", "2")))), tools="review",
      calls=[call("post_review", xs=[1, 2])]),
    V("issue-none-stays-string", "issue-15", block(inv("post_review", el("optional", "none"))), tools="review",
      calls=[call("post_review", optional="none")]),
    V("issue-leaf-newlines", "issue-15", block(inv("post_review", el("shape", "\nrectangle\n"))), tools="review",
      calls=[call("post_review", shape="rectangle")]),
    V("issue-trailing-bracket", "issue-15", "[SILENCE]", tools="review", content="[SILENCE]"),
    V("issue-trailing-angle", "issue-15", "if a <", tools="review", content="if a <"),
    V("issue-inner-think-end", "issue-15", "XXX</mm:think>YYY", tools="review", content="XXX</mm:think>YYY"),
    V("issue-truncated-named", "issue-15",
      f'Checking.{START}\n{NS}<invoke name="get_weather">{NS}<city>Oslo{NS}</city>{NS}<days>1', tools="review",
      content=f'Checking.{START}\n{NS}<invoke name="get_weather">{NS}<city>Oslo{NS}</city>{NS}<days>1'),
    V("issue-truncated-in-name", "issue-15", f'Checking.{START}\n{NS}<invoke name="get_wea', tools="review",
      content=f'Checking.{START}\n{NS}<invoke name="get_wea'),
    V("issue-dropped-rest-days", "issue-15",
      block(inv("make_plan", el("start_date", "d") + f"{NS}<rest_days>" + el("item", "Sun")
                + el("preferences", el("retries", "3")))),
      tools="plan", calls=[call("make_plan", start_date="d", rest_days=["Sun"], preferences={"retries": 3})]),
    # -- our rules where the peers disagree ------------------------------------------------------
    V("rule-text-after-block", "rule", "A" + block(inv("get_weather", el("city", "Oslo"))) + "B", tools="review",
      content="AB", calls=[call("get_weather", city="Oslo")]),
    V("rule-unparsed-block-in-place", "rule", f"A{START}junk{END}B", tools="review", content=f"A{START}junk{END}B"),
    V("rule-unknown-tool-strings", "rule", block(inv("lookup", el("n", "5") + el("flag", "true"))), tools="review",
      calls=[call("lookup", n="5", flag="true")]),
    V("rule-ambiguous-case-kept", "rule", block(inv("Get_Weather", el("city", "Oslo"))), tools="ambiguous",
      calls=[call("Get_Weather", city="Oslo")]),
    V("rule-schemaless-values-are-text", "rule", block(inv("post_review", el("extras", el("n", "1") + el("ok", "true")))),
      tools="review", calls=[call("post_review", extras={"n": "1", "ok": "true"})]),
    V("rule-no-tools-guess-json", "rule", block(inv("f", el("n", "1") + el("ok", "true") + el("s", "x y"))), tools=None,
      calls=[call("f", n=1, ok=True, s="x y")]),
    V("rule-mixed-text-string-param", "rule", block(inv("post_review", el("note", "see " + el("b", "bold") + " here"))),
      tools="review", calls=[call("post_review", note="see <b>bold</b> here")]),
    V("rule-m2-html-in-string", "rule",
      START + '<invoke name="f">\n<parameter name="html"><b>x</b> y</parameter>\n'
      '<parameter name="n">3</parameter>\n</invoke>'
      + END, tools="m2", calls=[call("f", html="<b>x</b> y", n=3)]),
    V("rule-missing-invoke-close", "rule",
      START + f'{NS}<invoke name="get_weather">' + el("city", "A")
      + f'{NS}<invoke name="get_weather">' + el("city", "B") + END,
      tools="review", calls=[call("get_weather", city="A"), call("get_weather", city="B")]),
    V("rule-bare-invoke-tags", "rule", START + '<invoke name="get_weather">' + el("city", "Oslo") + "</invoke>" + END,
      tools="review", calls=[call("get_weather", city="Oslo")]),
    V("rule-bare-invoke-close-inside-value", "rule", block(inv("post_review", el("note", "x</invoke>y"))), tools="review",
      calls=[call("post_review", note="x</invoke>y")]),
    V("rule-tag-like-value", "rule", block(inv("get_weather", el("city", "Paris <b>Île</b>"))), tools="review",
      calls=[call("get_weather", city="Paris <b>Île</b>")]),
    V("rule-dropped-leaf-close", "rule", block(inv("get_weather", f"{NS}<city>Paris" + el("days", "3"))), tools="review",
      calls=[call("get_weather", city="Paris", days=3)]),
    V("rule-dropped-item-close", "rule", block(inv("make_plan", el("rest_days", f"{NS}<item>Sun" + el("item", "Sat")))),
      tools="plan", calls=[call("make_plan", rest_days=["Sun", "Sat"])]),
    V("rule-free-form-keeps-keys", "rule",
      block(inv("post_review", f"{NS}<extras>" + el("k", "1") + el("city", "Paris"))), tools="review",
      calls=[call("post_review", extras={"k": "1", "city": "Paris"})]),
    V("rule-integer-junk", "rule", block(inv("post_review", el("days", "abc"))), tools="review",
      calls=[call("post_review", days="abc")]),
    V("rule-integer-null", "rule", block(inv("post_review", el("days", "null"))), tools="review",
      calls=[call("post_review", days=None)]),
    V("rule-string-null", "rule", block(inv("post_review", el("note", "null"))), tools="review",
      calls=[call("post_review", note="null")]),
    V("rule-array-single-leaf", "rule", block(inv("types", el("tags", "red"))), tools="types",
      calls=[call("types", tags=["red"])]),
    V("rule-array-json", "rule", block(inv("types", el("tags", '["a", "b"]'))), tools="types",
      calls=[call("types", tags=["a", "b"])]),
    V("rule-array-empty", "rule", block(inv("types", el("tags"))), tools="types", calls=[call("types", tags=[])]),
    V("rule-repeated-array-param", "rule", block(inv("types", el("tags", "a") + el("tags", "b"))), tools="types",
      calls=[call("types", tags=["a", "b"])]),
    V("rule-enum-number", "rule", block(inv("make_plan", el("priority", "3"))), tools="plan",
      calls=[call("make_plan", priority=3)]),
    V("rule-bool-spellings", "rule", block(inv("types", el("flag", "False")) + inv("types", el("flag", "1"))), tools="types",
      calls=[call("types", flag=False), call("types", flag=True)]),
    V("rule-no-entity-decoding", "rule", block(inv("get_weather", el("city", "a &lt; b"))), tools="review",
      calls=[call("get_weather", city="a &lt; b")]),
    V("rule-unicode", "rule", block(inv("get_weather", el("city", "杭州"))), tools="review",
      calls=[call("get_weather", city="杭州")]),
    V("rule-file-content-keeps-last-newline", "rule",
      block(inv("post_review", el("note", "line 1\nline 2\n") + el("shape", "\r\nsquare\r\n"))), tools="review",
      calls=[call("post_review", note="line 1\nline 2\n", shape="square")]),
    V("rule-spaces-kept-in-strings", "rule", block(inv("get_weather", el("city", " Paris ") + el("days", " 3 "))),
      tools="review", calls=[call("get_weather", city=" Paris ", days=3)]),
    V("rule-call-inside-reasoning", "rule", "plan" + block(inv("get_weather", el("city", "Oslo"))) + "Done.",
      state="reasoning", tools="review", reasoning="plan", content="Done.", calls=[call("get_weather", city="Oslo")]),
    V("rule-two-blocks-with-text", "rule",
      "A" + block(inv("get_weather", el("city", "X"))) + "B" + block(inv("get_weather", el("city", "Y"))), tools="review",
      content="AB", calls=[call("get_weather", city="X"), call("get_weather", city="Y")]),
    V("rule-reasoning-ends-in-angle", "rule", "a <", state="reasoning", reasoning="a <"),
    V("rule-leading-think-end-then-call", "rule", "</mm:think>" + block(inv("get_weather", el("city", "Oslo"))),
      tools="review", calls=[call("get_weather", city="Oslo")]),
    V("rule-think-end-prefix-is-text", "rule", "</mm:th", content="</mm:th"),
]
