"""The log formats of diffserve's processes (`--log-format text|json`), defined once for the
scheduler (scheduler/joblog.py adds its job fields) and its workers (`serve --log-format json`
passes the format on to the local workers it starts).

text: `TIME PROCESS LEVEL LOGGER: MESSAGE`, as before.
json: one JSON object per line: time (UTC, ISO 8601, ms), level, logger, message, the fields the
process names (`static`: e.g. a worker's id and rank), the record's `extra=` fields among `fields`
when it carries them, and `exc` for a traceback (still one line); Python warnings go through logging
too. Imports only the standard library.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Iterable

FORMATS = ("text", "json")


def text_format(process: str) -> str:
    return f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def __init__(self, fields: Iterable[str] = (), static: dict | None = None):
        super().__init__()
        self.fields = tuple(fields)
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.static,
        }
        for name in self.fields:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str)


def configure(process: str, level: str, fmt: str = "text", *, fields: Iterable[str] = (), static: dict | None = None) -> None:
    """The process's logging on stderr: `text` or `json` (JsonFormatter with `fields` / `static`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(fields, static) if fmt == "json" else logging.Formatter(text_format(process)))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    if fmt == "json":  # warnings.warn(...) from libraries as JSON lines too (logger py.warnings)
        logging.captureWarnings(True)
