"""A token bucket for byte streams: caps a node's egress or ingress so it never starves its NIC.

The bucket may go into debt: a caller takes its tokens at once and sleeps exactly
as long as it takes the refill to pay the deficit back. So there are no polling
quanta, a request larger than the burst cannot deadlock, and concurrent callers
are served in arrival order at the configured aggregate rate.

Time is injectable (`clock`, `sleep`) so tests and the simulator can drive the
bucket without real sleeps; by default it reads the running loop's clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

# Without an explicit burst the bucket holds this many seconds of traffic: enough
# to absorb scheduling jitter, small enough that a cap is a cap from the first second.
DEFAULT_BURST_SECONDS = 0.1


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class TokenBucket:
    """`rate` bytes per second (None or 0: unlimited), holding at most `burst` bytes of credit."""

    def __init__(
        self,
        rate: float | None,
        burst: float | None = None,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self._clock = clock or _loop_time
        self._sleep = sleep or asyncio.sleep
        self._rate = 0.0
        self._burst = 0.0
        self._tokens = 0.0
        self._last: float | None = None
        self.set_rate(rate, burst)
        self._tokens = self._burst

    @property
    def rate(self) -> float | None:
        """Bytes per second, or None when unlimited."""
        return self._rate or None

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def unlimited(self) -> bool:
        return self._rate <= 0

    def set_rate(self, rate: float | None, burst: float | None = None) -> None:
        """Change the cap at run time (e.g. from config); credit above the new burst is dropped."""
        if rate is not None and rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        if burst is not None and burst < 0:
            raise ValueError(f"burst must be >= 0, got {burst}")
        if self._last is not None:
            self._refill()
        self._rate = float(rate or 0)
        self._burst = float(burst) if burst is not None else self._rate * DEFAULT_BURST_SECONDS
        self._tokens = min(self._tokens, self._burst)

    def _refill(self) -> None:
        now = self._clock()
        if self._last is not None and now > self._last:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now if self._last is None else max(self._last, now)

    @property
    def tokens(self) -> float:
        """Current credit in bytes (negative while in debt)."""
        if not self.unlimited:
            self._refill()
        return self._tokens

    def reserve(self, n: int) -> float:
        """Take `n` bytes of credit now; return the seconds to wait before sending them."""
        if n <= 0 or self.unlimited:
            return 0.0
        self._refill()
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    def refund(self, n: int) -> None:
        """Give back credit for bytes that were reserved but never sent."""
        if n > 0 and not self.unlimited:
            self._tokens = min(self._burst, self._tokens + n)

    async def consume(self, n: int) -> None:
        """Wait until `n` bytes may be sent at the configured rate."""
        delay = self.reserve(n)
        if delay <= 0:
            return
        try:
            await self._sleep(delay)
        except asyncio.CancelledError:
            self.refund(n)
            raise
