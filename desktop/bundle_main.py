"""Entry point of the installed (PyInstaller) app: one executable runs every Fluidity program.

The installers ship one executable (one file to sign, one Start menu or Dock target, one
login item), so ``fluidity`` alone runs the tray and ``fluidity agent|server|certs|local``
run the other programs (``desktop.launch`` builds these command lines). Each program's module
is imported only once it is chosen, so ``fluidity server`` never loads pystray, Pillow or GTK:
it starts fast and works on a machine without a display.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import MutableMapping, Sequence

from desktop.launch import FROZEN_SUBCOMMANDS, PROGRAMS, is_frozen
from server import __version__

#: Subcommand -> module whose ``main(argv)`` runs it.
SUBCOMMANDS = {sub: PROGRAMS[program] for program, sub in FROZEN_SUBCOMMANDS.items() if sub is not None}
#: What runs when no subcommand is given.
DEFAULT_MODULE = PROGRAMS["fluidity"]
#: Subcommands of the tray program itself (``fluidity doctor``), passed on to it whole.
TRAY_SUBCOMMANDS = ("doctor", "usage")
#: Shows the tray's own options (``--help`` lists the commands).
HELP_TRAY = "--help-tray"

USAGE = f"""\
usage: fluidity [COMMAND] [OPTIONS]

Fluidity, a personal on-demand tunnel. Without a command it is the tray app.

examples:
  fluidity                         the tray icon: Connect wakes your server, Disconnect stops it
  fluidity local                   tunnel server and proxy on this machine, no AWS account needed

commands:
  fluidity [TRAY OPTIONS]          the tray app ({HELP_TRAY} lists its options)
  fluidity agent  [OPTIONS]        headless agent: wake the server, run the local proxy
  fluidity server [OPTIONS]        tunnel server
  fluidity certs  COMMAND ...      create, check and move certificates
  fluidity local  [OPTIONS]        tunnel server and proxy on this machine, no AWS needed
  fluidity doctor [OPTIONS]        check the set-up: one PASS/WARN/FAIL line per check, with the fix
  fluidity usage  [OPTIONS]        this month's server time, traffic and cost
  fluidity --version

Each command has its own --help, e.g. fluidity agent --help.
Commands: {", ".join([*SUBCOMMANDS, *TRAY_SUBCOMMANDS])}.
"""


def resolve(argv: Sequence[str]) -> tuple[str, list[str]]:
    """The module to run and the arguments it gets; ValueError for an unknown command."""
    args = list(argv)
    if args and args[0] in SUBCOMMANDS:
        return SUBCOMMANDS[args[0]], args[1:]
    if args and args[0] in TRAY_SUBCOMMANDS:
        return DEFAULT_MODULE, args
    if args and not args[0].startswith("-"):
        choices = ", ".join([*SUBCOMMANDS, *TRAY_SUBCOMMANDS])
        raise ValueError(f"unknown command {args[0]!r}; choose one of: {choices}")
    return DEFAULT_MODULE, args  # the tray program itself reads --help-tray


def restore_library_path(environ: MutableMapping[str, str]) -> None:
    """Give programs started from the bundle (xdg-open, zenity, a browser) the user's own
    LD_LIBRARY_PATH instead of the bundle's library folder.

    PyInstaller's bootloader points LD_LIBRARY_PATH at the bundle (keeping any earlier value as
    LD_LIBRARY_PATH_ORIG). The dynamic loader read it when this process started, so changing it
    now only affects children; the bundle's own children get it set again by the bootloader.
    """
    original = environ.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is not None:
        environ["LD_LIBRARY_PATH"] = original
    else:
        environ.pop("LD_LIBRARY_PATH", None)


def main(argv: Sequence[str] | None = None) -> int:
    if is_frozen():
        restore_library_path(os.environ)
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        print(f"fluidity {__version__}")
        return 0
    if args[:1] in (["--help"], ["-h"]):
        print(USAGE, end="")
        return 0
    try:
        module, rest = resolve(args)
    except ValueError as error:
        print(f"fluidity: {error}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    program_main = importlib.import_module(module).main
    return int(program_main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
