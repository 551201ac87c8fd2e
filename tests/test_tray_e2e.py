"""The tray on a real X display: Xvfb, trayer, a D-Bus session with dunst, pystray's gtk backend.

The icon is found in a screenshot, clicked with xdotool (left click = Connect), turns
green, a curl goes through the proxy, and Quit from the menu ends the process with 0.
Needs the tools ``.ci/install-display-deps.sh`` installs; skips naming whatever is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageChops
from proxy_fixtures import OriginServer
from tray_fixtures import (
    SCREEN_WIDTH,
    TRAY_WIDTH,
    DisplaySession,
    display_session,
    missing_display_tools,
    stop_process,
)
from tunnel_fixtures import REPO, Pki, free_port

from desktop.icons import GREEN, GREY

pytestmark = pytest.mark.display

if not sys.platform.startswith("linux"):
    pytest.skip("the display test runs on Linux (Xvfb)", allow_module_level=True)
_missing = missing_display_tools()
if _missing:
    pytest.skip(
        f"display test needs {', '.join(_missing)}: run .ci/install-display-deps.sh", allow_module_level=True
    )

WAIT = 20.0


def _distance(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """Per pixel, the largest channel difference from ``colour`` (an "L" image)."""
    solid = Image.new("RGB", image.size, tuple(colour[:3]))
    red, green, blue = ImageChops.difference(image.convert("RGB"), solid).split()
    return ImageChops.lighter(ImageChops.lighter(red, green), blue)


def icon_box(tray: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box of whatever differs from the tray's background colour."""
    background = tray.getpixel((0, 0))
    assert isinstance(background, tuple)
    return _distance(tray, background).point(lambda v: 255 if v > 30 else 0).getbbox()


def colour_share(image: Image.Image, colour: tuple[int, ...], tolerance: int = 40) -> float:
    close = _distance(image, colour).point(lambda v: 255 if v <= tolerance else 0).histogram()[255]
    return close / (image.width * image.height)


def wait_for_icon(session: DisplaySession, shot: Path, colour: tuple[int, int, int, int]) -> tuple[int, int]:
    """Screen position of the docked icon once it is drawn mostly in ``colour``."""
    deadline = time.monotonic() + WAIT
    while True:
        tray = session.tray_area(shot)
        box = icon_box(tray)
        if box is not None and colour_share(tray.crop(box), colour) > 0.15:
            left, top, right, bottom = box
            return SCREEN_WIDTH - TRAY_WIDTH + (left + right) // 2, (top + bottom) // 2
        if time.monotonic() > deadline:
            raise AssertionError(f"no icon in {colour} in the tray; see {shot}")
        time.sleep(0.2)


class GnomeProxy:
    """Reads org.gnome.system.proxy with the real gsettings, in the test desktop's session."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def get(self, schema: str, key: str) -> str:
        argv = ["gsettings", "get", schema, key]
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    def all(self) -> str:
        argv = ["gsettings", "list-recursively", "org.gnome.system.proxy"]
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=10, check=True
        ).stdout

    def wait_for(self, key: str, value: str) -> None:
        deadline = time.monotonic() + WAIT
        while self.get("org.gnome.system.proxy", key) != value:
            assert time.monotonic() < deadline, f"org.gnome.system.proxy {key} never became {value}"
            time.sleep(0.1)


def test_click_connect_browse_and_quit_on_a_real_display(pki: Pki, tmp_path: Path) -> None:
    cert_dir = tmp_path / "certs"
    shutil.copytree(pki.dir, cert_dir)
    proxy_port, server_port = free_port(), free_port()
    config = tmp_path / "agent.yaml"
    config.write_text(
        "lifecycle: local\n"
        "server_address: 127.0.0.1\n"
        f"server_port: {server_port}\n"
        f"listen_port: {proxy_port}\n"
        f"ca_file: {cert_dir / 'ca.crt'}\n"
        f"cert_file: {cert_dir / 'client.crt'}\n"
        f"key_file: {cert_dir / 'client.key'}\n"
        'connection_timeout: "20s"\n'
    )
    output = tmp_path / "fluidity.out"
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    # dconf (behind GSettings) keeps its files here, so the tray's system proxy is this test's.
    desktop_env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_RUNTIME_DIR": str(runtime)}
    with display_session(bus_env=desktop_env) as session, OriginServer() as origin:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("FLUIDITY_") and k != "WAYLAND_DISPLAY"
        }
        env.update(
            session.env,
            PYSTRAY_BACKEND="gtk",
            XDG_STATE_HOME=str(tmp_path / "state"),
            XDG_DATA_HOME=str(tmp_path / "data"),
            XDG_CURRENT_DESKTOP="GNOME",
            **desktop_env,
        )
        gnome = GnomeProxy(env) if shutil.which("gsettings") else None
        before = gnome.all() if gnome else ""
        command = [sys.executable, "-m", "desktop.tray_app", "--config", str(config)]
        with output.open("wb") as sink:
            tray = subprocess.Popen(command, env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
        try:
            x, y = wait_for_icon(session, tmp_path / "disconnected.png", GREY)

            session.click(x, y)  # gtk: a left click runs the default item, Connect
            wait_for_icon(session, tmp_path / "connected.png", GREEN)
            if gnome is not None:  # "Use as system proxy" is on by default in the tray
                gnome.wait_for("mode", "'manual'")
                assert gnome.get("org.gnome.system.proxy.http", "port") == str(proxy_port)
                assert gnome.get("org.gnome.system.proxy.https", "host") == "'127.0.0.1'"
            curl = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--max-time",
                    "10",
                    "-x",
                    f"http://127.0.0.1:{proxy_port}",
                    origin.url("/echo/e2e"),
                ],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
                env={**env, "NO_PROXY": "", "no_proxy": ""},
            )
            assert curl.returncode == 0, curl.stderr
            assert "/echo/e2e" in curl.stdout

            second = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
            assert second.returncode == 0
            assert second.stderr.startswith("Fluidity is already running")

            session.click(x, y, button=3)  # the menu
            time.sleep(0.5)
            session.screenshot(tmp_path / "menu.png")
            session.key("Up")  # from nothing selected, Up picks the last item: Quit
            session.key("Return")
            assert tray.wait(WAIT) == 0, output.read_text(errors="replace")[-2000:]
            if gnome is not None:
                assert gnome.all() == before  # Quit put the user's proxy settings back
        finally:
            stop_process(tray)
    log = (tmp_path / "state" / "fluidity" / "log" / "fluidity.log").read_text()
    assert '"message": "local server stopped"' in log  # Quit stopped the server it started


def test_without_a_tray_host_it_says_so(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(f"lifecycle: local\nlisten_port: {free_port()}\n")
    with display_session(tray_host=False) as session:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("FLUIDITY_") and k != "WAYLAND_DISPLAY"
        }
        env.update(session.env, PYSTRAY_BACKEND="gtk", XDG_STATE_HOME=str(tmp_path / "state"))
        result = subprocess.run(
            [sys.executable, "-m", "desktop.tray_app", "--config", str(config)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert "cannot show the tray icon: no system tray is running" in result.stderr
    assert f"fluidity-agent --config {config}" in result.stderr
