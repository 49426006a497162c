"""The durable outbox (SQLite, WAL) on its own: identity across restarts, the file lock, corrupt
and foreign files, settlements and dead letters, the budget policy, and a crash of the writer."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from edge_stn.cli import main
from edge_stn.config import check_config, parse_config
from edge_stn.errors import ConfigError
from edge_stn.publish.outbox import (
    AGE_CHECK_S,
    CODE_DISCONNECTS,
    NewCrop,
    NewResult,
    Outbox,
    OutboxError,
    Refusal,
    Settlement,
)

ROOT = Path(__file__).resolve().parents[1]


def result(
    seq: int, camera: str = "cam0", crops: int = 0, crop_bytes: int = 2000, pad: int = 0
) -> NewResult:
    rid = f"r{camera}{seq}"
    topics = [f"edge-stn/gw1/cam/{camera}/crop/{rid}/{n}" for n in range(crops)]
    doc = {
        "id": rid,
        "camera": camera,
        "seq": seq,
        "detections": [{"crop": {"topic": t}, "crop_status": "sent"} for t in topics],
        "pad": "x" * pad,
    }
    return NewResult(
        camera=camera,
        seq=seq,
        result_id=rid,
        topic=f"edge-stn/gw1/cam/{camera}/result",
        payload=json.dumps(doc).encode(),
        created=time.time(),
        crops=tuple(NewCrop(t, os.urandom(crop_bytes), (("label", "7"),)) for t in topics),
    )


def test_epoch_and_seq_live_with_the_outbox(tmp_path: Path) -> None:
    path = tmp_path / "ob.sqlite"
    with Outbox(path) as ob:
        assert ob.created and ob.next_seq() == {}
        epoch = ob.epoch
        ob.write([result(0), result(1), result(0, "cam1")])
        assert ob.next_seq() == {"cam0": 2, "cam1": 1}
        rows = ob.read(0, 10)
        assert [(m.kind, m.camera, m.seq) for m in rows] == [
            ("result", "cam0", 0),
            ("result", "cam0", 1),
            ("result", "cam1", 0),
        ]
        ob.write(settlements=[Settlement(rows[0].row, 0x00), Settlement(rows[1].row, 0x10)])
        assert [m.seq for m in ob.read(0, 10)] == [0], "acknowledged (0x00, 0x10) rows go"
    with Outbox(path) as again:  # a restart: same epoch, seq goes on
        assert not again.created and again.epoch == epoch
        assert again.next_seq() == {"cam0": 2, "cam1": 1}
        assert [m.result_id for m in again.read(0, 10)] == ["rcam10"]
    report = Outbox.inspect(path)
    assert (report.epoch, report.produced, report.totals["results_acked"]) == (epoch, 3, 2)
    with Outbox(tmp_path / "other.sqlite") as other:
        assert other.epoch != epoch, "a new outbox is a new epoch"


def test_two_users_of_one_outbox_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ob.sqlite"
    with Outbox(path):
        with pytest.raises(
            OutboxError, match=rf"in use by another edge-stn process \(pid {os.getpid()}\)"
        ):
            Outbox(path)
        probe = textwrap.dedent(
            """
            import sys
            from edge_stn.publish.outbox import Outbox, OutboxError
            try:
                Outbox(sys.argv[1])
            except OutboxError as exc:
                print(exc)
                sys.exit(2)
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", probe, str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
        assert proc.returncode == 2 and "in use by another edge-stn process" in proc.stdout
    with Outbox(path):  # released on close
        pass


def test_a_second_daemon_on_the_same_outbox_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ob.sqlite"
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        json.dumps(
            {
                "device_id": "gw1",
                "cameras": [{"id": "cam0", "source": "synthetic"}],
                "outbox": {"path": str(path)},
            }
        )
    )
    with Outbox(path):
        assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outbox.path" in err[0] and "in use" in err[0], err


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database" * 100)
    Path(f"{path}-wal").write_bytes(b"x" * 500)
    Path(f"{path}-shm").write_bytes(b"y" * 500)


def _foreign(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE notes(text TEXT)")
    conn.execute("INSERT INTO notes VALUES ('someone else''s data')")
    conn.commit()
    # leave it open-looking: copy the -wal and -shm as a crashed writer would leave them
    Path(f"{path}-wal").write_bytes(b"w" * 100)
    Path(f"{path}-shm").write_bytes(b"s" * 100)
    conn.close()
    Path(f"{path}-wal").write_bytes(b"w" * 100)
    Path(f"{path}-shm").write_bytes(b"s" * 100)


def _truncated(path: Path) -> None:
    with Outbox(path) as ob:
        ob.write([result(i, crops=2) for i in range(50)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + b"\0" * 4096 + data[len(data) // 2 + 4096 :][:100])


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_garbage, "not an SQLite database"),
        (_foreign, "another application"),
        (_truncated, ""),
        (lambda p: p.write_bytes(b""), "not an SQLite database"),
    ],
)
def test_a_corrupt_or_foreign_outbox_is_moved_aside_with_its_wal_and_shm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, why: str
) -> None:
    path = tmp_path / "ob.sqlite"
    old_epoch = None
    if damage is _truncated:
        with Outbox(path) as ob:
            old_epoch = ob.epoch
        path.unlink()
    damage(path)  # type: ignore[operator]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("ob.sqlite")}
    before.pop("ob.sqlite.lock", None)
    with caplog.at_level(logging.WARNING, logger="edge_stn.publish.outbox"), Outbox(path) as ob:
        assert ob.created and ob.moved_aside is not None
        assert ob.epoch != old_epoch
        ob.write([result(0)])
        assert ob.next_seq() == {"cam0": 1}
    moved = ob.moved_aside
    assert moved.name.startswith("ob.sqlite.corrupt-")
    # never deleted: the same bytes, the database with its -wal and -shm under one new name
    for name, data in before.items():
        assert Path(str(moved) + name.removeprefix("ob.sqlite")).read_bytes() == data
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unusable" in warnings[0] and "new epoch" in warnings[0]
    assert why in warnings[0] and moved.name in warnings[0]


def test_refusals_and_repeated_disconnects_are_dead_lettered(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite", max_disconnects=3) as ob:
        ob.write([result(0), result(1), result(2, crops=1)])
        r0, r1, r2, c2 = ob.read(0, 10)
        report = ob.write(settlements=[Settlement(r0.row, 0x87, "Not authorized (0x87)")])
        assert [(d.kind, d.seq, d.code) for d in report.dead] == [("result", 0, 0x87)]
        for _ in range(2):
            assert not ob.write(strikes=[r1.row]).dead
        report = ob.write(strikes=[r1.row])
        assert [(d.seq, d.code) for d in report.dead] == [(1, CODE_DISCONNECTS)]
        assert "3 times in a row" in report.dead[0].reason
        assert [m.row for m in ob.read(0, 10)] == [r2.row, c2.row]
        totals = ob.state().totals
        assert (totals["results_dead"], totals["results_acked"]) == (2, 0)
    dead = Outbox.inspect(tmp_path / "ob.sqlite").dead_letters
    assert [(d.seq, d.code) for d in dead] == [(0, 0x87), (1, CODE_DISCONNECTS)]
    conn = sqlite3.connect(tmp_path / "ob.sqlite")
    kept = conn.execute("SELECT payload FROM dead_letter ORDER BY id").fetchall()
    conn.close()
    assert json.loads(kept[0][0])["seq"] == 0, "a dead result keeps its payload"


def test_the_budget_sheds_crops_then_old_results_but_never_what_is_in_flight(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ob.sqlite"
    with Outbox(path, max_bytes=1024 * 1024) as ob:
        ob.write([result(0, crops=2), result(1, crops=2)])
        in_flight = ob.last_row() + 1  # rows 1-6 are "handed to MQTT"
        shed = {"result": 0, "crop": 0}
        seq = 2
        while shed["result"] == 0:
            # crops come with the results until the policy sheds some (the publisher sheds new
            # crops on entry from then on); stored crops go before any result
            n_crops = 2 if shed["crop"] == 0 else 0
            new = result(seq, crops=n_crops, crop_bytes=6000, pad=3000)
            report = ob.write([new], sheddable_from=in_flight)
            assert report.shed["result"] == 0 or not any(
                m.kind == "crop" and m.row >= in_flight for m in ob.read(0, 100_000)
            )
            for k in shed:
                shed[k] += report.shed[k]
            seq += 1
            assert ob.live_bytes <= ob.data_budget
            assert ob.disk_bytes() <= 1024 * 1024
            assert seq < 2000
        rows = ob.read(0, 100_000)
        # the two results in flight are untouched, crops and all
        assert [m.seq for m in rows[:6] if m.kind == "result"] == [0, 1]
        assert sum(m.kind == "crop" for m in rows[:6]) == 4
        kept = [json.loads(m.payload) for m in rows[6:] if m.kind == "result"]
        assert [d["seq"] for d in kept] == list(range(seq - len(kept), seq)), "oldest first"
        crops_left = {m.topic for m in rows if m.kind == "crop"}
        statuses = [det["crop_status"] for d in kept for det in d["detections"]]
        assert "shed" in statuses
        for d in kept:
            for det in d["detections"]:
                assert (det["crop_status"] == "sent") == (det["crop"] is not None)
                assert det["crop"] is None or det["crop"]["topic"] in crops_left
        totals = ob.state().totals
        assert totals["results_shed"] == shed["result"] == seq - 2 - len(kept)
        assert totals["crops_shed"] == shed["crop"]


def test_old_rows_are_shed_by_age(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite", max_age_s=60) as ob:
        old = time.time() - 120
        ob.write([replace(result(i, crops=1), created=old) for i in (0, 1)], now=old)
        report = ob.write([result(2, crops=1)])
        assert (report.shed["result"], report.shed["crop"]) == (2, 2)
        assert [m.seq for m in ob.read(0, 10) if m.kind == "result"] == [2]


def test_a_write_reports_the_rows_it_stored_exactly_as_committed(tmp_path: Path) -> None:
    # the publisher hands these to MQTT without reading them back: they must be the rows
    with Outbox(tmp_path / "ob.sqlite") as ob:
        refused = replace(
            result(1),
            payload=None,
            refusals=(Refusal("result", "cam0", 1, "rcam01", "t", 9, 0x95, "too large", b"{}"),),
        )
        track = replace(result(0, "cam1", crops=1), kind="track", next_track_id=4)
        first = ob.write([result(0, crops=2), refused, track, result(2)])
        assert first.stored == ob.read(0, 100), "every stored row, oldest first, as stored"
        assert [(m.kind, m.seq) for m in first.stored] == [
            ("result", 0), ("crop", None), ("crop", None),
            ("track", None), ("crop", None),
            ("result", 2),
        ]  # fmt: skip
        assert first.stored[1].user_properties == (("label", "7"),)
        last = first.stored[-1].row
        acked = [Settlement(m.row, 0) for m in first.stored[:3]]
        second = ob.write([result(3, crops=1)], acked)
        assert second.stored == ob.read(last + 1, 100) and len(second.stored) == 2
        assert not second.reshaped
        assert not ob.write(settlements=[Settlement(m.row, 0) for m in second.stored]).stored


def test_a_write_whose_policy_changes_stored_rows_lists_none(tmp_path: Path) -> None:
    # a shed crop rewrites its result: copies held outside the outbox are stale then
    with Outbox(tmp_path / "ob.sqlite", max_bytes=512 * 1024) as ob:
        seq = 0
        while True:
            report = ob.write([result(seq, crops=2, crop_bytes=6000)])
            seq += 1
            if report.shed["crop"]:
                break
            assert report.stored and not report.reshaped
            assert seq < 500
        assert report.reshaped and report.stored == []
        kept = [json.loads(m.payload) for m in ob.read(0, 100_000) if m.kind == "result"]
        assert any(d["crop_status"] == "shed" for doc in kept for d in doc["detections"])


def test_the_age_policy_looks_at_most_every_age_check_s(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite", max_age_s=60) as ob:
        t = time.time()
        ob.write([replace(result(0), created=t - 59.5)], now=t)  # young enough: kept
        assert not ob.write([replace(result(1), created=t)], now=t + 0.9).shed["result"]
        assert [m.seq for m in ob.read(0, 10)] == [0, 1], "looked less than AGE_CHECK_S ago"
        report = ob.write([replace(result(2), created=t)], now=t + AGE_CHECK_S)
        assert report.shed["result"] == 1 and report.reshaped
        assert [m.seq for m in ob.read(0, 10)] == [1, 2]
        # a clock that went back looks again at once (here: 100 s after a row made at t - 200)
        report = ob.write([replace(result(3), created=t - 200)], now=t - 100)
        assert report.shed["result"] == 1 and [m.seq for m in ob.read(0, 10)] == [1, 2]


WRITER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from edge_stn.publish.outbox import NewResult, Outbox
    ob = Outbox(sys.argv[1])
    for seq in range(int(sys.argv[2])):
        doc = json.dumps({"seq": seq}).encode()
        ob.write([NewResult("cam0", seq, f"r{seq}", "t/result", doc, time.time())])
    print(ob.epoch, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: a crash
    """
)


def test_what_was_committed_survives_a_crash_of_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "ob.sqlite"
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, str(path), "25"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert Path(f"{path}-wal").exists(), "the writer died with its WAL not checkpointed"
    with Outbox(path) as ob:  # the lock died with the process
        assert ob.epoch == proc.stdout.strip()
        assert ob.next_seq() == {"cam0": 25}
        assert [m.seq for m in ob.read(0, 100)] == list(range(25))


def test_outbox_config_defaults_sizes_and_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {"device_id": "gw1", "cameras": [{"id": "cam0", "source": "synthetic"}]}
    cfg = parse_config(base)
    # the tests' state dir (conftest): the default outbox is there, named by the device
    assert cfg.outbox.resolved_path("gw1") == Path(os.environ["EDGE_STN_STATE_DIR"]) / (
        "outbox-gw1.sqlite"
    )
    assert cfg.outbox.max_bytes == 256 * 1024**2 and cfg.outbox.synchronous == "full"
    assert not [w for w in check_config(cfg) if w.startswith("outbox")]
    sized = parse_config({**base, "outbox": {"max_bytes": "2MiB", "synchronous": "normal"}})
    assert sized.outbox.max_bytes == 2 * 1024**2
    assert any(w.startswith("outbox.synchronous: normal") for w in check_config(sized))
    off = parse_config({**base, "outbox": {"enabled": False}})
    assert off.outbox.resolved_path("gw1") is None
    assert any(w.startswith("outbox.enabled: false") for w in check_config(off))
    for bad, needle in (
        ({"max_bytes": "lots"}, "outbox.max_bytes"),
        ({"max_bytes": 1000}, "outbox.max_bytes"),
        ({"synchronus": "full"}, "outbox.synchronus"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse_config({**base, "outbox": bad})
    v311 = tmp_path / "v311.yaml"
    v311.write_text(json.dumps({**base, "mqtt": {"protocol": "3.1.1"}}))
    assert main(["config", "check", str(v311)]) == 0
    out = capsys.readouterr().out
    assert (
        "warning: mqtt.protocol: MQTT 3.1.1 cannot tell the daemon that the broker refused" in out
    )
