"""Checks that need nothing but this machine: settings, certificates, the proxy port, the system proxy.

Each check is a plain function of its inputs (a loaded config, a clock, a reader) that
returns results. Certificate facts come from ``desktop.certificates`` (the checks of
``fluidity-certs verify``) and key modes from ``server.tls.key_file_problem`` (the rule the
tunnel enforces when it loads a key), never from a second implementation.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from desktop import certificates
from desktop.config import AgentConfig, load_agent_config, resolve_agent_config_path
from desktop.doctor.model import CheckResult, failed, info, passed, warned
from server.config_loader import ConfigError
from server.tls import key_file_problem

#: The fix for the fluidity-lambda values that agent.yaml ships as placeholders.
PLACEHOLDER_FIX = (
    "put the fluidity-lambda outputs into the file: api_url = the ApiGatewayUrl output, "
    "api_key = the ApiKeyId output (`fluidity-deploy outputs` prints both), "
    "or set FLUIDITY_API_URL / FLUIDITY_API_KEY"
)
_CERTS_FIX_BUNDLE = (
    "copy the agent's bundle from the machine that ran `fluidity-certs init`: there "
    "`fluidity-certs bundle --out client-bundle.zip`, "
    "here `fluidity-certs import client-bundle.zip --dir {dir}`"
)


# ----------------------------------------------------------------------------- settings


def load_config(
    path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> tuple[AgentConfig | None, CheckResult]:
    """Load the agent's settings as the agent would; the result says which file and what is wrong."""
    chosen = resolve_agent_config_path(path)
    source = str(chosen) if chosen is not None else "built-in defaults (no settings file)"
    try:
        config = load_agent_config(path, env=env, overrides=overrides)
    except ConfigError as error:
        return None, _config_failure(error)
    return config, passed("config", f"{source} parses (lifecycle {config.lifecycle})", source=source)


def _config_failure(error: ConfigError) -> CheckResult:
    if error.key in ("api_url", "api_key") and "placeholder" in error.detail:
        return failed("config", str(error), PLACEHOLDER_FIX, key=error.key)
    if error.key is None and "no such file" in error.detail:
        return failed(
            "config",
            str(error),
            "create it from the example (`cp configs/agent.yaml` to that path), "
            "or pass the file you use with --config",
        )
    where = f"{error.key} in {error.source}" if error.key else error.source
    return failed("config", str(error), f"correct {where}; `fluidity-agent --help` lists every key")


def check_lifecycle_keys(config: AgentConfig) -> CheckResult:
    """The lifecycle backend has the keys it needs, and no keys it would silently ignore."""
    lifecycle = config.lifecycle
    ignored: list[str] = []
    problems: list[str] = []
    if lifecycle in ("lambda", "ecs") and config.server_address.strip():
        ignored.append("server_address (the address comes from the running task)")
    if lifecycle != "lambda":
        ignored += [f"{key} (no control plane with lifecycle {lifecycle})" for key in _set_api_keys(config)]
    local_config = config.local_server_config
    if lifecycle == "local" and local_config is not None and not local_config.is_file():
        problems.append(f"local_server_config {config.local_server_config} does not exist")
    if problems:
        return failed(
            "config.lifecycle",
            f"lifecycle {lifecycle}: " + "; ".join(problems),
            "point local_server_config at a server settings file such as configs/server.local.yaml",
        )
    if ignored:
        return warned(
            "config.lifecycle",
            f"lifecycle {lifecycle} ignores " + ", ".join(ignored),
            "remove those keys, or choose the lifecycle they belong to",
        )
    return passed("config.lifecycle", _lifecycle_summary(config))


def _set_api_keys(config: AgentConfig) -> list[str]:
    return [key for key in ("api_url", "api_key") if getattr(config, key)]


def _lifecycle_summary(config: AgentConfig) -> str:
    if config.lifecycle == "lambda":
        return f"lifecycle lambda: control plane {config.api_url}, api_key set"
    if config.lifecycle == "ecs":
        profile = config.aws_profile or "the default AWS profile"
        region = config.aws_region or "the profile's region"
        where = f"service {config.service_name} in cluster {config.cluster_name}"
        return f"lifecycle ecs: {where} ({profile}, {region})"
    if config.lifecycle == "static":
        return f"lifecycle static: server {config.server_address}:{config.server_port}"
    return f"lifecycle local: server on {config.server_address or '127.0.0.1'}:{config.server_port}"


# ----------------------------------------------------------------------------- certificates

#: Which line of the report a problem from ``certificates.check_certificate_set`` belongs on.
_TOPICS = (
    ("expiry", ("expired on", "is not valid until")),
    ("keys", ("does not match", "is missing but")),
    ("server_name", ("does not name DNS:",)),
)


def _topic(problem: str) -> str:
    for topic, phrases in _TOPICS:
        if any(phrase in problem for phrase in phrases):
            return topic
    return "chain"


def certificate_files(config: AgentConfig) -> dict[str, Path]:
    """The agent's three files under their canonical names, plus what else the CA folder holds.

    The folder of ``ca_file`` may also hold server.crt (on the machine that ran ``init``),
    which lets the doctor check the server certificate against ``server_name`` offline.
    """
    folder = config.ca_file.parent
    files = {name: folder / name for name in certificates.ALL_FILES if (folder / name).is_file()}
    files.update(
        {
            certificates.CA_CERT: config.ca_file,
            certificates.CLIENT_CERT: config.cert_file,
            certificates.CLIENT_KEY: config.key_file,
        }
    )
    return files


def check_certificates(config: AgentConfig, now: datetime) -> list[CheckResult]:
    """Files present, chain (as `openssl verify`), key pairs, days to expiry, key modes, server name."""
    missing = [
        str(path) for path in (config.ca_file, config.cert_file, config.key_file) if not path.is_file()
    ]
    folder = config.ca_file.parent
    if len(missing) == 3 and config.lifecycle == "local":
        return [
            info(
                "certificates.files",
                f"none in {folder} yet: lifecycle local creates them on Connect",
                f"or now: `fluidity-certs init --dir {folder}` (`make certs`)",
            )
        ]
    if missing:
        return [
            failed(
                "certificates.files",
                "missing: " + ", ".join(missing),
                _CERTS_FIX_BUNDLE.format(dir=folder)
                + f" (or start a new CA with `fluidity-certs init --dir {folder}`)",
            )
        ]
    files = certificate_files(config)
    pems: dict[str, bytes] = {}
    for name, path in files.items():
        try:
            pems[name] = path.read_bytes()
        except OSError as error:
            return [
                failed(
                    "certificates.files",
                    f"cannot read {path}: {error.strerror or error}",
                    f"make {path} readable by you (`chmod 600` for keys, 644 for certificates)",
                )
            ]
    problems: dict[str, list[str]] = {}
    for problem in certificates.check_certificate_set(pems, now):
        problems.setdefault(_topic(problem), []).append(problem)
    checked = ", ".join(sorted(name for name in files if name.endswith(".crt")))
    results = [passed("certificates.files", f"found {checked} in {folder}", folder=str(folder))]
    results.append(_chain_result(problems.get("chain", []), files, folder))
    results.append(_keys_result(problems.get("keys", []), files, folder))
    results.append(_expiry_result(problems.get("expiry", []), files, now, folder))
    results.append(check_key_permissions([path for name, path in files.items() if name.endswith(".key")]))
    results.append(check_server_name(config, files, problems.get("server_name", [])))
    return results


def _chain_result(problems: list[str], files: Mapping[str, Path], folder: Path) -> CheckResult:
    leaves = [name for name in (certificates.CLIENT_CERT, certificates.SERVER_CERT) if name in files]
    if not problems:
        return passed(
            "certificates.chain",
            f"{' and '.join(leaves)} chain to {certificates.CA_CERT} "
            f"(as `openssl verify -CAfile {files[certificates.CA_CERT]} {files[certificates.CLIENT_CERT]}`)",
        )
    if any("another CA" in problem for problem in problems):
        fix = (
            "the files come from different `fluidity-certs init` runs; use one set: "
            + _CERTS_FIX_BUNDLE.format(dir=folder)
        )
    else:
        fix = f"run `fluidity-certs verify --dir {folder}` for details, then " + _CERTS_FIX_BUNDLE.format(
            dir=folder
        )
    return failed("certificates.chain", "; ".join(problems), fix)


def _keys_result(problems: list[str], files: Mapping[str, Path], folder: Path) -> CheckResult:
    pairs = [
        f"{key} matches {cert}"
        for cert, key in (
            (certificates.CLIENT_CERT, certificates.CLIENT_KEY),
            (certificates.SERVER_CERT, certificates.SERVER_KEY),
            (certificates.CA_CERT, certificates.CA_KEY),
        )
        if cert in files and key in files
    ]
    if not problems:
        return passed("certificates.keys", ", ".join(pairs))
    return failed(
        "certificates.keys",
        "; ".join(problems),
        "cert_file and key_file must be one pair from the same bundle: "
        + _CERTS_FIX_BUNDLE.format(dir=folder),
    )


def _expiry_result(
    problems: list[str], files: Mapping[str, Path], now: datetime, folder: Path
) -> CheckResult:
    days: dict[str, int] = {}
    for name in (certificates.CA_CERT, certificates.CLIENT_CERT, certificates.SERVER_CERT):
        if name in files:
            try:
                days[name] = certificates.describe_certificate(files[name], now).days_to_expiry
            except certificates.CertificateError:
                continue  # unreadable: reported on the chain line
    shown = ", ".join(f"{name} {left} days" for name, left in days.items())
    renew = (
        f"renew with `fluidity-certs renew --dir {folder}` on the machine that holds ca.key, copy the new "
        "bundle here (`fluidity-certs bundle` / `fluidity-certs import`) and give the server its new "
        "certificate (`fluidity-deploy secrets --cert-dir certs`)"
    )
    if problems:
        if any("is not valid until" in problem for problem in problems):
            renew = "check this computer's clock and time zone; " + renew
        return failed("certificates.expiry", "; ".join(problems), renew, days_to_expiry=days)
    soon = [name for name, left in days.items() if left <= certificates.EXPIRY_WARNING_DAYS]
    if soon:
        return warned(
            "certificates.expiry", f"{', '.join(soon)} expire soon: {shown}", renew, days_to_expiry=days
        )
    return passed("certificates.expiry", f"days to expiry: {shown}", days_to_expiry=days)


def check_key_permissions(keys: list[Path]) -> CheckResult:
    """Private keys readable by their owner only, by the rule the tunnel itself enforces on load."""
    if os.name == "nt":
        return info("certificates.permissions", "not checked on Windows (keys live in your user profile)")
    problems = [problem for path in keys if (problem := key_file_problem(path))]
    if problems:
        fixes = [problem.split("; run: ", 1)[1] for problem in problems if "; run: " in problem]
        return failed(
            "certificates.permissions",
            "; ".join(problem.split("; run: ", 1)[0] for problem in problems),
            "; ".join(fixes) or "chmod 600 the key files",
        )
    return passed("certificates.permissions", "private keys are readable by you only")


def check_server_name(
    config: AgentConfig, files: Mapping[str, Path], problems: list[str] | None = None
) -> CheckResult:
    """The server certificate carries ``server_name`` (else: the runbook's "mTLS certificate mismatch")."""
    name = config.server_name
    is_ip = certificates.is_ip_address(name)
    server_crt = files.get(certificates.SERVER_CERT)
    if server_crt is None:
        if is_ip:
            return failed(
                "certificates.server_name",
                f"server_name is the IP address {name}",
                "set server_name to the DNS name in the server certificate (fluidity-server); "
                "the IP changes on every wake",
            )
        return info(
            "certificates.server_name",
            f"server.crt is not on this machine, "
            f"so server_name {name!r} is checked in the TLS handshake below",
        )
    try:
        names = certificates.describe_certificate(server_crt).names
    except certificates.CertificateError as error:
        return failed("certificates.server_name", str(error), "see certificates.chain")
    found = ", ".join(names) or "no names"
    if f"DNS:{name}" in names and not problems:
        return passed("certificates.server_name", f"server.crt names DNS:{name} (server_name)")
    fix = (
        "set server_name to a DNS name in server.crt (fluidity-server) in your settings"
        + (", never the IP, which changes on every wake" if is_ip else "")
        + "; or issue a server certificate with that name: "
        f"`fluidity-certs init --dir DIR --server-name {name}` (a new CA: copy the bundle again and "
        "run `fluidity-deploy secrets`)"
    )
    detail = f"server.crt names {found}, but server_name is {name!r}"
    if problems:
        detail += "; " + "; ".join(problems)
    return failed(
        "certificates.server_name", detail + ": the TLS handshake will fail (mTLS certificate mismatch)", fix
    )


# ----------------------------------------------------------------------------- local proxy port

#: What the Fluidity proxy puts in every error it answers (its ``render_error_response``).
_FLUIDITY_MARKERS = (b"Proxy-Status: fluidity", b"Fluidity proxy:")
_PROBE_REQUEST = b"GET / HTTP/1.1\r\nHost: fluidity-doctor\r\nConnection: close\r\n\r\n"


def answers_like_fluidity(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether whatever listens on host:port is a Fluidity proxy (it names itself in its errors)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_PROBE_REQUEST)
            reply = b""
            while len(reply) < 8192:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
                if any(marker in reply for marker in _FLUIDITY_MARKERS):
                    return True
    except OSError:
        return False
    return any(marker in reply for marker in _FLUIDITY_MARKERS)


def check_proxy_port(host: str, port: int, *, probe_timeout: float = 2.0) -> CheckResult:
    """The proxy's port is free, or held by a running Fluidity (tray or agent)."""
    where = f"{host}:{port}"
    if port == 0:
        return passed("local.proxy_port", f"listen_port 0: the proxy takes any free port on {host}")
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as error:
        return failed(
            "local.proxy_port",
            f"listen_address {host!r} cannot be resolved: {error}",
            "set listen_address to 127.0.0.1",
        )
    probe = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds
        probe.bind(sockaddr)
    except OSError as error:
        return _port_in_use(error, host, port, probe_timeout)
    finally:
        probe.close()
    return passed("local.proxy_port", f"{where} is free for the proxy")


def _port_in_use(error: OSError, host: str, port: int, probe_timeout: float) -> CheckResult:
    where = f"{host}:{port}"
    if error.errno == errno.EADDRINUSE:
        if answers_like_fluidity(host, port, probe_timeout):
            return passed("local.proxy_port", f"{where} is held by a running Fluidity proxy (tray or agent)")
        return failed(
            "local.proxy_port",
            f"{where} is in use by another program",
            f"stop that program (find it with `ss -ltnp 'sport = :{port}'`, `lsof -i :{port}` or, on "
            f"Windows, `netstat -ano | findstr :{port}`), or set listen_port to a free port "
            f"(e.g. `--listen-port {port + 1}`)",
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return failed(
            "local.proxy_port",
            f"not allowed to listen on {where}",
            "ports below 1024 need administrator rights; use listen_port 8080",
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return failed(
            "local.proxy_port",
            f"{host} is not an address of this machine",
            "set listen_address to 127.0.0.1",
        )
    return failed("local.proxy_port", f"cannot listen on {where}: {error.strerror or error}", "")


# ----------------------------------------------------------------------------- system proxy


@dataclass(frozen=True)
class SystemProxySetting:
    """The desktop's proxy as one settings source reports it (WinINet, networksetup, GSettings, ...)."""

    source: str
    host: str
    port: int


#: Reads the system proxy; None means nothing is configured (or this platform is not supported).
SystemProxyReader = Callable[[], SystemProxySetting | None]


def read_system_proxy(config: AgentConfig) -> SystemProxySetting | None:
    """The desktop's proxy when it holds exactly what Fluidity sets for ``config``, else None.

    Read through the same backend the tray uses (GSettings, KDE, the Windows registry,
    networksetup); a desktop without one, or a tool that fails, reads as "not configured".
    """
    from desktop.system_proxy.base import Mode, ProxyRequest, SystemProxyError, changed_keys
    from desktop.system_proxy.detect import detect

    backend = detect().backend
    if backend is None:
        return None
    try:
        current = backend.read()
    except SystemProxyError:
        return None
    for mode in (Mode.MANUAL, Mode.PAC):
        request = ProxyRequest(mode, config.listen_address, config.listen_port, config.bypass_rules())
        if not changed_keys(backend.render(request, current), current):
            return SystemProxySetting(
                f"{backend.name} ({mode.value})", config.listen_address, config.listen_port
            )
    return None


def check_system_proxy(config: AgentConfig, reader: SystemProxyReader | None = None) -> CheckResult:
    """When a system proxy is set, it points at this Fluidity's proxy."""
    setting = reader() if reader is not None else read_system_proxy(config)
    wanted = f"{config.listen_address}:{config.listen_port}"
    if setting is None:
        return info(
            "local.system_proxy",
            f"not configured by Fluidity; point your browser or apps at http://{wanted}",
        )
    shown = f"{setting.host}:{setting.port}"
    same_host = setting.host == config.listen_address or {setting.host, config.listen_address} <= {
        "127.0.0.1",
        "localhost",
    }
    if same_host and setting.port == config.listen_port:
        return passed("local.system_proxy", f"{setting.source} points at Fluidity's proxy {shown}")
    return warned(
        "local.system_proxy",
        f"{setting.source} points at {shown}, not at Fluidity's proxy {wanted}",
        f"set the system proxy to {wanted}, or listen_port to {setting.port}",
    )
