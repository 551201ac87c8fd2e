"""What every system proxy backend offers, and the request they all carry out.

A backend knows one OS's proxy settings and nothing else: ``read`` returns every value
Fluidity might change (grouped in *parts*: one per settings store, or one per network
service on macOS), ``render`` says what those values become for a request, ``write`` stores
values. Saving, comparing and restoring are the manager's job, identical for every OS, so a
backend is a few dozen lines that tests can drive against a fake or the real tool.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from desktop.bypass import BypassRules
from desktop.pac import authority, pac_url
from server.errors import FluidityError

#: part name -> {key: JSON-safe value}; ``None`` as a value means "not set at all".
Parts = dict[str, dict[str, Any]]
#: Runs a settings tool (argv) and returns its standard output; raises SystemProxyError.
Runner = Callable[[Sequence[str]], str]


class Mode(enum.StrEnum):
    """The ``system_proxy`` setting."""

    OFF = "off"
    MANUAL = "manual"  # HTTP, HTTPS and SOCKS proxy = the agent; the bypass rules as the ignore list
    PAC = "pac"  # the OS fetches the agent's PAC file


class SystemProxyError(FluidityError):
    """A settings tool or API failed; the message names it and says why."""


@dataclass(frozen=True)
class ProxyRequest:
    """What Fluidity asks the OS to use: the agent at ``host:port`` in ``mode``."""

    mode: Mode
    host: str
    port: int
    bypass: BypassRules = field(default_factory=BypassRules)

    @property
    def authority(self) -> str:
        return authority(self.host, self.port)

    @property
    def pac_url(self) -> str:
        return pac_url(self.host, self.port)

    def describe(self) -> dict[str, object]:
        """JSON-safe summary for the state file and the log."""
        return {
            "mode": self.mode.value,
            "host": self.host,
            "port": self.port,
            "bypass": list(self.bypass.texts),
        }


class Backend(Protocol):
    """One OS's proxy settings."""

    name: str

    def read(self) -> Parts:
        """Every value Fluidity may change, as it is now."""

    def render(self, request: ProxyRequest, current: Parts) -> Parts:
        """The values for ``request`` (pure: parts and keys it does not change keep ``current``)."""

    def write(self, parts: Parts) -> None:
        """Store ``parts`` (only the keys given), then tell running programs to re-read them."""


def changed_keys(target: Mapping[str, Mapping[str, Any]], current: Mapping[str, Mapping[str, Any]]) -> Parts:
    """The keys of ``target`` whose values differ from ``current``, by part (empty parts dropped)."""
    changes: Parts = {}
    for part, values in target.items():
        now = current.get(part, {})
        diff = {key: value for key, value in values.items() if key not in now or now[key] != value}
        if diff:
            changes[part] = diff
    return changes


def tool_runner(env: Mapping[str, str] | None = None) -> Runner:
    """A Runner on desktop_shell.run_tool (in ``env``, else this process's environment)."""
    from desktop.desktop_shell import ToolFailed
    from desktop.desktop_shell import run_tool as shell_run_tool

    def run(argv: Sequence[str]) -> str:
        try:
            return shell_run_tool(argv, env=env)
        except ToolFailed as error:
            raise SystemProxyError(str(error)) from None

    return run


#: The default Runner: this process's environment, failures as SystemProxyError.
run_tool: Runner = tool_runner()
