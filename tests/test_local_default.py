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


def _local_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in clean_env().items() if not k.startswith("FLUIDITY_")}
    env.update(PYTHONUNBUFFERED="1", XDG_DATA_HOME=str(tmp_path / "data"))
    return env


def _start_local(tmp_path: Path, *args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "desktop.local_default", *args],
        cwd=cwd,
        env=_local_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(process: subprocess.Popen[str], seen: list[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            _, rest = process.communicate(timeout=40)
            seen.append(rest)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=10)


def test_fluidity_local_runs_serves_and_stops_cleanly(tmp_path: Path, hello_origin: str) -> None:  # noqa: F811
    cert_dir = tmp_path / "certs"
    proxy_port, server_port = free_port(), free_port()
    process = _start_local(
        tmp_path,
        "--listen-port", str(proxy_port),
        "--server-port", str(server_port),
        "--ca-file", str(cert_dir / "ca.crt"),
        "--cert-file", str(cert_dir / "client.crt"),
        "--key-file", str(cert_dir / "client.key"),
        cwd=tmp_path,  # no configs/ here: built-in defaults
    )  # fmt: skip
    seen: list[str] = []
    try:
        _wait_for_line(process, "Fluidity proxy ready on", 30, seen)
        output = "".join(seen)
        # The how-to-use banner comes before any log line.
        assert output.startswith(f"Fluidity local default: tunnel server 127.0.0.1:{server_port}")
        assert output.index("Press Ctrl+C to stop both") < output.index('"level"')
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

    finally:
        _stop(process, seen)
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


def test_server_flags_reach_the_local_server_even_with_a_settings_file(
    tmp_path: Path,
    hello_origin: str,  # noqa: F811
) -> None:
    """A checkout's configs/agent.local.yaml names server.local.yaml (port 8443): the flags win."""
    configs, cert_dir = tmp_path / "configs", tmp_path / "certs"
    configs.mkdir()
    (configs / "server.local.yaml").write_text(
        'listen_address: 127.0.0.1\nlisten_port: 8443\nallow_networks: ["127.0.0.0/8"]\n'
        "ca_file: ../nowhere/ca.crt\ncert_file: ../nowhere/server.crt\nkey_file: ../nowhere/server.key\n"
    )
    (configs / "agent.local.yaml").write_text(
        "lifecycle: local\nlocal_server_config: server.local.yaml\nserver_port: 8443\n"
        'connection_timeout: "20s"\n'
    )
    proxy_port, server_port = free_port(), free_port()
    process = _start_local(
        tmp_path,
        "--server-port", str(server_port),
        "--listen-port", str(proxy_port),
        "--ca-file", str(cert_dir / "ca.crt"),
        "--cert-file", str(cert_dir / "client.crt"),
        "--key-file", str(cert_dir / "client.key"),
        cwd=tmp_path,  # configs/agent.local.yaml is read as in a checkout
    )  # fmt: skip
    seen: list[str] = []
    try:
        _wait_for_line(process, "Fluidity proxy ready on", 30, seen)
        output = "".join(seen)
        assert f'"address": "127.0.0.1:{server_port}"' in output  # the child listens where the agent dials
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "-x", f"http://127.0.0.1:{proxy_port}",
             f"{hello_origin}/flags"],
            capture_output=True, env=clean_env(), timeout=20, check=False,
        )  # fmt: skip
        assert result.stdout == b"hello /flags", result.stderr
    finally:
        _stop(process, seen)
    assert process.returncode == 0, "".join(seen)[-3000:]


def test_fluidity_local_offers_only_the_flags_it_uses() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "desktop.local_default", "--help"],
        capture_output=True, text=True, cwd=REPO, timeout=30, check=True,
    )  # fmt: skip
    help_text = result.stdout
    assert help_text.startswith("usage: fluidity-local [--config PATH] [--KEY-NAME VALUE ...]\n")
    assert "examples:\n  fluidity-local " in help_text
    for offered in ("--server-port", "--server-address", "--listen-port", "--ca-file", "--log-format"):
        assert offered in help_text
    for ignored in ("--lifecycle", "--api-url", "--api-key", "--aws-profile", "--monthly-budget"):
        assert ignored not in help_text
    assert "(default ;" not in help_text and "(env FLUIDITY_SERVER_ADDRESS)" in help_text
    rejected = subprocess.run(
        [sys.executable, "-m", "desktop.local_default", "--lifecycle", "lambda"],
        capture_output=True, text=True, cwd=REPO, timeout=30, check=False,
    )  # fmt: skip
    assert rejected.returncode == 2 and "unrecognized arguments: --lifecycle" in rejected.stderr


def test_a_local_server_that_cannot_listen_is_reported_once_with_the_address(tmp_path: Path) -> None:
    cert_dir = tmp_path / "certs"
    port = free_port()
    result = subprocess.run(
        [
            sys.executable, "-m", "desktop.local_default",
            "--server-address", "192.0.2.1", "--server-port", str(port),  # not an address of this machine
            "--listen-port", str(free_port()),
            "--ca-file", str(cert_dir / "ca.crt"),
            "--cert-file", str(cert_dir / "client.crt"),
            "--key-file", str(cert_dir / "client.key"),
        ],
        capture_output=True, text=True, cwd=tmp_path, env=_local_env(tmp_path), timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fluidity-local: the local server exited with code 2: cannot listen on 192.0.2.1:")
    assert last.count("cannot listen on") == 1 and f":{port}: " in last, last


def test_the_local_server_gets_the_agents_address_certificates_and_log_file(tmp_path: Path) -> None:
    from desktop.config import load_agent_config
    from desktop.lifecycle.local import LocalLifecycle

    settings = tmp_path / "agent.yaml"
    settings.write_text(
        "lifecycle: local\nlocal_server_config: server.local.yaml\nserver_address: 127.0.0.1\n"
        "server_port: 9443\nca_file: certs/ca.crt\n"
    )
    config = load_agent_config(settings, env={})
    command = LocalLifecycle(config, server_log=tmp_path / "logs" / "server.log").server_command()
    flags = command[command.index("--config") :]
    assert flags == [
        "--config", str(tmp_path / "server.local.yaml"),
        "--listen-address", "127.0.0.1", "--listen-port", "9443",
        "--ca-file", str(tmp_path / "certs" / "ca.crt"),
        "--cert-file", str(tmp_path / "certs" / "server.crt"),
        "--key-file", str(tmp_path / "certs" / "server.key"),
        "--log-file", str(tmp_path / "logs" / "server.log"),
    ]  # fmt: skip


def test_the_local_servers_last_words_are_its_error_line() -> None:
    from desktop.lifecycle.local import readable_line

    assert readable_line('{"level": "error", "message": "cannot listen on 127.0.0.1:8443: in use"}') == (
        "error",
        "cannot listen on 127.0.0.1:8443: in use",
    )
    assert readable_line("12:04:31 \x1b[1;31merror\x1b[0m cannot start: no key\n") == (
        "error",
        "cannot start: no key",
    )
    assert readable_line("fluidity-server: cannot start: no key") == ("plain", "cannot start: no key")
