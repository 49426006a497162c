"""Time policies of a reader, kept apart from threads so they can be tested with a fake clock.

:class:`Backoff` spaces the reconnect attempts of a live source (capped exponential, jittered so
that cameras behind one failed switch do not all retry in the same instant). :class:`Pacer`
applies a camera's ``fps``: a file waits until its next frame is due, a live source skips frames
that arrive before it (the stream is still drained, so it never lags).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]


@dataclass
class Backoff:
    """Delays ``initial * factor**n`` capped at ``cap``, each multiplied by a random factor in
    ``[1 - jitter, 1]`` (so a delay never exceeds the cap). :meth:`reset` after a good frame."""

    initial: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.25
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ValueError(f"need 0 < initial <= cap, got {self.initial}, {self.cap}")
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def ceiling(self, attempt: int) -> float:
        """The delay before jitter of the given attempt (0-based)."""
        # Bound the exponent: factor**attempt overflows a float after ~1000 failed attempts.
        return min(self.cap, self.initial * self.factor ** min(attempt, 64))

    def next_delay(self) -> float:
        delay = self.ceiling(self.attempts) * (1.0 - self.jitter * self.rng.random())
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0


class Pacer:
    """Spaces frames ``1 / fps`` apart on a monotonic clock; ``fps=None`` never waits.

    The schedule advances by one period per frame, so small delays are caught up; after a delay
    longer than a period (a stall, a slow consumer) it restarts from now instead of bursting.
    """

    def __init__(self, fps: float | None, clock: Clock = time.monotonic) -> None:
        if fps is not None and fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.period = 1.0 / fps if fps else 0.0
        self._clock = clock
        self._next: float | None = None

    @property
    def paced(self) -> bool:
        return self.period > 0

    def wait_s(self) -> float:
        """Seconds until the next frame is due (0 when it is due, or when unpaced)."""
        if not self.paced or self._next is None:
            return 0.0
        return max(0.0, self._next - self._clock())

    def due(self) -> bool:
        """For live sources: whether a frame arriving now should be delivered. A quarter period
        of tolerance keeps arrival jitter from costing a paced stream every other slot."""
        if not self.paced or self._next is None:
            return True
        return self._clock() >= self._next - 0.25 * self.period

    def mark(self) -> None:
        """A frame was delivered now: schedule the next one."""
        if not self.paced:
            return
        now = self._clock()
        if self._next is None or now - self._next > self.period:
            self._next = now + self.period
        else:
            self._next += self.period
