"""``lifecycle: lambda``: wake, poll and kill the server through the control-plane API.

The API Gateway in front of the Wake/Status/Kill Lambdas wants the API key in
``x-api-key``; replies are the ServerStatus / ControlPlaneError JSON of server.framing.
Only the standard library is used so the tray bundle needs no HTTP dependency.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from desktop.config import AgentConfig
from desktop.lifecycle.base import Endpoint, LifecycleError, ProgressCallback, WakeCancelled, WakeRefused
from desktop.lifecycle.polling import REQUEST_TIMEOUT, TransientLifecycleError, wait_until_running
from server.framing import ControlPlaneError, ControlPlaneFormatError, ServerStatus, parse_control_reply

_log = logging.getLogger(__name__)

#: Largest reply body read; control-plane replies are a few hundred bytes.
MAX_REPLY_BYTES = 64 * 1024


def _is_transient(http_status: int) -> bool:
    return http_status == 429 or http_status >= 500


class LambdaLifecycle:
    """Talks to ``<api_url>/wake``, ``/status`` and ``/kill``."""

    name = "lambda"

    def __init__(self, config: AgentConfig) -> None:
        if not config.api_url or not config.api_key:
            raise LifecycleError("config", "lifecycle 'lambda' needs api_url and api_key")
        parts = urlsplit(config.api_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise LifecycleError("config", f"api_url {config.api_url!r} is not an http(s) URL")
        self._base = config.api_url.rstrip("/")
        self._api_key = config.api_key
        self._poll_interval = config.wake_poll_interval
        # Plain urllib without the environment's proxy settings: the control plane must be
        # reached directly, never through our own (not yet connected) proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, method: str, action: str, timeout: float) -> ServerStatus:
        url = f"{self._base}/{action}"
        request = urllib.request.Request(
            url,
            data=b"" if method == "POST" else None,
            method=method,
            headers={"x-api-key": self._api_key, "Accept": "application/json"},
        )
        try:
            with self._opener.open(request, timeout=timeout) as response:
                http_status, body = response.status, response.read(MAX_REPLY_BYTES)
        except urllib.error.HTTPError as error:
            http_status, body = error.code, error.read(MAX_REPLY_BYTES)
            error.close()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, socket.timeout | TimeoutError):
                raise TransientLifecycleError(
                    "unreachable", f"{action}: no reply from the control plane within {timeout:.1f} s"
                ) from None
            raise TransientLifecycleError(
                "unreachable",
                f"{action}: cannot reach the control plane at {self._base}: {reason}",
                # Refused, unresolvable or untrusted: the request never reached the Lambda.
                nothing_done=isinstance(reason, ConnectionRefusedError | socket.gaierror | ssl.SSLError),
            ) from None
        try:
            reply = parse_control_reply(http_status, body)
        except ControlPlaneFormatError as error:
            raise LifecycleError(
                "bad_reply", f"{action}: unexpected reply from the control plane: {error}"
            ) from None
        if isinstance(reply, ControlPlaneError):
            if reply.error == "bad_reply":  # the message already names the HTTP status
                message = (
                    f"{action} failed: {reply.message}; api_url must be the ApiGatewayUrl output "
                    "of the fluidity-lambda stack"
                )
            else:
                message = f"{action} failed: {reply.message} (HTTP {reply.http_status}, {reply.error})"
            if _is_transient(reply.http_status):
                raise TransientLifecycleError(reply.error, message, nothing_done=reply.http_status == 429)
            raise LifecycleError(reply.error, message)
        _log.debug("control plane %s: %s", action, reply.to_json())
        return reply

    def wake(self, *, timeout: float, cancel: threading.Event, on_progress: ProgressCallback) -> Endpoint:
        started = time.monotonic()
        if cancel.is_set():
            raise WakeCancelled()
        try:
            first = self._call("POST", "wake", REQUEST_TIMEOUT)
        except TransientLifecycleError as error:
            # Without a successful wake there is nothing to wait for: report it now. After a
            # timeout or a 5xx the Lambda may still have asked for a task, so it is stopped.
            if error.nothing_done:
                raise WakeRefused(error.code, error.message) from None
            raise LifecycleError(error.code, error.message) from None
        except LifecycleError as error:  # a 4xx answer: the control plane refused, started nothing
            raise WakeRefused(error.code, error.message) from None
        _log.info("wake requested", extra={"server_state": first.state.value})
        return wait_until_running(
            first,
            lambda request_timeout: self._call("GET", "status", request_timeout),
            timeout=timeout,
            interval=self._poll_interval,
            cancel=cancel,
            on_progress=on_progress,
            started=started,
        )

    def status(self) -> ServerStatus:
        try:
            return self._call("GET", "status", REQUEST_TIMEOUT)
        except TransientLifecycleError as error:
            raise LifecycleError(error.code, error.message) from None

    def kill(self) -> ServerStatus:
        try:
            return self._call("POST", "kill", REQUEST_TIMEOUT)
        except TransientLifecycleError as error:
            raise LifecycleError(error.code, error.message) from None

    def close(self) -> None:
        return None
