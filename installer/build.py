"""Build Fluidity's installers on this machine: ``python installer/build.py --target linux``.

One command for developers and for the release workflow alike. It renders any missing
icons, runs PyInstaller on ``installer/fluidity.spec`` (one folder, one executable for every
program), checks that the result runs, and packages it:

- linux:   ``fluidity-<v>-linux-<machine>.tar.gz`` and ``fluidity_<v>_<arch>.deb``
- windows: ``Fluidity-<v>-windows-setup.exe`` (Inno Setup 6 must be installed)
- macos:   ``Fluidity-<v>-macos-<cpu>.dmg`` (signed and notarized when the CI secrets are set)

Output: ``<out>/bundle`` (what PyInstaller made) and ``<out>/packages`` (what users download,
with a SHA256SUMS file). PyInstaller's work files and cache stay under ``--work``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

INSTALLER_DIR = Path(__file__).resolve().parent
ROOT = INSTALLER_DIR.parent
for _path in (str(INSTALLER_DIR), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bundle_contents import APP_NAME, CONSOLE_EXECUTABLE, EXECUTABLE, GUI_STACKS, TARGETS  # noqa: E402
from icon_files import prepare_icons  # noqa: E402
from linux_packages import DEFAULT_MAINTAINER, PackagingError  # noqa: E402

from server import __version__  # noqa: E402
from server.errors import FluidityError  # noqa: E402

SPEC = INSTALLER_DIR / "fluidity.spec"
#: The built program must answer --version within this long (a hang guard).
SMOKE_TIMEOUT = 60.0


class BuildError(FluidityError):
    """The build cannot go on; the message says what to fix."""


def current_target() -> str:
    if sys.platform == "win32":
        return "windows"
    if sys.platform == "darwin":
        return "macos"
    return "linux"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build.py", description="Build the Fluidity bundle and its installers for this OS."
    )
    parser.add_argument("--target", choices=TARGETS, default=current_target(), help="default: this OS")
    parser.add_argument(
        "--gui-stack",
        choices=GUI_STACKS,
        default="system",
        help="Linux: where GTK comes from (default: the desktop's; see docs/installing.md)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    parser.add_argument(
        "--work", type=Path, default=None, help="PyInstaller work and cache folder (default: build/installer)"
    )
    parser.add_argument("--bundle-only", action="store_true", help="stop after the one-folder bundle")
    parser.add_argument(
        "--maintainer",
        default=DEFAULT_MAINTAINER,
        help="Linux: the .deb's Maintainer field, as 'Name <email>'",
    )
    parser.add_argument(
        "--expect-version",
        metavar="TAG",
        help="fail unless the package version matches this (a release tag like v1.2.3)",
    )
    return parser


def check_version(expected: str | None) -> None:
    if expected is not None and expected.removeprefix("v") != __version__:
        raise BuildError(
            f"the tag {expected} does not match the package version {__version__} (server/__init__.py)"
        )


def check_build_python(target: str, gui_stack: str) -> None:
    """Fail early, with the fix, when the build Python lacks what the chosen bundle needs."""
    try:
        import PyInstaller  # noqa: F401
    except ImportError:
        raise BuildError("PyInstaller is not installed: pip install -e '.[installer]'") from None
    if target != current_target():
        raise BuildError(f"PyInstaller cannot cross-compile: build the {target} installer on {target}")
    if target == "linux" and gui_stack != "none":
        probe = subprocess.run([sys.executable, "-c", "import gi"], capture_output=True, check=False)
        if probe.returncode != 0:
            raise BuildError(
                "PyGObject (gi) is not importable, so the tray would have no menu on Linux. Install it "
                "(apt-get install libgirepository1.0-dev libcairo2-dev pkg-config gir1.2-gtk-3.0; "
                "pip install 'PyGObject<3.51') or build with --gui-stack none"
            )


def run_pyinstaller(target: str, gui_stack: str, icons: Path, bundle_root: Path, work: Path) -> None:
    env = dict(os.environ)
    env["PYINSTALLER_CONFIG_DIR"] = str(work / "cache")  # PyInstaller's binary cache, kept with the build
    env["PYSTRAY_BACKEND"] = "dummy"  # lets the analysis import pystray without a display
    command = [
        sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
        "--distpath", str(bundle_root), "--workpath", str(work / "pyinstaller"), str(SPEC),
        "--", "--target", target, "--gui-stack", gui_stack, "--icons", str(icons),
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env, cwd=ROOT)


def bundle_paths(target: str, bundle_root: Path) -> tuple[Path, Path]:
    """The folder users get, and the executable that can print to a console."""
    if target == "macos":
        app = bundle_root / f"{APP_NAME}.app"
        return app, app / "Contents" / "MacOS" / EXECUTABLE
    folder = bundle_root / EXECUTABLE
    if target == "windows":
        return folder, folder / f"{CONSOLE_EXECUTABLE}.exe"
    return folder, folder / EXECUTABLE


def smoke_check(executable: Path) -> float:
    """Run ``--version`` on the built program; the seconds it took."""
    started = time.monotonic()
    result = subprocess.run(
        [str(executable), "--version"], capture_output=True, text=True, timeout=SMOKE_TIMEOUT, check=False
    )
    elapsed = time.monotonic() - started
    expected = f"fluidity {__version__}"
    if result.returncode != 0 or result.stdout.strip() != expected:
        raise BuildError(
            f"{executable} --version printed {result.stdout.strip()!r} (exit {result.returncode}), "
            f"expected {expected!r}: {result.stderr.strip()[-500:]}"
        )
    return elapsed


def folder_size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())


def write_checksums(packages: list[Path], out_dir: Path, target: str) -> Path:
    lines = []
    for package in packages:
        digest = hashlib.sha256(package.read_bytes()).hexdigest()
        lines.append(f"{digest}  {package.name}\n")
    checksums = out_dir / f"SHA256SUMS-{target}.txt"
    checksums.write_text("".join(lines), encoding="utf-8")
    return checksums


def make_packages(
    args: argparse.Namespace, bundle: Path, icons: Path, out_dir: Path, work: Path
) -> list[Path]:
    if args.target == "linux":
        from linux_packages import build_deb, build_tarball

        system_gui = args.gui_stack == "system"
        deb = build_deb(
            bundle, icons, out_dir, work, __version__, system_gui=system_gui, maintainer=args.maintainer
        )
        return [build_tarball(bundle, out_dir, __version__), deb]
    if args.target == "windows":
        from windows_package import build_installer

        return [build_installer(bundle, icons / "fluidity.ico", out_dir, __version__)]
    from macos_package import build_dmg

    return [build_dmg(bundle, out_dir, work, __version__)]


def build(args: argparse.Namespace) -> list[Path]:
    check_version(args.expect_version)
    check_build_python(args.target, args.gui_stack)
    out = args.out.resolve()
    work = (args.work or ROOT / "build" / "installer").resolve()
    work.mkdir(parents=True, exist_ok=True)
    icons = prepare_icons(ROOT / "assets", work)

    started = time.monotonic()
    bundle_root = out / "bundle"
    run_pyinstaller(args.target, args.gui_stack, icons, bundle_root, work)
    bundle, console_executable = bundle_paths(args.target, bundle_root)
    version_seconds = smoke_check(console_executable)
    print(
        f"bundle: {bundle} ({folder_size(bundle) / 1e6:.1f} MB unpacked, built in "
        f"{time.monotonic() - started:.0f} s; --version answered in {version_seconds:.2f} s)",
        flush=True,
    )
    if args.bundle_only:
        return []
    packages_dir = out / "packages"
    packages = make_packages(args, bundle, icons, packages_dir, work)
    checksums = write_checksums(packages, packages_dir, args.target)
    for package in [*packages, checksums]:
        print(f"package: {package} ({package.stat().st_size / 1e6:.1f} MB)", flush=True)
    return packages


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        build(args)
    except (BuildError, PackagingError, FileNotFoundError) as error:
        print(f"build.py: {error}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        print(
            f"build.py: {Path(str(error.cmd[0])).name} failed with exit code {error.returncode}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
