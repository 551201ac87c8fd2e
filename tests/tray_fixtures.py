"""A real X desktop for the tray end-to-end test: Xvfb, a D-Bus session, dunst and trayer.

Each piece is a real program started on a private display and a private session bus, so
the test sees exactly what a user's panel would show. ``missing_display_tools`` names
whatever is not installed (``.ci/install-display-deps.sh`` installs all of it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from desktop.controller import Controller, Snapshot, State

#: Screen and tray geometry: trayer docks at the top right, one 48 px row.
SCREEN_WIDTH, SCREEN_HEIGHT = 640, 320
TRAY_WIDTH, TRAY_HEIGHT = 200, 48
TOOLS = (
    "Xvfb",
    "trayer",
    "xdotool",
    "import",
    "dunst",
    "dbus-run-session",
    "dbus-update-activation-environment",
)
STARTUP_TIMEOUT = 10.0


def missing_display_tools() -> list[str]:
    """Programs and modules the display test needs that are not available here."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    probe = subprocess.run(
        [sys.executable, "-c", "import gi; gi.require_version('Gtk', '3.0'); from gi.repository import Gtk"],
        capture_output=True,
        check=False,
        env={**os.environ, "DISPLAY": ""},
    )
    if probe.returncode != 0:
        missing.append("PyGObject (gi) with Gtk 3")
    return missing


@dataclass
class DisplaySession:
    """A running virtual desktop; ``env`` is what a program needs to appear on it."""

    display: str
    bus_address: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"DISPLAY": self.display, "DBUS_SESSION_BUS_ADDRESS": self.bus_address}

    def run(self, *argv: str, timeout: float = 10.0) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            list(argv), env={**os.environ, **self.env}, capture_output=True, timeout=timeout, check=True
        )

    def screenshot(self, path: Path) -> Image.Image:
        self.run("import", "-window", "root", str(path))
        with Image.open(path) as image:
            return image.convert("RGB")

    def tray_area(self, path: Path) -> Image.Image:
        """The trayer strip at the top right of a fresh screenshot."""
        shot = self.screenshot(path)
        return shot.crop((SCREEN_WIDTH - TRAY_WIDTH, 0, SCREEN_WIDTH, TRAY_HEIGHT))

    def click(self, x: int, y: int, button: int = 1) -> None:
        self.run("xdotool", "mousemove", str(x), str(y), "click", str(button))

    def key(self, *keys: str) -> None:
        self.run("xdotool", "key", *keys)


def _start(argv: list[str], env: Mapping[str, str], **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs
    )


def _read_line(process: subprocess.Popen[bytes], what: str) -> str:
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()
    if not line:
        raise RuntimeError(f"{what} did not start (exit code {process.poll()})")
    return line


def _tray_owned(display: str) -> bool:
    from Xlib import display as xdisplay

    connection = xdisplay.Display(display)
    try:
        atom = connection.intern_atom(f"_NET_SYSTEM_TRAY_S{connection.get_default_screen()}")
        return bool(connection.get_selection_owner(atom))
    finally:
        connection.close()


def stop_process(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


TRAYER_ARGV = [
    "trayer",
    "--edge",
    "top",
    "--align",
    "right",
    "--widthtype",
    "pixel",
    "--width",
    str(TRAY_WIDTH),
    "--height",
    str(TRAY_HEIGHT),
    "--transparent",
    "false",
    "--SetDockType",
    "false",
]  # fmt: skip

#: trayer has been seen, now and then, not to claim the tray selection in time; a fresh start
#: is tried before the session gives up and reports what each attempt printed.
TRAYER_ATTEMPTS = 3


def _start_tray_host(session: DisplaySession) -> subprocess.Popen[bytes]:
    """Start trayer and wait until it owns the system tray selection, retrying a failed start."""
    failures: list[str] = []
    for _attempt in range(TRAYER_ATTEMPTS):
        with tempfile.TemporaryFile() as stderr:
            trayer = _start(TRAYER_ARGV, session.env, stdout=subprocess.DEVNULL, stderr=stderr)
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while trayer.poll() is None and time.monotonic() < deadline:
                if _tray_owned(session.display):
                    return trayer
                time.sleep(0.1)
            stop_process(trayer)
            stderr.seek(0)
            output = stderr.read().decode(errors="replace").strip()
        failures.append(f"exit code {trayer.returncode}: {output or 'no output'}")
    raise RuntimeError("trayer did not take the system tray selection: " + "; ".join(failures))


@contextmanager
def display_session(
    *, tray_host: bool = True, bus_env: Mapping[str, str] | None = None
) -> Iterator[DisplaySession]:
    """Xvfb on a free display, a session bus (dbus-run-session), dunst and trayer, torn down after.

    ``bus_env`` goes to the bus and so to the services it starts: dconf-service writes
    settings under the XDG_CONFIG_HOME given there, not the real user's.
    """
    processes: list[subprocess.Popen[bytes]] = []
    try:
        xvfb = _start(
            [
                "Xvfb",
                "-displayfd",
                "1",
                "-screen",
                "0",
                f"{SCREEN_WIDTH}x{SCREEN_HEIGHT}x24",
                "-nolisten",
                "tcp",
            ],
            {},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        processes.append(xvfb)
        display = f":{_read_line(xvfb, 'Xvfb')}"
        bus = _start(
            ["dbus-run-session", "--", "sh", "-c", 'echo "$DBUS_SESSION_BUS_ADDRESS"; exec sleep 600'],
            {"DISPLAY": display, **(bus_env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        processes.append(bus)
        session = DisplaySession(display, _read_line(bus, "dbus-run-session"), processes)
        # Lets the bus start a notification daemon on demand on this display.
        session.run("dbus-update-activation-environment", "DISPLAY")
        processes.append(_start(["dunst"], session.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if not tray_host:
            yield session
            return
        processes.append(_start_tray_host(session))
        yield session
    finally:
        for process in reversed(processes):
            stop_process(process)


# ----------------------------------------------------------------------------- controller waits


def wait_for_snapshot(
    controller: Controller, predicate: Callable[[Snapshot], bool], timeout: float = 15.0
) -> Snapshot:
    """Poll the controller until ``predicate`` holds (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = controller.snapshot()
        if predicate(snap):
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"controller never reached the expected state; last: {snap}")
        time.sleep(0.02)


def wait_for_state(controller: Controller, state: State, timeout: float = 15.0) -> Snapshot:
    return wait_for_snapshot(controller, lambda snap: snap.state is state, timeout)


def wait_until_stopped(controller: Controller, timeout: float = 15.0) -> Snapshot:
    """Wait for the disconnect work (agent stop, server kill) to finish."""
    return wait_for_snapshot(controller, lambda snap: not snap.stopping and not snap.busy, timeout)


def fetch_through_proxy(proxy: tuple[str, int], url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET ``url`` through the HTTP proxy at ``proxy`` with a real client (requests)."""
    import requests

    proxy_url = f"http://{proxy[0]}:{proxy[1]}"
    with requests.Session() as session:
        session.trust_env = False  # no inherited proxy settings or NO_PROXY bypass
        reply = session.get(url, proxies={"http": proxy_url, "https": proxy_url}, timeout=timeout)
        return reply.status_code, reply.content
