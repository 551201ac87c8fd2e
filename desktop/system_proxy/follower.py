"""Keep the OS proxy on the agent while a session is up, and the user's own settings otherwise.

One controller observer decides for the tray and ``fluidity-agent`` alike: while the
controller is busy (waking, connecting, connected) the OS proxy points at the agent; on
Disconnect, an error, Quit, a signal or any other exit it goes back. The OS work runs on its
own thread, so the controller's observers never wait for gsettings or the registry, and
``close()`` (called on every exit path, and at interpreter exit) restores synchronously.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from desktop.bypass import BypassRules
from desktop.config import AgentConfig, SystemProxyMode, system_proxy_state_path
from desktop.controller import Controller, Snapshot
from desktop.system_proxy.base import Mode, ProxyRequest, SystemProxyError
from desktop.system_proxy.detect import Detection, backend_named, detect, manual_instructions
from desktop.system_proxy.manager import OwnedElsewhere, SystemProxyManager

log = logging.getLogger("fluidity.system_proxy")

Notifier = Callable[[str, bool], None]  # (message, is_error)


def _log_notifier(message: str, error: bool) -> None:
    (log.warning if error else log.info)("%s", message)


def os_proxy_host(listen_address: str) -> str:
    """The address the OS should dial for the agent: a wildcard listener is reached on loopback."""
    try:
        address = ipaddress.ip_address(listen_address)
    except ValueError:
        return listen_address
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return listen_address


class SystemProxyFollower:
    """Follows controller snapshots; ``enabled`` is the tray's "Use as system proxy" checkbox."""

    def __init__(
        self,
        detection: Detection,
        state_path: Path,
        *,
        mode: Mode,
        bypass: BypassRules,
        notify: Notifier = _log_notifier,
    ) -> None:
        self.detection = detection
        self.bypass = bypass
        self.mode = mode if mode is not Mode.OFF else Mode.MANUAL
        self._enabled = mode is not Mode.OFF
        self._notify = notify
        self.manager = (
            SystemProxyManager(detection.backend, state_path, backend_for=backend_named)
            if detection.backend is not None
            else None
        )
        self._notices: list[str] = []
        self._told: set[str] = set()
        self._snapshot: Snapshot | None = None
        self._wanted: ProxyRequest | None = None
        self._applied: ProxyRequest | None = None
        self._changed = threading.Condition()
        self._closing = False
        self._busy = False
        self._work_lock = threading.Lock()
        self._recover()
        self._thread = threading.Thread(target=self._run, name="system-proxy", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # ----- what the tray and the CLI use -----------------------------------------

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def supported(self) -> bool:
        return self.manager is not None

    def set_enabled(self, enabled: bool) -> None:
        """The checkbox: set (or restore) now if a session is up."""
        with self._changed:
            self._enabled = enabled
            self._wanted = self._request_for(self._snapshot)
            self._changed.notify()

    def set_notifier(self, notify: Notifier) -> None:
        self._notify = notify

    def take_notices(self) -> list[str]:
        """Messages from start-up (the crash recovery) for whoever can show them."""
        notices, self._notices = self._notices, []
        return notices

    def on_snapshot(self, snap: Snapshot) -> None:
        """Controller observer: cheap, never blocks on the OS."""
        with self._changed:
            self._snapshot = snap
            self._wanted = self._request_for(snap)
            self._changed.notify()

    def settled(self, timeout: float) -> bool:
        """Wait until the OS matches the last snapshot (tests, and callers that must know)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._changed:
                idle = self._wanted == self._applied and not self._busy
            if idle:
                return True
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Stop following and restore the user's settings now (every exit path calls this)."""
        with self._changed:
            if self._closing:
                return
            self._closing = True
            self._wanted = None
            self._changed.notify()
        self._thread.join(timeout)
        with self._work_lock:
            self._apply(None)
        atexit.unregister(self.close)

    # ----- internals ----------------------------------------------------------------

    def _request_for(self, snap: Snapshot | None) -> ProxyRequest | None:
        if snap is None or not snap.busy or not self._enabled or self._closing:
            return None
        host, port = snap.proxy_address
        if port == 0:
            return None  # an ephemeral port is known once the agent has bound it
        return ProxyRequest(self.mode, os_proxy_host(host), port, self.bypass)

    def _recover(self) -> None:
        if self.manager is None:
            return
        try:
            report = self.manager.recover()
        except (SystemProxyError, OSError) as error:
            message = f"Could not restore the proxy settings a previous Fluidity left behind: {error}"
            log.error("%s", message)
            self._notices.append(message)
            return
        if report is not None:
            self._notices.append(report.message())

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._wanted == self._applied and not self._closing:
                    self._changed.wait()
                if self._closing:
                    return
                wanted = self._wanted
                self._busy = True
            try:
                with self._work_lock:
                    self._apply(wanted)
            finally:
                with self._changed:
                    self._busy = False

    def _tell_once(self, message: str, error: bool) -> None:
        if message not in self._told:
            self._told.add(message)
            try:
                self._notify(message, error)
            except Exception:
                log.exception("system proxy notification failed")

    def _apply(self, wanted: ProxyRequest | None) -> None:
        """Engage or release to match ``wanted`` (one thread at a time, under _work_lock)."""
        self._applied = wanted
        if self.manager is None:
            if wanted is not None:
                self._tell_once(
                    manual_instructions(wanted.host, wanted.port, self.bypass, self.detection), False
                )
            return
        try:
            if wanted is None:
                report = self.manager.release()
                if report is not None and (report.errors or report.kept()):
                    self._tell_once(report.message(), bool(report.errors))
            else:
                self.manager.engage(wanted)
        except OwnedElsewhere as error:
            self._tell_once(f"Not setting the system proxy: {error}.", False)
        except (SystemProxyError, OSError) as error:
            action = "restore" if wanted is None else "set"
            self._tell_once(
                f"Could not {action} the system proxy ({self.manager.backend.name}): {error}", True
            )


def recover_system_proxy(state_path: Path) -> str | None:
    """Only the start-up recovery (for a program that does not set the proxy itself): its notice."""
    if not state_path.exists():
        return None
    detection = detect()
    backend = detection.backend
    manager = SystemProxyManager(backend, state_path, backend_for=backend_named) if backend else None
    if manager is None:
        return None
    try:
        report = manager.recover()
    except (SystemProxyError, OSError) as error:
        return f"Could not restore the proxy settings a previous Fluidity left behind: {error}"
    return report.message() if report is not None else None


def follow_system_proxy(
    controller: Controller,
    config: AgentConfig,
    program_default: SystemProxyMode,
    *,
    notify: Notifier | None = None,
    keep_when_off: bool = False,
) -> SystemProxyFollower | None:
    """Recover after a crash, then follow ``controller``; None when off and nothing can turn it on.

    With ``notify``, start-up notices (a crash recovery) go to it at once; otherwise the caller
    takes them with ``take_notices`` when it can show them (the tray, once its icon is up).
    """
    mode = Mode(config.effective_system_proxy(program_default))
    if mode is Mode.OFF and not keep_when_off:
        notice = recover_system_proxy(system_proxy_state_path())
        if notice is not None:
            (notify or _log_notifier)(notice, False)
        return None
    follower = SystemProxyFollower(
        detect(),
        system_proxy_state_path(),
        mode=mode,
        bypass=config.bypass_rules(),
        notify=notify or _log_notifier,
    )
    if notify is not None:
        for notice in follower.take_notices():
            notify(notice, False)
    controller.subscribe(follower.on_snapshot)
    return follower
