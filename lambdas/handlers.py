"""Lambda entry points of the control plane: API Gateway events in, JSON replies out.

Thin edges only: parse the event, call the plain function in ``lambdas.control`` or
``lambdas.sleep_policy`` with boto3 clients, format the reply, log one JSON line.
The CloudFormation template points at these names, so they are stable:
``api_handler`` (one router for POST /wake, GET /status, POST /kill), ``wake_handler``,
``status_handler``, ``kill_handler`` (one function per route) and ``sleep_handler``
(the EventBridge schedule). API calls never crash the Lambda: every failure becomes a
JSON error reply. Sleep failures are raised after logging, so the Lambda's error metric
(and the SleepLambdaErrorAlarm) sees them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import boto3
from botocore.config import Config

from lambdas.control import (
    ConfigError,
    ControlConfig,
    ControlPlaneFailure,
    kill,
    server_status,
    wake,
)
from lambdas.sleep_policy import run_sleep
from server.errors import FluidityError
from server.framing import ControlPlaneError, ServerStatus
from server.json_logging import JsonFormatter

log = logging.getLogger("fluidity.control")

Operation = Callable[[Any, Any, ControlConfig], ServerStatus]


def _status(ecs: Any, ec2: Any, config: ControlConfig) -> ServerStatus:
    return server_status(ecs, ec2, config)


#: path → (method, operation). Wake and Kill change state, Status only reads it.
ROUTES: dict[str, tuple[str, Operation]] = {
    "/wake": ("POST", wake),
    "/status": ("GET", _status),
    "/kill": ("POST", kill),
}

#: Environment variables that decide which AWS endpoint and identity the clients use.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)


# --------------------------------------------------------------------------- logging


class _StdoutHandler(logging.Handler):
    """Writes to whatever ``sys.stdout`` is at the time (Lambda ships stdout lines to CloudWatch Logs)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging must never break a request
            self.handleError(record)


def configure_logging(env: Mapping[str, str]) -> None:
    """Give the control-plane logger its JSON stdout handler once; LOG_LEVEL sets the level.

    The lines have the server's fields (``server.json_logging``, shipped in the bundle), with
    the traceback always included: a Lambda's log is the only place a crash can be read.
    """
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(JsonFormatter(include_traceback=True))
        log.addHandler(handler)
        log.propagate = False
    level = env.get("LOG_LEVEL", "INFO").strip().upper()
    log.setLevel(level if level in logging.getLevelNamesMapping() else logging.INFO)


# --------------------------------------------------------------------------- dependencies


class AwsClients:
    """The boto3 clients one runtime uses, created on first use and then reused (thread-safe)."""

    _CONFIG = Config(connect_timeout=5, read_timeout=15, user_agent_extra="fluidity-control")

    def __init__(self, session: boto3.session.Session, endpoint_url: str | None = None) -> None:
        self._session = session
        self._endpoint_url = endpoint_url or None
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def client(self, service: str) -> Any:
        with self._lock:
            if service not in self._clients:
                make_client: Callable[..., Any] = self._session.client
                self._clients[service] = make_client(
                    service, endpoint_url=self._endpoint_url, config=self._CONFIG
                )
            return self._clients[service]

    @property
    def ecs(self) -> Any:
        return self.client("ecs")

    @property
    def ec2(self) -> Any:
        return self.client("ec2")

    @property
    def cloudwatch(self) -> Any:
        return self.client("cloudwatch")


class ControlRuntime:
    """What a handler needs besides the event: its environment and its AWS clients."""

    def __init__(self, env: Mapping[str, str], clients: AwsClients) -> None:
        self.env = env
        self.clients = clients

    @classmethod
    def create(cls, env: Mapping[str, str], **session_kwargs: Any) -> ControlRuntime:
        """A runtime whose AWS endpoint, region and credentials come from ``env``.

        ``session_kwargs`` (for ``boto3.session.Session``) win over what ``env`` says.
        """
        from_env: dict[str, Any] = {"region_name": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")}
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            from_env["aws_access_key_id"] = env["AWS_ACCESS_KEY_ID"]
            from_env["aws_secret_access_key"] = env["AWS_SECRET_ACCESS_KEY"]
            from_env["aws_session_token"] = env.get("AWS_SESSION_TOKEN") or None
        kwargs = {k: v for k, v in from_env.items() if v is not None} | session_kwargs
        session = boto3.session.Session(**kwargs)
        return cls(env, AwsClients(session, env.get("AWS_ENDPOINT_URL")))

    def config(self) -> ControlConfig:
        return ControlConfig.from_env(self.env)


_runtimes: dict[tuple[str | None, ...], ControlRuntime] = {}
_runtimes_lock = threading.Lock()


def default_runtime() -> ControlRuntime:
    """The runtime over ``os.environ``, reused by warm invocations while the AWS settings stay the same."""
    key = tuple(os.environ.get(name) for name in _CLIENT_ENV)
    with _runtimes_lock:
        runtime = _runtimes.get(key)
        if runtime is None:
            _runtimes.clear()
            runtime = _runtimes[key] = ControlRuntime.create(os.environ)
        return runtime


# --------------------------------------------------------------------------- replies


def json_reply(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """An API Gateway REST proxy reply with a JSON body."""
    return {
        "statusCode": status,
        "headers": {"Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})},
        "body": json.dumps(body),
    }


def error_reply(error: ControlPlaneError, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    extra = dict(headers or {})
    if error.retry_after is not None:
        extra["Retry-After"] = str(error.retry_after)
    return json_reply(error.http_status, error.to_json(), extra)


def route_of(event: Mapping[str, Any]) -> str:
    """The route an API Gateway event addresses: the resource template, else the request path."""
    resource = event.get("resource")
    path = resource if isinstance(resource, str) and resource and "{" not in resource else event.get("path")
    if not isinstance(path, str) or not path:
        return ""
    return path.rstrip("/") or "/"


# --------------------------------------------------------------------------- API handlers


def handle_api_event(
    event: Any, context: Any, runtime: ControlRuntime, *, only: str | None = None
) -> dict[str, Any]:
    """Route one API Gateway REST proxy event; ``only`` restricts a per-route function to its path.

    An event without ``httpMethod`` is a direct invocation (``aws lambda invoke``) of ``only``.
    """
    configure_logging(runtime.env)
    started = time.monotonic()
    request_id = getattr(context, "aws_request_id", None)
    if not isinstance(event, dict):
        reply = error_reply(ControlPlaneError("bad_request", "the event is not a JSON object", 400))
        _log_reply("?", reply, started, request_id)
        return reply
    method = event.get("httpMethod")
    if method is None and only is not None:
        method, path = ROUTES[only][0], only
    else:
        path = route_of(event)
    label = f"{method} {path}"
    try:
        reply = _dispatch(method, path, only, runtime)
    except Exception as exc:  # noqa: BLE001 - an API call must always get a formatted reply
        log.error("unexpected failure", exc_info=True, extra={"route": label, "request_id": request_id})
        reply = error_reply(
            ControlPlaneError(
                "internal_error",
                f"unexpected {type(exc).__name__}: {exc}; see the Lambda logs (request id {request_id})",
                500,
            )
        )
    _log_reply(label, reply, started, request_id)
    return reply


def _dispatch(method: Any, path: str, only: str | None, runtime: ControlRuntime) -> dict[str, Any]:
    if not isinstance(method, str):
        return error_reply(
            ControlPlaneError("bad_request", "not an API Gateway proxy event (no httpMethod)", 400)
        )
    route = ROUTES.get(path)
    if route is None or (only is not None and path != only):
        known = ", ".join(f"{m} {p}" for p, (m, _) in ROUTES.items() if only is None or p == only)
        return error_reply(
            ControlPlaneError("not_found", f"no route {path or '/'}; this API has {known}", 404)
        )
    allowed, operation = route
    if method.upper() != allowed:
        return error_reply(
            ControlPlaneError("method_not_allowed", f"{path} accepts {allowed}, not {method}", 405),
            {"Allow": allowed},
        )
    try:
        config = runtime.config()
    except ConfigError as exc:
        return error_reply(ControlPlaneError("configuration_error", str(exc), 500))
    try:
        status = operation(runtime.clients.ecs, runtime.clients.ec2, config)
    except ControlPlaneFailure as failure:
        return error_reply(failure.error)
    headers = {"Retry-After": str(status.retry_after)} if status.retry_after is not None else None
    return json_reply(200, status.to_json(), headers)


def _log_reply(route: str, reply: Mapping[str, Any], started: float, request_id: str | None) -> None:
    status = int(reply["statusCode"])
    body = json.loads(reply["body"])
    fields: dict[str, Any] = {
        "route": route,
        "status_code": status,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
        "request_id": request_id,
    }
    if status < 300:
        fields.update({k: body.get(k) for k in ("state", "desired_count", "running_count", "pending_count")})
        fields["public_ip"] = body.get("public_ip")
        log.info("request handled", extra=fields)
    else:
        fields.update(error=body.get("error"), error_message=body.get("message"))
        log.warning("request failed", extra=fields)


def api_handler(event: Any, context: Any) -> dict[str, Any]:
    """One function for all routes (POST /wake, GET /status, POST /kill)."""
    return handle_api_event(event, context, default_runtime())


def wake_handler(event: Any, context: Any) -> dict[str, Any]:
    """POST /wake: ask for one server task (idempotent); replies with the server's status."""
    return handle_api_event(event, context, default_runtime(), only="/wake")


def status_handler(event: Any, context: Any) -> dict[str, Any]:
    """GET /status: the server's status, changing nothing."""
    return handle_api_event(event, context, default_runtime(), only="/status")


def kill_handler(event: Any, context: Any) -> dict[str, Any]:
    """POST /kill: ask for zero server tasks (idempotent); replies with the server's status."""
    return handle_api_event(event, context, default_runtime(), only="/kill")


# --------------------------------------------------------------------------- Sleep


class SleepFailed(FluidityError, RuntimeError):
    """The scheduled Sleep run could not decide or act; raised so the Lambda counts an error."""


def handle_sleep_event(
    event: Any, context: Any, runtime: ControlRuntime, now: float | None = None
) -> dict[str, Any]:
    """Run one idle check and return (and log) the decision with the numbers behind it."""
    configure_logging(runtime.env)
    request_id = getattr(context, "aws_request_id", None)
    try:
        config = runtime.config()
        decision = run_sleep(
            runtime.clients.ecs, runtime.clients.cloudwatch, config, time.time() if now is None else now
        )
    except ConfigError as exc:
        log.error(
            "sleep check failed",
            extra={"error": "configuration_error", "error_message": str(exc), "request_id": request_id},
        )
        raise SleepFailed(str(exc)) from exc
    except ControlPlaneFailure as failure:
        error = failure.error
        log.error(
            "sleep check failed",
            extra={"error": error.error, "error_message": error.message, "request_id": request_id},
        )
        raise SleepFailed(f"{error.error}: {error.message}") from failure
    body = decision.to_json()
    log.info(f"sleep decision: {decision.action.value}", extra={**body, "request_id": request_id})
    return body


def sleep_handler(event: Any, context: Any) -> dict[str, Any]:
    """EventBridge schedule (rule fluidity-sleep-schedule): scale to zero when the server is idle."""
    return handle_sleep_event(event, context, default_runtime())
