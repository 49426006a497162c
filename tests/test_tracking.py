"""Issue 7.6: track ids across frames and the ``best_per_track`` crop policy.

Units: the greedy pairing, the IoU tracker (ids kept while moving, across dropped frames, ended
by age, new ids after), the crop choice (best score, unconfirmed tracks get none, hold time),
and the outbox's track rows (crop shed -> announcement rewritten; next track id kept across a
reopen). End to end: `edge-stn synth-video` scenes with per-object truth (H.264 where ffmpeg is
installed), the daemon with ``best_per_track`` through a real mosquitto, every payload validated
against the package's schemas, and tracking scored against the truth identities: the fraction
of truth objects that got exactly one track, identity switches, and crops per object (``every``
sends one per detection, by definition: the figure it is compared with).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from mqtt_broker import Mosquitto, Subscriber, wait_until
from synth_scenes import write_scenes

from edge_stn.accuracy import match_pairs
from edge_stn.config import CropConfig, TrackingConfig
from edge_stn.detect.nms import greedy_pairs
from edge_stn.detect.track_crops import TrackStage
from edge_stn.detect.tracker import CameraTracker, TrackerSettings
from edge_stn.publish import payloads
from edge_stn.publish.outbox import NewCrop, NewResult, Outbox
from edge_stn.records import Detection, Frame, FrameResult


def validate(kind: payloads.PayloadKind, doc: Any) -> None:
    schema = payloads.load_schema(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(doc)


# ---------------------------------------------------------------- units


def test_greedy_pairs_does_not_stop_at_a_used_row() -> None:
    # Sorted: (0,0) 0.9, (0,1) 0.8 (row 0 taken), (1,1) 0.7: still paired.
    assert greedy_pairs([[0.9, 0.8], [0.1, 0.7]], 0.5) == [(0, 0), (1, 1)]
    assert greedy_pairs([[0.4, np.nan]], 0.5) == []
    assert greedy_pairs(np.zeros((0, 3)), 0.5) == []


def box(x: float, y: float, s: float = 40.0) -> list[float]:
    return [x, y, x + s, y + s]


def test_tracker_keeps_ids_while_objects_move_and_ends_them_by_age() -> None:
    t = CameraTracker("cam0", TrackerSettings(iou=0.3, max_age=2, max_age_s=100, min_hits=2), 7)
    ids0, _ = t.update([box(0, 0), box(200, 0)], ["1", "2"], 0, 0.0)
    assert ids0 == [7, 8]
    for f in range(1, 5):  # both move 6 px a frame; the order of detections changes
        ids, ended = t.update([box(200 - 6 * f, 0), box(6 * f, 0)], ["2", "1"], f, f / 10)
        assert ids == [8, 7] and not ended
    # frames 5-7 are not processed (a live camera drops them); velocity carries the boxes
    ids, _ = t.update([box(48, 0), box(152, 0)], ["7", "1"], 8, 0.8)
    assert ids == [7, 8]
    assert t.tracks[0].label == "1"  # the majority, not the last label
    # object 8 leaves: 2 processed frames without it are survived, the third ends it
    for f in (9, 10):
        ids, ended = t.update([box(54 + 6 * (f - 9), 0)], ["1"], f, f / 10)
        assert ids == [7] and not ended
    ids, ended = t.update([box(66, 0)], ["1"], 11, 1.1)
    assert [e.track_id for e in ended] == [8] and ended[0].hits == 6
    ids, _ = t.update([box(72, 0), box(300, 200)], ["1", "4"], 12, 1.2)
    assert ids == [7, 9]  # a new object, a new id; ids are never reused


def test_tracker_ends_quiet_tracks_by_time() -> None:
    t = CameraTracker("cam0", TrackerSettings(max_age=100, max_age_s=1.0), 0)
    t.update([box(0, 0)], ["1"], 0, 10.0)
    assert t.expire(10.5) == []
    assert [e.track_id for e in t.expire(11.5)] == [0] and t.tracks == []


def detection(b: list[float], score: float, label: str = "3") -> Detection:
    affine = [[0.5, 0.0, b[0]], [0.0, 0.5, b[1]]]
    quad = [[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]]]
    return Detection(label, int(label), score, b, quad, affine)


def frame_result(i: int, dets: list[Detection], ts: float) -> tuple[FrameResult, Frame]:
    image = np.full((120, 320, 3), 40, np.uint8)
    image[20:60, 10 + 4 * i : 50 + 4 * i] = 200
    frame = Frame("cam0", i, ts, image)
    return FrameResult("cam0", i, ts, ts, 320, 120, tuple(dets)), frame


def test_best_per_track_keeps_the_best_crop_and_skips_unconfirmed_tracks() -> None:
    stage = TrackStage(
        TrackingConfig(max_age=1, min_hits=3), CropConfig(policy="best_per_track", size=32)
    )
    scores = [0.6, 0.95, 0.7, 0.8]
    chosen = []
    for i, s in enumerate(scores):
        dets = [detection(box(10 + 4 * i, 20), s)]
        if i == 0:
            dets.append(detection(box(250, 60, 30), 0.99, "8"))  # one frame only: unconfirmed
        result, frame = frame_result(i, dets, 100.0 + i / 10)
        tracked = stage.assign(result)
        assert all(d.crop_status == "policy" and d.crop is None for d in tracked.detections)
        assert tracked.detections[0].track_id == 0
        stage.offer(tracked, f"r{i}", frame, 32)
        chosen += stage.due()
    for i in (4, 5, 6):  # the object is gone: ended after max_age
        result, frame = frame_result(i, [], 100.0 + i / 10)
        stage.offer(stage.assign(result), f"r{i}", frame, 32)
        chosen += stage.due()
    assert len(chosen) == 1
    c = chosen[0]
    assert (c.track_id, c.result_id, c.index, c.score, c.reason) == (0, "r1", 0, 0.95, "ended")
    assert (c.hits, c.first_frame, c.last_frame, c.labels) == (4, 0, 3, {"3": 4})
    assert c.jpeg is not None and c.jpeg[:2] == b"\xff\xd8" and c.width == 32
    stats = stage.stats()
    assert stats["tracks_started"] == 2 and stats["crops_unconfirmed"] == 1
    assert stats["crops_chosen"] == 1 and stats["crops_held"] == 0


def test_best_per_track_sends_a_long_lived_track_once_after_hold_s() -> None:
    stage = TrackStage(
        TrackingConfig(min_hits=2, max_age_s=100), CropConfig(policy="best_per_track", hold_s=1.0)
    )
    chosen = []
    for i in range(30):  # 3 s of one object
        result, frame = frame_result(i, [detection(box(10 + i, 20), 0.9)], 100.0 + i / 10)
        stage.offer(stage.assign(result), f"r{i}", frame, 64)
        chosen += stage.due()
    assert [c.reason for c in chosen] == ["held"] and chosen[0].last_frame == 10
    assert stage.close() == []  # no second crop for the same track


def test_every_policy_tracks_without_holding_crops() -> None:
    stage = TrackStage(TrackingConfig(), CropConfig())
    result, frame = frame_result(0, [detection(box(10, 20), 0.9)], 100.0)
    tracked = stage.assign(result)
    assert tracked.detections[0].track_id == 0 and tracked.detections[0].crop_status == "off"
    stage.offer(tracked, "r0", frame, 64)
    assert stage.stats()["crops_held"] == 0 and stage.close() == []


def test_outbox_track_rows_shed_crop_and_next_track_id(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    now = time.time()
    announcement = {"track_id": 4, "crop": {"topic": "p/d/cam/c/crop/r1/0"}, "crop_status": "sent"}
    with Outbox(path, max_bytes=512 * 1024) as ob:
        ob.write(
            [
                NewResult("c", 0, "r1", "p/d/cam/c/result", b"{}", now, next_track_id=5),
                NewResult(
                    "c",
                    0,
                    "r1",
                    "p/d/cam/c/track",
                    payloads.encode(announcement),
                    now,
                    crops=(NewCrop("p/d/cam/c/crop/r1/0", b"\xff" * 1000),),
                    kind="track",
                ),
            ]
        )
        assert ob.next_seq() == {"c": 1} and ob.next_track_ids() == {"c": 5}
        kinds = [m.kind for m in ob.read(0, 10)]
        assert kinds == ["result", "track", "crop"]
        crop = [
            (m.row, ob._conn.execute("SELECT parent FROM message WHERE row = ?", (m.row,)))
            for m in ob.read(0, 10)
            if m.kind == "crop"
        ]
        row, cur = crop[0]
        parent = int(cur.fetchone()[0])
        report = ob.write()
        assert report.committed["track"] == 0
        ob._shed_crops([(row, parent, "p/d/cam/c/crop/r1/0", 1000)], report)
        doc = json.loads(next(m.payload for m in ob.read(0, 10) if m.kind == "track"))
        assert doc["crop"] is None and doc["crop_status"] == "shed"
    with Outbox(path, max_bytes=512 * 1024) as again:
        assert again.next_track_ids() == {"c": 5} and again.next_seq() == {"c": 1}
        assert Outbox.inspect(path).totals["tracks_committed"] == 1


# ---------------------------------------------------------------- end to end

SEEDS = (7201, 7202)
FRAMES = 240  # 16 s at 15 fps: two segments of new digits per video


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict[str, Any]]]:
    return write_scenes(tmp_path_factory.mktemp("tracking"), SEEDS, FRAMES)


def test_synthetic_truth_names_each_object_across_frames(
    scenes: list[tuple[Path, dict[str, Any]]],
) -> None:
    frames = scenes[0][1]["frames"]
    ids = [[o["object_id"] for o in f["objects"]] for f in frames]
    assert all(len(set(i)) == len(i) for i in ids)
    # the same ids frame after frame within a segment, new ones in the next
    assert ids[1] == ids[0] and set(ids[-1]).isdisjoint(ids[0])
    labels = {o["object_id"]: o["label"] for f in frames for o in f["objects"]}
    assert all(o["label"] == labels[o["object_id"]] for f in frames for o in f["objects"])


def test_best_per_track_end_to_end_against_truth(
    mosquitto: Mosquitto, tmp_path: Path, scenes: list[tuple[Path, dict[str, Any]]]
) -> None:
    pytest.importorskip("onnxruntime")
    from edge_stn.config import load_config
    from edge_stn.daemon import Daemon

    cameras = [{"id": f"cam{i}", "source": str(p)} for i, (p, _) in enumerate(scenes)]
    doc = {
        "device_id": "gw-track",
        "cameras": cameras,
        "crops": {"policy": "best_per_track"},
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
    }
    cfg = tmp_path / "daemon.yaml"
    cfg.write_text(json.dumps(doc))
    sub = Subscriber(mosquitto, ["edge-stn/gw-track/#"])
    expected = FRAMES * len(scenes)
    try:
        daemon = Daemon(load_config(cfg), config_path=cfg)
        assert daemon.run(install_signals=False) == 0
        stats = daemon.stats_document()
        wait_until(lambda: len(sub.on(lambda m: m.topic.endswith("/result"))) >= expected, 30)
        n_tracks = stats["tracking"]["crops_chosen"]
        wait_until(lambda: len(sub.on(lambda m: m.topic.endswith("/track"))) >= n_tracks, 10)
        wait_until(lambda: len(sub.on(lambda m: "/crop/" in m.topic)) >= n_tracks, 10)
        messages = sub.on(lambda m: True)
    finally:
        sub.close()
    results = [json.loads(m.payload) for m in messages if m.topic.endswith("/result")]
    tracks = [json.loads(m.payload) for m in messages if m.topic.endswith("/track")]
    crops = [m for m in messages if "/crop/" in m.topic]
    assert len(results) == expected
    for r in results:
        validate("result", r)
        assert r["schema_version"] == 2
        for d in r["detections"]:
            assert d["track_id"] is not None and d["crop_status"] == "policy"
    for t in tracks:
        validate("track", t)
    validate("stats", stats)
    assert len(tracks) == n_tracks > 0
    # every announced crop arrived, on the crop topic of the result it names, with its track
    sent = {t["crop"]["topic"]: t for t in tracks if t["crop_status"] == "sent"}
    assert len(sent) == len(tracks)
    assert {m.topic for m in crops} == set(sent)
    for m in crops:
        assert m.payload[:2] == b"\xff\xd8"
        assert m.user_properties["track_id"] == str(sent[m.topic]["track_id"])

    # score tracking against the truth identities
    truth = {
        f"cam{i}": {f["frame_index"]: f["objects"] for f in t["frames"]}
        for i, (_, t) in enumerate(scenes)
    }
    by_result = {r["id"]: r for r in results}
    seen: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    det_truth: dict[tuple[str, int], tuple[str, int]] = {}  # (result id, n) -> object
    for r in sorted(results, key=lambda r: (r["camera"], r["frame_index"])):
        objs = truth[r["camera"]][r["frame_index"]]
        pairs = match_pairs([d["box"] for d in r["detections"]], [o["box"] for o in objs])
        for i, j in pairs:
            obj = (r["camera"], objs[j]["object_id"])
            seen[obj].append((r["frame_index"], r["detections"][i]["track_id"]))
            det_truth[(r["id"], i)] = obj
    objects = [o for o, hits in seen.items() if len(hits) >= 3]  # detected long enough to track
    one_track = sum(len({tid for _, tid in seen[o]}) == 1 for o in objects)
    switches = sum(
        sum(a[1] != b[1] for a, b in zip(seen[o], seen[o][1:], strict=False)) for o in objects
    )
    crops_per_object = Counter(
        det_truth.get((t["result_id"], t["n"])) for t in tracks if t["result_id"] in by_result
    )
    unmatched_crops = crops_per_object.pop(None, 0)
    with_crop = [o for o in objects if crops_per_object[o] > 0]
    detections = sum(len(seen[o]) for o in objects)
    mean_crops = sum(crops_per_object[o] for o in objects) / len(objects)
    print(
        f"\ntracking over {len(results)} frames, {len(objects)} truth objects detected >= 3 "
        f"times: exactly one track {one_track}/{len(objects)} "
        f"({100 * one_track / len(objects):.0f}%), id switches {switches} over {detections} "
        f"matched detections; best_per_track crops: {len(tracks)} in all, "
        f"{mean_crops:.2f} per truth object ({len(with_crop)}/{len(objects)} objects got one), "
        f"{unmatched_crops} on no truth object; every: {detections / len(objects):.1f} crops "
        f"per object (one per detection); stats {stats['tracking']}"
    )
    assert one_track / len(objects) >= 0.6
    assert switches <= 0.05 * detections
    assert len(with_crop) >= 0.8 * len(objects)
    assert mean_crops <= 2.0
    assert detections / len(objects) >= 10 * mean_crops  # what the policy is for
