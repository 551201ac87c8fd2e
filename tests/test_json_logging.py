"""Log lines are JSON objects a machine can parse, with extras, errors and rotation."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from tunnel_fixtures import REPO, Pki

from server.json_logging import JsonFormatter, TextFormatter, configure_logging, parse_level, reset_logging

TIME_FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    reset_logging()
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_record_is_one_json_object_with_extras() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    logging.getLogger("fluidity.proxy").info(
        "opened %s", "example.com:443", extra={"stream_id": 7, "path": Path("/tmp/x"), "thing": object()}
    )
    logging.getLogger("fluidity.proxy").debug("not at info level")
    (entry,) = lines(stream)
    assert entry["level"] == "info"
    assert entry["logger"] == "fluidity.proxy"
    assert entry["message"] == "opened example.com:443"
    assert TIME_FORMAT.fullmatch(str(entry["time"]))
    assert entry["stream_id"] == 7
    assert entry["path"] == "/tmp/x"
    assert str(entry["thing"]).startswith("<object object at")


def test_unusual_extras_stay_valid_json() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    nested: dict[str, object] = {"a": [1, 2.5, {3: b"raw"}], "nan": float("nan")}
    logging.getLogger("t").warning(
        "line one\nline two", extra={"nested": nested, "level": "mine", "ids": {4}, "text": "ünï"}
    )
    (entry,) = lines(stream)
    assert stream.getvalue().count("\n") == 1
    assert entry["message"] == "line one\nline two"
    assert entry["nested"] == {"a": [1, 2.5, {"3": "b'raw'"}], "nan": "nan"}
    assert entry["level"] == "warning"
    assert entry["extra_level"] == "mine"
    assert entry["ids"] == [4]
    assert entry["text"] == "ünï"


def test_a_bad_format_string_does_not_lose_the_record() -> None:
    # Formatted directly: pytest's own capture handler would fail the test on such a record.
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "needs two %s %s", ("only-one",), None)
    for formatter in (JsonFormatter(), TextFormatter()):
        text = formatter.format(record)
        assert "needs two %s %s" in text
        assert "only-one" in text
    assert "needs two %s %s" in str(json.loads(JsonFormatter().format(record))["message"])


def raise_and_log(logger_name: str) -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logging.getLogger(logger_name).exception("request failed", extra={"host": "h"})


def test_exceptions_are_one_line_errors_at_info() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    raise_and_log("t")
    assert stream.getvalue().count("\n") == 1
    (entry,) = lines(stream)
    assert entry["error"] == "ValueError: boom second line"
    assert entry["level"] == "error"
    assert entry["host"] == "h"
    assert "traceback" not in entry


def test_exceptions_carry_the_traceback_at_debug() -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    raise_and_log("t")
    assert stream.getvalue().count("\n") == 1
    (entry,) = lines(stream)
    assert entry["error"] == "ValueError: boom second line"
    assert str(entry["traceback"]).startswith("Traceback (most recent call last):")
    assert "raise_and_log" in str(entry["traceback"])


def test_reconfiguring_replaces_only_its_own_handlers() -> None:
    root = logging.getLogger()
    foreign = logging.StreamHandler(io.StringIO())
    root.addHandler(foreign)
    try:
        first, second = io.StringIO(), io.StringIO()
        configure_logging("info", stream=first)
        configure_logging("warning", stream=second)
        logging.getLogger("t").warning("once")
        logging.getLogger("t").info("filtered")
        assert first.getvalue() == ""
        assert [entry["message"] for entry in lines(second)] == ["once"]
        assert foreign in root.handlers
        assert sum(getattr(handler, "_fluidity_owned", False) for handler in root.handlers) == 1
    finally:
        root.removeHandler(foreign)


def test_log_file_is_created_and_rotated(tmp_path: Path) -> None:
    log_file = tmp_path / "nested" / "logs" / "fluidity.log"
    configure_logging("info", log_file, stream=None)
    (handler,) = [h for h in logging.getLogger().handlers if getattr(h, "_fluidity_owned", False)]
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    assert (handler.maxBytes, handler.backupCount) == (1024 * 1024, 3)
    padding = "x" * 2000
    for index in range(1200):  # about 2.5 MiB: enough for two rotations
        logging.getLogger("t").info("record %d %s", index, padding)
    handler.flush()
    assert (tmp_path / "nested" / "logs" / "fluidity.log.1").is_file()
    assert (tmp_path / "nested" / "logs" / "fluidity.log.2").is_file()
    last = log_file.read_text(encoding="utf-8").splitlines()[-1]
    assert json.loads(last)["message"].startswith("record 1199 ")


def test_file_and_stream_together(tmp_path: Path) -> None:
    stream = io.StringIO()
    log_file = tmp_path / "agent.log"
    configure_logging("info", log_file, stream=stream)
    logging.getLogger("t").info("both", extra={"n": 1})
    from_file = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()]
    assert from_file == lines(stream)


def test_text_format_for_people() -> None:
    stream = io.StringIO()
    configure_logging("info", json_format=False, stream=stream)
    logging.getLogger("fluidity.tunnel").info("connected in %dms", 45, extra={"server": "1.2.3.4"})
    raise_and_log("fluidity.tunnel")
    first, second = stream.getvalue().splitlines()
    assert re.fullmatch(r"\S+Z INFO    fluidity\.tunnel: connected in 45ms server=\"1\.2\.3\.4\"", first)
    assert second.endswith('request failed host="h" error="ValueError: boom second line"')


def test_default_stream_is_stderr_at_call_time(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    logging.getLogger("t").info("to stderr")
    assert json.loads(capsys.readouterr().err.splitlines()[-1])["message"] == "to stderr"


def test_python_warnings_are_logged() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old api", DeprecationWarning, stacklevel=1)
    (entry,) = lines(stream)
    assert entry["logger"] == "py.warnings"
    assert "old api" in str(entry["message"])


def test_bad_level_is_rejected_and_logging_keeps_working() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    with pytest.raises(ValueError, match="unknown log level 'loud'; expected debug, info, warning or error"):
        configure_logging("loud")
    logging.getLogger("t").info("still here")
    assert [entry["message"] for entry in lines(stream)] == ["still here"]


def test_unwritable_log_file_keeps_previous_logging(tmp_path: Path) -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        configure_logging("info", blocker / "x.log")
    logging.getLogger("t").info("still here")
    assert [entry["message"] for entry in lines(stream)] == ["still here"]


@pytest.mark.parametrize(
    ("name", "level"), [("debug", 10), ("INFO", 20), ("warn", 30), ("Warning", 30), ("error", 40)]
)
def test_parse_level(name: str, level: int) -> None:
    assert parse_level(name) == level


# ----------------------------------------------------------------------------- people at a terminal


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 60.0) -> tuple[int, str]:
    """Run ``argv`` with its stdout and stderr on a pseudo-terminal; (exit code, what it showed)."""
    import os
    import pty
    import select
    import subprocess
    import time

    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=env, cwd=REPO
    )
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the program closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            elif process.poll() is not None:
                break
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    return process.wait(10), shown.decode("utf-8", "replace").replace("\r\n", "\n")


@pytest.fixture
def agent_argv(pki: Pki) -> list[str]:
    """``fluidity-agent`` against a port nobody listens on: it logs a few lines and gives up."""
    import sys

    from tunnel_fixtures import free_port

    return [
        sys.executable, "-m", "desktop.agent_cli", "--lifecycle", "static",
        "--server-address", "127.0.0.1", "--server-port", str(free_port()), "--listen-port", "0",
        "--ca-file", str(pki.path("ca.crt")), "--cert-file", str(pki.path("client.crt")),
        "--key-file", str(pki.path("client.key")),
        "--connect-timeout", "0.5s", "--connection-timeout", "1s",
    ]  # fmt: skip


def terminal_env(tmp_path: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUIDITY_") and k != "NO_COLOR"}
    env.update(TERM="xterm-256color", XDG_DATA_HOME=str(tmp_path / "data"), XDG_CONFIG_HOME=str(tmp_path))
    return env


def test_a_terminal_gets_short_coloured_lines(agent_argv: list[str], tmp_path: Path) -> None:
    code, shown = run_in_pty(agent_argv, terminal_env(tmp_path))
    assert code == 1, shown
    lines = shown.splitlines()
    assert not any(line.startswith("{") for line in lines), shown  # no JSON for people
    first = lines[0]
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d \x1b\[32minfo \x1b\[0m state disconnected -> waking "
        r'detail="waking the server" session=1',
        first,
    ), first
    (verdict,) = [line for line in lines if line.startswith("fluidity-agent: ")]
    assert verdict.startswith("fluidity-agent: could not connect to the server at 127.0.0.1:")
    assert "cannot reach" not in verdict and verdict.count("connection refused") == 1  # the cause, once


def test_no_color_plain_text_and_forced_json(agent_argv: list[str], tmp_path: Path) -> None:
    env = terminal_env(tmp_path)
    _code, plain = run_in_pty(agent_argv, {**env, "NO_COLOR": "1"})
    assert "\x1b[" not in plain
    assert re.match(r"\d\d:\d\d:\d\d info  state disconnected -> waking", plain), plain
    _code, forced = run_in_pty([*agent_argv, "--log-format", "json"], env)
    assert json.loads(forced.splitlines()[0])["message"] == "state disconnected -> waking"


def test_console_formatter_names_extras_and_errors_once() -> None:
    from server.json_logging import ConsoleFormatter

    record = logging.LogRecord("fluidity.agent", logging.WARNING, __file__, 1, "connect failed", (), None)
    record.server = "203.0.113.7:8443"
    record.reason = "connection refused"
    line = ConsoleFormatter().format(record)
    assert re.fullmatch(
        r'\d\d:\d\d:\d\d warn  connect failed server=203\.0\.113\.7:8443 reason="connection refused"', line
    )
