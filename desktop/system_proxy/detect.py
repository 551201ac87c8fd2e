"""Pick the backend for this desktop at run time, or say why there is none.

Linux desktops are told apart by ``XDG_CURRENT_DESKTOP`` (colon-separated, e.g.
``ubuntu:GNOME``); Windows and macOS have one backend each. Anything else gets a message
naming what to set by hand, and the tray's "Copy proxy settings" for terminals.
"""

from __future__ import annotations

import enum
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from desktop.bypass import BypassRules, PatternKind
from desktop.pac import authority
from desktop.system_proxy.base import Backend
from desktop.system_proxy.gsettings import GSettingsBackend
from desktop.system_proxy.kde import KdeBackend

#: Desktops whose proxy settings live in GSettings' org.gnome.system.proxy.
GSETTINGS_DESKTOPS = frozenset(
    {"gnome", "gnome-classic", "gnome-flashback", "ubuntu", "cinnamon", "x-cinnamon", "mate", "unity",
     "xfce", "budgie", "pantheon", "deepin", "lxde"}
)  # fmt: skip


class Unsupported(enum.StrEnum):
    """Why Fluidity cannot set this machine's proxy itself."""

    NO_DESKTOP = "no_desktop"  # no XDG_CURRENT_DESKTOP: a bare X session, a window manager, SSH
    UNKNOWN_DESKTOP = "unknown_desktop"
    TOOL_MISSING = "tool_missing"  # the desktop is known but its settings tool is not installed


@dataclass(frozen=True)
class Detection:
    backend: Backend | None
    unsupported: Unsupported | None = None
    detail: str = ""


def _desktops(environ: Mapping[str, str]) -> list[str]:
    return [
        name.strip().lower() for name in environ.get("XDG_CURRENT_DESKTOP", "").split(":") if name.strip()
    ]


def detect(
    environ: Mapping[str, str] = os.environ,
    platform: str = sys.platform,
    which: Callable[[str], str | None] = shutil.which,
) -> Detection:
    """The backend for this session, or why there is none."""
    if platform == "win32":
        from desktop.system_proxy.windows import WindowsBackend

        return Detection(WindowsBackend())
    if platform == "darwin":
        from desktop.system_proxy.macos import MacBackend

        return Detection(MacBackend())
    desktops = _desktops(environ)
    if not desktops:
        return Detection(None, Unsupported.NO_DESKTOP, "XDG_CURRENT_DESKTOP is not set")
    if "kde" in desktops:
        preferred = 6 if environ.get("KDE_SESSION_VERSION") == "6" else 5
        for version in (preferred, 11 - preferred):
            if which(f"kwriteconfig{version}") and which(f"kreadconfig{version}"):
                return Detection(KdeBackend(version, environ=environ))
        return Detection(None, Unsupported.TOOL_MISSING, f"KDE without kwriteconfig{preferred}")
    if GSETTINGS_DESKTOPS.intersection(desktops):
        backend = GSettingsBackend()
        if which("gsettings") and backend.available():
            return Detection(backend)
        return Detection(
            None, Unsupported.TOOL_MISSING, "no gsettings with the org.gnome.system.proxy schema"
        )
    return Detection(None, Unsupported.UNKNOWN_DESKTOP, f"desktop {environ.get('XDG_CURRENT_DESKTOP')!r}")


def backend_named(name: str, environ: Mapping[str, str] = os.environ) -> Backend | None:
    """The backend a state file names (the session may have changed since it was written)."""
    if name == "gsettings":
        return GSettingsBackend()
    if name == "kde":
        for version in (6, 5) if environ.get("KDE_SESSION_VERSION") == "6" else (5, 6):
            if shutil.which(f"kwriteconfig{version}"):
                return KdeBackend(version, environ=environ)
        return None
    detection = detect(environ)
    return detection.backend if detection.backend is not None and detection.backend.name == name else None


# ----------------------------------------------------------------------------- by hand


def no_proxy_list(rules: BypassRules) -> str:
    """The rules as a ``no_proxy`` value (curl, Python, Go: names, ``.domains``, CIDRs)."""
    entries = []
    for pattern in rules.patterns:
        if pattern.kind is PatternKind.LOCAL:
            continue
        if pattern.kind in (PatternKind.SUBDOMAINS, PatternKind.DOMAIN):
            entries.append(f".{pattern.name}")
        else:
            entries.append(pattern.text)
    return ",".join(dict.fromkeys(entries))


def terminal_exports(host: str, port: int, rules: BypassRules, platform: str = sys.platform) -> str:
    """What "Copy proxy settings" puts on the clipboard, for terminals (which ignore the OS proxy)."""
    where = authority(host, port)
    values = {
        "http_proxy": f"http://{where}",
        "https_proxy": f"http://{where}",
        "all_proxy": f"socks5h://{where}",
        "no_proxy": no_proxy_list(rules),
    }
    if platform == "win32":  # PowerShell
        return "; ".join(f'$env:{name} = "{value}"' for name, value in values.items())
    return "export " + " ".join(f"{name}={value}" for name, value in values.items())


def manual_instructions(host: str, port: int, rules: BypassRules, detection: Detection) -> str:
    """The one-time message when Fluidity cannot set the proxy itself."""
    where = authority(host, port)
    bypass = ", ".join(rules.texts) or "nothing"
    why = f" ({detection.detail})" if detection.detail else ""
    return (
        f"Fluidity cannot set the system proxy on this desktop{why}. Set it by hand: HTTP and HTTPS proxy "
        f"{where}, SOCKS5 {where}, no proxy for {bypass}. For terminals use the menu's Copy proxy settings."
    )
