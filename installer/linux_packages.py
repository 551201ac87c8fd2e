"""Linux packages of the one-folder bundle: a ``.tar.gz`` to unpack anywhere and a ``.deb``.

The deb installs the bundle to /opt/fluidity, puts ``fluidity`` and the per-program commands
on PATH, and registers a desktop entry and hicolor icons. Its Depends are worked out from
the bundle itself: every shared library a bundled ELF file needs but the bundle does not
carry, mapped to the package that provides it on the build machine.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bundle_contents import APP_NAME, EXECUTABLE, PROGRAM_COMMANDS, SUMMARY

from desktop.icons import SIZES, app_asset_name
from server.errors import FluidityError

INSTALL_DIR = "/opt/fluidity"
DEFAULT_MAINTAINER = "Fluidity maintainers <maintainers@fluidity.invalid>"
#: What the tray needs from the desktop when the bundle uses the desktop's GTK
#: (pystray's appindicator backend refuses to load without one of the two indicator typelibs).
SYSTEM_GUI_DEPENDS = (
    "libgirepository-1.0-1",
    "gir1.2-gtk-3.0",
    "gir1.2-ayatanaappindicator3-0.1 | gir1.2-appindicator3-0.1",
)
#: Small tools the tray uses when present: opening files, clipboard.
RECOMMENDS = ("xdg-utils", "xclip | xsel | wl-clipboard")
#: Nicer file choosers. Only suggested: zenity (or kdialog) pulls in a desktop's worth of
#: packages on a minimal system, and the bundled Tk dialog does the job without them.
SUGGESTS = ("zenity | kdialog",)
#: Resolved by the dynamic loader itself, never a package dependency of its own.
_LOADER_NAMES = re.compile(r"^(ld-linux.*|linux-vdso.*)\.so")
_GLIBC_VERSION = re.compile(r"GLIBC_(\d+)\.(\d+)")

POSTRM = """\
#!/bin/sh
# Remove whatever is left in the install folder (dpkg removes the files it unpacked itself).
# Settings, certificates and login items live in each user's home and are kept.
set -e
case "$1" in
    remove|purge)
        rm -rf "${DPKG_ROOT:-}/opt/fluidity"
        ;;
esac
exit 0
"""


class PackagingError(FluidityError):
    """A package cannot be built; the message says what is missing."""


@dataclass(frozen=True)
class DebianControl:
    version: str
    architecture: str
    installed_size_kib: int
    depends: list[str]
    recommends: list[str] = field(default_factory=lambda: list(RECOMMENDS))
    suggests: list[str] = field(default_factory=lambda: list(SUGGESTS))
    maintainer: str = DEFAULT_MAINTAINER

    def text(self) -> str:
        fields = {
            "Package": EXECUTABLE,
            "Version": self.version,
            "Architecture": self.architecture,
            "Maintainer": self.maintainer,
            "Installed-Size": str(self.installed_size_kib),
            "Depends": ", ".join(self.depends),
            "Recommends": ", ".join(self.recommends),
            "Suggests": ", ".join(self.suggests),
            "Section": "net",
            "Priority": "optional",
            "Description": f"{SUMMARY}\n"
            " Fluidity runs a local HTTP/HTTPS/WebSocket proxy on 127.0.0.1:8080 and carries its\n"
            " traffic over one multiplexed mutual-TLS 1.3 connection to a tunnel server that\n"
            " runs on AWS Fargate only while you use it, or on this machine (fluidity-local).",
        }
        return "".join(f"{key}: {value}\n" for key, value in fields.items() if value)


def desktop_entry() -> str:
    """The menu entry; ``desktop-file-validate`` must accept it."""
    return (
        "[Desktop Entry]\n"
        "Type=Application\n"
        f"Name={APP_NAME}\n"
        "GenericName=Tunnel proxy\n"
        f"Comment={SUMMARY}\n"
        f"Exec={EXECUTABLE}\n"
        f"Icon={EXECUTABLE}\n"
        "Terminal=false\n"
        "Categories=Network;\n"
        "Keywords=proxy;tunnel;vpn;tls;\n"
        "StartupNotify=false\n"
    )


def launcher_script(subcommand: str) -> str:
    """``/usr/bin/fluidity-<program>``: the bundle's executable with that program's subcommand."""
    return f'#!/bin/sh\nexec {INSTALL_DIR}/{EXECUTABLE} {subcommand} "$@"\n'


def deb_architecture() -> str:
    try:
        return subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


# ----------------------------------------------------------------------------- dependencies


def elf_files(root: Path) -> list[Path]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def _readelf(*args: str) -> str:
    try:
        return subprocess.run(["readelf", *args], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise PackagingError("readelf not found: install binutils") from None


def needed_and_provided(files: Iterable[Path]) -> tuple[set[str], set[str], tuple[int, int]]:
    """Sonames the files need, sonames/file names they provide, and the newest glibc symbol version."""
    needed: set[str] = set()
    provided: set[str] = set()
    glibc = (2, 2)
    for path in files:
        provided.add(path.name)
        report = _readelf("--dynamic", "--version-info", "--wide", str(path))
        needed.update(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", report))
        provided.update(re.findall(r"\(SONAME\)\s+Library soname: \[([^\]]+)\]", report))
        for major, minor in _GLIBC_VERSION.findall(report):
            glibc = max(glibc, (int(major), int(minor)))
    return needed, provided, glibc


def _library_paths() -> dict[str, list[str]]:
    output = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    paths: dict[str, list[str]] = {}
    for soname, path in re.findall(r"^\s*(\S+) \([^)]*\) => (\S+)", output, re.M):
        paths.setdefault(soname, []).append(path)
    return paths


def _owning_package(path: str) -> str | None:
    real = os.path.realpath(path)
    candidates = {path, real}
    for candidate in list(candidates):  # merged /usr: dpkg may know either spelling
        if candidate.startswith("/usr/lib/"):
            candidates.add(candidate.removeprefix("/usr"))
        elif candidate.startswith("/lib/"):
            candidates.add("/usr" + candidate)
    for candidate in sorted(candidates):
        result = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True, check=False)
        if result.returncode == 0 and ":" in result.stdout:
            return result.stdout.split(":", 1)[0].split(",")[0].strip()
    return None


def runtime_depends(bundle: Path) -> list[str]:
    """Depends for the deb: libc6 with the bundle's newest glibc symbol, plus every library
    the bundle leaves to the system, as the package that ships it here."""
    needed, provided, glibc = needed_and_provided(elf_files(bundle))
    external = sorted(name for name in needed - provided if not _LOADER_NAMES.match(name))
    locations = _library_paths()
    packages: set[str] = set()
    unknown = []
    for soname in external:
        owners = {owner for path in locations.get(soname, []) if (owner := _owning_package(path))}
        if owners:
            packages.add(sorted(owners)[0])
        else:
            unknown.append(soname)
    if unknown:
        raise PackagingError(f"no installed package provides {', '.join(unknown)}; cannot write Depends")
    packages.discard("libc6")
    return [f"libc6 (>= {glibc[0]}.{glibc[1]})", *sorted(packages)]


# ----------------------------------------------------------------------------- archives


def _normalise_modes(root: Path) -> None:
    """Directories 0755, executables 0755, everything else 0644, whatever the umask was."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir() or path.stat().st_mode & 0o111:
            path.chmod(0o755)
        else:
            path.chmod(0o644)


def build_tarball(bundle: Path, out_dir: Path, version: str) -> Path:
    """``fluidity-<version>-linux-<machine>.tar.gz`` with the bundle under ``fluidity-<version>/``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    top = f"{EXECUTABLE}-{version}"
    archive = out_dir / f"{top}-linux-{platform.machine()}.tar.gz"

    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        tar.add(bundle, arcname=top, filter=owned_by_root)
    return archive


def stage_deb(bundle: Path, icons: Path, staging: Path, control: DebianControl) -> None:
    """Lay out the package tree (``DEBIAN/`` + the files) in ``staging``."""
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(bundle, staging / INSTALL_DIR.lstrip("/"), symlinks=True)
    bin_dir = staging / "usr" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / EXECUTABLE).symlink_to(f"{INSTALL_DIR}/{EXECUTABLE}")
    for command, subcommand in PROGRAM_COMMANDS.items():
        launcher = bin_dir / command
        launcher.write_text(launcher_script(subcommand), encoding="utf-8")
        launcher.chmod(0o755)
    applications = staging / "usr" / "share" / "applications"
    applications.mkdir(parents=True)
    (applications / f"{EXECUTABLE}.desktop").write_text(desktop_entry(), encoding="utf-8")
    for size in SIZES:
        icon_dir = staging / "usr" / "share" / "icons" / "hicolor" / f"{size}x{size}" / "apps"
        icon_dir.mkdir(parents=True)
        shutil.copyfile(icons / app_asset_name(size), icon_dir / f"{EXECUTABLE}.png")
    doc = staging / "usr" / "share" / "doc" / EXECUTABLE
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        f"Upstream-Name: {APP_NAME}\n\nFiles: *\nLicense: MIT\n",
        encoding="utf-8",
    )
    debian = staging / "DEBIAN"
    debian.mkdir()
    (debian / "control").write_text(control.text(), encoding="utf-8")
    _normalise_modes(staging)
    postrm = debian / "postrm"
    postrm.write_text(POSTRM, encoding="utf-8")
    postrm.chmod(0o755)


def installed_size_kib(root: Path) -> int:
    total = sum(path.lstat().st_size for path in root.rglob("*") if not path.is_dir())
    return (total + 1023) // 1024


def build_deb(
    bundle: Path,
    icons: Path,
    out_dir: Path,
    work: Path,
    version: str,
    *,
    system_gui: bool,
    maintainer: str = DEFAULT_MAINTAINER,
) -> Path:
    """``fluidity_<version>_<arch>.deb`` by ``dpkg-deb``: root-owned files, gzip (any dpkg reads it)."""
    if shutil.which("dpkg-deb") is None:
        raise PackagingError("dpkg-deb not found: the .deb can only be built on Debian or Ubuntu")
    architecture = deb_architecture()
    depends = runtime_depends(bundle)
    if system_gui:
        depends += [dep for dep in SYSTEM_GUI_DEPENDS if dep not in depends]
    control = DebianControl(
        version=version,
        architecture=architecture,
        installed_size_kib=installed_size_kib(bundle),
        depends=depends,
        maintainer=maintainer,
    )
    staging = work / "deb"
    stage_deb(bundle, icons, staging, control)
    out_dir.mkdir(parents=True, exist_ok=True)
    package = out_dir / f"{EXECUTABLE}_{version}_{architecture}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "-z6", "--build", str(staging), str(package)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return package
