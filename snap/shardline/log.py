"""Structured logs, one line per event: plain text, or JSON lines with `--json-output` (as TGI)."""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, static_fields: dict[str, object]) -> None:
        super().__init__()
        self.static_fields = static_fields

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
            **self.static_fields,
        }
        event.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS})
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, static_fields: dict[str, object]) -> None:
        prefix = " ".join(f"{k}={v}" for k, v in static_fields.items())
        fmt = (
            "%(asctime)s %(levelname)s %(name)s"
            + (f" {prefix}" if prefix else "")
            + ": %(message)s"
        )
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


def configure_logging(
    json_output: bool = False, level: str = "INFO", **static_fields: object
) -> None:
    """Sends every log record to stderr, one line each; `static_fields` (e.g. rank) go on every line."""
    handler = logging.StreamHandler(sys.stderr)
    formatter_cls = JsonFormatter if json_output else TextFormatter
    handler.setFormatter(formatter_cls(static_fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
