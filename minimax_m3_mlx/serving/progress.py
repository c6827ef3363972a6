"""Prefill progress at the terminal: a tqdm line on stderr (tokens done, tokens/s), shown
only when the prompt takes more than a couple of seconds, and gone when the reply starts.

`PrefillProgress()` is mlx-lm's `prompt_progress_callback(done, total)`: generate_step
calls it before the first chunk, after each chunk and once more with the first token.
"""

from __future__ import annotations

import sys
from typing import Optional

from tqdm import tqdm

DELAY_S = 2.0  # a prompt done sooner shows nothing


class PrefillProgress:
    def __init__(self, file=None, delay: Optional[float] = None):
        self.file = file
        self.delay = DELAY_S if delay is None else delay
        self.bar: Optional[tqdm] = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if done >= total:
                return
            self.bar = tqdm(total=total, initial=done, desc="prefill", unit="tok", unit_scale=True,
                            delay=self.delay, leave=False, file=self.file or sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        """End the line (the prefill is done, or the reply was stopped)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
