"""`fluidity-agent --config configs/agent.yaml`: the headless agent.

Wakes the server through the configured lifecycle backend, waits for it (bounded by
``connection_timeout``), runs the local proxy over the tunnel, re-wakes the server if it
disappears, and on Ctrl+C / SIGTERM stops the proxy and kills the server.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from desktop.config import AgentConfig, default_agent_config_path
from desktop.controller import Controller, Snapshot, State, missing_certificates
from desktop.lifecycle.base import LifecycleError
from desktop.lifecycle.factory import create_lifecycle
from server import __version__
from server.config_loader import ConfigError, add_arguments, load_from_args
from server.json_logging import configure_logging
from server.tls import TlsSetupError, client_context

log = logging.getLogger("fluidity.agent")
DOCTOR_FLAG = "--doctor"


def build_parser(prog: str = "fluidity-agent", description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description
        or "Fluidity agent: wakes the tunnel server and runs the local HTTP/HTTPS/WebSocket proxy over it.",
    )
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    add_arguments(parser, AgentConfig)
    return parser


def _agent_parser() -> argparse.ArgumentParser:
    """``fluidity-agent``'s own parser: the shared one plus --doctor (main() hands that to the doctor)."""
    parser = build_parser()
    parser.add_argument(
        DOCTOR_FLAG,
        action="store_true",
        help="only check the settings, certificates, control plane and server, print PASS/WARN/FAIL lines "
        "with fixes and exit (as `fluidity doctor`; also takes --json, --aws, --public-ip)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if DOCTOR_FLAG in arguments:
        from desktop import doctor

        rest = [argument for argument in arguments if argument != DOCTOR_FLAG]
        return doctor.main(rest, prog=f"fluidity-agent {DOCTOR_FLAG}")
    args = _agent_parser().parse_args(arguments)
    try:
        config = load_from_args(AgentConfig, args, default_path=default_agent_config_path())
    except ConfigError as exc:
        print(f"fluidity-agent: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_file)
    return run_headless(config)


def run_headless(config: AgentConfig, *, banner: str | None = None) -> int:
    """Drive the same state machine as the tray, with signals instead of clicks.

    Connect at start; Ctrl+C or SIGTERM is Disconnect + Quit (which kills the server when
    ``kill_on_disconnect`` applies). An error state ends the program with exit code 1.
    """
    if not missing_certificates(config):  # missing ones: the controller says how to get them
        try:  # refuse a bad or too-open key before waking (and paying for) a server
            client_context(config.ca_file, config.cert_file, config.key_file)
        except TlsSetupError as exc:
            print(f"fluidity-agent: {exc}", file=sys.stderr)
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

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        lifecycle = create_lifecycle(config)
    except LifecycleError as exc:
        print(f"fluidity-agent: {exc.message}", file=sys.stderr)
        return 2
    controller = Controller(config, lifecycle)
    controller.subscribe(on_state)
    controller.connect()
    while not stop.wait(0.5):
        pass
    controller.shutdown(timeout=config.connection_timeout + 30.0)
    if failed:
        print(f"fluidity-agent: {failed[-1]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
