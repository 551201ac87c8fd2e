"""The README's run command: `fluidity-local` starts server + agent, serves, stops on Ctrl+C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from test_tunnel_smoke import hello_origin  # noqa: F401  (fixture)
from tunnel_fixtures import REPO, clean_env, free_port


def _wait_for_line(process: subprocess.Popen[str], needle: str, timeout: float, seen: list[str]) -> None:
    deadline = time.monotonic() + timeout
    assert process.stderr is not None
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} not printed; output: {''.join(seen)[-3000:]}")


def test_fluidity_local_runs_serves_and_stops_cleanly(tmp_path: Path, hello_origin: str) -> None:  # noqa: F811
    cert_dir = tmp_path / "certs"
    proxy_port, server_port = free_port(), free_port()
    env = clean_env()
    env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "desktop.local_default",
            "--listen-port", str(proxy_port),
            "--server-port", str(server_port),
            "--ca-file", str(cert_dir / "ca.crt"),
            "--cert-file", str(cert_dir / "client.crt"),
            "--key-file", str(cert_dir / "client.key"),
        ],
        cwd=tmp_path,  # no configs/ here: built-in defaults
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    seen: list[str] = []
    try:
        _wait_for_line(process, "Press Ctrl+C to stop both", 30, seen)
        output = "".join(seen)
        assert f"curl -x http://127.0.0.1:{proxy_port}" in output
        assert "Connected to server in" in output
        for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key"):
            assert (cert_dir / name).is_file(), name
        assert (cert_dir / "client.key").stat().st_mode & 0o777 == 0o600

        result = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "-x", f"http://127.0.0.1:{proxy_port}",
             f"{hello_origin}/local"],
            capture_output=True, env=clean_env(), timeout=20, check=False,
        )  # fmt: skip
        assert result.stdout == b"hello /local", result.stderr

        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=40)
        seen.append(rest)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 0, "".join(seen)[-3000:]
    output = "".join(seen)
    assert '"message": "stopped"' in output and '"drained": true' in output  # the server shut down gracefully
    assert '"message": "local server stopped", "exit_code": 0' in output
    # Nothing is left listening on either port.
    for port in (proxy_port, server_port):
        probe = subprocess.run(
            ["curl", "-s", "--max-time", "2", f"http://127.0.0.1:{port}/"], capture_output=True, check=False
        )
        assert probe.returncode == 7, f"port {port} still answers"


def test_agent_reports_a_config_error_naming_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("listen_prot: 8080\n")
    result = subprocess.run(
        [sys.executable, "-m", "desktop.agent_cli", "--config", str(config)],
        capture_output=True, text=True, cwd=REPO, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert str(config) in result.stderr and "listen_prot" in result.stderr and "listen_port" in result.stderr
    assert "Traceback" not in result.stderr
