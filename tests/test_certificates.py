"""Certificates made by desktop.certificates, checked by the openssl binary and a real mTLS handshake."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from desktop import certificates as certs
from desktop.certificates import (
    CA_CERT,
    CA_KEY,
    CLIENT_CERT,
    CLIENT_KEY,
    SERVER_CERT,
    SERVER_KEY,
    SERVER_TLS_NAME,
    CertificateError,
    IssuedCertificate,
    ensure_certificates,
    import_bundle,
    issue_leaf,
    load_certificate,
    load_private_key,
    main,
    verify,
    write_certificate,
    write_private_key,
)

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl binary is not installed")
posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
KEY_FILES = (CA_KEY, SERVER_KEY, CLIENT_KEY)


# --------------------------------------------------------------------------- shared test pieces


@pytest.fixture
def cert_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    assert ensure_certificates(directory) is True
    return directory


def cli(*args: str | Path) -> int:
    return main([str(arg) for arg in args])


def openssl_verify(
    directory: Path, cert: str, purpose: str | None = None
) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    command = [OPENSSL, "verify", "-CAfile", str(directory / CA_CERT)]
    if purpose:
        command += ["-purpose", purpose]
    return subprocess.run(
        [*command, str(directory / cert)], capture_output=True, text=True, timeout=20, check=False
    )


def load_ca(directory: Path) -> IssuedCertificate:
    key = load_private_key(directory / CA_KEY)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return IssuedCertificate(load_certificate(directory / CA_CERT), key)


def replace_pair(directory: Path, cert_name: str, key_name: str, issued: IssuedCertificate) -> None:
    write_certificate(directory / cert_name, issued.certificate, force=True)
    write_private_key(directory / key_name, issued.private_key, force=True)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sans(path: Path) -> x509.SubjectAlternativeName:
    return load_certificate(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def make_folder_bundle(source: Path, folder: Path, names: tuple[str, ...]) -> Path:
    folder.mkdir()
    for name in names:
        shutil.copy(source / name, folder / name)
    return folder


@dataclass
class HandshakeResult:
    version: str | None = None
    echoed: str | None = None
    peer_cn: str | None = None
    server_error: BaseException | None = None


def mtls_exchange(server_files: Path, client_files: Path, server_hostname: str) -> HandshakeResult:
    """Run one TLS 1.3 mTLS exchange on 127.0.0.1: the server echoes the client's CN."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.load_cert_chain(server_files / SERVER_CERT, server_files / SERVER_KEY)
    server_ctx.load_verify_locations(server_files / CA_CERT)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(client_files / CA_CERT))
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client_ctx.load_cert_chain(client_files / CLIENT_CERT, client_files / CLIENT_KEY)
    result = HandshakeResult()

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(10)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    der = tls.getpeercert(binary_form=True)
                    assert der is not None
                    subject = x509.load_der_x509_certificate(der).subject
                    result.peer_cn = str(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
                    tls.sendall(result.peer_cn.encode())
            except (OSError, ssl.SSLError) as exc:
                result.server_error = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                result.version = tls.version()
                result.echoed = tls.recv(100).decode()  # TLS 1.3 reports client-cert rejection here
        finally:
            thread.join(10)
    return result


# --------------------------------------------------------------------------- init


@needs_openssl
def test_init_makes_a_chain_that_openssl_verifies_with_the_right_purposes(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    assert cli("init", "--dir", directory) == 0

    for leaf in (SERVER_CERT, CLIENT_CERT):
        checked = openssl_verify(directory, leaf)
        assert checked.returncode == 0, checked.stderr
        assert checked.stdout.strip() == f"{directory / leaf}: OK"
    assert openssl_verify(directory, SERVER_CERT, "sslserver").returncode == 0
    assert openssl_verify(directory, CLIENT_CERT, "sslclient").returncode == 0
    wrong = openssl_verify(directory, CLIENT_CERT, "sslserver")
    assert wrong.returncode != 0
    assert "unsuitable certificate purpose" in wrong.stdout + wrong.stderr


def test_init_uses_the_documented_extensions_and_default_names(cert_dir: Path) -> None:
    ca = load_certificate(cert_dir / CA_CERT)
    server = load_certificate(cert_dir / SERVER_CERT)
    client = load_certificate(cert_dir / CLIENT_CERT)

    ca_constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_constraints.critical and ca_constraints.value.ca and ca_constraints.value.path_length == 0
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ca_usage.critical and ca_usage.value.key_cert_sign and ca_usage.value.crl_sign
    assert not ca_usage.value.digital_signature
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]

    for leaf, usage in ((server, "serverAuth"), (client, "clientAuth")):
        assert leaf.signature_hash_algorithm is not None and leaf.signature_hash_algorithm.name == "sha256"
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical and not constraints.value.ca
        key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
        assert key_usage.critical and key_usage.value.digital_signature and not key_usage.value.key_cert_sign
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert [oid._name for oid in eku] == [usage]
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert leaf.issuer == ca.subject

    server_names = sans(cert_dir / SERVER_CERT)
    assert server_names.get_values_for_type(x509.DNSName) == ["fluidity-server", "localhost"]
    assert [str(ip) for ip in server_names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert client.subject.rfc4514_string() == "CN=fluidity-agent"
    assert server.subject.rfc4514_string() == f"CN={SERVER_TLS_NAME}"
    assert (server.not_valid_after_utc - server.not_valid_before_utc).days == 825
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days == 3650


def test_init_with_custom_names_keeps_the_name_agents_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "certs"
    args: list[str | Path] = [
        "init",
        "--dir",
        directory,
        "--server-name",
        "Tunnel.Example.com",
        "--server-ip",
        "10.0.0.5",
        "::1",
    ]
    assert cli(*args, "--client-name", "laptop", "--days", "30") == 0

    names = sans(directory / SERVER_CERT)
    assert names.get_values_for_type(x509.DNSName) == [SERVER_TLS_NAME, "tunnel.example.com"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
    assert load_certificate(directory / CLIENT_CERT).subject.rfc4514_string() == "CN=laptop"
    client = load_certificate(directory / CLIENT_CERT)
    assert client.not_valid_after_utc - client.not_valid_before_utc == timedelta(days=30, minutes=5)
    out = capsys.readouterr().out
    assert "DNS:tunnel.example.com" in out and "IP:10.0.0.5" in out


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--server-ip", "not-an-ip", "server IP 'not-an-ip' is not an IP address"),
        ("--server-name", "bad name!", "server name 'bad name!' is not a valid DNS name"),
        ("--server-name", "10.0.0.1", "pass it with --server-ip"),
    ],
)
def test_init_rejects_bad_server_names_without_creating_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    directory = tmp_path / "certs"
    assert cli("init", "--dir", directory, option, value) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not directory.exists()


@posix_only
def test_keys_are_pkcs8_and_owner_only_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        ensure_certificates(tmp_path / "certs")
    finally:
        os.umask(old_umask)
    directory = tmp_path / "certs"
    assert mode(directory) == 0o700
    for name in KEY_FILES:
        assert mode(directory / name) == 0o600
        assert (directory / name).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    for name in (CA_CERT, SERVER_CERT, CLIENT_CERT):
        assert mode(directory / name) == 0o644
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no temp files left behind


@posix_only
def test_init_keeps_existing_files_and_force_replaces_them(
    cert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {name: (cert_dir / name).read_bytes() for name in certs.ALL_FILES}
    assert cli("init", "--dir", cert_dir) == 0
    assert "already exist" in capsys.readouterr().out
    assert {name: (cert_dir / name).read_bytes() for name in certs.ALL_FILES} == before

    os.chmod(cert_dir / CLIENT_KEY, 0o644)  # a loosened key is replaced by an owner-only one
    assert cli("init", "--dir", cert_dir, "--force") == 0
    after = {name: (cert_dir / name).read_bytes() for name in certs.ALL_FILES}
    assert all(after[name] != before[name] for name in certs.ALL_FILES)
    assert all(mode(cert_dir / name) == 0o600 for name in KEY_FILES)
    assert verify(cert_dir) == []


def test_init_issues_missing_leaves_from_the_existing_ca(cert_dir: Path) -> None:
    ca_before = (cert_dir / CA_CERT).read_bytes()
    (cert_dir / CLIENT_CERT).unlink()
    (cert_dir / CLIENT_KEY).unlink()
    assert ensure_certificates(cert_dir) is True
    assert (cert_dir / CA_CERT).read_bytes() == ca_before
    assert verify(cert_dir) == []


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ((SERVER_KEY,), "server.crt exists without its partner"),
        ((CA_CERT,), "but no ca.crt; pass --force to start over"),
        ((CA_KEY, SERVER_CERT, SERVER_KEY), "cannot issue server.crt:"),
    ],
)
def test_init_refuses_to_guess_about_a_partial_folder(
    cert_dir: Path, capsys: pytest.CaptureFixture[str], remove: tuple[str, ...], message: str
) -> None:
    for name in remove:
        (cert_dir / name).unlink()
    left = sorted(p.name for p in cert_dir.iterdir())
    assert cli("init", "--dir", cert_dir) == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in cert_dir.iterdir()) == left


def test_a_folder_without_ca_key_but_with_both_pairs_needs_nothing(cert_dir: Path) -> None:
    (cert_dir / CA_KEY).unlink()
    assert ensure_certificates(cert_dir) is False
    assert verify(cert_dir) == []


# --------------------------------------------------------------------------- TLS


def test_real_tls13_mtls_handshake_with_the_generated_files(cert_dir: Path) -> None:
    result = mtls_exchange(cert_dir, cert_dir, server_hostname=SERVER_TLS_NAME)
    assert result.server_error is None
    assert result.version == "TLSv1.3"
    assert result.peer_cn == "fluidity-agent"
    assert result.echoed == "fluidity-agent"


def test_handshake_fails_for_a_name_the_server_certificate_does_not_hold(cert_dir: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        mtls_exchange(cert_dir, cert_dir, server_hostname="not-fluidity")


def test_server_rejects_a_client_certificate_from_another_ca(tmp_path: Path, cert_dir: Path) -> None:
    stranger = tmp_path / "stranger"
    ensure_certificates(stranger)
    shutil.copy(cert_dir / CA_CERT, stranger / CA_CERT)  # trusts our server, presents a foreign client cert
    with pytest.raises(ssl.SSLError):
        mtls_exchange(cert_dir, stranger, server_hostname=SERVER_TLS_NAME)


# --------------------------------------------------------------------------- verify


NOW = datetime.now(UTC)


def _expire_server(directory: Path) -> None:
    expired = issue_leaf(
        load_ca(directory),
        "server",
        SERVER_TLS_NAME,
        dns_names=[SERVER_TLS_NAME],
        not_before=NOW - timedelta(days=30),
        not_after=NOW - timedelta(days=1),
    )
    replace_pair(directory, SERVER_CERT, SERVER_KEY, expired)


def _future_client(directory: Path) -> None:
    future = issue_leaf(
        load_ca(directory),
        "client",
        "fluidity-agent",
        not_before=NOW + timedelta(days=10),
        not_after=NOW + timedelta(days=20),
    )
    replace_pair(directory, CLIENT_CERT, CLIENT_KEY, future)


def _mismatched_client_key(directory: Path) -> None:
    write_private_key(directory / CLIENT_KEY, ec.generate_private_key(ec.SECP256R1()), force=True)


def _client_from_another_ca(directory: Path) -> None:
    replace_pair(
        directory, CLIENT_CERT, CLIENT_KEY, issue_leaf(certs.generate_ca(), "client", "fluidity-agent")
    )


def _client_cert_as_server(directory: Path) -> None:
    wrong = issue_leaf(load_ca(directory), "client", SERVER_TLS_NAME, dns_names=[SERVER_TLS_NAME])
    replace_pair(directory, SERVER_CERT, SERVER_KEY, wrong)


def _garbage_ca(directory: Path) -> None:
    (directory / CA_CERT).write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")


def _readable_key(directory: Path) -> None:
    os.chmod(directory / CLIENT_KEY, 0o644)


def _missing_server_key(directory: Path) -> None:
    (directory / SERVER_KEY).unlink()


@pytest.mark.parametrize(
    ("break_it", "message", "openssl_leaf"),
    [
        (_expire_server, "server.crt expired on", SERVER_CERT),
        (_future_client, "client.crt is not valid until", CLIENT_CERT),
        (_mismatched_client_key, "client.key does not match client.crt", None),
        (_client_from_another_ca, "client.crt was not issued by this ca.crt", CLIENT_CERT),
        (_client_cert_as_server, "server.crt is not a server certificate", None),
        (_garbage_ca, "ca.crt is not a valid PEM certificate", None),
        pytest.param(_readable_key, "client.key can be read by other users", None, marks=posix_only),
        (_missing_server_key, "server.key is missing but server.crt is there", None),
    ],
)
def test_verify_reports_each_problem_and_the_cli_exits_1(
    cert_dir: Path,
    capsys: pytest.CaptureFixture[str],
    break_it: Callable[[Path], None],
    message: str,
    openssl_leaf: str | None,
) -> None:
    assert verify(cert_dir) == []
    break_it(cert_dir)

    problems = verify(cert_dir)
    assert len(problems) == 1 and message in problems[0], problems
    assert cli("verify", "--dir", cert_dir) == 1
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert "OK" not in captured.out
    if openssl_leaf is not None and OPENSSL is not None:  # openssl agrees it is broken
        assert openssl_verify(cert_dir, openssl_leaf).returncode != 0


def test_verify_cli_says_ok_for_a_good_folder(cert_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("verify", "--dir", cert_dir) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("OK: ca.crt, ca.key, server.crt, server.key, client.crt, client.key")
    assert captured.err == ""


def test_missing_folder_is_a_clear_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert verify(missing) == [
        f"certificate folder {missing} does not exist; run `fluidity-certs init` or `fluidity-certs import`"
    ]
    for command in ("show", "renew", "verify"):
        assert cli(command, "--dir", missing) == 1
    err = capsys.readouterr().err
    assert err.count("does not exist") == 3 and "Traceback" not in err
    assert not missing.exists()


def test_show_and_load_report_an_unparsable_pem_in_one_line(
    cert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (cert_dir / SERVER_CERT).write_text("hello\n")
    assert cli("show", "--dir", cert_dir) == 1
    assert capsys.readouterr().err == (
        f"fluidity-certs: error: {cert_dir / SERVER_CERT} is not a valid PEM certificate\n"
    )
    (cert_dir / SERVER_KEY).write_text("hello\n")
    with pytest.raises(CertificateError, match="is not a valid PEM private key"):
        load_private_key(cert_dir / SERVER_KEY)


# --------------------------------------------------------------------------- expiry and show


def test_days_until_expiry_and_the_warning_period(tmp_path: Path, cert_dir: Path) -> None:
    soon = issue_leaf(load_ca(cert_dir), "client", "fluidity-agent", days=10, now=NOW)
    replace_pair(cert_dir, CLIENT_CERT, CLIENT_KEY, soon)

    assert certs.EXPIRY_WARNING_DAYS == 14
    assert certs.days_until_expiry(cert_dir / CLIENT_CERT, now=NOW) == 10
    assert certs.expires_within_warning_period(cert_dir / CLIENT_CERT, now=NOW) is True
    assert certs.expires_within_warning_period(cert_dir / SERVER_CERT, now=NOW) is False
    assert certs.days_until_expiry(cert_dir / CLIENT_CERT, now=NOW + timedelta(days=11)) == -1
    assert certs.expires_within_warning_period(cert_dir / CLIENT_CERT, now=NOW + timedelta(days=11)) is True
    (warning,) = certs.expiry_warnings(cert_dir, now=NOW)
    assert warning.startswith("client.crt expires in 10 days")


def test_show_lists_subject_issuer_names_and_expiry(
    cert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    soon = issue_leaf(load_ca(cert_dir), "client", "fluidity-agent", days=5)
    replace_pair(cert_dir, CLIENT_CERT, CLIENT_KEY, soon)
    infos = {info.file: info for info in certs.show(cert_dir)}
    assert set(infos) == {CA_CERT, SERVER_CERT, CLIENT_CERT}
    assert infos[SERVER_CERT].names == ("DNS:fluidity-server", "DNS:localhost", "IP:127.0.0.1")
    assert infos[SERVER_CERT].issuer == infos[CA_CERT].subject
    assert infos[CLIENT_CERT].days_to_expiry in (4, 5)
    assert infos[CA_CERT].key_file == CA_KEY

    assert cli("show", "--dir", cert_dir) == 0
    out = capsys.readouterr().out
    assert "subject:  CN=fluidity-agent" in out and "renew soon" in out and "IP:127.0.0.1" in out

    assert cli("verify", "--dir", cert_dir) == 0  # close to expiry is a warning, not a failure
    assert "warning: client.crt expires in" in capsys.readouterr().out


def test_leaves_never_outlive_their_ca(tmp_path: Path) -> None:
    ca = certs.generate_ca(days=30)
    leaf = issue_leaf(ca, "client", "fluidity-agent")
    assert leaf.certificate.not_valid_after_utc == ca.certificate.not_valid_after_utc


# --------------------------------------------------------------------------- renew


@needs_openssl
def test_renew_keeps_names_and_subjects_and_still_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "certs"
    ensure_certificates(directory, ["tunnel.example.com"], ["10.1.2.3"], client_name="laptop")
    _expire_server(directory)  # renewing is how an expired leaf gets fixed
    server_names = sans(directory / SERVER_CERT)
    before = {name: load_certificate(directory / name) for name in (SERVER_CERT, CLIENT_CERT)}
    ca_files = {name: (directory / name).read_bytes() for name in (CA_CERT, CA_KEY)}
    old_keys = {name: (directory / name).read_bytes() for name in (SERVER_KEY, CLIENT_KEY)}

    assert cli("renew", "--dir", directory) == 0
    assert "Renewed server.crt, client.crt" in capsys.readouterr().out

    for name, old in before.items():
        new = load_certificate(directory / name)
        assert new.serial_number != old.serial_number
        assert new.subject == old.subject
        assert openssl_verify(directory, name).returncode == 0
    assert sans(directory / SERVER_CERT) == server_names
    assert load_certificate(directory / CLIENT_CERT).subject.rfc4514_string() == "CN=laptop"
    assert {name: (directory / name).read_bytes() for name in (CA_CERT, CA_KEY)} == ca_files
    assert all((directory / name).read_bytes() != old for name, old in old_keys.items())
    if os.name != "nt":
        assert all(mode(directory / name) == 0o600 for name in KEY_FILES)
    assert verify(directory) == []


def test_renew_without_ca_key_says_where_to_run_it(
    cert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (cert_dir / CA_KEY).unlink()
    before = (cert_dir / SERVER_CERT).read_bytes()
    assert cli("renew", "--dir", cert_dir) == 1
    err = capsys.readouterr().err
    assert "cannot renew certificates:" in err and "ca.key is missing" in err
    assert (cert_dir / SERVER_CERT).read_bytes() == before


# --------------------------------------------------------------------------- bundle and import


def test_client_bundle_zip_imports_on_another_machine_and_handshakes(
    tmp_path: Path, cert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "agent.zip"
    assert cli("bundle", "--dir", cert_dir, "--out", bundle) == 0
    with zipfile.ZipFile(bundle) as archive:
        assert sorted(archive.namelist()) == sorted([CA_CERT, CLIENT_CERT, CLIENT_KEY])
        assert (archive.getinfo(CLIENT_KEY).external_attr >> 16) & 0o777 == 0o600
    if os.name != "nt":
        assert mode(bundle) == 0o600

    agent = tmp_path / "agent-machine" / "certs"
    assert cli("import", bundle, "--dir", agent) == 0
    assert "Imported ca.crt, client.crt, client.key" in capsys.readouterr().out
    assert sorted(p.name for p in agent.iterdir()) == sorted([CA_CERT, CLIENT_CERT, CLIENT_KEY])
    if os.name != "nt":
        assert mode(agent / CLIENT_KEY) == 0o600
    assert verify(agent) == []

    result = mtls_exchange(cert_dir, agent, server_hostname=SERVER_TLS_NAME)
    assert (result.version, result.peer_cn, result.server_error) == ("TLSv1.3", "fluidity-agent", None)


def test_server_bundle_holds_the_server_set_and_never_ca_key(tmp_path: Path, cert_dir: Path) -> None:
    bundle = certs.create_bundle(cert_dir, tmp_path / "server.zip", server=True)
    with zipfile.ZipFile(bundle) as archive:
        assert sorted(archive.namelist()) == sorted([CA_CERT, SERVER_CERT, SERVER_KEY])
    server_machine = tmp_path / "server-machine"
    import_bundle(bundle, server_machine)
    assert sorted(p.name for p in server_machine.iterdir()) == sorted([CA_CERT, SERVER_CERT, SERVER_KEY])
    assert verify(server_machine) == []


def test_bundle_refuses_to_overwrite_or_to_ship_broken_certificates(
    tmp_path: Path, cert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "agent.zip"
    bundle.write_bytes(b"keep me")
    assert cli("bundle", "--dir", cert_dir, "--out", bundle) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert bundle.read_bytes() == b"keep me"
    assert cli("bundle", "--dir", cert_dir, "--out", bundle, "--force") == 0
    assert zipfile.is_zipfile(bundle)

    _client_from_another_ca(cert_dir)
    assert cli("bundle", "--dir", cert_dir, "--out", tmp_path / "bad.zip") == 1
    assert "cannot make a client bundle: client.crt was not issued" in capsys.readouterr().err
    assert not (tmp_path / "bad.zip").exists()
    assert cli("bundle", "--dir", cert_dir, "--out", tmp_path / "no" / "such" / "dir.zip", "--server") == 1
    assert "folder" in capsys.readouterr().err


def test_import_from_a_folder_and_from_a_zip_with_a_top_folder(tmp_path: Path, cert_dir: Path) -> None:
    folder = make_folder_bundle(cert_dir, tmp_path / "bundle", (CA_CERT, CLIENT_CERT, CLIENT_KEY))
    written = import_bundle(folder, tmp_path / "from-folder")
    assert sorted(p.name for p in written) == sorted([CA_CERT, CLIENT_CERT, CLIENT_KEY])
    assert verify(tmp_path / "from-folder") == []

    zipped = tmp_path / "nested.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        for name in (CA_CERT, CLIENT_CERT, CLIENT_KEY):
            archive.write(cert_dir / name, f"certs/{name}")
        archive.writestr("certs/README.txt", "ignored")
    import_bundle(zipped, tmp_path / "from-zip")
    assert (tmp_path / "from-zip" / CLIENT_KEY).read_bytes() == (cert_dir / CLIENT_KEY).read_bytes()
    if os.name != "nt":
        assert mode(tmp_path / "from-zip" / CLIENT_KEY) == 0o600


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_import_without_client_key_names_it_and_copies_nothing(
    tmp_path: Path, cert_dir: Path, capsys: pytest.CaptureFixture[str], as_zip: bool
) -> None:
    source: Path = make_folder_bundle(cert_dir, tmp_path / "bundle", (CA_CERT, CLIENT_CERT))
    if as_zip:
        source = Path(shutil.make_archive(str(tmp_path / "bundle"), "zip", source))
    dest = tmp_path / "dest"
    with pytest.raises(CertificateError, match=r"is missing client\.key$"):
        import_bundle(source, dest)
    assert cli("import", source, "--dir", dest) == 1
    assert capsys.readouterr().err == f"fluidity-certs: error: bundle {source} is missing client.key\n"
    assert not dest.exists()


def test_import_checks_the_certificates_before_copying_any(tmp_path: Path, cert_dir: Path) -> None:
    _client_from_another_ca(cert_dir)
    folder = make_folder_bundle(cert_dir, tmp_path / "bundle", (CA_CERT, CLIENT_CERT, CLIENT_KEY))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(CertificateError, match="was not imported: client.crt was not issued by this ca.crt"):
        import_bundle(folder, dest)
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]


def test_import_keeps_different_existing_files_unless_forced(tmp_path: Path, cert_dir: Path) -> None:
    other = tmp_path / "other"
    ensure_certificates(other)
    dest = make_folder_bundle(other, tmp_path / "dest", (CA_CERT, CLIENT_CERT, CLIENT_KEY))
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    folder = make_folder_bundle(cert_dir, tmp_path / "bundle", (CA_CERT, CLIENT_CERT, CLIENT_KEY))

    with pytest.raises(CertificateError, match="already exists with other contents; pass --force"):
        import_bundle(folder, dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert cli("import", folder, "--dir", dest, "--force") == 0
    assert (dest / CLIENT_CERT).read_bytes() == (cert_dir / CLIENT_CERT).read_bytes()
    import_bundle(folder, dest)  # identical files are not a conflict


def test_import_rejects_something_that_is_not_a_bundle(tmp_path: Path) -> None:
    text = tmp_path / "bundle.zip"
    text.write_text("not a zip")
    with pytest.raises(CertificateError, match="is neither a folder nor a zip file"):
        import_bundle(text, tmp_path / "dest")
    with pytest.raises(CertificateError, match="does not exist"):
        import_bundle(tmp_path / "missing.zip", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


# --------------------------------------------------------------------------- CLI edges


def test_default_cert_dir_is_the_per_user_data_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if sys.platform != "linux":
        pytest.skip("XDG_DATA_HOME applies on Linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert certs.default_cert_dir() == tmp_path / "fluidity" / "certs"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["init", "--days", "0"]) == 2
    assert main(["bundle"]) == 2
    assert "--out" in capsys.readouterr().err


def test_the_module_entry_point_prints_no_traceback(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "desktop.certificates", "verify", "--dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 1
    assert completed.stdout == ""
    assert "Traceback" not in completed.stderr and "does not exist" in completed.stderr
