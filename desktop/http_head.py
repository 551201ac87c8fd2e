"""HTTP/1.x message heads as a forward proxy sees them, sans I/O.

The proxy relays bodies verbatim and only needs the head: where the request goes, how
to rewrite it for the origin, and where each body ends so one client connection can
carry many requests. Keeping that here, free of sockets and clocks, lets every parsing
and framing rule be tested byte for byte.

Request parsing is strict where a lax parser would let two parties disagree about
message boundaries (request smuggling): control characters, obs-fold, whitespace before
the colon, conflicting Content-Length, Content-Length with Transfer-Encoding, and a
Connection option naming a framing field (which a proxy would otherwise have to remove).
It is lenient only where that cannot happen: bare LF line endings and empty lines before
a request line. The forwarded head states its framing in one canonical field, so the
origin cannot read it differently from the proxy.

Responses are relayed verbatim, so a malformed response field is skipped unless it could
change where the body ends, for the proxy or for a lax client: a field whose name looks
like a framing field, obs-fold, a bare CR or a NUL is a 502 instead (RFC 9112 §5.2, §2.2).
"""

from __future__ import annotations

import functools
import http
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from server.errors import FluidityError
from server.framing import MAX_HOST_LENGTH  # hosts travel in a tunnel OPEN frame

DEFAULT_MAX_HEAD_BYTES = 65536
DEFAULT_MAX_HEADER_COUNT = 100
#: A chunk-size line is a hex number plus optional extensions; nothing legitimate is this long.
MAX_CHUNK_LINE_BYTES = 4096
MAX_TRAILER_BYTES = 65536
#: Longer than any registered method; lets binary garbage (a TLS ClientHello) fail fast.
MAX_METHOD_LENGTH = 32

#: Headers that describe one hop, never forwarded (RFC 9110 §7.6.1, RFC 9112 §9.6).
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    }
)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
#: Field values may hold VCHAR, SP, HTAB and obs-text; every other control byte is refused.
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: A request target is visible ASCII only (RFC 9112 §3.2).
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_STATUS_CODE = re.compile(rb"[0-9]{3}")
_DIGITS = re.compile(r"[0-9]{1,19}")
_HEX_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_HOSTNAME = re.compile(r"[A-Za-z0-9._-]+")
_PORT = re.compile(r"[0-9]{1,5}")
_HEAD_END = re.compile(rb"\n\r?\n")
#: A CR that does not end a line: some parsers take it as a line break, so it could hide a field.
_BARE_CR = re.compile(rb"\r(?!\n)")
#: Optional whitespace around list members and values (RFC 9110 §5.6.3); str.strip() would also
#: eat NBSP and NEL, letting "\xa0chunked" count as chunked here but not at the origin.
_OWS = " \t"


class HttpHeadError(FluidityError, ValueError):
    """A message head the proxy refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class ChunkedBodyError(HttpHeadError):
    """A chunked body whose framing is broken, so its end cannot be known."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


@dataclass(frozen=True)
class _HeaderFields:
    """Ordered header fields with their original casing; duplicates are kept."""

    headers: tuple[tuple[str, str], ...]

    @functools.cached_property
    def _by_name(self) -> dict[str, tuple[str, ...]]:
        """Values by lower-cased name, built once: a request's head is asked for a field a
        dozen times on its way through the proxy."""
        index: dict[str, list[str]] = {}
        for key, value in self.headers:
            index.setdefault(key.lower(), []).append(value)
        return {key: tuple(values) for key, values in index.items()}

    def get_all(self, name: str) -> list[str]:
        return list(self._by_name.get(name.lower(), ()))

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def tokens(self, name: str) -> list[str]:
        """Comma-separated list members of every ``name`` field, lower-cased, empty ones dropped."""
        return _list_members(self.get_all(name))


def _list_members(values: Iterable[str]) -> list[str]:
    """List members trimmed of OWS only, so every byte that is not OWS stays significant."""
    return [item.strip(_OWS).lower() for value in values for item in value.split(",") if item.strip(_OWS)]


@dataclass(frozen=True)
class RequestHead(_HeaderFields):
    method: str
    target: str
    version: str

    @property
    def minor_version(self) -> int:
        return int(self.version[-1])


@dataclass(frozen=True)
class ResponseHead(_HeaderFields):
    version: str
    status: int
    reason: str

    @property
    def minor_version(self) -> int:
        return int(self.version[-1])


@dataclass(frozen=True)
class ProxyTarget:
    """Where a proxied request goes.

    ``authority`` is the host[:port] exactly as the client wrote it, for the Host header;
    ``host`` is what to dial (IPv6 without brackets); ``path`` is the origin-form target.
    """

    form: Literal["absolute", "authority"]
    host: str
    port: int
    authority: str
    path: str

    @property
    def display(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class BodyFraming:
    """How a message body ends: not at all, after ``length`` bytes, at the last chunk, or at EOF."""

    kind: Literal["none", "length", "chunked", "until_close"]
    length: int = 0


NO_BODY = BodyFraming("none")


# --------------------------------------------------------------------------- reading heads


def leading_empty_line_bytes(buffer: bytes | bytearray) -> int:
    """How many CR/LF bytes precede a message; RFC 9112 §2.2 says to skip them."""
    count = 0
    for byte in buffer:
        if byte not in (0x0D, 0x0A):
            break
        count += 1
    return count


def find_head_end(buffer: bytes | bytearray, start: int = 0) -> int | None:
    """Offset just past the empty line ending the head, or None if it is not complete yet.

    ``start`` lets a caller rescan only the newly received bytes (minus 3 for a split
    terminator), so a client dripping one byte at a time costs linear, not quadratic, work.
    """
    match = _HEAD_END.search(buffer, start)
    return match.end() if match else None


def check_request_prefix(buffer: bytes | bytearray) -> None:
    """Fail fast on bytes that can never start a request line (e.g. TLS sent to a plain proxy)."""
    for index, byte in enumerate(buffer):
        if byte == 0x20:
            if index == 0:
                raise HttpHeadError(400, "malformed request line: it starts with a space")
            return
        if byte not in _TOKEN_CHARS:
            raise HttpHeadError(400, "malformed request: this is not HTTP (bad byte in the method)")
        if index >= MAX_METHOD_LENGTH:
            raise HttpHeadError(400, "malformed request: method too long or not HTTP")


def _split_lines(raw: bytes) -> list[bytes]:
    text = raw[leading_empty_line_bytes(raw) :]
    lines = text.split(b"\n")
    while lines and lines[-1] in (b"", b"\r"):
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


#: Fields that decide where a message ends; a malformed one is never skipped over.
_FRAMING_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"connection"})
#: Fields a Connection option must never remove: the next hop would frame (or route) the
#: message differently from this one. RFC 9110 §7.6.1 forbids such options.
_END_TO_END_FRAMING = frozenset({"content-length", "transfer-encoding", "host"})


def _looks_like_framing_field(name: bytes) -> bool:
    """True if a lax parser, ignoring stray bytes in ``name``, could read it as a framing field."""
    return bytes(byte for byte in name.lower() if byte in _TOKEN_CHARS) in _FRAMING_FIELDS


def _field_error(line: bytes) -> str | None:
    """Why a header line is malformed, or None when it is a valid field."""
    if line[0] in (0x20, 0x09):
        return "obsolete line folding in a header field is not accepted"
    name, colon, value = line.partition(b":")
    if not colon:
        return "malformed header field: no colon"
    if not _TOKEN.fullmatch(name):
        if name.rstrip(b" \t") != name:
            return "malformed header field: whitespace before the colon"
        return "malformed header field name"
    if _BAD_VALUE_BYTE.search(value):
        return f"control character in header field {name.decode('ascii')!r}"
    return None


def _parse_fields(
    lines: list[bytes], max_header_count: int, status_for_limit: int, *, tolerate_malformed: bool = False
) -> tuple[tuple[str, str], ...]:
    """Header fields in order; ``tolerate_malformed`` skips bad lines that cannot affect framing.

    Requests are parsed strictly. Responses are relayed verbatim, so a malformed line the
    client may or may not accept only matters if it could change where the body ends.
    """
    if len(lines) > max_header_count:
        raise HttpHeadError(status_for_limit, f"too many header fields (limit {max_header_count})")
    fields: list[tuple[str, str]] = []
    for line in lines:
        if not line:
            raise HttpHeadError(400, "malformed header section: unexpected empty line")
        problem = _field_error(line)
        if problem is not None:
            # Obs-fold is never skipped: a proxy must not relay it (RFC 9112 §5.2), and a
            # client that does not unfold could read the folded text as a field of its own.
            folded = line[0] in (0x20, 0x09)
            if not tolerate_malformed or folded or _looks_like_framing_field(line.partition(b":")[0]):
                raise HttpHeadError(400, problem)
            continue
        name, _, value = line.partition(b":")
        fields.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    return tuple(fields)


def _parse_version(raw: bytes) -> str:
    match = _VERSION.fullmatch(raw)
    if not match:
        raise HttpHeadError(400, "malformed HTTP version")
    if match.group(1) != b"1":
        raise HttpHeadError(505, f"HTTP version {raw.decode('ascii')} is not supported; use HTTP/1.1")
    return raw.decode("ascii")


def parse_request_head(raw: bytes, *, max_header_count: int = DEFAULT_MAX_HEADER_COUNT) -> RequestHead:
    """Parse a request head (through its terminating empty line) into a RequestHead."""
    lines = _split_lines(raw)
    if not lines:
        raise HttpHeadError(400, "empty request")
    request_line = lines[0]
    if _BAD_VALUE_BYTE.search(request_line) or b"\t" in request_line:
        raise HttpHeadError(400, "control character in the request line")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise HttpHeadError(400, "malformed request line: expected 'METHOD target HTTP/1.1'")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpHeadError(400, "malformed request line: invalid method")
    if not _TARGET.fullmatch(target):
        raise HttpHeadError(400, "malformed request target")
    head = RequestHead(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        version=_parse_version(version),
        headers=_parse_fields(lines[1:], max_header_count, 431),
    )
    check_connection_options(head)
    return head


def check_connection_options(request: RequestHead) -> None:
    """Refuse a Connection option naming Content-Length, Transfer-Encoding or Host (400).

    A proxy must remove every field a Connection option names (RFC 9110 §7.6.1). Removing
    a framing field would make the origin see a different message boundary than the proxy
    relays (request smuggling), and keeping it would ignore the option; so refuse.
    """
    named = _END_TO_END_FRAMING.intersection(request.tokens("connection"))
    if named:
        raise HttpHeadError(
            400,
            f"the Connection header names {', '.join(sorted(named))}, which must reach the origin: "
            "framing and Host fields cannot be hop-by-hop options",
        )


def oversized_request_head(buffer: bytes | bytearray, limit: int) -> HttpHeadError:
    """The error for a request head over ``limit`` bytes: 414 if the request line alone is, else 431.

    RFC 9112 §3 asks for 414 URI Too Long when the target is what is too long; telling the
    two apart tells the user whether to shorten the URL or the headers (cookies, usually).
    """
    start = leading_empty_line_bytes(buffer)
    line_end = buffer.find(b"\n", start)
    if line_end < 0 or line_end - start >= limit:
        return HttpHeadError(414, f"request URI too long: the request line is longer than {limit} bytes")
    return HttpHeadError(
        431, f"request header fields too large: the request head is larger than {limit} bytes"
    )


def parse_response_head(raw: bytes, *, max_header_count: int = 512) -> ResponseHead:
    """Parse a response head; errors carry 502 because the fault is upstream's.

    Malformed lines that cannot change framing are left out of ``headers`` (they are
    still relayed verbatim with the rest of the head).
    """
    try:
        lines = _split_lines(raw)
        if not lines:
            raise HttpHeadError(502, "empty response head")
        status_line = lines[0]
        if _BAD_VALUE_BYTE.search(status_line):
            raise HttpHeadError(502, "control character in the status line")
        if b"\x00" in raw or _BARE_CR.search(raw, leading_empty_line_bytes(raw)):
            # Relayed verbatim, these could split or end a line for the client but not for us.
            raise HttpHeadError(502, "NUL or bare CR in the response head")
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not _STATUS_CODE.fullmatch(code) or code.startswith(b"0"):
            raise HttpHeadError(502, "malformed status line")
        return ResponseHead(
            version=_parse_version(version),
            status=int(code),
            reason=reason.decode("latin-1"),
            headers=_parse_fields(lines[1:], max_header_count, 502, tolerate_malformed=True),
        )
    except HttpHeadError as error:
        raise HttpHeadError(502, f"upstream sent a malformed response: {error.message}") from None


# --------------------------------------------------------------------------- targets


def _parse_port(text: str, default: int | None) -> int:
    if text == "" and default is not None:
        return default
    if not _PORT.fullmatch(text) or not 0 < int(text) < 65536:
        raise HttpHeadError(400, f"invalid port {text!r} in the request target")
    return int(text)


def _parse_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    if "@" in authority:
        raise HttpHeadError(400, "user information in the request URI is not supported")
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise HttpHeadError(400, "malformed IPv6 address in the request target")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise HttpHeadError(400, f"invalid IPv6 address {host!r}") from None
        if not rest and default_port is None:
            raise HttpHeadError(400, "CONNECT target must be host:port")
        port_text = rest[1:]
    else:
        host, colon, port_text = authority.rpartition(":")
        if not colon:
            host, port_text = authority, ""
            if default_port is None:
                raise HttpHeadError(400, "CONNECT target must be host:port")
        if not _HOSTNAME.fullmatch(host):
            raise HttpHeadError(400, f"invalid host {host!r} in the request target")
    if len(host) > MAX_HOST_LENGTH:
        raise HttpHeadError(400, "host name too long")
    return host, _parse_port(port_text, default_port)


def classify_target(request: RequestHead) -> ProxyTarget:
    """Work out where a request made to a forward proxy goes, or say why it cannot go anywhere."""
    target = request.target
    if len(request.get_all("host")) > 1:
        raise HttpHeadError(400, "more than one Host header field")
    if request.method == "CONNECT":
        host, port = _parse_authority(target, None)
        return ProxyTarget("authority", host, port, target, "")
    if target.startswith("/") or target == "*":
        raise HttpHeadError(
            400,
            "this is a proxy: send the full URL (GET http://host/path), e.g. with curl -x or HTTP_PROXY",
        )
    scheme, separator, rest = target.partition("://")
    scheme = scheme.lower()
    if not separator:
        raise HttpHeadError(400, "malformed request target: expected http://host/path")
    if scheme in ("https", "wss"):
        raise HttpHeadError(
            400,
            f"{scheme}:// URLs must be tunnelled with CONNECT; configure this proxy as the HTTPS proxy "
            "too (HTTPS_PROXY) instead of sending https:// URLs to it",
        )
    if scheme not in ("http", "ws"):
        raise HttpHeadError(400, f"unsupported URL scheme {scheme!r}: only http:// (and CONNECT)")
    split_at = min((index for index in (rest.find(c) for c in "/?#") if index >= 0), default=len(rest))
    authority, path = rest[:split_at], rest[split_at:].partition("#")[0]
    if not authority:
        raise HttpHeadError(400, "the request URL has no host")
    host, port = _parse_authority(authority, 80)
    if not path.startswith("/"):
        path = "/" + path
    return ProxyTarget("absolute", host, port, authority, path)


# --------------------------------------------------------------------------- semantics


def is_websocket_upgrade(request: RequestHead) -> bool:
    return (
        request.method == "GET"
        and "websocket" in request.tokens("upgrade")
        and "upgrade" in request.tokens("connection")
    )


def expects_continue(request: RequestHead) -> bool:
    """True for an HTTP/1.1 ``Expect: 100-continue`` (HTTP/1.0 expectations are ignored, RFC 9110)."""
    return request.minor_version >= 1 and "100-continue" in request.tokens("expect")


def request_keeps_alive(request: RequestHead) -> bool:
    tokens = request.tokens("connection")
    if "close" in tokens:
        return False
    return request.minor_version >= 1 or "keep-alive" in tokens


def response_keeps_alive(response: ResponseHead) -> bool:
    tokens = response.tokens("connection")
    if "close" in tokens:
        return False
    return response.minor_version >= 1 or "keep-alive" in tokens


def _content_length(values: list[str], status: int) -> int:
    """The one length all Content-Length values agree on (RFC 9110 §8.6), or an error."""
    lengths = {item.strip(_OWS) for value in values for item in value.split(",")}
    if len(lengths) != 1:
        raise HttpHeadError(status, "conflicting Content-Length values")
    (text,) = lengths
    if not _DIGITS.fullmatch(text):
        raise HttpHeadError(status, f"invalid Content-Length {text!r}")
    return int(text)


def request_body_framing(request: RequestHead) -> BodyFraming:
    """Where the request body ends (RFC 9112 §6.3); ambiguous framing is refused with 400."""
    codings = request.tokens("transfer-encoding")
    lengths = request.get_all("content-length")
    if request.get_all("transfer-encoding"):
        if lengths:
            raise HttpHeadError(400, "both Transfer-Encoding and Content-Length are present")
        if request.minor_version == 0:
            raise HttpHeadError(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
        if not codings or codings[-1] != "chunked" or codings.count("chunked") > 1:
            raise HttpHeadError(400, "Transfer-Encoding must end with a single 'chunked'")
        return BodyFraming("chunked")
    if lengths:
        length = _content_length(lengths, 400)
        return BodyFraming("length", length) if length else NO_BODY
    return NO_BODY


def response_body_framing(request_method: str, response: ResponseHead) -> BodyFraming:
    """Where the response body ends (RFC 9112 §6.3), given the method that asked for it.

    Only the fields present count: the head is relayed verbatim (see
    ``relayable_response_head``), so a Connection option naming a framing field removes
    nothing, and the client frames the body by the same fields the proxy does.
    """
    if request_method == "HEAD" or response.status < 200 or response.status in (204, 304):
        return NO_BODY
    lengths = response.get_all("content-length")
    length = None
    if lengths:
        # Checked even beside Transfer-Encoding: an origin sending conflicting lengths cannot
        # be trusted to frame anything.
        try:
            length = _content_length(lengths, 502)
        except HttpHeadError as error:
            raise HttpHeadError(502, f"upstream sent a malformed response: {error.message}") from None
    if response.get_all("transfer-encoding"):
        codings = response.tokens("transfer-encoding")
        if response.minor_version >= 1 and codings and codings[-1] == "chunked":
            return BodyFraming("chunked")
        return BodyFraming("until_close")
    if length is not None:
        return BodyFraming("length", length)
    return BodyFraming("until_close")


def _canonical_framing_value(request: RequestHead, key: str) -> str:
    """The single value to forward for a framing field, so the origin cannot read it another way.

    Duplicate or listed lengths become one number; transfer codings become one lower-case
    list, so an origin that reads only the first field, or compares case-sensitively,
    still sees the final ``chunked`` the proxy frames by.
    """
    if key == "content-length":
        return str(_content_length(request.get_all(key), 400))
    return ", ".join(request.tokens(key))


def build_forward_head(request: RequestHead, target: ProxyTarget, *, client_keeps_alive: bool) -> bytes:
    """The head to send to the origin: origin-form target, Host from the URI, no hop-by-hop fields.

    The proxy states its own connection intent (close, or keep-alive for HTTP/1.0) because
    the response is relayed verbatim and must carry semantics the client expects. A
    ``100-continue`` expectation is dropped because the proxy answers it itself. Framing
    fields are never dropped and are forwarded canonically, once each.
    """
    check_connection_options(request)
    request_body_framing(request)  # refuses framing the origin could read differently
    websocket = is_websocket_upgrade(request)
    dropped = (set(HOP_BY_HOP_HEADERS) | set(request.tokens("connection"))) - _END_TO_END_FRAMING
    if expects_continue(request):
        dropped.add("expect")
    fields: list[tuple[str, str]] = []
    written: set[str] = set()
    for name, value in request.headers:
        key = name.lower()
        if key in _END_TO_END_FRAMING:
            if key not in written:
                written.add(key)
                canonical = target.authority if key == "host" else _canonical_framing_value(request, key)
                fields.append((name, canonical))
        elif key not in dropped or (websocket and key == "upgrade"):
            fields.append((name, value))
    if "host" not in written:
        fields.insert(0, ("Host", target.authority))
    if websocket:
        fields.append(("Connection", "Upgrade"))
    elif not client_keeps_alive:
        fields.append(("Connection", "close"))
    elif request.minor_version == 0:
        fields.append(("Connection", "keep-alive"))
    return _render_head(f"{request.method} {target.path} {request.version}", fields)


def relayable_response_head(raw: bytes, response: ResponseHead) -> bytes:
    """The response head to relay: verbatim, minus Content-Length when Transfer-Encoding is present.

    Transfer-Encoding overrides Content-Length, and an intermediary forwarding such a
    message must remove the Content-Length first (RFC 9112 §6.3), or a client that trusts
    the length would split the response differently from the proxy.
    """
    if not (response.get_all("transfer-encoding") and response.get_all("content-length")):
        return raw
    lines = raw.split(b"\n")
    kept = [lines[0]] + [
        line for line in lines[1:] if line.partition(b":")[0].strip(b" \t").lower() != b"content-length"
    ]
    return b"\n".join(kept)


def _render_head(start_line: str, fields: Iterable[tuple[str, str]]) -> bytes:
    lines = [start_line, *(f"{name}: {value}" for name, value in fields), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def render_error_response(
    status: int, message: str, *, include_body: bool = True, proxy_status_error: str | None = None
) -> bytes:
    """A complete ``Connection: close`` response with a short text/plain body naming the cause."""
    body = f"Fluidity proxy: {message}\n".encode()
    fields = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("Connection", "close"),
    ]
    if proxy_status_error:
        fields.append(("Proxy-Status", f"fluidity; error={proxy_status_error}"))
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    head = _render_head(f"HTTP/1.1 {status} {phrase}", fields)
    return head + body if include_body else head


def render_file_response(
    body: bytes, content_type: str, *, keep_alive: bool, include_body: bool = True
) -> bytes:
    """``200 OK`` with ``body``: what the proxy serves itself (the PAC file)."""
    fields = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("Connection", "keep-alive" if keep_alive else "close"),
    ]
    head = _render_head("HTTP/1.1 200 OK", fields)
    return head + body if include_body else head


# --------------------------------------------------------------------------- chunked bodies


class ChunkedScanner:
    """Finds where a chunked body (last chunk plus trailers) ends, without decoding it.

    The proxy relays chunked bodies byte for byte; this only tracks state so it knows
    when the message is over. Chunk data is skipped by arithmetic, so a large chunk costs
    no per-byte Python work; only size lines and trailers are looked at.
    """

    _SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = bytearray()
        self._trailer_bytes = 0

    @property
    def done(self) -> bool:
        return self._state == self._DONE

    def feed(self, data: bytes | bytearray, start: int = 0, end: int | None = None) -> int:
        """Scan ``data[start:end]``; return how many of those bytes belong to the body.

        Fewer than offered means the body ended and the rest belongs to the next message.
        """
        stop = len(data) if end is None else end
        position = start
        while position < stop and self._state != self._DONE:
            if self._state == self._DATA:
                taken = min(self._remaining, stop - position)
                position += taken
                self._remaining -= taken
                if self._remaining == 0:
                    self._state = self._DATA_END
                continue
            newline = data.find(b"\n", position, stop)
            if newline < 0:
                self._line += data[position:stop]
                self._check_line_length()
                position = stop
                break
            self._line += data[position:newline]
            self._check_line_length()
            position = newline + 1
            line = bytes(self._line)
            self._line.clear()
            self._on_line(line[:-1] if line.endswith(b"\r") else line)
        return position - start

    def _check_line_length(self) -> None:
        in_trailer = self._state == self._TRAILER
        limit = MAX_TRAILER_BYTES - self._trailer_bytes if in_trailer else MAX_CHUNK_LINE_BYTES
        if len(self._line) > limit:
            raise ChunkedBodyError("chunked body: line too long")

    def _on_line(self, line: bytes) -> None:
        if self._state == self._SIZE:
            size_text = line.split(b";", 1)[0].strip(b" \t")
            if not _HEX_SIZE.fullmatch(size_text):
                raise ChunkedBodyError("chunked body: invalid chunk size")
            size = int(size_text, 16)
            self._remaining = size
            self._state = self._DATA if size else self._TRAILER
        elif self._state == self._DATA_END:
            if line:
                raise ChunkedBodyError("chunked body: chunk data longer than its size")
            self._state = self._SIZE
        elif self._state == self._TRAILER:
            if not line:
                self._state = self._DONE
                return
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > MAX_TRAILER_BYTES:
                raise ChunkedBodyError("chunked body: trailer section too large")
            if line[0] in (0x20, 0x09) or not _TOKEN.fullmatch(line.partition(b":")[0]):
                raise ChunkedBodyError("chunked body: malformed trailer field")
            if b"\r" in line or b"\x00" in line:
                raise ChunkedBodyError("chunked body: control character in a trailer field")
