"""Run the doctor's checks in order and print the report: ``fluidity doctor`` / ``fluidity-agent --doctor``.

This is the thin edge: it loads the settings, builds the real inputs (AWS clients, the
public-address lookup, the system-proxy reader, the clock) and hands them to the checks.
Everything it builds can be replaced through ``DoctorOptions``, which is how the tests
and the tray call it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from desktop.config import AgentConfig, default_agent_config_path
from desktop.doctor.cloud_checks import (
    AwsClients,
    PublicAddressSource,
    check_control_plane,
    open_aws_clients,
    run_aws_checks,
)
from desktop.doctor.local_checks import (
    SystemProxyReader,
    check_certificates,
    check_lifecycle_keys,
    check_proxy_port,
    check_system_proxy,
    load_config,
)
from desktop.doctor.model import (
    CheckResult,
    Report,
    Status,
    failed,
    info,
    passed,
    render_text,
    skipped,
)
from desktop.doctor.server_probe import probe_server
from desktop.lifecycle.base import Endpoint
from server.config_loader import add_arguments, overrides_from_args, program_parser
from server.framing import ServerState

#: Answers with the caller's public IPv4 address as plain text (run by AWS).
CHECKIP_URL = "https://checkip.amazonaws.com"
CHECKIP_TIMEOUT = 3.0


def lookup_public_ip(url: str = CHECKIP_URL, timeout: float = CHECKIP_TIMEOUT) -> str | None:
    """This machine's public address as the internet sees it, or None when it cannot be learnt."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # directly, never via a proxy
    try:
        with opener.open(url, timeout=timeout) as reply:
            text = reply.read(100).decode("ascii", "replace").strip()
        return str(ipaddress.ip_address(text))
    except (OSError, ValueError):
        return None


def fixed_address(address: str | None) -> PublicAddressSource:
    """An address source that always answers ``address`` (``--public-ip``, ``--no-ip-lookup``)."""
    return lambda: address


#: Why there is no server to probe, by the control plane's state.
_NOT_RUNNING = {
    ServerState.STOPPED: "the server is stopped: Connect wakes it",
    ServerState.STARTING: "the server is starting: run the doctor again once it runs",
    ServerState.STOPPING: "the server is stopping",
}


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DoctorOptions:
    """The doctor's inputs besides the settings; defaults are the real world."""

    aws: bool = False
    public_address: PublicAddressSource = lookup_public_ip
    system_proxy: SystemProxyReader | None = None  # None: read the desktop's settings
    clock: Callable[[], datetime] = _utcnow
    aws_clients: Callable[[AgentConfig], AwsClients] = open_aws_clients
    server_timeout: float | None = None
    control_plane: Callable[[AgentConfig], object] | None = field(default=None)


def run_doctor(
    config_path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    options: DoctorOptions | None = None,
) -> Report:
    """Load the settings as the agent would, then run every check that can run."""
    config, loaded = load_config(config_path, env=env, overrides=overrides)
    source = str(loaded.details.get("source", config_path or ""))
    if config is None:
        return Report((loaded, skipped("doctor", "the other checks need settings that load")), source=source)
    return diagnose(config, options, source=source, loaded=loaded)


def diagnose(
    config: AgentConfig,
    options: DoctorOptions | None = None,
    *,
    source: str = "",
    loaded: CheckResult | None = None,
) -> Report:
    """Every check for settings that are already loaded (the tray has them)."""
    options = options or DoctorOptions()
    results = [loaded or passed("config", f"{source or 'settings'} loaded (lifecycle {config.lifecycle})")]
    results.append(check_lifecycle_keys(config))
    certificate_results = check_certificates(config, options.clock())
    results += certificate_results
    results.append(check_proxy_port(config.listen_address, config.listen_port))
    results.append(check_system_proxy(config, options.system_proxy))

    endpoint: Endpoint | None = None
    public_ip: str | None = None
    not_running = ""
    if config.lifecycle == "lambda":
        found, status = check_control_plane(config, make_lifecycle=options.control_plane)
        results += found
        if status is not None and status.state is ServerState.RUNNING and status.public_ip:
            endpoint, public_ip = Endpoint(status.public_ip, status.port), status.public_ip
        elif status is not None:
            not_running = _NOT_RUNNING.get(status.state, f"the server is {status.state.value}")
        else:
            not_running = "the control plane did not say where the server is"
    if config.lifecycle == "ecs" or options.aws:
        aws_results, aws_ip = _aws(config, options)
        results += aws_results
        if endpoint is None and aws_ip:
            endpoint, public_ip = Endpoint(aws_ip, config.server_port), aws_ip
        elif endpoint is None and config.lifecycle == "ecs":
            not_running = "no running task with a public IP: Connect wakes the server"
    if config.lifecycle in ("static", "local"):
        endpoint = Endpoint(config.server_address or "127.0.0.1", config.server_port)
    results += _server(config, endpoint, not_running, certificate_results, options)
    return Report(tuple(results), source=source, server_public_ip=public_ip)


def _aws(config: AgentConfig, options: DoctorOptions) -> tuple[list[CheckResult], str | None]:
    from botocore.exceptions import BotoCoreError

    try:
        clients = options.aws_clients(config)
    except BotoCoreError as error:  # ProfileNotFound, NoRegionError, ... while building the clients
        return [
            failed(
                "aws.credentials",
                f"cannot use AWS: {error}",
                "set aws_profile to a profile from `aws configure list-profiles`, and aws_region",
            ),
            skipped("aws", "the other AWS checks need working credentials"),
        ], None
    findings = run_aws_checks(clients, config, now=options.clock(), public_address=options.public_address)
    return findings.results, findings.public_ip


def _server(
    config: AgentConfig,
    endpoint: Endpoint | None,
    not_running: str,
    certificate_results: Sequence[CheckResult],
    options: DoctorOptions,
) -> list[CheckResult]:
    if any(r.check == "certificates.files" and r.status is not Status.PASS for r in certificate_results):
        return [skipped("server", "connecting needs the certificate files")]
    if endpoint is None:
        return [skipped("server", not_running or "no server address to connect to")]
    outcome = probe_server(endpoint, config, timeout=options.server_timeout)
    first = outcome.results[0]
    if config.lifecycle == "local" and first.check == "server.tcp" and "refused" in first.finding:
        return [info("server", f"no server runs on {endpoint} now; lifecycle local starts it on Connect")]
    return outcome.results


# ----------------------------------------------------------------------------- command line


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def build_parser(prog: str = "fluidity doctor") -> argparse.ArgumentParser:
    parser = program_parser(
        prog,
        "Read-only checks of Fluidity's settings, certificates, local proxy port, control "
        "plane, AWS deployment and server; one PASS/WARN/FAIL line each with the fix. "
        "Exit code 1 when a check failed.",
        (
            f"{prog}                                   the settings file in the config folder",
            f"{prog} --config ./configs/agent.yaml --aws --json",
        ),
        usage=f"{prog} [--json] [--aws] [--config PATH] [--KEY-NAME VALUE ...]",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    parser.add_argument(
        "--aws",
        action="store_true",
        help="also check the AWS deployment with your AWS credentials (always done for lifecycle ecs)",
    )
    parser.add_argument(
        "--public-ip",
        type=_address,
        metavar="ADDRESS",
        help=f"this machine's public address, for the security-group check (default: ask {CHECKIP_URL})",
    )
    parser.add_argument(
        "--no-ip-lookup",
        action="store_true",
        help="do not ask the internet for this machine's public address",
    )
    add_arguments(parser, AgentConfig)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "fluidity doctor") -> int:
    args = build_parser(prog).parse_args(argv)
    path: Path | None = args.config
    if path is None and default_agent_config_path().is_file():
        path = default_agent_config_path()
    if args.public_ip is not None:
        address = fixed_address(args.public_ip)
    elif args.no_ip_lookup:
        address = fixed_address(None)
    else:
        address = lookup_public_ip
    options = DoctorOptions(aws=args.aws, public_address=address)
    report = run_doctor(path, overrides=overrides_from_args(args, AgentConfig), options=options)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        sys.stdout.write(render_text(report))
    sys.stdout.flush()
    return report.exit_code


__all__ = ["DoctorOptions", "build_parser", "diagnose", "lookup_public_ip", "main", "run_doctor"]
