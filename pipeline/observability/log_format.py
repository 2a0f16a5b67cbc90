"""Log line formats for every `anoclip` command: plain text (the default) or one JSON object per line.

JSON lines come from python-json-logger: `{"ts", "level", "logger", "msg", "thread"[, "exc"]}` plus the
record's fields. Ids are fields, not only words in the message, so a log shipper can filter on them:

* `extra={"line": ..., "frame_id": ...}` on a call, or `with log_context(line=..., frame_id=...):`
  around a block, sets them explicitly;
* otherwise they are read from the call's format string: `log.info("line %s: ...", line)` gives
  `"line": line`, as do `frame %s`, `frame_id=%s`, `camera %s`, `worker %s`, `stage=%s`.

Text lines show the same fields as a `[line=bottle frame_id=f1]` suffix.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _JsonBase

FIELDS = ("line", "frame_id", "camera", "worker", "stage", "version")
"""Record fields shown in both formats (and matched in format strings)."""
FORMATS = ("text", "json")

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("anoclip_log_context", default=None)
_CONVERSION = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa%]")
_WORD = re.compile(r"\b(line|frame_id|frame|camera|worker|stage|version)[ =:]['\"]?$")


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Fields added to every record logged inside the block (this thread or task only)."""
    token = _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def _template_fields(msg: Any, args: Any) -> dict[str, Any]:
    """Ids named by the words just before `%s` placeholders of the format string."""
    if not isinstance(msg, str) or not isinstance(args, tuple) or not args:
        return {}
    out: dict[str, Any] = {}
    i = 0
    for m in _CONVERSION.finditer(msg):
        if m.group(0) == "%%":
            continue
        w = _WORD.search(msg[max(0, m.start() - 12):m.start()])
        if w and i < len(args):
            out.setdefault("frame_id" if w.group(1) == "frame" else w.group(1), args[i])
        i += 1
    return out


class ContextFilter(logging.Filter):
    """Puts the known id fields on each record: explicit `extra`, then `log_context`, then the format string."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = {**_template_fields(record.msg, record.args), **(_context.get() or {})}
        for k, v in found.items():
            if k in FIELDS and not hasattr(record, k):
                setattr(record, k, v)
        return True


class JsonFormatter(_JsonBase):
    """One JSON object per record; `ts` is seconds since the epoch."""

    def __init__(self) -> None:
        super().__init__("{levelname}{name}{message}{threadName}", style="{",
                         rename_fields={"levelname": "level", "name": "logger", "message": "msg",
                                        "threadName": "thread", "exc_info": "exc"})

    def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_record, record, message_dict)
        log_record["ts"] = round(record.created, 3)


class TextFormatter(logging.Formatter):
    """`time level logger message [line=... frame_id=...]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = " ".join(f"{k}={getattr(record, k)}" for k in FIELDS if getattr(record, k, None) not in (None, ""))
        if not tags:
            return text
        head, sep, tail = text.partition("\n")  # keep a traceback below the tagged line
        return f"{head} [{tags}]{sep}{tail}"


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """The root logger for a command: one stderr handler in `fmt`, id fields on every record."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    root = logging.getLogger()
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    handler = next((h for h in root.handlers if getattr(h, "_anoclip", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._anoclip = True  # type: ignore[attr-defined]
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
    elif isinstance(handler, logging.StreamHandler) and handler.stream is not sys.stderr:
        # stderr was replaced since (a second command in one process, tests); the old one may be closed, so
        # no setStream (it flushes the old stream first)
        with handler.lock or contextlib.nullcontext():
            handler.stream = sys.stderr
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())


def use_json_logs() -> None:
    """Switch every handler of the root logger to JSON lines (with the id fields)."""
    root = logging.getLogger()
    if not root.handlers:
        configure_logging(logging.getLevelName(root.level), "json")
    for h in root.handlers:
        if not any(isinstance(f, ContextFilter) for f in h.filters):
            h.addFilter(ContextFilter())
        h.setFormatter(JsonFormatter())
