"""GNOME, Cinnamon, MATE, Unity, XFCE, Budgie: ``org.gnome.system.proxy`` through ``gsettings``.

Values are kept as the GVariant text ``gsettings get`` prints and ``gsettings set`` reads,
so whatever was there (a string, a port, a list) goes back byte for byte. ``render`` writes
the same text form ``gsettings get`` prints, so what Fluidity set compares equal to what it
reads back later.
"""

from __future__ import annotations

from desktop.bypass import BypassRules, PatternKind
from desktop.system_proxy.base import Mode, Parts, ProxyRequest, Runner, run_tool

PART = "org.gnome.system.proxy"
SCHEMA = "org.gnome.system.proxy"
#: (schema, key) pairs Fluidity may change; "mode" is written last so apps never see a half-set proxy.
KEYS: tuple[tuple[str, str], ...] = (
    (SCHEMA, "autoconfig-url"),
    (SCHEMA, "ignore-hosts"),
    (f"{SCHEMA}.http", "host"),
    (f"{SCHEMA}.http", "port"),
    (f"{SCHEMA}.https", "host"),
    (f"{SCHEMA}.https", "port"),
    (f"{SCHEMA}.socks", "host"),
    (f"{SCHEMA}.socks", "port"),
    (SCHEMA, "mode"),
)


def _name(schema: str, key: str) -> str:
    return f"{schema} {key}"


def gvariant_string(text: str) -> str:
    """``text`` as GVariant text, quoted the way ``gsettings get`` prints it."""
    escaped = text.replace("\\", "\\\\")
    if "'" in text and '"' not in text:
        return f'"{escaped}"'
    return "'" + escaped.replace("'", "\\'") + "'"


def gvariant_string_list(items: list[str]) -> str:
    if not items:
        return "@as []"
    return "[" + ", ".join(gvariant_string(item) for item in items) + "]"


def ignore_hosts(rules: BypassRules) -> list[str]:
    """The rules in GLib's ignore-hosts forms (names, ``*.domain``, addresses and networks).

    GLib has no "plain names" entry, so ``<local>`` cannot be said here (the agent still
    dials those directly); and GLib matches a name's subdomains too.
    """
    hosts: list[str] = []
    for pattern in rules.patterns:
        if pattern.kind is PatternKind.LOCAL:
            continue
        if pattern.kind is PatternKind.DOMAIN:
            hosts.append(f"*.{pattern.name}")
        else:
            hosts.append(pattern.short_text)
    return list(dict.fromkeys(hosts))


class GSettingsBackend:
    name = "gsettings"

    def __init__(self, runner: Runner = run_tool, tool: str = "gsettings") -> None:
        self._run = runner
        self._tool = tool

    def available(self) -> bool:
        """The proxy schema is installed (``gsettings`` runs and knows it)."""
        try:
            self._run([self._tool, "list-keys", SCHEMA])
        except Exception:
            return False
        return True

    def read(self) -> Parts:
        values = {
            _name(schema, key): self._run([self._tool, "get", schema, key]).strip() for schema, key in KEYS
        }
        return {PART: values}

    def render(self, request: ProxyRequest, current: Parts) -> Parts:
        values = dict(current.get(PART, {}))
        if request.mode is Mode.PAC:
            values[_name(SCHEMA, "autoconfig-url")] = gvariant_string(request.pac_url)
            values[_name(SCHEMA, "mode")] = "'auto'"
            return {PART: values}
        host, port = gvariant_string(request.host), str(request.port)
        for schema in (f"{SCHEMA}.http", f"{SCHEMA}.https", f"{SCHEMA}.socks"):
            values[_name(schema, "host")] = host
            values[_name(schema, "port")] = port
        values[_name(SCHEMA, "ignore-hosts")] = gvariant_string_list(ignore_hosts(request.bypass))
        values[_name(SCHEMA, "mode")] = "'manual'"
        return {PART: values}

    def write(self, parts: Parts) -> None:
        values = parts.get(PART, {})
        for schema, key in KEYS:
            name = _name(schema, key)
            if name in values:
                self._run([self._tool, "set", schema, key, values[name]])
