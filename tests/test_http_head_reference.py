"""desktop/http_head.py checked against h11, an independent HTTP/1.1 parser, on generated heads.

Request smuggling and response splitting need two parsers that disagree about a message.
So generated heads, valid and hostile, go to both; they must agree on accept/reject and,
when both accept, on what the message means (method, target, version, body framing,
keep-alive). Every place Fluidity deliberately differs is a named row of
REQUEST_DIFFERENCES / RESPONSE_DIFFERENCES with its reason, and each row's example is
checked to still differ as stated, so the table cannot rot. h11 is a test-only dependency.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import h11
import pytest
from h11._connection import _body_framing, _keep_alive  # what h11 decides, without driving a body
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from desktop.http_head import (
    DEFAULT_MAX_HEADER_COUNT,
    BodyFraming,
    HttpHeadError,
    build_forward_head,
    check_request_prefix,
    classify_target,
    find_head_end,
    leading_empty_line_bytes,
    parse_request_head,
    parse_response_head,
    request_body_framing,
    request_keeps_alive,
    response_body_framing,
    response_keeps_alive,
)

#: Enough to cover the field pools in combination while keeping each test to a second or two.
EXAMPLES = 300
H11_MAX_HEAD = 1 << 20  # h11 defaults to 16 KiB; the proxy's byte limit is tested elsewhere


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    """What one parser made of a head; fields other than ``outcome`` only when accepted."""

    outcome: Literal["accepted", "rejected", "incomplete"]
    method: str = ""
    target: str = ""
    version: str = ""
    framing: str = ""
    keep_alive: bool | None = None


REJECTED = Verdict("rejected")
INCOMPLETE = Verdict("incomplete")


def _framing_text(framing: BodyFraming) -> str:
    if framing.kind == "length":
        return f"length:{framing.length}" if framing.length else "none"
    return framing.kind


def _h11_framing_text(method: bytes, event: h11.Request | h11.Response) -> str:
    kind, args = _body_framing(method, event)
    if kind == "content-length":
        return f"length:{args[0]}" if args[0] else "none"
    return {"chunked": "chunked", "http/1.0": "until_close"}[kind]


def fluidity_request(raw: bytes) -> tuple[Verdict, bytes | None]:
    """The proxy's own path for a request head, and the head it would forward (if any)."""
    buffer = raw[leading_empty_line_bytes(raw) :]
    try:
        check_request_prefix(buffer[:64])
        end = find_head_end(buffer)
        if end is None:
            return INCOMPLETE, None
        head = parse_request_head(buffer[:end])
        target = classify_target(head)
        framing = request_body_framing(head)
        keep_alive = request_keeps_alive(head)
        forwarded = None
        if head.method != "CONNECT":
            forwarded = build_forward_head(head, target, client_keeps_alive=keep_alive)
    except HttpHeadError:
        return REJECTED, None
    verdict = Verdict("accepted", head.method, head.target, head.version, _framing_text(framing), keep_alive)
    return verdict, forwarded


def h11_request(raw: bytes) -> Verdict:
    server = h11.Connection(h11.SERVER, max_incomplete_event_size=H11_MAX_HEAD)
    server.receive_data(raw)
    try:
        event = server.next_event()
    except h11.ProtocolError:
        return REJECTED
    if event is h11.NEED_DATA:
        return INCOMPLETE
    assert isinstance(event, h11.Request)
    return Verdict(
        "accepted",
        event.method.decode("ascii"),
        event.target.decode("ascii"),
        "HTTP/" + event.http_version.decode("ascii"),
        _h11_framing_text(event.method, event),
        _keep_alive(event),
    )


def fluidity_response(method: str, raw: bytes) -> Verdict:
    """The proxy's path for a response head: skip empty lines, find the end, parse, frame."""
    buffer = raw[leading_empty_line_bytes(raw) :]
    end = find_head_end(buffer)
    if end is None:
        return INCOMPLETE
    try:
        head = parse_response_head(buffer[:end])
        if head.status < 200:  # interim: no body, and the connection waits for the final head
            return Verdict("accepted", version=head.version, framing="none")
        framing = response_body_framing(method, head)
        keep_alive = response_keeps_alive(head)
    except HttpHeadError:
        return REJECTED
    return Verdict("accepted", version=head.version, framing=_framing_text(framing), keep_alive=keep_alive)


def h11_response(method: str, raw: bytes) -> Verdict:
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=H11_MAX_HEAD)
    client.send(h11.Request(method=method, target="/", headers=[("Host", "example.com")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    try:
        event = client.next_event()
    except h11.ProtocolError:
        return REJECTED
    if event is h11.NEED_DATA:
        return INCOMPLETE
    version = "HTTP/" + event.http_version.decode("ascii")
    if isinstance(event, h11.InformationalResponse):
        return Verdict("accepted", version=version, framing="none")
    assert isinstance(event, h11.Response)
    return Verdict(
        "accepted",
        version=version,
        framing=_h11_framing_text(method.encode("ascii"), event),
        keep_alive=_keep_alive(event),
    )


# --------------------------------------------------------------------------- loose head reading
# Only for deciding which known difference a generated head exhibits; never the code under test.


def _lines(raw: bytes) -> list[bytes]:
    head = re.split(rb"\n\r?\n", raw.lstrip(b"\r\n"), maxsplit=1)[0]
    return [line.removesuffix(b"\r") for line in head.split(b"\n")]


def _start(raw: bytes) -> list[bytes]:
    return _lines(raw)[0].split(b" ")


def _version(raw: bytes) -> bytes:
    parts = _start(raw)
    if parts[0].startswith(b"HTTP/"):  # a status line
        return parts[0]
    return parts[2] if len(parts) == 3 else b""


def _values(raw: bytes, name: bytes) -> list[bytes]:
    return [
        value.strip(b" \t")
        for field_name, _, value in (line.partition(b":") for line in _lines(raw)[1:])
        if field_name.lower() == name
    ]


def _members(raw: bytes, name: bytes) -> list[bytes]:
    return [m.strip(b" \t").lower() for v in _values(raw, name) for m in v.split(b",") if m.strip(b" \t")]


#: RFC 9110 §5.1 / §5.5 field-line grammar (no obs-fold): token ":" OWS value OWS.
_FIELD_LINE = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t]*(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?[ \t]*"
)
_FRAMING_NAMES = (b"content-length", b"transfer-encoding", b"connection")
_TOKEN_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def _folded(raw: bytes) -> bool:
    return any(line[:1] in (b" ", b"\t") for line in _lines(raw)[1:])


def _has_te_other_than_lone_chunked(raw: bytes) -> bool:
    values = _values(raw, b"transfer-encoding")
    return bool(values) and (len(values) > 1 or values[0].lower() != b"chunked")


def _long_length(raw: bytes) -> bool:
    return any(len(m) >= 20 for m in _members(raw, b"content-length"))


def _http10_keep_alive(raw: bytes) -> bool:
    tokens = _members(raw, b"connection")
    return _version(raw) == b"HTTP/1.0" and b"keep-alive" in tokens and b"close" not in tokens


def _major_not_1(raw: bytes) -> bool:
    return re.fullmatch(rb"HTTP/[02-9]\.[0-9]", _version(raw)) is not None


# --------------------------------------------------------------------------- known differences


Direction = Literal["fluidity rejects", "h11 rejects", "meaning differs"]
#: Whether a difference applies to a head, given the method of the request (for responses).
Predicate = Callable[[bytes, str], bool]


def _on_head(check: Callable[[bytes], bool]) -> Predicate:
    return lambda raw, method: check(raw)


@dataclass(frozen=True)
class Difference:
    """One deliberate disagreement with h11: when it applies, which way, why, and an example."""

    name: str
    direction: Direction
    reason: str
    applies: Predicate
    example: bytes
    method: str = "GET"  # for responses: the request method the example answers


def _direction(ours: Verdict, theirs: Verdict) -> Direction | None:
    if ours == theirs:
        return None
    if ours.outcome == "accepted" and theirs.outcome == "accepted":
        return "meaning differs"
    if theirs.outcome == "accepted":
        return "fluidity rejects"
    if ours.outcome == "accepted":
        return "h11 rejects"
    return None  # rejected vs incomplete: neither side would relay anything


#: Targets the generator uses, split by whether a forward proxy can route them.
ABSOLUTE_TARGETS = (
    b"http://example.com/",
    b"http://example.com:8080/a?b=c",
    b"HTTP://Example.COM",
    b"http://[::1]:8081/x",
    b"ws://chat.example/s",
    b"http://example.com/p#frag",
)
AUTHORITY_TARGETS = (b"example.com:443", b"[::1]:8443")
UNROUTABLE_TARGETS = (
    b"/origin-form",
    b"*",
    b"https://example.com/",
    b"ftp://example.com/",
    b"http:///no-host",
    b"http://user@example.com/",
    b"http://exa$mple.com/",
    b"example.com",
)


def _unroutable(raw: bytes) -> bool:
    parts = _start(raw)
    if len(parts) != 3:
        return False
    method, target = parts[0], parts[1]
    return target not in (AUTHORITY_TARGETS if method == b"CONNECT" else ABSOLUTE_TARGETS)


def _request(*fields: str, line: str = "GET http://example.com/ HTTP/1.1", host: bool = True) -> bytes:
    lines = [line, *(["Host: example.com"] if host else []), *fields, "", ""]
    return "\r\n".join(lines).encode("latin-1")


REQUEST_DIFFERENCES = (
    Difference(
        "empty lines before the request line",
        "h11 rejects",
        "RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request line "
        "(old clients send CRLF after a POST body); the head is re-rendered, so nothing is relayed",
        _on_head(lambda raw: raw[:1] in (b"\r", b"\n")),
        b"\r\n" + _request(),
    ),
    Difference(
        "obs-fold",
        "fluidity rejects",
        "RFC 9112 §5.2 lets a server reject obs-fold with 400; unfolding would forward a value "
        "the origin may have split differently",
        _on_head(_folded),
        _request("X-A: 1", " folded"),
    ),
    Difference(
        "transfer codings other than one lone 'chunked' field",
        "h11 rejects",
        "RFC 9112 §6.1/§6.3: codings ending in chunked frame the body as chunked; the proxy relays "
        "the body undecoded (forwarding one canonical list), so it need not implement gzip; h11 only "
        "implements a single 'chunked' (501)",
        _on_head(_has_te_other_than_lone_chunked),
        _request("Transfer-Encoding: gzip, chunked", line="POST http://example.com/ HTTP/1.1"),
    ),
    Difference(
        "Content-Length together with Transfer-Encoding",
        "fluidity rejects",
        "RFC 9112 §6.1: 'ought to be handled as an error' - the classic smuggling vector; an "
        "intermediary forwarding it would have to drop Content-Length, refusing is simpler",
        _on_head(lambda raw: bool(_values(raw, b"content-length") and _values(raw, b"transfer-encoding"))),
        _request("Content-Length: 3", "Transfer-Encoding: chunked", line="POST http://example.com/ HTTP/1.1"),
    ),
    Difference(
        "Transfer-Encoding in an HTTP/1.0 request",
        "fluidity rejects",
        "RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing",
        _on_head(lambda raw: _version(raw) == b"HTTP/1.0" and bool(_values(raw, b"transfer-encoding"))),
        _request("Transfer-Encoding: chunked", line="POST http://example.com/ HTTP/1.0"),
    ),
    Difference(
        "a Connection option naming Content-Length, Transfer-Encoding or Host",
        "fluidity rejects",
        "issue 9: a proxy must remove fields a Connection option names (RFC 9110 §7.6.1), and "
        "removing a framing field desyncs the origin; the same section forbids such options. "
        "h11 is not an intermediary and ignores them",
        _on_head(
            lambda raw: bool(
                {b"content-length", b"transfer-encoding", b"host"} & set(_members(raw, b"connection"))
            )
        ),
        _request("Connection: content-length", "Content-Length: 5", line="POST http://example.com/ HTTP/1.1"),
    ),
    Difference(
        "an HTTP major version other than 1",
        "fluidity rejects",
        "only HTTP/1.x is spoken here: 505 (RFC 9110 §15.6.6); h11 parses any HTTP/d.d",
        _on_head(_major_not_1),
        _request(line="GET http://example.com/ HTTP/2.0"),
    ),
    Difference(
        "no Host field in an HTTP/1.1 request",
        "h11 rejects",
        "a proxy MUST ignore Host for an absolute-form target and use the URI's authority "
        "(RFC 9112 §3.2.2), which it writes as Host itself",
        _on_head(lambda raw: _version(raw) == b"HTTP/1.1" and not _values(raw, b"host")),
        _request(host=False),
    ),
    Difference(
        "HTTP/1.0 keep-alive",
        "meaning differs",
        "the HTTP/1.0 keep-alive extension (RFC 9112 Appendix C.2.2) is honoured; h11 closes "
        "every HTTP/1.0 connection",
        _on_head(_http10_keep_alive),
        _request("Connection: keep-alive", line="GET http://example.com/ HTTP/1.0"),
    ),
    Difference(
        "a target a forward proxy cannot route",
        "fluidity rejects",
        "a forward proxy needs an http/ws absolute-form URI or, for CONNECT, host:port "
        "(RFC 9112 §3.2.2-3.2.3); h11 is a server and does not interpret targets",
        _on_head(_unroutable),
        _request(line="GET /origin-form HTTP/1.1"),
    ),
    Difference(
        "a Content-Length of 20 digits",
        "fluidity rejects",
        "19 digits (under 10^19 bytes, the signed 64-bit range origins use) is beyond any real "
        "body; h11 allows 20",
        _on_head(_long_length),
        _request("Content-Length: 10000000000000000000", line="POST http://example.com/ HTTP/1.1"),
    ),
    Difference(
        "a control character other than NUL, CR or LF in a field value",
        "fluidity rejects",
        "RFC 9110 §5.5: such values are invalid and only MAY be kept; the proxy forwards request "
        "fields to origins of unknown strictness, so it refuses them (h11 only refuses NUL and "
        "whitespace controls)",
        _on_head(lambda raw: any(re.search(rb"[\x01-\x08\x0e-\x1f\x7f]", line) for line in _lines(raw)[1:])),
        _request("X-Ctl: a\x01b"),
    ),
    Difference(
        "more header fields than the proxy's limit",
        "fluidity rejects",
        f"431 beyond {DEFAULT_MAX_HEADER_COUNT} fields bounds per-request work; h11 limits bytes only",
        _on_head(lambda raw: len(_lines(raw)) - 1 > DEFAULT_MAX_HEADER_COUNT),
        _request(*(f"X-{i}: {i}" for i in range(DEFAULT_MAX_HEADER_COUNT))),
    ),
)


def _response(status_line: str, *fields: str) -> bytes:
    return "\r\n".join([status_line, *fields, "", ""]).encode("latin-1")


def _skipped_field(raw: bytes) -> bool:
    return any(
        not _FIELD_LINE.fullmatch(line)
        and line[:1] not in (b" ", b"\t")
        and b"\x00" not in line
        and b"\r" not in line
        and bytes(b for b in line.partition(b":")[0].lower() if b in _TOKEN_BYTES) not in _FRAMING_NAMES
        for line in _lines(raw)[1:]
    )


def _bodiless_with_framing_fields(raw: bytes, method: str) -> bool:
    parts = _start(raw)
    status = parts[1] if len(parts) > 1 else b""
    bodiless = method == "HEAD" or status[:1] == b"1" or status in (b"204", b"304")
    return bodiless and bool(_values(raw, b"content-length") or _values(raw, b"transfer-encoding"))


RESPONSE_DIFFERENCES = (
    Difference(
        "empty lines before the status line",
        "h11 rejects",
        "skipped for robustness like before a request (RFC 9112 §2.2); they are not relayed",
        _on_head(lambda raw: raw[:1] in (b"\r", b"\n")),
        b"\r\n" + _response("HTTP/1.1 200 OK", "Content-Length: 0"),
    ),
    Difference(
        "obs-fold in a response",
        "fluidity rejects",
        "RFC 9112 §5.2: a proxy MUST answer 502 or unfold before forwarding; the head is relayed "
        "verbatim, so 502 (a client that does not unfold could read the folded text as a field)",
        _on_head(_folded),
        _response("HTTP/1.1 200 OK", "X-A: 1", " folded", "Content-Length: 0"),
    ),
    Difference(
        "a malformed field that cannot change framing",
        "h11 rejects",
        "the head is relayed verbatim and the client judges such a line itself; it is skipped "
        "because it cannot move the body's end (framing-like names, NUL, bare CR and obs-fold are "
        "502), and refusing would break sloppy but harmless origins",
        _on_head(_skipped_field),
        _response("HTTP/1.1 200 OK", "Server : odd", "Content-Length: 0"),
    ),
    Difference(
        "transfer codings other than one lone 'chunked' field",
        "h11 rejects",
        "RFC 9112 §6.3: a final chunked frames the body as chunked, any other final coding means "
        "the body runs to close; h11 only implements a single 'chunked'",
        _on_head(_has_te_other_than_lone_chunked),
        _response("HTTP/1.1 200 OK", "Transfer-Encoding: gzip"),
    ),
    Difference(
        "Transfer-Encoding in an HTTP/1.0 response",
        "meaning differs",
        "RFC 9112 §6.1: HTTP/1.0 with Transfer-Encoding has faulty framing, so read to close and "
        "close; h11 decodes it as chunked",
        _on_head(lambda raw: _version(raw) == b"HTTP/1.0" and bool(_values(raw, b"transfer-encoding"))),
        _response("HTTP/1.0 200 OK", "Transfer-Encoding: chunked"),
    ),
    Difference(
        "HTTP/1.0 keep-alive",
        "meaning differs",
        "the HTTP/1.0 keep-alive extension (RFC 9112 Appendix C.2.2) is honoured; h11 never keeps "
        "an HTTP/1.0 connection",
        _on_head(_http10_keep_alive),
        _response("HTTP/1.0 200 OK", "Connection: keep-alive", "Content-Length: 0"),
    ),
    Difference(
        "an HTTP major version other than 1",
        "fluidity rejects",
        "only HTTP/1.x is spoken upstream; anything else is a 502",
        _on_head(_major_not_1),
        _response("HTTP/2.0 200 OK", "Content-Length: 0"),
    ),
    Difference(
        "framing fields on a response that has no body",
        "h11 rejects",
        "1xx, 204, 304 and answers to HEAD have no body whatever Content-Length or "
        "Transfer-Encoding say (RFC 9112 §6.3 rule 1), so they are not evaluated; h11 validates them",
        _bodiless_with_framing_fields,
        _response("HTTP/1.1 200 OK", "Content-Length: lots"),
        method="HEAD",
    ),
    Difference(
        "a control character in the reason phrase",
        "fluidity rejects",
        "RFC 9112 §4: reason-phrase is HTAB, SP, VCHAR and obs-text; control bytes are not relayed",
        _on_head(lambda raw: re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", _lines(raw)[0]) is not None),
        _response("HTTP/1.1 200 O\x01K", "Content-Length: 0"),
    ),
    Difference(
        "a Content-Length of 20 digits",
        "fluidity rejects",
        "as for requests: 19 digits is beyond any real body",
        _on_head(_long_length),
        _response("HTTP/1.1 200 OK", "Content-Length: 10000000000000000000"),
    ),
)


@pytest.mark.parametrize("difference", REQUEST_DIFFERENCES, ids=lambda d: d.name)
def test_each_known_request_difference_still_differs_as_stated(difference: Difference) -> None:
    assert difference.applies(difference.example, "")
    ours, _ = fluidity_request(difference.example)
    assert _direction(ours, h11_request(difference.example)) == difference.direction


@pytest.mark.parametrize("difference", RESPONSE_DIFFERENCES, ids=lambda d: d.name)
def test_each_known_response_difference_still_differs_as_stated(difference: Difference) -> None:
    method = difference.method
    assert difference.applies(difference.example, method)
    assert (
        _direction(fluidity_response(method, difference.example), h11_response(method, difference.example))
        == difference.direction
    )


def _explain(
    differences: tuple[Difference, ...], raw: bytes, ours: Verdict, theirs: Verdict, method: str = ""
) -> None:
    """Pass if both agree, or if a known difference with this direction applies to the head."""
    direction = _direction(ours, theirs)
    if direction is None:
        return
    explained = [d.name for d in differences if d.direction == direction and d.applies(raw, method)]
    assert explained, (
        f"unexplained disagreement ({direction}) on {raw!r}:\n  fluidity {ours}\n  h11      {theirs}"
    )


# --------------------------------------------------------------------------- generated heads

_LINE_END = st.sampled_from([b"\r\n"] * 6 + [b"\n"])
_ANY_LINE_END = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r\r\n"])

_METHODS = [b"GET"] * 3 + [b"POST"] * 3 + [b"PUT", b"HEAD", b"OPTIONS", b"get", b"M-SEARCH", b"CONNECT"]
_BAD_METHODS = [b"G(T", b"", b"GE\x00T", b"G\xc9T"]
_BAD_VERSIONS = [
    b"HTTP/2.0",
    b"HTTP/0.9",
    b"http/1.1",
    b"HTTP/1.1 ",
    b"HTTP/11",
    b"HTTP/1.x",
    b"HTTP/1.1\x0b",
]
_BAD_TARGETS = [b"http://example.com/\x7f", b"http://example.com/\xff", b"http://exa mple.com/", b""]

_ORDINARY_FIELDS = [
    b"Accept: */*",
    b"User-Agent: test/1.0",
    b"X-Obs-Text: caf\xe9",
    b"X-Tab: a\tb",
    b"X-Trailing-Space: v  ",
    b"Empty:",
    b"X-Hop: 1",
]
_FRAMING_FIELDS = [
    b"Content-Length: 5",
    b"Content-Length: 0",
    b"content-length:  5 ",
    b"Content-Length: 5, 5",
    b"Content-Length: 005",
    b"Transfer-Encoding: chunked",
    b"transfer-encoding: Chunked",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Connection: Keep-Alive, X-Hop",
    b"Connection: upgrade",
    b"Upgrade: websocket",
]
_HOSTILE_FIELDS = [
    b"Content-Length: 6",
    b"Content-Length: 5, 6",
    b"Content-Length: -1",
    b"Content-Length: +5",
    b"Content-Length: 0x5",
    b"Content-Length: ",
    b"Content-Length: 10000000000000000000",
    b"Content-Length: \x855",
    b"Content-Length: 5\xa0",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, gzip",
    b"Transfer-Encoding: gzip",
    b"Transfer-Encoding: chunked, chunked",
    b"Transfer-Encoding: \xa0chunked",
    b"Transfer-Encoding: chunked\x0b",
    b"Transfer-Encoding: , chunked",
    b"Transfer-Encoding: identity",
    b"Connection: content-length",
    b"Connection: Transfer-Encoding",
    b"Connection: close, host",
    b"Connection: \xa0close",
    b"Connection: clo\x00se",
    b"Content-Length : 5",
    b"Transfer-Encoding\t: chunked",
    b"Content-Length\x0b: 5",
    b" folded",
    b"\tContent-Length: 5",
    b"X-Nul: a\x00b",
    b"X-Cr: a\rb",
    b"X-Cr: a\rContent-Length: 0",
    b"X-Ctl: a\x01b",
    b"X-Del: a\x7fb",
    b"no colon",
    b": empty-name",
    b"X A: 1",
    b"X-\xe9: 1",
    b"Host : example.com",
    b"Host: second.example",
]
_REQUEST_ONLY_FIELDS = [b"Expect: 100-continue", b"TE: trailers"]


#: What one generated head gets wrong, if anything: one kind at a time, so most heads are
#: plausible enough for both parsers to accept and their readings can be compared.
_ANOMALIES = st.sampled_from(["none"] * 3 + ["field"] * 3 + ["start line", "line ending", "leading"])


def _assemble(draw: st.DrawFn, anomaly: str, lines: list[bytes]) -> bytes:
    ends = [draw(_ANY_LINE_END if anomaly == "line ending" else _LINE_END) for _ in lines]
    leading = draw(st.sampled_from([b"\r\n", b"\n", b"\r\n\r\n"])) if anomaly == "leading" else b""
    return leading + b"".join(line + end for line, end in zip(lines, ends, strict=True)) + draw(_LINE_END)


def _fields(draw: st.DrawFn, anomaly: str, ordinary: list[bytes]) -> list[bytes]:
    fields = draw(st.lists(st.sampled_from(ordinary), max_size=4))
    for framing in draw(st.lists(st.sampled_from(_FRAMING_FIELDS), max_size=2)):
        fields.insert(draw(st.integers(0, len(fields))), framing)
    if anomaly == "field":
        for hostile in draw(st.lists(st.sampled_from(_HOSTILE_FIELDS), min_size=1, max_size=2)):
            fields.insert(draw(st.integers(0, len(fields))), hostile)
    return fields


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """A plausible request head, or one with a single kind of anomaly."""
    anomaly = draw(_ANOMALIES)
    method = draw(st.sampled_from(_METHODS))
    target = draw(st.sampled_from(AUTHORITY_TARGETS if method == b"CONNECT" else ABSOLUTE_TARGETS))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 3 + [b"HTTP/1.2"]))
    space = b" "
    if anomaly == "start line":
        part = draw(st.sampled_from(["method", "target", "version", "space"]))
        if part == "method":
            method = draw(st.sampled_from(_BAD_METHODS))
        elif part == "target":
            target = draw(st.sampled_from(UNROUTABLE_TARGETS + tuple(_BAD_TARGETS)))
        elif part == "version":
            version = draw(st.sampled_from(_BAD_VERSIONS))
        else:
            space = draw(st.sampled_from([b"  ", b"\t"]))
    fields = _fields(draw, anomaly, _ORDINARY_FIELDS + _REQUEST_ONLY_FIELDS)
    if draw(st.integers(0, 9)):  # usually exactly one Host, as real clients send
        fields.insert(draw(st.integers(0, len(fields))), b"Host: example.com")
    return _assemble(draw, anomaly, [method + space + target + space + version, *fields])


_STATUS_LINES = [
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 200",
    b"HTTP/1.1 200 ",
    b"HTTP/1.0 200 OK",
    b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 304 Not Modified",
    b"HTTP/1.1 100 Continue",
    b"HTTP/1.1 103 Early Hints",
    b"HTTP/1.1 404 Not Found",
    b"HTTP/1.1 599 Odd",
    b"HTTP/1.1 200 caf\xe9",
]
_BAD_STATUS_LINES = [
    b"HTTP/1.1 099 Low",
    b"HTTP/1.1 000 Zero",
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 20 OK",
    b"HTTP/2.0 200 OK",
    b"HTTP/1.1  200 OK",
    b"ICY 200 OK",
    b"HTTP/1.1 200 O\x00K",
    b"HTTP/1.1 200 O\x01K",
    b"SSH-2.0-OpenSSH_9.2",
]


@st.composite
def response_heads(draw: st.DrawFn) -> tuple[str, bytes]:
    """(request method, response head): plausible, or with a single kind of anomaly."""
    anomaly = draw(_ANOMALIES)
    method = draw(st.sampled_from(["GET", "GET", "POST", "HEAD"]))
    status_line = draw(st.sampled_from(_BAD_STATUS_LINES if anomaly == "start line" else _STATUS_LINES))
    return method, _assemble(draw, anomaly, [status_line, *_fields(draw, anomaly, _ORDINARY_FIELDS)])


# --------------------------------------------------------------------------- the comparisons


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_heads())
@example(
    _request("Connection: content-length", "Content-Length: 5", line="POST http://example.com/ HTTP/1.1")
)
@example(
    _request("Connection: transfer-encoding", "Transfer-Encoding: chunked", line="POST http://a/ HTTP/1.1")
)
@example(_request("Transfer-Encoding: \xa0chunked", line="POST http://example.com/ HTTP/1.1"))
@example(_request("Connection: \xa0close"))
@example(_request("Content-Length: 5, 5", "Content-Length: 5", line="PUT http://example.com/ HTTP/1.1"))
def test_request_heads_agree_with_h11_except_known_differences(raw: bytes) -> None:
    ours, forwarded = fluidity_request(raw)
    _explain(REQUEST_DIFFERENCES, raw, ours, h11_request(raw))
    if forwarded is not None:
        # The origin, whatever it is, must frame the forwarded head as the proxy does.
        again = parse_request_head(forwarded)
        assert _framing_text(request_body_framing(again)) == ours.framing
        origin_view = h11_request(forwarded)
        if not _has_te_other_than_lone_chunked(forwarded):
            assert (origin_view.outcome, origin_view.framing) == ("accepted", ours.framing), forwarded


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response_heads())
@example(("GET", _response("HTTP/1.1 200 OK", "Connection: content-length", "Content-Length: 5")))
@example(("GET", _response("HTTP/1.1 200 OK", "Connection: transfer-encoding", "Transfer-Encoding: chunked")))
@example(("GET", _response("HTTP/1.1 200 OK", "Content-Length: 3", "Transfer-Encoding: chunked")))
@example(("GET", _response("HTTP/1.1 200 OK", "X-Cr: a\rContent-Length: 0", "Content-Length: 5")))
def test_response_heads_agree_with_h11_except_known_differences(case: tuple[str, bytes]) -> None:
    method, raw = case
    _explain(RESPONSE_DIFFERENCES, raw, fluidity_response(method, raw), h11_response(method, raw), method)
