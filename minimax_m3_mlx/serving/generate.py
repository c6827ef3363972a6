"""`minimax-m3 generate`: one prompt through MiniMax-M3 on mlx-lm's generation loop.

Built on mlx-lm's `stream_generate`, `make_sampler`, prompt caches and text state machine
(the one its server uses to take reasoning and tool calls out of the answer). The prompt
goes through the model's chat template with the thinking mode mapped onto the template's
`thinking_mode` ("enabled": the model must reason first; "adaptive": it decides;
"disabled": no reasoning). Reasoning is printed dimmed on a terminal (between
"--- thinking ---" / "--- answer ---" lines otherwise) or dropped with --hide-thinking.
At the end come mlx-lm's figures: prompt and generation tokens/s and peak memory.

--prompt-cache-file FILE keeps the KV cache between runs: when FILE exists, the longest
prefix it shares with the new prompt is reused (the rest of the cache is trimmed), and
FILE is rewritten with this run's prompt and answer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, TextStateMachine, make_text_state_machine, stream_generate
from mlx_lm.models.cache import (
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.sample_utils import make_sampler

from ..arg_types import (ArgumentParser, non_negative_float, non_negative_int, number, positive_float, positive_int,
                         probability, seed, size_or_auto)
from ..chat_format.markers import THINKING_MODES
from ..chat_format.tokenizer import BareThinkEnd
from ..chat_format.tool_parser import parse_tool_call, parse_tool_calls, unparsed_block
from ..loading import load, resolve_path
from ..model.expert_trace import ExpertTrace
from ..model.kvquant import GROUP_SIZES, INDEX_BITS, KV_BITS, check_quantization
from . import multimodal
from .progress import PrefillProgress

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 256
DIM, RESET = "\033[2m", "\033[0m"


# -- library ------------------------------------------------------------------------------------
def chat_prompt(tokenizer, messages: List[Dict[str, Any]], thinking: Optional[str] = None,
                tools: Optional[list] = None) -> List[int]:
    """Token ids of `messages` + the assistant's generation prompt for a thinking mode."""
    kwargs = {"thinking_mode": thinking} if thinking is not None else {}
    if tools:
        kwargs["tools"] = tools
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs))


def initial_state(tokenizer, prompt: Sequence[int]) -> str:
    """The reply's first state: "reasoning" when the prompt leaves a think block open, else "normal"."""
    if getattr(tokenizer, "has_thinking", False):
        if tokenizer.rfind_think_start(list(prompt)) > tokenizer.rfind_think_end(list(prompt)):
            return "reasoning"
    return "normal"


class PromptCache:
    """A model's KV cache plus the tokens it holds, reused across prompts by common prefix."""

    def __init__(self, model, cache: Optional[list] = None, tokens: Sequence[int] = ()):
        self.model = model
        self.cache = cache if cache is not None else make_prompt_cache(model)
        self.tokens = list(tokens)

    @property
    def offset(self) -> int:
        return self.cache[0].offset if self.cache else 0

    def reset(self) -> None:
        self.cache = make_prompt_cache(self.model)
        self.tokens = []

    def reuse(self, prompt: Sequence[int]) -> List[int]:
        """Trim the cache to the prefix it shares with `prompt`; return the tokens still to feed."""
        prompt = list(prompt)
        if not prompt:
            raise ValueError("empty prompt")
        self.rewind()
        n = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1)  # the last prompt token must be fed to get logits
        if n < len(self.tokens):
            if n <= 0 or not can_trim_prompt_cache(self.cache):
                self.reset()
                n = 0
            else:
                trim_prompt_cache(self.cache, len(self.tokens) - n)
                self.tokens = self.tokens[:n]
        if self.offset != len(self.tokens):
            raise RuntimeError(f"prompt cache holds {self.offset} tokens but records {len(self.tokens)}")
        return prompt[n:]

    def rewind(self) -> None:
        """Every layer back to the tokens recorded. A reply stopped part-way (Ctrl-C in chat)
        leaves the layers it reached holding more, and not all the same number."""
        n = len(self.tokens)
        if all(c.offset == n for c in self.cache):
            return
        if not can_trim_prompt_cache(self.cache) or any(c.offset < n for c in self.cache):
            self.reset()
            return
        for c in self.cache:
            c.trim(c.offset - n)

    def record(self, fed: Sequence[int]) -> None:
        """After generation: the cache now holds the tokens fed (prompt rest + generated), up to its offset."""
        self.tokens = (self.tokens + list(fed))[: self.offset]
        if len(self.tokens) != self.offset:
            raise RuntimeError(f"prompt cache holds {self.offset} tokens but only {len(self.tokens)} were fed")

    # A cache file is only valid for the model (config) that wrote it.
    @staticmethod
    def fingerprint(model_path: str) -> str:
        return hashlib.sha256((resolve_path(model_path) / "config.json").read_bytes()).hexdigest()

    def save(self, path: str, model_path: str) -> None:
        save_prompt_cache(str(path), self.cache, {
            "tokens": json.dumps(self.tokens),
            "model": str(model_path),
            "config_sha256": self.fingerprint(model_path),
        })

    @classmethod
    def load(cls, path: str, model, model_path: str) -> "PromptCache":
        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
        except (RuntimeError, ValueError, KeyError) as e:  # MLX's loader raises RuntimeError on a bad file
            raise ValueError(f"{path}: not a prompt cache file ({e}); delete it or pass another "
                             f"--prompt-cache-file") from None
        if meta.get("config_sha256") != cls.fingerprint(model_path):
            raise ValueError(
                f"{path} was written for another model ({meta.get('model')!r}); "
                f"delete it or pass another --prompt-cache-file"
            )
        if len(cache) != len(model.layers):
            raise ValueError(f"{path} has {len(cache)} layer caches, the model {len(model.layers)}")
        return cls(model, cache, json.loads(meta.get("tokens", "[]")))


@dataclass
class Generation:
    """One reply: answer, reasoning and tool calls kept apart, plus mlx-lm's figures."""

    text: str = ""
    reasoning: str = ""
    tool_calls: List[Dict[str, Any]] = field(default_factory=list)
    tool_call_text: List[str] = field(default_factory=list)  # raw blocks, markers removed
    unparsed_tool_calls: List[str] = field(default_factory=list)  # blocks with no complete call
    tokens: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0  # fed this time (the rest after the cached prefix)
    cached_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    context_full: bool = False  # stopped because the context limit was reached


class ContextLimitError(ValueError):
    """A prompt that leaves no room for a reply in the model's context."""


def context_limit(model) -> Optional[int]:
    args = getattr(model, "args", None)
    return getattr(args, "max_position_embeddings", None)


def reply_room(model, prompt_tokens: int) -> Optional[int]:
    """How many tokens a reply to a prompt of `prompt_tokens` may have (None: no limit known).

    mlx-lm's loop feeds each token it yields back to the model, so prompt + reply must fit.
    """
    limit = context_limit(model)
    if limit is None:
        return None
    if prompt_tokens >= limit:
        raise ContextLimitError(f"the prompt has {prompt_tokens} tokens; the model's context holds {limit} "
                                f"(max_position_embeddings), the reply included")
    return limit - prompt_tokens


def generate(model, tokenizer, prompt: Sequence[int], *, max_tokens: int = DEFAULT_MAX_TOKENS,
             sampler=None, logits_processors=None, prompt_cache: Optional[PromptCache] = None,
             tools: Optional[list] = None, prefill_step_size: int = 2048,
             on_text: Optional[Callable[[str, str], None]] = None,
             input_embeddings: Optional[mx.array] = None, kv_bits: Optional[int] = None,
             kv_group_size: int = 64, quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
             prompt_progress: Optional[Callable[[int, int], None]] = None) -> Generation:
    """Generate a reply to `prompt` (token ids); `on_text(state, text)` streams the pieces.

    `state` is "reasoning", "normal" (the answer) or "tool" (a tool-call block, markers
    removed). The reply's tool calls are parsed with the tokenizer's tool parser; a block
    cut off by max_tokens holds no call and comes back as text (finish_reason "length").
    `input_embeddings` ([L, hidden], e.g. from multimodal.prepare) replace the prompt's
    embeddings; such a prompt neither reuses nor records a cached prefix, because every
    image's placeholder tokens are the same ids. `kv_bits` quantizes every layer's cache
    (index keys included) once it holds `quantized_kv_start` tokens (mlx-lm's switches).
    `prompt_progress(done, total)` follows the prefill (mlx-lm's prompt_progress_callback).
    """
    room = reply_room(model, len(prompt))  # before the cache is touched: a refusal changes nothing
    capped = room is not None and (max_tokens < 0 or max_tokens > room)
    max_tokens = room if capped else max_tokens
    cache = prompt_cache if prompt_cache is not None else PromptCache(model)
    if input_embeddings is not None:
        if cache.tokens:
            raise ValueError("a prompt with images or videos cannot continue a prompt cache")
        rest = list(prompt)
    else:
        rest = cache.reuse(prompt)
    extra = {} if input_embeddings is None else {"input_embeddings": input_embeddings}
    if prompt_progress is not None:
        extra["prompt_progress_callback"] = prompt_progress
    out = Generation(cached_tokens=len(prompt) - len(rest))
    sm_state = make_text_state_machine(tokenizer).make_state(initial_state(tokenizer, prompt))
    bare_think_end = BareThinkEnd.for_reply(tokenizer, sm_state[0])
    pieces: Dict[str, List[str]] = {"normal": [], "reasoning": [], "tool": []}
    tool_text: List[str] = []
    prev_state = sm_state[0]

    def end_block(closed: bool) -> None:
        body = "".join(tool_text)
        tool_text.clear()
        _take_block(out, body, closed, getattr(tokenizer, "tool_parser", None), tools, pieces["normal"])

    for resp in stream_generate(model, tokenizer, rest, max_tokens=max_tokens, sampler=sampler,
                                logits_processors=logits_processors, prompt_cache=cache.cache,
                                prefill_step_size=prefill_step_size, kv_bits=kv_bits,
                                kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start, **extra):
        out.tokens.append(resp.token)
        sm_state, segments = TextStateMachine.split(sm_state, bare_think_end(resp.text, resp.finish_reason is not None))
        if resp.finish_reason is not None:
            sm_state, flushed, state = TextStateMachine.flush(sm_state)
            segments.append((state, flushed))
        for state, text in segments:
            if prev_state == "tool" and state != "tool":
                end_block(closed=True)
            if state == "tool":
                tool_text.append(text)
            elif state in pieces:
                pieces[state].append(text)
            if text and on_text is not None:
                on_text(state, text)
            prev_state = state
        out.finish_reason = resp.finish_reason
        out.prompt_tokens, out.prompt_tps = resp.prompt_tokens, resp.prompt_tps
        out.generation_tokens, out.generation_tps = resp.generation_tokens, resp.generation_tps
        out.peak_memory = resp.peak_memory
    out.context_full = capped and out.finish_reason == "length"
    if prev_state == "tool" and tool_text:
        end_block(closed=False)  # the reply ended inside the block (max tokens, the context limit)
    if input_embeddings is None:
        cache.record(list(rest) + out.tokens)
    out.text, out.reasoning = "".join(pieces["normal"]), "".join(pieces["reasoning"])
    return out


def _take_block(out: Generation, body: str, closed: bool, parser, tools: Optional[list], content: List[str]) -> None:
    """A tool-call block's calls into out.tool_calls, as the server takes them: a block with
    a call cut off (by max tokens) holds no call, and a block without a call goes back into
    the answer as the model wrote it (and into out.unparsed_tool_calls)."""
    out.tool_call_text.append(body)
    if parser is None:
        return
    try:
        if not closed and parser is parse_tool_call:
            calls = parse_tool_calls(body, tools, complete=False)
        else:
            parsed = parser(body, tools)
            calls = parsed if isinstance(parsed, list) else [parsed]
    except (ValueError, json.JSONDecodeError):
        calls = []
    out.tool_calls += calls
    if not calls:
        out.unparsed_tool_calls.append(body)
        content.append(unparsed_block(body, closed))


# -- terminal output ----------------------------------------------------------------------------
class Printer:
    """Streams a reply: reasoning dimmed (or dropped), answer plain, tool calls parsed."""

    def __init__(self, stream=None, hide_thinking: bool = False, color: Optional[bool] = None):
        self.stream = stream or sys.stdout
        self.hide_thinking = hide_thinking
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.color = isatty if color is None else color
        self.state: Optional[str] = None

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def __call__(self, state: str, text: str) -> None:
        if state == "reasoning" and self.hide_thinking:
            return
        if state != self.state:
            if self.state == "reasoning":
                self.write(RESET + "\n\n" if self.color else "\n--- answer ---\n")
            if state == "reasoning":
                self.write(DIM if self.color else "--- thinking ---\n")
            self.state = state
        if state != "tool":  # tool calls are printed whole, once parsed (see finish)
            self.write(text)

    def stop(self) -> None:
        """A reply cut short: plain text from here on."""
        if self.state == "reasoning" and self.color and not self.hide_thinking:
            self.write(RESET)
        self.state = None

    def finish(self, gen: Generation) -> None:
        if self.state == "reasoning" and not self.hide_thinking:
            self.write(RESET if self.color else "\n--- answer ---")
        for call in gen.tool_calls:
            self.write(f"\n[tool call] {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})")
        for text in gen.unparsed_tool_calls:
            self.write(f"\n[unparsed tool call] {text}")
        self.write("\n")
        self.state = None


def print_stats(gen: Generation, stream=None, model=None) -> None:
    """mlx-lm's end-of-generation figures."""
    stream = stream or sys.stdout
    cached = f" ({gen.cached_tokens} more from the prompt cache)" if gen.cached_tokens else ""
    print(f"Prompt: {gen.prompt_tokens} tokens, {gen.prompt_tps:.3f} tokens-per-sec{cached}", file=stream)
    print(f"Generation: {gen.generation_tokens} tokens, {gen.generation_tps:.3f} tokens-per-sec", file=stream)
    print(f"Peak memory: {gen.peak_memory:.3f} GB", file=stream)
    experts = getattr(model, "expert_streamer", None) if model is not None else None
    if experts is not None:  # --expert-memory
        s = experts.stats
        stats = getattr(model, "load_stats", None)
        rank = f" on rank {stats.rank}" if stats is not None else ""  # under mlx.launch: its own figures
        print(f"Experts: {experts.n_slots} slots per layer{rank}, {s.hit_rate:.1%} hits, {s.misses} read "
              f"({s.bytes_read / 1e9:.3f} GB)", file=stream)


# -- CLI ----------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="converted MiniMax-M3 folder (or a cached HF repo id)")
    parser.add_argument("--system-prompt", default=None, help="system prompt")
    parser.add_argument("--max-tokens", "-m", type=number(int, lo=1, also=(-1,)), default=DEFAULT_MAX_TOKENS,
                        help="most tokens to generate (-1: up to the context limit)")
    parser.add_argument("--temp", type=non_negative_float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=number(float, lo=0, lo_open=True, hi=1), default=1.0,
                        help="nucleus sampling top-p, in (0, 1]")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="top-k sampling (0: off)")
    parser.add_argument("--min-p", type=probability, default=0.0, help="min-p sampling, in [0, 1] (0: off)")
    parser.add_argument("--seed", type=seed, default=None, help="PRNG seed (0 to 2**64-1)")
    parser.add_argument("--thinking", choices=THINKING_MODES, default="adaptive",
                        help="reasoning: always (enabled), the model decides (adaptive, the template's default), "
                             "never (disabled)")
    parser.add_argument("--hide-thinking", action="store_true", help="do not print the reasoning")
    parser.add_argument("--prefill-step-size", type=positive_int, default=2048, help="prompt tokens per forward pass")
    parser.add_argument("--parallel", choices=("tensor", "pipeline", "both"), default="tensor",
                        help="under mlx.launch: how the ranks split the model (docs/distributed.md)")
    add_expert_memory_arg(parser)
    add_cache_args(parser)


def add_expert_memory_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--expert-memory", type=size_or_auto, default=None, metavar="SIZE|auto",
                        help="hold only SIZE bytes of routed experts in memory (e.g. 40GB), reading the others "
                             "from the model folder as they are routed to; auto: what memory has left")


def add_cache_args(parser: argparse.ArgumentParser, start: bool = True) -> None:
    """mlx-lm's KV-quantization switches, plus the index keys' bits (README: bytes per token).
    start=False: no --quantized-kv-start (the server quantizes from the first token)."""
    parser.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None,
                        help="quantize every layer's K/V cache (and the index keys) to this many bits")
    parser.add_argument("--kv-group-size", type=int, choices=GROUP_SIZES, default=64,
                        help="group size of the cache quantization (default 64)")
    if start:
        parser.add_argument("--quantized-kv-start", type=non_negative_int, default=DEFAULT_QUANTIZED_KV_START,
                            help=f"tokens of context before the cache is quantized "
                                 f"(default {DEFAULT_QUANTIZED_KV_START})")
    parser.add_argument("--index-bits", type=int, choices=INDEX_BITS, default=None,
                        help="index keys: 4 or 8 (quantized, with --kv-bits; default 8 there), "
                             "16 (model dtype, the default without --kv-bits) or 32 (float32); scoring is float32")


def check_cache_args(args) -> None:
    """The cache switches that contradict each other, whatever the model."""
    index_bits = getattr(args, "index_bits", None)
    if index_bits in KV_BITS and getattr(args, "kv_bits", None) is None:
        raise ValueError(f"--index-bits {index_bits} quantizes the index keys and needs --kv-bits "
                         "(without it use 16 or 32)")


def apply_cache_args(model, args) -> None:
    """Check the cache switches against the model and set the index keys' bits on it."""
    check_cache_args(args)
    index_bits = getattr(args, "index_bits", None)
    kv_bits = getattr(args, "kv_bits", None)
    if kv_bits is not None:
        a = model.args
        check_quantization(kv_bits, args.kv_group_size, [("head_dim", a.head_dim), ("index_head_dim", a.index_head_dim)],
                           index_bits)
    model.index_bits = index_bits


def make_cli_sampler(args):
    return make_sampler(args.temp, top_p=args.top_p, min_p=args.min_p, top_k=args.top_k)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="minimax-m3 generate", description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="the message ('-' reads stdin)")
    parser.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    parser.add_argument("--prompt-cache-file", default=None,
                        help="reuse the KV cache in this file for the prompt's shared prefix, and save this run's")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for more)")
    parser.add_argument("--video", action="append", default=[], help="a video file (repeat for more)")
    parser.add_argument("--video-fps", type=positive_float, default=1.0, help="frames per second sampled from videos")
    add_trace_arg(parser)
    return parser


def add_trace_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--expert-trace", default=None, metavar="FILE",
                        help="save the experts every MoE layer's router chose (.npz), for "
                             "scripts/expert_policies.py and `plan --hit-curve`")


def media_prompt(model, tokenizer, args, messages):
    """Token ids and embeddings of a chat prompt holding --image / --video inputs."""
    if not model.has_vision:
        raise ValueError(f"{args.model} has no vision tower (a text-only checkpoint or conversion)")
    markers = multimodal.IMAGE_MARKER * len(args.image) + multimodal.VIDEO_MARKER * len(args.video)
    messages[-1]["content"] = markers + messages[-1]["content"]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         thinking_mode=args.thinking)
    processor = multimodal.load_processor(args.model, tokenizer)
    prepared = multimodal.prepare(model, processor, text, images=args.image or None, videos=args.video or None,
                                  video_fps=args.video_fps)
    return prepared.input_ids.tolist(), prepared.embeddings


def main(argv=None) -> int:
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    group = mx.distributed.init()
    if group.rank() != 0:  # every rank computes; rank 0 speaks
        sys.stdout = open(os.devnull, "w")
    media = args.image or args.video  # under mlx.launch too: every rank runs the processor (sharded._load_vision)
    if media and (args.prompt_cache_file or args.ignore_chat_template):
        parser.error("--image/--video go through the chat template and cannot use --prompt-cache-file "
                     "or --ignore-chat-template (every image's placeholders are the same token ids)")
    for flag, files in (("--image", args.image), ("--video", args.video)):
        for f in files:
            if not Path(f).is_file():
                parser.error(f"{flag} {f}: " + ("a folder, not a file" if Path(f).is_dir() else "no such file"))
    if args.prompt_cache_file:  # checked now, not after a long generation
        f = Path(args.prompt_cache_file)
        if f.is_dir() or not f.parent.is_dir():
            parser.error(f"--prompt-cache-file {f}: " + ("a folder" if f.is_dir() else f"no folder {f.parent}"))
    check_trace_args(parser, args, group)
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    prompt = sys.stdin.read() if prompt == "-" else prompt
    model, tokenizer = load(args.model, group=group, mode=args.parallel, thinking=args.thinking,
                            expert_memory=args.expert_memory)

    embeddings = None
    if args.ignore_chat_template or not tokenizer.has_chat_template:
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        if media:
            ids, embeddings = media_prompt(model, tokenizer, args, messages)
        else:
            ids = chat_prompt(tokenizer, messages, thinking=args.thinking)

    apply_cache_args(model, args)
    trace = start_trace(model, args)
    cache = PromptCache(model)
    if args.prompt_cache_file and Path(args.prompt_cache_file).exists():
        cache = PromptCache.load(args.prompt_cache_file, model, args.model)

    seed_ranks(group, args.seed)  # after the load, whose module initialisations draw from the random state
    printer = Printer(hide_thinking=args.hide_thinking)
    print("=" * 10)
    progress = PrefillProgress() if group.rank() == 0 else None
    try:
        gen = generate(model, tokenizer, ids, max_tokens=args.max_tokens, sampler=make_cli_sampler(args),
                       prompt_cache=cache, prefill_step_size=args.prefill_step_size, on_text=printer,
                       input_embeddings=embeddings, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                       quantized_kv_start=args.quantized_kv_start, prompt_progress=progress)
    finally:
        if progress is not None:
            progress.close()
    printer.finish(gen)
    print("=" * 10)
    if not gen.tokens:
        print("No text generated for this prompt")
    if gen.context_full:
        print(f"[stopped at the context limit: {context_limit(model)} tokens]", file=sys.stderr)
    print_stats(gen, model=model)
    if trace is not None and group.rank() == 0:
        trace.source += f": {gen.prompt_tokens} prompt tokens, {gen.generation_tokens} generated"
        save_trace(trace, args)
    if args.prompt_cache_file:
        cache.save(args.prompt_cache_file, args.model)
    if group.size() > 1:
        end_together(group)
    return 0


def check_trace_args(parser, args, group) -> None:
    """--expert-trace's file, checked before the load; a pipeline rank sees only its own layers."""
    if not args.expert_trace:
        return
    f = Path(args.expert_trace)
    if f.is_dir() or not f.parent.is_dir():
        parser.error(f"--expert-trace {f}: " + ("a folder" if f.is_dir() else f"no folder {f.parent}"))
    if group.size() > 1 and args.parallel != "tensor":
        parser.error(f"--expert-trace: with --parallel {args.parallel} each Mac routes only its own layers; "
                     "record on one Mac or with --parallel tensor")


def start_trace(model, args, command: str = "generate") -> Optional[ExpertTrace]:
    if not args.expert_trace:
        return None
    a = model.args
    trace = ExpertTrace(a.num_local_experts, a.num_experts_per_tok, source=f"minimax-m3 {command} --model {args.model}")
    model.record_experts(trace)
    return trace


def save_trace(trace: Optional[ExpertTrace], args) -> None:
    if trace is not None:
        print(f"Expert trace: {len(trace)} layer calls over {trace.step + 1} steps -> {trace.save(args.expert_trace)}")


def seed_ranks(group, seed: Optional[int]) -> None:
    """Seed the random state with `seed`; without one under mlx.launch, with a seed all ranks share.

    Every rank samples its own copy of each token from the same logits. With different random
    states (MLX seeds each process from the clock) they would pick different tokens at
    temperature > 0: the ranks' next forward passes would then mix different tokens, or one
    rank would stop before the others and leave them in a collective.
    """
    if seed is None and group.size() > 1:  # mlx-lm's server does the same
        seed = mx.distributed.all_sum(mx.random.state[0], group=group).view(mx.uint64).item()
    if seed is not None:
        mx.random.seed(seed)


def end_together(group) -> None:
    """Under mlx.launch: finish this rank's last collectives, then meet every other rank.

    mlx-lm's loop leaves its precomputed next step (all-sums included) in flight, and a rank
    that exits first closes sockets its peers still use: MLX's ring backend then logs a line
    per failed transfer ("[ring] Receiving from socket N failed with errno 9"). That step
    runs on mlx-lm's generation stream, which `mx.synchronize()` (the default stream) does
    not wait for.
    """
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    mx.synchronize()
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    mx.synchronize()
