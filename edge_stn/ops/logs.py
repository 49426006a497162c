"""Log output for operations: one JSON object per line (``log_format: json``) and a last line of
defence that masks secrets in every record.

A JSON line holds ``ts`` (Unix seconds), ``time`` (ISO 8601, UTC), ``level``, ``logger``,
``thread``, ``message`` and, for an exception, ``exc`` (its traceback as text). journald, Loki,
Elasticsearch and ``jq`` read it as it is.

:class:`SecretFilter` replaces every configured secret (the MQTT password, passwords in camera
URLs) by ``**********`` in the formatted message and traceback of every record that reaches the
root handlers, whichever library logged it. The code never logs secrets on purpose (pydantic's
``SecretStr``, :func:`edge_stn.config.redact_url`); this filter catches the accident.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

from edge_stn.config import SECRET_MASK, DaemonConfig

MIN_SECRET_LEN = 4
"""Shorter secrets are not masked (masking "pw" would garble every log line)."""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False)


class SecretFilter(logging.Filter):
    """Masks the given secrets in each record's message (and traceback)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted(
            {s for s in secrets if len(s) >= MIN_SECRET_LEN}, key=len, reverse=True
        )

    def _mask(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, SECRET_MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = self._mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._mask(record.exc_text)
            record.exc_info = None
        return True


def config_secrets(cfg: DaemonConfig) -> list[str]:
    """The secret values of a config: the MQTT password, the command token and camera URL
    passwords."""
    out: list[str] = []
    if cfg.mqtt.password is not None:
        out.append(cfg.mqtt.password.get_secret_value())
    if cfg.commands.token is not None:
        out.append(cfg.commands.token.get_secret_value())
    for cam in cfg.cameras:
        if isinstance(cam.source, str) and "@" in cam.source:
            password = urlsplit(cam.source).password
            if password:
                out += [password, unquote(password)]
    return out


def configure_logging(log_format: str, secrets: Iterable[str] = ()) -> None:
    """Apply the format and the secret filter to every handler of the root logger."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    secret_filter = SecretFilter(secrets)
    for handler in root.handlers:
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
        for old in [f for f in handler.filters if isinstance(f, SecretFilter)]:
            handler.removeFilter(old)
        handler.addFilter(secret_filter)
