"""Every tray menu action, with the real local backend, agent and certificates; no display.

pystray's ``dummy`` backend builds the real Icon and Menu; menu items are called directly,
as the tray's event loop would. The desktop itself (opening files, the clipboard, a file
chooser) is replaced by recorders, since there is no user here to look at it.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image, ImageChops
from proxy_fixtures import OriginServer
from tray_fixtures import fetch_through_proxy, wait_for_state, wait_until_stopped
from tunnel_fixtures import REPO, Pki, agent_config, free_port

from desktop import certificates
from desktop.autostart import XdgAutostart
from desktop.config import load_agent_config
from desktop.controller import Controller, Snapshot, State
from desktop.desktop_shell import copy_text, open_path
from desktop.icons import SIZES, TRAY_STATES, render_tray_icon, tray_asset_name, tray_icon
from desktop.lifecycle.base import Endpoint
from desktop.lifecycle.local import LocalLifecycle
from desktop.lifecycle.static import StaticLifecycle
from desktop.single_instance import InstanceLock
from desktop.tray import TrayApp, backend_problem, display_problem, status_line
from server.framing import ServerState, ServerStatus

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pystray_dummy() -> Iterator[ModuleType]:
    """pystray with its dummy backend (chosen at import time, so set before importing)."""
    previous = os.environ.get("PYSTRAY_BACKEND")
    os.environ["PYSTRAY_BACKEND"] = "dummy"
    try:
        module = (
            importlib.reload(sys.modules["pystray"])
            if "pystray" in sys.modules
            else importlib.import_module("pystray")
        )
    finally:
        if previous is None:
            del os.environ["PYSTRAY_BACKEND"]
        else:
            os.environ["PYSTRAY_BACKEND"] = previous
    assert module.Icon.__module__ == "pystray._base"
    yield module


@dataclass
class Desktop:
    """Stands in for the user's desktop: what was opened and copied, what the chooser returns."""

    opened: list[Path] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    clipboard_works: bool = True
    chosen: list[Path | None] = field(default_factory=list)

    def open(self, path: Path) -> str | None:
        self.opened.append(path)
        return None

    def copy(self, text: str) -> bool:
        self.copied.append(text)
        return self.clipboard_works

    def choose(self, _title: str) -> Path | None:
        return self.chosen.pop(0) if self.chosen else None


@dataclass
class Tray:
    app: TrayApp
    controller: Controller
    desktop: Desktop
    tmp: Path

    def item(self, text: str, menu: Any = None) -> Any:
        for entry in (menu or self.app.icon.menu).items:
            if str(entry.text).startswith(text):
                return entry
        raise AssertionError(f"no menu item starting with {text!r}")

    def click(self, text: str, submenu: str | None = None) -> None:
        menu = self.item(submenu).submenu if submenu else None
        self.item(text, menu)(self.app.icon)
        assert self.app.wait_for_background_work(30)

    def shown(self) -> list[str]:
        """The menu as the user sees it: visible entries only."""
        entries = self.app.icon.menu.items
        return [str(entry.text) for entry in entries if entry.visible and str(entry.text) != "- - - -"]

    def texts(self, menu: Any = None) -> list[str]:
        return [
            str(entry.text) for entry in (menu or self.app.icon.menu).items if str(entry.text) != "- - - -"
        ]


def notifications(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(getattr(r, "notification", "")) for r in caplog.records if hasattr(r, "notification")]


def make_tray(pystray: ModuleType, tmp: Path, controller: Controller) -> Tray:
    desktop = Desktop()
    app = TrayApp(
        controller,
        pystray,
        config_path=tmp / "config" / "agent.yaml",
        log_path=tmp / "logs" / "fluidity.log",
        autostart=XdgAutostart(config_home=tmp / "xdg"),
        autostart_command=[sys.executable, "-m", "desktop.tray_app", "--background"],
        opener=desktop.open,
        copier=desktop.copy,
        chooser=desktop.choose,
    )
    return Tray(app, controller, desktop, tmp)


@pytest.fixture
def local_tray(pystray_dummy: ModuleType, pki: Pki, tmp_path: Path) -> Iterator[Tray]:
    """A tray over the real local backend; its certificates folder starts empty."""
    cert_dir = tmp_path / "certs"
    config = agent_config(
        pki,
        free_port(),
        lifecycle="local",
        listen_port=free_port(),
        ca_file=cert_dir / "ca.crt",
        cert_file=cert_dir / "client.crt",
        key_file=cert_dir / "client.key",
        connection_timeout=30.0,
    )
    lifecycle = LocalLifecycle(config, server_log=tmp_path / "server.log")
    controller = Controller(config, lifecycle, monitor_interval=0.1)
    tray = make_tray(pystray_dummy, tmp_path, controller)
    yield tray
    controller.shutdown(30)


# ----------------------------------------------------------------------------- menu and icons


def test_menu_has_every_entry_with_connect_as_the_default(local_tray: Tray) -> None:
    port = local_tray.controller.config.listen_port
    assert local_tray.texts() == [
        "Disconnected",
        "",  # hidden: server time and cost, for backends that start a paid server
        "Connect",
        "Connect anyway (over budget)",  # hidden unless this month's budget is used up
        "Usage",  # hidden until the proxy has counted traffic
        f"Copy proxy address (127.0.0.1:{port})",
        "Copy proxy settings",
        "Certificates",
        "Start at login",
        "Use as system proxy",  # hidden here: this tray has no system proxy follower
        "Open log",
        "Open config",
        "Reload settings",
        "Diagnose…",
        "Quit",
    ]
    assert not local_tray.item("Disconnected").enabled
    assert local_tray.item("Connect").default
    assert local_tray.texts(local_tray.item("Certificates").submenu) == [
        "Generate certificates",
        "Import bundle…",
        "Show expiry",
        "Open folder",
    ]


def test_connect_and_disconnect_from_the_menu_with_the_local_backend(
    local_tray: Tray, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = local_tray.controller.config
    with OriginServer() as origin:
        local_tray.click("Connect")
        snap = wait_for_state(local_tray.controller, State.CONNECTED, timeout=30)
        assert local_tray.shown()[:2] == [
            f"Connected to 127.0.0.1:{config.server_port} · 0 active streams",
            "Disconnect",
        ]
        assert (config.ca_file.parent / "client.key").is_file()  # the local backend made them
        status, body = fetch_through_proxy(snap.proxy_address, origin.url("/echo/menu"))
        assert status == 200 and b"/echo/menu" in body

    local_tray.click("Disconnect")
    assert local_tray.shown()[1] == "Connect"
    wait_until_stopped(local_tray.controller)
    assert local_tray.app.wait_for_background_work(10)
    assert local_tray.texts()[0] == "Disconnected"
    assert any(n.startswith("Connected to 127.0.0.1") for n in notifications(caplog))
    assert "Disconnected." in notifications(caplog)


def test_an_error_shows_its_cause_in_the_status_line_and_a_notification(
    pystray_dummy: ModuleType, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    config = agent_config(pki, free_port(), lifecycle="static", listen_port=port)
    tray = make_tray(pystray_dummy, tmp_path, Controller(config, StaticLifecycle(config)))
    try:
        with socket.create_server(("127.0.0.1", port)):
            tray.click("Connect")
            wait_for_state(tray.controller, State.ERROR)
        assert tray.app.wait_for_background_work(10)
        status = tray.texts()[0]
        assert status.startswith(f"Error: cannot listen on 127.0.0.1:{port}")
        assert tray.shown()[1] == "Connect"  # a retry
        assert any(f"cannot listen on 127.0.0.1:{port}" in n for n in notifications(caplog))
    finally:
        tray.controller.shutdown(30)


def test_copy_proxy_address(local_tray: Tray, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    address = f"127.0.0.1:{local_tray.controller.config.listen_port}"
    local_tray.click("Copy proxy address")
    assert local_tray.desktop.copied == [address]
    assert f"Proxy address {address} copied to the clipboard." in notifications(caplog)

    local_tray.desktop.clipboard_works = False
    local_tray.click("Copy proxy address")
    assert any(n.startswith(f"Set your browser or system proxy to {address}") for n in notifications(caplog))


def test_certificates_generate_show_expiry_and_open_folder(
    local_tray: Tray, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cert_dir = local_tray.app.cert_dir
    local_tray.click("Generate certificates", submenu="Certificates")
    assert certificates.verify(cert_dir) == []
    assert f"Created certificates in {cert_dir}." in notifications(caplog)
    local_tray.click("Generate certificates", submenu="Certificates")
    assert any(n.startswith("Certificates already exist") for n in notifications(caplog))

    local_tray.click("Show expiry", submenu="Certificates")
    expiry = notifications(caplog)[-1]
    assert "ca.crt: expires in" in expiry and "client.crt: expires in 825 days" in expiry

    local_tray.click("Open folder", submenu="Certificates")
    assert local_tray.desktop.opened == [cert_dir]


def test_import_bundle(local_tray: Tray, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    bundle = certificates.create_bundle(pki.dir, tmp_path / "client-bundle.zip")
    not_a_bundle = tmp_path / "notes.zip"
    not_a_bundle.write_text("not a zip")
    local_tray.desktop.chosen = [None, not_a_bundle, bundle]

    local_tray.click("Import bundle", submenu="Certificates")  # the user cancelled the chooser
    assert notifications(caplog)[-1].startswith("No certificate bundle chosen")
    local_tray.click("Import bundle", submenu="Certificates")
    assert "is neither a folder nor a zip file" in notifications(caplog)[-1]
    local_tray.click("Import bundle", submenu="Certificates")
    assert notifications(caplog)[-1].startswith("Imported ca.crt, client.crt, client.key into")
    for name in ("ca.crt", "client.crt", "client.key"):
        assert (local_tray.app.cert_dir / name).read_bytes() == pki.path(name).read_bytes()


def test_start_at_login_toggles_a_real_autostart_entry(local_tray: Tray) -> None:
    entry = local_tray.tmp / "xdg" / "autostart" / "fluidity.desktop"
    assert local_tray.item("Start at login").checked is False
    local_tray.click("Start at login")
    assert entry.is_file() and local_tray.item("Start at login").checked is True
    assert '"-m" "desktop.tray_app" "--background"' in entry.read_text()
    local_tray.click("Start at login")
    assert not entry.exists() and local_tray.item("Start at login").checked is False


def test_open_log_and_open_config_create_what_is_missing(local_tray: Tray) -> None:
    local_tray.click("Open log")
    local_tray.click("Open config")
    log_path, config_path = local_tray.app.log_path, local_tray.app.config_path
    assert local_tray.desktop.opened == [log_path, config_path]
    assert log_path.is_file()
    created = load_agent_config(config_path, env={})
    assert created.lifecycle == "local"
    if os.name == "posix":
        assert config_path.stat().st_mode & 0o077 == 0  # it may later hold an API key

    config_path.write_text("lifecycle: static\n")
    local_tray.click("Open config")
    assert config_path.read_text() == "lifecycle: static\n"  # an existing file is never replaced


def test_diagnose_runs_the_doctor_off_the_ui_thread_and_opens_its_report(
    local_tray: Tray, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    local_tray.click("Diagnose…")
    report = local_tray.app.log_path.with_name("doctor.txt")
    assert local_tray.desktop.opened == [report]
    text = report.read_text(encoding="utf-8")
    assert text.startswith(f"Fluidity doctor: {local_tray.app.config_path}\n")
    assert "INFO  certificates.files" in text and "lifecycle local creates them on Connect" in text
    assert any(n.startswith("Summary: ") and n.endswith("no problems found.") for n in notifications(caplog))

    port = local_tray.controller.config.listen_port
    with socket.create_server(("127.0.0.1", port)):  # another program holds the proxy port
        local_tray.click("Diagnose…")
    assert "FAIL  local.proxy_port" in report.read_text(encoding="utf-8")
    problem = notifications(caplog)[-1]
    assert f"local.proxy_port: 127.0.0.1:{port} is in use by another program" in problem
    assert "Fix: stop that program" in problem


def test_quit_disconnects_stops_the_local_server_and_ends_the_loop(local_tray: Tray) -> None:
    local_tray.click("Connect")
    wait_for_state(local_tray.controller, State.CONNECTED, timeout=30)
    lifecycle = local_tray.controller.lifecycle
    assert lifecycle.status().state is ServerState.RUNNING
    local_tray.click("Quit")
    assert local_tray.texts()[0].startswith("Quitting")
    assert local_tray.app.quit_done.wait(30)
    assert local_tray.controller.snapshot().state is State.DISCONNECTED
    assert lifecycle.status().state is ServerState.STOPPED


def test_first_run_of_a_cloud_backend_asks_for_the_bundle(
    pystray_dummy: ModuleType, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cert_dir = tmp_path / "certs"
    config = agent_config(
        pki,
        8443,
        lifecycle="static",
        server_address="203.0.113.7",
        ca_file=cert_dir / "ca.crt",
        cert_file=cert_dir / "client.crt",
        key_file=cert_dir / "client.key",
    )
    tray = make_tray(pystray_dummy, tmp_path, Controller(config, StaticLifecycle(config)))
    tray.desktop.chosen = [pki.dir / "ca.crt"]  # a file inside a bundle folder
    try:
        tray.app.startup_checks()
        assert notifications(caplog)[0].startswith("Fluidity needs your certificate bundle")
        assert (cert_dir / "client.key").read_bytes() == pki.path("client.key").read_bytes()
    finally:
        tray.controller.shutdown(10)


def test_certificates_about_to_expire_are_announced_at_start(
    pystray_dummy: ModuleType, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cert_dir = tmp_path / "certs"
    certificates.ensure_certificates(cert_dir, leaf_days=certificates.EXPIRY_WARNING_DAYS - 4)
    config = agent_config(
        pki, 8443, lifecycle="local", ca_file=cert_dir / "ca.crt", cert_file=cert_dir / "client.crt",
        key_file=cert_dir / "client.key",
    )  # fmt: skip
    tray = make_tray(pystray_dummy, tmp_path, Controller(config, LocalLifecycle(config)))
    try:
        tray.app.startup_checks()
        warning = notifications(caplog)[-1]
        assert warning.startswith("Certificates expire soon:")
        assert "client.crt expires in 9 days" in warning or "client.crt expires in 10 days" in warning
    finally:
        tray.controller.shutdown(10)


def test_the_menu_less_x11_fallback_is_refused_unless_chosen() -> None:
    problem = backend_problem("pystray._xorg", {})
    assert problem is not None and "no menu" in problem and "PyGObject" in problem
    assert backend_problem("pystray._xorg", {"PYSTRAY_BACKEND": "xorg"}) is None
    assert backend_problem("pystray._gtk", {}) is None


def test_status_line_while_waking_shows_elapsed_seconds_and_progress() -> None:
    server = ServerStatus(ServerState.STARTING, 1, 0, 1)
    snap = Snapshot(State.WAKING, 1, waking_since=100.0, server=server)
    assert status_line(snap, 112.4) == "Waking the server… 12 s (starting: 0 of 1 tasks running, 1 pending)"
    reconnecting = Snapshot(
        State.CONNECTING, 1, endpoint=Endpoint("198.51.100.2", 8443), was_connected=True,
        detail="reconnecting: tunnel lost: reset",
    )  # fmt: skip
    assert status_line(reconnecting, 0) == "Reconnecting to 198.51.100.2:8443… tunnel lost: reset"


def test_each_state_has_its_own_shape_and_colour() -> None:
    images = {state: tray_icon(state) for state in TRAY_STATES}
    masks = {
        state: image.getchannel("A").point(lambda a: 255 if a > 128 else 0) for state, image in images.items()
    }
    for first in TRAY_STATES:
        for second in TRAY_STATES:
            if first < second:
                differing = ImageChops.difference(masks[first], masks[second]).histogram()[255]
                assert differing > 0.05 * 64 * 64, f"{first} and {second} have nearly the same shape"
    colours = {
        image.convert("RGB").resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
        for image in images.values()
    }
    assert len(colours) == len(TRAY_STATES)


def test_shipped_icons_match_the_drawing_code() -> None:
    assets = REPO / "assets"
    for state in TRAY_STATES:
        for size in SIZES:
            with Image.open(assets / tray_asset_name(state, size)) as shipped:
                assert shipped.size == (size, size)
                difference = ImageChops.difference(shipped.convert("RGBA"), render_tray_icon(state, size))
                extremes = difference.getextrema()
                assert isinstance(extremes, tuple)
                assert max(band[1] for band in extremes if isinstance(band, tuple)) <= 8, (
                    f"assets/{tray_asset_name(state, size)} is stale: run python assets/make_icons.py"
                )
    assert (assets / "fluidity.png").is_file() and (assets / "fluidity.ico").is_file()


# ----------------------------------------------------------------------------- the fluidity command


def run_fluidity(
    tmp_path: Path, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "PYSTRAY_BACKEND")}
    env = {k: v for k, v in env.items() if not k.startswith("FLUIDITY_")}
    env.update(
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        **(extra_env or {}),
    )
    return subprocess.run(
        [sys.executable, "-m", "desktop.tray_app", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_without_a_display_it_says_so_and_points_to_fluidity_agent(tmp_path: Path) -> None:
    result = run_fluidity(tmp_path)
    assert result.returncode == 1
    assert "cannot show the tray icon: there is no graphical display" in result.stderr
    config_path = tmp_path / "config" / "fluidity" / "agent.yaml"
    assert f"fluidity-agent --config {config_path}" in result.stderr
    assert "created settings file" in result.stderr and config_path.is_file()  # first run
    assert display_problem({}, "linux") is not None and display_problem({"DISPLAY": ":0"}, "linux") is None


def test_a_second_launch_says_it_is_already_running_and_binds_nothing(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "agent.yaml"
    config.write_text(f"lifecycle: local\nlisten_port: {port}\n")
    with InstanceLock(tmp_path / "state" / "fluidity" / "tray.lock") as lock:
        assert lock.acquire()
        result = run_fluidity(tmp_path, "--config", str(config), extra_env={"PYSTRAY_BACKEND": "dummy"})
        assert result.returncode == 0
        assert result.stderr.strip() == f"Fluidity is already running (pid {os.getpid()})."
        quiet = run_fluidity(tmp_path, "--config", str(config), "--background")
        assert (quiet.returncode, quiet.stderr) == (0, "")
        with socket.create_server(("127.0.0.1", port)):
            pass  # nothing listens on the proxy port


def test_bad_settings_are_reported_with_the_key(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("lifecycle: lambda\n")
    result = run_fluidity(tmp_path, "--config", str(config))
    assert result.returncode == 2
    assert f"fluidity: {config}: api_url:" in result.stderr


def test_version(tmp_path: Path) -> None:
    result = run_fluidity(tmp_path, "--version")
    assert (result.returncode, result.stdout.strip()) == (0, "fluidity 0.1.0")


def test_shell_actions_report_missing_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no xdg-open, xclip, xsel or wl-copy
    monkeypatch.delitem(sys.modules, "gi.repository.Gtk", raising=False)  # and no GTK loop running
    assert copy_text("127.0.0.1:8080") is False
    problem = open_path(tmp_path)
    assert problem is not None and "xdg-open" in problem
