"""Models that arrive by the ``model`` command (docs/mqtt.md): in chunks over MQTT, or fetched
from a URL; written to the command's model folder (``commands.model_dir``) with a size cap.

A model is first written to ``<dir>/incoming/<transfer>.part`` while its sha256 is computed;
once complete and equal to the sha256 the command announced, it is moved to
``<dir>/<sha256>/<name>`` with its signature (``<name>.sig``) beside it. Nothing is half-applied:
a transfer that fails (a wrong sha256, too large, a full disk, a timeout) removes what it wrote
and the running model is never touched here (the swap is the daemon's, through its model
loader). Chunks come in order (each is acknowledged before the next is sent); a chunk sent
again (QoS 1 may deliver twice) is acknowledged without being written twice. A transfer whose
next chunk does not come within ``transfer_timeout_s`` is discarded.

Torch-free; only the standard library.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from edge_stn.errors import EdgeStnError
from edge_stn.runtime.signing import signature_path

logger = logging.getLogger(__name__)

INCOMING = "incoming"
READ_BLOCK = 1 << 16
MODEL_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}\.onnx$")


class TransferError(EdgeStnError):
    """A model transfer that cannot go on (bad chunk, size, sha256, URL, disk): the message
    is the reply's error."""


@dataclass(frozen=True)
class StoredModel:
    """A complete model in the model folder, its sha256 checked."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class ChunkProgress:
    """A chunk was stored; ``received`` of ``count`` so far."""

    transfer: str
    received: int
    count: int
    size: int


@dataclass
class _Transfer:
    id: str
    count: int
    sha256: str
    name: str
    signature: dict[str, Any] | None
    part: Path
    touched: float
    received: int = 0
    size: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)


def _disk_error(action: str, path: Path, exc: OSError) -> TransferError:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = exc.strerror or str(exc)
    hint = ": the disk is full, nothing was kept" if full else ""
    return TransferError(f"cannot {action} {path}: {reason}{hint}")


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("cannot remove %s: %s", path, exc)


class ModelInbox:
    """Receives models for the ``model`` command (see the module docstring). One transfer in
    chunks at a time: chunk 0 of another transfer replaces one in progress. Not thread-safe:
    the command thread is its only user."""

    def __init__(
        self,
        folder: Path,
        *,
        max_bytes: int,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._clock = clock
        self._transfer: _Transfer | None = None

    @property
    def incoming(self) -> Path:
        return self.folder / INCOMING

    # ------------------------------------------------------------ chunks

    def add_chunk(
        self,
        transfer: str,
        index: int,
        count: int,
        data: bytes,
        sha256: str,
        *,
        name: str,
        signature: dict[str, Any] | None,
    ) -> ChunkProgress | StoredModel:
        """Store chunk ``index`` (0-based) of ``count``; the last one completes the model."""
        self.expire()
        current = self._transfer
        if index == 0 and (current is None or current.id != transfer or current.received == 0):
            if current is not None:
                logger.warning(
                    "model transfer %s (%d of %d chunks) abandoned for transfer %s",
                    current.id,
                    current.received,
                    current.count,
                    transfer,
                )
                self.discard()
            current = self._begin(transfer, count, sha256, name, signature)
        elif current is None or current.id != transfer:
            raise TransferError(
                f"no transfer {transfer!r} in progress (it timed out after "
                f"{self.timeout_s:g} s, or its chunk 0 never came): send it again from chunk 0"
            )
        if (count, sha256, name) != (current.count, current.sha256, current.name):
            raise TransferError(
                f"chunk {index} of transfer {transfer!r} disagrees with chunk 0 about count, "
                "sha256 or name"
            )
        if index > 0 and signature is not None and signature != current.signature:
            raise TransferError("the signature goes with chunk 0 only")
        if index < current.received:  # sent again (QoS 1): already stored
            current.touched = self._clock()
            return ChunkProgress(transfer, current.received, current.count, current.size)
        if index != current.received:
            raise TransferError(
                f"chunk {index} of transfer {transfer!r} out of order: expected chunk "
                f"{current.received}"
            )
        if current.size + len(data) > self.max_bytes:
            self.discard()
            raise TransferError(
                f"model larger than commands.max_model_bytes ({self.max_bytes} bytes): "
                "transfer discarded"
            )
        try:
            with current.part.open("ab") as fh:
                fh.write(data)
        except OSError as exc:
            self.discard()
            raise _disk_error("write", current.part, exc) from None
        current.hasher.update(data)
        current.size += len(data)
        current.received += 1
        current.touched = self._clock()
        if current.received < current.count:
            return ChunkProgress(transfer, current.received, current.count, current.size)
        self._transfer = None
        got = current.hasher.hexdigest()
        return self._complete(current.part, got, current.sha256, current.name, current.signature)

    def _begin(
        self,
        transfer: str,
        count: int,
        sha256: str,
        name: str,
        signature: dict[str, Any] | None,
    ) -> _Transfer:
        part = self.incoming / f"{transfer}.part"
        try:
            self.incoming.mkdir(parents=True, exist_ok=True)
            part.open("wb").close()
        except OSError as exc:
            _remove(part)
            raise _disk_error("create", part, exc) from None
        self._transfer = _Transfer(
            transfer, count, sha256.lower(), name, signature, part, self._clock()
        )
        return self._transfer

    def expire(self) -> str | None:
        """Discard a transfer idle longer than ``timeout_s``; its id, or None."""
        current = self._transfer
        if current is None or self._clock() - current.touched <= self.timeout_s:
            return None
        logger.warning(
            "model transfer %s discarded: no chunk for %g s (%d of %d received)",
            current.id,
            self.timeout_s,
            current.received,
            current.count,
        )
        self.discard()
        return current.id

    def discard(self) -> None:
        """Forget the transfer in progress and remove its partial file."""
        current, self._transfer = self._transfer, None
        if current is not None:
            _remove(current.part)

    # ------------------------------------------------------------ URL

    def fetch(
        self,
        url: str,
        sha256: str,
        *,
        name: str,
        signature: dict[str, Any] | None,
        timeout_s: float,
        opener: Callable[..., BinaryIO] = urllib.request.urlopen,
    ) -> StoredModel:
        """Download ``url`` (http or https) within ``timeout_s`` and ``max_bytes``."""
        if not url.lower().startswith(("http://", "https://")):
            raise TransferError(f"only http:// and https:// URLs are fetched, not {url[:40]!r}")
        part = self.incoming / f"fetch-{os.getpid()}-{time.monotonic_ns()}.part"
        deadline = time.monotonic() + timeout_s
        hasher = hashlib.sha256()
        size = 0
        try:
            self.incoming.mkdir(parents=True, exist_ok=True)
            with opener(url, timeout=timeout_s) as response, part.open("wb") as fh:
                declared = (
                    response.headers.get("Content-Length") if hasattr(response, "headers") else None
                )
                if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                    raise TransferError(
                        f"{_short(url)} is {declared} bytes, over commands.max_model_bytes "
                        f"({self.max_bytes})"
                    )
                while block := response.read(READ_BLOCK):
                    size += len(block)
                    if size > self.max_bytes:
                        raise TransferError(
                            f"{_short(url)} is larger than commands.max_model_bytes "
                            f"({self.max_bytes} bytes)"
                        )
                    if time.monotonic() > deadline:
                        raise TransferError(
                            f"{_short(url)} did not arrive within commands.fetch_timeout_s "
                            f"({timeout_s:g} s)"
                        )
                    fh.write(block)
                    hasher.update(block)
        except TransferError:
            _remove(part)
            raise
        except urllib.error.HTTPError as exc:
            _remove(part)
            raise TransferError(
                f"cannot fetch {_short(url)}: HTTP {exc.code} {exc.reason}"
            ) from None
        except urllib.error.URLError as exc:
            _remove(part)
            raise TransferError(f"cannot fetch {_short(url)}: {exc.reason}") from None
        except OSError as exc:
            _remove(part)
            if isinstance(exc, TimeoutError) or "timed out" in str(exc):
                raise TransferError(
                    f"cannot fetch {_short(url)}: timed out after {timeout_s:g} s"
                ) from None
            raise _disk_error("write", part, exc) from None
        except ValueError as exc:  # urllib's "unknown url type" and the like
            _remove(part)
            raise TransferError(f"cannot fetch {_short(url)}: {exc}") from None
        return self._complete(part, hasher.hexdigest(), sha256.lower(), name, signature)

    # ------------------------------------------------------------ completion

    def _complete(
        self,
        part: Path,
        got: str,
        expected: str,
        name: str,
        signature: dict[str, Any] | None,
    ) -> StoredModel:
        """Move a complete file into place with its signature, or remove it."""
        if got != expected:
            _remove(part)
            raise TransferError(
                f"the model received has sha256 {got[:12]}..., the command announced "
                f"{expected[:12]}...: discarded"
            )
        target_dir = self.folder / got
        target = target_dir / name
        try:
            size = part.stat().st_size
            target_dir.mkdir(parents=True, exist_ok=True)
            sig = signature_path(target)
            if signature is not None:
                tmp = sig.with_name(sig.name + ".tmp")
                tmp.write_text(json.dumps(signature, indent=2) + "\n")
                os.replace(tmp, sig)
            else:
                sig.unlink(missing_ok=True)  # a stale signature from an earlier copy
            os.replace(part, target)
        except OSError as exc:
            _remove(part)
            _remove(target_dir)
            raise _disk_error("store the model in", target_dir, exc) from None
        return StoredModel(target, got, size)

    def remove(self, stored: StoredModel) -> None:
        """Remove a stored model that was refused (its folder, signature included)."""
        _remove(stored.path.parent)

    def prune(self, keep: set[Path]) -> None:
        """Remove the stored models other than those under ``keep`` (the running model and the
        one before it), so the folder does not grow with every swap."""
        try:
            entries = list(self.folder.iterdir())
        except OSError:
            return
        kept = {p.resolve() for p in keep}
        for entry in entries:
            if entry.name == INCOMING or not entry.is_dir():
                continue
            if any(k == entry.resolve() or entry.resolve() in k.parents for k in kept):
                continue
            _remove(entry)


def _short(url: str) -> str:
    """A URL for messages: no credentials, no query (either may hold a secret)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    except ValueError:
        return "the URL"
