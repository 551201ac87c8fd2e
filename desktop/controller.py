"""The tray's state machine: disconnected -> waking -> connecting -> connected (or error).

Every state change goes through ``advance``, a pure function of (snapshot, event) that
returns the next snapshot and the side effects to run, so the rules are testable without a
display, a network or threads. ``Controller`` is the thin driver: it feeds events in, runs
the effects on one worker thread (the UI thread never waits for the network), and tells
observers about each new snapshot.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from desktop.config import AgentConfig
from desktop.lifecycle.base import Endpoint, LifecycleError, ServerLifecycle, WakeCancelled, WakeRefused
from desktop.tunnel_client import LinkObserver, LinkState
from server.framing import ServerStatus
from server.tls import TlsSetupError, client_context

log = logging.getLogger("fluidity.controller")

#: Reconnect failures in a row (after having been connected) that mean "the server is gone".
REWAKE_AFTER_FAILURES = 3
#: How often the controller samples the agent (stream count, failures) while a session is up.
MONITOR_INTERVAL = 1.0


class State(enum.StrEnum):
    DISCONNECTED = "disconnected"
    WAKING = "waking"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    ERROR = "error"


@dataclass(frozen=True)
class Snapshot:
    """Everything the UI shows; replaced (never mutated) on each event."""

    state: State = State.DISCONNECTED
    session: int = 0
    endpoint: Endpoint | None = None
    detail: str = ""
    error: str | None = None
    waking_since: float | None = None
    server: ServerStatus | None = None
    active_streams: int = 0
    connected_since: float | None = None
    was_connected: bool = False
    rewoken: bool = False
    stopping: bool = False
    proxy_address: tuple[str, int] = ("127.0.0.1", 8080)

    @property
    def busy(self) -> bool:
        """A session is in progress: the toggle means Disconnect."""
        return self.state in (State.WAKING, State.CONNECTING, State.CONNECTED)


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class ConnectRequested:
    pass


@dataclass(frozen=True)
class DisconnectRequested:
    quitting: bool = False


@dataclass(frozen=True)
class WakeProgress:
    session: int
    status: ServerStatus
    elapsed: float


@dataclass(frozen=True)
class WakeSucceeded:
    session: int
    endpoint: Endpoint


@dataclass(frozen=True)
class AgentStarted:
    session: int
    proxy_address: tuple[str, int]


@dataclass(frozen=True)
class LinkChanged:
    session: int
    link: LinkState
    error: str | None


@dataclass(frozen=True)
class AgentSample:
    """Periodic reading of the agent's counters (the link observer fires only on changes)."""

    session: int
    link: LinkState
    active_streams: int
    consecutive_failures: int
    last_error: str | None


@dataclass(frozen=True)
class SessionFailed:
    session: int
    code: str
    message: str
    #: Stop the server? None = as on Disconnect; False = nothing was started; True = budget.
    stop_server: bool | None = None


@dataclass(frozen=True)
class SessionStopped:
    session: int
    kill_error: str | None


Event = (
    ConnectRequested
    | DisconnectRequested
    | WakeProgress
    | WakeSucceeded
    | AgentStarted
    | LinkChanged
    | AgentSample
    | SessionFailed
    | SessionStopped
)

# ----------------------------------------------------------------------------- effects


@dataclass(frozen=True)
class StartSession:
    session: int


@dataclass(frozen=True)
class Rewake:
    session: int


@dataclass(frozen=True)
class StopSession:
    session: int
    kill: bool


Effect = StartSession | Rewake | StopSession


@dataclass(frozen=True)
class Policy:
    """The settings that change transitions."""

    kill_on_disconnect: bool
    can_rewake: bool
    rewake_after: int = REWAKE_AFTER_FAILURES


def advance(snap: Snapshot, event: Event, policy: Policy, now: float) -> tuple[Snapshot, tuple[Effect, ...]]:
    """The transition function: (snapshot, event) -> (next snapshot, effects to run)."""
    replace = dataclasses.replace
    if isinstance(event, ConnectRequested):
        if snap.busy:
            return snap, ()
        session = snap.session + 1
        return (
            Snapshot(
                State.WAKING,
                session,
                detail="waking the server",
                waking_since=now,
                proxy_address=snap.proxy_address,
                stopping=snap.stopping,
            ),
            (StartSession(session),),
        )
    if isinstance(event, DisconnectRequested):
        if not snap.busy:
            return snap, ()
        detail = "stopping the server" if policy.kill_on_disconnect else ""
        return (
            replace(
                snap,
                state=State.DISCONNECTED,
                detail=detail,
                error=None,
                waking_since=None,
                active_streams=0,
                connected_since=None,
                stopping=True,
            ),
            (StopSession(snap.session, policy.kill_on_disconnect),),
        )
    if event.session != snap.session:
        return snap, ()  # a late report from a session the user already ended
    if isinstance(event, SessionStopped):
        if event.kill_error is not None and snap.state is State.DISCONNECTED:
            message = f"could not stop the server: {event.kill_error}"
            return replace(snap, state=State.ERROR, error=message, detail=message, stopping=False), ()
        detail = snap.detail
        if snap.state is State.DISCONNECTED:
            detail = "server stopped" if policy.kill_on_disconnect else ""
        return replace(snap, stopping=False, detail=detail), ()
    if not snap.busy:
        return snap, ()
    if isinstance(event, SessionFailed):
        stop = policy.kill_on_disconnect if event.stop_server is None else event.stop_server
        return (
            replace(
                snap,
                state=State.ERROR,
                error=event.message,
                detail=event.message,
                waking_since=None,
                active_streams=0,
                connected_since=None,
                stopping=True,
            ),
            # Release the proxy port and, when we may have started the server, stop paying for it.
            (StopSession(snap.session, stop),),
        )
    if isinstance(event, WakeProgress):
        if snap.state is not State.WAKING:
            return snap, ()
        return replace(snap, server=event.status, detail=event.status.message or snap.detail), ()
    if isinstance(event, WakeSucceeded):
        return (
            replace(
                snap,
                state=State.CONNECTING,
                endpoint=event.endpoint,
                waking_since=None,
                detail=f"connecting to {event.endpoint}",
            ),
            (),
        )
    if isinstance(event, AgentStarted):
        return replace(snap, proxy_address=event.proxy_address), ()
    if isinstance(event, LinkChanged):
        if snap.state is State.WAKING:
            return snap, ()  # the old address is being replaced; wait for the new one
        if event.link is LinkState.CONNECTED:
            return (
                replace(
                    snap,
                    state=State.CONNECTED,
                    detail="",
                    error=None,
                    connected_since=snap.connected_since or now,
                    was_connected=True,
                    rewoken=False,
                ),
                (),
            )
        if event.link in (LinkState.RECONNECTING, LinkState.CONNECTING):
            reason = f"reconnecting: {event.error}" if event.error else "reconnecting"
            detail = reason if snap.was_connected else (event.error or snap.detail)
            return replace(snap, state=State.CONNECTING, detail=detail, connected_since=None), ()
        return snap, ()
    if isinstance(event, AgentSample):
        updated = replace(snap, active_streams=event.active_streams)
        server_gone = (
            policy.can_rewake
            and snap.state is State.CONNECTING
            and snap.was_connected
            and not snap.rewoken
            and event.consecutive_failures >= policy.rewake_after
        )
        if server_gone:
            why = event.last_error or "the server stopped answering"
            return (
                replace(
                    updated,
                    state=State.WAKING,
                    waking_since=now,
                    rewoken=True,
                    detail=f"waking the server again ({why})",
                ),
                (Rewake(snap.session),),
            )
        if snap.state is State.CONNECTING and event.last_error and not snap.was_connected:
            updated = replace(updated, detail=event.last_error)
        return updated, ()
    raise TypeError(f"unknown event {event!r}")  # pragma: no cover - Event is a closed union


# ----------------------------------------------------------------------------- driver


class AgentLike(Protocol):
    """What the controller needs from desktop.agent.Agent."""

    def listen(self) -> None: ...
    def start(self, endpoint: Endpoint) -> None: ...
    def set_endpoint(self, endpoint: Endpoint) -> None: ...
    def wait_connected(self, timeout: float, cancel: threading.Event | None = None) -> bool: ...
    def stop(self) -> None: ...
    @property
    def proxy_address(self) -> tuple[str, int]: ...
    def stats(self) -> AgentStatsLike: ...


class AgentStatsLike(Protocol):
    @property
    def link_state(self) -> LinkState: ...
    @property
    def active_streams(self) -> int: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def consecutive_failures(self) -> int: ...


AgentFactory = Callable[[AgentConfig, LinkObserver], AgentLike]
Observer = Callable[[Snapshot], None]


def _real_agent(config: AgentConfig, on_link_change: LinkObserver) -> AgentLike:
    from desktop.agent import Agent

    return Agent(config, on_link_change=on_link_change)


def missing_certificates(config: AgentConfig) -> list[Path]:
    """Certificate files the agent needs that are not there."""
    return [path for path in (config.ca_file, config.cert_file, config.key_file) if not path.is_file()]


def missing_certificates_message(missing: list[Path], *, tray: bool = True) -> str:
    """What is missing, where it was looked for, and what fixes it (a menu item or a command)."""
    folders = sorted({str(path.parent) for path in missing})
    folder = folders[0] if len(folders) == 1 else "FOLDER"
    if tray:
        names = ", ".join(path.name for path in missing)
        where = f" in {folder}" if len(folders) == 1 else ""
        return f"missing {names}{where}: import a certificate bundle (Certificates > Import bundle…)"
    return (
        f"no certificate at {', '.join(str(path) for path in missing)}; run "
        f"`fluidity-certs import BUNDLE --dir {folder}` (the bundle made where the CA was created), "
        f"or on the first machine `fluidity-certs init --dir {folder}`"
    )


class Controller:
    """Runs the state machine: public methods return at once, network work runs on a worker."""

    def __init__(
        self,
        config: AgentConfig,
        lifecycle: ServerLifecycle,
        *,
        agent_factory: AgentFactory = _real_agent,
        monitor_interval: float = MONITOR_INTERVAL,
    ) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.policy = Policy(
            kill_on_disconnect=config.effective_kill_on_disconnect(),
            can_rewake=lifecycle.name != "static",
        )
        self._agent_factory = agent_factory
        self._next_lifecycle: ServerLifecycle | None = None
        self._snapshot = Snapshot(proxy_address=(config.listen_address, config.listen_port))
        self._lock = threading.Lock()
        self._dispatch = threading.Lock()
        self._observers: list[Observer] = []
        self._cancel = threading.Event()
        self._agent: AgentLike | None = None
        self._agent_lock = threading.Lock()
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._work, name="controller-worker", daemon=True)
        self._worker.start()
        self._monitor_interval = monitor_interval
        self._monitor = threading.Thread(target=self._watch_agent, name="controller-monitor", daemon=True)
        self._monitor.start()

    # ----- public API (non-blocking) -------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def subscribe(self, observer: Observer) -> None:
        self._observers.append(observer)

    def connect(self) -> None:
        self.post(ConnectRequested())

    def disconnect(self) -> None:
        self.post(DisconnectRequested())

    def toggle(self) -> None:
        """The tray's default action: Connect when idle, Disconnect (or cancel a wake) when busy."""
        if self.snapshot().busy:
            self.disconnect()
        else:
            self.connect()

    def shutdown(self, timeout: float = 60.0) -> bool:
        """Disconnect (killing the server if configured), finish queued work, release the backend.

        Blocks up to ``timeout``; call it off the UI thread. True if everything finished.
        """
        if self._closed.is_set():
            return True
        self.post(DisconnectRequested(quitting=True))
        self._jobs.put(None)
        self._worker.join(timeout)
        finished = not self._worker.is_alive()
        self._closed.set()
        self._monitor.join(min(timeout, 2 * self._monitor_interval + 1))
        try:
            self.lifecycle.close()
        except Exception:
            log.exception("closing the lifecycle backend failed")
        return finished

    def reconfigure(self, config: AgentConfig, lifecycle: ServerLifecycle | None = None) -> None:
        """Use reloaded settings: sessions started from now on read ``config``.

        A new backend (``lifecycle``) takes over only once no session is going on, so the server
        the current session woke is stopped through the backend that woke it.
        """
        self.config = config
        self.policy = Policy(
            kill_on_disconnect=config.effective_kill_on_disconnect(),
            can_rewake=(lifecycle or self.lifecycle).name != "static",
        )
        if lifecycle is not None:
            self._jobs.put(lambda: self._swap_lifecycle(lifecycle))

    def _swap_lifecycle(self, lifecycle: ServerLifecycle) -> None:
        snap = self.snapshot()
        if snap.busy or self._current_agent() is not None:
            self._next_lifecycle = lifecycle  # the session's own stop job swaps it in
            return
        old, self.lifecycle, self._next_lifecycle = self.lifecycle, lifecycle, None
        if old is not lifecycle:
            try:
                old.close()
            except Exception:
                log.exception("closing the previous lifecycle backend failed")

    def post(self, event: Event) -> None:
        """Feed one event through ``advance``; notify observers and start effects in order."""
        with self._dispatch:
            with self._lock:
                before = self._snapshot
                after, effects = advance(before, event, self.policy, time.monotonic())
                self._snapshot = after
            if after != before:
                if after.state is not before.state:
                    log.info(
                        "state %s -> %s",
                        before.state.value,
                        after.state.value,
                        extra={"detail": after.detail, "session": after.session},
                    )
                for observer in list(self._observers):
                    try:
                        observer(after)
                    except Exception:
                        log.exception("state observer failed")
            for effect in effects:
                self._run_effect(effect)

    # ----- effects ----------------------------------------------------------

    def _run_effect(self, effect: Effect) -> None:
        if isinstance(effect, StartSession):
            self._cancel = cancel = threading.Event()
            self._jobs.put(lambda: self._session(effect.session, cancel, rewake=False))
        elif isinstance(effect, Rewake):
            cancel = self._cancel
            self._jobs.put(lambda: self._session(effect.session, cancel, rewake=True))
        elif isinstance(effect, StopSession):
            self._cancel.set()
            self._jobs.put(lambda: self._stop(effect.session, effect.kill))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                log.exception("controller job failed")

    def _current_agent(self) -> AgentLike | None:
        with self._agent_lock:
            return self._agent

    def _session(self, session: int, cancel: threading.Event, *, rewake: bool) -> None:
        """Wake the server, start (or re-point) the agent and wait for the tunnel."""
        if cancel.is_set():
            return
        config = self.config
        if not rewake and self.lifecycle.name != "local" and (missing := missing_certificates(config)):
            self.post(SessionFailed(session, "no_certificates", missing_certificates_message(missing)))
            return
        if not rewake and self.lifecycle.name != "local":
            try:  # a key readable by others or a broken PEM is refused before waking (and paying)
                client_context(config.ca_file, config.cert_file, config.key_file)
            except TlsSetupError as error:
                self.post(SessionFailed(session, "certificates", str(error)))
                return
        if not rewake and self._current_agent() is None:
            agent = self._agent_factory(
                config, lambda link, error: self.post(LinkChanged(session, link, error))
            )
            if not self._listen(session, agent):  # the port first: a busy one costs no wake
                return
        try:
            endpoint = self.lifecycle.wake(
                timeout=config.connection_timeout,
                cancel=cancel,
                on_progress=lambda status, elapsed: self.post(WakeProgress(session, status, elapsed)),
            )
        except WakeCancelled:
            return
        except WakeRefused as error:  # nothing was started, so there is nothing to stop
            self.post(SessionFailed(session, error.code, error.message, stop_server=False))
            return
        except LifecycleError as error:
            self.post(SessionFailed(session, error.code, error.message))
            return
        except Exception as error:  # a backend bug must not leave the UI stuck in "waking"
            log.exception("wake failed unexpectedly")
            self.post(SessionFailed(session, "internal", f"waking the server failed: {error}"))
            return
        if cancel.is_set():
            return
        self.post(WakeSucceeded(session, endpoint))
        current = self._current_agent()
        if current is None:  # stopped meanwhile
            return
        agent = current
        if rewake:
            agent.set_endpoint(endpoint)
        else:
            try:
                agent.start(endpoint)
            except TlsSetupError as error:
                self.post(SessionFailed(session, "certificates", str(error)))
                return
            self.post(AgentStarted(session, agent.proxy_address))
        if agent.wait_connected(config.connection_timeout, cancel):
            self.post(LinkChanged(session, LinkState.CONNECTED, None))
            return
        if cancel.is_set():
            return
        stats = agent.stats()
        permanent = getattr(stats, "permanent_error", None)  # not every AgentLike reports one
        if permanent:
            self.post(SessionFailed(session, "certificates", permanent))
            return
        why = stats.last_error or "no answer"
        why = why.removeprefix(f"cannot reach {endpoint}: ")  # the sentence below names the server
        self.post(
            SessionFailed(
                session,
                "connect_timeout",
                f"could not connect to the server at {endpoint} within "
                f"{config.connection_timeout:g} s: {why}",
            )
        )

    def _listen(self, session: int, agent: AgentLike) -> bool:
        """Bind the agent's proxy; on failure post why and return False."""
        config = self.config
        try:
            agent.listen()
        except TlsSetupError as error:
            self.post(SessionFailed(session, "certificates", str(error), stop_server=False))
            return False
        except OSError as error:
            address = f"{config.listen_address}:{config.listen_port}"
            reason = error.strerror or str(error)
            if not reason.startswith("cannot listen on"):  # the proxy may have said it already
                reason = f"cannot listen on {address}: {reason}"
            self.post(
                SessionFailed(
                    session,
                    "port_in_use",
                    f"{reason} (is another proxy or Fluidity instance running?)",
                    stop_server=False,
                )
            )
            return False
        with self._agent_lock:
            self._agent = agent
        return True

    def _stop(self, session: int, kill: bool) -> None:
        with self._agent_lock:
            agent, self._agent = self._agent, None
        if agent is not None:
            try:
                agent.stop()
            except Exception:
                log.exception("stopping the agent failed")
        kill_error = None
        if kill:
            try:
                status = self.lifecycle.kill()
                log.info("server stop requested", extra={"server_state": status.state.value})
            except LifecycleError as error:
                kill_error = error.message
                # After a failed session the user has its cause; this one is for the log.
                after_failure = self.snapshot().state is State.ERROR
                (log.warning if after_failure else log.error)("could not stop the server: %s", error.message)
            except Exception as error:
                kill_error = str(error)
                log.exception("could not stop the server")
        if self._next_lifecycle is not None:  # settings reloaded during the session
            self._swap_lifecycle(self._next_lifecycle)
        self.post(SessionStopped(session, kill_error))

    def _watch_agent(self) -> None:
        while not self._closed.wait(self._monitor_interval):
            snap = self.snapshot()
            agent = self._current_agent()
            if agent is None or snap.state not in (State.CONNECTING, State.CONNECTED):
                continue
            try:
                stats = agent.stats()
            except Exception:
                log.exception("reading agent stats failed")
                continue
            self.post(
                AgentSample(
                    snap.session,
                    stats.link_state,
                    stats.active_streams,
                    stats.consecutive_failures,
                    stats.last_error,
                )
            )
