"""A token bucket with an adaptive rate, time passed in (no clock reads)."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up.

    ``slow_down`` halves the current rate (down to ``floor``) when a carrier
    says ESME_RTHROTTLED; ``speed_up`` creeps back toward the configured
    rate on every success (additive increase, multiplicative decrease).
    The slow-down is kept as a factor of ``max_rate`` (``factor``), apart
    from the floor, so that a new share of the rate (``rescale``) keeps it.
    """

    __slots__ = ("max_rate", "rate", "burst", "tokens", "stamp", "floor", "asked", "factor")

    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        self.max_rate = rate
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self.tokens = self.burst
        self.stamp = now
        self.floor = _floor(rate)
        self.asked = 0  # take() calls: the demand reported by a worker (router/shares.py)
        self.factor = 1.0  # 1/2 per slow_down (down to 1/64), +1/100 per speed_up

    def _refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 if granted, else seconds until one is due."""
        self.asked += 1
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def slow_down(self) -> None:
        self.factor = max(_MIN_FACTOR, self.factor / 2)
        self.rate = max(self.floor, self.max_rate * self.factor)

    def speed_up(self) -> None:
        if self.factor < 1.0:
            self.factor = min(1.0, self.factor + 0.01)
            self.rate = max(self.floor, self.max_rate * self.factor)

    def set_rate(self, rate: float) -> None:
        """A new configured rate (e.g. on reload); the burst follows it."""
        self.factor = 1.0
        self.rescale(rate)

    def rescale(self, rate: float) -> None:
        """A new share of the configured rate (router/shares.py): like
        ``set_rate``, but a carrier that is being slowed down stays slowed
        down by the same factor."""
        self.max_rate = rate
        self.burst = max(1.0, rate / 10)
        self.tokens = min(self.tokens, self.burst)
        self.floor = _floor(rate)
        self.rate = max(self.floor, rate * self.factor)


_MIN_FACTOR = 1 / 64


def _floor(rate: float) -> float:
    """How far ``slow_down`` may go: 1/64 of the rate, at least 1/s, and
    never above the configured rate itself (a carrier limited to 0.5/s, or a
    worker's share of 1/s, must not be sped up by a throttling answer)."""
    return min(rate, max(1.0, rate / 64))
