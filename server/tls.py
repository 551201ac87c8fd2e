"""Mutual TLS 1.3 for the tunnel, shared by agent and server.

TLS runs over in-memory BIOs (``ssl.SSLObject``) instead of ``SSLSocket`` so one reader
thread and one writer thread can use a connection at the same time: OpenSSL forbids
concurrent use of one SSL object, so every call into it is serialised by a lock while
the raw TCP socket is read and written outside the lock.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

READ_CHUNK = 256 * 1024


class TlsSetupError(Exception):
    """Certificates or keys could not be loaded; the message names the file and the cause."""


class TlsError(ConnectionError):
    """The TLS session failed (handshake refused, bad certificate, unexpected close)."""


class SilentClose(TlsError):
    """The peer connected and left without sending a byte (a port probe or health check)."""


def _check_files(**files: Path) -> None:
    for label, path in files.items():
        if not Path(path).is_file():
            raise TlsSetupError(
                f"{label} {path} does not exist (create certificates with `fluidity-certs init`)"
            )


def _load(context: ssl.SSLContext, ca_file: Path, cert_file: Path, key_file: Path) -> None:
    _check_files(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except ssl.SSLError as exc:
        raise TlsSetupError(f"cannot use {cert_file} with {key_file}: {exc.reason or exc}") from None
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except ssl.SSLError as exc:
        raise TlsSetupError(f"cannot load CA {ca_file}: {exc.reason or exc}") from None


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


class TlsChannel:
    """A TLS session over a connected TCP socket, safe for one reader and one writer thread."""

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._closed = False

    # ----- handshake ------------------------------------------------------

    def handshake(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        received_any = False
        while True:
            with self._lock:
                try:
                    self._ssl.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                except ssl.SSLError as exc:
                    out = self._outgoing.read()
                    self._flush_quietly(out)
                    raise TlsError(describe_ssl_error(exc)) from None
                out = self._outgoing.read()
            if out:
                self._send_raw(out, deadline)
            if done:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("TLS handshake timed out")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(READ_CHUNK)
            except TimeoutError:
                raise TimeoutError("TLS handshake timed out") from None
            finally:
                self.sock.settimeout(None)
            if not data:
                if not received_any:
                    raise SilentClose("peer closed the connection before the TLS handshake")
                raise TlsError("connection closed during the TLS handshake")
            received_any = True
            with self._lock:
                self._incoming.write(data)

    def _flush_quietly(self, data: bytes) -> None:
        if data:
            try:
                self.sock.sendall(data)
            except OSError:
                pass

    def _send_raw(self, data: bytes, deadline: float | None = None) -> None:
        with self._send_lock:
            if deadline is not None:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.sock.sendall(data)
            finally:
                if deadline is not None:
                    self.sock.settimeout(None)

    @property
    def version(self) -> str | None:
        return self._ssl.version()

    def peer_subject(self) -> str:
        cert = self._ssl.getpeercert()
        if not cert:
            return ""
        parts = []
        subject: tuple[tuple[tuple[str, str], ...], ...] = cert.get("subject", ())  # type: ignore[assignment]
        for rdn in subject:
            for key, value in rdn:
                short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU"}.get(
                    key, key
                )
                parts.append(f"{short}={value}")
        return ",".join(parts)

    # ----- data -----------------------------------------------------------

    def recv(self) -> bytes:
        """Block until plaintext arrives; ``b""`` at end of stream. Raises TlsError/OSError."""
        while True:
            self._lock.acquire()
            try:
                chunks = self._drain_plaintext()
                out = self._outgoing.read()
                if out:  # e.g. alerts, TLS 1.3 key updates: must keep record order with the writer
                    self._send_lock.acquire()
            finally:
                self._lock.release()
            if out:
                try:
                    self.sock.sendall(out)
                finally:
                    self._send_lock.release()
            if chunks is None:
                return b""
            if chunks:
                return b"".join(chunks) if len(chunks) > 1 else chunks[0]
            data = self.sock.recv(READ_CHUNK)
            with self._lock:
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()

    def _drain_plaintext(self) -> list[bytes] | None:
        chunks: list[bytes] = []
        while True:
            try:
                piece = self._ssl.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                return chunks
            except ssl.SSLZeroReturnError:
                return chunks or None
            except ssl.SSLEOFError:
                return chunks or None
            except ssl.SSLError as exc:
                raise TlsError(describe_ssl_error(exc)) from None
            if not piece:
                return chunks or None
            chunks.append(piece)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        # Ciphertext must reach the socket in the order it was produced, so the send lock is
        # taken before the SSL lock is released.
        self._lock.acquire()
        try:
            try:
                self._ssl.write(data)
            except ssl.SSLError as exc:
                raise TlsError(describe_ssl_error(exc)) from None
            out = self._outgoing.read()
            self._send_lock.acquire()
        finally:
            self._lock.release()
        try:
            self.sock.sendall(out)
        finally:
            self._send_lock.release()

    def close(self) -> None:
        """Send close_notify (best effort) and close the socket; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            with self._lock:
                try:
                    self._ssl.unwrap()
                except (ssl.SSLError, ValueError):
                    pass
                out = self._outgoing.read()
            if out:
                self.sock.settimeout(0.5)
                self.sock.sendall(out)
        except OSError:
            pass
        finally:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    def abort(self) -> None:
        """Close without a TLS goodbye (dead link or protocol violation)."""
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
