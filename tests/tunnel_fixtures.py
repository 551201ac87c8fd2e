"""Real Fluidity parts for tests: a certificate set, a tunnel server process, an agent.

The server runs as a child process (so tests can SIGKILL or SIGTERM it); the agent runs
in the test process on a free port. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from desktop.agent import Agent
from desktop.certificates import ensure_certificates
from desktop.config import AgentConfig
from desktop.lifecycle.base import Endpoint
from server.config_loader import load, without_settings_env

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Pki:
    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    cert_dir = tmp_path_factory.mktemp("pki")
    ensure_certificates(cert_dir)
    return Pki(cert_dir)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A `fluidity-server` child process and the JSON log lines it wrote."""

    args: list[str]
    port: int
    process: subprocess.Popen[bytes] | None = None
    lines: list[dict[str, object]] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    _reader: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> None:
        env = without_settings_env()
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.main", *self.args, "--listen-port", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, args=(self.process,), daemon=True)
        self._reader.start()
        self.wait_for("listening", timeout)

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.lines.append({"message": raw.decode("utf-8", "replace").rstrip()})

    def wait_for(self, message: str, timeout: float = 10.0, **fields: object) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.get("message") == message and all(line.get(k) == v for k, v in fields.items()):
                    return line
            if self.process is not None and self.process.poll() is not None and self._reader is not None:
                self._reader.join(1.0)
                if not any(line.get("message") == message for line in self.lines):
                    code = self.process.returncode
                    raise AssertionError(f"server exited ({code}); log: {self.lines[-10:]}")
            time.sleep(0.02)
        raise AssertionError(f"no {message!r} log line within {timeout} s; log: {self.lines[-10:]}")

    def messages(self, message: str) -> list[dict[str, object]]:
        return [line for line in self.lines if line.get("message") == message]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        if self._reader is not None:
            self._reader.join(2.0)
        return code

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def server_args(pki: Pki, *extra: str, allow_loopback: bool = True) -> list[str]:
    args = [
        "--listen-address", "127.0.0.1",
        "--ca-file", str(pki.path("ca.crt")),
        "--cert-file", str(pki.path("server.crt")),
        "--key-file", str(pki.path("server.key")),
        "--shutdown-grace", "10s",
        "--no-emit-metrics",
        "--log-level", "info",
    ]  # fmt: skip
    if allow_loopback:
        args += ["--allow-networks", "127.0.0.0/8,::1/128"]
    return [*args, *extra]


@pytest.fixture
def tunnel_server(pki: Pki) -> Iterator[ServerProcess]:
    server = ServerProcess(server_args(pki), free_port())
    server.start()
    yield server
    server.stop()


def agent_config(pki: Pki, server_port: int, **overrides: object) -> AgentConfig:
    values: dict[str, object] = {
        "server_address": "127.0.0.1",
        "server_port": server_port,
        "listen_address": "127.0.0.1",
        "listen_port": 0,
        "ca_file": pki.path("ca.crt"),
        "cert_file": pki.path("client.crt"),
        "key_file": pki.path("client.key"),
        "keepalive_interval": 1.0,
        "keepalive_timeout": 5.0,
        "reconnect_backoff_max": 1.0,
        "request_wait": 10.0,
        "connect_timeout": 5.0,
        "bypass": [],  # the tests reach their origins on 127.0.0.1 through the tunnel
        "optimistic_connect": False,  # most tests check the status a failed CONNECT gets
    }
    values.update(overrides)
    return load(AgentConfig, None, env={}, overrides=values)


@dataclass
class RunningAgent:
    agent: Agent
    config: AgentConfig

    @property
    def proxy_url(self) -> str:
        host, port = self.agent.proxy_address
        return f"http://{host}:{port}"

    @property
    def proxy_address(self) -> tuple[str, int]:
        return self.agent.proxy_address


def start_agent(pki: Pki, server_port: int, **overrides: object) -> RunningAgent:
    config = agent_config(pki, server_port, **overrides)
    agent = Agent(config)
    agent.start(Endpoint("127.0.0.1", server_port))
    if not agent.wait_connected(10.0):
        agent.stop()
        raise AssertionError(f"agent did not connect: {agent.stats().last_error}")
    return RunningAgent(agent, config)


@pytest.fixture
def agent(pki: Pki, tunnel_server: ServerProcess) -> Iterator[RunningAgent]:
    running = start_agent(pki, tunnel_server.port)
    yield running
    running.agent.stop()


def clean_env() -> dict[str, str]:
    """Environment for client subprocesses: no inherited proxies, nothing bypassed."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["NO_PROXY"] = ""
    env["no_proxy"] = ""
    return env


# --------------------------------------------------------------------------- more parts for end-to-end tests
# Factories for tests that need several servers or agents, or that kill, stop or restart
# the server; plus the clients (curl, requests) pointed at an agent's proxy. Import the
# ``*_fixture`` functions to use the fixtures (named without the suffix).

ServerFactory = Callable[..., ServerProcess]
AgentFactory = Callable[..., RunningAgent]


@pytest.fixture(name="server_factory")
def server_factory_fixture(pki: Pki) -> Iterator[ServerFactory]:
    """``start(*extra_flags, allow_loopback=True, port=None)``: server processes, all stopped at the end."""
    started: list[ServerProcess] = []

    def start(*extra: str, allow_loopback: bool = True, port: int | None = None) -> ServerProcess:
        server = ServerProcess(server_args(pki, *extra, allow_loopback=allow_loopback), port or free_port())
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)  # a frozen server would ignore SIGTERM
        server.stop()


@pytest.fixture(name="agent_factory")
def agent_factory_fixture(pki: Pki) -> Iterator[AgentFactory]:
    """``start(server_port, connected=True, **config_overrides)``: agents stopped at the end.

    With ``connected=False`` the agent is started without waiting for its tunnel, for
    tests where the tunnel is expected not to come up.
    """
    started: list[Agent] = []

    def start(server_port: int, *, connected: bool = True, **overrides: object) -> RunningAgent:
        if connected:
            running = start_agent(pki, server_port, **overrides)
        else:
            config = agent_config(pki, server_port, **overrides)
            running = RunningAgent(Agent(config), config)
            running.agent.start(Endpoint("127.0.0.1", server_port))
        started.append(running.agent)
        return running

    yield start
    for agent in started:
        agent.stop()


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` (a hang guard)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not true within {timeout:g} s")
        time.sleep(0.02)


def curl(proxy_url: str, *args: str, max_time: float = 20.0) -> subprocess.CompletedProcess[bytes]:
    """Run curl through ``proxy_url`` with a clean environment and a hard time limit."""
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", f"{max_time:g}", "--proxy", proxy_url, *args],
        capture_output=True,
        env=clean_env(),
        timeout=max_time + 10,
        check=False,
    )


def proxy_session(proxy_url: str) -> requests.Session:
    """A requests session that uses only ``proxy_url`` (no environment proxies or .netrc)."""
    session = requests.Session()
    session.trust_env = False
    session.proxies = {"http": proxy_url, "https": proxy_url}
    return session


def process_rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")
