"""A local stand-in for the control plane's API Gateway, running the real handlers.

It listens on loopback, checks the ``x-api-key`` header the way API Gateway does
(missing or wrong key: HTTP 403 ``{"message": "Forbidden"}``), turns each request into a
REST (v1) proxy event, calls the same router as ``lambdas.handlers.api_handler`` and
writes its reply. Like an API with a greedy ``/{proxy+}`` resource, every path reaches
the router, so its 404 and 405 replies are visible. The URL carries the stage
(``http://127.0.0.1:PORT/prod``) as the real ApiGatewayUrl output does.

For developers, against moto or a real account::

    AWS_ENDPOINT_URL=http://127.0.0.1:5000 python -m lambdas.local_gateway --api-key K --port 8787
    curl -X POST http://127.0.0.1:8787/prod/wake -H "x-api-key: K"
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from lambdas.handlers import ControlRuntime, handle_api_event

#: API Gateway rejects payloads above 10 MB; the control plane never needs more than this.
MAX_BODY = 1024 * 1024
_FORBIDDEN = {"message": "Forbidden"}
_log = logging.getLogger("fluidity.local_gateway")


@dataclass(frozen=True, slots=True)
class LocalContext:
    """The parts of the Lambda context object the handlers read."""

    aws_request_id: str
    function_name: str = "fluidity-local-gateway"


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
        **boto_session_kwargs: Any,
    ) -> None:
        """``env`` replaces ``os.environ`` for the handlers (CLUSTER_NAME, AWS_ENDPOINT_URL, ...);
        ``boto_session_kwargs`` go to ``boto3.session.Session`` (region_name, credentials)."""
        if not api_key:
            raise ValueError("an API key is required: API Gateway never serves these routes without one")
        self.api_key = api_key
        self.stage = stage.strip("/") if stage else None
        self.runtime = ControlRuntime.create(os.environ if env is None else dict(env), **boto_session_kwargs)
        self._address = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Bind and serve on a daemon thread; returns the base URL (with the stage)."""
        if self._server is not None:
            raise RuntimeError("gateway already started")
        server = ThreadingHTTPServer(self._address, _handler_class(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="local-gateway", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("gateway not started")
        address, port = self._server.server_address[:2]
        host = address.decode() if isinstance(address, bytes) else address
        host_text = f"[{host}]" if ":" in host else host
        return f"http://{host_text}:{port}" + (f"/{self.stage}" if self.stage else "")

    def __enter__(self) -> LocalGateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- request handling (called from the server's threads) -------------

    def respond(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes, client: str
    ) -> tuple[int, dict[str, str], bytes]:
        """Answer one HTTP request: (status, headers, body)."""
        parts = urlsplit(target)
        path = parts.path or "/"
        if self.stage:
            prefix = f"/{self.stage}"
            if path != prefix and not path.startswith(prefix + "/"):
                return _gateway_error(403, _FORBIDDEN)
            path = path[len(prefix) :] or "/"
        key = headers.get("x-api-key", "")
        if not hmac.compare_digest(key.encode(), self.api_key.encode()):
            return _gateway_error(403, _FORBIDDEN)
        request_id = str(uuid.uuid4())
        event = self.proxy_event(method, path, parts.query, headers, body, client, request_id)
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
        headers: Mapping[str, str],
        body: bytes,
        client: str,
        request_id: str,
    ) -> dict[str, Any]:
        """The REST (v1) proxy event API Gateway would send for this request."""
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
            "headers": dict(headers),
            "multiValueHeaders": {k: [v] for k, v in headers.items()},
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


def _gateway_error(status: int, body: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
    """An error API Gateway itself produces (not the Lambda)."""
    kind = "ForbiddenException" if status == 403 else "InternalServerErrorException"
    return status, {"Content-Type": "application/json", "x-amzn-ErrorType": kind}, json.dumps(body).encode()


def _handler_class(gateway: LocalGateway) -> type[BaseHTTPRequestHandler]:
    class GatewayRequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fluidity-local-gateway"

        def _serve(self) -> None:
            length_text = self.headers.get("Content-Length", "0") or "0"
            try:
                length = int(length_text)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY:
                self._write(413, {"Content-Type": "application/json"}, b'{"message": "Request Too Long"}')
                self.close_connection = True
                return
            body = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            status, reply_headers, payload = gateway.respond(
                self.command, self.path, headers, body, self.client_address[0]
            )
            self._write(status, reply_headers, payload)

        def _write(self, status: int, headers: Mapping[str, str], payload: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                if name.lower() not in ("content-length", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _serve

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
            _log.debug("%s " + format, self.client_address[0], *args)

    return GatewayRequestHandler


def main(argv: Sequence[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    gateway = LocalGateway(args.api_key, host=args.host, port=args.port, stage=args.stage or None)
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
