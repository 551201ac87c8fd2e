"""The icon files the installers need, taken from ``assets/`` or rendered when missing.

``assets/make_icons.py`` normally leaves every file in ``assets/``; a checkout without the
binary files (or with only the PNGs) still builds, because the same drawing code renders
the missing ones into the build folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from desktop.icons import SIZES, TRAY_STATES, app_asset_name, tray_asset_name

#: Windows executable/installer icon, macOS bundle icon, and the Linux desktop icon.
PLATFORM_ICONS = ("fluidity.ico", "fluidity.icns", "fluidity.png")


def required_icons() -> list[str]:
    """Every file name ``prepare_icons`` guarantees."""
    tray = [tray_asset_name(state, size) for state in TRAY_STATES for size in SIZES]
    return [*PLATFORM_ICONS, *(app_asset_name(size) for size in SIZES), *tray]


def missing_icons(folder: Path) -> list[str]:
    return [name for name in required_icons() if not (folder / name).is_file()]


def prepare_icons(assets: Path, work: Path) -> Path:
    """A folder holding every required icon: ``assets`` itself when complete, else a rendered copy."""
    if not missing_icons(assets):
        return assets
    out = work / "icons"
    out.mkdir(parents=True, exist_ok=True)
    _make_icons_module(assets).main(out)
    still_missing = missing_icons(out)
    if still_missing:
        raise RuntimeError(f"icon rendering did not produce: {', '.join(still_missing)}")
    return out


def _make_icons_module(assets: Path) -> ModuleType:
    script = assets / "make_icons.py"
    spec = importlib.util.spec_from_file_location("make_icons", script)
    if spec is None or spec.loader is None or not script.is_file():
        raise FileNotFoundError(f"{script} is missing; cannot render the icons")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
