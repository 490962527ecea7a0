"""A one-line progress bar for long operations (push, pull, benches).

It draws only when its stream is a terminal, and at most ~10 times a second, so
logs and pipes stay quiet and a fast loop calling `advance` costs almost nothing.
`advance` may be called from any thread (scan workers report bytes hashed).
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TextIO

from manifests.units import format_size

_INTERVAL = 0.1
_BAR_WIDTH = 24


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _format_eta(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """`with Progress(total, "pushing") as p: p.advance(n)`; silent unless the stream is a TTY."""

    def __init__(
        self,
        total: int,
        label: str,
        stream: TextIO | None = None,
        *,
        enabled: bool = True,
    ) -> None:
        # Resolve sys.stderr at call time so a redirected stderr (tests, CLIs) is honoured.
        self.stream = stream if stream is not None else sys.stderr
        self.total = max(0, total)
        self.label = label
        self.done = 0
        self.enabled = enabled and _is_tty(self.stream)
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._width = 0
        self._closed = False

    def show(self) -> None:
        """Start drawing a bar created with enabled=False (work counted before it is shown)."""
        with self._lock:
            self.enabled = not self._closed and _is_tty(self.stream)

    def set_total(self, total: int) -> None:
        """For work whose size is known only once it has started (a tree walk)."""
        with self._lock:
            self.total = max(0, total)

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            if not self.enabled or self._closed:
                return
            now = time.monotonic()
            if now - self._last_draw < _INTERVAL:
                return
            self._last_draw = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        """The text of the bar as it would be drawn now (without the carriage return)."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        parts = [self.label]
        if self.total > 0:
            frac = min(self.done / self.total, 1.0)
            filled = int(frac * _BAR_WIDTH)
            parts.append("[" + "#" * filled + "-" * (_BAR_WIDTH - filled) + "]")
            parts.append(f"{frac * 100:5.1f}%")
            parts.append(f"{format_size(self.done)}/{format_size(self.total)}")
        else:
            parts.append(format_size(self.done))
        parts.append(f"{rate / 1e6:.0f} MB/s")
        if self.total > 0 and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_format_eta((self.total - self.done) / rate)}")
        return " ".join(parts)

    def _draw(self, now: float) -> None:
        text = self.line(now)
        pad = max(0, self._width - len(text))
        self._width = len(text)
        try:
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False

    def close(self) -> None:
        """Draw the final state and end the line (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.enabled:
                return
            self._draw(time.monotonic())
            try:
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
