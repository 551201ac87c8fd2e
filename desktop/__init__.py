"""Fluidity desktop side: tray app, local proxy, tunnel client and server lifecycle."""

from server import __version__

__all__ = ["__version__"]
