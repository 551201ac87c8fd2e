"""The settings file the tray creates on first run (and when "Open config" finds none).

A new user should be able to click Connect without editing anything, so the file starts on
the embedded local server and explains, in comments, how to switch to the cloud backends.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

FIRST_RUN_CONFIG = """\
# Fluidity settings, read by the tray app (`fluidity`) and by `fluidity-agent`.
# Uncomment a line to change it. FLUIDITY_<KEY> environment variables override this file.
# Durations accept "250ms", "10s", "10m", "1h", "1m30s" or a number of seconds.

# Where the tunnel server comes from:
#   local  - start one on this machine (works out of the box, for trying Fluidity out)
#   lambda - wake the Fargate server through the fluidity-lambda stack's API
#   ecs    - scale the Fargate service directly with your AWS profile
#   static - a server that is always running at server_address
lifecycle: local
server_address: 127.0.0.1
server_port: 8443

# lifecycle: lambda
# api_url: "https://<id>.execute-api.<region>.amazonaws.com/prod"   # ApiGatewayUrl output
# api_key: "<API key>"                                               # sent as x-api-key

# lifecycle: ecs
# aws_profile: default
# aws_region: eu-west-1
# cluster_name: fluidity
# service_name: fluidity-server

# Stop the server on Disconnect and Quit (unset = yes for lambda and ecs).
# kill_on_disconnect: true
# Whole budget to wake the server and connect to it; raise to "120s" on slow starts.
# connection_timeout: "90s"

# The local proxy: point your browser or system proxy at 127.0.0.1:8080.
# listen_address: 127.0.0.1
# listen_port: 8080
# While connected, point the OS proxy at it (off, manual or pac; the tray's "Use as system
# proxy"); your own settings come back on Disconnect and Quit.
# system_proxy: manual
# Dialed directly, never through the tunnel ([] = everything through the tunnel):
# bypass: [localhost, 127.0.0.0/8, "::1/128", 169.254.0.0/16, "fe80::/10", 10.0.0.0/8,
#          172.16.0.0/12, 192.168.0.0/16, "fc00::/7", "<local>"]

# Certificates (default: the per-user certificates folder; see Certificates > Open folder).
# ca_file: /path/to/ca.crt
# cert_file: /path/to/client.crt
# key_file: /path/to/client.key

# log_level: info
"""


def set_setting(path: Path, key: str, value: str) -> None:
    """Set the top-level ``key: value`` line of a settings file, keeping every other line.

    A menu choice (the system proxy checkbox) is saved where the user would edit it by hand;
    comments and the order of lines stay as they were.
    """
    write_first_run_config(path)
    text = path.read_text(encoding="utf-8")
    line = f"{key}: {value}"
    pattern = re.compile(rf"^{re.escape(key)}[ \t]*:.*$", re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _match: line, text, count=1)
    else:
        if text and not text.endswith("\n"):
            text += "\n"
        text += line + "\n"
    path.write_text(text, encoding="utf-8")


def write_first_run_config(path: Path) -> bool:
    """Create ``path`` from the template unless it exists; True if it was created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it may later hold an API key
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(FIRST_RUN_CONFIG)
    return True
