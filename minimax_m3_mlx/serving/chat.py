"""`minimax-m3 chat`: talk to MiniMax-M3 at the terminal.

Each turn renders the whole conversation with the chat template (MiniMax-M3's template
writes its system and developer turns first, so mlx-lm's "template only the new message"
trick does not apply) and reuses the KV cache for the prefix it shares with the previous
turn: in practice only the new user message is processed. Earlier replies go back into
the conversation with their reasoning (`reasoning_content`), as the template expects.

Commands: /think enabled|adaptive|disabled (thinking mode for the next turns), /reset
(forget the conversation), /help, /exit (or Ctrl-D). Ctrl-C stops a reply and keeps the
conversation as it was before that message; `//text` sends a message that begins with `/`.
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx

from ..arg_types import ArgumentParser
from .generate import (
    Printer,
    PromptCache,
    add_common_args,
    add_trace_arg,
    apply_cache_args,
    check_trace_args,
    chat_prompt,
    generate,
    make_cli_sampler,
    save_trace,
    start_trace,
)
from ..chat_format.markers import THINKING_MODES
from ..loading import load
from .progress import PrefillProgress

HELP = "commands: /think enabled|adaptive|disabled, /reset, /help, /exit; Ctrl-C stops a reply"


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="minimax-m3 chat", description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--stats", action="store_true", help="print tokens/s and memory after each reply")
    add_trace_arg(parser)
    return parser


class ChatSession:
    """A conversation with its prompt cache; `ask` runs one turn."""

    def __init__(self, model, tokenizer, *, thinking: str = "adaptive", system_prompt=None,
                 max_tokens: int = 256, sampler=None, prefill_step_size: int = 2048, cache_options=None):
        self.model, self.tokenizer = model, tokenizer
        self.thinking = thinking
        self.system_prompt = system_prompt
        self.max_tokens, self.sampler, self.prefill_step_size = max_tokens, sampler, prefill_step_size
        # kv_bits / kv_group_size / quantized_kv_start for generate (apply_cache_args checked them)
        self.cache_options = dict(cache_options or {})
        self.cache = PromptCache(model)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        # The cache is kept: the system and developer turns stay a shared prefix.

    def ask(self, text: str, on_text=None, prompt_progress=None):
        """One turn. A message the model cannot take (e.g. past the context limit) raises
        ValueError and leaves the conversation as it was."""
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = chat_prompt(self.tokenizer, messages, thinking=self.thinking)
        gen = generate(self.model, self.tokenizer, prompt, max_tokens=self.max_tokens, sampler=self.sampler,
                       prompt_cache=self.cache, prefill_step_size=self.prefill_step_size, on_text=on_text,
                       prompt_progress=prompt_progress, **self.cache_options)
        self.messages = messages
        reply = {"role": "assistant", "content": gen.text}
        if gen.reasoning:
            reply["reasoning_content"] = gen.reasoning
        if gen.tool_calls:
            reply["tool_calls"] = [{"type": "function", "function": c} for c in gen.tool_calls]
        self.messages.append(reply)
        return gen


def main(argv=None, input_fn=input) -> int:
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.seed is not None:
        mx.random.seed(args.seed)
    group = mx.distributed.init()
    if group.size() > 1:
        raise ValueError("chat reads the terminal on one process: under mlx.launch use `minimax-m3 generate` or "
                         "`minimax-m3 server`")
    check_trace_args(parser, args, group)
    model, tokenizer = load(args.model, thinking=args.thinking, expert_memory=args.expert_memory)
    apply_cache_args(model, args)
    session = ChatSession(model, tokenizer, thinking=args.thinking, system_prompt=args.system_prompt,
                          max_tokens=args.max_tokens, sampler=make_cli_sampler(args),
                          prefill_step_size=args.prefill_step_size,
                          cache_options=dict(kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                                             quantized_kv_start=args.quantized_kv_start))
    trace = start_trace(model, args, "chat")
    try:
        return converse(session, args, input_fn)
    finally:
        save_trace(trace, args)


def converse(session: ChatSession, args, input_fn) -> int:
    """The turns, until /exit or the end of input."""
    printer = Printer(hide_thinking=args.hide_thinking)
    print(f"[MiniMax-M3 chat, thinking {session.thinking}; {HELP}]")
    while True:
        try:
            query = input_fn(">> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        cmd = query.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "q"):
            return 0
        if cmd in ("/help", "h"):
            print(HELP)
            continue
        if cmd in ("/reset", "r"):
            session.reset()
            print("[conversation reset]")
            continue
        if cmd.startswith("/think"):
            mode = cmd[len("/think"):].strip()
            if mode not in THINKING_MODES:
                print(f"[thinking is {session.thinking}; choose one of {', '.join(THINKING_MODES)}]")
            else:
                session.thinking = mode
                print(f"[thinking {mode}]")
            continue
        if cmd.startswith("//"):
            query = cmd[1:]
        elif cmd.startswith("/"):
            print(f"[unknown command {cmd.split()[0]}; {HELP}; //text sends a message that begins with /]")
            continue
        progress = PrefillProgress()
        try:
            gen = session.ask(query, on_text=printer, prompt_progress=progress)
        except ValueError as e:  # e.g. past the context limit: this message is dropped, the rest kept
            print(f"[error: {e}; the message was not sent]")
            continue
        except KeyboardInterrupt:  # the session's cache rewinds to the conversation on the next turn
            printer.stop()
            print("\n[reply stopped; the conversation is as it was before this message]")
            continue
        finally:
            progress.close()
        printer.finish(gen)
        if gen.context_full:
            print("[the reply stopped at the context limit; /reset starts a new conversation]")
        if args.stats:
            print(f"[prompt: {gen.prompt_tokens} tokens ({gen.cached_tokens} cached), "
                  f"{gen.prompt_tps:.1f} tokens-per-sec; generation: {gen.generation_tokens} tokens, "
                  f"{gen.generation_tps:.1f} tokens-per-sec; peak memory {gen.peak_memory:.3f} GB]")
        sys.stdout.flush()
