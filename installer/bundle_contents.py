"""What goes into the PyInstaller bundle, per platform: hidden imports, exclusions, trimming.

Kept apart from ``fluidity.spec`` so the choices are plain data and functions a test can
check, and so the installers (deb, Inno Setup, .app) use the same names and identifiers as
the bundle. Entries are PyInstaller TOC tuples ``(dest_name, source_path, typecode)``.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desktop.autostart import LAUNCH_AGENT_LABEL
from desktop.launch import FROZEN_SUBCOMMANDS, PROGRAMS

APP_NAME = "Fluidity"
#: The executable and the folder PyInstaller writes; also the Linux package name.
EXECUTABLE = "fluidity"
#: Windows only: the same program with a console, for ``fluidity-cli agent ...`` in a terminal.
CONSOLE_EXECUTABLE = "fluidity-cli"
#: macOS bundle identifier: the label of the LaunchAgent that "Start at login" writes.
BUNDLE_ID = LAUNCH_AGENT_LABEL
#: Shell command -> bundle subcommand, for the Linux launchers on PATH.
PROGRAM_COMMANDS = {program: sub for program, sub in FROZEN_SUBCOMMANDS.items() if sub is not None}
SUMMARY = "Personal on-demand tunnel: tray app and local proxy over mutual TLS"
TARGETS = ("linux", "windows", "macos")
#: Bundle folder of the PNGs (``desktop.icons.asset_dir`` looks for ``<bundle>/assets``).
ASSET_FOLDER = "assets"

#: How the Linux bundle gets GTK for pystray's menu-capable backends (see docs/installing.md):
#: ``system`` bundles PyGObject but loads GLib/GTK, typelibs and their data from the desktop;
#: ``bundled`` ships the whole GTK stack (~+130 MB); ``none`` leaves PyGObject out (pystray's
#: xorg backend only: no menu).
GUI_STACKS = ("system", "bundled", "none")

#: botocore service models the bundle calls: ecs + ec2 (the ecs lifecycle), cloudwatch
#: (server metrics), cloudformation, events, lambda and logs (``fluidity doctor``'s AWS
#: checks), and the credential providers' own clients (sts for roles and web identity,
#: sso + sso-oidc for IAM Identity Center, signin for ``aws login``).
BOTOCORE_SERVICES = frozenset(
    {"ecs", "ec2", "cloudwatch", "cloudformation", "events", "lambda", "logs"}
    | {"sts", "sso", "sso-oidc", "signin"}
)
#: Files in a kept service that only AWS's documentation generators read.
BOTOCORE_DOC_FILES = frozenset({"examples-1.json"})

#: Never needed at run time: test and build tooling, the operator-only deploy tool and the
#: Lambda code (operators run those from a pip install), and Pillow codecs for formats the
#: icons do not use (AVIF, WebP, colour management, fonts: about 10 MB of libraries).
EXCLUDED_MODULES = (
    "pytest",
    "_pytest",
    "hypothesis",
    "moto",
    "cfnlint",
    "awscli",
    "mypy",
    "ruff",
    "setuptools",
    "pkg_resources",
    "pip",
    "lambdas.deploy",
    "lambdas.handlers",
    "lambdas.local_gateway",
    "cairo",
    "PIL._avif",
    "PIL._webp",
    "PIL._imagingcms",
    "PIL._imagingft",
    "PIL._imagingtk",
    "PIL.ImageTk",
    "pydoc_data",
)

#: pystray picks its backend at import time through function-local imports.
PYSTRAY_BACKENDS = {
    "linux": ("pystray._appindicator", "pystray._gtk", "pystray._xorg"),
    "windows": ("pystray._win32",),
    "macos": ("pystray._darwin",),
}

#: GLib/GTK-stack libraries the ``system`` Linux flavour takes from the desktop. Only the
#: Python side of PyGObject is bundled; loading a bundled copy of any of these next to the
#: desktop's own would mix two versions of one library in the process.
_SYSTEM_GUI_LIBRARY = re.compile(
    r"^lib(girepository|glib|gobject|gio|gmodule|gthread|gtk|gdk|gdk_pixbuf|atk|atspi|pango|cairo"
    r"|harfbuzz|fribidi|thai|datrie|graphite2|fontconfig|freetype|pixman|png16|epoxy|ayatana|appindicator"
    r"|dbusmenu|dbus-1|X|xcb|xkbcommon|wayland|EGL|GL|mount|blkid|selinux|pcre2|systemd|cloudproviders"
    r"|colord|lcms2|rsvg|jpeg|tiff|webp|jbig|Lerc|deflate|zstd|brotli|gcrypt|gpg-error|lz4|cap|xml2"
    r"|icu|expat|bsd|md|stdc\+\+|gcc_s)[-_.0-9a-z+]*\.so"
)
#: GObject-introspection namespaces the tray code and pystray import. With the desktop's GTK
#: they are resolved at run time from its typelibs, so PyInstaller's hooks for them (which
#: collect typelibs and libraries) are skipped.
GI_NAMESPACES = (
    "AppIndicator3", "Atk", "AyatanaAppIndicator3", "GLib", "GLibUnix", "GLibWin32", "GModule",
    "GObject", "Gdk", "GdkPixbuf", "Gio", "GioUnix", "GioWin32", "Gtk", "HarfBuzz", "Pango", "cairo",
    "freetype2", "xlib",
)  # fmt: skip
_WHEEL_COPY = re.compile(r"-[0-9a-f]{8}\.so")
#: Top-level bundle folders PyInstaller's gi hooks fill with typelibs, GIO modules and GTK data.
_GI_DATA_FOLDERS = frozenset({"gi_typelibs", "gio_modules", "share", "etc", "lib"})
#: Runtime hooks that point GLib/GTK at those bundle folders.
_GI_RUNTIME_HOOKS = frozenset(
    {"pyi_rth_gi", "pyi_rth_gio", "pyi_rth_glib", "pyi_rth_gtk", "pyi_rth_gdkpixbuf"}
)

Toc = list[tuple[str, str, str]]


def _parts(dest: str) -> list[str]:
    return dest.replace("\\", "/").split("/")


def keep_data_file(dest: str) -> bool:
    """False for AWS data the bundle never loads: other services' models, docs, boto3 resources."""
    parts = _parts(dest)
    if len(parts) > 3 and parts[:2] == ["botocore", "data"]:
        return parts[2] in BOTOCORE_SERVICES and parts[-1] not in BOTOCORE_DOC_FILES
    return not (len(parts) > 2 and parts[:2] == ["boto3", "data"])


def trim_aws_data(datas: Toc) -> Toc:
    """Keep the used services' models, and of each only the newest API version (botocore's default)."""
    kept = [entry for entry in datas if keep_data_file(entry[0])]
    newest: dict[str, str] = {}
    for dest, _source, _kind in kept:
        parts = _parts(dest)
        if len(parts) > 4 and parts[:2] == ["botocore", "data"]:
            newest[parts[2]] = max(newest.get(parts[2], parts[3]), parts[3])

    def current(dest: str) -> bool:
        parts = _parts(dest)
        return not (len(parts) > 4 and parts[:2] == ["botocore", "data"]) or newest[parts[2]] == parts[3]

    return [entry for entry in kept if current(entry[0])]


def is_system_gui_library(dest: str) -> bool:
    """A GLib/GTK-stack shared library (or GIO/pixbuf module) left to the desktop."""
    parts = _parts(dest)
    if parts[0] in _GI_DATA_FOLDERS:
        return True
    # Wheels' private copies carry a hash in their name (libXau-154567c4.so.6.0.0): keep those.
    return len(parts) == 1 and bool(_SYSTEM_GUI_LIBRARY.match(parts[0])) and not _WHEEL_COPY.search(parts[0])


@dataclass(frozen=True)
class Target:
    """One platform's build and, on Linux, where GTK comes from."""

    name: str
    gui_stack: str = "bundled"

    def __post_init__(self) -> None:
        if self.name not in TARGETS:
            raise ValueError(f"unknown target {self.name!r}; choose one of {', '.join(TARGETS)}")
        if self.gui_stack not in GUI_STACKS:
            raise ValueError(f"unknown GUI stack {self.gui_stack!r}; choose one of {', '.join(GUI_STACKS)}")

    @property
    def hidden_imports(self) -> list[str]:
        # desktop.bundle_main imports each program by name, which static analysis cannot follow.
        return [*PROGRAMS.values(), *PYSTRAY_BACKENDS[self.name], *self.gi_overrides]

    @property
    def excluded_modules(self) -> list[str]:
        other_backends = [
            module
            for target, modules in PYSTRAY_BACKENDS.items()
            if target != self.name
            for module in modules
        ]
        excluded = [*EXCLUDED_MODULES, *other_backends]
        if self.gui_stack == "none":
            excluded.append("gi")
        elif self.uses_system_gui:
            excluded += [f"gi.repository.{namespace}" for namespace in GI_NAMESPACES]
        return excluded

    @property
    def gi_overrides(self) -> list[str]:
        """PyGObject's Python overrides (``GObject.idle_add`` and friends), which its importer loads
        by name; normally the skipped gi hooks would have added them."""
        if not self.uses_system_gui or self.gui_stack == "none":
            return []
        spec = importlib.util.find_spec("gi")
        if spec is None or not spec.submodule_search_locations:
            return []
        folder = Path(next(iter(spec.submodule_search_locations))) / "overrides"
        return sorted(f"gi.overrides.{path.stem}" for path in folder.glob("*.py") if path.stem != "__init__")

    @property
    def uses_system_gui(self) -> bool:
        return self.name == "linux" and self.gui_stack != "bundled"

    def trim_datas(self, datas: Toc) -> Toc:
        kept = trim_aws_data(datas)
        if self.uses_system_gui:
            kept = [entry for entry in kept if _parts(entry[0])[0] not in _GI_DATA_FOLDERS]
        return kept

    def trim_binaries(self, binaries: Toc) -> Toc:
        if not self.uses_system_gui:
            return binaries
        return [entry for entry in binaries if not is_system_gui_library(entry[0])]

    def trim_scripts(self, scripts: Toc) -> Toc:
        if not self.uses_system_gui:
            return scripts
        return [entry for entry in scripts if entry[0] not in _GI_RUNTIME_HOOKS]


def asset_datas(assets: Path) -> list[tuple[str, str]]:
    """``Analysis(datas=...)`` pairs putting the tray and app PNGs where ``desktop.icons`` looks."""
    pngs = sorted([*assets.glob("tray-*.png"), *assets.glob("fluidity*.png")])
    if not pngs:
        raise FileNotFoundError(f"no icon PNGs in {assets}; run assets/make_icons.py")
    return [(str(png), ASSET_FOLDER) for png in pngs]


def macos_info_plist(version: str) -> dict[str, Any]:
    """Info.plist keys for Fluidity.app: a menu-bar app with no Dock icon."""
    return {
        "CFBundleName": APP_NAME,
        "CFBundleDisplayName": APP_NAME,
        "CFBundleIdentifier": BUNDLE_ID,
        "CFBundleExecutable": EXECUTABLE,
        "CFBundlePackageType": "APPL",
        "CFBundleShortVersionString": version,
        "CFBundleVersion": version,
        "LSUIElement": True,
        "LSMinimumSystemVersion": "11.0",
        "NSHighResolutionCapable": True,
        "NSHumanReadableCopyright": f"{APP_NAME} {version}",
    }
