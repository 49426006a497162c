"""The MQTT topic tree (DESIGN §6), one place that spells every topic.

::

    <prefix>/<device>/status                              QoS 1, retained: online / offline
    <prefix>/<device>/stats                               QoS 0: periodic health
    <prefix>/<device>/cam/<camera>/result                 QoS 1: one JSON per processed frame
    <prefix>/<device>/cam/<camera>/crop/<result-id>/<n>   QoS 1: JPEG of detection n
    <prefix>/<device>/cam/<camera>/track                  QoS 1: a track's chosen crop
    <prefix>/<device>/cmd/<name>                          QoS 1: commands in
    <prefix>/<device>/cmd/<name>/reply                    QoS 1: their replies

``prefix`` may have several levels (``site-a/edge-stn``); device, camera and command names
follow the id rule of :func:`edge_stn.config.check_id`, so no level is empty, holds a wildcard
or collides with ``status``, ``stats``, ``cam`` or ``cmd``. Torch-free, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from edge_stn.config import ID_PATTERN, check_id

STATUS = "status"
STATS = "stats"
CAM = "cam"
CMD = "cmd"
RESULT = "result"
CROP = "crop"
TRACK = "track"
REPLY = "reply"

RESULT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

TopicKind = Literal["status", "stats", "result", "crop", "track", "cmd", "reply"]


def check_result_id(value: str) -> str:
    """A result id as it appears in a crop topic: 1-64 characters among ``A-Za-z0-9_-``."""
    if not isinstance(value, str) or not RESULT_ID_PATTERN.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid result id (1-64 of A-Z a-z 0-9 _ -)")
    return value


@dataclass(frozen=True)
class TopicTree:
    """The topics of one device under one prefix.

    ``TopicTree("edge-stn", "gw1").result("cam0") == "edge-stn/gw1/cam/cam0/result"``.
    """

    prefix: str
    device: str

    def __post_init__(self) -> None:
        if not self.prefix or any(not level for level in self.prefix.split("/")):
            raise ValueError(f"topic prefix {self.prefix!r} has an empty level")
        if set(self.prefix) & {"+", "#", "\0"}:
            raise ValueError(f"topic prefix {self.prefix!r} contains an MQTT wildcard")
        check_id(self.device)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/{STATUS}"

    @property
    def stats(self) -> str:
        return f"{self.base}/{STATS}"

    def result(self, camera: str) -> str:
        return f"{self.base}/{CAM}/{check_id(camera)}/{RESULT}"

    def crop(self, camera: str, result_id: str, n: int) -> str:
        """The topic of the crop of detection ``n`` (0-based index in ``detections``)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"crop index must be an integer >= 0, got {n!r}")
        return f"{self.base}/{CAM}/{check_id(camera)}/{CROP}/{check_result_id(result_id)}/{n}"

    def track(self, camera: str) -> str:
        """Track announcements of a camera (crops.policy ``best_per_track``)."""
        return f"{self.base}/{CAM}/{check_id(camera)}/{TRACK}"

    def cmd(self, name: str) -> str:
        return f"{self.base}/{CMD}/{check_id(name)}"

    def cmd_reply(self, name: str) -> str:
        return f"{self.cmd(name)}/{REPLY}"


def subscription(
    prefix: str,
    kind: TopicKind,
    *,
    device: str | None = None,
    camera: str | None = None,
) -> str:
    """A topic filter for consumers: ``device``/``camera`` None means every one (``+``).

    ``subscription("edge-stn", "result") == "edge-stn/+/cam/+/result"``;
    crops: ``<prefix>/<device>/cam/<camera>/crop/#``.
    """
    dev = check_id(device) if device is not None else "+"
    cam = check_id(camera) if camera is not None else "+"
    base = f"{prefix}/{dev}"
    if kind in (STATUS, STATS):
        return f"{base}/{kind}"
    if kind == RESULT:
        return f"{base}/{CAM}/{cam}/{RESULT}"
    if kind == CROP:
        return f"{base}/{CAM}/{cam}/{CROP}/#"
    if kind == TRACK:
        return f"{base}/{CAM}/{cam}/{TRACK}"
    if kind == CMD:
        return f"{base}/{CMD}/+"
    if kind == REPLY:
        return f"{base}/{CMD}/+/{REPLY}"
    raise ValueError(f"unknown topic kind {kind!r}")


@dataclass(frozen=True)
class ParsedTopic:
    """What a topic of the tree names; fields that do not apply are None."""

    kind: TopicKind
    device: str
    camera: str | None = None
    result_id: str | None = None
    index: int | None = None
    name: str | None = None


def parse_topic(prefix: str, topic: str) -> ParsedTopic | None:
    """The parts of a topic of the tree under ``prefix``, or None if it is not one."""
    head = f"{prefix}/"
    if not topic.startswith(head):
        return None
    levels = topic[len(head) :].split("/")
    if len(levels) < 2 or not ID_PATTERN.fullmatch(levels[0]):
        return None
    device, rest = levels[0], levels[1:]
    if rest in ([STATUS], [STATS]):
        return ParsedTopic(kind=rest[0], device=device)  # type: ignore[arg-type]
    if len(rest) >= 3 and rest[0] == CAM:
        camera = rest[1]
        if rest[2:] == [RESULT]:
            return ParsedTopic(kind="result", device=device, camera=camera)
        if rest[2:] == [TRACK]:
            return ParsedTopic(kind="track", device=device, camera=camera)
        if len(rest) == 5 and rest[2] == CROP and rest[4].isdigit():
            return ParsedTopic(
                kind="crop", device=device, camera=camera, result_id=rest[3], index=int(rest[4])
            )
        return None
    if len(rest) == 2 and rest[0] == CMD:
        return ParsedTopic(kind="cmd", device=device, name=rest[1])
    if len(rest) == 3 and rest[0] == CMD and rest[2] == REPLY:
        return ParsedTopic(kind="reply", device=device, name=rest[1])
    return None
