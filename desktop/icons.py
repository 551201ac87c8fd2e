"""Tray and application artwork: one picture per connection state.

States differ by shape as well as colour (a hollow ring, an hourglass, an open arc, a
filled disc with a tick, a warning triangle) so they stay distinguishable for colour-blind
users and in monochrome trays. The PNGs in ``assets/`` are rendered by this module
(``assets/make_icons.py``); when they are not shipped next to the code (a plain pip
install) the same drawing is done at run time, so the two can never disagree.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

#: Tray states with artwork, in the order the menu talks about them.
TRAY_STATES = ("disconnected", "waking", "connecting", "connected", "error")
#: Sizes rendered into ``assets/`` (16-256 px cover tray, taskbar and installer icons).
SIZES = (16, 32, 48, 64, 128, 256)
#: The size handed to the tray; backends scale it down themselves.
TRAY_SIZE = 64

_SUPERSAMPLE = 4
_Colour = tuple[int, int, int, int]

GREY: _Colour = (128, 134, 142, 255)
AMBER: _Colour = (240, 160, 20, 255)
BLUE: _Colour = (40, 120, 220, 255)
GREEN: _Colour = (30, 165, 80, 255)
RED: _Colour = (215, 45, 45, 255)
WHITE: _Colour = (255, 255, 255, 255)
TEAL: _Colour = (16, 132, 148, 255)


def tray_asset_name(state: str, size: int) -> str:
    return f"tray-{state}-{size}.png"


def app_asset_name(size: int) -> str:
    return f"fluidity-{size}.png"


def _stroke(canvas: int, small: bool) -> int:
    # Thin lines vanish at 16 px, so small icons get proportionally heavier strokes.
    return max(1, round(canvas * (0.16 if small else 0.11)))


def _draw_disconnected(draw: ImageDraw.ImageDraw, c: int, small: bool) -> None:
    w = _stroke(c, small)
    m = round(c * 0.1)
    draw.ellipse((m, m, c - m, c - m), outline=GREY, width=w)
    # A diagonal bar across the ring reads as "off" even without colour.
    inset = m + w + round(c * 0.06)
    draw.line((inset, c - inset, c - inset, inset), fill=GREY, width=w)


def _draw_waking(draw: ImageDraw.ImageDraw, c: int, small: bool) -> None:
    m = round(c * 0.12)
    w = _stroke(c, small)
    mid = c / 2
    # Hourglass: two triangles meeting in the middle, with caps top and bottom.
    draw.rectangle((m, m, c - m, m + w), fill=AMBER)
    draw.rectangle((m, c - m - w, c - m, c - m), fill=AMBER)
    draw.polygon([(m + w, m + w), (c - m - w, m + w), (mid, mid)], fill=AMBER)
    draw.polygon([(mid, mid), (c - m - w, c - m - w), (m + w, c - m - w)], fill=AMBER)


def _draw_connecting(draw: ImageDraw.ImageDraw, c: int, small: bool) -> None:
    w = _stroke(c, small)
    m = round(c * 0.1)
    faint = (BLUE[0], BLUE[1], BLUE[2], 90)
    draw.ellipse((m, m, c - m, c - m), outline=faint, width=max(1, w // 2))
    draw.arc((m, m, c - m, c - m), start=200, end=20, fill=BLUE, width=w)
    # Arrow head at the arc's end (20 degrees) pointing along the direction of travel.
    tip_x, tip_y = c * 0.86, c * 0.62
    size = c * (0.22 if small else 0.18)
    draw.polygon(
        [(tip_x - size, tip_y - size * 0.2), (tip_x + size * 0.6, tip_y - size * 0.4), (tip_x, tip_y + size)],
        fill=BLUE,
    )


def _draw_connected(draw: ImageDraw.ImageDraw, c: int, small: bool) -> None:
    m = round(c * 0.08)
    draw.ellipse((m, m, c - m, c - m), fill=GREEN)
    w = _stroke(c, small)
    draw.line(
        [(c * 0.28, c * 0.52), (c * 0.44, c * 0.68), (c * 0.73, c * 0.34)],
        fill=WHITE,
        width=w,
        joint="curve",
    )


def _draw_error(draw: ImageDraw.ImageDraw, c: int, small: bool) -> None:
    m = round(c * 0.06)
    draw.polygon([(c / 2, m), (c - m, c - m * 1.5), (m, c - m * 1.5)], fill=RED)
    w = _stroke(c, small)
    mid = c / 2
    draw.line([(mid, c * 0.34), (mid, c * 0.62)], fill=WHITE, width=w)
    dot = w * 0.6
    draw.ellipse((mid - dot, c * 0.76 - dot, mid + dot, c * 0.76 + dot), fill=WHITE)


_PAINTERS: dict[str, Callable[[ImageDraw.ImageDraw, int, bool], None]] = {
    "disconnected": _draw_disconnected,
    "waking": _draw_waking,
    "connecting": _draw_connecting,
    "connected": _draw_connected,
    "error": _draw_error,
}


def _render(painter: Callable[[ImageDraw.ImageDraw, int, bool], None], size: int) -> Image.Image:
    canvas = size * _SUPERSAMPLE
    image = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    painter(ImageDraw.Draw(image), canvas, size <= 24)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def render_tray_icon(state: str, size: int = TRAY_SIZE) -> Image.Image:
    """Draw the icon for ``state`` (one of TRAY_STATES) at ``size`` pixels."""
    try:
        painter = _PAINTERS[state]
    except KeyError:
        raise ValueError(f"no icon for state {state!r}; expected one of {', '.join(TRAY_STATES)}") from None
    return _render(painter, size)


def _draw_app(draw: ImageDraw.ImageDraw, c: int, small: bool) -> None:
    m = round(c * 0.04)
    draw.rounded_rectangle((m, m, c - m, c - m), radius=round(c * 0.22), fill=TEAL)
    w = _stroke(c, small)
    # Three flowing strokes: traffic carried through one tunnel.
    steps = 32
    for row in (0.32, 0.5, 0.68):
        points = [
            (c * (0.2 + 0.6 * i / steps), c * row + c * 0.05 * math.sin(2 * math.pi * i / steps))
            for i in range(steps + 1)
        ]
        draw.line(points, fill=WHITE, width=max(1, round(w * 0.8)), joint="curve")


def render_app_icon(size: int = 256) -> Image.Image:
    """Draw the application icon (installers, windows, notifications)."""
    return _render(_draw_app, size)


def asset_dir() -> Path | None:
    """Where shipped PNGs live: inside a PyInstaller bundle or next to the source tree."""
    bundle = getattr(sys, "_MEIPASS", None)
    candidates = [Path(bundle) / "assets"] if bundle else []
    candidates.append(Path(__file__).resolve().parent.parent / "assets")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


@functools.lru_cache(maxsize=32)
def tray_icon(state: str, size: int = TRAY_SIZE) -> Image.Image:
    """The tray image for ``state``: the shipped PNG when present, else drawn now."""
    directory = asset_dir()
    if directory is not None:
        path = directory / tray_asset_name(state, size)
        if path.is_file():
            with Image.open(path) as image:
                return image.convert("RGBA")
    return render_tray_icon(state, size)
