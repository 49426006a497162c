"""Model authenticity: Ed25519 signatures and the sha256 allow-list (issue 7).

A signature covers the model file's sha256, with a domain prefix so that it can never be
mistaken for a signature of anything else::

    message = b"edge-stn model signature v1\\0" + bytes.fromhex(sha256_of_the_file)

It is stored beside the model as ``<model>.sig`` (``model.onnx`` -> ``model.onnx.sig``), a small
JSON document::

    {"format": "edge-stn-signature", "version": 1, "algorithm": "ed25519",
     "sha256": "<64 hex>", "key_id": "<16 hex>", "signature": "<base64, 64 bytes>",
     "signed_at": "2026-01-01T00:00:00Z"}

``key_id`` is the first 16 hex digits of the sha256 of the raw 32-byte public key; it names the
key in messages (every configured key is tried). Public keys travel as base64 of their 32 raw
bytes (what :func:`public_key_text` prints) or as PEM; private keys as unencrypted PKCS#8 PEM,
or encrypted with the passphrase in ``$EDGE_STN_KEY_PASSPHRASE``.

:func:`check_model_trust` is what the engine calls, after hashing the file and before ONNX Runtime
parses it. Torch-free; needs the ``cryptography`` package (a base dependency).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_stn.errors import ConfigError, ModelIntegrityError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from edge_stn.config import ModelTrustConfig

logger = logging.getLogger(__name__)

SIGNATURE_SUFFIX = ".sig"
SIGNATURE_FORMAT = "edge-stn-signature"
SIGNATURE_VERSION = 1
DOMAIN = b"edge-stn model signature v1\0"
PASSPHRASE_ENV = "EDGE_STN_KEY_PASSPHRASE"


def signature_path(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.sig``."""
    p = Path(model_path)
    return p.with_name(p.name + SIGNATURE_SUFFIX)


def signed_message(sha256: str) -> bytes:
    return DOMAIN + bytes.fromhex(sha256)


# ---------------------------------------------------------------- keys


def _raw(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key."""
    return hashlib.sha256(_raw(key)).hexdigest()[:16]


def public_key_text(key: Ed25519PublicKey) -> str:
    """The key as the config takes it: base64 of the 32 raw bytes (44 characters)."""
    return base64.b64encode(_raw(key)).decode("ascii")


def parse_public_key(text: str, *, where: str) -> Ed25519PublicKey:
    """A public key from base64 (32 raw bytes) or PEM; ``where`` names it in the error."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = load_pem_public_key(text.encode("ascii"))
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error, UnicodeEncodeError) as exc:
        raise ConfigError(f"not an Ed25519 public key: {_first_line(exc)}", key=where) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(
            f"a {type(key).__name__.removeprefix('_')} key, not Ed25519", key=where
        ) from None
    return key


def load_public_key_file(path: Path, *, where: str) -> Ed25519PublicKey:
    try:
        text = path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read public key file {path}: {reason}", key=where) from None
    try:
        return parse_public_key(text, where=where)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.detail}", key=where) from None


def trusted_keys(trust: ModelTrustConfig) -> list[Ed25519PublicKey]:
    """Every configured public key, inline and from files (unreadable: :class:`ConfigError`)."""
    keys = [
        parse_public_key(t, where=f"model.trust.public_keys.{i}")
        for i, t in enumerate(trust.public_keys)
    ]
    keys += [
        load_public_key_file(Path(p), where=f"model.trust.public_key_files.{i}")
        for i, p in enumerate(trust.public_key_files)
    ]
    return keys


def new_private_key() -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def write_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Unencrypted PKCS#8 PEM, mode 0600, never over an existing file."""
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError("exists already: refusing to overwrite a key", path=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot write: {exc.strerror or exc}", path=path) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the private key: {exc.strerror or exc}", path=path
        ) from None
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        key = load_pem_private_key(data, password=passphrase.encode() if passphrase else None)
    except TypeError:
        raise ConfigError(
            f"the private key is encrypted: set {PASSPHRASE_ENV} to its passphrase", path=path
        ) from None
    except ValueError:
        raise ConfigError(
            "not a PEM private key, or a wrong passphrase in " + PASSPHRASE_ENV, path=path
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"a {type(key).__name__.removeprefix('_')}, not Ed25519", path=path)
    return key


# ---------------------------------------------------------------- signatures


@dataclass(frozen=True)
class Signature:
    sha256: str
    key_id: str
    signature: bytes
    signed_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SIGNATURE_FORMAT,
            "version": SIGNATURE_VERSION,
            "algorithm": "ed25519",
            "sha256": self.sha256,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "signed_at": self.signed_at,
        }


def sign_model(model_path: Path, key: Ed25519PrivateKey, out: Path | None = None) -> Path:
    """Sign a model file: writes ``<model>.sig`` (or ``out``) and returns its path."""
    from edge_stn.runtime.metadata import file_sha256

    if not model_path.is_file():
        raise ConfigError("no such model file", path=model_path)
    sha = file_sha256(model_path)
    sig = Signature(
        sha256=sha,
        key_id=key_id(key.public_key()),
        signature=key.sign(signed_message(sha)),
        signed_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    target = out or signature_path(model_path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(sig.to_dict(), indent=2) + "\n")
    os.replace(tmp, target)
    return target


def read_signature(path: Path, *, model: Path) -> Signature:
    """Parse a ``.sig`` file; :class:`ModelIntegrityError` naming the model when it is bad."""
    try:
        doc = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ModelIntegrityError(
            f"unsigned: no signature file {path.name} beside it (model.trust.require "
            "asks for one; sign it with `edge-stn sign-model`)",
            path=model,
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelIntegrityError(
            f"signature file {path.name} is unreadable: {_first_line(exc)}", path=model
        ) from None
    try:
        if doc["format"] != SIGNATURE_FORMAT or doc["version"] != SIGNATURE_VERSION:
            raise ValueError(f"format {doc['format']!r} version {doc['version']!r}")
        if doc["algorithm"] != "ed25519":
            raise ValueError(f"algorithm {doc['algorithm']!r}")
        sha = str(doc["sha256"]).lower()
        bytes.fromhex(sha)
        raw = base64.b64decode(doc["signature"], validate=True)
        if len(sha) != 64 or len(raw) != 64:
            raise ValueError("sha256 or signature of the wrong length")
        return Signature(sha, str(doc.get("key_id", "?")), raw, str(doc.get("signed_at", "?")))
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise ModelIntegrityError(
            f"signature file {path.name} is not an edge-stn Ed25519 signature: {_first_line(exc)}",
            path=model,
        ) from None


def verify_signature(model: Path, sha256: str, keys: list[Ed25519PublicKey]) -> str:
    """Check ``<model>.sig`` against the file's sha256 and the keys; the key id that signed it."""
    from cryptography.exceptions import InvalidSignature

    sig = read_signature(signature_path(model), model=model)
    if sig.sha256 != sha256:
        raise ModelIntegrityError(
            f"mis-signed: its signature is for sha256 {sig.sha256[:12]}..., the file is "
            f"{sha256[:12]}... (the model was changed after signing)",
            path=model,
        )
    for key in keys:
        try:
            key.verify(sig.signature, signed_message(sha256))
        except InvalidSignature:
            continue
        return key_id(key)
    raise ModelIntegrityError(
        f"mis-signed: the signature (key {sig.key_id}) does not verify with any of the "
        f"{len(keys)} configured public key(s) ({', '.join(key_id(k) for k in keys)})",
        path=model,
    )


def check_model_trust(model: Path, sha256: str, trust: ModelTrustConfig) -> str:
    """Apply ``model.trust`` to a model file of known sha256; returns how it was trusted
    (``"signed by <key id>"``, ``"allow-listed"`` or ``"not checked"``).

    Raises :class:`ModelIntegrityError` (unsigned, mis-signed, not allow-listed) or
    :class:`ConfigError` (an unreadable public key)."""
    if trust.require == "none":
        return "not checked"
    allowed = {s.lower() for s in trust.allowed_sha256}
    if trust.require in ("allowlist", "either") and sha256 in allowed:
        return "allow-listed"
    if trust.require == "allowlist":
        raise ModelIntegrityError(
            f"sha256 {sha256} is not in model.trust.allowed_sha256", path=model
        )
    keys = trusted_keys(trust)
    if trust.require == "either" and not keys:
        raise ModelIntegrityError(
            f"sha256 {sha256} is not in model.trust.allowed_sha256 (and no public key is "
            "configured to accept a signature)",
            path=model,
        )
    return f"signed by {verify_signature(model, sha256, keys)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
