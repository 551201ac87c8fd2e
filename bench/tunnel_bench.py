"""Fluidity's own benchmark: the same workloads direct and through agent + tunnel server.

Everything runs on 127.0.0.1 in one run: an origin (nginx when installed, else a raw-socket
Python origin that serves files with sendfile), a ``server.main`` child process with loopback
allowed, a ``desktop.agent_cli`` child process (static lifecycle) and certificates made in a
temporary folder. Each workload runs direct first, then through the tunnel:

  a  one 256 MiB download, plain HTTP (absolute-form GET) and HTTPS through CONNECT
  b  64 concurrent keep-alive clients downloading a 1 MiB file: aggregate MB/s
  c  CONNECT -> 200 and CONNECT -> first byte of a TLS GET, sequential new connections
  d  requests/s for a 100-byte file, 50 keep-alive connections (wrk, else a Python client)
  e  agent and server RSS idle and under load, and their CPU per GB / per request

It prints ``metric | direct | fluidity | ratio`` and writes the numbers as JSON. Nothing
here asserts on timings: it measures. The numbers are the CPU cost of the whole chain on one
machine (client, agent, server and origin share the cores), not the speed of a network.

    python bench/tunnel_bench.py                # full: one to two minutes
    python bench/tunnel_bench.py --quick        # under a minute
    python bench/tunnel_bench.py --smoke        # seconds; proves the script works
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import mmap
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: the project is importable
    sys.path.insert(0, str(REPO))

from desktop.certificates import ensure_certificates  # noqa: E402
from server import __version__  # noqa: E402
from server.config_loader import without_settings_env  # noqa: E402

LOOPBACK = "127.0.0.1"
MIB = 1024 * 1024
MID_BYTES = MIB
TINY_BYTES = 100
RECV_BLOCK = MIB
HEAD_LIMIT = 64 * 1024
STOP_GRACE_S = 10.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A part of the benchmark could not run; the message says which and why."""


# --------------------------------------------------------------------------- run sizes


@dataclass(frozen=True)
class Profile:
    """How much work each workload does; ``--quick`` and ``--smoke`` shrink it."""

    name: str
    big_bytes: int
    bulk_min_s: float  # a: repeat the big download (new connection each) at least this long
    par_clients: int
    par_rounds: int
    lat_n: int
    lat_cap_s: float
    rps_conns: int
    rps_seconds: float


PROFILES = {
    "full": Profile("full", 256 * MIB, 3.0, 64, 16, 2000, 30.0, 50, 5.0),
    "quick": Profile("quick", 256 * MIB, 1.0, 64, 4, 1000, 10.0, 50, 3.0),
    "smoke": Profile("smoke", 2 * MIB, 0.0, 8, 2, 20, 5.0, 10, 1.0),
}


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation), like most latency tools report."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def write_docroot(docroot: Path, big_bytes: int) -> None:
    """Random (incompressible) files: big.bin, mid.bin (1 MiB), tiny.bin (100 bytes)."""
    docroot.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MIB)
    with open(docroot / "big.bin", "wb") as big:
        written = 0
        while written < big_bytes:
            piece = block[: big_bytes - written]
            big.write(piece)
            written += len(piece)
    (docroot / "mid.bin").write_bytes(os.urandom(MID_BYTES))
    (docroot / "tiny.bin").write_bytes(os.urandom(TINY_BYTES))


# --------------------------------------------------------------------------- Python origin


class PythonOrigin:
    """A small threaded HTTP/1.1 origin: keep-alive, Content-Length, sendfile for plain HTTP.

    Runs in its own process (``--origin-process``) so it never competes with the bench's
    clients for the GIL; bodies are mmapped once and never copied in Python.
    """

    def __init__(self, docroot: Path, tls: ssl.SSLContext | None) -> None:
        self.tls = tls
        self.files: dict[str, tuple[int, mmap.mmap]] = {}
        for path in sorted(docroot.iterdir()):
            fd = os.open(path, os.O_RDONLY)
            size = os.fstat(fd).st_size
            self.files["/" + path.name] = (fd, mmap.mmap(fd, size, prot=mmap.PROT_READ))
        self.listener = socket.create_server((LOOPBACK, 0), backlog=1024)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def serve_forever(self) -> None:
        while True:
            sock, _ = self.listener.accept()
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        sock: socket.socket = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(raw, server_side=True)
            pending = b""
            while True:
                end = pending.find(b"\r\n\r\n")
                if end < 0:
                    if len(pending) > HEAD_LIMIT:
                        return
                    data = sock.recv(HEAD_LIMIT)
                    if not data:
                        return
                    pending += data
                    continue
                head, pending = pending[:end], pending[end + 4 :]
                if not self._answer(sock, head):
                    return
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _answer(self, sock: socket.socket, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            return False
        method, target = parts[0], parts[1].decode("latin-1")
        if target.startswith("http://"):
            target = "/" + target.split("/", 3)[-1]
        keep_alive = not any(line.lower() == b"connection: close" for line in lines[1:])
        entry = self.files.get(target.split("?", 1)[0])
        if entry is None:
            sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return keep_alive
        fd, body = entry
        size = len(body)
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            + f"Content-Length: {size}\r\n".encode()
            + (b"" if keep_alive else b"Connection: close\r\n")
            + b"\r\n"
        )
        if method == b"HEAD":
            return keep_alive
        if self.tls is None:
            offset = 0
            while offset < size:
                sent = os.sendfile(sock.fileno(), fd, offset, size - offset)
                if sent == 0:
                    return False
                offset += sent
        else:
            view = memoryview(body)
            for start in range(0, size, RECV_BLOCK):
                sock.sendall(view[start : start + RECV_BLOCK])
        return keep_alive


def run_origin_process(docroot: Path, cert: Path, key: Path) -> int:
    """``--origin-process``: serve HTTP and HTTPS, print both ports, run until killed."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.minimum_version = ssl.TLSVersion.TLSv1_3
    tls.options |= ssl.OP_NO_TICKET
    tls.load_cert_chain(str(cert), str(key))
    plain, secure = PythonOrigin(docroot, None), PythonOrigin(docroot, tls)
    threading.Thread(target=secure.serve_forever, daemon=True).start()
    print(f"ports {plain.port} {secure.port}", flush=True)
    plain.serve_forever()
    return 0


# --------------------------------------------------------------------------- origins


@dataclass
class Origin:
    kind: str
    http_port: int
    https_port: int
    process: subprocess.Popen[bytes]


def nginx_binary() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def start_nginx(binary: str, work: Path, docroot: Path, cert: Path, key: Path) -> Origin:
    http_port, https_port = free_port(), free_port()
    prefix = work / "nginx"
    prefix.mkdir()
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "".join(
        f"    {name}_temp_path {prefix / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"{user}worker_processes 1;\npid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "    access_log off;\n    sendfile on;\n    tcp_nopush on;\n    tcp_nodelay on;\n"
        "    keepalive_requests 1000000;\n    keepalive_timeout 300s;\n"
        "    default_type application/octet-stream;\n"
        f"{temp}"
        f"    server {{ listen {LOOPBACK}:{http_port} backlog=1024; root {docroot}; }}\n"
        f"    server {{ listen {LOOPBACK}:{https_port} ssl backlog=1024; root {docroot};\n"
        f"             ssl_certificate {cert}; ssl_certificate_key {key};\n"
        "             ssl_protocols TLSv1.3; ssl_session_tickets off; ssl_session_cache off; }\n"
        "}\n"
    )
    with open(work / "nginx.log", "wb") as log_file:  # the child keeps its own copy
        process = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    origin = Origin("nginx", http_port, https_port, process)
    for port in (http_port, https_port):
        wait_port(port, [process], 10.0, work / "nginx.log")
    return origin


def start_python_origin(work: Path, docroot: Path, cert: Path, key: Path) -> Origin:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--origin-process",
        str(docroot),
        str(cert),
        str(key),
    ]
    with open(work / "origin.log", "wb") as log_file:  # the child keeps its own copy
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file, cwd=REPO
        )
    assert process.stdout is not None
    with process.stdout:  # it prints one line: the two ports
        line = process.stdout.readline().decode()
    match = re.fullmatch(r"ports (\d+) (\d+)\s*", line)
    if match is None:
        stop_process(process)
        raise BenchError(f"the Python origin did not start: {(work / 'origin.log').read_text()[-2000:]}")
    return Origin("python", int(match.group(1)), int(match.group(2)), process)


# --------------------------------------------------------------------------- processes


def wait_port(port: int, processes: list[subprocess.Popen[bytes]], timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise BenchError(f"process exited ({process.returncode}): {tail(log_path)}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1.0):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on {LOOPBACK}:{port} after {timeout:g} s: {tail(log_path)}")


def tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after a grace period; by pid, only our own children."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5.0)


@dataclass
class FluidityStack:
    """The tunnel server and the agent as child processes, started with the project's CLIs."""

    work: Path
    pki: Path
    server_extra: list[str]
    agent_extra: list[str]
    tunnel_port: int = 0
    proxy_port: int = 0
    server: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None

    def server_command(self) -> list[str]:
        pki = self.pki
        return [
            sys.executable, "-m", "server.main",
            "--config", str(self.work / "empty.yaml"),
            "--listen-address", LOOPBACK, "--listen-port", str(self.tunnel_port),
            "--ca-file", str(pki / "ca.crt"), "--cert-file", str(pki / "server.crt"),
            "--key-file", str(pki / "server.key"),
            "--allow-networks", "127.0.0.0/8",
            "--no-emit-metrics", "--shutdown-grace", "1s", "--log-level", "warning",
            *self.server_extra,
        ]  # fmt: skip

    def agent_command(self) -> list[str]:
        pki = self.pki
        return [
            sys.executable, "-m", "desktop.agent_cli",
            "--config", str(self.work / "empty.yaml"),
            "--lifecycle", "static", "--no-kill-on-disconnect",
            "--server-address", LOOPBACK, "--server-port", str(self.tunnel_port),
            "--server-name", "fluidity-server",
            "--listen-address", LOOPBACK, "--listen-port", str(self.proxy_port),
            "--ca-file", str(pki / "ca.crt"), "--cert-file", str(pki / "client.crt"),
            "--key-file", str(pki / "client.key"),
            "--bypass", "",  # the origin is on loopback: measure it through the tunnel
            "--log-level", "warning",
            *self.agent_extra,
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> None:
        (self.work / "empty.yaml").write_text("{}\n")
        env = without_settings_env()
        env["PYTHONUNBUFFERED"] = "1"
        self.tunnel_port, self.proxy_port = free_port(), free_port()
        server_log, agent_log = self.work / "server.log", self.work / "agent.log"
        self.server = self._spawn(self.server_command(), server_log, env)
        wait_port(self.tunnel_port, [self.server], timeout, server_log)
        self.agent = self._spawn(self.agent_command(), agent_log, env)
        wait_port(self.proxy_port, [self.agent, self.server], timeout, agent_log)

    @staticmethod
    def _spawn(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(log_path, "wb") as log_file:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        for process in (self.agent, self.server):
            if process is not None:
                stop_process(process)


# --------------------------------------------------------------------------- /proc


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PeakRss:
    """Samples VmRSS of some processes in the background and keeps the highest value seen."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak_kib = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                self.peak_kib[name] = max(self.peak_kib[name], proc_rss_kib(pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# --------------------------------------------------------------------------- HTTP client


@dataclass(frozen=True)
class Route:
    """How a client reaches the origin: direct, or through an HTTP proxy on ``proxy_port``."""

    name: str
    origin_http: int
    origin_https: int
    proxy_port: int | None
    tls: ssl.SSLContext

    def http_request(self, path: str) -> bytes:
        host = f"{LOOPBACK}:{self.origin_http}"
        target = f"http://{host}{path}" if self.proxy_port is not None else path
        return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    def open_http(self) -> socket.socket:
        port = self.proxy_port if self.proxy_port is not None else self.origin_http
        sock = socket.create_connection((LOOPBACK, port), timeout=30.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def open_https(self) -> tuple[ssl.SSLSocket, float, float]:
        """A TLS connection to the HTTPS origin; returns it with the CONNECT->200 and TLS times."""
        started = time.perf_counter()
        if self.proxy_port is None:
            sock = socket.create_connection((LOOPBACK, self.origin_https), timeout=30.0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = socket.create_connection((LOOPBACK, self.proxy_port), timeout=30.0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = f"{LOOPBACK}:{self.origin_https}"
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            reader = ResponseReader(sock, 4096)
            status, _ = reader.read_head()
            if status != 200 or reader.pending:
                sock.close()
                raise BenchError(f"CONNECT {target} answered {status}")
        connected = time.perf_counter()
        tls_sock = self.tls.wrap_socket(sock, server_hostname=LOOPBACK)
        return tls_sock, connected - started, time.perf_counter() - connected


class ResponseReader:
    """Reads Content-Length responses from one connection into one reused buffer."""

    def __init__(self, sock: socket.socket, block: int = RECV_BLOCK) -> None:
        self.sock = sock
        self.buffer = bytearray(block)
        self.view = memoryview(self.buffer)
        self.pending = b""

    def read_head(self) -> tuple[int, int]:
        """(status, content length); body bytes read along stay in ``pending``."""
        data = self.pending
        while (end := data.find(b"\r\n\r\n")) < 0:
            if len(data) > HEAD_LIMIT:
                raise BenchError("response head too large")
            received = self.sock.recv_into(self.buffer, min(len(self.buffer), HEAD_LIMIT))
            if not received:
                raise ConnectionError("connection closed before a response head")
            data += self.view[:received]
        head, self.pending = data[:end], data[end + 4 :]
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, length

    def read_body(self, length: int) -> None:
        remaining = length - len(self.pending)
        if remaining < 0:
            raise BenchError("response longer than its Content-Length (pipelining is not used)")
        self.pending = b""
        buffer, recv_into = self.buffer, self.sock.recv_into
        while remaining:
            received = recv_into(buffer, min(remaining, len(buffer)))
            if not received:
                raise ConnectionError(f"connection closed with {remaining} body bytes missing")
            remaining -= received

    def get(self, request: bytes) -> int:
        """Send one GET and read the whole 200 response; returns the body size."""
        self.sock.sendall(request)
        status, length = self.read_head()
        if status != 200:
            raise BenchError(f"origin answered {status}")
        self.read_body(length)
        return length


# --------------------------------------------------------------------------- workloads


def bulk_download(route: Route, *, https: bool, min_seconds: float) -> list[float]:
    """a: MB/s (10^6 B/s) of whole downloads of big.bin, one new connection each, repeated
    until ``min_seconds`` have passed (at least once) so fast routes are not one noisy sample."""
    speeds: list[float] = []
    deadline = time.monotonic() + min_seconds
    while not speeds or time.monotonic() < deadline:
        if https:
            sock: socket.socket = route.open_https()[0]
            request = f"GET /big.bin HTTP/1.1\r\nHost: {LOOPBACK}:{route.origin_https}\r\n\r\n".encode()
        else:
            sock = route.open_http()
            request = route.http_request("/big.bin")
        with sock:
            reader = ResponseReader(sock)
            started = time.perf_counter()
            size = reader.get(request)
            elapsed = time.perf_counter() - started
        speeds.append(size / elapsed / 1e6)
    return speeds


def parallel_downloads(route: Route, clients: int, rounds: int) -> dict[str, float]:
    """b: ``clients`` keep-alive connections each fetch mid.bin ``rounds`` times at once."""
    request = route.http_request("/mid.bin")
    barrier = threading.Barrier(clients + 1)
    totals = [0] * clients
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            sock = route.open_http()
            barrier.wait()
            reader = ResponseReader(sock)
            done = 0
            while done < rounds:
                try:
                    totals[index] += reader.get(request)
                    done += 1
                except ConnectionError:  # the proxy closed a kept-alive connection: reopen
                    sock.close()
                    sock = route.open_http()
                    reader = ResponseReader(sock)
            sock.close()
        except BaseException as exc:  # reported after the join
            errors.append(exc)
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise BenchError(f"parallel downloads failed: {errors[0]!r}")
    return {"mbps": sum(totals) / elapsed / 1e6, "bytes": float(sum(totals)), "seconds": elapsed}


def connect_latency(route: Route, count: int, cap_s: float) -> dict[str, Any]:
    """c: per new connection, CONNECT->200 and CONNECT->first byte of GET /tiny.bin over TLS."""
    request = f"GET /tiny.bin HTTP/1.1\r\nHost: {LOOPBACK}:{route.origin_https}\r\nConnection: close\r\n\r\n"
    raw = request.encode()
    to_200: list[float] = []
    to_first_byte: list[float] = []
    deadline = time.monotonic() + cap_s
    while len(to_200) < count and time.monotonic() < deadline:
        started = time.perf_counter()
        sock, connect_s, _ = route.open_https()
        with sock:
            sock.sendall(raw)
            reader = ResponseReader(sock, 4096)
            first = sock.recv_into(reader.buffer)
            first_byte_s = time.perf_counter() - started
            if not first:
                raise BenchError("origin closed before answering")
            reader.pending = bytes(reader.view[:first])
            status, length = reader.read_head()
            reader.read_body(length)
            if status != 200:
                raise BenchError(f"origin answered {status}")
        to_200.append(connect_s * 1000)
        to_first_byte.append(first_byte_s * 1000)
    return {
        "n": len(to_200),
        "connect_200_p50_ms": percentile(to_200, 50),
        "connect_200_p99_ms": percentile(to_200, 99),
        "first_byte_p50_ms": percentile(to_first_byte, 50),
        "first_byte_p99_ms": percentile(to_first_byte, 99),
    }


WRK_SCRIPT = """
wrk.method = "GET"
wrk.path = "{path}"
wrk.headers["Host"] = "{host}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def requests_per_second_wrk(route: Route, wrk: str, conns: int, seconds: float, work: Path) -> dict[str, Any]:
    """d with wrk (1 thread): absolute-form requests to the proxy, origin-form when direct."""
    host = f"{LOOPBACK}:{route.origin_http}"
    path = f"http://{host}/tiny.bin" if route.proxy_port is not None else "/tiny.bin"
    script = work / f"wrk-{route.name}.lua"
    script.write_text(WRK_SCRIPT.format(path=path, host=host))
    port = route.proxy_port if route.proxy_port is not None else route.origin_http
    result = subprocess.run(
        [wrk, "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(script),
         f"http://{LOOPBACK}:{port}/"],
        capture_output=True, text=True, timeout=seconds + 30, check=False,
    )  # fmt: skip
    match = re.search(r"WRKJSON (\{.*\})", result.stdout)
    if match is None:
        raise BenchError(f"wrk failed ({result.returncode}): {result.stderr or result.stdout}")
    summary = json.loads(match.group(1))
    failed = summary["status"] + summary["timeout"] + summary["connect"] + summary["write"]
    return {
        "rps": summary["requests"] / (summary["duration_us"] / 1e6),
        "requests": summary["requests"],
        "failed": failed,
        "closed_by_proxy": summary["read"],
        "tool": "wrk",
    }


def requests_per_second_python(route: Route, conns: int, seconds: float) -> dict[str, Any]:
    """d without wrk: ``conns`` threads, one keep-alive connection each (GIL-bound: a floor)."""
    request = route.http_request("/tiny.bin")
    counts = [0] * conns
    failures = [0] * conns
    barrier = threading.Barrier(conns + 1)
    stop = threading.Event()

    def client(index: int) -> None:
        sock = route.open_http()
        reader = ResponseReader(sock, 4096)
        barrier.wait()
        while not stop.is_set():
            try:
                reader.get(request)
                counts[index] += 1
            except (OSError, BenchError):
                failures[index] += 1
                sock.close()
                sock = route.open_http()
                reader = ResponseReader(sock, 4096)
        sock.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(conns)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(30.0)
    elapsed = time.perf_counter() - started
    return {
        "rps": sum(counts) / elapsed,
        "requests": sum(counts),
        "failed": sum(failures),
        "closed_by_proxy": 0,
        "tool": "python",
    }


# --------------------------------------------------------------------------- profiling hook


SPY_SUFFIX = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}


@contextlib.contextmanager
def py_spy(out_dir: Path | None, label: str, pids: dict[str, int], fmt: str, native: bool) -> Iterator[None]:
    """With ``--py-spy DIR``: record each Fluidity process during a workload (it skews the numbers).

    Without ``native`` py-spy samples without pausing the process; native (C) frames need it paused.
    """
    if out_dir is None:
        yield
        return
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(binary).exists():
        raise BenchError("--py-spy needs the py-spy program (pip install py-spy)")
    out_dir.mkdir(parents=True, exist_ok=True)
    recorders: list[tuple[Path, Path, subprocess.Popen[bytes]]] = []
    for name, pid in pids.items():
        output = out_dir / f"{label}-{name}.{SPY_SUFFIX[fmt]}"
        errors = out_dir / f"{label}-{name}.log"
        command = [binary, "record", "--pid", str(pid), "--rate", "250", "--threads"]
        command += ["--native"] if native else ["--nonblocking"]
        command += ["--format", fmt, "--output", str(output)]
        with open(errors, "wb") as error_log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=error_log, stderr=error_log)
        recorders.append((output, errors, process))
    time.sleep(0.5)  # let py-spy attach before the load starts
    try:
        yield
    finally:
        for _, _, process in recorders:
            process.send_signal(signal.SIGINT)
        for output, errors, process in recorders:
            try:
                process.wait(30.0)
            except subprocess.TimeoutExpired:
                process.kill()
            if not output.exists():
                log(f"py-spy wrote no {output.name}: {tail(errors, 500)}")


# --------------------------------------------------------------------------- the run


@dataclass
class Metric:
    label: str
    unit: str
    direct: float | None
    fluidity: float | None
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.direct is None or self.fluidity is None or self.direct == 0:
            return None
        return self.fluidity / self.direct


@dataclass
class Results:
    meta: dict[str, Any]
    metrics: dict[str, Metric] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "metrics": {key: {**asdict(m), "ratio": m.ratio} for key, m in self.metrics.items()},
            "samples": self.samples,
        }


class Bench:
    def __init__(self, args: argparse.Namespace, profile: Profile, work: Path) -> None:
        self.args = args
        self.profile = profile
        self.work = work
        self.workloads = set(args.workloads.split(","))
        self.spy_dir: Path | None = args.py_spy

    def run(self) -> Results:
        profile, work = self.profile, self.work
        pki = work / "pki"
        ensure_certificates(pki)
        log(f"writing the docroot ({profile.big_bytes // MIB} MiB file)")
        docroot = work / "docroot"
        write_docroot(docroot, profile.big_bytes)
        origin = self._start_origin(docroot, pki)
        stack = FluidityStack(work, pki, self.args.server_arg or [], self.args.agent_arg or [])
        try:
            log(f"origin {origin.kind} on :{origin.http_port} (http) and :{origin.https_port} (https)")
            stack.start()
            assert stack.server is not None and stack.agent is not None
            tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            direct = Route("direct", origin.http_port, origin.https_port, None, tls)
            tunnel = Route("fluidity", origin.http_port, origin.https_port, stack.proxy_port, tls)
            self._warm_up(tunnel)
            pids = {"agent": stack.agent.pid, "server": stack.server.pid}
            results = Results(self._meta(origin, stack))
            return self._measure(results, direct, tunnel, pids)
        finally:
            stack.stop()
            stop_process(origin.process)

    def _start_origin(self, docroot: Path, pki: Path) -> Origin:
        choice = self.args.origin
        binary = nginx_binary()
        if choice == "nginx" and binary is None:
            raise BenchError("--origin nginx: nginx is not installed")
        if choice in ("auto", "nginx") and binary is not None:
            return start_nginx(binary, self.work, docroot, pki / "server.crt", pki / "server.key")
        return start_python_origin(self.work, docroot, pki / "server.crt", pki / "server.key")

    @staticmethod
    def _warm_up(tunnel: Route) -> None:
        deadline = time.monotonic() + 30.0
        while True:  # the agent answers 502 until its tunnel is up; request_wait covers most of it
            try:
                with tunnel.open_http() as sock:
                    ResponseReader(sock, 4096).get(tunnel.http_request("/tiny.bin"))
                break
            except (OSError, BenchError) as exc:
                if time.monotonic() > deadline:
                    raise BenchError(f"no answer through the tunnel: {exc}") from None
                time.sleep(0.2)
        with tunnel.open_http() as sock:
            reader = ResponseReader(sock, 4096)
            for _ in range(20):
                reader.get(tunnel.http_request("/tiny.bin"))
        for _ in range(5):
            sock, _, _ = tunnel.open_https()
            sock.close()

    def _meta(self, origin: Origin, stack: FluidityStack) -> dict[str, Any]:
        wrk = shutil.which("wrk")
        rps_tool = "wrk" if wrk and self.args.rps_tool in ("auto", "wrk") else "python"
        self.rps_tool = rps_tool
        return {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "fluidity_version": __version__,
            "mode": self.profile.name,
            "profile": asdict(self.profile),
            "origin": origin.kind,
            "rps_tool": rps_tool,
            "python": platform.python_version(),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
            },
            "server_command": stack.server_command()[1:],
            "agent_command": stack.agent_command()[1:],
            "py_spy": str(self.spy_dir) if self.spy_dir else None,
            "workloads": sorted(self.workloads),
        }

    def _measure(self, results: Results, direct: Route, tunnel: Route, pids: dict[str, int]) -> Results:
        profile, metrics, samples = self.profile, results.metrics, results.samples
        efficiency: dict[str, Metric] = {}  # listed after the throughput and latency rows
        time.sleep(0.5)
        idle = {name: proc_rss_kib(pid) for name, pid in pids.items()}

        def cpu() -> float:
            return sum(proc_cpu_seconds(pid) for pid in pids.values())

        def both(label: str, work: Callable[[Route], Any]) -> tuple[Any, Any, float]:
            log(f"{label}: direct")
            direct_result = work(direct)
            log(f"{label}: fluidity")
            before = cpu()
            with py_spy(self.spy_dir, label, pids, self.args.py_spy_format, self.args.py_spy_native):
                tunnel_result = work(tunnel)
            return direct_result, tunnel_result, cpu() - before

        with PeakRss(pids) as peak:
            if "a" in self.workloads:
                mib = profile.big_bytes // MIB
                for https in (False, True):
                    kind = "https" if https else "http"
                    download = functools.partial(bulk_download, https=https, min_seconds=profile.bulk_min_s)
                    d, f, cpu_s = both(f"a-{kind}", download)
                    samples[f"a_{kind}"] = {"direct": d, "fluidity": f}
                    what = "HTTPS via CONNECT" if https else "HTTP"
                    metrics[f"a_{kind}_mbps"] = Metric(
                        f"a. 1 stream {mib} MiB {what}", "MB/s", statistics.median(d), statistics.median(f)
                    )
                    gigabytes = profile.big_bytes * len(f) / 1e9
                    efficiency[f"a_{kind}_cpu_per_gb"] = Metric(
                        f"a. agent+server CPU per GB, {kind}", "s", None, cpu_s / gigabytes, False
                    )
            if "b" in self.workloads:
                d, f, cpu_s = both(
                    "b", lambda r: parallel_downloads(r, profile.par_clients, profile.par_rounds)
                )
                samples["b"] = {"direct": d, "fluidity": f}
                metrics["b_parallel_mbps"] = Metric(
                    f"b. {profile.par_clients} parallel 1 MiB x{profile.par_rounds}",
                    "MB/s",
                    d["mbps"],
                    f["mbps"],
                )
            if "c" in self.workloads:
                d, f, _ = both("c", lambda r: connect_latency(r, profile.lat_n, profile.lat_cap_s))
                samples["c"] = {"direct": d, "fluidity": f}
                for key, label in (
                    ("connect_200_p50_ms", "CONNECT->200 p50"),
                    ("connect_200_p99_ms", "CONNECT->200 p99"),
                    ("first_byte_p50_ms", "CONNECT->first byte p50"),
                    ("first_byte_p99_ms", "CONNECT->first byte p99"),
                ):
                    metrics[f"c_{key}"] = Metric(f"c. {label} (n={f['n']})", "ms", d[key], f[key], False)
            if "d" in self.workloads:
                wrk = shutil.which("wrk")

                def rps(route: Route) -> dict[str, Any]:
                    if self.rps_tool == "wrk" and wrk is not None:
                        return requests_per_second_wrk(
                            route, wrk, profile.rps_conns, profile.rps_seconds, self.work
                        )
                    return requests_per_second_python(route, profile.rps_conns, profile.rps_seconds)

                d, f, cpu_s = both("d", rps)
                samples["d"] = {"direct": d, "fluidity": f}
                metrics["d_rps"] = Metric(
                    f"d. req/s c={profile.rps_conns} keep-alive ({self.rps_tool})",
                    "req/s",
                    d["rps"],
                    f["rps"],
                )
                metrics["d_failed"] = Metric("d. failed requests", "count", d["failed"], f["failed"], False)
                efficiency["d_cpu_per_request"] = Metric(
                    "d. agent+server CPU per request", "us", None, cpu_s / max(1, f["requests"]) * 1e6, False
                )
            end = {name: proc_rss_kib(pid) for name, pid in pids.items()}
        metrics.update(efficiency)
        for name in pids:
            metrics[f"e_{name}_rss_idle"] = Metric(
                f"e. {name} RSS idle", "MiB", None, idle[name] / 1024, False
            )
            metrics[f"e_{name}_rss_peak"] = Metric(
                f"e. {name} RSS peak under load", "MiB", None, peak.peak_kib[name] / 1024, False
            )
            metrics[f"e_{name}_rss_end"] = Metric(
                f"e. {name} RSS end of load", "MiB", None, end[name] / 1024, False
            )
        return results


# --------------------------------------------------------------------------- output


def format_number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def render_table(results: Results) -> str:
    rows = [("metric", "direct", "fluidity", "ratio")]
    for metric in results.metrics.values():
        ratio = metric.ratio
        rows.append(
            (
                f"{metric.label} ({metric.unit})",
                format_number(metric.direct),
                format_number(metric.fluidity),
                "n/a" if ratio is None else f"{ratio:.2f}x",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if index == 0:
            lines.append("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def default_out() -> Path:
    return REPO / "bench" / f"results-{datetime.date.today().isoformat()}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure Fluidity against going direct, on loopback (see the module docstring)."
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about a minute: one rep, fewer connections")
    size.add_argument(
        "--smoke", action="store_true", help="seconds: tiny sizes, only proves the script works"
    )
    parser.add_argument("--out", type=Path, help="JSON results file (default bench/results-<date>.json)")
    parser.add_argument("--origin", choices=("auto", "nginx", "python"), default="auto",
                        help="auto = nginx when installed, else the built-in Python origin")  # fmt: skip
    parser.add_argument("--rps-tool", choices=("auto", "wrk", "python"), default="auto",
                        help="d: auto = wrk when installed, else a threaded Python client")  # fmt: skip
    parser.add_argument("--workloads", default="a,b,c,d", help="subset of a,b,c,d (e is always measured)")
    parser.add_argument(
        "--server-arg",
        action="append",
        metavar="ARG",
        help="extra fluidity-server flag, e.g. --server-arg=--max-payload=262144",
    )
    parser.add_argument("--agent-arg", action="append", metavar="ARG", help="extra fluidity-agent flag")
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record py-spy flame graphs of agent and server, per workload, in DIR",
    )
    parser.add_argument(
        "--py-spy-format",
        choices=sorted(SPY_SUFFIX),
        default="flamegraph",
        help="flamegraph (.svg), raw (collapsed stacks, .txt) or speedscope (.json)",
    )
    parser.add_argument(
        "--py-spy-native", action="store_true", help="include C frames (pauses the processes while sampling)"
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary folder (logs, certs)")
    parser.add_argument(
        "--origin-process", nargs=3, metavar=("DOCROOT", "CERT", "KEY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    unknown = set(args.workloads.split(",")) - {"a", "b", "c", "d"}
    if unknown:
        parser.error(f"--workloads: unknown {sorted(unknown)}; choose from a,b,c,d")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.origin_process:
        docroot, cert, key = (Path(p) for p in args.origin_process)
        return run_origin_process(docroot, cert, key)
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    work = Path(tempfile.mkdtemp(prefix="fluidity-bench-"))
    started = time.monotonic()
    try:
        results = Bench(args, profile, work).run()
    except BenchError as exc:
        print(f"tunnel_bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep_work:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results.meta["seconds"] = round(time.monotonic() - started, 1)
    out = args.out or default_out()
    out.write_text(json.dumps(results.to_json(), indent=2) + "\n")
    print(render_table(results))
    log(f"{profile.name} run took {results.meta['seconds']} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
