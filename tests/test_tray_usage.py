"""What the tray shows about traffic, server time, cost and the budget; reloading settings;
opening files; the login entry. pystray's dummy backend builds the real menu, whose items
are read and clicked directly. Time is a fake clock and the server a scripted backend.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from test_tray_menu import Tray, make_tray, notifications, pystray_dummy  # noqa: F401  (fixture)
from test_usage import STARTING, FakeBackend, FakeClock
from tray_fixtures import wait_for_state, wait_until_stopped
from tunnel_fixtures import REPO, Pki, agent_config

from desktop import autostart
from desktop.budget import UsageWatch
from desktop.config import AgentConfig
from desktop.controller import Controller, State
from desktop.desktop_shell import open_path
from desktop.lifecycle.base import Endpoint
from desktop.lifecycle.metered import MeteredLifecycle
from desktop.tray_app import build_parser, login_command
from desktop.tunnel_client import LinkObserver, LinkState
from desktop.usage import UsageStore

HOUR = 3600.0


class ConnectedAgent:
    """Stands in for desktop.agent.Agent: the tunnel is up as soon as it starts."""

    def __init__(self, _config: AgentConfig, _observer: LinkObserver) -> None:
        pass

    def listen(self) -> None:
        pass

    def start(self, endpoint: Endpoint) -> None:
        pass

    def set_endpoint(self, endpoint: Endpoint) -> None:
        pass

    def wait_connected(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        return True

    def stop(self) -> None:
        pass

    @property
    def proxy_address(self) -> tuple[str, int]:
        return ("127.0.0.1", 8080)

    def stats(self) -> Any:
        class Stats:
            link_state = LinkState.CONNECTED
            active_streams = 2
            last_error = None
            consecutive_failures = 0

        return Stats()


def cloud_config(pki: Pki, **overrides: object) -> AgentConfig:
    values: dict[str, object] = {
        "lifecycle": "lambda",
        "api_url": "http://127.0.0.1:9/prod",
        "api_key": "k" * 24,
        "price_per_hour": 0.0173,
        "price_per_gb_out": 0.09,
    }
    values.update(overrides)
    return agent_config(pki, 8443, **values)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cloud_tray(pystray_dummy: ModuleType, pki: Pki, tmp_path: Path, clock: FakeClock) -> Iterator[Tray]:  # noqa: F811
    """A tray over a scripted paid backend, with the usage watch the real tray has."""
    store = UsageStore(None, clock=clock)
    config = cloud_config(pki)
    backend = FakeBackend(clock, STARTING)
    controller = Controller(
        config,
        MeteredLifecycle(backend, store, clock=clock),
        agent_factory=ConnectedAgent,
        monitor_interval=0.1,
    )
    tray = make_tray(pystray_dummy, tmp_path, controller)
    tray.app.usage = UsageWatch(
        controller,
        store,
        how_to_raise=f"raise monthly_budget in {tray.app.config_path} and choose Reload settings",
        on_notice=lambda message, warning: tray.app.notify(message, error=warning),
        clock=clock,
    )
    yield tray
    controller.shutdown(10)


def shown(tray: Tray) -> list[str]:
    """The menu as the user sees it: visible items only."""
    return [
        str(item.text) for item in tray.app.icon.menu.items if item.visible and str(item.text) != "- - - -"
    ]


def test_connected_tray_shows_traffic_server_time_and_cost(cloud_tray: Tray, clock: FakeClock) -> None:
    store = cloud_tray.app.usage.store  # type: ignore[union-attr]
    assert shown(cloud_tray)[:2] == ["Disconnected", "Connect"]  # nothing recorded yet: no cost line
    # Yesterday: a 16 h 40 min run.
    store.server_woken(clock.now - 30 * HOUR)
    store.server_stopped("stopped by Fluidity", clock.now - 30 * HOUR + 16 * HOUR + 40 * 60)
    cloud_tray.click("Connect")
    wait_for_state(cloud_tray.controller, State.CONNECTED)
    clock.now += HOUR + 12 * 60 - 40  # woken 1 h 12 min ago (the wake itself took 40 s)
    cloud_tray.app.usage.check()  # type: ignore[union-attr]
    store.record_bytes(0, 226_400_000, "video.example")
    clock.now += 1
    for _ in range(3):
        store.record_bytes(40_000, 1_200_000, "example.com")
        clock.now += 1
    clock.now -= 1
    assert shown(cloud_tray)[:3] == [
        "Connected · ↓ 1.2 MB/s ↑ 40 kB/s · 230 MB today",
        "Server up 1 h 12 min · ≈ $0.04 this session · $0.33 this month",
        "Disconnect",
    ]
    cloud_tray.click("Disconnect")
    wait_until_stopped(cloud_tray.controller)
    assert cloud_tray.app.wait_for_background_work(10)
    assert shown(cloud_tray)[:3] == [
        "Disconnected (server stopped)",
        "Server stopped · ≈ $0.33 this month",
        "Connect",
    ]


def test_the_usage_submenu_lists_the_session_and_its_busiest_hosts(
    cloud_tray: Tray, clock: FakeClock
) -> None:
    store = cloud_tray.app.usage.store  # type: ignore[union-attr]
    assert "Usage" not in shown(cloud_tray)  # nothing counted yet
    store.begin_session()
    store.record_bytes(1_000, 80_000_000, "video.example")
    store.record_bytes(500, 2_000_000, "news.example")
    assert "Usage" in shown(cloud_tray)
    (usage,) = [item for item in cloud_tray.app.icon.menu.items if str(item.text) == "Usage"]
    lines = [str(item.text) for item in usage.submenu.items]
    assert lines == [
        "This session: ↓ 82 MB ↑ 1.5 kB",
        "Today: ↓ 82 MB ↑ 1.5 kB",
        "This month: ↓ 82 MB ↑ 1.5 kB",
        "Busiest hosts this session:",
        "  video.example · 80 MB",
        "  news.example · 2.0 MB",
    ]
    assert not any(item.enabled for item in usage.submenu.items)  # information, not actions


def test_over_budget_connect_refuses_and_connect_anyway_confirms(
    cloud_tray: Tray, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    controller = cloud_tray.controller
    store = cloud_tray.app.usage.store  # type: ignore[union-attr]
    store.server_woken(clock.now - 70 * HOUR)
    store.server_stopped("stopped by Fluidity", clock.now - 10 * HOUR)  # 60 h ≈ $1.04
    controller.reconfigure(dataclasses.replace(controller.config, monthly_budget=1.0))
    assert shown(cloud_tray)[:3] == [
        "Disconnected",
        "Server stopped · ≈ $1.04 this month",
        "Connect (budget used up)",
    ]
    assert "Connect anyway (over budget)" in shown(cloud_tray)
    cloud_tray.click("Connect (budget used up)")
    assert controller.snapshot().state is State.DISCONNECTED  # refused
    refusal = notifications(caplog)[-1]
    assert refusal.startswith("Not connecting: this month's budget is used up (≈ $1.04 of $1.00).")
    assert f"raise monthly_budget in {cloud_tray.app.config_path} and choose Reload settings" in refusal
    assert refusal.endswith("Or choose “Connect anyway (over budget)”.")

    cloud_tray.click("Connect anyway (over budget)")
    wait_for_state(controller, State.CONNECTED)
    clock.now += 60
    cloud_tray.app.usage.check()  # type: ignore[union-attr]
    assert controller.snapshot().state is State.CONNECTED  # confirmed: not stopped by the budget
    assert "Connect anyway (over budget)" not in shown(cloud_tray)


def test_reaching_the_budget_while_connected_disconnects_with_the_reason(
    cloud_tray: Tray, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    controller = cloud_tray.controller
    controller.reconfigure(dataclasses.replace(controller.config, monthly_budget=1.0))
    cloud_tray.click("Connect")
    wait_for_state(controller, State.CONNECTED)
    clock.now += 50 * HOUR  # 50 h ≈ $0.87: the 80 % notice
    cloud_tray.app.usage.check()  # type: ignore[union-attr]
    assert notifications(caplog)[-1].startswith("Fluidity has used 87% of this month's budget")
    clock.now += 8 * HOUR
    cloud_tray.app.usage.check()  # type: ignore[union-attr]
    wait_until_stopped(controller)
    assert cloud_tray.app.wait_for_background_work(10)
    assert shown(cloud_tray)[0].startswith("Error: Monthly budget reached: ≈ $1.00 of $1.00")
    assert notifications(caplog)[-1].startswith("Monthly budget reached")
    assert "kill" in cloud_tray.controller.lifecycle.inner.calls  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- settings


def test_reload_settings_applies_a_good_file_and_keeps_the_running_settings_on_a_bad_one(
    cloud_tray: Tray, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app, controller = cloud_tray.app, cloud_tray.controller
    running = controller.config
    path = app.config_path
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{key}: {value}" for key, value in (
        ("lifecycle", "lambda"), ("api_url", running.api_url), ("api_key", running.api_key),
        ("ca_file", running.ca_file), ("cert_file", running.cert_file), ("key_file", running.key_file),
        ("price_per_hour", 0.0173), ("price_per_gb_out", 0.09), ("listen_port", 0),
        ("keepalive_interval", '"1s"'), ("keepalive_timeout", '"5s"'), ("reconnect_backoff_max", '"1s"'),
        ("connect_timeout", '"5s"'), ("server_address", "127.0.0.1"),
    )]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    cloud_tray.click("Reload settings")  # the file's settings as the starting point
    path.write_text("\n".join([*lines, "monthly_budget: 20"]) + "\n")
    cloud_tray.click("Reload settings")
    assert notifications(caplog)[-1] == f"Settings reloaded from {path}: monthly_budget changed."
    assert controller.config.monthly_budget == 20.0 and controller.lifecycle.name == "lambda"

    path.write_text("\n".join([*lines, "monthly_budget: lots"]) + "\n")
    cloud_tray.click("Reload settings")
    message = notifications(caplog)[-1]
    assert message.startswith("Settings not reloaded, the running ones stay: ")
    assert f"{path}: monthly_budget: expected a number" in message
    assert controller.config.monthly_budget == 20.0

    # An edit is picked up without the menu item, once the file stopped changing.
    path.write_text("\n".join([*lines, "monthly_budget: 30"]) + "\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert app.reloader.poll() is None  # just changed: wait for the editor to finish
    assert app.reloader.poll() == f"Settings reloaded from {path}: monthly_budget changed."
    assert controller.config.monthly_budget == 30.0 and app.reloader.poll() is None


def test_a_new_backend_waits_until_the_session_that_woke_the_server_ends(cloud_tray: Tray) -> None:
    controller = cloud_tray.controller
    first = controller.lifecycle
    cloud_tray.click("Connect")
    wait_for_state(controller, State.CONNECTED)
    new_backend = FakeBackend(FakeClock(), STARTING)
    controller.reconfigure(controller.config, new_backend)  # type: ignore[arg-type]
    time.sleep(0.2)  # the worker handles the swap job (a hang guard, nothing is timed)
    assert controller.lifecycle is first
    cloud_tray.click("Disconnect")
    wait_until_stopped(controller)
    calls = first.inner.calls  # type: ignore[attr-defined]
    assert "kill" in calls and calls[-1] == "close"  # stopped through the backend that woke it
    assert controller.lifecycle is new_backend


# ----------------------------------------------------------------------------- the desktop


def fake_opener(folder: Path, script: str) -> None:
    opener = folder / "xdg-open"
    opener.write_text("#!/bin/sh\n" + script)
    opener.chmod(opener.stat().st_mode | stat.S_IEXEC)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="xdg-open is the Linux opener")
def test_an_opener_that_fails_is_reported_and_one_that_stays_is_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sleep = shutil.which("sleep")
    monkeypatch.setenv("PATH", str(bin_dir))
    fake_opener(bin_dir, "echo \"xdg-open: no method available for opening '$1'\" >&2\nexit 3\n")
    problem = open_path(tmp_path / "fluidity.log")
    assert problem is not None
    assert problem.startswith(
        f"xdg-open could not open {tmp_path / 'fluidity.log'} (exit code 3: no application"
    )
    assert "no method available" in problem

    fake_opener(bin_dir, f"exec {sleep} 1\n")  # a viewer that stays open
    before = set(threading.enumerate())
    assert open_path(tmp_path, check_for=0.1) is None
    reapers = [t for t in threading.enumerate() if t.name == "opener-reaper" and t not in before]
    assert reapers and all(t.daemon for t in reapers)
    for reaper in reapers:
        reaper.join(5)
        assert not reaper.is_alive()  # the opener was waited for: no zombie left


def test_open_log_reports_a_failing_opener(cloud_tray: Tray, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cloud_tray.app.opener = lambda path: f"xdg-open could not open {path} (exit code 3)"
    cloud_tray.click("Open log")
    log = cloud_tray.app.log_path
    assert notifications(caplog)[-1] == f"xdg-open could not open {log} (exit code 3). The file is at {log}."


def test_start_at_login_keeps_the_flags_the_tray_was_started_with(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    arguments = [
        "--config", str(config), "--listen-port", "3128", "--ca-file", "certs/ca.crt",
        "--no-kill-on-disconnect", "--api-key", "secret-value-000000000",
    ]  # fmt: skip
    args = build_parser().parse_args(arguments)
    command = login_command(args, config)
    start = command.index(autostart.BACKGROUND_FLAG)
    assert command[start:] == [
        "--background", "--config", str(config.resolve()),
        "--listen-port", "3128", "--ca-file", str(Path.cwd() / "certs" / "ca.crt"),
        "--no-kill-on-disconnect",
    ]  # fmt: skip
    assert "secret-value-000000000" not in command  # a login entry is no place for secrets
    entry = autostart.XdgAutostart(config_home=tmp_path / "xdg")
    entry.enable(command)
    assert '"--listen-port" "3128"' in entry.path.read_text()
    assert REPO.is_dir()
