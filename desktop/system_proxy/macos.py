"""macOS: ``networksetup`` for every enabled network service.

Each service (Wi-Fi, Ethernet, a VPN...) has its own web, secure web and SOCKS proxy, bypass
list and auto proxy URL; each service's values are saved and restored on their own, so a
service the user edited meanwhile is left as they set it while the others are restored.
"""

from __future__ import annotations

from typing import Any

from desktop.bypass import BypassRules, PatternKind
from desktop.system_proxy.base import Mode, Parts, ProxyRequest, Runner, run_tool

TOOL = "networksetup"
#: section -> (get flag, set flag, set-state flag) for the three host/port proxies.
PROXIES = {
    "web": ("-getwebproxy", "-setwebproxy", "-setwebproxystate"),
    "secureweb": ("-getsecurewebproxy", "-setsecurewebproxy", "-setsecurewebproxystate"),
    "socks": ("-getsocksfirewallproxy", "-setsocksfirewallproxy", "-setsocksfirewallproxystate"),
}
#: Write order: the proxies first, the switches that make them count last.
SECTIONS = ("bypass", "web", "secureweb", "socks", "autoproxy")


def parse_services(output: str) -> list[str]:
    """Enabled services from ``-listallnetworkservices`` (its first line explains the ``*``)."""
    services = []
    for line in output.splitlines()[1:]:
        name = line.strip()
        if name and not name.startswith("*"):
            services.append(name)
    return services


def _fields(output: str) -> dict[str, str]:
    fields = {}
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields


def parse_proxy(output: str) -> dict[str, Any]:
    """``Enabled: Yes / Server: 127.0.0.1 / Port: 8080 / ...`` -> {enabled, server, port}."""
    fields = _fields(output)
    port = fields.get("port", "0")
    return {
        "enabled": fields.get("enabled", "").lower() in ("yes", "1", "on"),
        "server": fields.get("server", ""),
        "port": int(port) if port.isdigit() else 0,
    }


def parse_autoproxy(output: str) -> dict[str, Any]:
    fields = _fields(output)
    url = fields.get("url", "")
    return {
        "url": "" if url == "(null)" else url,
        "enabled": fields.get("enabled", "").lower() in ("yes", "1"),
    }


def parse_bypass(output: str) -> list[str]:
    """``-getproxybypassdomains``: one domain a line, or a sentence saying there are none."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if len(lines) == 1 and " " in lines[0]:
        return []  # "There aren't any bypass domains set on Wi-Fi."
    return lines


def bypass_domains(rules: BypassRules) -> list[str]:
    """The rules as macOS exceptions (names, ``*.domain``, CIDRs); plain names cannot be said here."""
    domains: list[str] = []
    for pattern in rules.patterns:
        if pattern.kind is PatternKind.LOCAL:
            continue
        if pattern.kind is PatternKind.DOMAIN:
            domains += [pattern.name, f"*.{pattern.name}"]
        else:
            domains.append(pattern.short_text)
    return list(dict.fromkeys(domains))


class MacBackend:
    name = "macos"

    def __init__(self, runner: Runner = run_tool) -> None:
        self._run = runner

    def services(self) -> list[str]:
        return parse_services(self._run([TOOL, "-listallnetworkservices"]))

    def read(self) -> Parts:
        parts: Parts = {}
        for service in self.services():
            values: dict[str, Any] = {
                section: parse_proxy(self._run([TOOL, flags[0], service]))
                for section, flags in PROXIES.items()
            }
            values["bypass"] = parse_bypass(self._run([TOOL, "-getproxybypassdomains", service]))
            values["autoproxy"] = parse_autoproxy(self._run([TOOL, "-getautoproxyurl", service]))
            parts[service] = values
        return parts

    def render(self, request: ProxyRequest, current: Parts) -> Parts:
        rendered: Parts = {}
        for service, now in current.items():
            values = dict(now)
            if request.mode is Mode.PAC:
                values["autoproxy"] = {"url": request.pac_url, "enabled": True}
            else:
                ours = {"enabled": True, "server": request.host, "port": request.port}
                values.update({section: dict(ours) for section in PROXIES})
                values["bypass"] = bypass_domains(request.bypass)
                values["autoproxy"] = {**now.get("autoproxy", {"url": ""}), "enabled": False}
            rendered[service] = values
        return rendered

    def write(self, parts: Parts) -> None:
        for service, values in parts.items():
            for section in SECTIONS:
                if section in values:
                    self._write_section(service, section, values[section])

    def _write_section(self, service: str, section: str, value: Any) -> None:
        if section == "bypass":
            self._run([TOOL, "-setproxybypassdomains", service, *(value or ["Empty"])])
        elif section == "autoproxy":
            if value.get("url"):
                self._run([TOOL, "-setautoproxyurl", service, value["url"]])
            self._run([TOOL, "-setautoproxystate", service, "on" if value.get("enabled") else "off"])
        else:
            _get, set_flag, state_flag = PROXIES[section]
            if value.get("server"):
                # networksetup cannot store an empty server: one that was empty keeps ours, switched off.
                self._run([TOOL, set_flag, service, value["server"], str(value.get("port", 0))])
            self._run([TOOL, state_flag, service, "on" if value.get("enabled") else "off"])
