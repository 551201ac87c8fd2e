"""What a new user sees on the command line: --help, `fluidity usage`, missing certificates,
a used-up budget. Each program runs as a child process, as from a shell.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tunnel_fixtures import REPO, Pki, free_port

from desktop import bundle_main
from desktop.usage import UsageStore

PROGRAMS = {
    "fluidity-agent": "desktop.agent_cli",
    "fluidity-server": "server.main",
    "fluidity-local": "desktop.local_default",
    "fluidity-certs": "desktop.certificates",
    "fluidity usage": "desktop.usage_cli",
}


def run(module: str, *args: str, home: Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUIDITY_")}
    env.update(
        XDG_DATA_HOME=str(home / "data"),
        XDG_CONFIG_HOME=str(home / "config"),
        XDG_STATE_HOME=str(home / "state"),
    )
    env.pop("DISPLAY", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_help_starts_with_a_short_usage_line_and_two_examples(program: str, tmp_path: Path) -> None:
    result = run(PROGRAMS[program], "--help", home=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"usage: {program} ") and len(lines[0]) <= 90, lines[0]
    examples = lines[lines.index("examples:") + 1 :][:2]
    assert all(line.startswith(f"  {program}") for line in examples), examples
    assert "(default ;" not in result.stdout


def test_fluidity_help_is_the_same_for_a_pip_install_and_the_bundle(tmp_path: Path) -> None:
    pip = run("desktop.tray_app", "--help", home=tmp_path)
    bundle = run("desktop.bundle_main", "--help", home=tmp_path)
    assert pip.returncode == bundle.returncode == 0
    assert pip.stdout == bundle.stdout == bundle_main.USAGE
    assert pip.stdout.startswith("usage: fluidity [COMMAND] [OPTIONS]\n")
    assert "examples:\n  fluidity  " in pip.stdout
    tray = run("desktop.tray_app", "--help-tray", home=tmp_path)
    assert (
        tray.stdout.startswith("usage: fluidity [--background] [--config PATH]")
        and "--background" in tray.stdout
    )
    agent = run("desktop.tray_app", "agent", "--version", home=tmp_path)  # the bundle's commands work too
    assert agent.stdout.strip() == "fluidity-agent 0.1.0"


def seeded_usage(home: Path) -> str:
    """Up to an hour of server time and 1.2 GB down, recorded earlier today; the month's cost.

    Just after midnight there is less than an hour of today behind us, so the cost is
    worked out from what was really recorded.
    """
    store = UsageStore(home / "data" / "fluidity" / "usage.json")
    now = time.time()
    start = max(now - 3600, time.mktime(time.localtime(now)[:3] + (0, 0, 0, 0, 0, -1)))
    seconds = min(3600, now - start)
    store.server_woken(start)
    store.server_stopped("stopped by Fluidity", start + seconds)
    store.record_bytes(40_000_000, 1_200_000_000, "video.example")
    assert store.save()
    return f"${max(seconds, 60) / 3600 * 0.0173 + 1.24 * 0.09:.2f}"


def test_fluidity_usage_prints_the_month(tmp_path: Path) -> None:
    seeded_usage(tmp_path)
    config = tmp_path / "agent.yaml"
    config.write_text("monthly_budget: 5\n")
    for module, args in (
        ("desktop.usage_cli", ["--config", str(config)]),
        ("desktop.tray_app", ["usage", "--config", str(config)]),
        ("desktop.agent_cli", ["--usage", "--config", str(config)]),
    ):
        result = run(module, *args, home=tmp_path)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith("Fluidity usage in "), result.stdout
        assert "↓ 1.2 GB ↑ 40 MB" in result.stdout and "at $0.09/GB leaving AWS" in result.stdout
        assert "of the $5.00 monthly budget" in result.stdout
        assert "top hosts     video.example 1.2 GB" in result.stdout


def test_missing_certificates_name_the_path_and_the_fixing_commands(tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    result = run(
        "desktop.agent_cli",
        "--lifecycle", "static", "--server-address", "127.0.0.1",
        "--ca-file", str(folder / "ca.crt"), "--cert-file", str(folder / "client.crt"),
        "--key-file", str(folder / "client.key"),
        home=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"fluidity-agent: no certificate at {folder / 'ca.crt'}, {folder / 'client.crt'}, "
        f"{folder / 'client.key'}; run `fluidity-certs import BUNDLE --dir {folder}` (the bundle made where "
        f"the CA was created), or on the first machine `fluidity-certs init --dir {folder}`"
    )
    assert "Certificates >" not in result.stderr  # no tray menu on the command line


def test_the_agent_refuses_to_wake_a_server_over_budget(pki: Pki, tmp_path: Path) -> None:
    cost = seeded_usage(tmp_path)  # ≈ $0.13 this month, later than 1 am
    config = tmp_path / "agent.yaml"
    config.write_text(
        "lifecycle: lambda\n"
        f"api_url: http://127.0.0.1:{free_port()}/prod\n"
        "api_key: test-api-key-0123456789\n"
        f"ca_file: {pki.path('ca.crt')}\ncert_file: {pki.path('client.crt')}\n"
        f"key_file: {pki.path('client.key')}\n"
        "monthly_budget: 0.05\n"
        f"listen_port: {free_port()}\n"
    )
    refused = run("desktop.agent_cli", "--config", str(config), home=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith(
        f"To go on, raise monthly_budget in {config} or run with --monthly-budget USD (0 = no budget)."
    )
    assert f"Not connecting: this month's budget is used up (≈ {cost} of $0.05)" in refused.stderr
    assert "control plane" not in refused.stderr  # nothing was asked of it

    # Raised for this run: it goes ahead (and fails on the unreachable control plane, once).
    tried = run("desktop.agent_cli", "--config", str(config), "--monthly-budget", "0", home=tmp_path)
    assert tried.returncode == 1
    verdict = [line for line in tried.stderr.splitlines() if line.startswith("fluidity-agent: ")]
    assert len(verdict) == 1 and "wake: cannot reach the control plane" in verdict[0]
    assert "could not stop the server" not in tried.stderr  # nothing was started, nothing to stop


class _HtmlErrors(http.server.BaseHTTPRequestHandler):
    """A web server where the control plane should be: every answer an HTML error page."""

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        status = 404 if self.path.startswith("/missing") else 502
        title = "404 Not Found" if status == 404 else "502 Bad Gateway"
        body = f"<!DOCTYPE html><html><head><title>{title}</title></head><body>{'x' * 4000}</body></html>"
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def html_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlErrors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_html_error_page_from_the_control_plane_is_summarised(pki: Pki, html_server: str) -> None:
    from tunnel_fixtures import agent_config

    from desktop.lifecycle.base import LifecycleError, WakeRefused
    from desktop.lifecycle.lambda_api import LambdaLifecycle

    def wake(url: str) -> LifecycleError:
        config = agent_config(pki, 8443, lifecycle="lambda", api_url=url, api_key="k" * 24)
        with pytest.raises(LifecycleError) as caught:
            LambdaLifecycle(config).wake(timeout=5, cancel=threading.Event(), on_progress=lambda *_: None)
        return caught.value

    gateway_error = wake(f"{html_server}/prod")
    assert gateway_error.message == (
        "wake failed: control plane answered HTTP 502 with an HTML page (502 Bad Gateway), not JSON; "
        "api_url must be the ApiGatewayUrl output of the fluidity-lambda stack"
    )
    assert not isinstance(gateway_error, WakeRefused)  # a 5xx: the wake may have run, so Kill follows
    wrong_url = wake(f"{html_server}/missing")
    assert (
        isinstance(wrong_url, WakeRefused)
        and "HTTP 404 with an HTML page (404 Not Found)" in wrong_url.message
    )
