"""The embedded local default: "waking" the server means starting it on this machine.

Wake starts ``fluidity-server`` as a child process on loopback (generating certificates
first if there are none), kill stops it. If a server already listens on the port (for
example one started by ``make run-server-local``), wake uses it and kill leaves it alone.

The child always gets the address, port and certificates the agent dials and trusts as flags,
which override its settings file (``local_server_config``), so ``--server-port`` and the
certificate flags reach it. The tray gives it a log file in the tray's log folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from desktop.config import AgentConfig
from desktop.launch import command_for
from desktop.lifecycle.base import Endpoint, LifecycleError, ProgressCallback, WakeCancelled
from server.config_loader import without_settings_env
from server.framing import ServerState, ServerStatus
from server.json_logging import stream_format

log = logging.getLogger("fluidity.lifecycle")

STOP_TIMEOUT = 25.0  # above the server's default 20 s shutdown grace


_CONSOLE_PREFIX = re.compile(r"^\d\d:\d\d:\d\d (debug|info|warn|error|crit)\s+")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def readable_line(line: str) -> tuple[str, str]:
    """(level, message) of one server stderr line: a JSON log line, a console line or plain text."""
    text = _ANSI.sub("", line).strip()
    if text.startswith("{"):
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and "message" in entry:
            return str(entry.get("level", "")), str(entry["message"])
    match = _CONSOLE_PREFIX.match(text)
    if match:
        return match.group(1), text[match.end() :]
    if text.startswith("fluidity-server: "):  # the plain line that repeats the error log line
        return "plain", text.removeprefix("fluidity-server: ")
    return "", text


class LocalLifecycle:
    name = "local"

    def __init__(self, config: AgentConfig, *, server_log: Path | None = None) -> None:
        self.config = config
        self.server_log = server_log
        self._process: subprocess.Popen[bytes] | None = None
        self._tail: deque[tuple[str, str]] = deque(maxlen=20)  # (level, message)
        self._pumped = threading.Event()
        self._lock = threading.Lock()
        self._adopted = False

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.config.server_address or "127.0.0.1", self.config.server_port)

    def server_command(self) -> list[str]:
        cmd = command_for("fluidity-server")
        if self.config.local_server_config is not None:
            cmd += ["--config", str(self.config.local_server_config)]
        else:
            cmd += ["--allow-networks", "127.0.0.0/8,::1/128", "--no-emit-metrics"]
        cert_dir = self.config.ca_file.parent
        cmd += [
            "--listen-address", self.endpoint.host,
            "--listen-port", str(self.endpoint.port),
            "--ca-file", str(self.config.ca_file),
            "--cert-file", str(cert_dir / "server.crt"),
            "--key-file", str(cert_dir / "server.key"),
        ]  # fmt: skip
        if self.server_log is not None:
            cmd += ["--log-file", str(self.server_log)]
        else:  # its lines are shown with ours: in the same format
            cmd += ["--log-format", stream_format(self.config.log_format, sys.stderr)]
        return cmd

    def _ensure_certificates(self) -> None:
        from desktop.certificates import CertificateError, ensure_certificates

        cert_dir = self.config.ca_file.parent
        try:
            created = ensure_certificates(cert_dir)
        except CertificateError as exc:
            raise LifecycleError(
                "certificates", f"cannot prepare certificates in {cert_dir}: {exc}"
            ) from None
        if created:
            log.info("created certificates", extra={"dir": str(cert_dir)})

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.endpoint.host, self.endpoint.port), timeout=0.5):
                return True
        except OSError:
            return False

    def wake(self, *, timeout: float, cancel: threading.Event, on_progress: ProgressCallback) -> Endpoint:
        started = time.monotonic()
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                return self.endpoint
            self._ensure_certificates()
            if self._listening():
                self._adopted = True
                log.info("using the server already listening", extra={"server": str(self.endpoint)})
                return self.endpoint
            self._adopted = False
            self._start_process()
        while True:
            elapsed = time.monotonic() - started
            on_progress(self._status(starting=True), elapsed)
            if cancel.is_set():
                self.kill()
                raise WakeCancelled()
            process = self._process
            if process is None or process.poll() is not None:
                if process is not None:
                    process.wait()
                    self._pumped.wait(2)  # its last words
                code = process.returncode if process is not None else "?"
                raise LifecycleError(
                    "server_exited", f"the local server exited with code {code}: {self._last_words()}"
                )
            if self._listening():
                log.info("local server is up", extra={"server": str(self.endpoint), "pid": process.pid})
                return self.endpoint
            if elapsed > timeout:
                said = self._last_words()
                self.kill()
                raise LifecycleError(
                    "timeout",
                    f"the local server (pid {process.pid}) did not listen on {self.endpoint} within "
                    f"{timeout:g} s; its last output: {said}",
                )
            cancel.wait(0.1)

    def _start_process(self) -> None:
        cmd = self.server_command()
        log.info("starting local server", extra={"command": " ".join(cmd)})
        env = without_settings_env()
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._tail.clear()
        self._pumped.clear()
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=os.name != "nt",  # Ctrl+C in a terminal goes to us; we stop it in order
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # no console window under the tray
        )
        self._process = process
        threading.Thread(target=self._pump_log, args=(process,), name="local-server-log", daemon=True).start()

    def _pump_log(self, process: subprocess.Popen[bytes]) -> None:
        """Keep the server's last lines for error messages and pass its log through."""
        assert process.stderr is not None
        try:
            for raw in process.stderr:
                entry = readable_line(raw.decode("utf-8", "replace"))
                if entry[1]:
                    self._tail.append(entry)
                if self.server_log is None:  # with a log file the server writes it itself
                    os.write(2, raw)
        finally:
            self._pumped.set()

    def _last_words(self) -> str:
        """The server's last error line, else its last line: the reason, said once."""
        entries = list(self._tail)
        errors = [message for level, message in entries if level in ("error", "crit", "critical")]
        if errors:
            return errors[-1]
        return entries[-1][1] if entries else "no output"

    def _status(self, *, starting: bool = False) -> ServerStatus:
        process = self._process
        if process is not None and process.poll() is None:
            state = ServerState.STARTING if starting else ServerState.RUNNING
            return ServerStatus(state, 1, 0 if starting else 1, 1 if starting else 0, self.endpoint.host,
                                self.endpoint.port, message=f"local server pid {process.pid}")  # fmt: skip
        if self._adopted and self._listening():
            return ServerStatus(ServerState.RUNNING, 1, 1, 0, self.endpoint.host, self.endpoint.port,
                                message="server started outside Fluidity")  # fmt: skip
        return ServerStatus(ServerState.STOPPED, 0, 0, 0, port=self.endpoint.port)

    def status(self) -> ServerStatus:
        return self._status()

    def kill(self) -> ServerStatus:
        with self._lock:
            process, self._process = self._process, None
        if process is not None and process.poll() is None:
            if os.name == "nt":
                process.terminate()
            else:
                process.send_signal(signal.SIGTERM)  # graceful: GOAWAY, drain, exit 0
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("local server did not stop in time; killing it", extra={"pid": process.pid})
                process.kill()
                process.wait(5)
            log.info("local server stopped", extra={"exit_code": process.returncode})
        return self._status()

    def close(self) -> None:
        self.kill()
