"""Log line formats: plain text (the default) or one JSON object per line for log shippers."""

from __future__ import annotations

import json
import logging


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", "thread"[, "exc"]}` per record."""

    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
             "msg": record.getMessage(), "thread": record.threadName}
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


def use_json_logs() -> None:
    """Switch every handler of the root logger to JSON lines."""
    for h in logging.getLogger().handlers:
        h.setFormatter(JsonFormatter())
