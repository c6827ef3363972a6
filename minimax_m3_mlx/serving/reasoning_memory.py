"""The model's own reasoning, put back into histories whose clients dropped it.

Many OpenAI-style clients send an assistant message back without the reasoning the
server returned with it. MiniMax recommends keeping it in agent histories (agents score
far lower without it), and without it the re-rendered history differs from the tokens
the prompt cache holds, so the next turn re-prefills from that message on. The server
remembers each reply's reasoning under a key made of the conversation before it and the
reply's exact content and tool calls; a later request holding that message without
reasoning gets it back. A message the server did not generate matches no key and is
never changed.

Entries live in memory (bounded) and, with the disk tier on, as small files beside the
cache blocks, under the same byte budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, List, Optional

from .block_store import DiskBudget

MAX_ENTRIES = 4096
log = logging.getLogger(__name__)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    parts = []
    for p in content if isinstance(content, list) else []:
        if isinstance(p, dict) and p.get("type") == "text":
            parts.append(str(p.get("text", "")))
        elif isinstance(p, dict):  # an image: its URL stands for it
            url = p.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            parts.append("<image:" + hashlib.sha256(str(url).encode()).hexdigest() + ">")
    return "".join(parts).strip()


def _calls(calls: Any) -> List[list]:
    out = []
    for c in calls or []:
        fn = c.get("function", c) if isinstance(c, dict) else {}
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass
        out.append([fn.get("name"), json.dumps(args, sort_keys=True, ensure_ascii=False)])
    return out


def _message(m: dict) -> list:
    """A message as the key sees it: what the template renders, reasoning left out."""
    return [m.get("role"), _text(m.get("content")), _calls(m.get("tool_calls")), m.get("tool_call_id"), m.get("name")]


def message_key(history: List[dict], content: Any, tool_calls: Any) -> str:
    body = json.dumps([[_message(m) for m in history], _text(content), _calls(tool_calls)],
                      sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def has_reasoning(m: dict) -> bool:
    return any(isinstance(m.get(k), str) and m[k].strip() for k in ("reasoning_content", "reasoning"))


class ReasoningMemory:
    """reply key -> reasoning; `directory` (the disk tier's) keeps them across restarts."""

    def __init__(self, directory: Optional[Path] = None, budget: Optional[DiskBudget] = None):
        self._entries: "OrderedDict[str, str]" = OrderedDict()
        self._lock = threading.Lock()
        self.dir = Path(directory) / "reasoning" if directory is not None else None
        self.budget = budget
        if self.dir is not None:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def remember(self, history: List[dict], content: Any, tool_calls: Any, reasoning: str) -> None:
        if not reasoning.strip():
            return
        key = message_key(history, content, tool_calls)
        with self._lock:
            self._entries[key] = reasoning
            self._entries.move_to_end(key)
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)
        if self.dir is not None:
            self._write(key, reasoning)

    def _write(self, key: str, reasoning: str) -> None:
        path = self.dir / f"{key}.json"
        tmp = self.dir / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        data = json.dumps({"reasoning": reasoning}).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            if self.budget is not None:
                self.budget.add(len(data), keep=path)
        except OSError as e:  # the disk tier logs a full disk; memory still holds it
            tmp.unlink(missing_ok=True)
            log.debug("reasoning not written to disk: %s", e)

    def _lookup(self, key: str) -> Optional[str]:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        if self.dir is None:
            return None
        try:
            reasoning = json.loads((self.dir / f"{key}.json").read_text())["reasoning"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return reasoning if isinstance(reasoning, str) else None

    def restore(self, messages: List[dict]) -> int:
        """Put the remembered reasoning back into assistant messages that lack it (in
        place); returns how many were restored."""
        restored = 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") != "assistant" or has_reasoning(m):
                continue
            reasoning = self._lookup(message_key(messages[:i], m.get("content"), m.get("tool_calls")))
            if reasoning is not None:
                m["reasoning_content"] = reasoning
                restored += 1
        return restored
