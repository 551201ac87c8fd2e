"""What a doctor check returns, and how a whole report is printed (text or JSON).

Checks are plain functions returning ``CheckResult`` values; only this module knows how
they look on a terminal, so the CLI, ``fluidity-agent --doctor`` and the tray's
"Diagnose…" item print exactly the same lines.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class Status(enum.Enum):
    """The verdict of one check. Only FAIL makes the exit code 1."""

    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    INFO = "INFO"
    SKIP = "SKIP"


@dataclass(frozen=True)
class CheckResult:
    """One printed line: which check, its verdict, what was found and (unless it passed) the fix."""

    check: str
    status: Status
    finding: str
    fix: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "status": self.status.value,
            "finding": self.finding,
            "fix": self.fix,
            "details": dict(self.details),
        }


def passed(check: str, finding: str, **details: Any) -> CheckResult:
    return CheckResult(check, Status.PASS, finding, "", details)


def warned(check: str, finding: str, fix: str, **details: Any) -> CheckResult:
    return CheckResult(check, Status.WARN, finding, fix, details)


def failed(check: str, finding: str, fix: str, **details: Any) -> CheckResult:
    return CheckResult(check, Status.FAIL, finding, fix, details)


def info(check: str, finding: str, fix: str = "", **details: Any) -> CheckResult:
    return CheckResult(check, Status.INFO, finding, fix, details)


def skipped(check: str, why: str) -> CheckResult:
    return CheckResult(check, Status.SKIP, why)


#: Order and wording of the summary line.
_SUMMARY = (
    (Status.PASS, "passed", "passed"),
    (Status.WARN, "warning", "warnings"),
    (Status.FAIL, "failed", "failed"),
    (Status.INFO, "note", "notes"),
    (Status.SKIP, "skipped", "skipped"),
)


@dataclass(frozen=True)
class Report:
    """Every result in the order the checks ran, plus what the user most often needs next."""

    results: tuple[CheckResult, ...]
    source: str = ""
    server_public_ip: str | None = None

    @property
    def ok(self) -> bool:
        return not any(result.status is Status.FAIL for result in self.results)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def count(self, status: Status) -> int:
        return sum(1 for result in self.results if result.status is status)

    def by_check(self, check: str) -> CheckResult:
        """The result of ``check`` (tests and the tray look results up by their id)."""
        for result in self.results:
            if result.check == check:
                return result
        raise KeyError(check)

    def problems(self) -> list[CheckResult]:
        """Failures first, then warnings."""
        return [r for r in self.results if r.status is Status.FAIL] + [
            r for r in self.results if r.status is Status.WARN
        ]

    def summary(self) -> str:
        parts = []
        for status, one, many in _SUMMARY:
            number = self.count(status)
            if number or status in (Status.PASS, Status.FAIL):
                parts.append(f"{number} {one if number == 1 else many}")
        return "Summary: " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "exit_code": self.exit_code,
            "source": self.source,
            "server_public_ip": self.server_public_ip,
            "summary": {status.value: self.count(status) for status in Status},
            "checks": [result.to_json() for result in self.results],
        }


def render_lines(results: Iterable[CheckResult]) -> list[str]:
    """``STATUS  check  finding`` per result, and an indented ``fix:`` line under each problem."""
    results = list(results)
    width = max((len(result.check) for result in results), default=0)
    lines = []
    for result in results:
        lines.append(f"{result.status.value:<4}  {result.check:<{width}}  {result.finding}")
        if result.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {result.fix}")
    return lines


def render_text(report: Report) -> str:
    """The whole report as ``fluidity doctor`` prints it."""
    head = f"Fluidity doctor: {report.source}" if report.source else "Fluidity doctor"
    lines = [head, *render_lines(report.results)]
    if report.server_public_ip:
        lines.append(f"Server public IP: {report.server_public_ip}")
    lines.append(report.summary())
    return "\n".join(lines) + "\n"
