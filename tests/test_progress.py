"""The progress bar draws on a terminal only, rarely, and survives many threads."""

from __future__ import annotations

import io
import threading

from manifests.progress import Progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_when_not_a_terminal() -> None:
    out = io.StringIO()
    with Progress(100, "pushing", stream=out) as p:
        p.advance(50)
        p.advance(50)
    assert out.getvalue() == ""
    assert p.done == 100


def test_draws_percent_sizes_rate_and_ends_the_line() -> None:
    out = FakeTTY()
    with Progress(4 << 20, "pushing", stream=out) as p:
        p.advance(1 << 20)
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    last = text.rstrip("\n").split("\r")[-1]
    assert "pushing" in last and "25.0%" in last
    assert "1.0 MiB/4.0 MiB" in last and "MB/s" in last and "ETA" in last


def test_redraws_at_most_ten_times_a_second() -> None:
    out = FakeTTY()
    p = Progress(1_000_000, "x", stream=out)
    for _ in range(10_000):
        p.advance(1)
    p.close()
    assert out.getvalue().count("\r") <= 3


def test_unknown_total_and_late_total() -> None:
    p = Progress(0, "hashing", stream=FakeTTY())
    p.advance(2048)
    assert "%" not in p.line() and "2.0 KiB" in p.line()
    p.set_total(4096)
    assert "50.0%" in p.line()
    p.close()
    p.close()  # idempotent


def test_thread_safe_counts() -> None:
    p = Progress(8 * 10_000, "x", stream=FakeTTY())

    def work() -> None:
        for _ in range(10_000):
            p.advance(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p.close()
    assert p.done == 80_000


def test_disabled_explicitly() -> None:
    out = FakeTTY()
    with Progress(10, "x", stream=out, enabled=False) as p:
        p.advance(10)
    assert out.getvalue() == ""
