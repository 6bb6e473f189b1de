"""Logging set-up shared by the worker and the launcher, with the level names and formats that the scheduler
accepts too."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING}
LOG_FORMATS = ("text", "json")
# The scheduler's (tracing's) names, so that one filter reads all three processes' JSON logs.
_JSON_LEVELS = {"WARNING": "WARN", "CRITICAL": "ERROR"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the keys of the scheduler's (tracing's) JSON lines: timestamp (UTC, RFC
    3339), level, target (the logger's name), message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat()
            .replace("+00:00", "Z"),
            "level": _JSON_LEVELS.get(record.levelname, record.levelname),
            "target": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")
    name = level.lower()
    value = _LEVELS.get(name) or logging.getLevelName(name.upper())
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=value if isinstance(value, int) else logging.INFO, handlers=[handler])
