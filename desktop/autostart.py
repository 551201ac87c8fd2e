"""Start the tray at login: a Run registry value, a LaunchAgent or an XDG autostart entry.

Each platform has one per-user mechanism that needs no admin rights; all three are written
with the standard library only. The command line comes from ``desktop.launch`` so the entry
is right both for a PyInstaller bundle and for a pip install.
"""

from __future__ import annotations

import os
import plistlib
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from desktop.launch import command_for, is_frozen

APP_NAME = "Fluidity"
#: File name of the XDG autostart entry.
DESKTOP_FILE_NAME = "fluidity.desktop"
#: launchd label (and plist file name) of the macOS LaunchAgent.
LAUNCH_AGENT_LABEL = "io.fluidity.tray"
#: Registry value name under HKCU\...\Run.
RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"
#: Passed to the tray at login: no window, no "already running" noise.
BACKGROUND_FLAG = "--background"


class Autostart(Protocol):
    def enable(self, command: list[str]) -> None: ...
    def disable(self) -> None: ...
    def is_enabled(self) -> bool: ...
    def describe(self) -> str: ...


def launch_command(config_path: Path | None = None, flags: Sequence[str] = ()) -> list[str]:
    """The command line the login entry runs: this installation's ``fluidity --background``,
    with the settings file and the setting flags the tray itself was started with."""
    command = command_for("fluidity")
    if not is_frozen() and sys.platform == "win32":
        # pythonw.exe runs the tray without opening a console window at every login.
        windowless = Path(command[0]).with_name("pythonw.exe")
        if windowless.is_file():
            command[0] = str(windowless)
    command.append(BACKGROUND_FLAG)
    if config_path is not None:
        command += ["--config", str(Path(config_path).resolve())]
    command += flags
    return command


# ----------------------------------------------------------------------------- Linux / BSD

_EXEC_ESCAPED = re.compile(r'(["`$\\])')


def desktop_exec_value(argv: list[str]) -> str:
    """Quote ``argv`` for an ``Exec=`` key as the Desktop Entry spec requires.

    Every argument is double-quoted with ``" ` $ \\`` backslash-escaped and ``%`` doubled;
    then the whole value gets the spec's string-level escaping (each backslash doubled).
    """
    parts = []
    for arg in argv:
        if "\n" in arg or "\r" in arg:
            raise ValueError(f"a newline cannot be written in a desktop entry: {arg!r}")
        parts.append('"' + _EXEC_ESCAPED.sub(r"\\\1", arg).replace("%", "%%") + '"')
    return " ".join(parts).replace("\\", "\\\\")


def _xdg_config_home() -> Path:
    value = os.environ.get("XDG_CONFIG_HOME", "")
    return Path(value) if value and Path(value).is_absolute() else Path.home() / ".config"


class XdgAutostart:
    """``$XDG_CONFIG_HOME/autostart/fluidity.desktop``, read by GNOME, KDE, XFCE and others."""

    def __init__(self, config_home: Path | None = None, icon: Path | None = None) -> None:
        self.path = (config_home or _xdg_config_home()) / "autostart" / DESKTOP_FILE_NAME
        self.icon = icon

    def entry(self, command: list[str]) -> str:
        lines = [
            "[Desktop Entry]",
            "Type=Application",
            f"Name={APP_NAME}",
            "Comment=Personal on-demand tunnel (tray icon)",
            f"Exec={desktop_exec_value(command)}",
            "Terminal=false",
            "X-GNOME-Autostart-enabled=true",
        ]
        if self.icon is not None:
            lines.insert(4, f"Icon={self.icon}")
        return "\n".join(lines) + "\n"

    def enable(self, command: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(self.entry(command), encoding="utf-8")
        os.replace(temporary, self.path)

    def disable(self) -> None:
        self.path.unlink(missing_ok=True)

    def is_enabled(self) -> bool:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError:
            return False
        # A desktop may switch an entry off in place instead of deleting it.
        return "Hidden=true" not in text and "X-GNOME-Autostart-enabled=false" not in text

    def describe(self) -> str:
        return str(self.path)


# ----------------------------------------------------------------------------- macOS


class LaunchAgentAutostart:
    """``~/Library/LaunchAgents/<label>.plist`` with RunAtLoad: launchd starts it at login."""

    def __init__(self, home: Path | None = None) -> None:
        self.path = (home or Path.home()) / "Library" / "LaunchAgents" / f"{LAUNCH_AGENT_LABEL}.plist"

    def plist(self, command: list[str]) -> dict[str, Any]:
        return {
            "Label": LAUNCH_AGENT_LABEL,
            "ProgramArguments": list(command),
            "RunAtLoad": True,
            "KeepAlive": False,
            "ProcessType": "Interactive",
        }

    def enable(self, command: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("wb") as handle:
            plistlib.dump(self.plist(command), handle)
        os.replace(temporary, self.path)

    def disable(self) -> None:
        self.path.unlink(missing_ok=True)

    def is_enabled(self) -> bool:
        try:
            with self.path.open("rb") as handle:
                return bool(plistlib.load(handle).get("RunAtLoad"))
        except (OSError, plistlib.InvalidFileException):
            return False

    def describe(self) -> str:
        return str(self.path)


# ----------------------------------------------------------------------------- Windows


class RunKeyAutostart:
    """A ``Fluidity`` value under ``HKCU\\...\\CurrentVersion\\Run`` (per user, no admin)."""

    def __init__(self, registry: ModuleType | Any | None = None) -> None:
        if registry is None:
            import importlib

            registry = importlib.import_module("winreg")  # Windows only
        self.registry: Any = registry

    def enable(self, command: list[str]) -> None:
        reg = self.registry
        with reg.CreateKeyEx(reg.HKEY_CURRENT_USER, RUN_KEY, 0, reg.KEY_SET_VALUE) as key:
            reg.SetValueEx(key, APP_NAME, 0, reg.REG_SZ, subprocess.list2cmdline(command))

    def disable(self) -> None:
        reg = self.registry
        try:
            with reg.OpenKey(reg.HKEY_CURRENT_USER, RUN_KEY, 0, reg.KEY_SET_VALUE) as key:
                reg.DeleteValue(key, APP_NAME)
        except FileNotFoundError:
            pass

    def is_enabled(self) -> bool:
        reg = self.registry
        try:
            with reg.OpenKey(reg.HKEY_CURRENT_USER, RUN_KEY, 0, reg.KEY_READ) as key:
                value, _kind = reg.QueryValueEx(key, APP_NAME)
        except FileNotFoundError:
            return False
        return bool(value)

    def describe(self) -> str:
        return f"HKEY_CURRENT_USER\\{RUN_KEY}\\{APP_NAME}"


def for_platform(platform: str = sys.platform, icon: Path | None = None) -> Autostart:
    """The mechanism of ``platform`` (a ``sys.platform`` value)."""
    if platform == "win32":
        return RunKeyAutostart()
    if platform == "darwin":
        return LaunchAgentAutostart()
    return XdgAutostart(icon=icon)
