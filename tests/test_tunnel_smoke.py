"""The shortest end-to-end path: curl -> agent proxy -> mTLS tunnel -> server -> origin."""

from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Iterator

import pytest
from tunnel_fixtures import RunningAgent, clean_env


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hello_origin() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_curl_through_the_tunnel(agent: RunningAgent, hello_origin: str) -> None:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-x", agent.proxy_url, f"{hello_origin}/smoke"],
        capture_output=True,
        env=clean_env(),
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello /smoke"
    assert agent.agent.stats().consecutive_failures == 0
