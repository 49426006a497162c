"""OpenCV's own worker threads, switched off in the daemon.

By default OpenCV splits a call (a resize, a blur, a colour conversion) over a pool of one
worker per core, and its idle workers spin (``sched_yield``) before they sleep. The daemon
already keeps every core busy with threads of its own (each camera's decoder, the detector
stage and its preparation lanes, ONNX Runtime, the publisher), and its OpenCV calls are small
(a window, a crop, a reduced copy of a frame): split again they cost more than they gain. On
the 2-core benchmark machine a 720p file took some 900 ``sched_yield`` calls per frame and
0.8 ms more CPU per frame with OpenCV's pool than without it (docs/benchmarks.md).

Video decoding is not affected: FFmpeg's threads are its own. An operator who set
``OPENCV_FOR_THREADS_NUM`` keeps that choice.
"""

from __future__ import annotations

import logging
import os

import cv2

logger = logging.getLogger(__name__)

OPENCV_THREADS_ENV = "OPENCV_FOR_THREADS_NUM"


def opencv_on_calling_threads() -> bool:
    """Run OpenCV's calls on the threads that make them (no worker pool); True when set, False
    when the operator's ``OPENCV_FOR_THREADS_NUM`` decides."""
    if os.environ.get(OPENCV_THREADS_ENV):
        return False
    cv2.setNumThreads(1)
    logger.debug("OpenCV runs on the calling threads (no worker pool)")
    return True
