"""`minimax-m3 server`: mlx-lm's OpenAI-compatible server running MiniMax-M3.

A thin layer over `mlx_lm.server` (its HTTP handler, request queue, prompt cache, sampling
and streaming are used as they are); what differs:

- the model is loaded with this package's loader (every released checkpoint layout), and
  the tokenizer gets MiniMax-M3's conventions (chat_format.tokenizer.configure_tokenizer): reasoning
  in `<mm:think>`, tool calls in `]<]minimax[>[<tool_call>` blocks parsed into OpenAI
  `tool_calls` by tool_parser.py;
- the thinking mode per request, in any of the spellings vLLM, SGLang, MiniMax's and
  OpenAI's APIs use (checks.thinking_from_request); else the server's --thinking. The
  reasoning comes back as `reasoning` (mlx-lm's field) and `reasoning_content`;
- the prompt cache is mlx-lm's with a byte bound and a disk tier (prompt_cache.py), the
  reasoning a client dropped is put back, and each request logs one line (sessions.py);
- requests are checked before they are queued (checks.py: messages, roles, tools, thinking mode,
  the prompt's length against the context): a malformed one gets 400 with a message, not
  an error from deep inside generation, and every refusal's body has OpenAI's shape,
  `{"error": {"message", "type", "param", "code"}}` (mlx-lm writes `{"error": msg}`);
- a reply stops at the context limit with finish_reason "length" (max_tokens is capped
  to the room the prompt leaves);
- a request's `model` names the served model or is a 404 (routing.py); /v1/models lists its names;
- limits on the body, the images and the queue (limits.py);
- chat messages may hold images (`image_url` parts; where they may come from: media.py)
  when the model has a vision tower and the `vision` extra is installed:
  transformers' MiniMax-M3 processor expands each (multimodal.ServerImages) and the tower
  fills the placeholders (Model.embed_inputs); under mlx.launch too;
- concurrent requests are batched by mlx-lm's BatchGenerator (continuous batching: new
  prompts are prefilled between decode steps, rows join and leave as requests come and
  end; prompt-cache reuse per request as mlx-lm does it; a request with images is served
  on its own, as mlx-lm serves it). The sparse layers' caches merge into
  model/batch_cache.BatchSparseCache, which keeps every sequence at its own positions so
  that its block selection is the one it would have alone; `--decode-concurrency`
  (mlx-lm's flag) bounds the batch, and 1 serves one request at a time on the
  single-request path. Under `--kv-bits` every cache is quantized from its first token
  (batched or not; mlx-lm's server serves one at a time under --kv-bits), so
  `--quantized-kv-start` is not a server option;
- the generation thread frees its MLX streams when it ends (else MLX 0.32 on CPU may
  abort at exit);
- the end of a reply is not lost: mlx-lm's handler drops the text it holds back as a
  possible marker start (a final `]` or `<`) when the model stops, and a tool-call block
  that holds no call (e.g. cut off by max_tokens before the tool's name) comes back as
  content, markers included, instead of vanishing (see _ReplyTracker).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import logging
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from typing import List, Optional
from urllib.parse import unquote

import mlx.core as mx
from mlx_lm.generate import TextStateMachine
from mlx_lm.server import (
    APIHandler,
    ModelProvider,
    ResponseGenerator,
    get_system_fingerprint,
    process_message_content,
)
from mlx_lm.utils import _parse_size

from ..arg_types import (ArgumentParser, json_object, non_negative_float, non_negative_int, number, port,
                         positive_int, probability)
from ..chat_format.markers import THINKING_MODES
from ..chat_format.tokenizer import BareThinkEnd, ThinkingModeError
from ..chat_format.tool_parser import parse_tool_call, parse_tool_calls, unparsed_block
from ..loading import check_folder, load, resolve_path
from . import liveness, sessions, shutdown as stopping
from .access import AccessControl, add_arguments as add_access_arguments, settle as settle_access
from .checks import check_messages, check_stop, check_tools, thinking_from_request
from .cluster import ClusterError, ClusterFollowing, MediaError
from .generate import (
    ContextLimitError, add_cache_args, add_expert_memory_arg, apply_cache_args, check_cache_args, reply_room,
)
from .http_errors import OpenAIErrorBodies, RequestError
from .limits import (Admission, RequestLimits, add_arguments as add_limit_arguments, check_image_count,
                     shorten_log_lines)
from .media import add_arguments as add_media_arguments, image_parts, inline_images
from .multimodal import server_images
from .routing import ServedModels, add_arguments as add_routing_arguments




class MiniMaxModelProvider(ModelProvider):
    """mlx-lm's model provider with this package's loader and MiniMax-M3's tokenizer setup.

    It serves the model it loaded and only that one (routing.py): every name of it maps to
    the loaded model, and any other name is refused, never loaded.
    """

    def __init__(self, cli_args, prompt_cache=None):
        super().__init__(cli_args)
        self.prompt_cache = prompt_cache  # sessions.make_prompt_cache: bound to each model loaded
        path = resolve_path(cli_args.model)  # a wrong path fails here, not in the generation thread
        check_folder(path, cli_args.expert_memory, group=mx.distributed.init(), mode=cli_args.parallel)
        self.served = ServedModels(cli_args.model, cli_args.served_model_name)

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        self.served.check(model_path)  # mlx-lm would load whatever a request names
        return super().load("default_model", adapter_path, draft_model_path)

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        if adapter_path is not None or draft_model_path is not None:
            raise ValueError("adapters and draft models are not supported for MiniMax-M3")
        path = resolve_path(model_path)  # fails before the current model is dropped

        self.reset()
        gc.collect()
        mx.clear_cache()
        tokenizer_config = {"chat_template": self.cli_args.chat_template} if self.cli_args.chat_template else None
        # Under mlx.launch each rank loads its part, split as --parallel says.
        group = mx.distributed.init() if self.is_distributed else None
        model, tokenizer = load(path, group=group, mode=self.cli_args.parallel, tokenizer_config=tokenizer_config,
                                thinking=self.cli_args.thinking, expert_memory=self.cli_args.expert_memory)

        apply_cache_args(model, self.cli_args)  # --index-bits on the caches mlx-lm makes
        if self.prompt_cache is not None:
            sessions.attach(self.prompt_cache, model, path, self.cli_args, group)
        self.model_key = (model_path, adapter_path, draft_model_path)
        self.model = model
        self.tokenizer = tokenizer
        self.processor = server_images(model, path, tokenizer)  # None: text only (see checks.check_messages)
        self.draft_model = None
        # mlx-lm batches requests (BatchGenerator) when set; else its single-request path.
        # Under mlx.launch every rank runs the same batch steps: mlx-lm shares each request,
        # the number of steps per round and the rows removed (cluster.py).
        self.is_batchable = self.cli_args.decode_concurrency > 1


class MiniMaxResponseGenerator(ClusterFollowing, ResponseGenerator):
    """mlx-lm's generation thread, which also frees its MLX streams when it ends, and
    which reports whether the served model loaded (`wait_loaded`).

    MLX 0.32 (CPU) can abort the process at exit ("terminate called without an active
    exception") when a thread that made a stream has ended without destroying it.
    """

    def __init__(self, *args, **kwargs):
        self.loaded = threading.Event()
        self.load_error: Optional[BaseException] = None
        super().__init__(*args, **kwargs)

    def wait_loaded(self) -> None:
        """Block until the served model is loaded (the request checks need its tokenizer
        and context); raise the loader's error if it failed."""
        self.loaded.wait()
        if self.load_error is not None:
            raise self.load_error

    def _generate(self):
        try:  # mlx-lm's thread would log a traceback and serve nothing: report it instead
            self.model_provider.load_default()
        except Exception as e:
            self.load_error = e
            self._generation_failed = True
            return
        finally:
            self.loaded.set()
        super()._generate()  # finds the model loaded

    def _log_cache_stats(self):
        # mlx-lm logs four lines per request; the handler's one line (sessions.py) says more.
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            super()._log_cache_stats()

    def _is_batchable(self, args):
        # mlx-lm also excludes --kv-bits: its caches cannot be batched once quantized; ours
        # can (prompt_cache.TieredPromptCache). A seeded request still runs alone, as mlx-lm runs it.
        return self.model_provider.is_batchable and args.seed is None

    def _run_generate(self):
        try:
            super()._run_generate()
        finally:
            mx.synchronize()
            mx.clear_streams()


class _ReplyTracker:
    """One reply as mlx-lm's handler sees it, to put right what that handler loses.

    The handler (mlx_lm.server.APIHandler.handle_completion) runs the reply through a text
    state machine that holds back text which could start a marker. When the model stops
    (EOS) it discards that held text and the last detokenizer segment, so a reply ending in
    `]` or `<` loses it; at max_tokens it flushes them. SGLang's rule is ours: finish
    releases the held text. Its tool formatter also drops a block the parser finds no call
    in. This tracker replays the same state machine on the same text, one step ahead of the
    handler: it hands the handler an EOS stop as "length" (split and flush) and keeps the
    real reason, and it keeps the content with unparsed blocks in place, which the handler's
    generate_response then sends instead of its own text.
    """

    def __init__(self, ctx, tokenizer, tools, batched=False):
        self.state = ctx.text_sm.make_state(ctx.initial_state)
        self.batched, self.decode = batched, tokenizer.decode
        self.parser, self.tools = ctx.tool_parser, tools
        self.bare_think_end = BareThinkEnd.for_reply(tokenizer, ctx.initial_state)
        self.eos_ids = set(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.block: Optional[List[str]] = None  # text of the open tool-call block
        self.unsent: List[str] = []  # content the handler has not sent yet, unparsed blocks included
        self.reasoning: List[str] = []
        self.content_sent: List[str] = []  # what the client got as content
        self.calls: List[dict] = []
        self.finish_reason: Optional[str] = None
        self.stopped_at_eos = False
        self.cut_off = False  # the reply ended inside a tool-call block

    def parse_block(self, text: str, tools=None):
        """The handler's tool parser: it hands a block cut off by max_tokens over as if it
        were complete, and a cut-off block holds no call (tool_parser's rule)."""
        return parse_tool_call(text, tools, complete=not self.cut_off)

    def _end_block(self, closed: bool) -> None:
        body = "".join(self.block)
        self.block = None
        if not closed and self.parser is parse_tool_call:
            # Cut off by max_tokens: calls only if no invoke was cut off (tool_parser's rule).
            found = parse_tool_calls(body, self.tools, complete=False)
            self.calls += found
            if not found:
                self.unsent.append(unparsed_block(body, closed))
            return
        try:
            parsed = self.parser(body, self.tools)
            self.calls += parsed if isinstance(parsed, list) else [parsed]
        except (ValueError, json.JSONDecodeError):
            self.unsent.append(unparsed_block(body, closed))

    def follow(self, responses):
        for gen in responses:
            final = gen.finish_reason is not None
            text = gen.text
            if final and self.batched and gen.finish_reason == "stop" and gen.token not in self.eos_ids:
                # A stop word: mlx-lm's batched path leaves its last token out of the text (its
                # single path does not); whole, the state machine strips it rather than flush its start.
                text += self.decode([gen.token])
            text = self.bare_think_end(text, final)
            self.state, segments = TextStateMachine.split(self.state, text)
            if final:
                self.state, held, state = TextStateMachine.flush(self.state)
                segments.append((state, held))
            for state, piece in segments:
                if self.block is not None and state != "tool":
                    self._end_block(closed=True)
                if state == "tool":
                    self.block = self.block if self.block is not None else []
                    self.block.append(piece)
                elif state == "normal":
                    self.unsent.append(piece)
                elif state == "reasoning":
                    self.reasoning.append(piece)
            if final and self.block is not None:
                self.cut_off = True
                self._end_block(closed=False)
            if final:
                self.finish_reason = gen.finish_reason
            changes = {"text": text}
            if gen.finish_reason == "stop" and gen.token in self.eos_ids:
                self.stopped_at_eos = True
                changes["finish_reason"] = "length"  # the handler then splits and flushes
            yield dataclasses.replace(gen, **changes)

    def take_content(self) -> str:
        out = "".join(self.unsent)
        self.unsent.clear()
        self.content_sent.append(out)
        return out


class _TrackedGenerator:
    """The shared response generator as one request's handler sees it: replies tracked."""

    def __init__(self, shared: ResponseGenerator, handler: "MiniMaxAPIHandler"):
        self._shared, self._handler = shared, handler

    def __getattr__(self, name):
        return getattr(self._shared, name)

    def generate(self, request, generation_args, progress_callback=None):
        try:
            ctx, responses = self._shared.generate(request, generation_args, progress_callback=progress_callback)
        except (ClusterError, MediaError) as e:  # mlx-lm answers 404 to every failure here
            self._handler._error = e  # see send_response
            raise
        tracker = _ReplyTracker(ctx, self._shared.model_provider.tokenizer, getattr(request, "tools", None),
                                batched=self._shared._is_batchable(generation_args))
        if ctx.tool_parser is parse_tool_call:
            ctx.tool_parser = tracker.parse_block  # this request's context only
        self._handler._reply, self._handler._ctx = tracker, ctx
        return ctx, self._counted(tracker.follow(responses))

    def _counted(self, responses):
        for r in responses:
            self._handler._session_token()
            yield r


class MiniMaxAPIHandler(sessions.SessionHandling, AccessControl, RequestLimits, APIHandler):
    """mlx-lm's handler, plus access checks (access.py), limits (limits.py), request checks,
    the served model's names (routing.py), where images may come from (media.py), the
    thinking mode, the context limit, the session's reasoning, memory check and log line
    (sessions.py) and OpenAI-shaped errors."""

    def setup(self):
        super().setup()
        self.wfile = OpenAIErrorBodies(self, self.wfile)

    def send_response(self, code, message=None):
        error = getattr(self, "_error", None)
        if code == 404 and isinstance(error, ClusterError):
            code = 500
        elif code == 404 and isinstance(error, MediaError):
            code = 400
        elif code == 400 and isinstance(error, RequestError):
            code = error.status  # e.g. 404 for a model not served here, 503 for a cache that cannot fit
        self._status, self._body_started = code, False
        super().send_response(code, message)

    def end_headers(self):
        super().end_headers()
        self._body_started = True

    def validate_model_parameters(self) -> None:
        self._error = None
        try:
            super().validate_model_parameters()
        except ValueError as e:  # mlx-lm's names for two request fields
            raise ValueError(str(e).replace("requested_model", "model").replace("adapter ", "adapters ")) from None
        try:
            self._check_request()
        except RequestError as e:
            self._error = e
            raise
        except (TypeError, AttributeError, KeyError) as e:
            raise ValueError(f"malformed request: {type(e).__name__}: {e}") from None

    def _check_context(self, prompt_tokens: int, param: str) -> None:
        """Refuse a prompt that fills the context; cap max_tokens to the room it leaves, so
        that a reply reaching the limit ends with finish_reason "length"."""
        model = self.response_generator.model_provider.model
        try:
            room = reply_room(model, prompt_tokens)
        except ContextLimitError as e:
            raise RequestError(str(e), param=param, code="context_length_exceeded") from None
        if room is not None and self.max_tokens > room:
            self.max_tokens = room
        self._check_memory(prompt_tokens)

    def _check_request(self) -> None:
        body = self.body
        self.response_generator.model_provider.served.check(self.requested_model)
        if self.chat_template_kwargs is not None and not isinstance(self.chat_template_kwargs, dict):
            raise ValueError("chat_template_kwargs must be an object")
        if self.stream_options is not None and not isinstance(self.stream_options, dict):
            raise ValueError("stream_options must be an object")
        if not isinstance((self.stream_options or {}).get("include_usage", False), bool):
            raise ValueError("stream_options.include_usage must be true or false")
        if body.get("n", 1) != 1:
            raise ValueError(f"n must be 1 (one choice per request), got {body['n']!r}")
        for key in ("adapters", "draft_model"):  # mlx-lm options this server does not offer
            if body.get(key) is not None:
                raise ValueError(f"{key} must be left out: not supported for MiniMax-M3")
        check_stop(body.get("stop"))
        try:
            mode = thinking_from_request(body)
        except ThinkingModeError as e:
            raise ValueError(str(e)) from None
        if mode is not None:
            kwargs = dict(self.chat_template_kwargs or {})
            kwargs.pop("enable_thinking", None)
            kwargs["thinking_mode"] = mode
            self.chat_template_kwargs = kwargs
        if self.path in ("/v1/chat/completions", "/chat/completions"):
            if "messages" not in body:
                raise ValueError("the request has no messages")
            check_messages(body["messages"], self.response_generator.model_provider.processor is not None)
            check_image_count(len(image_parts(body["messages"])), self.response_generator.cli_args)
            inline_images(body["messages"], self.response_generator.cli_args)
            check_tools(body.get("tools"))
            self._restore_reasoning(body["messages"])
            ids = self._check_template(body["messages"], body.get("tools") or None)
            if ids is not None:
                self._check_context(len(ids), "messages")
        elif not isinstance(body.get("prompt"), str):
            raise ValueError("prompt must be a string")
        else:
            tokenizer = self.response_generator.model_provider.tokenizer
            if tokenizer is not None:
                self._check_context(len(tokenizer.encode(body["prompt"])), "prompt")

    def _check_template(self, messages, tools):
        """Render the prompt once here so that a conversation the template refuses is a 400;
        returns its token ids (None: the model has no chat template)."""
        tokenizer = self.response_generator.model_provider.tokenizer
        if tokenizer is None or not getattr(tokenizer, "has_chat_template", False):
            return None
        messages = copy.deepcopy(messages)
        process_message_content(messages, keep_images=self.response_generator.model_provider.processor is not None)
        kwargs = dict(self.response_generator.cli_args.chat_template_args)
        kwargs.update(self.chat_template_kwargs or {})
        try:
            return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                                 **kwargs)
        except Exception as e:  # jinja2 errors, raise_exception in the template, bad kwargs
            raise ValueError(f"the chat template refused this conversation: {e}") from None

    def handle_models_request(self):
        """The served model's names (routing.py); mlx-lm lists its Hugging Face cache instead."""
        served = self.response_generator.model_provider.served
        models = [{"id": i, "object": "model", "created": getattr(self, "created", int(time.time())),
                   "owned_by": "minimax-m3-mlx"} for i in served.ids]
        wanted = unquote(self.path[len("/v1/models"):]).strip("/")
        wanted = "/" + wanted if "/" + wanted in served.ids else wanted  # an absolute path as the id
        body = {"object": "list", "data": models}
        if wanted:
            try:
                served.check(wanted)
            except RequestError as e:
                self._error = e
                self._set_completion_headers(404)
                self.end_headers()
                self.wfile.write(json.dumps({"error": str(e)}).encode())
                return
            body = models[0] if wanted not in served.ids else models[served.ids.index(wanted)]
        self._set_completion_headers(200)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())
        self.wfile.flush()

    def handle_completion(self, request, stop_words):
        shared = self.response_generator
        self.response_generator, self._reply, self._ctx = _TrackedGenerator(shared, self), None, None
        self._session_start()
        try:
            super().handle_completion(request, stop_words)
        except (BrokenPipeError, ConnectionResetError):  # the client left mid-reply: no traceback
            logging.info("the client closed the connection before the reply ended")
        finally:
            self.response_generator, reply = shared, self._reply
            if self._ctx is not None:
                self._session_end(self._ctx, reply, reply.finish_reason if reply is not None else None)
            self._reply = self._ctx = None

    def generate_response(self, text, finish_reason, *args, **kwargs) -> dict:
        reply = getattr(self, "_reply", None)
        if reply is not None:
            text = reply.take_content()
            if finish_reason == "length" and reply.stopped_at_eos or finish_reason == "tool_calls":
                # "tool_calls" only when a call was made: a block that held none came back as content
                finish_reason = "tool_calls" if reply.calls else "stop"
        response = super().generate_response(text, finish_reason, *args, **kwargs)
        for choice in response.get("choices", []):
            for key in ("message", "delta"):
                msg = choice.get(key)
                if isinstance(msg, dict) and "reasoning" in msg:
                    msg["reasoning_content"] = msg["reasoning"]
        return response


def setup_arg_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="minimax-m3 server", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="converted MiniMax-M3 folder (or a cached HF repo id)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=port, default=8080, help="port (default: 8080; 0 picks a free one)")
    p.add_argument("--thinking", choices=THINKING_MODES, default="adaptive",
                   help="thinking mode of requests that name none (default: adaptive, the template's own)")
    add_access_arguments(p)
    add_routing_arguments(p)
    add_media_arguments(p)
    add_limit_arguments(p)
    p.add_argument("--parallel", choices=("tensor", "pipeline", "both"), default="tensor",
                   help="under mlx.launch: how the ranks split the model (docs/distributed.md)")
    p.add_argument("--chat-template", default="", help="a chat template to use instead of the model's")
    p.add_argument("--chat-template-args", type=json_object, default="{}",
                   help="JSON of extra chat template arguments for every request")
    p.add_argument("--temp", type=non_negative_float, default=0.0, help="default sampling temperature")
    p.add_argument("--top-p", type=number(float, lo=0, lo_open=True, hi=1), default=1.0, help="default top-p")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="default top-k (0: off)")
    p.add_argument("--min-p", type=probability, default=0.0, help="default min-p (0: off)")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="default max tokens per reply")
    p.add_argument("--prefill-step-size", type=positive_int, default=2048, help="prompt tokens per forward pass")
    p.add_argument("--decode-concurrency", type=positive_int, default=8,
                   help="most requests decoded together in one batch (default: 8; 1 serves one at a time)")
    p.add_argument("--prompt-concurrency", type=positive_int, default=4,
                   help="most new prompts prefilled together, between decode steps (default: 4)")
    sessions.add_arguments(p)
    add_cache_args(p, start=False)
    add_expert_memory_arg(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                   help="how much the server logs (default INFO)")
    return p


def _cli_args(args: argparse.Namespace) -> argparse.Namespace:
    """The attributes mlx-lm's server reads from its own argument parser, for options we do not offer."""
    defaults = dict(adapter_path=None, draft_model=None, num_draft_tokens=3, trust_remote_code=False,
                    use_default_chat_template=False, decode_concurrency=8, prompt_concurrency=4,
                    kv_bits=None, kv_group_size=64, quantized_kv_start=0, pipeline=False,
                    index_bits=None, expert_memory=None)
    for k, v in defaults.items():
        if not hasattr(args, k):
            setattr(args, k, v)
    return args


class Server:
    """A running server: `serve_forever()` blocks; `shutdown()` stops it from any thread.
    Under mlx.launch only rank 0 listens; the other ranks follow it (cluster.py)."""

    def __init__(self, args: argparse.Namespace):
        self.args = _cli_args(args)
        check_cache_args(self.args)  # before the model loads, in the generation thread
        if mx.distributed.init().rank() == 0:  # the rank that listens
            settle_access(self.args)
        # mlx-lm's prompt cache with a byte bound and a disk tier (prompt_cache.py); under
        # --kv-bits its misses are caches quantized from the first token, which batch.
        self.prompt_cache = sessions.make_prompt_cache(self.args)
        self.provider = MiniMaxModelProvider(self.args, self.prompt_cache)
        liveness.start(mx.distributed.init())  # under mlx.launch: a rank that dies ends the others
        self.response_generator = MiniMaxResponseGenerator(self.provider, self.prompt_cache)
        self.httpd, self.host, self.port, self._thread = None, None, None, None
        try:
            if not self.response_generator.follows:
                self._listen(args)
            self.response_generator.wait_loaded()
        except BaseException:  # also Ctrl-C during the load: the thread would load, then serve nobody forever
            if self.httpd is not None:
                self.httpd.server_close()
            self.response_generator.stop_and_join()
            raise

    def _listen(self, args) -> None:
        try:
            family, *_, address = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        except OSError as e:
            raise OSError(f"--host {args.host}: {e.strerror or e}") from None
        rg, fingerprint = self.response_generator, get_system_fingerprint()

        class HTTPServer(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        class Handler(MiniMaxAPIHandler):
            admission = Admission(self.args)  # this server's queue bound

        try:
            self.httpd = HTTPServer(address, lambda *a, **kw: Handler(rg, *a, system_fingerprint=fingerprint, **kw))
        except OSError as e:
            raise OSError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
        self.host, self.port = self.httpd.server_address[:2]

    def serve_forever(self) -> None:
        if self.httpd is None:  # a following rank
            self.response_generator.join()
            return
        logging.info(f"MiniMax-M3 server on http://{self.host}:{self.port}/v1 (model {self.args.model})")
        self.httpd.serve_forever()

    def start(self) -> "Server":
        """Serve from a background thread (tests, notebooks)."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        if self.httpd is not None:
            self.httpd.server_close()
        self.response_generator.stop_and_join()
        self.prompt_cache.close()  # the blocks still being written reach the disk


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s - %(levelname)s - %(message)s")
    shorten_log_lines()
    stopping.install(mx.distributed.init())  # Ctrl-C, SIGTERM, SIGHUP; under mlx.launch, on every rank
    server = Server(args)
    if server.httpd is not None:
        print(f"Serving {args.model} at http://{server.host}:{server.port}/v1", flush=True)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
    finally:
        server.shutdown()
    return 0
