"""Durations as people write them ("90s", "10m", "1h", "250ms", "1m30s"), for every part of Fluidity.

Why one module: the agent's and server's settings and the Lambdas' IDLE_THRESHOLD read the
same notation, so one parser keeps them from drifting apart. Standard library only: the
Lambda bundle ships this module (``lambdas/packaging.py``). Callers turn the ValueError
into their own error, naming the key that was wrong.
"""

from __future__ import annotations

import math
import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)")
_BARE_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
DURATION_HINT = 'expected a duration like "90s", "10m", "1h", "250ms", "1m30s" or a number of seconds'


def parse_duration(text: str | int | float) -> float:
    """Seconds in ``text`` ("90s", "10m", "1h", "250ms", "1m30s" or a bare number of seconds).

    Raises ValueError (starting with DURATION_HINT) for negative, non-finite or unparseable input.
    """
    if isinstance(text, bool):
        raise ValueError(f"{DURATION_HINT}, got {text!r}")
    if isinstance(text, int | float):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"{DURATION_HINT}, got {text!r}")
        return float(text)
    if not isinstance(text, str):
        raise ValueError(f"{DURATION_HINT}, got {text!r}")
    stripped = text.strip()
    if _BARE_NUMBER.fullmatch(stripped):
        return float(stripped)
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(stripped):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position == 0 or position != len(stripped):
        raise ValueError(f"{DURATION_HINT}, got {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """The shortest text parse_duration reads back as ``seconds`` (to the millisecond)."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be a finite number >= 0, got {seconds!r}")
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if rest:
        parts.append(f"{rest // 1000}s" if rest % 1000 == 0 else f"{rest / 1000:g}s")
    return "".join(parts)
