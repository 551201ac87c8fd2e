"""Request/response head parsing, target classification, forwarding rules and body framing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from desktop.http_head import (
    NO_BODY,
    BodyFraming,
    ChunkedBodyError,
    ChunkedScanner,
    HttpHeadError,
    RequestHead,
    build_forward_head,
    check_request_prefix,
    classify_target,
    expects_continue,
    find_head_end,
    is_websocket_upgrade,
    leading_empty_line_bytes,
    oversized_request_head,
    parse_request_head,
    parse_response_head,
    relayable_response_head,
    render_error_response,
    request_body_framing,
    request_keeps_alive,
    response_body_framing,
    response_keeps_alive,
)


def request(text: str, **kwargs: int) -> RequestHead:
    return parse_request_head(text.replace("\n", "\r\n").encode("latin-1"), **kwargs)


def error_of(text: str | bytes) -> HttpHeadError:
    raw = text if isinstance(text, bytes) else text.replace("\n", "\r\n").encode("latin-1")
    with pytest.raises(HttpHeadError) as caught:
        classify_target(parse_request_head(raw))
    return caught.value


def forwarded(text: str, *, keep_alive: bool | None = None) -> list[str]:
    head = request(text)
    alive = request_keeps_alive(head) if keep_alive is None else keep_alive
    return (
        build_forward_head(head, classify_target(head), client_keeps_alive=alive)
        .decode("latin-1")
        .split("\r\n")
    )


# --------------------------------------------------------------------------- parsing


def test_request_head_keeps_field_order_casing_and_duplicates() -> None:
    head = request("GET http://a.example/ HTTP/1.1\nHost: a.example\nX-One: 1\nx-one: 2\nCookie: a=b\n\n")
    assert (head.method, head.target, head.version) == ("GET", "http://a.example/", "HTTP/1.1")
    assert head.headers == (("Host", "a.example"), ("X-One", "1"), ("x-one", "2"), ("Cookie", "a=b"))
    assert head.get_all("X-ONE") == ["1", "2"]
    assert head.get("missing") is None


def test_bare_lf_line_endings_and_leading_empty_lines_are_accepted() -> None:
    raw = b"\r\n\nGET http://a/ HTTP/1.1\nHost: a\nAccept: */*\n\n"
    assert find_head_end(raw[leading_empty_line_bytes(raw) :]) == len(raw) - 3
    assert parse_request_head(raw).get("accept") == "*/*"


def test_field_values_are_trimmed_and_keep_obs_text() -> None:
    head = parse_request_head(b"GET http://a/ HTTP/1.1\r\nX-Name: \t caf\xe9 \t\r\n\r\n")
    assert head.get("x-name") == "caf\xe9"


def test_find_head_end_waits_for_the_empty_line() -> None:
    assert find_head_end(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n") is None
    assert find_head_end(b"GET http://a/ HTTP/1.1\r\n\r\nbody") == 26
    assert find_head_end(b"GET http://a/ HTTP/1.1\r\n\r\n", start=20) == 26


@pytest.mark.parametrize(
    ("raw", "status", "words"),
    [
        (b"GET http://a/ HTTP/1.1\r\nHost : a\r\n\r\n", 400, "whitespace before the colon"),
        (b"GET http://a/ HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", 400, "folding"),
        (b"GET http://a/ HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", 400, "control character"),
        (b"GET http://a/ HTTP/1.1\r\nX-A: a\rb\r\n\r\n", 400, "control character"),
        (b"GET http://a/ HTTP/1.1\r\nX A: 1\r\n\r\n", 400, "header field name"),
        (b"GET http://a/ HTTP/1.1\r\nno colon here\r\n\r\n", 400, "no colon"),
        (b"GET http://a/ HTTP/1.1 extra\r\n\r\n", 400, "request line"),
        (b"GET  http://a/ HTTP/1.1\r\n\r\n", 400, "request line"),
        (b"G(T http://a/ HTTP/1.1\r\n\r\n", 400, "invalid method"),
        (b"GET http://a/\xff HTTP/1.1\r\n\r\n", 400, "request target"),
        (b"GET http://a/ HTTP/1.1\x00\r\n\r\n", 400, "control character"),
        (b"GET http://a/ HTTP/2.0\r\n\r\n", 505, "not supported"),
        (b"GET http://a/ HTTPS/1.1\r\n\r\n", 400, "HTTP version"),
        (b"\r\n\r\n", 400, "empty request"),
    ],
)
def test_malformed_request_heads_are_refused_with_a_reason(raw: bytes, status: int, words: str) -> None:
    with pytest.raises(HttpHeadError) as caught:
        parse_request_head(raw)
    assert caught.value.status == status
    assert words in caught.value.message


def test_too_many_header_fields_is_431() -> None:
    fields = "".join(f"X-{i}: {i}\n" for i in range(11))
    with pytest.raises(HttpHeadError) as caught:
        request(f"GET http://a/ HTTP/1.1\n{fields}\n", max_header_count=10)
    assert caught.value.status == 431


@pytest.mark.parametrize(
    ("buffer", "status", "words"),
    [
        (b"GET http://a/" + b"x" * 100, 414, "URI too long"),  # no end of the request line yet
        (b"\r\nGET http://a/" + b"x" * 100 + b" HTTP/1.1\r\n", 414, "request line is longer than 64"),
        (b"GET http://a/ HTTP/1.1\r\nCookie: " + b"c" * 100, 431, "head is larger than 64 bytes"),
        (b"GET http://a/" + b"x" * 30 + b" HTTP/1.1\r\nCookie: " + b"c" * 40, 431, "header fields too large"),
    ],
)
def test_an_oversized_head_is_414_when_the_request_line_alone_is_too_long(
    buffer: bytes, status: int, words: str
) -> None:
    error = oversized_request_head(buffer, 64)
    assert error.status == status
    assert words in error.message


@pytest.mark.parametrize(
    "prefix", [b"\x16\x03\x01\x02\x00\x01", b"hello\x00", b"ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJ", b" GET"]
)
def test_obvious_garbage_is_refused_before_the_head_is_complete(prefix: bytes) -> None:
    with pytest.raises(HttpHeadError) as caught:
        check_request_prefix(prefix)
    assert caught.value.status == 400


@pytest.mark.parametrize("prefix", [b"", b"GE", b"GET", b"GET http://a/ HTTP/1.1\r\n", b"M-SEARCH * "])
def test_plausible_request_prefixes_pass(prefix: bytes) -> None:
    check_request_prefix(prefix)


def test_response_head_parses_and_blames_upstream() -> None:
    head = parse_response_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert (head.status, head.reason, head.get("content-length")) == (404, "Not Found", "0")
    assert parse_response_head(b"HTTP/1.0 200\r\n\r\n").reason == ""
    for raw in (b"HTTP/1.1 2x0 OK\r\n\r\n", b"ICY 200 OK\r\n\r\n", b"HTTP/1.1 200 O\x00K\r\n\r\n"):
        with pytest.raises(HttpHeadError) as caught:
            parse_response_head(raw)
        assert caught.value.status == 502
        assert "upstream" in caught.value.message


def test_malformed_response_fields_that_cannot_change_framing_are_skipped() -> None:
    head = parse_response_head(
        b"HTTP/1.1 200 OK\r\nServer : odd\r\nX-Ctl: a\x01b\r\nNo colon\r\nX-Keep: a\r\n"
        b"Content-Length: 5\r\n\r\n"
    )
    assert head.headers == (("X-Keep", "a"), ("Content-Length", "5"))


@pytest.mark.parametrize(
    ("field", "words"),
    [
        (b"Content-Length : 5", "whitespace before the colon"),
        (b"Transfer-Encoding\t: chunked", "whitespace before the colon"),
        (b"Content-Length\x0b: 5", "header field name"),  # a lax client may ignore the stray byte
        (b"Connection: clo\x00se", "NUL or bare CR"),
        (b"Content-Length: 5\r\n 6", "folding"),
        (b"X-Fold: a\r\n Content-Length: 0", "folding"),  # RFC 9112 §5.2: a proxy must not relay it
        (b"X-Nul: a\x00b", "NUL or bare CR"),
        (b"X-Cr: a\rContent-Length: 0", "NUL or bare CR"),  # a line break for some clients
    ],
)
def test_response_lines_that_could_change_framing_for_someone_are_a_502(field: bytes, words: str) -> None:
    with pytest.raises(HttpHeadError) as caught:
        parse_response_head(b"HTTP/1.1 200 OK\r\n" + field + b"\r\nContent-Length: 5\r\n\r\n")
    assert caught.value.status == 502
    assert words in caught.value.message


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 099 Low", b"HTTP/1.1 000 Zero"])
def test_status_codes_below_100_are_a_502(status_line: bytes) -> None:
    with pytest.raises(HttpHeadError) as caught:
        parse_response_head(status_line + b"\r\n\r\n")
    assert caught.value.status == 502


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("target", "host", "port", "authority", "path"),
    [
        ("http://example.com/a?b=c", "example.com", 80, "example.com", "/a?b=c"),
        ("http://Example.com:8080", "Example.com", 8080, "Example.com:8080", "/"),
        ("HTTP://example.com?x=1", "example.com", 80, "example.com", "/?x=1"),
        ("http://example.com/p#frag", "example.com", 80, "example.com", "/p"),
        ("http://[::1]:8081/x", "::1", 8081, "[::1]:8081", "/x"),
        ("http://[2001:db8::1]/", "2001:db8::1", 80, "[2001:db8::1]", "/"),
        ("ws://chat.example/socket", "chat.example", 80, "chat.example", "/socket"),
        ("http://127.0.0.1:", "127.0.0.1", 80, "127.0.0.1:", "/"),
    ],
)
def test_absolute_form_targets(target: str, host: str, port: int, authority: str, path: str) -> None:
    classified = classify_target(request(f"GET {target} HTTP/1.1\n\n"))
    assert (classified.form, classified.host, classified.port, classified.authority, classified.path) == (
        "absolute",
        host,
        port,
        authority,
        path,
    )


@pytest.mark.parametrize(
    ("target", "host", "port", "display"),
    [
        ("example.com:443", "example.com", 443, "example.com:443"),
        ("[::1]:8443", "::1", 8443, "[::1]:8443"),
        ("10.0.0.1:22", "10.0.0.1", 22, "10.0.0.1:22"),
    ],
)
def test_connect_authority_form(target: str, host: str, port: int, display: str) -> None:
    classified = classify_target(request(f"CONNECT {target} HTTP/1.1\nHost: {target}\n\n"))
    assert (classified.form, classified.host, classified.port, classified.display) == (
        "authority",
        host,
        port,
        display,
    )


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("GET /index.html HTTP/1.1", "this is a proxy"),
        ("OPTIONS * HTTP/1.1", "this is a proxy"),
        ("GET https://example.com/ HTTP/1.1", "CONNECT"),
        ("GET wss://example.com/ HTTP/1.1", "CONNECT"),
        ("GET ftp://example.com/ HTTP/1.1", "unsupported URL scheme"),
        ("GET example.com/ HTTP/1.1", "expected http://host/path"),
        ("GET http:///path HTTP/1.1", "no host"),
        ("GET http://user:pw@example.com/ HTTP/1.1", "user information"),
        ("GET http://exa$mple.com/ HTTP/1.1", "invalid host"),
        ("GET http://example.com:99999/ HTTP/1.1", "invalid port"),
        ("GET http://example.com:-1/ HTTP/1.1", "invalid port"),
        ("GET http://[::1/ HTTP/1.1", "IPv6"),
        ("GET http://[nonsense]/ HTTP/1.1", "invalid IPv6"),
        ("CONNECT example.com HTTP/1.1", "host:port"),
        ("CONNECT [::1] HTTP/1.1", "host:port"),
        ("CONNECT example.com:0 HTTP/1.1", "invalid port"),
        ("CONNECT ::1:443 HTTP/1.1", "invalid host"),
        (f"GET http://{'a' * 256}/ HTTP/1.1", "too long"),
    ],
)
def test_unusable_targets_get_a_400_saying_why(line: str, words: str) -> None:
    error = error_of(f"{line}\nHost: x\n\n")
    assert error.status == 400
    assert words in error.message


def test_duplicate_host_fields_are_refused() -> None:
    assert "more than one Host" in error_of("GET http://a/ HTTP/1.1\nHost: a\nHost: b\n\n").message


# --------------------------------------------------------------------------- forwarding


def test_forward_head_uses_origin_form_and_the_uri_authority_as_host() -> None:
    lines = forwarded(
        "GET http://example.com:8080/a?b HTTP/1.1\nUser-Agent: t\nhost: wrong.example\nAccept: */*\n\n"
    )
    assert lines[:4] == ["GET /a?b HTTP/1.1", "User-Agent: t", "host: example.com:8080", "Accept: */*"]
    assert lines[-2:] == ["", ""]


def test_forward_head_adds_host_first_when_missing() -> None:
    assert forwarded("GET http://example.com/ HTTP/1.1\nAccept: */*\n\n")[:3] == [
        "GET / HTTP/1.1",
        "Host: example.com",
        "Accept: */*",
    ]


def test_forward_head_drops_hop_by_hop_fields_and_those_named_by_connection() -> None:
    lines = forwarded(
        "POST http://example.com/ HTTP/1.1\nHost: example.com\nConnection: keep-alive, X-Secret\n"
        "Keep-Alive: timeout=5\nProxy-Connection: keep-alive\nProxy-Authorization: Basic dTpw\n"
        "Proxy-Authenticate: Basic\nTE: trailers\nTrailer: X-Sum\nUpgrade: h2c\nX-Secret: 1\n"
        "Transfer-Encoding: chunked\nX-Kept: yes\n\n"
    )
    assert lines == [
        "POST / HTTP/1.1",
        "Host: example.com",
        "Transfer-Encoding: chunked",
        "X-Kept: yes",
        "",
        "",
    ]


@pytest.mark.parametrize(
    "fields",
    [
        "Connection: content-length\nContent-Length: 5\n",
        "Connection: keep-alive, Transfer-Encoding\nTransfer-Encoding: chunked\n",
        "Connection: CONTENT-LENGTH, close\n",
        "Connection: close\nConnection: host\n",
        "Connection: \t transfer-encoding \t\n",
    ],
)
def test_a_connection_option_naming_a_framing_field_or_host_is_a_400(fields: str) -> None:
    """Issue 9: dropping the named field would let the origin see a different body boundary."""
    with pytest.raises(HttpHeadError) as caught:
        request(f"POST http://a/ HTTP/1.1\nHost: a\n{fields}\n")
    assert caught.value.status == 400
    assert "Connection" in caught.value.message and "framing" in caught.value.message


def test_forward_head_never_drops_a_framing_field_even_for_an_unchecked_head() -> None:
    head = RequestHead(
        headers=(("Connection", "content-length"), ("Content-Length", "5")),
        method="POST",
        target="http://a/",
        version="HTTP/1.1",
    )
    with pytest.raises(HttpHeadError) as caught:
        build_forward_head(head, classify_target(head), client_keeps_alive=True)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ("Content-Length: 5, 5\nX-A: 1\ncontent-length: 5\n", ["Content-Length: 5", "X-A: 1"]),
        ("content-length: 007\n", ["content-length: 7"]),
        (
            "Transfer-Encoding: gzip\nX-A: 1\nTransfer-Encoding: Chunked\n",
            ["Transfer-Encoding: gzip, chunked", "X-A: 1"],
        ),
        ("transfer-encoding: , CHUNKED\n", ["transfer-encoding: chunked"]),
    ],
)
def test_forward_head_states_the_framing_once_and_canonically(fields: str, expected: list[str]) -> None:
    """An origin that reads only the first field, or compares case-sensitively, still agrees."""
    assert forwarded(f"POST http://a/ HTTP/1.1\n{fields}\n")[2:-2] == expected


@pytest.mark.parametrize(
    ("field", "words"),
    [
        ("Transfer-Encoding: \xa0chunked", "chunked"),  # str.strip() would have made this chunked
        ("Transfer-Encoding: chunked\x85", "chunked"),
        ("Content-Length: \xa05", "invalid Content-Length"),
    ],
)
def test_only_spaces_and_tabs_are_trimmed_from_framing_values(field: str, words: str) -> None:
    with pytest.raises(HttpHeadError) as caught:
        request_body_framing(request(f"POST http://a/ HTTP/1.1\n{field}\n\n"))
    assert caught.value.status == 400
    assert words in caught.value.message
    assert request_keeps_alive(request("GET http://a/ HTTP/1.1\nConnection: \xa0close\n\n"))


def test_forward_head_states_the_connection_intent() -> None:
    assert "Connection: close" in forwarded("GET http://a/ HTTP/1.1\nConnection: close\n\n")
    assert "Connection: keep-alive" in forwarded("GET http://a/ HTTP/1.0\nConnection: keep-alive\n\n")
    assert "Connection: close" in forwarded("GET http://a/ HTTP/1.0\n\n")
    assert not [line for line in forwarded("GET http://a/ HTTP/1.1\n\n") if line.startswith("Connection")]


def test_websocket_upgrade_keeps_upgrade_and_connection_upgrade() -> None:
    text = (
        "GET ws://chat.example/s HTTP/1.1\nHost: chat.example\nConnection: keep-alive, Upgrade\n"
        "Upgrade: websocket\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\nSec-WebSocket-Version: 13\n\n"
    )
    assert is_websocket_upgrade(request(text))
    assert forwarded(text) == [
        "GET /s HTTP/1.1",
        "Host: chat.example",
        "Upgrade: websocket",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        "Connection: Upgrade",
        "",
        "",
    ]


def test_upgrade_without_connection_upgrade_is_not_a_websocket() -> None:
    head = request("GET http://a/ HTTP/1.1\nUpgrade: websocket\n\n")
    assert not is_websocket_upgrade(head)
    assert not [
        line for line in forwarded("GET http://a/ HTTP/1.1\nUpgrade: websocket\n\n") if "pgrade" in line
    ]


def test_expect_100_continue_is_answered_by_the_proxy_not_forwarded() -> None:
    text = "PUT http://a/ HTTP/1.1\nExpect: 100-continue\nContent-Length: 3\n\n"
    assert expects_continue(request(text))
    assert "Expect: 100-continue" not in forwarded(text)
    assert not expects_continue(request(text.replace("HTTP/1.1", "HTTP/1.0")))
    assert "Expect: something-else" in forwarded("PUT http://a/ HTTP/1.1\nExpect: something-else\n\n")


# --------------------------------------------------------------------------- framing and persistence


@pytest.mark.parametrize(
    ("fields", "kind", "length"),
    [
        ("", "none", 0),
        ("Content-Length: 0\n", "none", 0),
        ("Content-Length: 42\n", "length", 42),
        ("Content-Length: 42\nContent-Length: 42\n", "length", 42),
        ("Content-Length: 42, 42\n", "length", 42),
        ("Transfer-Encoding: chunked\n", "chunked", 0),
        ("Transfer-Encoding: gzip, Chunked\n", "chunked", 0),
    ],
)
def test_request_body_framing(fields: str, kind: str, length: int) -> None:
    framing = request_body_framing(request(f"POST http://a/ HTTP/1.1\n{fields}\n"))
    assert (framing.kind, framing.length) == (kind, length)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ("Content-Length: 3\nTransfer-Encoding: chunked\n", "both"),
        ("Content-Length: 3\nContent-Length: 4\n", "conflicting"),
        ("Content-Length: 3, 4\n", "conflicting"),
        ("Content-Length: -3\n", "invalid Content-Length"),
        ("Content-Length: 0x10\n", "invalid Content-Length"),
        ("Content-Length: \n", "invalid Content-Length"),
        ("Transfer-Encoding: gzip\n", "chunked"),
        ("Transfer-Encoding: chunked, chunked\n", "chunked"),
        ("Transfer-Encoding: chunked, gzip\n", "chunked"),
    ],
)
def test_ambiguous_request_framing_is_a_400(fields: str, words: str) -> None:
    with pytest.raises(HttpHeadError) as caught:
        request_body_framing(request(f"POST http://a/ HTTP/1.1\n{fields}\n"))
    assert caught.value.status == 400
    assert words in caught.value.message


def test_transfer_encoding_in_http_1_0_request_is_refused() -> None:
    with pytest.raises(HttpHeadError):
        request_body_framing(request("POST http://a/ HTTP/1.0\nTransfer-Encoding: chunked\n\n"))


@pytest.mark.parametrize(
    ("method", "status_line", "fields", "kind", "length"),
    [
        ("HEAD", "HTTP/1.1 200 OK", "Content-Length: 10\n", "none", 0),
        ("GET", "HTTP/1.1 100 Continue", "", "none", 0),
        ("GET", "HTTP/1.1 204 No Content", "Content-Length: 10\n", "none", 0),
        ("GET", "HTTP/1.1 304 Not Modified", "Transfer-Encoding: chunked\n", "none", 0),
        ("GET", "HTTP/1.1 200 OK", "Transfer-Encoding: chunked\nContent-Length: 5\n", "chunked", 0),
        ("GET", "HTTP/1.1 200 OK", "Transfer-Encoding: gzip\n", "until_close", 0),
        ("GET", "HTTP/1.0 200 OK", "Transfer-Encoding: chunked\n", "until_close", 0),
        ("GET", "HTTP/1.1 200 OK", "Content-Length: 10\n", "length", 10),
        ("GET", "HTTP/1.1 200 OK", "", "until_close", 0),
    ],
)
def test_response_body_framing(method: str, status_line: str, fields: str, kind: str, length: int) -> None:
    response = parse_response_head(
        f"{status_line}\r\n{fields.replace(chr(10), chr(13) + chr(10))}\r\n".encode()
    )
    framing = response_body_framing(method, response)
    assert (framing.kind, framing.length) == (kind, length)


def test_a_connection_option_never_changes_response_framing() -> None:
    """The response head is relayed as is, so a framing field a Connection option names still counts."""
    head = parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\n")
    assert response_body_framing("GET", head) == BodyFraming("length", 5)
    raw = b"HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert response_body_framing("GET", parse_response_head(raw)) == BodyFraming("chunked")
    assert response_body_framing("HEAD", parse_response_head(raw)) == NO_BODY
    assert relayable_response_head(raw, parse_response_head(raw)) is raw


def test_content_length_is_removed_from_a_relayed_head_that_also_has_transfer_encoding() -> None:
    """RFC 9112 §6.3: a client trusting the length would split the response elsewhere."""
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nServer: s\r\nTransfer-Encoding: chunked\r\n"
        b"content-length : 3\r\n\r\n"
    )
    with pytest.raises(HttpHeadError):
        parse_response_head(raw)  # "content-length :" is a 502 of its own
    raw = raw.replace(b"content-length : 3", b"CONTENT-LENGTH: 3")
    head = parse_response_head(raw)
    assert response_body_framing("GET", head) == BodyFraming("chunked")
    assert relayable_response_head(raw, head) == (
        b"HTTP/1.1 200 OK\r\nServer: s\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


@pytest.mark.parametrize("chunked", ["", "Transfer-Encoding: chunked\r\n"])
def test_bad_response_content_length_is_a_502(chunked: str) -> None:
    raw = f"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n{chunked}Content-Length: 2\r\n\r\n".encode()
    with pytest.raises(HttpHeadError) as caught:
        response_body_framing("GET", parse_response_head(raw))
    assert caught.value.status == 502


@pytest.mark.parametrize(
    ("version", "connection", "alive"),
    [
        ("HTTP/1.1", "", True),
        ("HTTP/1.1", "Connection: close\n", False),
        ("HTTP/1.1", "Connection: Keep-Alive, CLOSE\n", False),
        ("HTTP/1.0", "", False),
        ("HTTP/1.0", "Connection: keep-alive\n", True),
    ],
)
def test_keep_alive_semantics(version: str, connection: str, alive: bool) -> None:
    assert request_keeps_alive(request(f"GET http://a/ {version}\n{connection}\n")) is alive
    response = f"{version} 200 OK\r\n{connection.replace(chr(10), chr(13) + chr(10))}\r\n".encode()
    assert response_keeps_alive(parse_response_head(response)) is alive


def test_error_response_is_complete_plain_text() -> None:
    raw = render_error_response(502, "cannot reach a:80", proxy_status_error="dns_error")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"Content-Type: text/plain; charset=utf-8" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"Connection: close" in head and b"Proxy-Status: fluidity; error=dns_error" in head
    assert body == b"Fluidity proxy: cannot reach a:80\n"
    assert render_error_response(403, "no", include_body=False).endswith(b"\r\n\r\n")


# --------------------------------------------------------------------------- chunked scanner

CHUNKED_BODY = b"4\r\nWiki\r\n6;name=value\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\n"


def test_scanner_finds_the_end_and_leaves_the_next_message() -> None:
    scanner = ChunkedScanner()
    data = CHUNKED_BODY + b"GET http://next/ HTTP/1.1\r\n\r\n"
    assert scanner.feed(data) == len(CHUNKED_BODY)
    assert scanner.done


def test_scanner_honours_start_and_end_offsets() -> None:
    scanner = ChunkedScanner()
    data = b"xx" + CHUNKED_BODY + b"yy"
    assert scanner.feed(data, 2, 10) == 8
    assert not scanner.done
    assert scanner.feed(data, 10, len(data)) == len(CHUNKED_BODY) - 8
    assert scanner.done


def test_scanner_accepts_bare_lf_and_a_large_chunk_in_one_step() -> None:
    big = b"x" * 1_000_000
    body = b"%x\n%s\n0\n\n" % (len(big), big)
    scanner = ChunkedScanner()
    assert scanner.feed(body) == len(body)
    assert scanner.done


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(CHUNKED_BODY)), max_size=20))
def test_scanner_result_does_not_depend_on_how_bytes_arrive(cuts: list[int]) -> None:
    data = CHUNKED_BODY + b"NEXT"
    bounds = sorted({0, *cuts, len(data)})
    scanner = ChunkedScanner()
    consumed = 0
    for begin, end in zip(bounds, bounds[1:], strict=False):
        piece = data[begin:end]
        used = scanner.feed(piece)
        consumed += used
        if scanner.done:
            break
        assert used == len(piece)
    assert scanner.done
    assert consumed == len(CHUNKED_BODY)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"zz\r\n", "invalid chunk size"),
        (b"-1\r\n", "invalid chunk size"),
        (b"\r\n", "invalid chunk size"),
        (b"11111111111111111\r\n", "invalid chunk size"),
        (b"3\r\nabcd\r\n", "longer than its size"),
        (b"0\r\n bad trailer\r\n\r\n", "malformed trailer"),
        (b"0\r\nX-A: \x00\r\n\r\n", "control character"),
        (b"1;" + b"e" * 5000, "line too long"),
    ],
)
def test_scanner_rejects_broken_framing(body: bytes, words: str) -> None:
    with pytest.raises(ChunkedBodyError) as caught:
        ChunkedScanner().feed(body)
    assert caught.value.status == 400
    assert words in caught.value.message


def test_scanner_caps_the_trailer_section() -> None:
    scanner = ChunkedScanner()
    scanner.feed(b"0\r\n")
    with pytest.raises(ChunkedBodyError):
        for _ in range(2000):
            scanner.feed(b"X-Filler: " + b"a" * 60 + b"\r\n")
