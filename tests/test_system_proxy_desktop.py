"""The GSettings and KDE backends for real: dconf on a private D-Bus session, kwriteconfig5.

Each test gets a throwaway XDG config home and its own session bus (``dbus-daemon``), so
dconf-service writes there and nothing touches the settings of whoever runs the tests.
Values are read back with ``gsettings get`` / ``gsettings list-recursively`` and by reading
kioslaverc. The crash test SIGKILLs a real ``fluidity-agent`` that set the proxy and checks
that the next start puts everything back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from tunnel_fixtures import REPO, Pki, free_port

from desktop.bypass import BypassRules
from desktop.desktop_shell import run_tool
from desktop.system_proxy.base import Mode, ProxyRequest, Runner, tool_runner
from desktop.system_proxy.gsettings import GSettingsBackend
from desktop.system_proxy.kde import KdeBackend
from desktop.system_proxy.manager import PartOutcome, SystemProxyManager

if not sys.platform.startswith("linux"):
    pytest.skip("GSettings and KDE run on Linux", allow_module_level=True)

RULES = BypassRules.parse(["localhost", "127.0.0.0/8", "::1", "*.corp.example", ".lan", "<local>"])
WAIT = 30.0

#: The user's own settings before Fluidity starts: everything differs from the defaults.
USER_GSETTINGS = [
    ("org.gnome.system.proxy", "mode", "'manual'"),
    ("org.gnome.system.proxy", "ignore-hosts", "['localhost', 'intranet.example']"),
    ("org.gnome.system.proxy", "autoconfig-url", "'http://wpad.example/wpad.dat'"),
    ("org.gnome.system.proxy.http", "host", "'corp-proxy.example'"),
    ("org.gnome.system.proxy.http", "port", "3128"),
    ("org.gnome.system.proxy.https", "host", "'corp-proxy.example'"),
    ("org.gnome.system.proxy.https", "port", "3129"),
]


@dataclass
class Session:
    """A private session bus with dconf behind it, and the environment to reach both."""

    env: dict[str, str]
    root: Path

    def run(self, *argv: str) -> str:
        return run_tool(argv, env=self.env, timeout=20)

    def get(self, schema: str, key: str) -> str:
        return self.run("gsettings", "get", schema, key).strip()

    def all(self) -> str:
        """Every key of the proxy schemas, as ``gsettings list-recursively`` prints them."""
        return self.run("gsettings", "list-recursively", "org.gnome.system.proxy")

    @property
    def runner(self) -> Runner:
        return tool_runner(self.env)


def _missing(tools: Sequence[str]) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    missing = _missing(["dbus-daemon", "gsettings"])
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: run .ci/install-display-deps.sh")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FLUIDITY_", "XDG_", "DBUS_", "GSETTINGS_", "KDE_")) and key != "DISPLAY"
    }
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        XDG_RUNTIME_DIR=str(runtime),
    )
    bus = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert bus.stdout is not None
        address = bus.stdout.readline().decode().strip()
        assert address, "dbus-daemon did not start"
        env["DBUS_SESSION_BUS_ADDRESS"] = address
        live = Session(env, tmp_path)
        try:
            live.run("gsettings", "list-keys", "org.gnome.system.proxy")
            live.run("gsettings", "set", "org.gnome.system.proxy.socks", "port", "1")
            persisted = live.get("org.gnome.system.proxy.socks", "port") == "1"
            live.run("gsettings", "reset", "org.gnome.system.proxy.socks", "port")
        except Exception as error:
            pytest.skip(f"GSettings with dconf is not usable here ({error}): run .ci/install-display-deps.sh")
        if not persisted:
            pytest.skip(
                "gsettings has no dconf backend (dconf-gsettings-backend): run .ci/install-display-deps.sh"
            )
        yield live
    finally:
        os.killpg(bus.pid, signal.SIGTERM)
        bus.wait(10)


def set_user_settings(session: Session) -> str:
    for schema, key, value in USER_GSETTINGS:
        session.run("gsettings", "set", schema, key, value)
    return session.all()


def manual_request(port: int = 8080) -> ProxyRequest:
    return ProxyRequest(Mode.MANUAL, "127.0.0.1", port, RULES)


# ----------------------------------------------------------------------------- GSettings


def test_gsettings_manual_then_restore_exactly(session: Session) -> None:
    before = set_user_settings(session)
    manager = SystemProxyManager(
        GSettingsBackend(session.runner), session.root / "state" / "system-proxy.json"
    )
    manager.engage(manual_request())
    assert session.get("org.gnome.system.proxy", "mode") == "'manual'"
    for schema in ("http", "https", "socks"):
        assert session.get(f"org.gnome.system.proxy.{schema}", "host") == "'127.0.0.1'"
        assert session.get(f"org.gnome.system.proxy.{schema}", "port") == "8080"
    assert session.get("org.gnome.system.proxy", "ignore-hosts") == (
        "['localhost', '127.0.0.0/8', '::1', '*.corp.example', '*.lan']"
    )
    report = manager.release()
    assert report is not None and report.outcomes == {"org.gnome.system.proxy": PartOutcome.RESTORED}
    assert session.all() == before  # mode, hosts, ports, ignore list and PAC URL, exactly


def test_gsettings_pac_mode_points_at_the_agents_pac_file(session: Session) -> None:
    before = set_user_settings(session)
    manager = SystemProxyManager(
        GSettingsBackend(session.runner), session.root / "state" / "system-proxy.json"
    )
    manager.engage(ProxyRequest(Mode.PAC, "127.0.0.1", 8080, RULES))
    assert session.get("org.gnome.system.proxy", "mode") == "'auto'"
    assert session.get("org.gnome.system.proxy", "autoconfig-url") == "'http://127.0.0.1:8080/proxy.pac'"
    manager.release()
    assert session.all() == before


def test_gsettings_a_change_by_the_user_is_not_clobbered(
    session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    set_user_settings(session)
    manager = SystemProxyManager(
        GSettingsBackend(session.runner), session.root / "state" / "system-proxy.json"
    )
    manager.engage(manual_request())
    session.run("gsettings", "set", "org.gnome.system.proxy", "mode", "none")  # the user, in Settings
    report = manager.release()
    assert report is not None and report.kept() == ["org.gnome.system.proxy"]
    assert session.get("org.gnome.system.proxy", "mode") == "'none'"
    assert session.get("org.gnome.system.proxy.http", "host") == "'127.0.0.1'"  # left as it was
    assert "was changed while Fluidity ran; leaving it as it is" in caplog.text


def _agent(session: Session, config: Path, *flags: str) -> subprocess.Popen[str]:
    env = {**session.env, "XDG_CURRENT_DESKTOP": "ubuntu:GNOME"}
    return subprocess.Popen(
        [sys.executable, "-m", "desktop.agent_cli", "--config", str(config), *flags],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def owner(state_file: Path) -> int | None:
    """The pid in the state file (None while there is none)."""
    try:
        return int(json.loads(state_file.read_text())["owner_pid"])
    except (OSError, ValueError, KeyError):
        return None


def _wait_for(predicate: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_sigkilled_agent_is_cleaned_up_by_the_next_start(session: Session, pki: Pki) -> None:
    before = set_user_settings(session)
    proxy_port = free_port()
    config = session.root / "agent.yaml"
    config.write_text(
        "lifecycle: static\n"
        "server_address: 127.0.0.1\n"
        f"server_port: {free_port()}\n"  # nobody listens: the agent keeps connecting, so stays busy
        f"listen_port: {proxy_port}\n"
        f"ca_file: {pki.path('ca.crt')}\n"
        f"cert_file: {pki.path('client.crt')}\n"
        f"key_file: {pki.path('client.key')}\n"
        'connection_timeout: "120s"\n'
        'connect_timeout: "1s"\n'
        "system_proxy: manual\n"
    )
    state_file = session.root / "state" / "fluidity" / "system-proxy.json"

    def ours() -> bool:
        return session.get("org.gnome.system.proxy.http", "port") == str(proxy_port)

    first = _agent(session, config)
    try:
        _wait_for(ours, "the first agent to set the system proxy")
        assert state_file.is_file()
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    assert ours() and session.get("org.gnome.system.proxy", "mode") == "'manual'"  # left behind

    second = _agent(session, config)
    try:
        _wait_for(
            lambda: owner(state_file) == second.pid and ours(), "the second agent to restore, then set it"
        )
        second.send_signal(signal.SIGTERM)
        _stdout, stderr = second.communicate(timeout=WAIT)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(10)
    said = [
        line for line in stderr.splitlines() if "did not exit cleanly: restored your proxy settings" in line
    ]
    assert len(said) == 2, stderr  # once in the log, once on the terminal
    assert sum(line.startswith("{") for line in said) == 1
    assert session.all() == before  # SIGTERM restored exactly what the user had
    assert not state_file.exists()


def test_fluidity_agent_with_system_proxy_off_still_recovers(session: Session, pki: Pki) -> None:
    before = set_user_settings(session)
    state_path = session.root / "state" / "fluidity" / "system-proxy.json"
    crashed = SystemProxyManager(GSettingsBackend(session.runner), state_path)
    crashed.engage(manual_request(free_port()))
    crashed._lock.release()  # as if it had died
    config = session.root / "agent.yaml"
    config.write_text(
        f"lifecycle: static\nserver_address: 127.0.0.1\nserver_port: {free_port()}\n"
        f"listen_port: {free_port()}\nca_file: {pki.path('ca.crt')}\ncert_file: {pki.path('client.crt')}\n"
        f"key_file: {pki.path('client.key')}\nconnect_timeout: 1s\nconnection_timeout: 2s\n"
    )
    agent = _agent(session, config)
    try:
        _stdout, stderr = agent.communicate(timeout=WAIT)  # gives up after connection_timeout
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    assert "did not exit cleanly" in stderr
    assert session.all() == before and not state_path.exists()


# ----------------------------------------------------------------------------- KDE


def kde_env(tmp_path: Path) -> dict[str, str]:
    missing = _missing(["kwriteconfig5", "kreadconfig5"])
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (libkf5config-bin): run .ci/install-display-deps.sh")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("XDG_", "KDE_"))}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    (tmp_path / "config").mkdir(exist_ok=True)
    return env


def test_kde_kioslaverc_written_and_restored(tmp_path: Path) -> None:
    env = kde_env(tmp_path)

    runner = tool_runner(env)
    kioslaverc = tmp_path / "config" / "kioslaverc"
    for key, value in {
        "ProxyType": "1",
        "httpProxy": "http://corp-proxy 3128",
        "NoProxyFor": "intranet",
    }.items():
        runner(["kwriteconfig5", "--file", "kioslaverc", "--group", "Proxy Settings", "--key", key, value])
    runner(["kwriteconfig5", "--file", "kioslaverc", "--group", "Cache", "--key", "MaxCacheSize", "5120"])
    before = kioslaverc.read_bytes()

    manager = SystemProxyManager(KdeBackend(5, runner, env), tmp_path / "system-proxy.json")
    manager.engage(manual_request())
    text = kioslaverc.read_text()
    assert "httpProxy=http://127.0.0.1 8080" in text
    assert "httpsProxy=http://127.0.0.1 8080" in text
    assert "socksProxy=socks://127.0.0.1 8080" in text
    assert "NoProxyFor=localhost,127.0.0.0/8,::1,*.corp.example,*.lan" in text
    assert "ProxyType=1" in text and "MaxCacheSize=5120" in text

    manager.engage(ProxyRequest(Mode.PAC, "127.0.0.1", 8080, RULES))
    text = kioslaverc.read_text()
    assert "ProxyType=2" in text and "Proxy Config Script=http://127.0.0.1:8080/proxy.pac" in text

    report = manager.release()
    assert report is not None and report.outcomes == {"kioslaverc": PartOutcome.RESTORED}
    assert kioslaverc.read_bytes() == before  # keys that were absent are deleted again


def test_kde_tells_running_programs_to_reparse(session: Session, tmp_path: Path) -> None:
    env = {**kde_env(tmp_path), "DBUS_SESSION_BUS_ADDRESS": session.env["DBUS_SESSION_BUS_ADDRESS"]}
    if _missing(["dbus-monitor", "dbus-send"]):
        pytest.skip("needs dbus-monitor and dbus-send (dbus-bin)")
    monitor = subprocess.Popen(
        ["dbus-monitor", "--session", "type='signal',interface='org.kde.KIO.Scheduler'"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        time.sleep(0.5)  # let the monitor register its match rule
        manager = SystemProxyManager(KdeBackend(5, tool_runner(env), env), tmp_path / "system-proxy.json")
        manager.engage(manual_request())
        manager.release()
        time.sleep(0.5)
    finally:
        monitor.terminate()
        output, _ = monitor.communicate(timeout=10)
    assert output.count("member=reparseSlaveConfiguration") >= 2, output


def test_the_doctor_reads_the_system_proxy_the_tray_set(
    session: Session, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fluidity doctor`'s local.system_proxy line reads the real GSettings values."""
    from desktop.config import AgentConfig
    from desktop.doctor.local_checks import check_system_proxy
    from desktop.doctor.model import Status
    from server.config_loader import load

    for key, value in {**session.env, "XDG_CURRENT_DESKTOP": "ubuntu:GNOME"}.items():
        monkeypatch.setenv(key, value)
    config = load(
        AgentConfig,
        None,
        env={},
        overrides={
            "lifecycle": "local",
            "listen_port": 8080,
            "bypass": list(RULES.texts),
            "ca_file": pki.path("ca.crt"),
            "cert_file": pki.path("client.crt"),
            "key_file": pki.path("client.key"),
        },
    )
    set_user_settings(session)
    assert check_system_proxy(config).status is Status.INFO  # the user's own proxy: not Fluidity's
    manager = SystemProxyManager(
        GSettingsBackend(session.runner), session.root / "state" / "system-proxy.json"
    )
    manager.engage(manual_request())
    result = check_system_proxy(config)
    assert result.status is Status.PASS and "127.0.0.1:8080" in result.finding
    manager.release()
    assert check_system_proxy(config).status is Status.INFO
