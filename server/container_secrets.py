"""Certificates handed to the container as secrets become the files the server loads.

ECS injects the CA, the server certificate and its key from Secrets Manager as
environment variables, so nothing secret is baked into the image. At start-up they are
written to the configured ``ca_file`` / ``cert_file`` / ``key_file`` (the key 0600).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from server.config import ServerConfig
from server.errors import FluidityError

#: Environment variable -> (config attribute, file mode).
PEM_SECRETS = {
    "FLUIDITY_CA_CERT_PEM": ("ca_file", 0o644),
    "FLUIDITY_SERVER_CERT_PEM": ("cert_file", 0o644),
    "FLUIDITY_SERVER_KEY_PEM": ("key_file", 0o600),
}


class SecretError(FluidityError):
    """A secret variable is set but unusable; the message names the variable."""


def write_pem_secrets(config: ServerConfig, env: Mapping[str, str] | None = None) -> list[Path]:
    """Write every PEM secret present in ``env``; returns the files written."""
    source = os.environ if env is None else env
    written: list[Path] = []
    for variable, (attribute, mode) in PEM_SECRETS.items():
        value = source.get(variable)
        if not value:
            continue
        if "-----BEGIN " not in value:
            raise SecretError(f"{variable} does not contain a PEM block (expected '-----BEGIN ...')")
        path = Path(getattr(config, attribute))
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = path.with_name(f".{path.name}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="ascii", newline="\n") as handle:
            handle.write(value.replace("\\n", "\n").strip() + "\n")
        os.replace(temp, path)
        written.append(path)
    return written
