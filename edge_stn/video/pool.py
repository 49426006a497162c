"""Frame buffers used again once no stage holds them.

A 720p BGR frame is 2.7 MB. Allocated fresh for every frame, it is a new mapping (the daemon
fixes malloc's mmap threshold below frame size, :mod:`edge_stn.ops.memory`) that the kernel
must fault in and zero page by page: about 700 page faults per 720p frame, which cost the
reader thread more CPU time than the rest of its work (docs/benchmarks.md). A source that
decodes into a buffer of its :class:`FramePool` writes into pages that are already resident.

A buffer is free when nothing but the pool refers to it. Every view of a frame (the read-only
image of a :class:`edge_stn.records.Frame`, a crop's slice, a window's part) refers to the
buffer that owns the pixels, so the buffer's reference count says whether any stage still
holds the frame; the count of a buffer that only the pool holds is measured once, on a probe,
the same way. The pool keeps the buffers in use plus at most ``spares`` free ones, and never
more than ``limit``: past the limit (a backlog), frames are allocated as before and freed when
dropped, so the pool's memory follows the frames actually in flight.

One pool belongs to one source and is used from the thread that reads it. The test relies on
CPython's reference counts (exact on the builds this project supports, 3.10 and later with the
GIL); :mod:`tests.test_pool` checks it, and fails if a held frame could be handed out again.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

POOL_LIMIT = 8
"""Buffers a pool keeps at most: a live camera has 2-4 frames in flight (read, in the detector
stage, queued for publishing); a file up to about 20 when the publisher falls behind."""
POOL_SPARES = 1
"""Free buffers kept beyond those in use (the next frame's)."""

Buffer = npt.NDArray[np.uint8]


class FramePool:
    def __init__(self, limit: int = POOL_LIMIT, spares: int = POOL_SPARES) -> None:
        if limit < 1 or spares < 0:
            raise ValueError(
                f"a frame pool needs limit >= 1 and spares >= 0, got {limit}, {spares}"
            )
        self.limit = limit
        self.spares = spares
        self._buffers: list[Buffer] = [np.empty(0, np.uint8)]
        self._held_by_pool_only = self._counts()[0]
        self._buffers.clear()
        self.allocated = 0
        """Buffers made (pooled or not): frames that did not reuse one."""

    def _counts(self) -> list[int]:
        return [sys.getrefcount(b) for b in self._buffers]

    def __len__(self) -> int:
        return len(self._buffers)

    def free(self) -> int:
        """Buffers no stage holds."""
        return sum(c <= self._held_by_pool_only for c in self._counts())

    def take(self, shape: tuple[int, ...]) -> Buffer:
        """A buffer of ``shape`` (uint8) for the next frame: a free one of the pool, or a new
        one (kept in the pool while it is under its limit). Free buffers of another shape, and
        free ones beyond the spares, are let go."""
        counts = self._counts()
        free = [
            b for b, c in zip(self._buffers, counts, strict=True) if c <= self._held_by_pool_only
        ]
        # the one taken and ``spares`` more of this shape stay; the other free ones go
        kept = [b for b in free if b.shape == shape][: 1 + self.spares]
        let_go = {id(b) for b in free} - {id(b) for b in kept}
        self._buffers = [b for b in self._buffers if id(b) not in let_go]
        if kept:
            return kept[0]
        buffer: Buffer = np.empty(shape, np.uint8)
        self.allocated += 1
        if len(self._buffers) < self.limit:
            self._buffers.append(buffer)
        return buffer

    def adopt(self, image: Buffer) -> None:
        """Keep ``image`` (a frame the decoder allocated itself: its size changed) for reuse,
        while the pool is under its limit."""
        if len(self._buffers) < self.limit and image.base is None and image.flags.owndata:
            self._buffers.append(image)


class Readable(Protocol):
    """The read call of ``cv2.VideoCapture``: into ``image`` when it has the frame's size."""

    def read(self, image: Any = ..., /) -> tuple[bool, Any]: ...


class PooledReader:
    """Reads of one capture into its pool's buffers: the first frame (size unknown) and a
    frame whose size changed come from the decoder's own allocation, which the pool adopts."""

    def __init__(self, pool: FramePool | None = None) -> None:
        self.pool = pool if pool is not None else FramePool()
        self._shape: tuple[int, ...] | None = None

    def read(self, cap: Readable) -> tuple[bool, Any]:
        if self._shape is None:
            ok, image = cap.read()
        else:
            buffer = self.pool.take(self._shape)
            ok, image = cap.read(buffer)
            if not ok or image is buffer:
                return ok, image
        if ok and isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.size:
            self._shape = image.shape
            self.pool.adopt(image)
        return ok, image
