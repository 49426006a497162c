"""The durable outbox: every result and crop is committed here before MQTT sees it (DESIGN §7).

One SQLite database in WAL mode per daemon, held with an exclusive file lock (``<path>.lock``)
so that two daemons cannot share it. It keeps:

* ``message``: the results, crops and track announcements (``crops.policy: best_per_track``,
  each with its chosen crop under it) not yet acknowledged by the broker, in the order they
  were produced (``row`` grows and is never reused). A row is deleted only when the broker's PUBACK
  carries a reason code below 0x80.
* ``seq``: the next ``seq`` per camera, and ``meta``: the ``epoch`` (chosen when the file is
  created) and each camera's next track id. So ``seq`` and track ids continue across restarts, and a new or moved-aside outbox starts a new
  epoch, which tells consumers not to look for gaps across it (DESIGN §6).
* ``counter``: totals since the outbox was created (committed, acknowledged, shed, dead-lettered,
  per kind): the commit log that says how many results were produced.
* ``dead_letter``: messages the broker refused (MQTT v5 reason code >= 0x80), messages too large
  for the configured limit or the broker's Maximum Packet Size (0x95), and messages that were in
  flight when the connection was lost ``max_disconnects`` times in a row (:data:`CODE_DISCONNECTS`).
  The newest :attr:`Outbox.dead_letter_keep` are kept (results with their payload).

Durability: a batch of new results is committed with ``synchronous=FULL`` (the WAL is fsynced
before the commit returns), unless ``synchronous`` is ``normal``: then a power cut (not a crash
of the process) may lose the last commits. Deletes of acknowledged rows are committed with
``NORMAL`` (or go with the next batch of results): losing one to a power cut only means a
duplicate later. :meth:`Outbox.write` returns the rows it stored, as committed, so that the
publisher hands them to MQTT without reading them back.

Budget: the database and its ``-wal`` stay within ``max_bytes``. The WAL is kept under a reserve
(``journal_size_limit``, automatic checkpoints); the rest is for data, measured in live pages
inside each write transaction that adds rows. When a write would go over it, the policy sheds,
oldest first: crops (their result is rewritten to ``crop: null``, ``crop_status: shed``), then
results (with their crops). Rows older than ``max_age_s`` are shed the same way (looked for at
most every :data:`AGE_CHECK_S`). Rows already handed to the MQTT client (below
``sheddable_from``) are never shed: they may be on the wire. Every shed message is counted.

Threads: an :class:`Outbox` is used by one thread at a time (the publisher's sender thread); it
is opened by the thread that builds the publisher, hence ``check_same_thread=False``.
Torch-free; standard library only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, Any, Literal

from edge_stn.errors import EdgeStnError
from edge_stn.publish.payloads import encode, new_epoch

try:  # POSIX; on other systems the lock is not taken (the daemon targets Linux)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

APPLICATION_ID = 0x45535442
"""``PRAGMA application_id`` of an edge-stn outbox ("ESTB"): anything else is foreign."""
SCHEMA_VERSION = 1
PAGE_SIZE = 4096

Kind = Literal["result", "crop", "track"]
KINDS: tuple[Kind, ...] = ("result", "crop", "track")
_KIND_CODE: dict[Kind, int] = {"result": 0, "crop": 1, "track": 2}
_CODE_KIND: dict[int, Kind] = {0: "result", 1: "crop", 2: "track"}
TRACK_META = "next_track_id:"
"""``meta`` key prefix of a camera's next track id (the tracker continues from it)."""

CODE_PACKET_TOO_LARGE = 0x95
"""MQTT v5 "Packet too large": used for messages over the configured limit or the broker's
Maximum Packet Size, dead-lettered before they are sent."""
CODE_DISCONNECTS = 0x101
"""Not an MQTT reason code: the message was the oldest in flight each time the connection was
lost, ``max_disconnects`` times in a row (a message the broker drops the connection for)."""

SynchronousMode = Literal["full", "normal"]
AGE_CHECK_S = 1.0
"""The age policy (``max_age_s``) looks for old rows at most this often (by the writes' clock):
a row may outlive ``max_age_s`` by that much."""
COUNTER_NAMES = tuple(
    f"{kind}s_{what}" for kind in KINDS for what in ("committed", "acked", "shed", "dead")
)


class OutboxError(EdgeStnError):
    """The outbox cannot be used: locked by another process, or its folder is not writable."""


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class NewCrop:
    """A crop to store with its result."""

    topic: str
    payload: bytes
    user_properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DeadLetter:
    """A message that will not be delivered: what it was, and why (``code``, ``reason``)."""

    kind: Kind
    camera: str
    seq: int | None
    result_id: str
    topic: str
    size: int
    code: int
    reason: str


@dataclass(frozen=True)
class Refusal(DeadLetter):
    """A message refused before it was stored (too large): it goes straight to the dead
    letters, so the gap it leaves has a counter. A refused result keeps its ``payload``."""

    payload: bytes | None = None

    def dead_letter(self) -> DeadLetter:
        """The dead letter it becomes (without the payload)."""
        return DeadLetter(
            self.kind,
            self.camera,
            self.seq,
            self.result_id,
            self.topic,
            self.size,
            self.code,
            self.reason,
        )


@dataclass(frozen=True)
class NewResult:
    """One result with its crops, as the publisher hands it to the outbox. ``seq`` is the
    result's ``seq``; ``shed_crops`` counts crops shed before they were stored, ``refusals``
    the messages (the result itself or crops) refused before they were stored.

    ``kind`` ``track``: a track announcement (``seq`` unused, no ``seq`` counted) with the crop
    chosen for the track; ``next_track_id``: the camera's next unused track id, recorded so a
    restart within the epoch never reuses one."""

    camera: str
    seq: int
    result_id: str
    topic: str
    payload: bytes | None
    created: float
    crops: tuple[NewCrop, ...] = ()
    shed_crops: int = 0
    refusals: tuple[Refusal, ...] = ()
    kind: Kind = "result"
    next_track_id: int | None = None

    @cached_property
    def size(self) -> int:
        """Bytes of its payloads (asked for when it is handed over and when it is stored)."""
        return len(self.payload or b"") + sum(len(c.payload) for c in self.crops)


@dataclass(frozen=True)
class StoredMessage:
    """A row of the outbox, ready to publish."""

    row: int
    kind: Kind
    camera: str
    seq: int | None
    result_id: str
    topic: str
    user_properties: tuple[tuple[str, str], ...]
    created: float
    strikes: int
    payload: bytes


@dataclass(frozen=True)
class Settlement:
    """The broker's answer to a stored message: a reason ``code`` below 0x80 acknowledges it,
    0x80 and above refuse it (it is dead-lettered with the code)."""

    row: int
    code: int
    reason: str = ""

    @property
    def refused(self) -> bool:
        return self.code >= 0x80


@dataclass
class WriteReport:
    """What one :meth:`Outbox.write` did."""

    committed: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    acked: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    shed: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    dead: list[DeadLetter] = field(default_factory=list)
    commit_ms: float | None = None
    """wall time of the transaction, from BEGIN to the end of COMMIT (fsync included), when it
    stored new results."""
    stored: list[StoredMessage] = field(default_factory=list)
    """the rows this write stored, exactly as committed, oldest first: the publisher hands them
    to MQTT without reading them back. Empty when ``reshaped``."""
    reshaped: bool = False
    """the budget or age policy deleted or rewrote stored rows (a shed crop rewrites its
    result): copies of unsent rows held outside the outbox may be stale, read them again."""


@dataclass(frozen=True)
class OutboxState:
    """A snapshot for stats: depth, sizes and the totals since the outbox was created."""

    epoch: str
    path: str | None
    rows: int
    results: int
    payload_bytes: int
    live_bytes: int
    disk_bytes: int
    max_bytes: int
    oldest_age_s: float | None
    totals: dict[str, int]
    dead_letters: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "durable": self.path is not None,
            "rows": self.rows,
            "results": self.results,
            "payload_bytes": self.payload_bytes,
            "live_bytes": self.live_bytes,
            "disk_bytes": self.disk_bytes,
            "max_bytes": self.max_bytes,
            "oldest_age_s": self.oldest_age_s,
            "dead_letters": self.dead_letters,
            **{f"total_{k}": v for k, v in sorted(self.totals.items())},
        }


@dataclass(frozen=True)
class OutboxReport:
    """What an outbox file holds (:meth:`Outbox.inspect`), for tests and operators."""

    epoch: str
    next_seq: dict[str, int]
    totals: dict[str, int]
    rows: dict[Kind, int]
    dead_letters: tuple[DeadLetter, ...]

    @property
    def produced(self) -> int:
        """Results committed since the outbox was created (= the sum of ``next_seq``)."""
        return self.totals["results_committed"]


# ---------------------------------------------------------------- the file


_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE seq(camera TEXT PRIMARY KEY, next INTEGER NOT NULL);
CREATE TABLE counter(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE message(
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    camera TEXT NOT NULL,
    seq INTEGER,
    result_id TEXT NOT NULL,
    parent INTEGER,
    topic TEXT NOT NULL,
    props TEXT,
    created REAL NOT NULL,
    strikes INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
);
CREATE INDEX message_parent ON message(parent) WHERE parent IS NOT NULL;
CREATE TABLE dead_letter(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    camera TEXT NOT NULL,
    seq INTEGER,
    result_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    size INTEGER NOT NULL,
    code INTEGER NOT NULL,
    reason TEXT NOT NULL,
    created REAL NOT NULL,
    dead_at REAL NOT NULL,
    payload BLOB
);
"""
_TABLES = {"meta", "seq", "counter", "message", "dead_letter"}
_MAX_ROW = 2**63 - 1


def _sidecars(path: Path) -> list[Path]:
    """The database and the files SQLite keeps beside it."""
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm")]


def _header_problem(path: Path) -> str | None:
    """Why ``path`` is not an edge-stn outbox, judged from its header alone (None: it may be)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(100)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if len(head) < 100 or not head.startswith(b"SQLite format 3\0"):
        return "not an SQLite database (corrupt or truncated)"
    app_id = int.from_bytes(head[68:72], "big")
    if app_id != APPLICATION_ID:
        return f"an SQLite database of another application (application_id 0x{app_id:08x})"
    version = int.from_bytes(head[60:64], "big")
    if version != SCHEMA_VERSION:
        return f"outbox schema {version}, this edge-stn reads schema {SCHEMA_VERSION}"
    return None


def _move_aside(path: Path, problem: str) -> Path:
    """Rename the database with its -wal and -shm to ``<name>.corrupt-<time>[-n]``: never
    deleted, the operator may inspect or recover it."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while any(p.exists() for p in _sidecars(dest)):
        dest = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    moved = []
    try:
        for src, dst in zip(_sidecars(path), _sidecars(dest), strict=True):
            if src.exists():
                os.replace(src, dst)
                moved.append(dst.name)
    except OSError as exc:
        raise OutboxError(f"cannot move the unusable outbox aside: {exc}", path=path) from None
    logger.warning(
        "outbox %s is unusable: %s. Moved aside as %s (never deleted); starting a new outbox "
        "with a new epoch: what the old one held is not sent",
        path,
        problem,
        ", ".join(moved),
    )
    return dest


def _connect(target: str | Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    conn = sqlite3.connect(str(target), isolation_level=None, check_same_thread=False, timeout=5)
    return conn


def _init_schema(conn: sqlite3.Connection, epoch: str, now: float, *, wal: bool) -> None:
    # page size and auto_vacuum before anything is written (auto_vacuum makes the file shrink)
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    if wal:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(
        f"BEGIN IMMEDIATE;\n{_SCHEMA}\n"
        f"PRAGMA application_id = {APPLICATION_ID};\n"
        f"PRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
    )
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO meta(key, value) VALUES (?, ?)",
        [("epoch", epoch), ("created", repr(now)), ("schema", str(SCHEMA_VERSION))],
    )
    conn.executemany(
        "INSERT INTO counter(name, value) VALUES (?, 0)", [(n,) for n in COUNTER_NAMES]
    )
    conn.execute("COMMIT")


def _create_file(path: Path) -> None:
    """A new outbox at ``path``: built under a temporary name, then renamed, so a crash never
    leaves a half-made file that looks like ours."""
    tmp = path.with_name(f"{path.name}.new")
    for p in _sidecars(tmp):
        p.unlink(missing_ok=True)
    conn = _connect(tmp)
    try:
        _init_schema(conn, new_epoch(), time.time(), wal=True)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()  # the last connection: checkpoints and removes the -wal
    for p in _sidecars(tmp)[1:]:
        p.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _take_lock(path: Path) -> IO[str] | None:
    if fcntl is None:  # pragma: no cover
        return None
    lock_path = path.with_name(f"{path.name}.lock")
    try:
        fh = lock_path.open("a+", encoding="ascii")
    except OSError as exc:
        raise OutboxError(
            f"cannot open the lock file {lock_path}: {exc.strerror or exc}", key="outbox.path"
        ) from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise OutboxError(
            f"outbox {path} is in use by another edge-stn process (pid {holder}): "
            "each daemon needs its own outbox.path",
            key="outbox.path",
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def _counter_rows(conn: sqlite3.Connection) -> dict[str, int]:
    out = dict.fromkeys(COUNTER_NAMES, 0)
    out.update({name: int(v) for name, v in conn.execute("SELECT name, value FROM counter")})
    return out


def _dead_letters(conn: sqlite3.Connection, limit: int | None = None) -> list[DeadLetter]:
    sql = (
        "SELECT kind, camera, seq, result_id, topic, size, code, reason FROM dead_letter "
        "ORDER BY id DESC"
    )
    rows = conn.execute(sql + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
    return [
        DeadLetter(_CODE_KIND[k], c, s, r, t, int(z), int(code), reason)
        for k, c, s, r, t, z, code, reason in reversed(rows)
    ]


# ---------------------------------------------------------------- the outbox


class Outbox:
    """The durable queue of one publisher (see the module docstring).

    ``path`` None keeps it in memory: same policy and bounds, no durability (tests, and
    ``outbox.enabled: false``); its epoch is then ``epoch`` (default: a new one). A file's epoch
    is the one stored in it.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        max_bytes: int = 256 * 1024 * 1024,
        max_age_s: float | None = 86_400.0,
        synchronous: SynchronousMode = "full",
        max_disconnects: int = 5,
        crop_share: float = 0.75,
        epoch: str | None = None,
    ) -> None:
        smallest = 64 * 1024 if path is None else 512 * 1024
        if max_bytes < smallest:
            raise ValueError(f"max_bytes must be at least {smallest} bytes, got {max_bytes}")
        if max_disconnects < 1:
            raise ValueError(f"max_disconnects must be >= 1, got {max_disconnects}")
        self.path = Path(path) if path is not None else None
        self.max_bytes = int(max_bytes)
        self.max_age_s = max_age_s
        self.synchronous: SynchronousMode = synchronous
        self.max_disconnects = int(max_disconnects)
        self.crop_share = float(crop_share)
        # The WAL gets a reserve; the database's live pages get the rest.
        self.wal_reserve = (
            0 if path is None else min(16 * 1024 * 1024, max(256 * 1024, self.max_bytes // 8))
        )
        self.data_budget = self.max_bytes - self.wal_reserve
        self.dead_letter_keep = max(16, min(1000, self.max_bytes // (64 * 1024)))
        self.moved_aside: Path | None = None
        self.created = False
        self._lock_file: IO[str] | None = None
        self._over_budget_warned = False
        self._closed = False
        if epoch is not None and path is not None:
            raise ValueError("the epoch of an outbox file is the one stored in it")
        self._memory_epoch = epoch
        self._sync_mode: str | None = None  # the connection's PRAGMA synchronous
        self._age_checked: float | None = None  # when the age policy last looked (write clock)
        self._conn = self._open()
        self.epoch: str = self._meta("epoch")
        self._next_seq = {c: int(n) for c, n in self._conn.execute("SELECT camera, next FROM seq")}
        self._totals = _counter_rows(self._conn)
        rows = self._conn.execute(
            "SELECT kind, count(*), coalesce(sum(length(payload)), 0) FROM message GROUP BY kind"
        ).fetchall()
        self._rows = {_CODE_KIND[k]: int(n) for k, n, _ in rows}
        self._payload_bytes = sum(int(b) for _, _, b in rows)
        for kind in KINDS:
            self._rows.setdefault(kind, 0)
        self._dead_count = int(self._conn.execute("SELECT count(*) FROM dead_letter").fetchone()[0])
        self._live = self._live_bytes()
        if self.path is not None:
            state = "created" if self.created else "opened"
            logger.info(
                "outbox %s %s: epoch %s, %d results and %d crops waiting, budget %.1f MiB",
                state,
                self.path,
                self.epoch,
                self._rows["result"],
                self._rows["crop"],
                self.max_bytes / 2**20,
            )

    # ------------------------------------------------------------ opening

    def _open(self) -> sqlite3.Connection:
        if self.path is None:
            conn = _connect(":memory:")
            _init_schema(conn, self._memory_epoch or new_epoch(), time.time(), wal=False)
            self.created = True
            return conn
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(
                f"cannot create the outbox folder {path.parent}: {exc.strerror or exc}",
                key="outbox.path",
            ) from None
        self._lock_file = _take_lock(path)
        try:
            return self._open_locked(path)
        except BaseException:
            self._release_lock()
            raise

    def _open_locked(self, path: Path) -> sqlite3.Connection:
        if not path.exists() and any(p.exists() for p in _sidecars(path)[1:]):
            self.moved_aside = _move_aside(path, "a -wal or -shm file without its database")
        elif path.exists():
            problem = _header_problem(path)
            if problem is not None:
                self.moved_aside = _move_aside(path, problem)
        if not path.exists():
            try:
                _create_file(path)
            except (OSError, sqlite3.Error) as exc:
                raise OutboxError(f"cannot create the outbox: {exc}", path=path) from None
            self.created = True
        conn = _connect(path)
        problem = self._check(conn)
        if problem is not None:
            conn.close()
            self.moved_aside = _move_aside(path, problem)
            _create_file(path)
            self.created = True
            conn = _connect(path)
        self._configure(conn)
        return conn

    @staticmethod
    def _check(conn: sqlite3.Connection) -> str | None:
        """Why an opened file cannot be used (None: it can)."""
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                return f"cannot use WAL mode (journal_mode {mode})"
            check = conn.execute("PRAGMA quick_check").fetchall()
            if [r[0] for r in check] != ["ok"]:
                return f"integrity check failed: {'; '.join(str(r[0]) for r in check[:3])}"
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if not tables >= _TABLES:
                return f"tables missing: {', '.join(sorted(_TABLES - tables))}"
            epoch = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            if epoch is None or not epoch[0]:
                return "no epoch recorded"
        except sqlite3.DatabaseError as exc:
            return f"SQLite: {exc}"
        return None

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA journal_size_limit = {self.wal_reserve}")
        # Checkpoint when the WAL reaches a quarter of its reserve: the rest is room for the
        # transaction that crosses it; journal_size_limit truncates the file back.
        conn.execute(f"PRAGMA wal_autocheckpoint = {max(16, self.wal_reserve // PAGE_SIZE // 4)}")
        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        self._sync_mode = self.synchronous.upper()

    def _meta(self, key: str) -> str:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:  # checked at open
            raise OutboxError(f"no {key} recorded", path=self.path)
        return str(row[0])

    # ------------------------------------------------------------ reading

    def next_seq(self) -> dict[str, int]:
        """The next ``seq`` per camera (cameras never seen start at 0)."""
        return dict(self._next_seq)

    def next_track_ids(self) -> dict[str, int]:
        """The next unused track id per camera, as recorded with the results (0 if none)."""
        return {
            key[len(TRACK_META) :]: int(value)
            for key, value in self._conn.execute(
                "SELECT key, value FROM meta WHERE key LIKE ?", (TRACK_META + "%",)
            )
        }

    @property
    def rows(self) -> int:
        return sum(self._rows.values())

    @property
    def live_bytes(self) -> int:
        """Bytes of the database's pages in use, as of the last write."""
        return self._live

    @property
    def payload_bytes(self) -> int:
        """Bytes of the payloads waiting in the outbox."""
        return self._payload_bytes

    def last_row(self) -> int:
        """The newest row (0 when empty)."""
        row = self._conn.execute("SELECT max(row) FROM message").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def first_row(self) -> int:
        """The oldest row (0 when empty)."""
        row = self._conn.execute("SELECT min(row) FROM message").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def read(self, from_row: int, limit: int, before: int | None = None) -> list[StoredMessage]:
        """Up to ``limit`` messages from row ``from_row`` on (and below ``before``), oldest
        first."""
        cur = self._conn.execute(
            "SELECT row, kind, camera, seq, result_id, topic, props, created, strikes, payload "
            "FROM message WHERE row >= ? AND row < ? ORDER BY row LIMIT ?",
            (from_row, _MAX_ROW if before is None else before, limit),
        )
        out = []
        for row, kind, camera, seq, rid, topic, props, created, strikes, payload in cur:
            user = tuple((str(k), str(v)) for k, v in json.loads(props)) if props else ()
            out.append(
                StoredMessage(
                    int(row),
                    _CODE_KIND[kind],
                    camera,
                    seq,
                    rid,
                    topic,
                    user,
                    float(created),
                    int(strikes),
                    bytes(payload),
                )
            )
        return out

    def state(self) -> OutboxState:
        oldest = self._conn.execute("SELECT created FROM message ORDER BY row LIMIT 1").fetchone()
        return OutboxState(
            epoch=self.epoch,
            path=str(self.path) if self.path is not None else None,
            rows=self.rows,
            results=self._rows["result"],
            payload_bytes=self._payload_bytes,
            live_bytes=self._live,
            disk_bytes=self.disk_bytes(),
            max_bytes=self.max_bytes,
            oldest_age_s=round(max(0.0, time.time() - oldest[0]), 3) if oldest else None,
            totals=dict(self._totals),
            dead_letters=self._dead_count,
        )

    def disk_bytes(self) -> int:
        """Size of the database file and its -wal on disk (0 in memory)."""
        if self.path is None:
            return 0
        total = 0
        for p in _sidecars(self.path)[:2]:
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    def crop_room(self, incoming: int) -> bool:
        """Whether ``incoming`` more bytes of crops stay below the crops' share of the budget
        (the entry part of the policy: crops are shed before results)."""
        return self._live + incoming <= self.crop_share * self.data_budget

    def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        return _dead_letters(self._conn, limit)

    # ------------------------------------------------------------ writing

    def write(
        self,
        results: Sequence[NewResult] = (),
        settlements: Sequence[Settlement] = (),
        *,
        strikes: Iterable[int] = (),
        refusals: Sequence[tuple[int, int, str]] = (),
        sheddable_from: int | None = None,
        now: float | None = None,
    ) -> WriteReport:
        """One transaction: settle acknowledged and refused rows, add strikes, dead-letter
        ``refusals`` (``(row, code, reason)``), store ``results``, apply the budget; commit.

        ``sheddable_from``: rows from this one on have not been handed to MQTT and may be shed
        (None: every row). ``strikes``: rows that were the oldest in flight when a connection
        was lost; at ``max_disconnects`` strikes a row is dead-lettered (:data:`CODE_DISCONNECTS`).
        """
        now = time.time() if now is None else now
        report = WriteReport()
        durable = bool(results)
        mode = self.synchronous.upper() if durable else "NORMAL"
        if mode != self._sync_mode:  # a statement per write otherwise
            self._conn.execute(f"PRAGMA synchronous = {mode}")
            self._sync_mode = mode
        t0 = time.perf_counter()
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._settle(settlements, report, now)
            for row in strikes:
                self._strike(row, report, now)
            for row, code, reason in refusals:
                self._dead_letter_row(row, code, reason, report, now)
            for res in results:
                self._insert(res, report, now)
            # A write that only deletes acknowledged rows cannot take the outbox over its
            # budget or make a row older: the policy runs with the next write that adds
            # something, and with the publisher's periodic empty write.
            if results or report.dead or not settlements:
                first = self._first_sheddable(sheddable_from)
                if self._age_due(now):
                    self._enforce_age(first, report, now)
                self._enforce_bytes(first, report)
            if report.dead:
                self._trim_dead_letters()
            self._bump_totals(report)
            self._conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            # the in-memory mirrors may be off: read them again
            self._resync()
            raise
        if report.reshaped:
            report.stored.clear()
        if durable:
            report.commit_ms = (time.perf_counter() - t0) * 1000.0
        for kind in KINDS:
            self._totals[f"{kind}s_committed"] += report.committed[kind]
            self._totals[f"{kind}s_acked"] += report.acked[kind]
            self._totals[f"{kind}s_shed"] += report.shed[kind]
        for d in report.dead:
            self._totals[f"{d.kind}s_dead"] += 1
        self._dead_count = min(self._dead_count + len(report.dead), self.dead_letter_keep)
        return report

    def _resync(self) -> None:
        rows = self._conn.execute(
            "SELECT kind, count(*), coalesce(sum(length(payload)), 0) FROM message GROUP BY kind"
        ).fetchall()
        self._rows = dict.fromkeys(KINDS, 0)
        self._rows.update({_CODE_KIND[k]: int(n) for k, n, _ in rows})
        self._payload_bytes = sum(int(b) for _, _, b in rows)
        self._next_seq = {c: int(n) for c, n in self._conn.execute("SELECT camera, next FROM seq")}
        self._totals = _counter_rows(self._conn)
        self._live = self._live_bytes()
        self._sync_mode = None

    def _first_sheddable(self, sheddable_from: int | None) -> int:
        return 0 if sheddable_from is None else sheddable_from

    def _live_bytes(self) -> int:
        return self._pages()[0]

    def _pages(self) -> tuple[int, int]:
        """Bytes of the pages in use, and the page count."""
        pages = int(self._conn.execute("PRAGMA page_count").fetchone()[0])
        free = int(self._conn.execute("PRAGMA freelist_count").fetchone()[0])
        return (pages - free) * PAGE_SIZE, pages

    def _age_due(self, now: float) -> bool:
        """Whether the age policy looks for old rows in this write (at most every
        :data:`AGE_CHECK_S`; at once when the clock went back)."""
        if self.max_age_s is None:
            return False
        last = self._age_checked
        if last is not None and last <= now < last + AGE_CHECK_S:
            return False
        self._age_checked = now
        return True

    def _delete(self, rows: Sequence[int]) -> list[tuple[int, Kind, int]]:
        """Delete rows; returns ``(row, kind, payload size)`` of those that existed."""
        out: list[tuple[int, Kind, int]] = []
        for chunk in _chunks(rows, 500):
            marks = ",".join("?" * len(chunk))
            cur = self._conn.execute(
                f"DELETE FROM message WHERE row IN ({marks}) RETURNING row, kind, length(payload)",
                chunk,
            )
            for row, kind, size in cur.fetchall():
                k = _CODE_KIND[kind]
                self._rows[k] -= 1
                self._payload_bytes -= int(size)
                out.append((int(row), k, int(size)))
        return out

    def _settle(self, settlements: Sequence[Settlement], report: WriteReport, now: float) -> None:
        acked = [s.row for s in settlements if not s.refused]
        for _, kind, _ in self._delete(acked):
            report.acked[kind] += 1
        for s in settlements:
            if s.refused:
                self._dead_letter_row(s.row, s.code, s.reason, report, now)

    def _strike(self, row: int, report: WriteReport, now: float) -> None:
        cur = self._conn.execute(
            "UPDATE message SET strikes = strikes + 1 WHERE row = ? RETURNING strikes", (row,)
        ).fetchone()
        if cur is not None and int(cur[0]) >= self.max_disconnects:
            reason = f"in flight when the connection was lost {int(cur[0])} times in a row"
            self._dead_letter_row(row, CODE_DISCONNECTS, reason, report, now)

    def _dead_letter_row(
        self, row: int, code: int, reason: str, report: WriteReport, now: float
    ) -> None:
        found = self._conn.execute(
            "SELECT kind, camera, seq, result_id, topic, length(payload) FROM message WHERE row = ?",
            (row,),
        ).fetchone()
        if found is None:
            return
        kind_code, camera, seq, rid, topic, size = found
        self._conn.execute(
            "INSERT INTO dead_letter(kind, camera, seq, result_id, topic, size, code, reason, "
            "created, dead_at, payload) SELECT kind, camera, seq, result_id, topic, "
            "length(payload), ?, ?, created, ?, CASE WHEN kind = 0 THEN payload END "
            "FROM message WHERE row = ?",
            (code, reason, now, row),
        )
        self._delete([row])
        report.dead.append(
            DeadLetter(_CODE_KIND[kind_code], camera, seq, rid, topic, int(size), code, reason)
        )

    def _insert(self, res: NewResult, report: WriteReport, now: float) -> None:
        for ref in res.refusals:
            self._conn.execute(
                "INSERT INTO dead_letter(kind, camera, seq, result_id, topic, size, code, "
                "reason, created, dead_at, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _KIND_CODE[ref.kind],
                    ref.camera,
                    ref.seq,
                    ref.result_id,
                    ref.topic,
                    ref.size,
                    ref.code,
                    ref.reason,
                    res.created,
                    now,
                    ref.payload if ref.kind == "result" else None,
                ),
            )
            report.dead.append(ref.dead_letter())
        report.shed["crop"] += res.shed_crops
        if res.next_track_id is not None:
            self._conn.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                "value = max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                (TRACK_META + res.camera, str(res.next_track_id)),
            )
        seq: int | None = None
        if res.kind == "result":
            seq = res.seq
            self._conn.execute(
                "INSERT INTO seq(camera, next) VALUES (?, ?) "
                "ON CONFLICT(camera) DO UPDATE SET next = max(next, excluded.next)",
                (res.camera, res.seq + 1),
            )
            self._next_seq[res.camera] = max(self._next_seq.get(res.camera, 0), res.seq + 1)
        report.committed[res.kind] += 1  # produced, even if refused at once
        if res.payload is None:  # the result itself was refused (too large)
            return
        parent = _row_id(
            self._conn.execute(
                "INSERT INTO message(kind, camera, seq, result_id, parent, topic, props, "
                "created, payload) VALUES (?, ?, ?, ?, NULL, ?, NULL, ?, ?)",
                (
                    _KIND_CODE[res.kind],
                    res.camera,
                    seq,
                    res.result_id,
                    res.topic,
                    res.created,
                    res.payload,
                ),
            )
        )
        self._rows[res.kind] += 1
        self._payload_bytes += len(res.payload)
        report.stored.append(
            StoredMessage(
                parent, res.kind, res.camera, seq, res.result_id, res.topic, (), res.created, 0,
                res.payload,
            )
        )  # fmt: skip
        for crop in res.crops:
            user = tuple((str(k), str(v)) for k, v in crop.user_properties)
            row = _row_id(
                self._conn.execute(
                    "INSERT INTO message(kind, camera, seq, result_id, parent, topic, props, "
                    "created, payload) VALUES (1, ?, NULL, ?, ?, ?, ?, ?, ?)",
                    (
                        res.camera,
                        res.result_id,
                        parent,
                        crop.topic,
                        json.dumps(user) if user else None,
                        res.created,
                        crop.payload,
                    ),
                )
            )
            self._rows["crop"] += 1
            self._payload_bytes += len(crop.payload)
            report.committed["crop"] += 1
            report.stored.append(
                StoredMessage(
                    row, "crop", res.camera, None, res.result_id, crop.topic, user, res.created,
                    0, crop.payload,
                )
            )  # fmt: skip

    # ------------------------------------------------------------ the budget policy

    def _shed_crops(self, crops: Sequence[tuple[int, int, str, int]], report: WriteReport) -> None:
        """Delete crops ``(row, parent, topic, size)`` and rewrite their results: ``crop: null``,
        ``crop_status: shed``."""
        report.reshaped = True
        by_parent: dict[int, set[str]] = {}
        for _, parent, topic, _ in crops:
            by_parent.setdefault(parent, set()).add(topic)
        for _, kind, _ in self._delete([c[0] for c in crops]):
            report.shed[kind] += 1
        for parent, topics in by_parent.items():
            found = self._conn.execute(
                "SELECT payload FROM message WHERE row = ?", (parent,)
            ).fetchone()
            if found is None:
                continue
            doc = json.loads(bytes(found[0]))
            # a result's detections, or a track announcement (its crop at the top level)
            for det in [*doc.get("detections", []), doc]:
                crop = det.get("crop")
                if isinstance(crop, dict) and crop.get("topic") in topics:
                    det["crop"] = None
                    det["crop_status"] = "shed"
            payload = encode(doc)
            self._conn.execute("UPDATE message SET payload = ? WHERE row = ?", (payload, parent))
            self._payload_bytes += len(payload) - len(bytes(found[0]))

    def _shed_results(self, rows: Sequence[int], report: WriteReport) -> None:
        """Delete results and their crops."""
        report.reshaped = True
        crops: list[int] = []
        for chunk in _chunks(rows, 500):
            marks = ",".join("?" * len(chunk))
            crops += [
                int(r[0])
                for r in self._conn.execute(
                    f"SELECT row FROM message WHERE parent IN ({marks})", chunk
                )
            ]
        for _, kind, _ in self._delete([*rows, *crops]):
            report.shed[kind] += 1

    def _sheddable_crops(
        self, first: int, limit: int, older_than: float | None = None
    ) -> list[tuple[int, int, str, int]]:
        """``(row, parent, topic, size)`` of the oldest crops that may be shed: a crop only
        while its result has not been handed to MQTT either, so the result can still be
        rewritten to say so."""
        age = "AND created < ?" if older_than is not None else ""
        args: list[Any] = [first]
        if older_than is not None:
            args.append(older_than)
        args.append(limit)
        return [
            (int(row), int(parent), topic, int(size))
            for row, parent, topic, size in self._conn.execute(
                "SELECT row, parent, topic, length(payload) FROM message "
                f"WHERE kind = 1 AND parent >= ? {age} ORDER BY row LIMIT ?",
                args,
            )
        ]

    def _enforce_age(self, first: int, report: WriteReport, now: float) -> None:
        if self.max_age_s is None:
            return
        cutoff = now - self.max_age_s
        while True:
            rows = [
                int(r[0])
                for r in self._conn.execute(
                    "SELECT row FROM message WHERE kind != 1 AND row >= ? AND created < ? "
                    "ORDER BY row LIMIT 256",
                    (first, cutoff),
                )
            ]
            if not rows:
                break
            self._shed_results(rows, report)
        while crops := self._sheddable_crops(first, 256, older_than=cutoff):
            self._shed_crops(crops, report)

    def _enforce_bytes(self, first: int, report: WriteReport) -> None:
        """Shed until the live pages fit the data budget (with a margin, so that shedding does
        not happen on every write), crops first; then give free pages back so that the file
        fits too."""
        margin = min(64 * 1024, self.data_budget // 32)
        self._live, pages = self._pages()
        while self._live > self.data_budget:
            crops = self._sheddable_crops(first, 256)
            if not crops:
                break
            self._shed_crops(_enough(crops, self._live - self.data_budget + margin), report)
            self._live, pages = self._pages()
        while self._live > self.data_budget:
            results = [
                (int(row), int(size))
                for row, size in self._conn.execute(
                    "SELECT r.row, length(r.payload) + coalesce((SELECT sum(length(c.payload)) "
                    "FROM message c WHERE c.parent = r.row), 0) FROM message r "
                    "WHERE r.kind != 1 AND r.row >= ? ORDER BY r.row LIMIT 64",
                    (first,),
                )
            ]
            if not results:
                break
            chosen = _enough(results, self._live - self.data_budget + margin)
            self._shed_results([row for row, _ in chosen], report)
            self._live, pages = self._pages()
        if self._live > self.data_budget:
            if not self._over_budget_warned:
                logger.warning(
                    "outbox: %d bytes in use, over the budget of %d, and nothing left to shed "
                    "(only messages in flight)",
                    self._live,
                    self.data_budget,
                )
                self._over_budget_warned = True
        else:
            self._over_budget_warned = False
        over = pages - self.data_budget // PAGE_SIZE
        if over > 0:
            # free pages beyond the budget go back to the file system (auto_vacuum=INCREMENTAL)
            self._conn.execute(f"PRAGMA incremental_vacuum({over})").fetchall()

    def _trim_dead_letters(self) -> None:
        self._conn.execute(
            "DELETE FROM dead_letter WHERE id <= (SELECT max(id) FROM dead_letter) - ?",
            (self.dead_letter_keep,),
        )

    def _bump_totals(self, report: WriteReport) -> None:
        changes: dict[str, int] = {}
        for kind in KINDS:
            changes[f"{kind}s_committed"] = report.committed[kind]
            changes[f"{kind}s_acked"] = report.acked[kind]
            changes[f"{kind}s_shed"] = report.shed[kind]
            changes[f"{kind}s_dead"] = sum(1 for d in report.dead if d.kind == kind)
        rows = [(k, v) for k, v in changes.items() if v]
        if rows:
            self._conn.executemany(  # an outbox made before a kind existed lacks its rows
                "INSERT INTO counter(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                rows,
            )

    # ------------------------------------------------------------ closing

    def close(self) -> None:
        """Checkpoint (the -wal is emptied into the database), close, release the lock."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.path is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        fh, self._lock_file = self._lock_file, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()  # closing the descriptor releases the flock

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ inspection

    @staticmethod
    def inspect(path: str | Path) -> OutboxReport:
        """What an outbox file holds, read without taking its lock (a running daemon may be
        writing it: this is one consistent snapshot)."""
        path = Path(path)
        problem = _header_problem(path) if path.exists() else "no such file"
        if problem is not None:
            raise OutboxError(problem, path=path)
        conn = _connect(path)
        try:
            conn.execute("BEGIN")
            epoch = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
            next_seq = {c: int(n) for c, n in conn.execute("SELECT camera, next FROM seq")}
            totals = _counter_rows(conn)
            rows = dict.fromkeys(KINDS, 0)
            rows.update(
                {
                    _CODE_KIND[k]: int(n)
                    for k, n in conn.execute("SELECT kind, count(*) FROM message GROUP BY kind")
                }
            )
            dead = tuple(_dead_letters(conn))
            conn.execute("COMMIT")
        finally:
            conn.close()
        return OutboxReport(str(epoch), next_seq, totals, rows, dead)


def _enough(items: Sequence[Any], needed: int) -> list[Any]:
    """The shortest prefix of ``items`` (``(..., size)`` tuples) whose sizes reach ``needed``
    (at least one item)."""
    out, total = [], 0
    for item in items:
        out.append(item)
        total += item[-1]
        if total >= needed:
            break
    return out


def _row_id(cur: sqlite3.Cursor) -> int:
    """The row an INSERT just made."""
    row = cur.lastrowid
    if row is None:  # pragma: no cover - an INSERT always sets it
        raise sqlite3.DatabaseError("INSERT made no row")
    return int(row)


def _chunks(items: Sequence[int], n: int) -> Iterator[list[int]]:
    items = list(items)
    for i in range(0, len(items), n):
        yield items[i : i + n]
