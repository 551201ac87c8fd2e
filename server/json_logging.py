"""Log set-up shared by the server and the agent: one JSON object per line, or short lines for people.

Why JSON: CloudWatch Logs Insights and ``jq`` can filter on fields (stream ids, hosts,
reasons) passed with ``extra={...}``; a one-line record also survives log shipping intact.
Why not always: someone reading a terminal wants ``12:04:31 info  Connected … server=…``, so
a stream that is a terminal gets ``ConsoleFormatter`` unless ``log_format`` says otherwise.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, TextIO

LogLevel = Literal["debug", "info", "warning", "error"]
#: ``auto``: short coloured lines on a terminal, JSON for files, pipes and containers.
LogFormat = Literal["auto", "json", "text"]

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


#: The console's level names: one width, so messages line up.
_CONSOLE_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error", "CRITICAL": "crit"}
#: ANSI colours per level (SGR parameters).
_CONSOLE_COLOURS = {"debug": "2", "info": "32", "warn": "33", "error": "1;31", "crit": "1;31"}
_PLAIN_VALUE = re.compile(r"[^\s\"'=]+")


def _console_value(value: object) -> str:
    """An extra's value as people read it: bare when unambiguous, else JSON-quoted."""
    safe = json_safe(value)
    if isinstance(safe, str) and _PLAIN_VALUE.fullmatch(safe):
        return safe
    return json.dumps(safe, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """``12:04:31 info  message key=value``: local time, a short level (coloured on request)."""

    def __init__(self, *, colour: bool = False, include_traceback: bool = False) -> None:
        super().__init__()
        self.colour = colour
        self.include_traceback = include_traceback

    def format(self, record: logging.LogRecord) -> str:
        level = _CONSOLE_LEVELS.get(record.levelname, record.levelname.lower())
        shown = f"{level:<5}"
        if self.colour:
            shown = f"\x1b[{_CONSOLE_COLOURS.get(level, '0')}m{shown}\x1b[0m"
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {shown} {_message(record)}"
        extras = extra_fields(record)
        if extras:
            line += " " + " ".join(f"{key}={_console_value(value)}" for key, value in extras.items())
        error = _error_text(record)
        if error is not None:
            line += f" error={_console_value(error)}"
        if self.include_traceback:
            trace = _traceback_text(record)
            if trace is not None:
                line += "\n" + trace
        return line


def is_terminal(stream: object) -> bool:
    """True when ``stream`` is an interactive terminal (not a file, pipe or container log)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # closed or detached streams
        return False


def supports_colour(stream: object, environ: Mapping[str, str] = os.environ) -> bool:
    """Colour only for a terminal that understands ANSI and a user who has not asked for none."""
    if not is_terminal(stream) or "NO_COLOR" in environ or environ.get("TERM") == "dumb":
        return False
    if os.name == "nt":  # the classic console needs VT mode; Windows Terminal and ANSICON have it
        return "WT_SESSION" in environ or "ANSICON" in environ
    return True


def stream_format(log_format: str, stream: object) -> Literal["json", "text"]:
    """What ``log_format`` means for this stream: ``auto`` is text on a terminal, else JSON."""
    if log_format == "auto":
        return "text" if is_terminal(stream) else "json"
    if log_format in ("json", "text"):
        return log_format  # type: ignore[return-value]
    raise ValueError(f"unknown log format {log_format!r}; expected auto, json or text")


def _mark(handler: logging.Handler) -> logging.Handler:
    """Tag a handler so configure_logging replaces only the handlers it installed."""
    handler._fluidity_owned = True  # type: ignore[attr-defined]
    return handler


def configure_logging(
    level: str,
    log_file: Path | None = None,
    *,
    json_format: bool = True,
    log_format: str = "auto",
    stream: TextIO | None | Literal["stderr"] = "stderr",
) -> None:
    """Send every log record to ``stream`` and optionally ``log_file`` (rotated 1 MiB x 3).

    ``log_format`` "auto" writes short human lines to a terminal and JSON everywhere else
    (files, pipes, containers); "json" or "text" forces that format for both. ``json_format``
    False is the older switch for the one-line ``TextFormatter`` everywhere.
    Calling again replaces the handlers this function installed and leaves others alone.
    ``stream`` defaults to the process's stderr at call time; None writes to no stream
    (windowed apps have no stderr). Tracebacks are included only at debug level.
    """
    numeric_level = parse_level(level)
    include_traceback = numeric_level <= logging.DEBUG
    target = sys.stderr if stream == "stderr" else stream
    stream_kind = stream_format(log_format, target)
    handlers: list[tuple[logging.Handler, logging.Formatter]] = []

    def formatter_for(kind: str, for_stream: bool) -> logging.Formatter:
        if not json_format:
            return TextFormatter(include_traceback=include_traceback)
        if kind == "json":
            return JsonFormatter(include_traceback=include_traceback)
        if for_stream:
            return ConsoleFormatter(colour=supports_colour(target), include_traceback=include_traceback)
        return TextFormatter(include_traceback=include_traceback)

    if target is not None and not isinstance(target, str):
        handlers.append((logging.StreamHandler(target), formatter_for(stream_kind, True)))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_kind = "text" if log_format == "text" else "json"
        from logging.handlers import RotatingFileHandler  # only with a log file: pickle stays out

        rotating = RotatingFileHandler(
            log_file, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
        )
        handlers.append((rotating, formatter_for(file_kind, False)))
    reset_logging()
    root = logging.getLogger()
    for handler, formatter in handlers:
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
