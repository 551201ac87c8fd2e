"""Log set-up shared by the server and the agent: one JSON object per line.

Why JSON: CloudWatch Logs Insights and ``jq`` can filter on fields (stream ids, hosts,
reasons) passed with ``extra={...}``; a one-line record also survives log shipping intact.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import math
import sys
import traceback
from pathlib import Path
from typing import Literal, TextIO

LogLevel = Literal["debug", "info", "warning", "error"]

LOG_FILE_MAX_BYTES = 1024 * 1024
LOG_FILE_BACKUPS = 3

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_MAX_DEPTH = 8


def parse_level(level: str) -> int:
    """The logging level for a name such as "info" (any case); ValueError names the choices."""
    try:
        return _LEVELS[level.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown log level {level!r}; expected debug, info, warning or error") from None


def format_time(created: float) -> str:
    """ISO-8601 UTC with milliseconds, e.g. 2024-05-01T12:00:00.123Z."""
    moment = dt.datetime.fromtimestamp(created, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def json_safe(value: object, depth: int = 0) -> object:
    """``value`` made of JSON types only; anything else (and NaN, deep nesting) becomes text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= _MAX_DEPTH:
        return str(value)
    if isinstance(value, dict):
        return {str(key): json_safe(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(item, depth + 1) for item in value]
    return str(value)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a bad format string must not lose the record
        return f"{record.msg!r} (arguments {record.args!r} did not fit)"


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The ``extra={...}`` fields attached to a record."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


def _error_text(record: logging.LogRecord) -> str | None:
    if not record.exc_info or record.exc_info[1] is None:
        return None
    error = record.exc_info[1]
    detail = " ".join(str(error).split())
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def _traceback_text(record: logging.LogRecord) -> str | None:
    parts = []
    if record.exc_info and record.exc_info[1] is not None:
        parts.append("".join(traceback.format_exception(*record.exc_info)).rstrip())
    if record.stack_info:
        parts.append(record.stack_info.rstrip())
    return "\n".join(parts) or None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extras, error (+ traceback)."""

    def __init__(self, *, include_traceback: bool = False) -> None:
        super().__init__()
        self.include_traceback = include_traceback

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": format_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _message(record),
        }
        for key, value in extra_fields(record).items():
            entry[key if key not in entry else f"extra_{key}"] = json_safe(value)
        error = _error_text(record)
        if error is not None:
            entry["error"] = error
        if self.include_traceback:
            trace = _traceback_text(record)
            if trace is not None:
                entry["traceback"] = trace
        return json.dumps(entry, ensure_ascii=False, allow_nan=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal: time level logger: message key=value ..."""

    def __init__(self, *, include_traceback: bool = False) -> None:
        super().__init__()
        self.include_traceback = include_traceback

    def format(self, record: logging.LogRecord) -> str:
        line = f"{format_time(record.created)} {record.levelname:<7} {record.name}: {_message(record)}"
        extras = extra_fields(record)
        if extras:
            line += " " + " ".join(
                f"{key}={json.dumps(json_safe(value), ensure_ascii=False)}" for key, value in extras.items()
            )
        error = _error_text(record)
        if error is not None:
            line += f" error={json.dumps(error, ensure_ascii=False)}"
        if self.include_traceback:
            trace = _traceback_text(record)
            if trace is not None:
                line += "\n" + trace
        return line


def _mark(handler: logging.Handler) -> logging.Handler:
    """Tag a handler so configure_logging replaces only the handlers it installed."""
    handler._fluidity_owned = True  # type: ignore[attr-defined]
    return handler


def configure_logging(
    level: str,
    log_file: Path | None = None,
    *,
    json_format: bool = True,
    stream: TextIO | None | Literal["stderr"] = "stderr",
) -> None:
    """Send every log record to ``stream`` and optionally ``log_file`` (rotated 1 MiB x 3).

    Calling again replaces the handlers this function installed and leaves others alone.
    ``stream`` defaults to the process's stderr at call time; None writes to no stream
    (windowed apps have no stderr). Tracebacks are included only at debug level.
    """
    numeric_level = parse_level(level)
    include_traceback = numeric_level <= logging.DEBUG
    formatter: logging.Formatter = (
        JsonFormatter(include_traceback=include_traceback)
        if json_format
        else TextFormatter(include_traceback=include_traceback)
    )
    handlers: list[logging.Handler] = []
    target = sys.stderr if stream == "stderr" else stream
    if target is not None and not isinstance(target, str):
        handlers.append(logging.StreamHandler(target))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                log_file, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
            )
        )
    reset_logging()
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(_mark(handler))
    root.setLevel(numeric_level)
    logging.captureWarnings(True)


def reset_logging() -> None:
    """Remove and close the handlers configure_logging installed (others stay), e.g. at exit."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_fluidity_owned", False):
            root.removeHandler(handler)
            handler.close()
    logging.captureWarnings(False)
