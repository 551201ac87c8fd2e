"""`fluidity`: the tray app. Loads settings, makes sure only one tray runs, shows the icon.

Everything here is start-up and shut-down; the behaviour lives in ``desktop.controller``
(state machine) and ``desktop.tray`` (icon and menu).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from desktop import autostart
from desktop.config import AgentConfig, default_agent_config_path, default_log_path
from desktop.controller import Controller
from desktop.desktop_shell import CHOOSE_FILE_FLAG, run_tk_file_dialog
from desktop.first_run import write_first_run_config
from desktop.icons import asset_dir
from desktop.lifecycle.base import LifecycleError
from desktop.lifecycle.factory import create_lifecycle
from desktop.single_instance import InstanceLock
from desktop.system_proxy.follower import follow_system_proxy
from desktop.tray import (
    QUIT_TIMEOUT,
    TRAY_HOST_WAIT,
    TrayApp,
    TrayUnavailable,
    display_problem,
    load_pystray,
    wait_for_tray_host,
)
from server import __version__
from server.config_loader import ConfigError, add_arguments, load_from_args, program_parser, settings_flags
from server.json_logging import configure_logging

log = logging.getLogger("fluidity.tray")

ALREADY_RUNNING = "Fluidity is already running"
#: ``fluidity doctor [--json] [--aws] ...``: the read-only checks instead of the tray.
DOCTOR_COMMAND = "doctor"
#: ``fluidity usage``: this month's server time, traffic and cost.
USAGE_COMMAND = "usage"
#: The local server's log, next to the tray's own.
SERVER_LOG_NAME = "server.log"


def build_parser() -> argparse.ArgumentParser:
    parser = program_parser(
        "fluidity",
        "Fluidity tray app: Connect wakes the server and runs the local proxy over the tunnel. "
        "`fluidity --help` lists the other commands (agent, local, doctor, usage...).",
        (
            "fluidity                                   settings from the per-user config folder",
            "fluidity --config ~/fluidity/agent.yaml --listen-port 3128",
        ),
        usage="fluidity [--background] [--config PATH] [--KEY-NAME VALUE ...]",
    )
    parser.add_argument("--version", action="version", version=f"fluidity {__version__}")
    parser.add_argument(
        autostart.BACKGROUND_FLAG,
        action="store_true",
        help="started at login: wait for the desktop's tray to appear and stay quiet if already running",
    )
    parser.add_argument(CHOOSE_FILE_FLAG, metavar="TITLE", default=None, help=argparse.SUPPRESS)
    add_arguments(parser, AgentConfig)
    return parser


def login_command(args: argparse.Namespace, explicit_config: Path | None) -> list[str]:
    """What "Start at login" runs: this tray with the settings file and flags it was started with."""
    return autostart.launch_command(explicit_config, settings_flags(args, AgentConfig))


def _no_tray_message(problem: str, config_path: Path) -> str:
    log.error("cannot show the tray icon: %s", problem)  # at login the log is the only witness
    return (
        f"fluidity: cannot show the tray icon: {problem}.\n"
        f"Run the agent without a tray instead:  fluidity-agent --config {config_path}"
    )


def _install_quit_signals(app: TrayApp) -> None:
    """Quit cleanly (stopping the server, restoring the proxy) on SIGINT/SIGTERM/SIGHUP, also under GTK."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received, quitting", extra={"signal": signal.Signals(signum).name})
        app.on_quit()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if hasattr(signal, "SIGHUP"):  # the session is ending: Quit, so the system proxy is restored
        signal.signal(signal.SIGHUP, on_signal)
    if "gi.repository.GLib" in sys.modules and hasattr(signal, "SIGTERM") and sys.platform != "win32":
        # Python handlers only run when the main thread executes Python; GTK's loop sits in C.
        from gi.repository import GLib

        def on_glib_signal() -> bool:
            app.on_quit()
            return False  # GLib.SOURCE_REMOVE: one Quit is enough

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, on_glib_signal)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == [DOCTOR_COMMAND]:
        from desktop import doctor  # only the doctor's imports: no tray, no display needed

        return doctor.main(arguments[1:], prog=f"fluidity {DOCTOR_COMMAND}")
    if arguments[:1] == [USAGE_COMMAND]:
        from desktop import usage_cli

        return usage_cli.main(arguments[1:], prog=f"fluidity {USAGE_COMMAND}")
    from desktop import bundle_main  # the same commands and --help as the installed app

    if arguments[:1] in (["--help"], ["-h"]):
        print(bundle_main.USAGE, end="")
        return 0
    if arguments and arguments[0] in bundle_main.SUBCOMMANDS:
        return bundle_main.main(arguments)
    if arguments[:1] == [bundle_main.HELP_TRAY]:
        arguments = ["--help", *arguments[1:]]
    args = build_parser().parse_args(arguments)
    if args.choose_file is not None:
        return run_tk_file_dialog(args.choose_file)

    explicit_config: Path | None = args.config
    config_path = explicit_config or default_agent_config_path()
    if explicit_config is None and write_first_run_config(config_path):
        print(f"fluidity: created settings file {config_path}", file=sys.stderr)
    args.config = config_path
    try:
        config = load_from_args(AgentConfig, args)
    except ConfigError as error:
        print(f"fluidity: {error}", file=sys.stderr)
        return 2

    lock = InstanceLock()
    if not lock.acquire():
        if not args.background:
            pid = lock.holder_pid()
            print(f"{ALREADY_RUNNING}{f' (pid {pid})' if pid else ''}.", file=sys.stderr)
        return 0
    try:
        return _run(args, config, config_path, explicit_config)
    finally:
        lock.release()


def _run(
    args: argparse.Namespace, config: AgentConfig, config_path: Path, explicit_config: Path | None
) -> int:
    log_path = config.log_file or default_log_path()
    # A tray app logs to its file ("Open log"); the terminal, if any, gets only the messages above.
    configure_logging(config.log_level, log_path, stream=None, log_format=config.log_format)
    log.info("fluidity starting", extra={"version": __version__, "settings": config.describe()})

    problem = display_problem()
    if problem is None:
        problem = wait_for_tray_host(TRAY_HOST_WAIT if args.background else 0.0)
    if problem is not None:
        print(_no_tray_message(problem, config_path), file=sys.stderr)
        return 1
    try:
        pystray = load_pystray()
    except TrayUnavailable as error:
        print(_no_tray_message(str(error), config_path), file=sys.stderr)
        return 1
    from desktop.agent import metered_agents
    from desktop.budget import UsageWatch
    from desktop.usage import UsageStore, default_usage_path

    store = UsageStore(default_usage_path())
    server_log = log_path.with_name(SERVER_LOG_NAME)
    try:
        lifecycle = create_lifecycle(config, usage=store, server_log=server_log)
    except LifecycleError as error:
        print(f"fluidity: {error.message}", file=sys.stderr)
        return 2

    controller = Controller(config, lifecycle, agent_factory=metered_agents(store))
    # Before any Connect: restores what a crashed tray left behind, then follows the sessions.
    system_proxy = follow_system_proxy(controller, config, "manual", keep_when_off=True)
    assets = asset_dir()
    app = TrayApp(
        controller,
        pystray,
        config_path=config_path,
        log_path=log_path,
        autostart=autostart.for_platform(icon=assets / "fluidity.png" if assets else None),
        autostart_command=login_command(args, explicit_config),
        system_proxy=system_proxy,
        load_settings=lambda: load_from_args(AgentConfig, args),
        server_log=server_log,
    )
    watch = UsageWatch(
        controller,
        store,
        how_to_raise=f"raise monthly_budget in {config_path} (or remove it) and choose Reload settings",
        on_notice=lambda message, warning: app.notify(message, error=warning),
    )
    app.usage = watch
    watch.start()
    _install_quit_signals(app)
    try:
        app.run()
    except TrayUnavailable as error:
        print(_no_tray_message(str(error), config_path), file=sys.stderr)
        return 1
    finally:
        controller.shutdown(QUIT_TIMEOUT)
        watch.stop()
        if system_proxy is not None:
            system_proxy.close()
        log.info("fluidity stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
