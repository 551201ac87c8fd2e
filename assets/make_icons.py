"""Render the tray and application icons into this folder.

Run after changing the drawing in ``desktop/icons.py``:  ``python assets/make_icons.py``.
Writes tray-<state>-<size>.png, fluidity-<size>.png, fluidity.png (256 px), fluidity.ico
(Windows installer) and fluidity.icns (macOS bundle).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from desktop.icons import (  # noqa: E402 - the path above makes the package importable from a checkout
    SIZES,
    TRAY_STATES,
    app_asset_name,
    render_app_icon,
    render_tray_icon,
    tray_asset_name,
)

HERE = Path(__file__).resolve().parent


def main(out_dir: Path = HERE) -> list[Path]:
    written: list[Path] = []
    for state in TRAY_STATES:
        for size in SIZES:
            path = out_dir / tray_asset_name(state, size)
            render_tray_icon(state, size).save(path, optimize=True)
            written.append(path)
    for size in SIZES:
        path = out_dir / app_asset_name(size)
        render_app_icon(size).save(path, optimize=True)
        written.append(path)
    largest = render_app_icon(256)
    largest.save(out_dir / "fluidity.png", optimize=True)
    largest.save(out_dir / "fluidity.ico", sizes=[(s, s) for s in SIZES])
    render_app_icon(512).save(out_dir / "fluidity.icns")
    written += [out_dir / "fluidity.png", out_dir / "fluidity.ico", out_dir / "fluidity.icns"]
    return written


if __name__ == "__main__":
    for written_path in main():
        print(written_path.name)
