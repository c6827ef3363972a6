"""The server's side of long sessions: its prompt-cache options, the reasoning put back into
histories, the memory check of each request, and one log line per request.

The log line says where the prompt came from (memory, disk, computed) and how fast the
prefill and the decode ran: what an agent's user needs to see whether reuse works.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Optional

from ..arg_types import non_negative_int, size
from ..model.experts import gigabytes
from .http_errors import RequestError
from .memory import default_prompt_cache_bytes, memory_shortfall
from .prompt_cache import DEFAULT_DISK_BYTES, TieredPromptCache
from .reasoning_memory import ReasoningMemory


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-cache-size", type=non_negative_int, default=10,
                   help="most KV caches kept in memory between requests (default: 10)")
    p.add_argument("--prompt-cache-bytes", type=size, default=None,
                   help="most bytes of KV caches kept in memory (default: half the memory the weights leave)")
    p.add_argument("--prompt-cache-dir", default=None,
                   help="keep prompt caches on disk here too, across evictions and restarts (e.g. ~/.cache/minimax-m3)")
    p.add_argument("--prompt-cache-disk-bytes", type=size, default=DEFAULT_DISK_BYTES,
                   help="most bytes the --prompt-cache-dir holds, least recently used first (default: 64GB)")
    p.add_argument("--no-restore-reasoning", dest="restore_reasoning", action="store_false",
                   help="do not put the server's own reasoning back into histories whose clients dropped it")


def make_prompt_cache(args) -> TieredPromptCache:
    cache = TieredPromptCache(args.prompt_cache_size, args.prompt_cache_bytes, args.prompt_cache_dir,
                              args.prompt_cache_disk_bytes)
    if getattr(args, "restore_reasoning", True):
        cache.reasoning = ReasoningMemory(cache.directory, cache.budget)
    return cache


def attach(cache: TieredPromptCache, model, path, args, group=None) -> None:
    """Bind the prompt cache to the loaded model; settle and report its memory bound."""
    cache.attach(model, path, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size, group=group)
    if args.prompt_cache_bytes is None:
        args.prompt_cache_bytes = default_prompt_cache_bytes(model)
        cache.max_bytes = args.prompt_cache_bytes
    disk = (f"; on disk in {cache.directory} up to {cache.disk_bytes / 1e9:.1f} GB"
            if cache.directory is not None else "")
    logging.info(f"prompt cache: up to {cache.max_bytes / 1e9:.2f} GB in memory{disk}")
    streamer = getattr(model, "expert_streamer", None)
    if streamer is not None:  # --expert-memory
        layer = streamer.layers[0]
        pools = sum(lay.n_slots * lay.expert_nbytes for lay in streamer.layers)
        how = "straight into the pools" if hasattr(layer, "views") else "through buffers"
        logging.info(f"experts: {streamer.n_slots} of {layer.slot_of.size} per layer in memory "
                     f"({gigabytes(pools)}), the others read from the files {how} as the router picks them")


def expert_counts(model) -> str:
    """The streamed experts' hit rate and bytes read since loading (all requests together)."""
    streamer = getattr(model, "expert_streamer", None)
    if streamer is None:
        return ""
    s = streamer.stats
    return f"; experts so far {s.hit_rate:.1%} hits, {gigabytes(s.bytes_read)} read"


class SessionHandling:
    """Mixed into the server's request handler (server.MiniMaxAPIHandler)."""

    def _prompt_cache(self) -> Optional[TieredPromptCache]:
        cache = getattr(self.response_generator, "prompt_cache", None)
        return cache if isinstance(cache, TieredPromptCache) else None

    def _restore_reasoning(self, messages) -> None:
        cache = self._prompt_cache()
        if cache is not None and cache.reasoning is not None and isinstance(messages, list):
            n = cache.reasoning.restore(messages)
            if n:
                logging.debug(f"restored the reasoning of {n} assistant message(s)")

    def _check_memory(self, prompt_tokens: int) -> None:
        provider, cache = self.response_generator.model_provider, self._prompt_cache()
        args = self.response_generator.cli_args
        why = memory_shortfall(provider.model, prompt_tokens + int(self.max_tokens),
                               cache.nbytes if cache is not None else 0, args.kv_bits, args.kv_group_size)
        if why is not None:
            raise RequestError(why, param="max_tokens", code="insufficient_memory", status=503)

    def _session_start(self) -> None:
        self._t_start, self._t_first, self._n_tokens = time.perf_counter(), None, 0

    def _session_token(self) -> None:
        if self._t_first is None:
            self._t_first = time.perf_counter()
        self._n_tokens += 1

    def _session_end(self, ctx, reply, finish_reason: Optional[str]) -> None:
        """Remember the reply's reasoning; log one line for the request."""
        cache = self._prompt_cache()
        prompt = list(getattr(ctx, "prompt", None) or [])
        if cache is not None and reply is not None and cache.reasoning is not None and finish_reason is not None:
            messages = self.body.get("messages") if isinstance(getattr(self, "body", None), dict) else None
            if isinstance(messages, list):
                cache.reasoning.remember(messages, "".join(reply.content_sent), reply.calls, "".join(reply.reasoning))
        source = cache.source_of(prompt) if cache is not None and prompt else None
        cached = max(getattr(ctx, "prompt_cache_count", 0) or 0, 0)
        memory, disk = (source.memory, source.disk) if source is not None else (cached, 0)
        computed = len(prompt) - memory - disk
        now, first = time.perf_counter(), self._t_first
        prefill = f"{computed / (first - self._t_start):.1f}" if first and first > self._t_start else "-"
        decode = f"{(self._n_tokens - 1) / (now - first):.1f}" if first and self._n_tokens > 1 and now > first else "-"
        read = (f" ({source.disk_bytes / 1e6:.1f} MB read in {source.disk_seconds:.2f} s)"
                if source is not None and source.disk else "")
        logging.info(f"request: {len(prompt)} prompt tokens ({memory} from memory, {disk} from disk{read}, "
                     f"{computed} computed), prefill {prefill} tok/s; {self._n_tokens} tokens at {decode} tok/s; "
                     f"finish {finish_reason}{expert_counts(self.response_generator.model_provider.model)}")
