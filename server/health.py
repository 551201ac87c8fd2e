"""`fluidity-server --health-check`: is the running server able to take a tunnel?

An open port is not enough: the kernel accepts TCP connections into the backlog even
when the server's event loop is stuck or its listener stopped. The loop refreshes a
heartbeat file while it runs and accepts; this check reads that file's age and state,
then connects to the port. Exit 0 healthy, 1 not (the container health check's rule).
"""

from __future__ import annotations

import json
import socket
import time

from server.config import ServerConfig

#: The loop writes every 5 s; three missed beats mean it is stuck.
MAX_HEARTBEAT_AGE = 15.0


def health_problem(config: ServerConfig, *, now: float | None = None) -> str | None:
    """None when healthy, else one line saying what is wrong."""
    now = time.time() if now is None else now
    if config.heartbeat_file is not None:
        try:
            beat = json.loads(config.heartbeat_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"no heartbeat in {config.heartbeat_file}: {exc}"
        age = now - float(beat.get("time", 0))
        if age > MAX_HEARTBEAT_AGE:
            return f"the event loop last beat {age:.0f} s ago (limit {MAX_HEARTBEAT_AGE:g} s): it is stuck"
        if not beat.get("accepting", False):
            return "the listener is not accepting connections (backing off after resource errors)"
    host = "127.0.0.1" if config.listen_address in ("0.0.0.0", "") else config.listen_address
    host = "::1" if host == "::" else host
    try:
        socket.create_connection((host, config.listen_port), timeout=3).close()
    except OSError as exc:
        return f"cannot connect to {host}:{config.listen_port}: {exc.strerror or exc}"
    return None
