"""SOCKS5 (RFC 1928) and SOCKS4/4a handshakes on the proxy port, sans I/O.

The proxy port speaks HTTP and SOCKS: ``detect_protocol`` reads the first byte (0x05
SOCKS5, 0x04 SOCKS4/4a, anything else HTTP). ``SocksHandshake`` then turns the client's
bytes into events: ``Send`` (write these bytes and keep reading), ``ConnectRequest`` (dial
this host and port, then call ``succeeded`` or ``failed``) or ``Refused`` (write these bytes,
then close). No sockets and no clocks, so every rule is tested byte for byte, like
``desktop.http_head``.

Only what a personal tunnel needs: the no-authentication method (others get 0xFF) and
CONNECT with IPv4, IPv6 or a domain name. Domain names are handed on unresolved, so the
tunnel server resolves them (socks5h semantics: no local DNS lookup leaks the name). BIND
and UDP ASSOCIATE are answered "command not supported".
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from dataclasses import dataclass

from server.framing import MAX_HOST_LENGTH, FailReason


class ProxyProtocol(enum.StrEnum):
    HTTP = "http"
    SOCKS4 = "socks4"
    SOCKS5 = "socks5"


def detect_protocol(first_byte: int) -> ProxyProtocol:
    """Which protocol a client speaks, from the first byte it sent."""
    if first_byte == 0x05:
        return ProxyProtocol.SOCKS5
    if first_byte == 0x04:
        return ProxyProtocol.SOCKS4
    return ProxyProtocol.HTTP


class Command(enum.IntEnum):
    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3


class AddressType(enum.IntEnum):
    IPV4 = 1
    DOMAIN = 3
    IPV6 = 4


class Reply(enum.IntEnum):
    """SOCKS5 reply codes (RFC 1928 §6); ``.label`` names them in logs."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08

    @property
    def label(self) -> str:
        return self.name.lower()


class Socks4Reply(enum.IntEnum):
    GRANTED = 0x5A
    REJECTED = 0x5B


class Refusal(enum.StrEnum):
    """Why a handshake ended without a CONNECT to dial."""

    NO_ACCEPTABLE_METHOD = "no_acceptable_method"
    COMMAND_NOT_SUPPORTED = "command_not_supported"
    ADDRESS_TYPE_NOT_SUPPORTED = "address_type_not_supported"
    MALFORMED = "malformed"
    BAD_HOST = "bad_host"
    BAD_PORT = "bad_port"


class Phase(enum.StrEnum):
    GREETING = "greeting"
    REQUEST = "request"
    DIALING = "dialing"
    ESTABLISHED = "established"
    CLOSED = "closed"


NO_AUTHENTICATION = 0x00
NO_ACCEPTABLE_METHODS = 0xFF
#: A SOCKS4 user id (ignored) or 4a host name longer than this is refused, bounding the buffer.
MAX_SOCKS4_FIELD = 255

_HOSTNAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Send:
    """Write ``data`` to the client and keep reading."""

    data: bytes


@dataclass(frozen=True)
class ConnectRequest:
    """The client asks for a stream to ``host:port``; a domain name is still unresolved."""

    version: int
    host: str
    port: int
    address_type: AddressType

    @property
    def display(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Refused:
    """Write ``data`` (the refusal, possibly empty), then close the connection."""

    data: bytes
    refusal: Refusal
    detail: str


Event = Send | ConnectRequest | Refused

#: Tunnel dial failure (``DialError.reason``) -> SOCKS5 reply; UNREACHABLE depends on the address.
_FAILURE_REPLIES = {
    FailReason.POLICY: Reply.NOT_ALLOWED,
    FailReason.REFUSED: Reply.CONNECTION_REFUSED,
    FailReason.DNS: Reply.HOST_UNREACHABLE,
    FailReason.TIMEOUT: Reply.TTL_EXPIRED,
    FailReason.TUNNEL_DOWN: Reply.GENERAL_FAILURE,
}


def reply_for_failure(reason: FailReason, address_type: AddressType = AddressType.DOMAIN) -> Reply:
    """The SOCKS5 reply for a failed dial, so the client sees the tunnel's real outcome.

    ``unreachable`` is "network unreachable" for an IP literal and "host unreachable" for a
    name (whose addresses the server tried); anything without a closer code is a general failure.
    """
    if reason is FailReason.UNREACHABLE:
        return Reply.HOST_UNREACHABLE if address_type is AddressType.DOMAIN else Reply.NETWORK_UNREACHABLE
    return _FAILURE_REPLIES.get(reason, Reply.GENERAL_FAILURE)


def socks5_reply(reply: Reply, bound: tuple[str, int] | None = None) -> bytes:
    """A SOCKS5 reply; the bound address defaults to 0.0.0.0:0 (the tunnel hides the real one)."""
    host, port = bound or ("0.0.0.0", 0)
    address = ipaddress.ip_address(host)
    kind = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
    return bytes((5, reply, 0, kind)) + address.packed + struct.pack("!H", port)


def socks4_reply(reply: Socks4Reply, bound: tuple[str, int] | None = None) -> bytes:
    host, port = bound or ("0.0.0.0", 0)
    address = ipaddress.ip_address(host)
    packed = address.packed if address.version == 4 else bytes(4)
    return bytes((0, reply)) + struct.pack("!H", port) + packed


def _valid_host(host: str) -> bool:
    if not host or len(host) > MAX_HOST_LENGTH:
        return False
    if _HOSTNAME.fullmatch(host):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class SocksHandshake:
    """The server side of one SOCKS4/4a or SOCKS5 handshake, from the client's first byte on.

    Feed bytes with ``receive``. After a ``ConnectRequest`` dial it, then answer with
    ``succeeded()`` or ``failed(reason)`` and write the bytes returned. Bytes the client sent
    after its request (optimistic data) are in ``leftover``: forward them once established.
    Do not read from the client while dialing, or the bytes pile up in ``leftover``.
    """

    def __init__(self) -> None:
        self.phase = Phase.GREETING
        self.version: int | None = None
        self.request: ConnectRequest | None = None
        self._buffer = bytearray()

    @property
    def leftover(self) -> bytes:
        return bytes(self._buffer) if self.phase in (Phase.DIALING, Phase.ESTABLISHED) else b""

    def take_leftover(self) -> bytes:
        """The optimistic data, once; the buffer is then empty."""
        data = self.leftover
        if self.phase in (Phase.DIALING, Phase.ESTABLISHED):
            self._buffer.clear()
        return data

    def receive(self, data: bytes) -> list[Event]:
        if self.phase is Phase.ESTABLISHED:
            raise RuntimeError("the handshake is over: relay the client's bytes directly")
        if self.phase is Phase.CLOSED:
            return []
        self._buffer += data
        if self.phase is Phase.DIALING:
            return []
        events: list[Event] = []
        while self.phase in (Phase.GREETING, Phase.REQUEST):
            event = self._step()
            if event is None:
                break
            events.append(event)
            if isinstance(event, Refused):
                self.phase = Phase.CLOSED
                self._buffer.clear()
        return events

    # ----- answers once the dial is done ------------------------------------------

    def succeeded(self, bound: tuple[str, int] | None = None) -> bytes:
        """The success reply; the connection then carries raw bytes both ways."""
        self._expect_dialing()
        self.phase = Phase.ESTABLISHED
        if self.version == 4:
            return socks4_reply(Socks4Reply.GRANTED, bound)
        return socks5_reply(Reply.SUCCEEDED, bound)

    def failed(self, reason: FailReason) -> tuple[bytes, Reply]:
        """The failure reply for the tunnel's reason (write it, then close), and the code chosen."""
        request = self._expect_dialing()
        self.phase = Phase.CLOSED
        self._buffer.clear()
        reply = reply_for_failure(reason, request.address_type)
        if self.version == 4:
            return socks4_reply(Socks4Reply.REJECTED), reply
        return socks5_reply(reply), reply

    def _expect_dialing(self) -> ConnectRequest:
        if self.phase is not Phase.DIALING or self.request is None:
            raise RuntimeError(f"no CONNECT is being dialed (phase {self.phase})")
        return self.request

    # ----- parsing --------------------------------------------------------------------

    def _step(self) -> Event | None:
        buffer = self._buffer
        if not buffer:
            return None
        if self.version is None:
            if buffer[0] not in (4, 5):
                return Refused(b"", Refusal.MALFORMED, f"not a SOCKS version: 0x{buffer[0]:02x}")
            self.version = buffer[0]
        if self.version == 4:
            return self._socks4()
        if self.phase is Phase.GREETING:
            return self._greeting()
        return self._socks5_request()

    def _refuse5(self, reply: Reply, refusal: Refusal, detail: str) -> Refused:
        return Refused(socks5_reply(reply), refusal, detail)

    def _greeting(self) -> Event | None:
        buffer = self._buffer
        if len(buffer) < 2 or len(buffer) < 2 + buffer[1]:
            return None
        methods = bytes(buffer[2 : 2 + buffer[1]])
        del buffer[: 2 + len(methods)]
        if NO_AUTHENTICATION not in methods:
            offered = ", ".join(f"0x{method:02x}" for method in methods) or "none"
            return Refused(
                bytes((5, NO_ACCEPTABLE_METHODS)),
                Refusal.NO_ACCEPTABLE_METHOD,
                f"only the no-authentication method is offered; the client offered {offered}",
            )
        self.phase = Phase.REQUEST
        return Send(bytes((5, NO_AUTHENTICATION)))

    def _socks5_request(self) -> Event | None:
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        version, command, reserved, kind = buffer[0], buffer[1], buffer[2], buffer[3]
        if version != 5 or reserved != 0:
            return self._refuse5(
                Reply.GENERAL_FAILURE, Refusal.MALFORMED, f"bad request header {bytes(buffer[:4]).hex()}"
            )
        if command != Command.CONNECT:
            name = Command(command).name if command in Command._value2member_map_ else f"0x{command:02x}"
            return self._refuse5(
                Reply.COMMAND_NOT_SUPPORTED, Refusal.COMMAND_NOT_SUPPORTED, f"command {name} is not supported"
            )
        if kind == AddressType.IPV4:
            size, start = 4, 4
        elif kind == AddressType.IPV6:
            size, start = 16, 4
        elif kind == AddressType.DOMAIN:
            if len(buffer) < 5:
                return None
            size, start = buffer[4], 5
        else:
            return self._refuse5(
                Reply.ADDRESS_TYPE_NOT_SUPPORTED,
                Refusal.ADDRESS_TYPE_NOT_SUPPORTED,
                f"address type 0x{kind:02x} is not supported",
            )
        end = start + size
        if len(buffer) < end + 2:
            return None
        raw = bytes(buffer[start:end])
        (port,) = struct.unpack("!H", buffer[end : end + 2])
        del buffer[: end + 2]
        address_type = AddressType(kind)
        if address_type is AddressType.DOMAIN:
            host = raw.decode("ascii", "replace")
            if not raw.isascii() or not _valid_host(host):
                return self._refuse5(Reply.GENERAL_FAILURE, Refusal.BAD_HOST, f"bad host name {raw!r}")
        else:
            host = str(ipaddress.ip_address(raw))
        if port == 0:
            return self._refuse5(Reply.GENERAL_FAILURE, Refusal.BAD_PORT, "port 0 cannot be dialed")
        return self._connect(ConnectRequest(5, host, port, address_type))

    def _socks4(self) -> Event | None:
        buffer = self._buffer
        if len(buffer) < 8:
            return None
        command = buffer[1]
        if command != Command.CONNECT:
            return self._refuse4(
                Refusal.COMMAND_NOT_SUPPORTED, f"SOCKS4 command 0x{command:02x} is not supported"
            )
        (port,) = struct.unpack("!H", buffer[2:4])
        ip = bytes(buffer[4:8])
        user_end = self._field_end(8)
        if user_end is None:
            return None
        if user_end < 0:
            return self._refuse4(Refusal.MALFORMED, "the user id is too long")
        is_4a = ip[:3] == b"\0\0\0" and ip[3] != 0
        end = user_end + 1
        host, address_type = "", AddressType.IPV4
        if is_4a:
            name_end = self._field_end(end)
            if name_end is None:
                return None
            if name_end < 0:
                return self._refuse4(Refusal.BAD_HOST, "the host name is too long")
            raw = bytes(buffer[end:name_end])
            host, address_type = raw.decode("ascii", "replace"), AddressType.DOMAIN
            end = name_end + 1
            if not raw.isascii() or not _valid_host(host):
                del buffer[:end]
                return self._refuse4(Refusal.BAD_HOST, f"bad host name {raw!r}")
        del buffer[:end]
        if not is_4a:
            if ip == bytes(4):
                return self._refuse4(Refusal.BAD_HOST, "destination 0.0.0.0 cannot be dialed")
            host = str(ipaddress.IPv4Address(ip))
        if port == 0:
            return self._refuse4(Refusal.BAD_PORT, "port 0 cannot be dialed")
        return self._connect(ConnectRequest(4, host, port, address_type))

    def _field_end(self, start: int) -> int | None:
        """Index of the NUL ending a SOCKS4 field at ``start``; None = need more, -1 = too long."""
        end = self._buffer.find(0, start, start + MAX_SOCKS4_FIELD + 1)
        if end >= 0:
            return end
        return -1 if len(self._buffer) - start > MAX_SOCKS4_FIELD else None

    def _refuse4(self, refusal: Refusal, detail: str) -> Refused:
        return Refused(socks4_reply(Socks4Reply.REJECTED), refusal, detail)

    def _connect(self, request: ConnectRequest) -> ConnectRequest:
        self.request = request
        self.phase = Phase.DIALING
        return request
