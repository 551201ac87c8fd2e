"""`fluidity-agent --config configs/agent.yaml`: the headless agent.

Wakes the server through the configured lifecycle backend, waits for it (bounded by
``connection_timeout``), runs the local proxy over the tunnel, re-wakes the server if it
disappears, and on Ctrl+C / SIGTERM stops the proxy and kills the server. With a
``monthly_budget`` it refuses to start once the month's cost reached it, and stops the
server when a running session reaches it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Collection, Sequence
from types import FrameType

from desktop.agent import metered_agents
from desktop.config import AgentConfig, default_agent_config_path
from desktop.controller import Controller, Snapshot, State, missing_certificates, missing_certificates_message
from desktop.lifecycle.base import LifecycleError
from desktop.lifecycle.factory import create_lifecycle
from desktop.system_proxy.follower import follow_system_proxy
from desktop.usage import UsageStore, default_usage_path, session_summary
from server import __version__
from server.config_loader import ConfigError, add_arguments, load_from_args, program_parser
from server.json_logging import configure_logging
from server.tls import TlsSetupError, client_context

log = logging.getLogger("fluidity.agent")
DOCTOR_FLAG = "--doctor"
USAGE_FLAG = "--usage"

AGENT_EXAMPLES = (
    "fluidity-agent --config ./configs/agent.yaml          wake the server, proxy on 127.0.0.1:8080",
    "fluidity-agent --config ./configs/agent.yaml --listen-port 3128 --log-level debug",
)


def build_parser(
    prog: str = "fluidity-agent",
    description: str | None = None,
    *,
    examples: Sequence[str] = AGENT_EXAMPLES,
    exclude: Collection[str] = (),
) -> argparse.ArgumentParser:
    parser = program_parser(
        prog,
        description
        or "Fluidity agent: wakes the tunnel server and runs the local HTTP/HTTPS/WebSocket proxy over it. "
        "Every setting below can also be given in the --config file or as FLUIDITY_<KEY>.",
        examples,
    )
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    add_arguments(parser, AgentConfig, exclude=exclude)
    return parser


def _agent_parser() -> argparse.ArgumentParser:
    """``fluidity-agent``'s own parser: the shared one plus --doctor and --usage (handed on by main())."""
    parser = build_parser()
    parser.add_argument(
        DOCTOR_FLAG,
        action="store_true",
        help="only check the settings, certificates, control plane and server, print PASS/WARN/FAIL lines "
        "with fixes and exit (as `fluidity doctor`; also takes --json, --aws, --public-ip)",
    )
    parser.add_argument(
        USAGE_FLAG,
        action="store_true",
        help="only print this month's server time, traffic and cost and exit (as `fluidity usage`)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if DOCTOR_FLAG in arguments:
        from desktop import doctor

        rest = [argument for argument in arguments if argument != DOCTOR_FLAG]
        return doctor.main(rest, prog=f"fluidity-agent {DOCTOR_FLAG}")
    if USAGE_FLAG in arguments:
        from desktop import usage_cli

        rest = [argument for argument in arguments if argument != USAGE_FLAG]
        return usage_cli.main(rest, prog=f"fluidity-agent {USAGE_FLAG}")
    args = _agent_parser().parse_args(arguments)
    try:
        config = load_from_args(AgentConfig, args, default_path=default_agent_config_path())
    except ConfigError as exc:
        print(f"fluidity-agent: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_file, log_format=config.log_format)
    return run_headless(config, source=str(args.config or default_agent_config_path()))


def budget_hint(source: str) -> str:
    """How someone at a terminal raises the budget (for the refusal and the stop messages)."""
    return f"raise monthly_budget in {source} or run with --monthly-budget USD (0 = no budget)"


def run_headless(
    config: AgentConfig,
    *,
    banner: str | None = None,
    prog: str = "fluidity-agent",
    source: str = "the settings file",
    usage: UsageStore | None = None,
) -> int:
    """Drive the same state machine as the tray, with signals instead of clicks.

    Connect at start; Ctrl+C or SIGTERM is Disconnect + Quit (which kills the server when
    ``kill_on_disconnect`` applies). An error state ends the program with exit code 1.
    """
    from desktop.budget import UsageWatch

    if config.lifecycle != "local":
        missing = missing_certificates(config)
        if missing:
            print(f"{prog}: {missing_certificates_message(missing, tray=False)}", file=sys.stderr)
            return 2
        try:  # refuse a bad or too-open key before waking (and paying for) a server
            client_context(config.ca_file, config.cert_file, config.key_file)
        except TlsSetupError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
    stop = threading.Event()
    failed: list[str] = []
    announced = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received, shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    def on_state(snap: Snapshot) -> None:
        if snap.state is State.CONNECTED and not announced.is_set():
            announced.set()
            host, port = snap.proxy_address
            print(
                banner or f"Fluidity proxy ready on http://{host}:{port} (Ctrl+C to stop)",
                file=sys.stderr,
                flush=True,
            )
        elif snap.state is State.ERROR and snap.error:
            failed.append(snap.error)
            stop.set()

    def on_notice(message: str, _warning: bool) -> None:
        log.warning("%s", message)
        print(f"{prog}: {message}", file=sys.stderr, flush=True)

    store = usage or UsageStore(default_usage_path())
    try:
        lifecycle = create_lifecycle(config, usage=store)
    except LifecycleError as exc:
        print(f"{prog}: {exc.message}", file=sys.stderr)
        return 2
    controller = Controller(config, lifecycle, agent_factory=metered_agents(store))
    watch = UsageWatch(controller, store, how_to_raise=budget_hint(source), on_notice=on_notice)
    refusal = watch.connect_refusal()
    if refusal is not None:
        print(f"{prog}: {refusal}", file=sys.stderr)
        controller.shutdown(timeout=10.0)
        store.close()
        return 1
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if hasattr(signal, "SIGHUP"):  # the terminal closed: still restore the system proxy
        signal.signal(signal.SIGHUP, on_signal)
    controller.subscribe(on_state)
    system_proxy = follow_system_proxy(controller, config, "off", notify=on_notice)
    watch.start()
    controller.connect()
    interval = config.stats_interval
    next_stats = time.monotonic() + interval
    while not stop.wait(0.5):
        if interval > 0 and time.monotonic() >= next_stats and store.metering:
            next_stats = time.monotonic() + interval
            log.info(session_summary(store))
    controller.shutdown(timeout=config.connection_timeout + 30.0)
    if store.metering:
        log.info(session_summary(store))
    if system_proxy is not None:
        system_proxy.close()
    watch.stop()
    if failed:
        print(f"{prog}: {failed[-1]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
