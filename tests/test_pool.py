"""Frame buffers used again (edge_stn.video.pool): a buffer is reused only when no stage holds
any view of it, and a frame a stage still holds never changes under it. Videos are real files
written by OpenCV; the synthetic camera is the real one."""

from __future__ import annotations

import gc
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_stn.records import Frame
from edge_stn.video import FileSource, SyntheticCamera
from edge_stn.video.pool import FramePool, PooledReader

SHAPE = (48, 64, 3)


def test_a_buffer_held_through_a_frame_record_or_a_slice_is_not_reused() -> None:
    pool = FramePool(limit=4, spares=1)
    first = pool.take(SHAPE)
    first_id = id(first)
    frame = Frame("cam", 0, 0.0, first)  # the record keeps a read-only view
    part = frame.image[10:20, 5:9]
    del first
    second = pool.take(SHAPE)
    assert second is not frame.image.base
    del frame
    gc.collect()
    third = pool.take(SHAPE)
    assert third is not part.base  # the slice still holds the first buffer
    assert third is not second
    del part, third
    again = pool.take(SHAPE)
    assert id(again) == first_id  # free again once the slice is gone
    assert len(pool) == 3  # the first (taken), the second (held here) and one spare
    assert pool.allocated == 3


def test_a_dropped_frame_buffer_is_the_next_one_taken() -> None:
    pool = FramePool()
    buf = pool.take(SHAPE)
    ident = id(buf)
    frame = Frame("cam", 0, 0.0, buf)
    del buf, frame
    assert id(pool.take(SHAPE)) == ident
    assert pool.allocated == 1


def test_the_pool_keeps_the_frames_in_flight_plus_spares_and_never_more_than_its_limit() -> None:
    pool = FramePool(limit=5, spares=1)
    held = [pool.take(SHAPE) for _ in range(8)]
    assert len({id(b) for b in held}) == 8  # a held buffer is never handed out twice
    assert len(pool) == 5 and pool.allocated == 8
    del held
    kept = pool.take(SHAPE)
    assert len(pool) == 2  # the one taken and one spare; the other free ones are let go
    assert pool.free() == 1
    other = pool.take((10, 10, 3))  # another size: the free buffers of the old one go
    assert other.shape == (10, 10, 3)
    assert len(pool) == 2 and pool.free() == 0
    assert kept.shape == SHAPE


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="limit"):
        FramePool(limit=0)


def write_video(path: Path, n: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, (SHAPE[1], SHAPE[0]))
    assert writer.isOpened()
    for i in range(n):
        img = np.random.default_rng(i).integers(0, 255, SHAPE, dtype=np.uint8)
        writer.write(img)
    writer.release()
    return path


def test_frames_read_into_pooled_buffers_equal_plain_reads_and_held_ones_never_change(
    tmp_path: Path,
) -> None:
    video = write_video(tmp_path / "v.avi", 30)
    reference = []
    cap = cv2.VideoCapture(str(video))
    while True:
        ok, img = cap.read()
        if not ok:
            break
        reference.append(img)
    cap.release()
    assert len(reference) == 30

    source = FileSource("cam", video)
    source.open()
    held: dict[int, Frame] = {}
    seen = 0
    while (frame := source.read()) is not None:
        np.testing.assert_array_equal(frame.image, reference[frame.index])
        if frame.index % 3 == 0:
            held[frame.index] = frame  # a stage that keeps some frames for a while
        seen += 1
        del frame
    source.close()
    assert seen == 30
    for index, frame in held.items():  # later reads reused buffers, never these
        np.testing.assert_array_equal(frame.image, reference[index])
    reader = source._reader
    assert reader.pool.allocated < 30  # buffers of dropped frames were reused


def test_a_capture_that_allocates_its_own_frames_is_adopted_then_read_into() -> None:
    class Capture:
        def __init__(self) -> None:
            self.into: list[bool] = []

        def read(self, image: np.ndarray | None = None, /) -> tuple[bool, np.ndarray]:
            self.into.append(image is not None)
            out = image if image is not None else np.empty(SHAPE, np.uint8)
            out[:] = len(self.into)
            return True, out

    cap, reader = Capture(), PooledReader(FramePool())
    first = reader.read(cap)[1]
    ident = id(first)
    del first
    second = reader.read(cap)[1]
    assert cap.into == [False, True]
    assert id(second) == ident and int(second[0, 0, 0]) == 2


def test_the_synthetic_camera_renders_into_pooled_buffers_the_same_pixels() -> None:
    cam = SyntheticCamera("cam", width=96, height=64, fps=1000.0, seed=3)
    cam.open()
    frames = [cam.read() for _ in range(6)]
    kept = frames[::2]
    for frame in frames:
        assert frame is not None
        expected, _ = cam.generator.frame_bgr(frame.index)
        np.testing.assert_array_equal(frame.image, expected)
    del frames
    more = [cam.read() for _ in range(6)]
    cam.close()
    for frame in [*kept, *more]:
        assert frame is not None
        np.testing.assert_array_equal(frame.image, cam.generator.frame_bgr(frame.index)[0])
    assert cam._pool.allocated < 12
