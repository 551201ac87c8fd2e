"""Mutual TLS 1.3 for the tunnel, shared by agent and server.

TLS runs over in-memory BIOs (``ssl.SSLObject``) instead of ``SSLSocket``, so the event
loop moves the bytes and TLS itself never touches a socket (``TlsSession``).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import stat
import time
from pathlib import Path
from typing import Any, NoReturn

from server.errors import FluidityError

READ_CHUNK = 256 * 1024


class TlsSetupError(FluidityError):
    """Certificates or keys cannot be used; the one-line message names the file, the cause and the fix."""


class TlsError(FluidityError, ConnectionError):
    """The TLS session failed (handshake refused, bad certificate, unexpected close).

    ``certificate`` is True when a certificate was refused (by us or by the peer): trying
    again cannot help until the certificates change.
    """

    def __init__(self, message: str, *, certificate: bool = False) -> None:
        super().__init__(message)
        self.certificate = certificate


#: OpenSSL reasons that mean a certificate was refused, on either side.
_CERTIFICATE_FAILURES = (
    "CERTIFICATE_VERIFY_FAILED",
    "CERTIFICATE_REQUIRED",
    "UNKNOWN_CA",
    "CERTIFICATE_EXPIRED",
    "BAD_CERTIFICATE",
    "CERTIFICATE_REVOKED",
    "UNSUPPORTED_CERTIFICATE",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE",
)


def tls_error(exc: ssl.SSLError) -> TlsError:
    """Our error for an OpenSSL one: a reason a user can act on, and whether it is permanent."""
    text = str(getattr(exc, "reason", "") or exc).upper()
    return TlsError(describe_ssl_error(exc), certificate=any(key in text for key in _CERTIFICATE_FAILURES))


class SilentClose(TlsError):
    """The peer connected and left without sending a byte (a port probe or health check)."""


#: Certificates and keys are a few KB; a CA file with a long chain is still far below this.
MAX_PEM_BYTES = 1024 * 1024
_CERTIFICATE_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)
_KEY_BEGIN = re.compile(rb"-----BEGIN (?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY-----")
_CERTIFICATE_EXPECTED = "a PEM certificate (-----BEGIN CERTIFICATE-----)"
_KEY_EXPECTED = "a PEM private key (-----BEGIN PRIVATE KEY-----)"


def key_file_problem(path: Path) -> str | None:
    """Why a private key file is too open to use, or None: the single home of the rule.

    As OpenSSH does, a key whose group or other permission bits are set is refused (POSIX
    only; Windows has no such mode bits). A missing or unreadable file is not judged here.
    """
    if os.name == "nt":
        return None
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if not mode & 0o077:
        return None
    verb = "read" if mode & 0o044 else "changed"
    return f"{path} can be {verb} by other users (mode {mode:04o}); run: chmod 600 {path}"


def _fix(label: str, path: Path) -> str:
    """How to get a good copy of the file ``label`` names."""
    folder = path.parent
    if label == "ca_file":
        return (
            "copy ca.crt again from the machine that ran `fluidity-certs init`, "
            f"or start a new set with `fluidity-certs init --force --dir {folder}`"
        )
    if label == "cert_file":
        return (
            f"on the machine that holds ca.key, delete it and its key and run `fluidity-certs init --dir "
            f"{folder}` to issue a new pair, or import a fresh bundle (`fluidity-certs import`)"
        )
    return f"regenerate it with `fluidity-certs renew --dir {folder}` on the machine that holds ca.key"


def _read_pem(label: str, path: Path) -> bytes:
    """The file's bytes, or TlsSetupError saying it is missing, not a file, unreadable or too big."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise TlsSetupError(
            f"{label} {path} does not exist; "
            f"create certificates with `fluidity-certs init --dir {path.parent}`"
        ) from None
    except OSError as exc:
        raise TlsSetupError(f"cannot read {label} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        expected = _KEY_EXPECTED if label == "key_file" else _CERTIFICATE_EXPECTED
        raise TlsSetupError(f"{label} {path} is not a file; point {label} at {expected}")
    if label == "key_file" and (problem := key_file_problem(path)) is not None:
        raise TlsSetupError(f"key_file {problem}")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise TlsSetupError(
            f"cannot read {label} {path}: {exc.strerror or exc}; "
            "it must be readable by the user running Fluidity"
        ) from None
    if len(data) > MAX_PEM_BYTES:
        raise TlsSetupError(
            f"{label} {path} is over {MAX_PEM_BYTES} bytes, too large for a PEM file; {_fix(label, path)}"
        )
    return data


def _certificates(label: str, path: Path, data: bytes) -> str:
    """The certificate blocks of a PEM file, each checked to parse, as text for ``cadata``."""
    blocks = _CERTIFICATE_BLOCK.findall(data)
    if not blocks:
        raise TlsSetupError(f"{label} {path} is not {_CERTIFICATE_EXPECTED}; {_fix(label, path)}")
    text = "\n".join(block.decode("ascii", "replace") for block in blocks) + "\n"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError):
        raise TlsSetupError(
            f"{label} {path} holds a damaged certificate (its PEM block does not decode); {_fix(label, path)}"
        ) from None
    return text


def _check_key(path: Path, data: bytes) -> None:
    if _KEY_BEGIN.search(data) is None:
        swapped = ""
        if _CERTIFICATE_BLOCK.search(data):
            swapped = " (it holds a certificate: are cert_file and key_file swapped?)"
        raise TlsSetupError(f"key_file {path} is not {_KEY_EXPECTED}{swapped}; {_fix('key_file', path)}")
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data:
        _refuse_passphrase(path)


def _refuse_passphrase(path: Path) -> NoReturn:
    """Also the password callback: OpenSSL would otherwise prompt on the terminal and hang a server."""
    raise TlsSetupError(
        f"key_file {path} is protected by a passphrase, and Fluidity starts unattended; "
        f"{_fix('key_file', path)}"
    )


def _load(context: ssl.SSLContext, ca_file: Path, cert_file: Path, key_file: Path) -> None:
    """Load CA, certificate and key, telling apart missing, unreadable, not PEM, damaged and mismatched."""
    ca_file, cert_file, key_file = Path(ca_file), Path(cert_file), Path(key_file)
    ca_text = _certificates("ca_file", ca_file, _read_pem("ca_file", ca_file))
    _certificates("cert_file", cert_file, _read_pem("cert_file", cert_file))
    _check_key(key_file, _read_pem("key_file", key_file))
    try:
        context.load_cert_chain(str(cert_file), str(key_file), password=lambda: _refuse_passphrase(key_file))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsSetupError(
                f"key_file {key_file} does not match cert_file {cert_file} (the key belongs to another "
                f"certificate); regenerate the pair with `fluidity-certs renew --dir {cert_file.parent}` "
                "on the machine that holds ca.key, or point both keys at one pair"
            ) from None
        raise TlsSetupError(
            f"key_file {key_file} holds a damaged private key (its PEM block does not decode); "
            f"{_fix('key_file', key_file)}"
        ) from None
    except OSError as exc:
        raise TlsSetupError(f"cannot read {cert_file} or {key_file}: {exc.strerror or exc}") from None
    try:
        context.load_verify_locations(cadata=ca_text)
    except (ssl.SSLError, ValueError) as exc:
        raise TlsSetupError(f"cannot use ca_file {ca_file}: {exc}; {_fix('ca_file', ca_file)}") from None


def server_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS 1.3 only; a client certificate signed by our CA is required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.options |= ssl.OP_NO_TICKET  # one long-lived tunnel per agent: resumption buys nothing
    _load(context, ca_file, cert_file, key_file)
    return context


def client_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS 1.3 only; the server is verified against our private CA and a fixed name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    _load(context, ca_file, cert_file, key_file)
    return context


def describe_ssl_error(exc: BaseException) -> str:
    """A one-line reason a user can act on, e.g. 'the server did not accept our certificate'."""
    text = str(getattr(exc, "reason", "") or exc)
    # OpenSSL names a failure of our own checks CERTIFICATE_VERIFY_FAILED; the *_ALERT_* names
    # below are alerts the peer sent, i.e. the peer refused OUR certificate.
    hints = {
        "CERTIFICATE_REQUIRED": "the server requires a client certificate and none was accepted",
        "UNKNOWN_CA": (
            "the peer does not trust our certificate: it is not signed by the peer's CA "
            "(both sides need certificates from the same `fluidity-certs init`)"
        ),
        "CERTIFICATE_EXPIRED": (
            "the peer says our certificate has expired (renew with `fluidity-certs renew`)"
        ),
        "BAD_CERTIFICATE": "the peer rejected our certificate",
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate",
        "CERTIFICATE_VERIFY_FAILED": "certificate verification failed",
        "WRONG_VERSION_NUMBER": "the peer does not speak TLS",
        "UNSUPPORTED_PROTOCOL": "the peer does not support TLS 1.3",
        "TLSV1_ALERT_PROTOCOL_VERSION": "the peer does not support TLS 1.3",
    }
    for key, hint in hints.items():
        if key in text.upper():
            detail = getattr(exc, "verify_message", None)
            return f"{hint} ({detail or text})"
    return text


class BlockingTls:
    """A ``TlsSession`` driven over a blocking socket, for one-shot probes (``fluidity doctor``)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_hostname: str) -> None:
        self.sock = sock
        self.session = TlsSession(context, server_side=False, server_hostname=server_hostname)

    def handshake(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                done = self.session.handshake()
            finally:
                self._flush()
            if done:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("TLS handshake timed out")
            self.sock.settimeout(remaining)
            data = self.sock.recv(READ_CHUNK)
            if not data:
                if not self.session.received_any:
                    raise SilentClose("peer closed the connection before the TLS handshake")
                raise TlsError("connection closed during the TLS handshake")
            self.session.receive(data)

    @property
    def version(self) -> str | None:
        return self.session.version

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self.session.write(data)
        self._flush()

    def recv(self) -> bytes:
        """Plaintext as it arrives (blocking per the socket's timeout); ``b""`` at the end."""
        while True:
            chunks, ended = self.session.read()
            self._flush()
            if chunks:
                return b"".join(chunks)
            if ended:
                return b""
            data = self.sock.recv(READ_CHUNK)
            if data:
                self.session.receive(data)
            else:
                self.session.receive_eof()

    def close(self) -> None:
        self.session.close()
        try:
            self._flush()
        except OSError:
            pass
        self.abort()

    def abort(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _flush(self) -> None:
        out = self.session.data_to_send()
        if out:
            self.sock.sendall(out)


class TlsSession:
    """TLS over memory BIOs with no I/O of its own, for an event loop: wire bytes in, wire bytes out.

    The loop feeds what the socket read (``receive``), drives ``handshake`` until it returns
    True, then moves plaintext with ``read``/``write`` and sends ``data_to_send()``. One
    thread owns it, so no locks.
    """

    def __init__(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self.received_any = False

    def receive(self, data: bytes) -> None:
        if data:
            self.received_any = True
            self._incoming.write(data)

    def receive_eof(self) -> None:
        self._incoming.write_eof()

    def handshake(self) -> bool:
        """One step of the handshake; True once it is complete. Raises TlsError."""
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            raise tls_error(exc) from None
        return True

    def read(self) -> tuple[list[bytes], bool]:
        """Plaintext decrypted so far, and whether the peer has ended the session."""
        chunks: list[bytes] = []
        while True:
            try:
                piece = self._ssl.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                return chunks, False
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return chunks, True
            except ssl.SSLError as exc:
                raise tls_error(exc) from None
            if not piece:
                return chunks, True
            chunks.append(piece)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            raise tls_error(exc) from None

    def data_to_send(self) -> bytes:
        return self._outgoing.read()

    @property
    def pending_output(self) -> int:
        return self._outgoing.pending

    def close(self) -> None:
        """Queue close_notify (best effort)."""
        try:
            self._ssl.unwrap()
        except (ssl.SSLError, ValueError):
            pass

    @property
    def version(self) -> str | None:
        return self._ssl.version()

    def peer_subject(self) -> str:
        return format_subject(self._ssl.getpeercert())


def format_subject(cert: Any) -> str:
    """``CN=…,O=…`` of a peer certificate as ``getpeercert()`` returns it."""
    if not cert:
        return ""
    parts = []
    subject: tuple[tuple[tuple[str, str], ...], ...] = cert.get("subject", ())
    names = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU"}
    for rdn in subject:
        for key, value in rdn:
            parts.append(f"{names.get(key, key)}={value}")
    return ",".join(parts)
