"""``make build``: launchers in ``build/`` for the programs installed in this checkout.

The operations runbook starts the agent as ``./build/fluidity-agent --config
./configs/agent.yaml``. Rather than freezing anything, each launcher runs the program of
the same name from the project's virtualenv (or from PATH when there is none), so it is
always the checkout's current code. On Windows a ``.cmd`` twin is written for PowerShell
and cmd.exe; the extensionless file serves Git Bash. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

PROGRAMS = (
    "fluidity",
    "fluidity-agent",
    "fluidity-server",
    "fluidity-certs",
    "fluidity-local",
    "fluidity-deploy",
)


def program_path(bin_dir: str, name: str, *, windows: bool) -> str:
    """Where ``name`` is: an absolute path inside ``bin_dir``, or the bare name (found on PATH)."""
    if not bin_dir:
        return name
    path = Path(bin_dir).resolve() / (f"{name}.exe" if windows else name)
    return path.as_posix()


def posix_launcher(name: str, target: str) -> str:
    return (
        "#!/bin/sh\n"
        f"# Written by `make build`: runs {name} as installed in this checkout.\n"
        f'exec "{target}" "$@"\n'
    )


def windows_launcher(name: str, target: str) -> str:
    return (
        "@echo off\r\n"
        f"rem Written by `make build`: runs {name} as installed in this checkout.\r\n"
        f'"{target}" %*\r\n'
    )


def write_launchers(out: Path, bin_dir: str, *, windows: bool) -> list[Path]:
    """Write one launcher per program (two on Windows); refuse when the virtualenv lacks a program."""
    missing = [
        name
        for name in PROGRAMS
        if bin_dir and not Path(program_path(bin_dir, name, windows=windows)).exists()
    ]
    if missing:
        raise SystemExit(
            f"launchers: {', '.join(missing)} not found in {bin_dir}; install Fluidity first (make venv)"
        )
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PROGRAMS:
        target = program_path(bin_dir, name, windows=windows)
        launcher = out / name
        launcher.write_text(posix_launcher(name, target), encoding="utf-8", newline="\n")
        launcher.chmod(0o755)
        written.append(launcher)
        if windows:
            twin = out / f"{name}.cmd"
            twin.write_text(windows_launcher(name, target.replace("/", "\\")), encoding="utf-8", newline="")
            written.append(twin)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launchers.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build"), help="folder to write (default: build)")
    parser.add_argument(
        "--bin", default="", help="the virtualenv's program folder (empty: the programs are on PATH)"
    )
    args = parser.parse_args(argv)
    written = write_launchers(args.out, args.bin, windows=os.name == "nt")
    print(f"Wrote {', '.join(path.as_posix() for path in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
