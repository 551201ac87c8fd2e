"""KDE Plasma: ``[Proxy Settings]`` in ``kioslaverc``, written with kwriteconfig5/6.

Values are read with kreadconfig (which undoes KConfig's escaping), and which keys exist
is read from the file itself, so a key that was absent is deleted again on restore rather
than left empty. After a write, running KDE programs are told to re-read their proxy
settings with KIO's reparse D-Bus signal.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from desktop.bypass import BypassRules, PatternKind
from desktop.system_proxy.base import Mode, Parts, ProxyRequest, Runner, SystemProxyError, run_tool

PART = "kioslaverc"
FILE = "kioslaverc"
GROUP = "Proxy Settings"
#: ProxyType values in kioslaverc.
NO_PROXY, MANUAL_PROXY, PAC_PROXY = "0", "1", "2"
#: The keys Fluidity may change; ProxyType is written last.
KEYS = (
    "httpProxy",
    "httpsProxy",
    "socksProxy",
    "NoProxyFor",
    "ReversedException",
    "Proxy Config Script",
    "ProxyType",
)
#: ``dbus-send`` argv that makes running KIO programs re-read kioslaverc.
REPARSE_SIGNAL = (
    "dbus-send",
    "--type=signal",
    "/KIO/Scheduler",
    "org.kde.KIO.Scheduler.reparseSlaveConfiguration",
    "string:",
)

_KEY_LINE = re.compile(r"([^=\[]+?)\s*(?:\[[^\]]*\])*\s*=")


def config_file(environ: Mapping[str, str] = os.environ) -> Path:
    """Where KConfig keeps kioslaverc: ``$XDG_CONFIG_HOME`` or ``~/.config``."""
    base = environ.get("XDG_CONFIG_HOME", "")
    return (Path(base) if base and Path(base).is_absolute() else Path.home() / ".config") / FILE


def present_keys(text: str) -> set[str]:
    """Keys set in the ``[Proxy Settings]`` group of a kioslaverc file's text."""
    keys: set[str] = set()
    in_group = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            in_group = line == f"[{GROUP}]"
            continue
        if in_group and line and not line.startswith("#"):
            match = _KEY_LINE.match(line)
            if match:
                keys.add(match.group(1).strip())
    return keys


def no_proxy_for(rules: BypassRules) -> str:
    """The rules as KIO's comma-separated NoProxyFor list (KIO has no entry for plain names)."""
    entries = []
    for pattern in rules.patterns:
        if pattern.kind is PatternKind.LOCAL:
            continue
        entries.append(f"*.{pattern.name}" if pattern.kind is PatternKind.DOMAIN else pattern.short_text)
    return ",".join(dict.fromkeys(entries))


class KdeBackend:
    name = "kde"

    def __init__(
        self,
        version: int = 5,
        runner: Runner = run_tool,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.version = version
        self._run = runner
        self._file = config_file(environ)

    @property
    def write_tool(self) -> str:
        return f"kwriteconfig{self.version}"

    @property
    def read_tool(self) -> str:
        return f"kreadconfig{self.version}"

    def read(self) -> Parts:
        try:
            text = self._file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        except OSError as error:
            raise SystemProxyError(f"cannot read {self._file}: {error}") from None
        present = present_keys(text)
        values: dict[str, str | None] = {}
        for key in KEYS:
            if key in present:
                argv = [self.read_tool, "--file", FILE, "--group", GROUP, "--key", key]
                values[key] = self._run(argv).removesuffix("\n")
            else:
                values[key] = None
        return {PART: values}

    def render(self, request: ProxyRequest, current: Parts) -> Parts:
        values = dict(current.get(PART, {}))
        if request.mode is Mode.PAC:
            values["Proxy Config Script"] = request.pac_url
            values["ProxyType"] = PAC_PROXY
            return {PART: values}
        host = f"[{request.host}]" if ":" in request.host else request.host
        values["httpProxy"] = f"http://{host} {request.port}"
        values["httpsProxy"] = f"http://{host} {request.port}"
        values["socksProxy"] = f"socks://{host} {request.port}"
        values["NoProxyFor"] = no_proxy_for(request.bypass)
        values["ReversedException"] = "false"
        values["ProxyType"] = MANUAL_PROXY
        return {PART: values}

    def write(self, parts: Parts) -> None:
        values = parts.get(PART, {})
        for key in KEYS:
            if key not in values:
                continue
            argv = [self.write_tool, "--file", FILE, "--group", GROUP, "--key", key]
            value = values[key]
            self._run([*argv, "--delete", ""] if value is None else [*argv, "--", value])
        try:
            self._run(list(REPARSE_SIGNAL))
        except SystemProxyError:
            pass  # no session bus: programs started from now on read the file anyway
