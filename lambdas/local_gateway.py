"""A local stand-in for the control plane's API Gateway, running the real handlers.

It listens on loopback, checks the ``x-api-key`` header the way API Gateway does
(missing or wrong key: HTTP 403 ``{"message": "Forbidden"}``; the header twice: 400),
turns each request into a REST (v1) proxy event, calls the same router as
``lambdas.handlers.api_handler`` and writes its reply. Like an API with a greedy
``/{proxy+}`` resource, every path reaches the router, so its 404 and 405 replies are
visible. The URL carries the stage (``http://127.0.0.1:PORT/prod``) as the real
ApiGatewayUrl output does.

Every client is bounded (:class:`GatewayLimits`): a head and then a body must arrive
within ``read_timeout``, heads and bodies have a size cap, chunked bodies are refused
with 411 (or 501 for other codings) instead of being misread, and at most
``max_connections`` clients are served at once. A bound that is hit answers or closes
that one client; the listener keeps accepting.

It runs on a developer's machine and in tests, never in a Lambda, so the deployment zip
leaves it out (``lambdas.packaging``). For developers, against moto or a real account::

    AWS_ENDPOINT_URL=http://127.0.0.1:5000 python -m lambdas.local_gateway --api-key K --port 8787
    curl -X POST http://127.0.0.1:8787/prod/wake -H "x-api-key: K"
"""

from __future__ import annotations

import argparse
import base64
import hmac
import http
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from lambdas.handlers import ControlRuntime, handle_api_event

#: API Gateway rejects payloads above 10 MB; the control plane never needs more than this.
MAX_BODY = 1024 * 1024
#: At most this long, a refused client's remaining bytes are read and dropped before closing.
LINGER_SECONDS = 2.0
_FORBIDDEN = {"message": "Forbidden"}
_log = logging.getLogger("fluidity.local_gateway")

Fields = Sequence[tuple[str, str]]

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,19}")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
#: The error types API Gateway itself puts in ``x-amzn-ErrorType``.
_ERROR_TYPES = {
    400: "BadRequestException",
    403: "ForbiddenException",
    408: "RequestTimeoutException",
    411: "LengthRequiredException",
    413: "RequestTooLargeException",
    431: "RequestHeaderFieldsTooLargeException",
    501: "NotImplementedException",
    503: "ServiceUnavailableException",
    505: "HttpVersionNotSupportedException",
}


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    """What one client may make the gateway hold; hitting a bound never stops the listener.

    ``read_timeout`` is the time a request head, and then its body, may take to arrive in
    full (a client dripping bytes gets no more), the time an idle keep-alive connection is
    kept, and the time a client has to take a reply.
    """

    read_timeout: float = 10.0
    max_head_bytes: int = 16 * 1024
    max_body_bytes: int = MAX_BODY
    max_connections: int = 32

    def __post_init__(self) -> None:
        if not self.read_timeout > 0:
            raise ValueError(f"read_timeout must be above 0 seconds, not {self.read_timeout}")
        for name in ("max_head_bytes", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class LocalContext:
    """The parts of the Lambda context object the handlers read."""

    aws_request_id: str
    function_name: str = "fluidity-local-gateway"


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    target: str
    fields: tuple[tuple[str, str], ...]
    body: bytes
    keep_alive: bool


class _Refusal(Exception):
    """The gateway answers this request itself with ``status`` and closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LocalGateway:
    """A real HTTP server on loopback in front of the real control-plane handlers."""

    def __init__(
        self,
        api_key: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        stage: str | None = "prod",
        env: Mapping[str, str] | None = None,
        limits: GatewayLimits | None = None,
        **boto_session_kwargs: Any,
    ) -> None:
        """``env`` replaces ``os.environ`` for the handlers (CLUSTER_NAME, AWS_ENDPOINT_URL, ...);
        ``boto_session_kwargs`` go to ``boto3.session.Session`` (region_name, credentials)."""
        if not api_key:
            raise ValueError("an API key is required: API Gateway never serves these routes without one")
        self.api_key = api_key
        self.stage = stage.strip("/") if stage else None
        self.limits = limits or GatewayLimits()
        self.runtime = ControlRuntime.create(os.environ if env is None else dict(env), **boto_session_kwargs)
        self._address = (host, port)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._open_lock = threading.Lock()
        self._open: dict[socket.socket, threading.Thread] = {}

    def start(self) -> str:
        """Bind and serve on a daemon thread; returns the base URL (with the stage)."""
        if self._listener is not None:
            raise RuntimeError("gateway already started")
        host, port = self._address
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            if os.name != "nt":
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        listener.settimeout(0.1)  # so the accept loop notices stop()
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="local-gateway", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop accepting, cut the open connections and wait for their threads."""
        if self._listener is None:
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        self._listener.close()
        with self._open_lock:
            open_now = dict(self._open)
        for conn, thread in open_now.items():
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            thread.join(5.0)
        self._listener = None

    @property
    def url(self) -> str:
        if self._listener is None:
            raise RuntimeError("gateway not started")
        host, port = self._listener.getsockname()[:2]
        host_text = f"[{host}]" if ":" in host else host
        return f"http://{host_text}:{port}" + (f"/{self.stage}" if self.stage else "")

    @property
    def open_connections(self) -> int:
        """Clients being served right now (each holds one thread)."""
        with self._open_lock:
            return len(self._open)

    def __enter__(self) -> LocalGateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- connections -------------------------------------------------------

    def _accept_loop(self) -> None:
        """Accept until stopped; no client and no accept error ends this loop."""
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, address = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:  # e.g. EMFILE: wait a little, the listener stays open
                if self._stopping.is_set():
                    return
                _log.warning("accept failed: %s", exc)
                time.sleep(0.05)
                continue
            try:
                self._admit(conn, str(address[0]))
            except Exception:  # noqa: BLE001 - whatever one client did, keep accepting the next
                _log.exception("could not take a connection from %s", address[0])
                conn.close()

    def _admit(self, conn: socket.socket, client: str) -> None:
        if not self._slots.acquire(blocking=False):
            _log.warning("refusing %s: %d connections open", client, self.limits.max_connections)
            _refuse_at_once(conn, self.limits.max_connections)
            return
        thread = threading.Thread(
            target=self._serve_connection, args=(conn, client), name="local-gateway-conn", daemon=True
        )
        with self._open_lock:
            self._open[conn] = thread
        try:
            thread.start()
        except RuntimeError as exc:  # the process is out of threads: drop this client only
            _log.warning("cannot serve %s: %s", client, exc)
            with self._open_lock:
                self._open.pop(conn, None)
            conn.close()
            self._slots.release()

    def _serve_connection(self, conn: socket.socket, client: str) -> None:
        try:
            _Connection(self, conn, client).serve()
        except Exception:  # noqa: BLE001 - one broken connection must not reach the accept loop
            _log.exception("connection from %s failed", client)
        finally:
            with self._open_lock:
                self._open.pop(conn, None)
            conn.close()
            self._slots.release()

    # ----- request handling (called from the connection threads) -------------

    def respond(
        self, method: str, target: str, fields: Fields, body: bytes, client: str
    ) -> tuple[int, dict[str, str], bytes]:
        """Answer one HTTP request (header ``fields`` in order, duplicates kept): (status, headers, body)."""
        parts = urlsplit(target)
        path = parts.path or "/"
        if self.stage:
            prefix = f"/{self.stage}"
            if path != prefix and not path.startswith(prefix + "/"):
                return _gateway_error(403, _FORBIDDEN)
            path = path[len(prefix) :] or "/"
        keys = [value for name, value in fields if name.lower() == "x-api-key"]
        if len(keys) > 1:  # "last one wins" would let a proxy's header and the client's disagree
            return _gateway_error(
                400, {"message": "the x-api-key header appears more than once; send it once"}
            )
        key = keys[0] if keys else ""
        if not hmac.compare_digest(key.encode(), self.api_key.encode()):
            return _gateway_error(403, _FORBIDDEN)
        request_id = str(uuid.uuid4())
        event = self.proxy_event(method, path, parts.query, fields, body, client, request_id)
        try:
            reply = handle_api_event(event, LocalContext(request_id), self.runtime)
            status = int(reply["statusCode"])
            reply_headers = {str(k): str(v) for k, v in (reply.get("headers") or {}).items()}
            text = reply.get("body") or ""
            payload = base64.b64decode(text) if reply.get("isBase64Encoded") else str(text).encode()
        except Exception:  # noqa: BLE001 - API Gateway answers a broken integration with 502
            _log.exception("handler failed")
            return _gateway_error(502, {"message": "Internal server error"})
        return status, reply_headers, payload

    def proxy_event(
        self,
        method: str,
        path: str,
        query: str,
        fields: Fields,
        body: bytes,
        client: str,
        request_id: str,
    ) -> dict[str, Any]:
        """The REST (v1) proxy event API Gateway would send for this request."""
        headers: dict[str, str] = {}
        multi_headers: dict[str, list[str]] = {}
        for name, value in fields:
            headers[name.lower()] = value  # API Gateway's single-value map keeps the last
            multi_headers.setdefault(name.lower(), []).append(value)
        pairs = parse_qsl(query, keep_blank_values=True)
        multi_query: dict[str, list[str]] = {}
        for name, value in pairs:
            multi_query.setdefault(name, []).append(value)
        try:
            text: str | None = body.decode("utf-8") if body else None
            encoded = False
        except UnicodeDecodeError:
            text, encoded = base64.b64encode(body).decode(), True
        stage = self.stage or "$default"
        return {
            "resource": "/{proxy+}",
            "path": path,
            "httpMethod": method,
            "headers": headers,
            "multiValueHeaders": multi_headers,
            "queryStringParameters": dict(pairs) or None,
            "multiValueQueryStringParameters": multi_query or None,
            "pathParameters": {"proxy": path.lstrip("/")},
            "stageVariables": None,
            "requestContext": {
                "resourcePath": "/{proxy+}",
                "httpMethod": method,
                "path": f"/{self.stage}{path}" if self.stage else path,
                "stage": stage,
                "requestId": request_id,
                "requestTimeEpoch": int(time.time() * 1000),
                "protocol": "HTTP/1.1",
                "identity": {"sourceIp": client, "apiKey": headers.get("x-api-key")},
                "accountId": "000000000000",
                "apiId": "local",
            },
            "body": text,
            "isBase64Encoded": encoded,
        }


class _Connection:
    """One client connection: reads requests within the limits and answers them in order."""

    def __init__(self, gateway: LocalGateway, sock: socket.socket, client: str) -> None:
        self.gateway = gateway
        self.limits = gateway.limits
        self.sock = sock
        self.client = client
        self._buffer = bytearray()  # bytes received but not consumed (pipelined requests)

    def serve(self) -> None:
        try:
            while self._serve_one():
                pass
        except OSError:  # the client reset the connection or did not take a reply in time
            pass

    def _serve_one(self) -> bool:
        """Answer one request; False when the connection is to be closed."""
        try:
            request = self._read_request()
        except _Refusal as refusal:
            _log.info("refused %s: %s %s", self.client, refusal.status, refusal.message)
            status, headers, payload = _gateway_error(refusal.status, {"message": refusal.message})
            self._send(status, headers, payload, close=True, head_only=False)
            self._linger()
            return False
        if request is None:
            return False
        status, headers, payload = self.gateway.respond(
            request.method, request.target, request.fields, request.body, self.client
        )
        _log.debug("%s %s %s -> %d", self.client, request.method, request.target, status)
        self._send(status, headers, payload, close=not request.keep_alive, head_only=request.method == "HEAD")
        return request.keep_alive

    def _read_request(self) -> _Request | None:
        """The next request, None if the client left or stayed idle; _Refusal for a bad one."""
        head = self._read_head()
        if head is None:
            return None
        method, target, version, fields = _parse_head(head)
        length = _body_length(fields, self.limits.max_body_bytes)
        minor = version[-1]
        if length and minor == "1" and "100-continue" in _tokens(fields, "expect"):
            self._sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self._read_body(length) if length else b""
        if body is None:
            return None
        keep_alive = minor == "1" and "close" not in _tokens(fields, "connection")
        return _Request(method, target, fields, body, keep_alive)

    def _read_head(self) -> bytes | None:
        deadline = time.monotonic() + self.limits.read_timeout
        scan_from = 0
        while True:
            blank = len(self._buffer) - len(self._buffer.lstrip(b"\r\n"))  # RFC 9112 §2.2
            if blank:
                del self._buffer[:blank]
                scan_from = 0
            match = _HEAD_END.search(self._buffer, max(0, scan_from - 3))
            end = match.end() if match else None
            if (end or len(self._buffer)) > self.limits.max_head_bytes:
                raise _Refusal(
                    431, f"the request head is larger than this gateway's {self.limits.max_head_bytes} bytes"
                )
            if end is not None:
                head = bytes(self._buffer[:end])
                del self._buffer[:end]
                return head
            scan_from = len(self._buffer)
            data = self._recv(deadline, 65536)
            if data is None:
                if self._buffer:
                    raise _Refusal(
                        408, f"the request head did not arrive within {self.limits.read_timeout:g} s"
                    )
                return None  # an idle keep-alive connection: close without a word
            if not data:
                return None
            self._buffer += data

    def _read_body(self, length: int) -> bytes | None:
        deadline = time.monotonic() + self.limits.read_timeout
        while len(self._buffer) < length:
            data = self._recv(deadline, length - len(self._buffer))
            if data is None:
                raise _Refusal(
                    408,
                    f"the request body did not arrive within {self.limits.read_timeout:g} s "
                    f"({len(self._buffer)} of {length} bytes came)",
                )
            if not data:
                return None
            self._buffer += data
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        return body

    def _recv(self, deadline: float, size: int) -> bytes | None:
        """Up to ``size`` bytes, ``b""`` at end of stream, None once ``deadline`` has passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv(size)
        except TimeoutError:
            return None

    def _send(
        self, status: int, headers: Mapping[str, str], payload: bytes, *, close: bool, head_only: bool
    ) -> None:
        self._sendall(_render_response(status, headers, payload, close=close, head_only=head_only))

    def _linger(self) -> None:
        """Read what the client is still sending before closing, so the refusal is not lost to a reset."""
        self.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + min(self.limits.read_timeout, LINGER_SECONDS)
        discarded = 0
        while discarded < self.limits.max_body_bytes and (data := self._recv(deadline, 65536)):
            discarded += len(data)

    def _sendall(self, data: bytes) -> None:
        self.sock.settimeout(self.limits.read_timeout)
        self.sock.sendall(data)


def _parse_head(head: bytes) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
    """(method, target, version, fields) of a complete request head; _Refusal(400/505) if malformed."""
    lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
    while lines and not lines[-1]:
        lines.pop()
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise _Refusal(400, "malformed request line: expected 'METHOD /path HTTP/1.1'")
    version = _VERSION.fullmatch(parts[2])
    if version is None:
        raise _Refusal(400, "malformed HTTP version in the request line")
    if version.group(1) != b"1":
        raise _Refusal(505, f"{parts[2].decode('ascii')} is not supported; use HTTP/1.1")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or _BAD_VALUE_BYTE.search(value):
            raise _Refusal(400, "malformed header field (folded, no colon, bad name or control character)")
        fields.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    return parts[0].decode("ascii"), parts[1].decode("ascii"), parts[2].decode("ascii"), tuple(fields)


def _values(fields: Fields, name: str) -> list[str]:
    return [value for key, value in fields if key.lower() == name]


def _tokens(fields: Fields, name: str) -> list[str]:
    """Lower-cased comma-separated members of every ``name`` field."""
    return [
        item.strip().lower() for value in _values(fields, name) for item in value.split(",") if item.strip()
    ]


def _body_length(fields: Fields, max_body: int) -> int:
    """Content-Length of the body; chunked and other transfer codings are refused, never guessed."""
    lengths = _values(fields, "content-length")
    if _values(fields, "transfer-encoding"):
        codings = _tokens(fields, "transfer-encoding")
        if lengths:
            raise _Refusal(400, "both Transfer-Encoding and Content-Length are present")
        if codings == ["chunked"]:
            raise _Refusal(411, "chunked request bodies are not accepted; send a Content-Length")
        if codings and codings[-1] == "chunked":
            raise _Refusal(501, f"Transfer-Encoding {', '.join(codings)} is not supported")
        raise _Refusal(400, "Transfer-Encoding must end with chunked")
    if not lengths:
        return 0
    values = {item.strip() for value in lengths for item in value.split(",")}
    if len(values) != 1 or not _DIGITS.fullmatch(text := values.pop()):
        raise _Refusal(400, "invalid or conflicting Content-Length")
    length = int(text)
    if length > max_body:
        raise _Refusal(413, f"Request Too Long: {length} bytes; this gateway takes at most {max_body}")
    return length


def _render_response(
    status: int, headers: Mapping[str, str], payload: bytes, *, close: bool, head_only: bool
) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", f"Date: {formatdate(usegmt=True)}"]
    for name, value in headers.items():
        if name.lower() in ("content-length", "connection", "transfer-encoding", "date"):
            continue
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            continue  # a handler's header must never split the response
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {len(payload)}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + payload


def _refuse_at_once(conn: socket.socket, limit: int) -> None:
    """503 from the accept thread: a short write to a fresh socket, bounded so it cannot stall accepting."""
    status, headers, payload = _gateway_error(
        503, {"message": f"too many connections (this gateway serves {limit} at once); retry shortly"}
    )
    headers["Retry-After"] = "1"
    try:
        conn.settimeout(0.2)
        conn.sendall(_render_response(status, headers, payload, close=True, head_only=False))
        conn.shutdown(socket.SHUT_WR)
        conn.setblocking(False)
        conn.recv(65536)  # drop what the client already sent, so closing does not reset the reply
    except OSError:
        pass
    finally:
        conn.close()


def _gateway_error(status: int, body: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
    """An error API Gateway itself produces (not the Lambda)."""
    kind = _ERROR_TYPES.get(status, "InternalServerErrorException")
    return status, {"Content-Type": "application/json", "x-amzn-ErrorType": kind}, json.dumps(body).encode()


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    defaults = GatewayLimits()
    parser = argparse.ArgumentParser(
        prog="python -m lambdas.local_gateway",
        description="Serve the Fluidity control plane (POST /wake, GET /status, POST /kill) locally, "
        "behind an API key, against the AWS endpoint in AWS_ENDPOINT_URL (e.g. moto).",
    )
    parser.add_argument("--api-key", required=True, help="value clients must send in the x-api-key header")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: any free port)")
    parser.add_argument(
        "--stage", default="prod", help="stage prefix of the URL (default: prod; '' for none)"
    )
    parser.add_argument(
        "--read-timeout",
        type=_positive_float,
        default=defaults.read_timeout,
        help=f"seconds a request head, then its body, may take to arrive in full "
        f"(default: {defaults.read_timeout:g})",
    )
    parser.add_argument(
        "--max-head-bytes",
        type=_positive_int,
        default=defaults.max_head_bytes,
        help=f"largest request line + headers (default: {defaults.max_head_bytes})",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=defaults.max_body_bytes,
        help=f"largest request body (default: {defaults.max_body_bytes})",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=defaults.max_connections,
        help=f"clients served at once; more get 503 (default: {defaults.max_connections})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    limits = GatewayLimits(args.read_timeout, args.max_head_bytes, args.max_body_bytes, args.max_connections)
    gateway = LocalGateway(
        args.api_key, host=args.host, port=args.port, stage=args.stage or None, limits=limits
    )
    try:
        url = gateway.start()
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(
        f"control plane listening on {url} (POST {url}/wake, GET {url}/status, POST {url}/kill)", flush=True
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        gateway.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
