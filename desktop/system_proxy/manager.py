"""Set the OS proxy, and put the user's own settings back exactly, even after a crash.

Before anything is changed, the previous values, what Fluidity is about to set and the
owner's pid go to a state file (written atomically, in the per-user state folder). While
the proxy is set, the owner holds an OS lock on a sibling lock file; the OS drops it when
the process dies, however it dies, so the next start knows the owner is gone (a pid alone
can be reused) and restores from the file first.

Restoring compares each part with what Fluidity set: a part the user changed meanwhile
(a value that is neither theirs from before nor Fluidity's) is left as they set it, and the
log says so.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from desktop.single_instance import InstanceLock
from desktop.system_proxy.base import Backend, Parts, ProxyRequest, SystemProxyError, changed_keys

log = logging.getLogger("fluidity.system_proxy")

STATE_VERSION = 1


def foreign_keys(now: dict[str, Any], previous: dict[str, Any], applied: dict[str, Any]) -> list[str]:
    """Keys holding a value neither the user had nor Fluidity set: someone changed them meanwhile.

    A key still at the user's old value counts as Fluidity's too, so a part Fluidity was
    killed in the middle of writing is restored, not mistaken for the user's change.
    """
    keys = sorted(now.keys() | previous.keys())
    return [key for key in keys if now.get(key) not in (previous.get(key), applied.get(key))]


class PartOutcome(enum.StrEnum):
    """What restoring did to one part (a settings store, or one macOS network service)."""

    RESTORED = "restored"
    UNCHANGED = "unchanged"  # it already held the user's values
    KEPT_USER_CHANGE = "kept_user_change"  # changed by someone else while Fluidity ran: left alone
    GONE = "gone"  # the part no longer exists (a removed network service)
    FAILED = "failed"


class OwnedElsewhere(SystemProxyError):
    """Another running Fluidity process holds the system proxy; this one leaves it alone."""


@dataclass
class RestoreReport:
    backend: str
    outcomes: dict[str, PartOutcome] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    crashed_owner: int | None = None  # set when restoring after a process that died

    @property
    def ok(self) -> bool:
        return not self.errors

    def kept(self) -> list[str]:
        return [part for part, outcome in self.outcomes.items() if outcome is PartOutcome.KEPT_USER_CHANGE]

    def message(self) -> str:
        """One line for the log and a notification."""
        start = "Restored the proxy settings you had before Fluidity"
        if self.crashed_owner is not None:
            start = f"Fluidity (pid {self.crashed_owner}) did not exit cleanly: restored your proxy settings"
        kept = self.kept()
        if self.errors:
            return f"Could not restore your proxy settings: {'; '.join(self.errors)}"
        if kept:
            return f"{start}; kept the changes you made meanwhile to {', '.join(kept)}."
        return f"{start}."


class SystemProxyManager:
    """engage(request) sets the OS proxy; release() restores it; recover() cleans up after a crash."""

    def __init__(self, backend: Backend, state_path: Path, *, backend_for: Any = None) -> None:
        self.backend = backend
        self.state_path = state_path
        self._lock = InstanceLock(state_path.with_suffix(".lock"))
        self._state: dict[str, Any] | None = None
        #: name -> Backend, for a state file written by another backend (a different session type).
        self._backend_for = backend_for

    @property
    def engaged(self) -> bool:
        return self._state is not None

    # ----- state file ---------------------------------------------------------

    def _save(self, state: dict[str, Any]) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.state_path)

    def _load(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.error("unreadable system proxy state file %s: %s", self.state_path, error)
            return None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            log.error("system proxy state file %s has an unknown format; leaving it", self.state_path)
            return None
        return state

    def _discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()

    # ----- the three operations ----------------------------------------------------

    def recover(self) -> RestoreReport | None:
        """At start: restore what a dead owner left behind. None if there was nothing to do."""
        if self.engaged:
            return None
        if not self._lock.acquire():
            return None  # its owner is alive and will restore it itself
        try:
            state = self._load()
            if state is None:
                return None
            backend = self._backend_of(state)
            if backend is None:
                log.error(
                    "cannot restore the system proxy: the %s settings it changed are not available here",
                    state.get("backend"),
                )
                return None
            report = self._restore(backend, state)
            report.crashed_owner = int(state.get("owner_pid") or 0) or None
            return report
        finally:
            self._lock.release()

    def engage(self, request: ProxyRequest) -> bool:
        """Point the OS at the agent; True if anything changed. Raises SystemProxyError."""
        if self._state is not None:
            if self._state["request"] == request.describe():
                return False
            return self._update(request)
        if not self._lock.acquire():
            pid = self._lock.holder_pid()
            raise OwnedElsewhere(
                f"another Fluidity process{f' (pid {pid})' if pid else ''} manages the system proxy"
            )
        try:
            leftover = self._load()
            if leftover is not None:  # a crash the start-up recovery did not clean (another backend?)
                backend = self._backend_of(leftover)
                if backend is not None:
                    log.warning("system proxy: %s", self._restore(backend, leftover).message())
            previous = self.backend.read()
            desired = self.backend.render(request, previous)
            state = {
                "version": STATE_VERSION,
                "backend": self.backend.name,
                "owner_pid": os.getpid(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "request": request.describe(),
                "previous": previous,
                "applied": desired,
            }
            self._save(state)  # before the first change: a crash from here on can be undone
            try:
                self.backend.write(changed_keys(desired, previous))
                state["applied"] = self.backend.read()
            except Exception:
                self._undo(previous)
                raise
            self._save(state)
            self._state = state
        except BaseException:
            if self._state is None:
                self._lock.release()
            raise
        log.info("system proxy set", extra={"backend": self.backend.name, "request": request.describe()})
        return True

    def _update(self, request: ProxyRequest) -> bool:
        """Already engaged, the request changed (the agent's port, the mode): write the difference."""
        state = self._state
        assert state is not None
        current = self.backend.read()
        desired = self.backend.render(request, state["previous"])
        state["request"] = request.describe()
        state["applied"] = desired
        self._save(state)
        self.backend.write(changed_keys(desired, current))
        state["applied"] = self.backend.read()
        self._save(state)
        log.info("system proxy updated", extra={"backend": self.backend.name, "request": request.describe()})
        return True

    def release(self) -> RestoreReport | None:
        """Put the user's settings back (leaving parts they changed); None if nothing was set."""
        state = self._state
        if state is None:
            return None
        try:
            report = self._restore(self.backend, state)
        finally:
            self._state = None
            self._lock.release()
        return report

    # ----- restoring ------------------------------------------------------------------

    def _backend_of(self, state: dict[str, Any]) -> Backend | None:
        name = state.get("backend")
        if name == self.backend.name:
            return self.backend
        if self._backend_for is None:
            return None
        found: Backend | None = self._backend_for(name)
        return found

    def _restore(self, backend: Backend, state: dict[str, Any]) -> RestoreReport:
        report = RestoreReport(backend.name)
        previous: Parts = state.get("previous", {})
        applied: Parts = state.get("applied", {})
        try:
            current = backend.read()
        except SystemProxyError as error:
            report.errors.append(str(error))
            log.error("system proxy not restored (state kept in %s): %s", self.state_path, error)
            return report
        for part, values in previous.items():
            now = current.get(part)
            if now is None:
                report.outcomes[part] = PartOutcome.GONE
            elif now == values:
                report.outcomes[part] = PartOutcome.UNCHANGED
            elif foreign := foreign_keys(now, values, applied.get(part, {})):
                report.outcomes[part] = PartOutcome.KEPT_USER_CHANGE
                log.warning(
                    "system proxy: %s was changed while Fluidity ran; leaving it as it is",
                    part,
                    extra={"part": part, "changed": {key: now.get(key) for key in foreign}},
                )
            else:
                try:
                    backend.write(changed_keys({part: values}, {part: now}))
                except SystemProxyError as error:
                    report.outcomes[part] = PartOutcome.FAILED
                    report.errors.append(str(error))
                else:
                    report.outcomes[part] = PartOutcome.RESTORED
        if report.errors:
            log.error(
                "system proxy not fully restored (state kept in %s): %s", self.state_path, report.errors
            )
        else:
            self._discard()
            log.info(
                "system proxy restored",
                extra={"backend": backend.name, "outcomes": {k: v.value for k, v in report.outcomes.items()}},
            )
        return report

    def _undo(self, previous: Parts) -> None:
        """A write failed half-way: put back what was there, best effort, and forget the state."""
        try:
            self.backend.write(changed_keys(previous, self.backend.read()))
        except SystemProxyError as error:
            log.error("system proxy: undoing a failed change also failed: %s", error)
            return
        self._discard()
