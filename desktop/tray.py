"""The tray icon and its menu, bound to the Controller.

This module only presents: the icon and tooltip follow the controller's snapshots, menu
actions call the controller (which never blocks) or run file and certificate work on a
short-lived thread, so the tray's event loop never waits for the network or a dialog.
pystray is imported lazily because on Linux importing it without a display raises.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from desktop import certificates
from desktop.autostart import Autostart
from desktop.config import AgentConfig, load_agent_config
from desktop.controller import Controller, Snapshot, State, missing_certificates
from desktop.desktop_shell import Chooser, Copier, Opener, choose_file, copy_text, open_path
from desktop.first_run import set_setting, write_first_run_config
from desktop.icons import tray_icon
from desktop.lifecycle.factory import create_lifecycle
from desktop.lifecycle.polling import describe_status
from desktop.reload import BACKEND_KEYS, LIVE_KEYS, LOG_KEYS, SettingsReloader
from desktop.system_proxy.detect import terminal_exports
from desktop.system_proxy.follower import SystemProxyFollower, os_proxy_host
from desktop.usage import server_text, traffic_text, usage_lines
from server.errors import FluidityError

if TYPE_CHECKING:
    from desktop.budget import UsageWatch
    from desktop.doctor import Report

log = logging.getLogger("fluidity.tray")

APP_TITLE = "Fluidity"
#: Longest status text in the menu; the full message goes to the notification and the log.
MENU_TEXT_LIMIT = 90
#: How often the menu is refreshed while waking (the elapsed seconds tick).
TICK_INTERVAL = 1.0
#: How long a tray started at login waits for the desktop's tray host to appear.
TRAY_HOST_WAIT = 30.0
#: How often the settings file is checked for changes (it is reloaded when it changed).
RELOAD_POLL = 2.0
#: Shortest time between menu redraws for the traffic figures while connected.
TRAFFIC_REFRESH = 2.0
#: Bound for Quit: disconnect and stop the server, then leave anyway.
QUIT_TIMEOUT = 60.0
#: The "Diagnose…" report, written next to the log file and opened like it.
DOCTOR_REPORT = "doctor.txt"
#: Runs the doctor's checks on the tray's settings (``desktop.doctor.diagnose``; tests pass their own).
Diagnoser = Callable[[AgentConfig], "Report"]


class TrayUnavailable(FluidityError):
    """No display or no tray host: the tray cannot be shown on this machine right now."""


# ----------------------------------------------------------------------------- environment checks


def display_problem(environ: Mapping[str, str] = os.environ, platform: str = sys.platform) -> str | None:
    """Why no tray can be shown here (no graphical session), or None."""
    if environ.get("PYSTRAY_BACKEND"):
        return None  # chosen explicitly (tests use "dummy")
    if platform in ("win32", "darwin"):
        return None
    if not environ.get("DISPLAY") and not environ.get("WAYLAND_DISPLAY"):
        return "there is no graphical display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    return None


def _x11_tray_owner(display_name: str) -> bool:
    from Xlib import display as xdisplay

    connection = xdisplay.Display(display_name)
    try:
        selection = connection.intern_atom(f"_NET_SYSTEM_TRAY_S{connection.get_default_screen()}")
        return bool(connection.get_selection_owner(selection))
    finally:
        connection.close()


def _status_notifier_watcher() -> bool:
    try:
        import gi

        gi.require_version("Gio", "2.0")
        from gi.repository import Gio

        bus = Gio.bus_get_sync(Gio.BusType.SESSION, None)
        reply = bus.call_sync(
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            gi.repository.GLib.Variant("(s)", ("org.kde.StatusNotifierWatcher",)),
            None,
            Gio.DBusCallFlags.NONE,
            2000,
            None,
        )
        return bool(reply.unpack()[0])
    except Exception:
        return False


def tray_host_problem(environ: Mapping[str, str] = os.environ, platform: str = sys.platform) -> str | None:
    """On Linux, None if an X11 system tray or a StatusNotifier host is running, else why not."""
    if environ.get("PYSTRAY_BACKEND") == "dummy" or platform in ("win32", "darwin"):
        return None
    display_name = environ.get("DISPLAY")
    if display_name:
        try:
            if _x11_tray_owner(display_name):
                return None
        except Exception as error:  # Xlib raises its own error types for unreachable displays
            return f"cannot open the X display {display_name}: {error}"
    if _status_notifier_watcher():
        return None
    return "no system tray is running in this desktop session (no tray host or StatusNotifier watcher)"


def wait_for_tray_host(timeout: float, environ: Mapping[str, str] = os.environ) -> str | None:
    """Poll for a tray host (at login the tray may start before the panel); the last problem or None."""
    deadline = time.monotonic() + timeout
    while True:
        problem = tray_host_problem(environ)
        if problem is None or time.monotonic() >= deadline:
            return problem
        time.sleep(1.0)


def backend_problem(backend_module: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the backend pystray picked cannot serve users, or None.

    Without PyGObject pystray falls back to plain X11, which has no menu and (pystray
    0.19.5) never delivers clicks: an icon nobody can use. Chosen explicitly, it is allowed.
    """
    if backend_module.endswith("._xorg") and environ.get("PYSTRAY_BACKEND") != "xorg":
        return (
            "only pystray's plain X11 backend is available, which has no menu; install PyGObject "
            '(pip install "PyGObject<3.51", with the gir1.2-gtk-3.0 and gir1.2-ayatanaappindicator3-0.1 '
            "packages)"
        )
    return None


def _forget_pystray() -> None:
    for name in [n for n in sys.modules if n == "pystray" or n.startswith("pystray.")]:
        del sys.modules[name]


def _import_pystray() -> ModuleType:
    """Import pystray; if its automatic pick fails (e.g. GTK present but no AppIndicator
    typelib raises ValueError instead of falling back), try the plain GTK backend."""
    try:
        import pystray
    except Exception as first:  # Xlib.error.DisplayNameError / ValueError are not ImportErrors
        if os.environ.get("PYSTRAY_BACKEND") or not sys.platform.startswith("linux"):
            raise
        _forget_pystray()
        os.environ["PYSTRAY_BACKEND"] = "gtk"
        try:
            import pystray
        except Exception:
            del os.environ["PYSTRAY_BACKEND"]
            _forget_pystray()
            raise first from None
    return pystray


def load_pystray() -> ModuleType:
    """Import pystray, turning its import-time display errors and unusable backends into TrayUnavailable."""
    try:
        pystray = _import_pystray()
    except Exception as error:
        raise TrayUnavailable(f"no system tray backend could start: {error}") from None
    problem = backend_problem(pystray.Icon.__module__)
    if problem is not None:
        raise TrayUnavailable(problem)
    return pystray


# ----------------------------------------------------------------------------- presentation


def _shorten(text: str, limit: int = MENU_TEXT_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status_line(snap: Snapshot, now: float, traffic: str | None = None) -> str:
    """The first menu line: state, server address, active streams, elapsed time while waking.

    With the traffic meter's ``traffic`` ("↓ 1.2 MB/s ↑ 40 kB/s · 230 MB today") a connected
    tray shows that instead of the address (the "Connected to …" notification names it).
    """
    if snap.state is State.WAKING:
        elapsed = int(now - snap.waking_since) if snap.waking_since is not None else 0
        progress = f" ({describe_status(snap.server)})" if snap.server is not None else ""
        again = " again" if snap.rewoken else ""
        return f"Waking the server{again}… {elapsed} s{progress}"
    if snap.state is State.CONNECTING:
        where = f" to {snap.endpoint}" if snap.endpoint else ""
        if snap.was_connected:
            return _shorten(f"Reconnecting{where}… {snap.detail.removeprefix('reconnecting: ')}")
        why = f" ({snap.detail})" if snap.detail and not snap.detail.startswith("connecting to") else ""
        return _shorten(f"Connecting{where}…{why}")
    if snap.state is State.CONNECTED:
        if traffic:
            return f"Connected · {traffic}"
        streams = f"{snap.active_streams} active stream{'s' if snap.active_streams != 1 else ''}"
        return f"Connected to {snap.endpoint} · {streams}"
    if snap.state is State.ERROR:
        return _shorten(f"Error: {snap.error or snap.detail}")
    if snap.stopping and snap.detail:
        return f"Disconnected ({snap.detail}…)"
    return f"Disconnected ({snap.detail})" if snap.detail else "Disconnected"


def proxy_url(snap: Snapshot) -> str:
    host, port = snap.proxy_address
    return f"http://{host}:{port}"


class TrayApp:
    """Owns the pystray Icon; every action goes through the controller or a background thread."""

    def __init__(
        self,
        controller: Controller,
        pystray: ModuleType,
        *,
        config_path: Path,
        log_path: Path,
        autostart: Autostart,
        autostart_command: list[str],
        opener: Opener = open_path,
        copier: Copier = copy_text,
        chooser: Chooser = choose_file,
        diagnoser: Diagnoser | None = None,
        system_proxy: SystemProxyFollower | None = None,
        usage: UsageWatch | None = None,
        load_settings: Callable[[], AgentConfig] | None = None,
        server_log: Path | None = None,
    ) -> None:
        self.controller = controller
        self.pystray = pystray
        self.config_path = config_path
        self.log_path = log_path
        self.cert_dir = controller.config.ca_file.parent
        self.autostart = autostart
        self.autostart_command = autostart_command
        self.opener = opener
        self.copier = copier
        self.chooser = chooser
        self.diagnoser = diagnoser
        self.system_proxy = system_proxy
        self.usage = usage
        self.server_log = server_log
        self.reloader = SettingsReloader(
            config_path,
            load_settings or (lambda: load_agent_config(config_path)),
            self.apply_settings,
            lambda: self.controller.config,
        )
        self._shown_status = ""
        self._last_traffic_redraw = 0.0
        self.quit_done = threading.Event()
        self._quitting = threading.Event()
        self._running = False
        self._shown_state = State.DISCONNECTED
        self._tasks: list[threading.Thread] = []
        self._tasks_lock = threading.Lock()
        # Icon, menu and notification calls go through one thread: the controller's observers
        # then never wait for a tray backend (some notify synchronously), and never deadlock
        # against a menu action waiting for the controller.
        self._updates: queue.Queue[Callable[[], None]] = queue.Queue()
        threading.Thread(target=self._apply_updates, name="tray-updates", daemon=True).start()
        self.icon: Any = pystray.Icon(
            "fluidity", icon=tray_icon(State.DISCONNECTED.value), title=APP_TITLE, menu=self.build_menu()
        )
        controller.subscribe(self._on_snapshot)
        if system_proxy is not None:
            system_proxy.set_notifier(lambda message, error: self.notify(message, error=error))

    # ----- menu ---------------------------------------------------------------

    def build_menu(self) -> Any:
        Menu, Item = self.pystray.Menu, self.pystray.MenuItem
        certificates_menu = Menu(
            Item("Generate certificates", self.on_generate_certificates),
            Item("Import bundle…", self.on_import_bundle),
            Item("Show expiry", self.on_show_expiry),
            Item("Open folder", self.on_open_certificate_folder),
        )
        return Menu(
            Item(lambda _item: self.status_text(), None, enabled=False),
            Item(
                lambda _item: self.usage_text(),
                None,
                enabled=False,
                visible=lambda _item: bool(self.usage_text()),
            ),
            Item(lambda _item: self.toggle_text(), self.on_toggle, default=True),
            Item(
                "Connect anyway (over budget)",
                self.on_connect_over_budget,
                visible=lambda _item: self.budget_refusal() is not None,
            ),
            Item(
                "Usage",
                Menu(lambda: tuple(Item(line, None, enabled=False) for line in self.usage_menu_lines())),
                visible=lambda _item: bool(self.usage_menu_lines()),
            ),
            Item(lambda _item: f"Copy proxy address ({self.proxy_address()})", self.on_copy_proxy_address),
            Item("Copy proxy settings", self.on_copy_proxy_settings),
            Menu.SEPARATOR,
            Item("Certificates", certificates_menu),
            Item("Start at login", self.on_toggle_autostart, checked=lambda _item: self.autostart_enabled()),
            Item(
                "Use as system proxy",
                self.on_toggle_system_proxy,
                checked=lambda _item: self.system_proxy is not None and self.system_proxy.enabled,
                visible=self.system_proxy is not None,
            ),
            Item("Open log", self.on_open_log),
            Item("Open config", self.on_open_config),
            Item("Reload settings", self.on_reload_settings),
            Item("Diagnose…", self.on_diagnose),
            Menu.SEPARATOR,
            Item("Quit", self.on_quit),
        )

    def status_text(self) -> str:
        if self._quitting.is_set():
            return (
                "Quitting… (stopping the server)"
                if self.controller.policy.kill_on_disconnect
                else "Quitting…"
            )
        usage = self.usage
        # Until something counts traffic (the proxy calls record_bytes), no made-up zeros.
        traffic = traffic_text(usage.store) if usage is not None and usage.store.metering else None
        return status_line(self.controller.snapshot(), time.monotonic(), traffic)

    def usage_menu_lines(self) -> list[str]:
        """Session / today / month and the session's busiest hosts, once traffic is counted."""
        if self.usage is None or not self.usage.store.metering:
            return []
        return usage_lines(self.usage.store)

    def usage_text(self) -> str:
        """The second line: server time and cost (only for backends that start a paid server)."""
        if self.usage is None or not self.usage.metered or self._quitting.is_set():
            return ""
        summary = self.usage.summary()
        if not summary.running and not summary.month_seconds:
            return ""
        return server_text(summary)

    def budget_refusal(self) -> str | None:
        """Why Connect is held back (the month's budget is used up), when idle."""
        if self.usage is None or self.controller.snapshot().busy:
            return None
        return self.usage.connect_refusal()

    def toggle_text(self) -> str:
        if self.controller.snapshot().busy:
            return "Disconnect"
        return "Connect (budget used up)" if self.budget_refusal() is not None else "Connect"

    def proxy_address(self) -> str:
        host, port = self.controller.snapshot().proxy_address
        return f"{host}:{port}"

    def autostart_enabled(self) -> bool:
        try:
            return self.autostart.is_enabled()
        except OSError:
            return False

    # ----- actions (called on the tray's event loop: never block) ------------

    def on_toggle(self) -> None:
        if self._quitting.is_set():
            return
        refusal = self.budget_refusal()
        if refusal is not None:
            self.notify(f"{refusal} Or choose “Connect anyway (over budget)”.", error=True)
            return
        self.controller.toggle()

    def on_connect_over_budget(self) -> None:
        """The confirmation: connect once although this month's budget is used up."""
        if self._quitting.is_set() or self.usage is None or self.controller.snapshot().busy:
            return
        self.usage.confirm_over_budget()
        self.controller.connect()

    def on_reload_settings(self) -> None:
        def reload() -> None:
            ok, message = self.reloader.reload()
            self.notify(message, error=not ok)
            self._refresh_menu()

        self.run_in_background("reload-settings", reload)

    def apply_settings(self, new: AgentConfig, changed: list[str]) -> str:
        """Put reloaded settings to use; what does not apply at once is said in the result."""
        lifecycle = None
        if BACKEND_KEYS.intersection(changed):
            store = self.usage.store if self.usage is not None else None
            lifecycle = create_lifecycle(new, usage=store, server_log=self.server_log)
        self.controller.reconfigure(new, lifecycle)
        self.cert_dir = new.ca_file.parent
        if LOG_KEYS.intersection(changed):
            from server.json_logging import configure_logging

            configure_logging(
                new.log_level, new.log_file or self.log_path, stream=None, log_format=new.log_format
            )
        self._refresh_menu()
        if self.controller.snapshot().busy and set(changed) - LIVE_KEYS:
            return "Changes to the running session apply from the next Connect."
        return ""

    def on_copy_proxy_address(self) -> None:
        address = self.proxy_address()

        def copy() -> None:
            if self.copier(address):
                self.notify(f"Proxy address {address} copied to the clipboard.")
            else:
                self.notify(f"Set your browser or system proxy to {address} (no clipboard tool found).")

        self.run_in_background("copy-proxy-address", copy)

    def on_copy_proxy_settings(self) -> None:
        """``export http_proxy=… no_proxy=…`` for terminals, which never read the OS proxy."""
        host, port = self.controller.snapshot().proxy_address
        text = terminal_exports(os_proxy_host(host), port, self.controller.config.bypass_rules())

        def copy() -> None:
            if self.copier(text):
                self.notify("Proxy settings for terminals copied to the clipboard: paste them into a shell.")
            else:
                self.notify(f"No clipboard tool found; for terminals run: {text}")

        self.run_in_background("copy-proxy-settings", copy)

    def on_toggle_system_proxy(self) -> None:
        """The checkbox: applies at once (while connected) and is saved as ``system_proxy``."""
        follower = self.system_proxy
        if follower is None:
            return
        enabled = not follower.enabled
        follower.set_enabled(enabled)
        self._refresh_menu()

        def save() -> None:
            try:
                set_setting(self.config_path, "system_proxy", follower.mode.value if enabled else "off")
            except OSError as error:
                self.notify(
                    f"Could not save the system proxy choice in {self.config_path}: {error}", error=True
                )

        self.run_in_background("system-proxy-setting", save)

    def on_generate_certificates(self) -> None:
        def generate() -> None:
            try:
                created = certificates.ensure_certificates(self.cert_dir)
            except certificates.CertificateError as error:
                self.notify(f"Could not create certificates: {error}", error=True)
                return
            if created:
                self.notify(f"Created certificates in {self.cert_dir}.")
            else:
                self.notify(
                    f"Certificates already exist in {self.cert_dir}; "
                    "replace them with `fluidity-certs init --force`."
                )

        self.run_in_background("generate-certificates", generate)

    def on_import_bundle(self) -> None:
        self.run_in_background("import-bundle", self.import_bundle)

    def import_bundle(self) -> bool:
        """Ask for a bundle (zip, or any file in a bundle folder) and import it; True on success."""
        choice = self.chooser("Choose a Fluidity certificate bundle (.zip or a file in the bundle folder)")
        if choice is None:
            self.notify(
                "No certificate bundle chosen. You can also run "
                f"`fluidity-certs import BUNDLE --dir {self.cert_dir}`."
            )
            return False
        source = choice if choice.is_dir() or choice.suffix.lower() == ".zip" else choice.parent
        try:
            written = certificates.import_bundle(source, self.cert_dir)
        except certificates.CertificateError as error:
            self.notify(f"Certificate bundle not imported: {error}", error=True)
            return False
        names = ", ".join(sorted(path.name for path in written))
        self.notify(f"Imported {names} into {self.cert_dir}.")
        return True

    def on_show_expiry(self) -> None:
        def show() -> None:
            try:
                infos = certificates.show(self.cert_dir)
            except certificates.CertificateError as error:
                self.notify(str(error), error=True)
                return
            lines = []
            for info in infos:
                if info.days_to_expiry < 0:
                    lines.append(f"{info.file}: EXPIRED {-info.days_to_expiry} days ago")
                else:
                    soon = " - renew soon" if info.days_to_expiry <= certificates.EXPIRY_WARNING_DAYS else ""
                    lines.append(f"{info.file}: expires in {info.days_to_expiry} days{soon}")
            self.notify("\n".join(lines))

        self.run_in_background("show-expiry", show)

    def on_open_certificate_folder(self) -> None:
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        self.run_in_background("open-certificate-folder", lambda: self._open(self.cert_dir))

    def on_toggle_autostart(self) -> None:
        try:
            if self.autostart.is_enabled():
                self.autostart.disable()
                self.notify("Fluidity will no longer start at login.")
            else:
                self.autostart.enable(self.autostart_command)
                self.notify("Fluidity will start at login.")
        except OSError as error:
            self.notify(f"Could not change start at login ({self.autostart.describe()}): {error}", error=True)

    def on_open_log(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.touch(exist_ok=True)
        self.run_in_background("open-log", lambda: self._open(self.log_path))

    def on_open_config(self) -> None:
        try:
            if write_first_run_config(self.config_path):
                log.info("created settings file", extra={"path": str(self.config_path)})
        except OSError as error:
            self.notify(f"Could not create {self.config_path}: {error}", error=True)
            return
        self.run_in_background("open-config", lambda: self._open(self.config_path))

    def on_diagnose(self) -> None:
        self.run_in_background("diagnose", self.diagnose)

    def diagnose(self) -> Path:
        """Run `fluidity doctor` on this tray's settings: notify the verdict, open the full report."""
        from desktop import doctor

        config = self.controller.config
        report = (self.diagnoser or (lambda c: doctor.diagnose(c, source=str(self.config_path))))(config)
        path = self.log_path.with_name(DOCTOR_REPORT)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doctor.render_text(report), encoding="utf-8")
        log.info("doctor: %s", report.summary(), extra={"doctor": report.to_json()})
        problems = report.problems()
        if problems:
            first = problems[0]
            fix = f" Fix: {first.fix}" if first.fix else ""
            self.notify(f"{report.summary()}. {first.check}: {first.finding}.{fix}", error=not report.ok)
        else:
            self.notify(f"{report.summary()}: no problems found.")
        self._open(path)
        return path

    def on_quit(self) -> None:
        """Disconnect (stopping the server if configured) off the UI thread, then end the loop."""
        if self._quitting.is_set():
            return
        self._quitting.set()
        self._refresh_menu()

        def quit_app() -> None:
            try:
                if not self.controller.shutdown(QUIT_TIMEOUT):
                    log.warning("quit: the server did not stop in time; leaving anyway")
            finally:
                self._running = False
                self.icon.stop()
                self.quit_done.set()

        threading.Thread(target=quit_app, name="quit", daemon=True).start()

    # ----- plumbing -----------------------------------------------------------

    def _open(self, path: Path) -> None:
        """Hand ``path`` to the desktop (may wait a few seconds for the opener: not on the UI thread)."""
        problem = self.opener(path)
        if problem is not None:
            self.notify(f"{problem}. The file is at {path}.", error=True)

    def run_in_background(self, name: str, work: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            try:
                work()
            except Exception as error:
                log.exception("%s failed", name)
                self.notify(f"{name.replace('-', ' ')} failed: {error}", error=True)

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._tasks_lock:
            self._tasks = [task for task in self._tasks if task.is_alive()]
            self._tasks.append(thread)
        thread.start()
        return thread

    def wait_for_background_work(self, timeout: float) -> bool:
        """Join the action threads started so far and apply pending UI updates (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._tasks_lock:
            tasks = list(self._tasks)
        for task in tasks:
            task.join(max(0.0, deadline - time.monotonic()))
        while self._updates.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not any(task.is_alive() for task in tasks) and not self._updates.unfinished_tasks

    def _apply_updates(self) -> None:
        while True:
            update = self._updates.get()
            try:
                update()
            except Exception:
                log.exception("updating the tray failed")
            finally:
                self._updates.task_done()

    def notify(self, message: str, *, error: bool = False) -> None:
        """Log ``message`` and show it as a notification where the backend can."""
        (log.warning if error else log.info)("notification: %s", message, extra={"notification": message})
        self._updates.put(lambda: self._show_notification(message))

    def _show_notification(self, message: str) -> None:
        if self._running and self.icon.HAS_NOTIFICATION:
            self.icon.notify(message, APP_TITLE)

    def _refresh_menu(self) -> None:
        self._updates.put(self._redraw_menu)

    def _redraw_menu(self) -> None:
        if self._running:
            self.icon.title = _shorten(f"{APP_TITLE}: {self.status_text()}", 120)
            self.icon.update_menu()

    def _on_snapshot(self, snap: Snapshot) -> None:
        """Controller observer (any thread): hand the snapshot to the update thread."""
        self._updates.put(lambda: self._present(snap))

    def _present(self, snap: Snapshot) -> None:
        """Icon, tooltip, menu, and a notification on each transition (update thread only)."""
        previous, self._shown_state = self._shown_state, snap.state
        if snap.state is not previous and self._running:
            self.icon.icon = tray_icon(snap.state.value)
        self._redraw_menu()
        if snap.state is previous:
            return
        if snap.state is State.CONNECTED:
            self.notify(f"Connected to {snap.endpoint}. Proxy: {proxy_url(snap)}")
        elif snap.state is State.ERROR:
            self.notify(snap.error or snap.detail, error=True)
        elif snap.state is State.DISCONNECTED and previous is not State.ERROR:
            stopping = " The server is being stopped." if snap.stopping and snap.detail else ""
            self.notify(f"Disconnected.{stopping}")

    # ----- running --------------------------------------------------------------

    def startup_checks(self) -> None:
        """First-run certificates and expiry warnings (runs on a background thread)."""
        config = self.controller.config
        for notice in self.system_proxy.take_notices() if self.system_proxy is not None else []:
            self.notify(notice)  # proxy settings a crashed Fluidity left behind were restored
        if self.controller.lifecycle.name == "local":
            try:
                if certificates.ensure_certificates(self.cert_dir):
                    self.notify(f"Created certificates for the local server in {self.cert_dir}.")
            except certificates.CertificateError as error:
                self.notify(f"Could not create certificates: {error}", error=True)
        elif missing_certificates(config):
            self.notify("Fluidity needs your certificate bundle (ca.crt, client.crt, client.key) to connect.")
            self.import_bundle()
        try:
            warnings = certificates.expiry_warnings(self.cert_dir)
        except OSError:
            warnings = []
        if warnings:
            self.notify("Certificates expire soon:\n" + "\n".join(warnings), error=True)

    def _tick(self) -> None:
        last_poll = time.monotonic()
        while self._running and not self._quitting.is_set():
            time.sleep(TICK_INTERVAL)
            now = time.monotonic()
            state = self.controller.snapshot().state
            if state is State.WAKING:
                self._refresh_menu()
            elif state is State.CONNECTED and now - self._last_traffic_redraw >= TRAFFIC_REFRESH:
                self._last_traffic_redraw = now
                shown = f"{self.status_text()}\n{self.usage_text()}"
                if shown != self._shown_status:  # a rebuilt menu may close an open one: only on change
                    self._shown_status = shown
                    self._refresh_menu()
            if now - last_poll >= RELOAD_POLL:
                last_poll = now
                message = self.reloader.poll()
                if message is not None:
                    self.notify(message, error=message.startswith("Settings not reloaded"))
                    self._refresh_menu()

    def _setup(self, icon: Any) -> None:
        self._running = True
        icon.visible = True
        # A state reached before the loop ran has not been drawn yet.
        self._updates.put(lambda: setattr(self.icon, "icon", tray_icon(self._shown_state.value)))
        self._refresh_menu()
        threading.Thread(target=self._tick, name="tray-tick", daemon=True).start()
        self.run_in_background("startup-checks", self.startup_checks)

    def run(self) -> None:
        """Show the icon and run the tray's event loop until Quit (must be the main thread)."""
        try:
            self.icon.run(setup=self._setup)
        except Exception as error:
            if not self._quitting.is_set():
                raise TrayUnavailable(f"the tray icon failed: {error}") from error
            # gtk raises from its final notification cleanup when no notification daemon runs.
            log.warning("tray loop ended with an error after Quit: %s", error)
        finally:
            self._running = False
