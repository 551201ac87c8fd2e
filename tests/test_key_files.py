"""Certificate and key files the programs refuse at start-up, each with one line naming the file and the fix.

``fluidity-server`` and ``fluidity-agent`` run as child processes and their stderr is read:
a private key others can read is refused as OpenSSH does (POSIX), and a broken file says
which file it is, what was expected and how to regenerate it, never ``[SSL] PEM lib``.
The tray reaches the same refusal through the controller's error state.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tray_fixtures import wait_for_state
from tunnel_fixtures import REPO, Pki, agent_config, free_port, server_args

from desktop.certificates import (
    CLIENT_KEY,
    SERVER_KEY,
    generate_ca,
    issue_leaf,
    load_private_key,
    verify,
    write_private_key,
)
from desktop.controller import Controller, State
from desktop.lifecycle.static import StaticLifecycle
from server.config_loader import without_settings_env
from server.tls import key_file_problem

pytestmark = pytest.mark.timeout(60)
posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
#: Every refusal happens before anything listens or dials, so the programs exit at once.
EXIT_WITHIN = 30.0


@pytest.fixture
def certs(pki: Pki, tmp_path: Path) -> Path:
    """A private copy of the session's certificates that a test may break."""
    folder = tmp_path / "certs"
    shutil.copytree(pki.dir, folder)
    return folder


def child_env(tmp_path: Path) -> dict[str, str]:
    env = without_settings_env()
    env.update(PYTHONUNBUFFERED="1", HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"))
    return env


def run_server(certs: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    args = server_args(Pki(certs), "--listen-port", str(free_port()))
    return subprocess.run(
        [sys.executable, "-m", "server.main", *args],
        cwd=REPO,
        env=child_env(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXIT_WITHIN,
    )


def run_agent(certs: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [
        "--ca-file", str(certs / "ca.crt"),
        "--cert-file", str(certs / "client.crt"),
        "--key-file", str(certs / "client.key"),
        "--listen-port", "0",
        "--server-address", "127.0.0.1",
        "--server-port", str(free_port()),
        "--connection-timeout", "10s",
        "--connect-timeout", "1s",
        *extra,
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "desktop.agent_cli", *args],
        cwd=REPO,
        env=child_env(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXIT_WITHIN,
    )


def refusal(result: subprocess.CompletedProcess[str], program: str) -> str:
    """The one plain line the program printed for the user (the server also logs JSON lines)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "PEM lib" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{program}: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# --------------------------------------------------------------------------- key permissions


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_server_refuses_a_key_others_can_read(certs: Path, tmp_path: Path, mode: int) -> None:
    key = certs / SERVER_KEY
    os.chmod(key, mode)
    line = refusal(run_server(certs, tmp_path), "fluidity-server")
    assert line == (
        f"fluidity-server: key_file {key} can be read by other users (mode {mode:04o}); run: chmod 600 {key}"
    )


@posix_only
def test_agent_refuses_a_key_others_can_read_before_waking_anything(certs: Path, tmp_path: Path) -> None:
    key = certs / CLIENT_KEY
    os.chmod(key, 0o644)
    with socket.socket() as control_plane:  # a Wake API that records whether anyone called it
        control_plane.bind(("127.0.0.1", 0))
        control_plane.listen()
        control_plane.setblocking(False)
        url = f"http://127.0.0.1:{control_plane.getsockname()[1]}/prod"
        result = run_agent(certs, tmp_path, "--lifecycle", "lambda", "--api-url", url, "--api-key", "k" * 40)
        with pytest.raises(BlockingIOError):
            control_plane.accept()
    line = refusal(result, "fluidity-agent")
    assert (
        line == f"fluidity-agent: key_file {key} can be read by other users (mode 0644); run: chmod 600 {key}"
    )


@posix_only
def test_owner_only_modes_are_accepted_and_the_rule_is_shared_with_verify(certs: Path) -> None:
    key = certs / CLIENT_KEY
    for mode in (0o600, 0o400):
        os.chmod(key, mode)
        assert key_file_problem(key) is None
    os.chmod(key, 0o620)
    problem = key_file_problem(key)
    assert problem == f"{key} can be changed by other users (mode 0620); run: chmod 600 {key}"
    assert verify(certs) == [problem]  # fluidity-certs verify reports exactly what start-up refuses


@posix_only
def test_the_tray_shows_the_refusal_as_its_error_state(pki: Pki, certs: Path) -> None:
    """The tray drives the same controller; a too-open key ends in ERROR with the same line."""
    key = certs / CLIENT_KEY
    os.chmod(key, 0o644)
    config = agent_config(
        pki,
        free_port(),
        lifecycle="static",
        listen_port=free_port(),
        ca_file=certs / "ca.crt",
        cert_file=certs / "client.crt",
        key_file=key,
    )
    controller = Controller(config, StaticLifecycle(config), monitor_interval=0.1)
    try:
        controller.connect()
        snap = wait_for_state(controller, State.ERROR)
    finally:
        assert controller.shutdown(30)
    assert snap.error == f"key_file {key} can be read by other users (mode 0644); run: chmod 600 {key}"


# --------------------------------------------------------------------------- broken files


GARBAGE_CERT = b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
Breaker = Callable[[Path], None]


def _not_pem(path: Path) -> None:
    path.write_bytes(b"hello, I am not a certificate\n")


def _damaged_certificate(path: Path) -> None:
    path.write_bytes(GARBAGE_CERT)


def _damaged_key(path: Path) -> None:
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def _foreign_key(path: Path) -> None:
    write_private_key(path, issue_leaf(generate_ca("Other CA"), "client", "someone").private_key, force=True)


def _passphrase_key(path: Path) -> None:
    """A good key, encrypted: OpenSSL would prompt for the passphrase on the terminal."""
    key = load_private_key(path)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path.write_bytes(encrypted)


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _missing(path: Path) -> None:
    path.unlink()


#: (how to break it, which file ({leaf} = server or client), what the one line must say).
BROKEN = {
    "cert-not-pem": (
        _not_pem,
        "{leaf}.crt",
        [
            "cert_file {path} is not a PEM certificate (-----BEGIN CERTIFICATE-----)",
            "fluidity-certs init --dir {dir}",
        ],
    ),
    "cert-damaged": (
        _damaged_certificate,
        "{leaf}.crt",
        ["cert_file {path} holds a damaged certificate", "fluidity-certs init --dir {dir}"],
    ),
    "key-not-pem": (
        _not_pem,
        "{leaf}.key",
        [
            "key_file {path} is not a PEM private key (-----BEGIN PRIVATE KEY-----)",
            "fluidity-certs renew --dir {dir}",
        ],
    ),
    "key-damaged": (
        _damaged_key,
        "{leaf}.key",
        ["key_file {path} holds a damaged private key", "fluidity-certs renew --dir {dir}"],
    ),
    "key-mismatch": (
        _foreign_key,
        "{leaf}.key",
        ["key_file {path} does not match cert_file {dir}/{leaf}.crt", "fluidity-certs renew --dir {dir}"],
    ),
    "key-passphrase": (
        _passphrase_key,
        "{leaf}.key",
        ["key_file {path} is protected by a passphrase", "fluidity-certs renew --dir {dir}"],
    ),
    "ca-damaged": (
        _damaged_certificate,
        "ca.crt",
        ["ca_file {path} holds a damaged certificate", "fluidity-certs init --force --dir {dir}"],
    ),
    "ca-not-pem": (
        _not_pem,
        "ca.crt",
        ["ca_file {path} is not a PEM certificate (-----BEGIN CERTIFICATE-----)"],
    ),
    "key-is-a-folder": (_folder, "{leaf}.key", ["key_file {path} is not a file", "a PEM private key"]),
    "cert-missing": (
        _missing,
        "{leaf}.crt",
        ["cert_file {path} does not exist", "fluidity-certs init --dir {dir}"],
    ),
}
FOR_THE_AGENT = ("key-not-pem", "key-mismatch", "key-passphrase", "ca-damaged")


def break_file(certs: Path, case: str, leaf: str) -> list[str]:
    """Break one file as ``case`` says; returns the fragments the refusal must contain."""
    breaker, name, fragments = BROKEN[case]
    path = certs / name.format(leaf=leaf)
    breaker(path)
    return [fragment.format(path=path, dir=certs, leaf=leaf) for fragment in fragments]


@pytest.mark.parametrize("case", BROKEN)
def test_server_names_the_broken_file_and_how_to_regenerate_it(
    certs: Path, tmp_path: Path, case: str
) -> None:
    fragments = break_file(certs, case, "server")
    line = refusal(run_server(certs, tmp_path), "fluidity-server")
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("case", FOR_THE_AGENT)
def test_agent_names_the_broken_file_and_how_to_regenerate_it(certs: Path, tmp_path: Path, case: str) -> None:
    fragments = break_file(certs, case, "client")
    line = refusal(run_agent(certs, tmp_path, "--lifecycle", "static"), "fluidity-agent")
    for fragment in fragments:
        assert fragment in line, line


@posix_only
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_an_unreadable_file_says_so(certs: Path, tmp_path: Path) -> None:
    cert = certs / "server.crt"
    os.chmod(cert, 0)
    line = refusal(run_server(certs, tmp_path), "fluidity-server")
    assert f"cannot read cert_file {cert}: Permission denied" in line
