"""Reload the settings file while the tray runs: when it changes, or from "Reload settings".

A bad edit must not take a working tray down: the file is checked by the same loader as at
start-up and only a file that loads is used; otherwise the running settings stay and the
message names the file, the key and the problem. Settings a session was started with (the
backend, the proxy port, the certificates) apply from the next Connect.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from desktop.config import AgentConfig
from desktop.lifecycle.base import LifecycleError
from server.config_loader import ConfigError, field_specs

log = logging.getLogger("fluidity.settings")

#: Settings the lifecycle backend is built from: a change needs a new backend.
BACKEND_KEYS = frozenset(
    {
        "lifecycle",
        "api_url",
        "api_key",
        "aws_profile",
        "aws_region",
        "cluster_name",
        "service_name",
        "server_address",
        "server_port",
        "wake_poll_interval",
        "local_server_config",
        "connect_timeout",
        "ca_file",
        "log_format",
    }
)
#: Settings read each time they are used: they apply at once, even while connected.
LIVE_KEYS = frozenset({"price_per_hour", "price_per_gb_out", "monthly_budget", "kill_on_disconnect"})
#: Settings of the log itself.
LOG_KEYS = frozenset({"log_level", "log_format"})


@dataclass(frozen=True)
class Stamp:
    """What tells one version of the file from the next without reading it."""

    mtime_ns: int
    size: int


def stamp(path: Path) -> Stamp | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return Stamp(info.st_mtime_ns, info.st_size)


def changed_settings(old: AgentConfig, new: AgentConfig) -> list[str]:
    """Names of the settings whose values differ, in declaration order."""
    return [name for name in field_specs(AgentConfig) if getattr(old, name) != getattr(new, name)]


#: Applies loaded settings; returns a note for the user ("" when there is nothing to add).
Apply = Callable[[AgentConfig, list[str]], str]


class SettingsReloader:
    """Watches one settings file; ``poll`` and ``reload`` return what to tell the user."""

    def __init__(
        self,
        path: Path,
        load: Callable[[], AgentConfig],
        apply: Apply,
        current: Callable[[], AgentConfig],
    ) -> None:
        self.path = path
        self._load = load
        self._apply = apply
        self._current = current
        self._used = stamp(path)  # the version the running settings came from
        self._seen = self._used

    def poll(self) -> str | None:
        """Reload once the file changed and then stayed the same for one poll (editors write
        in steps); the message for the user, or None when there is nothing new."""
        now = stamp(self.path)
        previous, self._seen = self._seen, now
        if now == self._used or now != previous:
            return None
        return self.reload()[1]

    def reload(self) -> tuple[bool, str]:
        """Load the file now: (True, what changed) or (False, why the running settings stay)."""
        self._used = self._seen = stamp(self.path)
        try:
            new = self._load()
        except ConfigError as error:
            log.warning("settings not reloaded", extra={"problem": str(error)})
            return False, f"Settings not reloaded, the running ones stay: {error}"
        changed = changed_settings(self._current(), new)
        if not changed:
            return True, f"Settings reloaded from {self.path}: nothing changed."
        try:
            note = self._apply(new, changed)
        except LifecycleError as error:
            return False, f"Settings not reloaded, the running ones stay: {error.message}"
        log.info("settings reloaded", extra={"changed": changed, "settings": new.describe()})
        shown = ", ".join(changed)
        return True, f"Settings reloaded from {self.path}: {shown} changed.{f' {note}' if note else ''}"
