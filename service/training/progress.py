"""A one-line progress bar on stderr for the long steps of training (no dependency for so little)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 24
_REDRAW_SECONDS = 0.25


class Progress:
    """``label |#####-----| 45/94 12s note``, redrawn in place on a terminal.

    When stderr is not a terminal (a log file, CI), it writes one line when closed instead of hundreds of
    carriage returns.

    Args:
        label: what is being counted.
        total: the count at completion.
        enabled: False makes every method a no-op.
        stream: where to write; stderr by default.
    """

    def __init__(self, label: str, total: int, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(int(total), 1)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.note = ""
        self.started = time.perf_counter()
        self._drawn_at = 0.0
        self._interactive = enabled and bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, n: int = 1, *, note: str | None = None) -> None:
        """Advance by ``n``; ``note`` (a loss, a metric) replaces the text after the counter."""
        if not self.enabled:
            return
        self.count = min(self.count + n, self.total)
        if note is not None:
            self.note = note
        now = time.perf_counter()
        if self._interactive and (now - self._drawn_at >= _REDRAW_SECONDS or self.count == self.total):
            self._drawn_at = now
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def close(self) -> None:
        """Finish the line (a terminal) or write it once (anything else)."""
        if not self.enabled:
            return
        self.stream.write(("\r" if self._interactive else "") + self._line() + "\n")
        self.stream.flush()
        self.enabled = False

    def _line(self) -> str:
        filled = round(_WIDTH * self.count / self.total)
        elapsed = time.perf_counter() - self.started
        bar = "#" * filled + "-" * (_WIDTH - filled)
        return f"{self.label} |{bar}| {self.count}/{self.total} {elapsed:.0f}s {self.note}".rstrip() + " "
