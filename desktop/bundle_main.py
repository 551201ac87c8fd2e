"""Entry point of the installed (PyInstaller) app: one executable runs every Fluidity program.

A frozen app carries its own interpreter and libraries; one executable per program would
ship them five times. So ``fluidity`` alone runs the tray and ``fluidity agent|server|certs|local``
run the other programs (``desktop.launch`` builds these command lines). Each program's module
is imported only once it is chosen, so ``fluidity server`` never loads pystray, Pillow or GTK:
it starts fast and works on a machine without a display.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from desktop.launch import FROZEN_SUBCOMMANDS, PROGRAMS
from server import __version__

#: Subcommand -> module whose ``main(argv)`` runs it.
SUBCOMMANDS = {sub: PROGRAMS[program] for program, sub in FROZEN_SUBCOMMANDS.items() if sub is not None}
#: What runs when no subcommand is given.
DEFAULT_MODULE = PROGRAMS["fluidity"]

USAGE = f"""\
usage: fluidity [TRAY OPTIONS]          the tray app (fluidity --help-tray lists its options)
       fluidity agent  [OPTIONS]        headless agent: wake the server, run the local proxy
       fluidity server [OPTIONS]        tunnel server
       fluidity certs  COMMAND ...      create, check and move certificates
       fluidity local  [OPTIONS]        tunnel server and proxy on this machine, no AWS needed
       fluidity --version

Each command has its own --help, e.g. fluidity agent --help.
Commands: {", ".join(SUBCOMMANDS)}.
"""


def resolve(argv: Sequence[str]) -> tuple[str, list[str]]:
    """The module to run and the arguments it gets; ValueError for an unknown command."""
    args = list(argv)
    if args and args[0] in SUBCOMMANDS:
        return SUBCOMMANDS[args[0]], args[1:]
    if args and not args[0].startswith("-"):
        raise ValueError(f"unknown command {args[0]!r}; choose one of: {', '.join(SUBCOMMANDS)}")
    if args[:1] == ["--help-tray"]:
        return DEFAULT_MODULE, ["--help", *args[1:]]
    return DEFAULT_MODULE, args


def main(argv: Sequence[str] | None = None) -> int:
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
