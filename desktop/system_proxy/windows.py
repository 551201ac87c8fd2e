"""Windows: the per-user WinINet settings in HKCU ``...\\Internet Settings``, through winreg.

After a write, ``InternetSetOptionW`` with SETTINGS_CHANGED and REFRESH makes running
programs (Edge, Chrome, anything on WinINet) re-read them. Each value is kept with its
registry type, and a value that did not exist is deleted again on restore.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from desktop.bypass import BypassRules, PatternKind
from desktop.system_proxy.base import Mode, Parts, ProxyRequest, SystemProxyError

PART = "Internet Settings"
KEY_PATH = r"Software\Microsoft\Windows\CurrentVersion\Internet Settings"
VALUES = ("ProxyServer", "ProxyOverride", "AutoConfigURL", "ProxyEnable")
#: InternetSetOptionW options: the settings changed, and running programs should reload them.
INTERNET_OPTION_SETTINGS_CHANGED = 39
INTERNET_OPTION_REFRESH = 37
#: A network wider than this many wildcard entries is left out of ProxyOverride.
MAX_WILDCARDS = 64
#: winreg type codes (winreg.REG_SZ, winreg.REG_DWORD), so render stays pure on any OS.
REG_SZ, REG_DWORD = 1, 4


def _ipv4_wildcards(network: ipaddress.IPv4Network) -> list[str] | None:
    """``network`` as ProxyOverride wildcards (``10.*``, ``172.16.*``...), None if too many."""
    octets = -(-network.prefixlen // 8)  # whole octets that must match
    count = 2 ** (octets * 8 - network.prefixlen)
    if count > MAX_WILDCARDS:
        return None
    if octets == 0:
        return ["*"]
    entries = []
    for subnet in network.subnets(new_prefix=octets * 8):
        fixed = str(subnet.network_address).split(".")[:octets]
        entries.append(".".join(fixed) if octets == 4 else ".".join([*fixed, "*"]))
    return entries


def proxy_override(rules: BypassRules) -> str:
    """The rules in ProxyOverride's ``;``-separated wildcard forms, ``<local>`` included.

    WinINet has no CIDR entries: IPv4 networks become octet wildcards, a single IPv6 address
    its bracketed form; a wider IPv6 network cannot be said (the agent still dials it directly).
    """
    entries: list[str] = []
    for pattern in rules.patterns:
        if pattern.kind is PatternKind.DOMAIN:
            entries += [pattern.name, f"*.{pattern.name}"]
        elif pattern.kind is PatternKind.NETWORK:
            network = pattern.network
            if isinstance(network, ipaddress.IPv4Network):
                entries += _ipv4_wildcards(network) or []
            elif network is not None and network.prefixlen == 128:
                entries.append(f"[{network.network_address}]")
        else:
            entries.append(pattern.text)
    return ";".join(dict.fromkeys(entries))


#: InternetSetOptionW(hInternet, dwOption, lpBuffer, dwBufferLength).
InternetSetOption = Callable[[Any, int, Any, int], Any]


def _wininet_set_option() -> InternetSetOption:
    import ctypes

    function: InternetSetOption = ctypes.windll.wininet.InternetSetOptionW  # type: ignore[attr-defined]
    return function


class WindowsBackend:
    name = "windows"

    def __init__(self, registry: Any = None, internet_set_option: InternetSetOption | None = None) -> None:
        if registry is None:
            import winreg

            registry = winreg
        self._reg: Any = registry
        self._set_option = internet_set_option

    def read(self) -> Parts:
        values: dict[str, list[Any] | None] = {}
        try:
            with self._reg.OpenKey(self._reg.HKEY_CURRENT_USER, KEY_PATH, 0, self._reg.KEY_READ) as key:
                for name in VALUES:
                    try:
                        value, kind = self._reg.QueryValueEx(key, name)
                    except FileNotFoundError:
                        values[name] = None
                    else:
                        values[name] = [value, kind]
        except FileNotFoundError:
            values = dict.fromkeys(VALUES)
        except OSError as error:
            raise SystemProxyError(f"cannot read HKCU\\{KEY_PATH}: {error}") from None
        return {PART: values}

    def render(self, request: ProxyRequest, current: Parts) -> Parts:
        values = dict(current.get(PART, {}))
        if request.mode is Mode.PAC:
            values["AutoConfigURL"] = [request.pac_url, REG_SZ]
            values["ProxyEnable"] = [0, REG_DWORD]
            return {PART: values}
        values["ProxyServer"] = [request.authority, REG_SZ]
        values["ProxyOverride"] = [proxy_override(request.bypass), REG_SZ]
        values["AutoConfigURL"] = None  # a PAC URL would win over the manual proxy
        values["ProxyEnable"] = [1, REG_DWORD]
        return {PART: values}

    def write(self, parts: Parts) -> None:
        values = parts.get(PART, {})
        access = self._reg.KEY_SET_VALUE | self._reg.KEY_QUERY_VALUE
        try:
            with self._reg.CreateKeyEx(self._reg.HKEY_CURRENT_USER, KEY_PATH, 0, access) as key:
                for name in VALUES:
                    if name not in values:
                        continue
                    if values[name] is None:
                        try:
                            self._reg.DeleteValue(key, name)
                        except FileNotFoundError:
                            pass
                    else:
                        value, kind = values[name]
                        self._reg.SetValueEx(key, name, 0, kind, value)
        except OSError as error:
            raise SystemProxyError(f"cannot write HKCU\\{KEY_PATH}: {error}") from None
        try:
            set_option = self._set_option or _wininet_set_option()
            for option in (INTERNET_OPTION_SETTINGS_CHANGED, INTERNET_OPTION_REFRESH):
                set_option(None, option, None, 0)
        except (OSError, AttributeError) as error:
            raise SystemProxyError(f"InternetSetOptionW failed: {error}") from None
