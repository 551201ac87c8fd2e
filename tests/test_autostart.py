"""Start at login: the Linux entry for real (validated and launched), macOS and Windows offline."""

from __future__ import annotations

import json
import plistlib
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from desktop import autostart
from desktop.autostart import (
    LaunchAgentAutostart,
    RunKeyAutostart,
    XdgAutostart,
    desktop_exec_value,
    launch_command,
)

#: Arguments that need every kind of Desktop Entry quoting.
AWKWARD_ARGS = ["--background", "--tag=50%", 'say "hi"', "$HOME", "back\\slash", "`tick`", "two words"]


def write_argv_recorder(directory: Path) -> tuple[Path, Path]:
    """A program (in a folder with a space) that writes the argv it was given to a JSON file."""
    folder = directory / "My Apps"
    folder.mkdir()
    output = directory / "argv.json"
    script = folder / "record argv.py"
    script.write_text(
        f"import json, sys\nopen({str(output)!r}, 'w').write(json.dumps(sys.argv[1:]))\n",
        encoding="utf-8",
    )
    return script, output


def test_linux_entry_is_created_validated_launched_and_removed(tmp_path: Path) -> None:
    validator = shutil.which("desktop-file-validate")
    if validator is None:
        pytest.skip("desktop-file-validate is not installed (apt desktop-file-utils)")
    entry = XdgAutostart(config_home=tmp_path / "config", icon=tmp_path / "fluidity.png")
    script, output = write_argv_recorder(tmp_path)
    command = [sys.executable, str(script), *AWKWARD_ARGS]

    assert not entry.is_enabled()
    entry.enable(command)
    assert entry.path == tmp_path / "config" / "autostart" / "fluidity.desktop"
    assert entry.is_enabled()
    checked = subprocess.run([validator, str(entry.path)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "", checked.stdout  # not even a hint

    # Launch it the way a desktop session does, and compare what the program received.
    try:
        import gi

        gi.require_version("Gio", "2.0")
        from gi.repository import Gio
    except (ImportError, ValueError):
        pass
    else:
        info = Gio.DesktopAppInfo.new_from_filename(str(entry.path))
        assert info is not None and info.launch([], None)
        deadline = time.monotonic() + 10
        while not output.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(output.read_text(encoding="utf-8")) == AWKWARD_ARGS

    entry.disable()
    assert not entry.path.exists() and not entry.is_enabled()
    entry.disable()  # idempotent


def test_exec_value_follows_the_desktop_entry_quoting_rules() -> None:
    assert desktop_exec_value(["/usr/bin/fluidity", "--background"]) == '"/usr/bin/fluidity" "--background"'
    # Inner escapes (\" \$ \\) are then doubled by the string-level escaping; % becomes %%.
    assert desktop_exec_value(['a"b', "$x", "c\\d", "5%"]) == '"a\\\\"b" "\\\\$x" "c\\\\\\\\d" "5%%"'
    with pytest.raises(ValueError, match="newline"):
        desktop_exec_value(["two\nlines"])


def test_an_entry_switched_off_by_the_desktop_counts_as_disabled(tmp_path: Path) -> None:
    entry = XdgAutostart(config_home=tmp_path)
    entry.enable(["/usr/bin/fluidity"])
    entry.path.write_text(entry.path.read_text() + "Hidden=true\n")
    assert not entry.is_enabled()


def test_launch_command_for_a_pip_install_and_a_bundle(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "agent.yaml"
    assert launch_command() == [sys.executable, "-m", "desktop.tray_app", "--background"]
    assert launch_command(config)[-2:] == ["--config", str(config.resolve())]
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert launch_command() == [sys.executable, "--background"]


def test_macos_launch_agent_in_a_temporary_home(tmp_path: Path) -> None:
    agent = LaunchAgentAutostart(home=tmp_path)
    command = ["/Applications/Fluidity.app/Contents/MacOS/fluidity", "--background"]
    assert not agent.is_enabled()
    agent.enable(command)
    assert agent.path == tmp_path / "Library" / "LaunchAgents" / "io.fluidity.tray.plist"
    with agent.path.open("rb") as handle:
        plist = plistlib.load(handle)
    assert plist == {
        "Label": "io.fluidity.tray",
        "ProgramArguments": command,
        "RunAtLoad": True,
        "KeepAlive": False,
        "ProcessType": "Interactive",
    }
    assert agent.is_enabled()
    agent.disable()
    assert not agent.path.exists() and not agent.is_enabled()


class FakeWinreg:
    """The part of ``winreg`` the Run-key code uses, over a dict (keys are context managers)."""

    HKEY_CURRENT_USER = "HKCU"
    KEY_READ, KEY_SET_VALUE, REG_SZ = 1, 2, 1

    def __init__(self) -> None:
        self.keys: dict[tuple[str, str], dict[str, tuple[Any, int]]] = {}

    class _Key:
        def __init__(self, values: dict[str, tuple[Any, int]]) -> None:
            self.values = values

        def __enter__(self) -> FakeWinreg._Key:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def CreateKeyEx(self, root: str, path: str, reserved: int, access: int) -> _Key:  # noqa: N802
        return self._Key(self.keys.setdefault((root, path), {}))

    def OpenKey(self, root: str, path: str, reserved: int, access: int) -> _Key:  # noqa: N802
        if (root, path) not in self.keys:
            raise FileNotFoundError(path)
        return self._Key(self.keys[(root, path)])

    def SetValueEx(self, key: _Key, name: str, reserved: int, kind: int, value: Any) -> None:  # noqa: N802
        key.values[name] = (value, kind)

    def QueryValueEx(self, key: _Key, name: str) -> tuple[Any, int]:  # noqa: N802
        if name not in key.values:
            raise FileNotFoundError(name)
        return key.values[name]

    def DeleteValue(self, key: _Key, name: str) -> None:  # noqa: N802
        if name not in key.values:
            raise FileNotFoundError(name)
        del key.values[name]


def test_windows_run_key_against_a_fake_registry() -> None:
    registry = FakeWinreg()
    run_key = RunKeyAutostart(registry)
    command = [
        r"C:\Program Files\Fluidity\fluidity.exe",
        "--background",
        "--config",
        r"C:\Users\me\my cfg.yaml",
    ]
    assert not run_key.is_enabled()
    run_key.disable()  # nothing to remove yet: no error
    run_key.enable(command)
    value, kind = registry.keys[("HKCU", autostart.RUN_KEY)]["Fluidity"]
    assert kind == registry.REG_SZ
    assert value == (
        '"C:\\Program Files\\Fluidity\\fluidity.exe" --background --config "C:\\Users\\me\\my cfg.yaml"'
    )
    assert run_key.is_enabled()
    run_key.disable()
    assert not run_key.is_enabled()
    assert "CurrentVersion\\Run" in run_key.describe()


def test_platform_choice(tmp_path: Path) -> None:
    assert isinstance(autostart.for_platform("darwin"), LaunchAgentAutostart)
    assert isinstance(autostart.for_platform("linux"), XdgAutostart)
