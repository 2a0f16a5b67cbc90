"""Secrets never reach a log line or a print: the one redaction helper of the project.

Two kinds of secret are hidden: the password part of any URL (`redis://user:PASSWORD@host`, whatever the
scheme), and every secret value the process was configured with (`redis.password`, `kafka.sasl_password`,
a password inside `redis.url`), which `make_redis` and the Kafka client config register here as they
read them. `install_log_redaction` makes every log record of the process pass through `redact` (kafka-python,
for one, logs its whole client configuration at DEBUG); prints of configuration go through `redact_url`.
"""

from __future__ import annotations

import logging
import re
import threading
from urllib.parse import urlsplit

MASK = "***"
MIN_SECRET_LEN = 4
"""Shorter values are not redacted as free text (they would mangle ordinary words); inside URLs they are."""

_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+._\-]*://[^:@/\s]*:)(?P<pw>[^@/\s]+)(?=@)")
_secrets: set[str] = set()
_lock = threading.Lock()
_installed = False


def redact_url(url: str) -> str:
    """`url` with its password (if any) replaced by `***`; user, host, port, path kept."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, url)


def url_password(url: str) -> str | None:
    """The password inside a URL, if it has one."""
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def register_secrets(*values: str | None) -> None:
    """Remember secret values so `redact` hides them wherever they appear."""
    new = {v for v in values if v and len(v) >= MIN_SECRET_LEN}
    if new - _secrets:
        with _lock:
            _secrets.update(new)


def redact(text: str) -> str:
    """`text` with URL passwords and every registered secret replaced by `***`."""
    out = redact_url(text)
    for s in sorted(_secrets, key=len, reverse=True):  # longest first: a secret may contain another
        if s in out:
            out = out.replace(s, MASK)
    return out


def install_log_redaction() -> None:
    """Redact every log record created from now on in this process (idempotent).

    Done in the record factory, not in a handler filter, so it covers handlers added later and every
    logger, including third-party ones. Only records that hold a secret are rewritten.
    """
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    base = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = base(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string is logging's to report, not ours
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            clean = redact(text)
            if clean != text:
                record.exc_text = clean
        return record

    logging.setLogRecordFactory(factory)
