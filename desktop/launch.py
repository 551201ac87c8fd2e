"""How to start Fluidity's own programs, from a pip install or from a PyInstaller bundle.

A frozen bundle is one executable that runs every program (``fluidity server ...``);
an installed package has one module per program. Autostart entries and the local
lifecycle backend both need the right command line for the current installation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: Program name -> module whose ``main()`` runs it.
PROGRAMS = {
    "fluidity": "desktop.tray_app",
    "fluidity-agent": "desktop.agent_cli",
    "fluidity-server": "server.main",
    "fluidity-certs": "desktop.certificates",
    "fluidity-local": "desktop.local_default",
}

#: The subcommand a frozen bundle understands for each program.
FROZEN_SUBCOMMANDS = {
    "fluidity": None,
    "fluidity-agent": "agent",
    "fluidity-server": "server",
    "fluidity-certs": "certs",
    "fluidity-local": "local",
}


def is_frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


#: On Windows the bundle has a windowed tray executable and a console one for the CLIs.
WINDOWED_EXE = "fluidity.exe"
CONSOLE_EXE = "fluidity-cli.exe"


def bundle_executable(*, console: bool) -> str:
    """The bundle's executable: the tray (and login item) must never open a console window."""
    exe = Path(sys.executable)
    if os.name != "nt":
        return str(exe)
    wanted = exe.with_name(CONSOLE_EXE if console else WINDOWED_EXE)
    return str(wanted) if wanted.is_file() else str(exe)


def command_for(program: str) -> list[str]:
    """The argv prefix that runs ``program`` in this installation."""
    if program not in PROGRAMS:
        raise ValueError(f"unknown program {program!r}")
    if is_frozen():
        sub = FROZEN_SUBCOMMANDS[program]
        if sub is None:
            return [bundle_executable(console=False)]
        return [bundle_executable(console=True), sub]
    return [sys.executable, "-m", PROGRAMS[program]]
