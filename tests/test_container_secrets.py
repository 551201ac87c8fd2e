"""Certificates passed as ECS secrets reach the server as files, and the server runs on them."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tunnel_fixtures import REPO, Pki, ServerProcess, free_port

from server.config import ServerConfig
from server.config_loader import load, without_settings_env
from server.container_secrets import SecretError, write_pem_secrets


def _config(target: Path) -> ServerConfig:
    return load(
        ServerConfig,
        None,
        env={},
        overrides={
            "ca_file": target / "ca.crt",
            "cert_file": target / "server.crt",
            "key_file": target / "server.key",
        },
    )


def _secret_env(pki: Pki) -> dict[str, str]:
    return {
        "FLUIDITY_CA_CERT_PEM": pki.path("ca.crt").read_text(),
        "FLUIDITY_SERVER_CERT_PEM": pki.path("server.crt").read_text(),
        "FLUIDITY_SERVER_KEY_PEM": pki.path("server.key").read_text(),
    }


def test_secrets_become_files_with_a_private_key(pki: Pki, tmp_path: Path) -> None:
    written = write_pem_secrets(_config(tmp_path / "certs"), _secret_env(pki))
    assert [p.name for p in written] == ["ca.crt", "server.crt", "server.key"]
    assert (tmp_path / "certs" / "server.key").read_bytes() == pki.path("server.key").read_bytes()
    assert (tmp_path / "certs" / "server.key").stat().st_mode & 0o777 == 0o600
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "certs/ca.crt"), str(tmp_path / "certs/server.crt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and ": OK" in result.stdout


def test_a_secret_that_is_not_pem_is_named(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="FLUIDITY_SERVER_KEY_PEM"):
        write_pem_secrets(_config(tmp_path), {"FLUIDITY_SERVER_KEY_PEM": "arn:aws:secretsmanager:..."})


def test_server_process_starts_from_secret_variables(pki: Pki, tmp_path: Path) -> None:
    target = tmp_path / "etc"
    server = ServerProcess(
        [
            "--listen-address", "127.0.0.1",
            "--ca-file", str(target / "ca.crt"),
            "--cert-file", str(target / "server.crt"),
            "--key-file", str(target / "server.key"),
            "--no-emit-metrics",
        ],
        free_port(),
    )  # fmt: skip
    server.extra_env = _secret_env(pki)
    server.start()
    try:
        assert server.wait_for("certificates written from secrets")
        assert (target / "server.key").stat().st_mode & 0o777 == 0o600
    finally:
        server.signal(signal.SIGTERM)
        assert server.wait() == 0


def test_server_without_certificates_says_how_to_make_them(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.main", "--ca-file", str(tmp_path / "missing.crt"),
         "--listen-port", "0"],
        capture_output=True, text=True, cwd=REPO, env=without_settings_env(), timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "missing.crt does not exist" in result.stderr and "fluidity-certs init" in result.stderr
