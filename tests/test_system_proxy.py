"""System proxy: the crash-safe manager, the controller follower, and the Windows and macOS
backends against fakes that record the exact registry writes and ``networksetup`` argv.

There is no Windows or Mac here, so those two backends talk to stand-ins that accept only
the documented call shapes (winreg's functions and value types; networksetup's flag forms)
and answer in the documented output formats. GSettings and KDE run for real in
``test_system_proxy_desktop.py``.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from tunnel_fixtures import Pki, agent_config, free_port

from desktop.autostart import XdgAutostart
from desktop.bypass import BypassRules
from desktop.config import load_agent_config
from desktop.controller import Controller, Snapshot, State
from desktop.first_run import set_setting, write_first_run_config
from desktop.lifecycle.static import StaticLifecycle
from desktop.system_proxy.base import Mode, ProxyRequest, SystemProxyError
from desktop.system_proxy.detect import (
    Detection,
    Unsupported,
    detect,
    manual_instructions,
    no_proxy_list,
    terminal_exports,
)
from desktop.system_proxy.follower import SystemProxyFollower, os_proxy_host
from desktop.system_proxy.gsettings import gvariant_string, gvariant_string_list, ignore_hosts
from desktop.system_proxy.kde import KdeBackend, no_proxy_for, present_keys
from desktop.system_proxy.macos import MacBackend, bypass_domains
from desktop.system_proxy.manager import OwnedElsewhere, PartOutcome, SystemProxyManager
from desktop.system_proxy.windows import (
    INTERNET_OPTION_REFRESH,
    INTERNET_OPTION_SETTINGS_CHANGED,
    KEY_PATH,
    WindowsBackend,
    proxy_override,
)
from desktop.tray import TrayApp

RULES = BypassRules.default()
MANUAL = ProxyRequest(Mode.MANUAL, "127.0.0.1", 8080, RULES)
PAC = ProxyRequest(Mode.PAC, "127.0.0.1", 8080, RULES)

# ----------------------------------------------------------------------------- a fake winreg


class FakeKey:
    def __enter__(self) -> FakeKey:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@dataclass
class FakeWinreg:
    """winreg's calls used by the backend, over one key; records every write in order."""

    values: dict[str, tuple[Any, int]] = field(default_factory=dict)
    writes: list[tuple[Any, ...]] = field(default_factory=list)
    HKEY_CURRENT_USER: int = 0x80000001
    KEY_READ: int = 0x20019
    KEY_SET_VALUE: int = 0x0002
    KEY_QUERY_VALUE: int = 0x0001
    REG_SZ: int = 1
    REG_DWORD: int = 4

    def OpenKey(self, root: int, path: str, reserved: int, access: int) -> FakeKey:  # noqa: N802 - winreg's name
        assert (root, path, reserved, access) == (self.HKEY_CURRENT_USER, KEY_PATH, 0, self.KEY_READ)
        return FakeKey()

    def CreateKeyEx(self, root: int, path: str, reserved: int, access: int) -> FakeKey:  # noqa: N802
        assert (root, path, reserved) == (self.HKEY_CURRENT_USER, KEY_PATH, 0)
        assert access & self.KEY_SET_VALUE
        return FakeKey()

    def QueryValueEx(self, key: FakeKey, name: str) -> tuple[Any, int]:  # noqa: N802
        if name not in self.values:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        return self.values[name]

    def SetValueEx(self, key: FakeKey, name: str, reserved: int, kind: int, value: Any) -> None:  # noqa: N802
        assert reserved == 0
        assert (kind, type(value)) in ((self.REG_SZ, str), (self.REG_DWORD, int)), (name, kind, value)
        self.writes.append(("SetValueEx", name, kind, value))
        self.values[name] = (value, kind)

    def DeleteValue(self, key: FakeKey, name: str) -> None:  # noqa: N802
        self.writes.append(("DeleteValue", name))
        if name not in self.values:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        del self.values[name]


@dataclass
class Options:
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def __call__(self, handle: Any, option: int, buffer: Any, length: int) -> int:
        self.calls.append((handle, option, buffer, length))
        return 1


USER_WINDOWS = {
    "ProxyEnable": (1, 4),
    "ProxyServer": ("corp-proxy:3128", 1),
    "ProxyOverride": ("*.corp.example;<local>", 1),
}


def windows(tmp_path: Path) -> tuple[FakeWinreg, Options, SystemProxyManager]:
    registry = FakeWinreg(dict(USER_WINDOWS))
    options = Options()
    manager = SystemProxyManager(WindowsBackend(registry, options), tmp_path / "system-proxy.json")
    return registry, options, manager


def test_windows_manual_writes_exactly_these_values_then_refreshes(tmp_path: Path) -> None:
    registry, options, manager = windows(tmp_path)
    assert manager.engage(MANUAL)
    override = registry.values["ProxyOverride"][0]
    # Only what differs; ProxyEnable was already 1 and there was no AutoConfigURL to remove.
    assert registry.writes == [
        ("SetValueEx", "ProxyServer", 1, "127.0.0.1:8080"),
        ("SetValueEx", "ProxyOverride", 1, override),
    ]
    assert options.calls == [
        (None, INTERNET_OPTION_SETTINGS_CHANGED, None, 0),
        (None, INTERNET_OPTION_REFRESH, None, 0),
    ]
    assert options.calls[0][1] == 39 and options.calls[1][1] == 37
    entries = override.split(";")
    assert "<local>" in entries and "localhost" in entries and "127.*" in entries and "10.*" in entries
    assert [f"172.{n}.*" for n in range(16, 32)] == [e for e in entries if e.startswith("172.")]
    assert "192.168.*" in entries and "169.254.*" in entries and "[::1]" in entries
    assert all(re.fullmatch(r"<local>|[a-z0-9*.-]+|\[[0-9a-f:]+\]", entry) for entry in entries)

    registry.writes.clear()
    report = manager.release()
    assert report is not None and report.outcomes == {"Internet Settings": PartOutcome.RESTORED}
    assert registry.values == USER_WINDOWS  # exactly as they were; AutoConfigURL still absent
    assert registry.writes == [
        ("SetValueEx", "ProxyServer", 1, "corp-proxy:3128"),
        ("SetValueEx", "ProxyOverride", 1, "*.corp.example;<local>"),
    ]
    assert not manager.state_path.exists()


def test_windows_pac_sets_the_url_and_restore_deletes_it_again(tmp_path: Path) -> None:
    registry, _options, manager = windows(tmp_path)
    manager.engage(PAC)
    assert registry.values["AutoConfigURL"] == ("http://127.0.0.1:8080/proxy.pac", 1)
    assert registry.values["ProxyEnable"] == (0, 4)
    manager.release()
    assert registry.writes[-2:] == [("DeleteValue", "AutoConfigURL"), ("SetValueEx", "ProxyEnable", 4, 1)]
    assert registry.values == USER_WINDOWS


def test_windows_user_change_is_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry, _options, manager = windows(tmp_path)
    manager.engage(MANUAL)
    registry.values["ProxyServer"] = ("other-proxy:8888", 1)  # the user, in Internet Options
    report = manager.release()
    assert report is not None and report.kept() == ["Internet Settings"]
    assert registry.values["ProxyServer"] == ("other-proxy:8888", 1)
    assert "was changed while Fluidity ran" in caplog.text
    assert "kept the changes you made meanwhile" in report.message()


def test_proxy_override_forms() -> None:
    rules = BypassRules.parse(["*.corp.example", ".lan", "10.1.2.0/23", "203.0.113.7", "fd00::/8", "<local>"])
    assert proxy_override(rules) == "*.corp.example;lan;*.lan;10.1.2.*;10.1.3.*;203.0.113.7;<local>"
    assert proxy_override(BypassRules.parse(["0.0.0.0/0"])) == "*"
    assert proxy_override(BypassRules.parse(["0.0.0.0/1"])) == ""  # over 64 wildcards: left out


# ----------------------------------------------------------------------------- a fake networksetup

SERVICE = r"[^\n]+"
ONOFF = r"(on|off)"
#: The documented argv forms (networksetup(8)); anything else is a bug.
FORMS = [
    r"-listallnetworkservices",
    rf"-get(web|secureweb|socksfirewall)proxy {SERVICE}",
    rf"-set(web|secureweb|socksfirewall)proxy {SERVICE} [^ ]+ [0-9]+",
    rf"-set(web|secureweb|socksfirewall)proxystate {SERVICE} {ONOFF}",
    rf"-getproxybypassdomains {SERVICE}",
    rf"-setproxybypassdomains {SERVICE}( [^ ]+)+",
    rf"-getautoproxyurl {SERVICE}",
    rf"-setautoproxyurl {SERVICE} https?://[^ ]+",
    rf"-setautoproxystate {SERVICE} {ONOFF}",
]


@dataclass
class FakeNetworksetup:
    """networksetup over a few services; answers in its documented output formats."""

    services: dict[str, dict[str, Any]]
    disabled: tuple[str, ...] = ("Thunderbolt Bridge",)
    argv: list[list[str]] = field(default_factory=list)

    def __call__(self, argv: Sequence[str]) -> str:
        argv = list(argv)
        assert argv[0] == "networksetup"
        flag, *rest = argv[1:]
        joined = " ".join(argv[1:])
        assert any(re.fullmatch(form, joined) for form in FORMS), f"undocumented form: {argv}"
        if flag.startswith("-set"):
            self.argv.append(argv)
        if flag == "-listallnetworkservices":
            names = [*self.services, *(f"*{name}" for name in self.disabled)]
            return "An asterisk (*) denotes that a network service is disabled.\n" + "\n".join(names) + "\n"
        service = self.services[rest[0]]
        kind = re.sub(r"^-(get|set)|proxy(state)?$", "", flag)
        if flag.startswith("-get") and kind in ("web", "secureweb", "socksfirewall"):
            proxy = service[kind]
            return (
                f"Enabled: {'Yes' if proxy['enabled'] else 'No'}\nServer: {proxy['server']}\n"
                f"Port: {proxy['port']}\nAuthenticated Proxy Enabled: 0\n"
            )
        if flag.endswith("proxystate") and kind in ("web", "secureweb", "socksfirewall"):
            service[kind]["enabled"] = rest[1] == "on"
        elif flag.startswith("-set") and kind in ("web", "secureweb", "socksfirewall"):
            service[kind].update(server=rest[1], port=int(rest[2]), enabled=True)  # setting turns it on
        elif flag == "-getproxybypassdomains":
            domains = service["bypass"]
            return (
                "\n".join(domains) + "\n"
                if domains
                else f"There aren't any bypass domains set on {rest[0]}.\n"
            )
        elif flag == "-setproxybypassdomains":
            service["bypass"] = [] if rest[1:] == ["Empty"] else rest[1:]
        elif flag == "-getautoproxyurl":
            auto = service["autoproxy"]
            return f"URL: {auto['url'] or '(null)'}\nEnabled: {'Yes' if auto['enabled'] else 'No'}\n"
        elif flag == "-setautoproxyurl":
            service["autoproxy"]["url"] = rest[1]
        elif flag == "-setautoproxystate":
            service["autoproxy"]["enabled"] = rest[1] == "on"
        return ""


def mac_service(
    server: str = "", port: int = 0, enabled: bool = False, bypass: list[str] | None = None
) -> dict[str, Any]:
    return {
        "web": {"enabled": enabled, "server": server, "port": port},
        "secureweb": {"enabled": enabled, "server": server, "port": port},
        "socksfirewall": {"enabled": False, "server": "", "port": 0},
        "bypass": list(bypass or []),
        "autoproxy": {"url": "", "enabled": False},
    }


def test_macos_every_enabled_service_is_set_and_each_restored(tmp_path: Path) -> None:
    fake = FakeNetworksetup(
        {
            "Wi-Fi": mac_service("corp-proxy", 3128, True, ["*.local", "169.254/16"]),
            "USB 10/100 LAN": mac_service(),
        }
    )
    before = json.loads(json.dumps(fake.services))
    manager = SystemProxyManager(MacBackend(fake), tmp_path / "system-proxy.json")
    manager.engage(MANUAL)
    for name, service in fake.services.items():
        for kind in ("web", "secureweb", "socksfirewall"):
            assert service[kind] == {"enabled": True, "server": "127.0.0.1", "port": 8080}, name
        assert "localhost" in service["bypass"] and "192.168.0.0/16" in service["bypass"]
        assert "<local>" not in service["bypass"]
    assert "Thunderbolt Bridge" not in " ".join(" ".join(argv) for argv in fake.argv)  # disabled: untouched
    wifi = [argv for argv in fake.argv if argv[2] == "Wi-Fi"]
    assert ["networksetup", "-setwebproxy", "Wi-Fi", "127.0.0.1", "8080"] in wifi
    assert ["networksetup", "-setsecurewebproxy", "Wi-Fi", "127.0.0.1", "8080"] in wifi
    assert ["networksetup", "-setsocksfirewallproxy", "Wi-Fi", "127.0.0.1", "8080"] in wifi
    assert ["networksetup", "-setsocksfirewallproxystate", "Wi-Fi", "on"] in wifi

    fake.services["USB 10/100 LAN"]["web"]["port"] = 9999  # the user edits one service meanwhile
    fake.argv.clear()
    report = manager.release()
    assert report is not None
    assert report.outcomes == {"Wi-Fi": PartOutcome.RESTORED, "USB 10/100 LAN": PartOutcome.KEPT_USER_CHANGE}
    restored = fake.services["Wi-Fi"]
    # An empty server cannot be written back: ours stays in the field, switched off.
    assert restored.pop("socksfirewall") == {"enabled": False, "server": "127.0.0.1", "port": 8080}
    before["Wi-Fi"].pop("socksfirewall")
    assert restored == before["Wi-Fi"]
    assert ["networksetup", "-setwebproxy", "Wi-Fi", "corp-proxy", "3128"] in fake.argv
    assert ["networksetup", "-setproxybypassdomains", "Wi-Fi", "*.local", "169.254/16"] in fake.argv
    assert fake.services["USB 10/100 LAN"]["web"]["port"] == 9999


def test_macos_pac_and_empty_bypass_restore(tmp_path: Path) -> None:
    fake = FakeNetworksetup({"Ethernet": mac_service()})
    manager = SystemProxyManager(MacBackend(fake), tmp_path / "system-proxy.json")
    manager.engage(PAC)
    assert fake.argv == [
        ["networksetup", "-setautoproxyurl", "Ethernet", "http://127.0.0.1:8080/proxy.pac"],
        ["networksetup", "-setautoproxystate", "Ethernet", "on"],
    ]
    manager.release()
    assert fake.services["Ethernet"]["autoproxy"]["enabled"] is False
    manager.engage(MANUAL)
    manager.release()
    assert ["networksetup", "-setproxybypassdomains", "Ethernet", "Empty"] in fake.argv
    web = fake.services["Ethernet"]["web"]
    assert web["enabled"] is False  # networksetup cannot store an empty server: ours stays, switched off
    assert bypass_domains(BypassRules.parse([".lan", "fd00::/8", "::1"])) == [
        "lan",
        "*.lan",
        "fd00::/8",
        "::1",
    ]


# ----------------------------------------------------------------------------- the manager


@dataclass
class MemoryBackend:
    """A backend over a dict, with one part per "store"; ``fail_writes`` makes writes fail."""

    name: str = "memory"
    store: dict[str, dict[str, Any]] = field(default_factory=lambda: {"main": {"mode": "none", "host": ""}})
    fail_writes: bool = False

    def read(self) -> dict[str, dict[str, Any]]:
        return json.loads(json.dumps(self.store))  # type: ignore[no-any-return]

    def render(self, request: ProxyRequest, current: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {"main": {**current["main"], "mode": request.mode.value, "host": request.authority}}

    def write(self, parts: dict[str, dict[str, Any]]) -> None:
        if self.fail_writes:
            raise SystemProxyError("the settings store is read-only")
        for part, values in parts.items():
            self.store[part].update(values)


def test_state_is_written_before_the_change_and_a_dead_owner_is_recovered(tmp_path: Path) -> None:
    backend = MemoryBackend()
    state_path = tmp_path / "system-proxy.json"
    crashed = SystemProxyManager(backend, state_path)
    crashed.engage(MANUAL)
    state = json.loads(state_path.read_text())
    assert state["previous"] == {"main": {"mode": "none", "host": ""}}
    assert state["applied"] == {"main": {"mode": "manual", "host": "127.0.0.1:8080"}}
    assert state["owner_pid"] > 0 and state["backend"] == "memory"
    assert state_path.stat().st_mode & 0o777 == 0o600

    second = SystemProxyManager(backend, state_path)
    assert second.recover() is None  # the owner is alive (holds the lock): leave it alone
    with pytest.raises(OwnedElsewhere):
        second.engage(MANUAL)

    crashed._lock.release()  # what the OS does when the owner dies
    report = second.recover()
    assert report is not None and report.crashed_owner == state["owner_pid"]
    assert backend.store == {"main": {"mode": "none", "host": ""}}
    assert not state_path.exists()
    assert "did not exit cleanly" in report.message()
    assert second.recover() is None  # once


def test_a_failed_write_is_undone_and_the_error_raised(tmp_path: Path) -> None:
    backend = MemoryBackend()
    manager = SystemProxyManager(backend, tmp_path / "system-proxy.json")
    backend.fail_writes = True
    with pytest.raises(SystemProxyError, match="read-only"):
        manager.engage(MANUAL)
    assert not manager.engaged and backend.store["main"]["mode"] == "none"
    backend.fail_writes = False
    assert manager.engage(MANUAL) and manager.engaged  # the lock was released: a retry works


def test_a_failed_restore_keeps_the_state_for_the_next_start(tmp_path: Path) -> None:
    backend = MemoryBackend()
    manager = SystemProxyManager(backend, tmp_path / "system-proxy.json")
    manager.engage(MANUAL)
    backend.fail_writes = True
    report = manager.release()
    assert report is not None and not report.ok and report.outcomes["main"] is PartOutcome.FAILED
    assert manager.state_path.exists()
    backend.fail_writes = False
    report = SystemProxyManager(backend, manager.state_path).recover()
    assert report is not None and report.ok and backend.store["main"]["mode"] == "none"


def test_a_new_port_updates_without_losing_the_saved_settings(tmp_path: Path) -> None:
    backend = MemoryBackend()
    manager = SystemProxyManager(backend, tmp_path / "system-proxy.json")
    manager.engage(MANUAL)
    assert not manager.engage(MANUAL)  # the same request: nothing to do
    assert manager.engage(ProxyRequest(Mode.MANUAL, "127.0.0.1", 9090, RULES))
    assert backend.store["main"]["host"] == "127.0.0.1:9090"
    manager.release()
    assert backend.store == {"main": {"mode": "none", "host": ""}}


# ----------------------------------------------------------------------------- the follower


def follower_for(backend: MemoryBackend, tmp_path: Path, mode: Mode = Mode.MANUAL) -> SystemProxyFollower:
    notices: list[tuple[str, bool]] = []
    follower = SystemProxyFollower(
        Detection(backend),
        tmp_path / "system-proxy.json",
        mode=mode,
        bypass=RULES,
        notify=lambda m, e: notices.append((m, e)),
    )
    follower.notices_seen = notices  # type: ignore[attr-defined]
    return follower


def snap(state: State, port: int = 8080) -> Snapshot:
    return Snapshot(state=state, proxy_address=("127.0.0.1", port))


def test_the_follower_sets_while_busy_and_restores_on_every_way_out(tmp_path: Path) -> None:
    backend = MemoryBackend()
    follower = follower_for(backend, tmp_path)
    try:
        for state in (State.WAKING, State.CONNECTING, State.CONNECTED):
            follower.on_snapshot(snap(state))
            assert follower.settled(10) and backend.store["main"]["mode"] == "manual", state
        follower.on_snapshot(snap(State.ERROR))
        assert follower.settled(10) and backend.store["main"]["mode"] == "none"
        follower.on_snapshot(snap(State.CONNECTED))
        assert follower.settled(10) and backend.store["main"]["mode"] == "manual"
        follower.set_enabled(False)  # the checkbox, while connected
        assert follower.settled(10) and backend.store["main"]["mode"] == "none"
        follower.set_enabled(True)
        assert follower.settled(10) and backend.store["main"]["mode"] == "manual"
        follower.on_snapshot(snap(State.DISCONNECTED))
        assert follower.settled(10) and backend.store["main"]["mode"] == "none"
        follower.on_snapshot(snap(State.CONNECTED, port=0))  # port not known yet: wait for it
        assert follower.settled(10) and backend.store["main"]["mode"] == "none"
        follower.on_snapshot(snap(State.CONNECTED))
        assert follower.settled(10) and backend.store["main"]["mode"] == "manual"
    finally:
        follower.close()  # Quit, SIGTERM, an exception: restores synchronously
    assert backend.store["main"]["mode"] == "none"
    assert not (tmp_path / "system-proxy.json").exists()


def test_the_follower_recovers_at_start_and_offers_the_notice(tmp_path: Path) -> None:
    backend = MemoryBackend()
    crashed = SystemProxyManager(backend, tmp_path / "system-proxy.json")
    crashed.engage(MANUAL)
    crashed._lock.release()  # the process died
    follower = follower_for(backend, tmp_path)
    try:
        assert backend.store["main"]["mode"] == "none"  # restored before following anything
        notices = follower.take_notices()
        assert len(notices) == 1 and "did not exit cleanly" in notices[0]
        assert follower.take_notices() == []
    finally:
        follower.close()


def test_unsupported_desktops_get_one_message_naming_what_to_set(tmp_path: Path) -> None:
    notices: list[tuple[str, bool]] = []
    follower = SystemProxyFollower(
        Detection(None, Unsupported.NO_DESKTOP, "XDG_CURRENT_DESKTOP is not set"),
        tmp_path / "system-proxy.json",
        mode=Mode.MANUAL,
        bypass=RULES,
        notify=lambda message, error: notices.append((message, error)),
    )
    try:
        for state in (State.CONNECTED, State.DISCONNECTED, State.CONNECTED):
            follower.on_snapshot(snap(state))
            assert follower.settled(10)
    finally:
        follower.close()
    assert len(notices) == 1
    message = notices[0][0]
    assert (
        "set it by hand" in message.lower()
        and "127.0.0.1:8080" in message
        and "Copy proxy settings" in message
    )


def test_terminal_exports_and_no_proxy() -> None:
    rules = BypassRules.parse(["localhost", "*.corp.example", ".lan", "10.0.0.0/8", "<local>"])
    assert no_proxy_list(rules) == "localhost,.corp.example,.lan,10.0.0.0/8"
    assert terminal_exports("127.0.0.1", 8080, rules, platform="linux") == (
        "export http_proxy=http://127.0.0.1:8080 https_proxy=http://127.0.0.1:8080 "
        "all_proxy=socks5h://127.0.0.1:8080 no_proxy=localhost,.corp.example,.lan,10.0.0.0/8"
    )
    assert terminal_exports("::1", 8080, rules, platform="win32").startswith(
        '$env:http_proxy = "http://[::1]:8080"'
    )
    assert os_proxy_host("0.0.0.0") == "127.0.0.1" and os_proxy_host("::") == "::1"
    assert os_proxy_host("127.0.0.1") == "127.0.0.1"
    text = manual_instructions(
        "127.0.0.1", 8080, rules, Detection(None, Unsupported.UNKNOWN_DESKTOP, "desktop 'sway'")
    )
    assert "'sway'" in text and "SOCKS5 127.0.0.1:8080" in text


def test_detection_by_desktop() -> None:
    def which(_name: str) -> str | None:
        return "/usr/bin/tool"

    assert detect({}, "linux", which).unsupported is Unsupported.NO_DESKTOP
    assert detect({"XDG_CURRENT_DESKTOP": "sway"}, "linux", which).unsupported is Unsupported.UNKNOWN_DESKTOP
    kde = detect({"XDG_CURRENT_DESKTOP": "KDE", "KDE_SESSION_VERSION": "6"}, "linux", which).backend
    assert isinstance(kde, KdeBackend) and kde.version == 6
    missing = detect({"XDG_CURRENT_DESKTOP": "KDE"}, "linux", lambda _name: None)
    assert missing.unsupported is Unsupported.TOOL_MISSING
    assert detect({"XDG_CURRENT_DESKTOP": "ubuntu:GNOME"}, "linux", lambda _name: None).unsupported is (
        Unsupported.TOOL_MISSING
    )
    mac = detect({}, "darwin", which).backend
    assert mac is not None and mac.name == "macos"


def test_gsettings_and_kde_renderings() -> None:
    assert gvariant_string("127.0.0.1") == "'127.0.0.1'"
    assert gvariant_string("it's") == '"it\'s"'
    assert gvariant_string_list([]) == "@as []"
    assert ignore_hosts(BypassRules.parse(["localhost", ".lan", "::1/128", "10.0.0.0/8", "<local>"])) == [
        "localhost",
        "*.lan",
        "::1",
        "10.0.0.0/8",
    ]
    assert no_proxy_for(BypassRules.parse(["localhost", ".lan", "*.corp.example", "<local>"])) == (
        "localhost,*.lan,*.corp.example"
    )
    text = (
        "[General]\nProxyType=9\n[Proxy Settings]\nProxyType=1\nhttpProxy[$e]=x\n# c\n[Other]\nNoProxyFor=a\n"
    )
    assert present_keys(text) == {"ProxyType", "httpProxy"}


# ----------------------------------------------------------------------------- settings


def test_settings_keys_and_the_checkbox_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    write_first_run_config(config)
    assert load_agent_config(config, env={}).effective_system_proxy("manual") == "manual"
    assert load_agent_config(config, env={}).effective_system_proxy("off") == "off"
    set_setting(config, "system_proxy", "off")
    set_setting(config, "system_proxy", "pac")
    text = config.read_text()
    assert text.count("\nsystem_proxy: pac\n") == 1 and "# system_proxy: manual" in text
    loaded = load_agent_config(config, env={"FLUIDITY_BYPASS": "<local>,*.corp.example"})
    assert loaded.system_proxy == "pac" and loaded.bypass == ["<local>", "*.corp.example"]
    assert loaded.pac_fallback_direct is False
    assert load_agent_config(config, env={"FLUIDITY_BYPASS": ""}).bypass == []


def test_a_crash_in_the_middle_of_writing_is_still_restored(tmp_path: Path) -> None:
    backend = MemoryBackend()
    crashed = SystemProxyManager(backend, tmp_path / "system-proxy.json")
    crashed.engage(MANUAL)
    backend.store["main"]["host"] = ""  # killed after writing "mode" but before "host"
    crashed._lock.release()
    report = SystemProxyManager(backend, crashed.state_path).recover()
    assert report is not None and report.outcomes == {"main": PartOutcome.RESTORED}
    assert backend.store == {"main": {"mode": "none", "host": ""}}


# ----------------------------------------------------------------------------- the tray


@pytest.fixture
def pystray_dummy(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """pystray with its dummy backend, chosen at import time."""
    monkeypatch.setenv("PYSTRAY_BACKEND", "dummy")
    module = (
        importlib.reload(sys.modules["pystray"])
        if "pystray" in sys.modules
        else importlib.import_module("pystray")
    )
    assert module.Icon.__module__ == "pystray._base"
    return module


def test_tray_checkbox_copy_settings_and_quit(pystray_dummy: ModuleType, pki: Pki, tmp_path: Path) -> None:
    config = agent_config(
        pki, free_port(), listen_port=free_port(), connection_timeout=60.0, connect_timeout=1.0
    )
    controller = Controller(config, StaticLifecycle(config), monitor_interval=0.1)
    backend = MemoryBackend()
    follower = SystemProxyFollower(
        Detection(backend), tmp_path / "system-proxy.json", mode=Mode.MANUAL, bypass=config.bypass_rules()
    )
    controller.subscribe(follower.on_snapshot)
    copied: list[str] = []
    app = TrayApp(
        controller,
        pystray_dummy,
        config_path=tmp_path / "agent.yaml",
        log_path=tmp_path / "fluidity.log",
        autostart=XdgAutostart(config_home=tmp_path / "xdg"),
        autostart_command=["fluidity"],
        copier=lambda text: copied.append(text) or True,
        system_proxy=follower,
    )

    def item(text: str) -> Any:
        return next(entry for entry in app.icon.menu.items if str(entry.text) == text)

    try:
        checkbox = item("Use as system proxy")
        assert checkbox.visible and checkbox.checked
        controller.connect()  # nobody listens on the server port: the session stays busy
        assert follower.settled(10)
        deadline = time.monotonic() + 20
        while backend.store["main"]["mode"] != "manual":
            assert time.monotonic() < deadline, "the system proxy was never set"
            time.sleep(0.05)
            follower.settled(10)
        assert backend.store["main"]["host"] == f"127.0.0.1:{config.listen_port}"

        checkbox(app.icon)  # off: restored at once, and saved
        assert app.wait_for_background_work(10) and follower.settled(10)
        assert not checkbox.checked and backend.store["main"]["mode"] == "none"
        assert "\nsystem_proxy: off\n" in (tmp_path / "agent.yaml").read_text()
        checkbox(app.icon)
        assert app.wait_for_background_work(10) and follower.settled(10)
        assert backend.store["main"]["mode"] == "manual"
        assert "\nsystem_proxy: manual\n" in (tmp_path / "agent.yaml").read_text()

        item("Copy proxy settings")(app.icon)
        assert app.wait_for_background_work(10)
        assert copied == [
            f"export http_proxy=http://127.0.0.1:{config.listen_port} "
            f"https_proxy=http://127.0.0.1:{config.listen_port} "
            f"all_proxy=socks5h://127.0.0.1:{config.listen_port} "
            f"no_proxy={no_proxy_list(config.bypass_rules())}"
        ]
    finally:
        controller.shutdown(30)  # what Quit and the signal handlers run, then:
        follower.close()
    assert backend.store == {"main": {"mode": "none", "host": ""}}
