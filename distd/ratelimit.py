"""A token bucket for byte streams: caps a node's egress or ingress so it never starves its NIC.

The bucket may go into debt: a caller takes its tokens at once and sleeps exactly
as long as it takes the refill to pay the deficit back. So there are no polling
quanta, a request larger than the burst cannot deadlock, and concurrent callers
share the configured aggregate rate: while one pays off its debt, those who come
wait their turn in order of a priority they give, then of arrival.

Time is injectable (`clock`, `sleep`) so tests and the simulator can drive the
bucket without real sleeps; by default it reads the running loop's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections.abc import Awaitable, Callable

# Without an explicit burst the bucket holds this many seconds of traffic: enough
# to absorb scheduling jitter, small enough that a cap is a cap from the first second.
DEFAULT_BURST_SECONDS = 0.1
# How long the turn is kept for a stream that has just paid and outranks every waiter,
# for its next slice to come back (the socket's next read). Far less than the burst, so
# the bucket fills meanwhile and no rate is lost.
HANDOVER_GRACE = 0.002


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
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0
        self._paying = 0  # callers between taking their tokens and handing over
        self._handing_over = False  # a hand-over is scheduled
        self._grace: asyncio.TimerHandle | None = None
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

    async def consume(self, n: int, priority: float = 0.0) -> None:
        """Wait until `n` bytes may be sent at the configured rate.

        While one caller pays off a debt, the others wait their turn by `priority`
        (lower first, then arrival): a node reads the chunk its neighbours lack before
        the one they all hold, so the rare one is whole, and passed on, sooner.
        """
        if n <= 0 or self.unlimited:
            return
        if self._waiting or self._paying:
            self._seq += 1
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (priority, self._seq, turn)
            heapq.heappush(self._waiting, entry)
            if self._grace is not None and self._waiting[0] is entry:
                self._grace.cancel()  # the turn was kept for us: take it now
                self._hand_over()
            try:
                await turn  # the hand-over counts us as the payer
            except asyncio.CancelledError:
                if turn.cancelled():  # still waiting: leave the queue
                    with contextlib.suppress(ValueError):
                        self._waiting.remove(entry)
                        heapq.heapify(self._waiting)
                else:  # our turn came as we were cancelled: pass it on
                    self._paying -= 1
                    self._hand_over_soon(None)
                raise
        else:
            self._paying += 1
        try:
            delay = self.reserve(n)
            if delay > 0:
                try:
                    await self._sleep(delay)
                except asyncio.CancelledError:
                    self.refund(n)
                    raise
        finally:
            self._paying -= 1
            self._hand_over_soon(priority)

    def _hand_over_soon(self, last: float | None) -> None:
        """The debt is paid (or its payer gone): choose who goes next once the payer has
        had its chance to queue again. A stream pays slice after slice; chosen at once,
        the next payer would be picked while the one that just paid is not yet back in
        line, and two streams would take turns whatever their priorities."""
        if not self._handing_over:
            self._handing_over = True
            asyncio.get_running_loop().call_soon(self._hand_over, last)

    def _hand_over(self, last: float | None = None) -> None:
        """The best waiter goes next; but if the payer that just finished (`last`, its
        priority) outranks them all, its turn is kept for HANDOVER_GRACE first."""
        self._handing_over = False
        self._grace = None
        if self._paying:
            return  # someone found the line empty and pays: its own hand-over follows
        if last is not None and self._waiting and last < self._waiting[0][0]:
            self._handing_over = True
            loop = asyncio.get_running_loop()
            self._grace = loop.call_later(HANDOVER_GRACE, self._hand_over)
            return
        while self._waiting:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():
                self._paying += 1
                turn.set_result(None)
                return
