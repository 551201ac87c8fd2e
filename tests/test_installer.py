"""The installers: the one-executable dispatcher, what the bundle holds, and the packages.

Fast tests check the build inputs (bundle contents, Inno Setup script, Info.plist, signing
plan, release workflow). The ``slow`` tests build the real Linux bundle, .tar.gz and .deb
once with ``installer/build.py`` (what developers and the release workflow run) and then run
the built program: ``--version``, the local default with curl through it, the agent against
the bundled server, the .deb installed into a temporary root, and (with a display) the tray.
"""

from __future__ import annotations

import importlib.util
import os
import plistlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from proxy_fixtures import OriginServer
from tunnel_fixtures import clean_env, curl, free_port, wait_until

from desktop import autostart, bundle_main
from desktop.icons import SIZES
from desktop.launch import FROZEN_SUBCOMMANDS, PROGRAMS
from server import __version__

REPO = Path(__file__).resolve().parent.parent
INSTALLER = REPO / "installer"
sys.path.insert(0, str(INSTALLER))

import bundle_contents  # noqa: E402
import icon_files  # noqa: E402
import linux_packages  # noqa: E402
import macos_package  # noqa: E402
import windows_package  # noqa: E402


def _load_build_script() -> ModuleType:
    # Loaded under its own name: a plain ``import build`` could find PyPA's ``build`` package.
    spec = importlib.util.spec_from_file_location("fluidity_installer_build", INSTALLER / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_script = _load_build_script()

#: The Linux bundle's size budget (unpacked).
SIZE_BUDGET = 60 * 1000 * 1000
#: Hang guards for the built program (not timing assertions).
START_TIMEOUT = 30.0
BUILD_TIMEOUT = 600.0


# ============================================================================ dispatcher


def test_version_at_top_level(capsys: pytest.CaptureFixture[str]) -> None:
    assert bundle_main.main(["--version"]) == 0
    assert capsys.readouterr().out == f"fluidity {__version__}\n"


def test_every_frozen_subcommand_runs_its_program() -> None:
    for program, sub in FROZEN_SUBCOMMANDS.items():
        argv = [sub, "--flag"] if sub else ["--flag"]
        assert bundle_main.resolve(argv) == (PROGRAMS[program], ["--flag"])


def test_doctor_goes_to_the_tray_program_which_owns_that_subcommand() -> None:
    assert bundle_main.resolve(["doctor", "--json"]) == (PROGRAMS["fluidity"], ["doctor", "--json"])


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bundle_main.main(["agnet", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'agnet'" in err
    assert "agent, server, certs, local" in err


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert bundle_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    for sub in ("agent", "server", "certs", "local", "--help-tray"):
        assert sub in out


def test_help_tray_shows_the_tray_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        bundle_main.main(["--help-tray"])
    assert exited.value.code == 0
    assert "--background" in capsys.readouterr().out


def test_children_of_the_bundle_get_the_users_library_path() -> None:
    with_earlier = {
        "LD_LIBRARY_PATH": "/opt/app/_internal",
        "LD_LIBRARY_PATH_ORIG": "/usr/local/lib",
        "X": "1",
    }
    bundle_main.restore_library_path(with_earlier)
    assert with_earlier == {"LD_LIBRARY_PATH": "/usr/local/lib", "X": "1"}
    without = {"LD_LIBRARY_PATH": "/opt/app/_internal", "X": "1"}
    bundle_main.restore_library_path(without)
    assert without == {"X": "1"}


def test_headless_programs_never_load_the_gui_stack() -> None:
    """``fluidity server``/``agent`` must start fast and work without a display."""
    probe = (
        "import sys\n"
        "from desktop.bundle_main import main\n"
        "for argv in (['server', '--version'], ['agent', '--version'], ['certs', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('pystray', 'PIL', 'gi', 'tkinter', 'boto3') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


# ============================================================================ bundle contents


def _botocore_data_toc() -> list[tuple[str, str, str]]:
    import botocore

    root = Path(botocore.__file__).parent
    return [
        (str(path.relative_to(root.parent)), str(path), "DATA")
        for path in (root / "data").rglob("*")
        if path.is_file()
    ]


def test_aws_data_is_cut_to_the_services_and_versions_used() -> None:
    toc = _botocore_data_toc()
    kept = bundle_contents.trim_aws_data(toc)
    services = {Path(dest).parts[2] for dest, _, _ in kept if len(Path(dest).parts) > 3}
    assert services == bundle_contents.BOTOCORE_SERVICES
    versions: dict[str, set[str]] = {}
    for dest, _, _ in kept:
        parts = Path(dest).parts
        if len(parts) > 4:
            versions.setdefault(parts[2], set()).add(parts[3])
    assert all(len(found) == 1 for found in versions.values()), versions
    top_level = {Path(dest).name for dest, _, _ in kept if len(Path(dest).parts) == 3}
    assert {"endpoints.json", "partitions.json", "_retry.json", "sdk-default-configuration.json"} <= top_level
    assert not any(dest.endswith("examples-1.json") for dest, _, _ in kept)
    assert sum(Path(src).stat().st_size for _, src, _ in kept) < 0.15 * sum(
        Path(src).stat().st_size for _, src, _ in toc
    )


def test_trimmed_aws_data_still_makes_every_client_the_app_creates(tmp_path: Path) -> None:
    import botocore.exceptions
    import botocore.loaders
    import botocore.session

    for dest, source, _ in bundle_contents.trim_aws_data(_botocore_data_toc()):
        target = tmp_path / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    session = botocore.session.Session()
    loader = botocore.loaders.Loader(
        extra_search_paths=[str(tmp_path / "botocore" / "data")], include_default_search_paths=False
    )
    session.register_component("data_loader", loader)
    session.set_credentials("AKIDEXAMPLE", "secret")
    for service in sorted(bundle_contents.BOTOCORE_SERVICES):
        session.create_client(service, region_name="eu-west-1")
    with pytest.raises(botocore.exceptions.UnknownServiceError):
        session.create_client("s3", region_name="eu-west-1")


def test_every_aws_client_in_the_bundled_code_is_kept() -> None:
    """A new ``client("x")`` in desktop/ or server/ must be added to BOTOCORE_SERVICES."""
    used: set[str] = set()
    for folder in ("desktop", "server"):
        for path in (REPO / folder).rglob("*.py"):
            used.update(
                re.findall(r"""\.client\(\s*["']([a-z0-9-]+)["']""", path.read_text(encoding="utf-8"))
            )
    assert used, "expected the ecs lifecycle and the metrics publisher to create clients"
    assert used <= bundle_contents.BOTOCORE_SERVICES


@pytest.mark.parametrize(
    ("dest", "left_to_desktop"),
    [
        ("libgtk-3.so.0", True),
        ("libgirepository-1.0.so.1", True),
        ("libglib-2.0.so.0", True),
        ("libX11.so.6", True),
        ("libicudata.so.72", True),
        ("libstdc++.so.6", True),
        ("gi_typelibs/Gtk-3.0.typelib", True),
        ("libpython3.11.so.1.0", False),
        ("libssl.so.3", False),
        ("libcrypto.so.3", False),
        ("libffi.so.8", False),
        ("libz.so.1", False),
        ("libtk8.6.so", False),
        ("gi/_gi.cpython-311-x86_64-linux-gnu.so", False),
        ("pillow.libs/libxcb-9065bb12.so.1.1.0", False),
    ],
)
def test_system_gui_libraries(dest: str, left_to_desktop: bool) -> None:
    assert bundle_contents.is_system_gui_library(dest) is left_to_desktop


def test_targets_pick_their_own_tray_backends() -> None:
    linux = bundle_contents.Target("linux", gui_stack="system")
    assert {"pystray._appindicator", "pystray._gtk", "pystray._xorg"} <= set(linux.hidden_imports)
    assert {"pystray._win32", "pystray._darwin"} <= set(linux.excluded_modules)
    assert set(PROGRAMS.values()) <= set(linux.hidden_imports)
    assert "gi" not in linux.excluded_modules
    assert "gi" in bundle_contents.Target("linux", gui_stack="none").excluded_modules
    windows = bundle_contents.Target("windows")
    assert "pystray._win32" in windows.hidden_imports and "pystray._xorg" in windows.excluded_modules
    assert "pystray._darwin" in bundle_contents.Target("macos").hidden_imports
    assert "lambdas.deploy" in windows.excluded_modules  # operators run fluidity-deploy from pip
    with pytest.raises(ValueError, match="unknown target"):
        bundle_contents.Target("beos")
    with pytest.raises(ValueError, match="unknown GUI stack"):
        bundle_contents.Target("linux", gui_stack="qt")


def test_macos_info_plist() -> None:
    plist = plistlib.loads(plistlib.dumps(bundle_contents.macos_info_plist(__version__)))
    assert plist["LSUIElement"] is True  # menu-bar only, no Dock icon
    assert plist["CFBundleIdentifier"] == autostart.LAUNCH_AGENT_LABEL
    assert plist["CFBundleShortVersionString"] == plist["CFBundleVersion"] == __version__
    assert plist["CFBundleExecutable"] == bundle_contents.EXECUTABLE
    entitlements = plistlib.loads(macos_package.ENTITLEMENTS.read_bytes())
    assert entitlements == {"com.apple.security.cs.allow-unsigned-executable-memory": True}


def test_missing_icons_are_rendered(tmp_path: Path) -> None:
    assets = tmp_path / "assets"
    assets.mkdir()
    shutil.copy(REPO / "assets" / "make_icons.py", assets)
    prepared = icon_files.prepare_icons(assets, tmp_path / "work")
    assert prepared != assets and not icon_files.missing_icons(prepared)
    from PIL import Image

    with Image.open(prepared / "fluidity.ico") as ico:
        assert ico.format == "ICO" and (256, 256) in ico.info["sizes"]
    with Image.open(prepared / "fluidity.icns") as icns:
        assert icns.format == "ICNS"
    assert icon_files.prepare_icons(prepared, tmp_path / "unused") == prepared


# ============================================================================ Linux packaging inputs


def test_deb_only_suggests_the_heavy_file_choosers() -> None:
    """zenity or kdialog would pull a desktop's worth of packages onto a minimal system."""
    control = linux_packages.DebianControl("0.1.0", "amd64", 1000, ["libc6 (>= 2.35)"]).text()
    fields = dict(re.findall(r"^([\w-]+): (.*)$", control, re.M))
    assert "zenity" not in fields["Recommends"] and "kdialog" not in fields["Recommends"]
    assert fields["Suggests"] == "zenity | kdialog"
    assert fields["Recommends"] == "xdg-utils, xclip | xsel | wl-clipboard"


@pytest.mark.skipif(shutil.which("desktop-file-validate") is None, reason="needs desktop-file-utils")
def test_desktop_entry_is_valid(tmp_path: Path) -> None:
    entry = tmp_path / "fluidity.desktop"
    entry.write_text(linux_packages.desktop_entry(), encoding="utf-8")
    result = subprocess.run(
        ["desktop-file-validate", str(entry)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout


def test_maintainer_script_and_launchers_are_valid_sh(tmp_path: Path) -> None:
    scripts = {"postrm": linux_packages.POSTRM}
    scripts.update(
        {name: linux_packages.launcher_script(sub) for name, sub in bundle_contents.PROGRAM_COMMANDS.items()}
    )
    for name, text in scripts.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        assert subprocess.run(["sh", "-n", str(path)], check=False).returncode == 0, name
    assert set(bundle_contents.PROGRAM_COMMANDS.values()) == {s for s in FROZEN_SUBCOMMANDS.values() if s}


# ============================================================================ Windows (Inno Setup)


@dataclass
class InnoScript:
    """The parts of an .iss file the checks need, with ``{#Name}`` already expanded."""

    defines: dict[str, str]
    required: set[str]
    setup: dict[str, str]
    entries: dict[str, list[dict[str, str]]]
    code: str
    text: str


def _split_entry(line: str) -> dict[str, str]:
    """``Name: "a; b"; Flags: x y`` -> {"Name": "a; b", "Flags": "x y"} (quote-aware)."""
    fields: dict[str, str] = {}
    for part in re.findall(r'(?:[^;"]|"[^"]*")+', line):
        key, _, value = part.strip().partition(":")
        fields[key.strip()] = value.strip().strip('"')
    return fields


def parse_inno(text: str, passed: dict[str, str]) -> InnoScript:
    defines = dict(passed)
    required: set[str] = set()
    pending: str | None = None
    body: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#ifndef"):
            pending = line.split()[1]
        elif line.startswith("#error") and pending:
            required.add(pending)
        elif line.startswith("#define"):
            name, value = re.match(r'#define\s+(\w+)\s+"(.*)"', line).groups()  # type: ignore[union-attr]
            defines.setdefault(name, value)
        elif line.startswith("#endif"):
            pending = None
        elif not line.startswith("#"):
            body.append(raw)
    expanded = "\n".join(body)
    undefined = sorted(set(re.findall(r"\{#(\w+)\}", expanded)) - set(defines))
    assert not undefined, f"the script uses undefined preprocessor names: {undefined}"
    expanded = re.sub(r"\{#(\w+)\}", lambda m: defines[m.group(1)], expanded)
    setup: dict[str, str] = {}
    entries: dict[str, list[dict[str, str]]] = {}
    code_lines: list[str] = []
    section = ""
    for raw in expanded.splitlines():
        line = raw.strip()
        if re.fullmatch(r"\[\w+\]", line):
            section = line[1:-1]
        elif section == "Code":
            code_lines.append(raw)
        elif not line or line.startswith(";"):
            continue
        elif section == "Setup":
            key, _, value = line.partition("=")
            setup[key.strip()] = value.strip()
        else:
            entries.setdefault(section, []).append(_split_entry(line))
    return InnoScript(defines, required, setup, entries, "\n".join(code_lines), expanded)


@pytest.fixture(name="inno")
def inno_fixture(tmp_path: Path) -> InnoScript:
    bundle, _console = build_script.bundle_paths("windows", tmp_path / "bundle")
    passed = windows_package.iscc_defines(__version__, bundle, tmp_path / "fluidity.ico", tmp_path / "out")
    return parse_inno(windows_package.ISS_SCRIPT.read_text(encoding="utf-8"), passed)


def test_inno_setup_script_is_a_per_user_install(inno: InnoScript) -> None:
    assert inno.required <= set(windows_package.iscc_defines("1", Path(), Path(), Path()))
    setup = inno.setup
    assert setup["PrivilegesRequired"] == "lowest"
    assert setup["DefaultDirName"].startswith("{localappdata}\\Programs\\")
    assert re.fullmatch(r"\{\{[0-9A-F-]{36}\}", setup["AppId"])
    assert setup["AppVersion"] == __version__
    assert setup["OutputBaseFilename"] + ".exe" == windows_package.setup_file_name(__version__)
    assert any(icon["Name"].startswith("{autoprograms}\\") for icon in inno.entries["Icons"])
    assert inno.entries["UninstallDelete"] == [{"Type": "filesandordirs", "Name": "{app}"}]


def test_inno_setup_login_item_is_the_apps_own(inno: InnoScript) -> None:
    """Same key, value name and flag as desktop/autostart.py, optional, removed on uninstall."""
    [task] = inno.entries["Tasks"]
    assert "unchecked" in task["Flags"].split()
    [run_value] = inno.entries["Registry"]
    assert run_value["Root"] == "HKCU"
    assert run_value["Subkey"] == autostart.RUN_KEY
    assert run_value["ValueName"] == autostart.APP_NAME
    assert run_value["Tasks"] == task["Name"]
    assert "uninsdeletevalue" in run_value["Flags"].split()
    assert run_value["ValueData"] == "{code:AutostartCommand}"
    assert f"' {autostart.BACKGROUND_FLAG}'" in inno.code and "AddQuotes(" in inno.code
    assert f"RegDeleteValue(HKEY_CURRENT_USER, '{autostart.RUN_KEY}', '{autostart.APP_NAME}')" in inno.code
    assert inno.code.lower().count("begin") == inno.code.lower().count("end;")


def test_inno_setup_files_come_from_the_windows_bundle(inno: InnoScript, tmp_path: Path) -> None:
    bundle, console = build_script.bundle_paths("windows", tmp_path / "bundle")
    [files] = inno.entries["Files"]
    assert files["Source"] == f"{bundle}\\*" and "recursesubdirs" in files["Flags"]
    referenced = set(re.findall(r"\{app\}\\([\w.-]+)", inno.text))
    assert referenced == {f"{bundle_contents.EXECUTABLE}.exe"}
    assert console.name == f"{bundle_contents.CONSOLE_EXECUTABLE}.exe"


def test_inno_autostart_quoting_matches_list2cmdline() -> None:
    """AddQuotes quotes a path only when it has a space, as subprocess.list2cmdline does."""

    def add_quotes(text: str) -> str:
        return f'"{text}"' if " " in text and not text.startswith('"') else text

    for exe in (
        r"C:\Users\ann\AppData\Local\Programs\Fluidity\fluidity.exe",
        r"C:\Users\Ann Lee\Fluidity\fluidity.exe",
    ):
        assert f"{add_quotes(exe)} {autostart.BACKGROUND_FLAG}" == subprocess.list2cmdline(
            [exe, autostart.BACKGROUND_FLAG]
        )


# ============================================================================ macOS signing plan


def _plan(env: dict[str, str]) -> macos_package.ReleasePlan:
    app = Path("/tmp/x/Fluidity.app")
    return macos_package.plan_release(app, Path("/tmp/out.dmg"), Path("/tmp/stage"), Path("/tmp/k"), env)


def test_macos_unsigned_build_skips_signing_and_still_makes_a_dmg() -> None:
    plan = _plan({})
    assert [command[0] for command in plan.commands] == ["hdiutil"]
    assert plan.skipped == [
        "skipping signing: MACOS_CERT_P12 and MACOS_CERT_PASSWORD are not set",
        "skipping notarization: the app is not signed",
    ]


def test_macos_signing_and_notarization_are_wired_to_the_secrets() -> None:
    signing = {"MACOS_CERT_P12": "cDEy", "MACOS_CERT_PASSWORD": "pw"}
    signed_only = _plan(signing)
    assert signed_only.signs and not signed_only.notarizes
    assert [c[0] for c in signed_only.commands] == ["codesign", "codesign", "hdiutil", "codesign"]
    assert "--options" in signed_only.commands[0] and "runtime" in signed_only.commands[0]
    assert signed_only.skipped and signed_only.skipped[0].startswith("skipping notarization")
    notary = {"APPLE_ID": "dev@example.com", "APPLE_TEAM_ID": "TEAM123456", "APPLE_APP_PASSWORD": "abcd"}
    full = _plan({**signing, **notary})
    assert full.notarizes and not full.skipped
    submit = next(c for c in full.commands if c[:3] == ["xcrun", "notarytool", "submit"])
    assert submit[4:6] == ["--apple-id", "dev@example.com"] and "--wait" in submit
    assert full.commands[-1] == ["xcrun", "stapler", "staple", "/tmp/out.dmg"]


# ============================================================================ release workflow


def test_release_workflow_builds_all_three_with_the_developer_script() -> None:
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "release.yml").read_text(encoding="utf-8"))
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "v*" in triggers["push"]["tags"]
    build_job = workflow["jobs"]["build"]
    matrix = build_job["strategy"]["matrix"]["include"]
    runners = {entry["os"].split("-")[0]: entry["target"] for entry in matrix}
    assert runners == {"ubuntu": "linux", "windows": "windows", "macos": "macos"}
    assert build_job["runs-on"] == "${{ matrix.os }}"
    runs = [step.get("run", "") for step in build_job["steps"]]
    [build_line] = [line for run in runs for line in run.splitlines() if "installer/build.py" in line]
    for target in runners.values():
        command = build_line.replace("${{ matrix.target }}", target)
        words = [w for w in shlex.split(command) if "$" not in w and "{" not in w]
        assert words[:2] == ["python", "installer/build.py"]
        args = build_script.build_parser().parse_args(words[2:])
        assert args.target == target
    assert "--expect-version" in build_line
    assert any(step.get("uses", "").startswith("actions/upload-artifact@") for step in build_job["steps"])
    release = workflow["jobs"]["release"]
    assert release["needs"] == "build" and "refs/tags/v" in release["if"]
    assert any("gh release create" in step.get("run", "") for step in release["steps"])


def test_build_script_refuses_to_cross_compile(capsys: pytest.CaptureFixture[str]) -> None:
    other = "windows" if build_script.current_target() != "windows" else "linux"
    assert build_script.main(["--target", other, "--out", "unused"]) == 1
    assert "cannot cross-compile" in capsys.readouterr().err


def test_build_script_refuses_a_mismatched_tag(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_script.main(["--expect-version", "v999.0.0", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert "v999.0.0" in err and __version__ in err


# ============================================================================ the built Linux bundle (slow)


@dataclass
class LinuxBuild:
    bundle: Path
    executable: Path
    tarball: Path
    deb: Path
    build_seconds: float


@pytest.fixture(name="linux_build", scope="module")
def linux_build_fixture(tmp_path_factory: pytest.TempPathFactory) -> LinuxBuild:
    if not sys.platform.startswith("linux"):
        pytest.skip("the Linux bundle is built on Linux")
    missing = [tool for tool in ("readelf", "dpkg-deb", "strip") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (binutils, dpkg)")
    root = tmp_path_factory.mktemp("installer-build")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(INSTALLER / "build.py"), "--target", "linux", "--out", str(root / "out"),
         "--work", str(root / "work")],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seconds = time.monotonic() - started
    packages = root / "out" / "packages"
    [tarball] = packages.glob("*.tar.gz")
    [deb] = packages.glob("*.deb")
    bundle = root / "out" / "bundle" / "fluidity"
    print(f"\nbuilt the Linux bundle and packages in {seconds:.1f} s")
    return LinuxBuild(bundle, bundle / "fluidity", tarball, deb, seconds)


def _user_env(home: Path) -> dict[str, str]:
    """A private home, so the built program never touches the real user's settings."""
    env = clean_env()
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        XDG_CACHE_HOME=str(home / ".cache"),
    )
    for name in list(env):
        if name.startswith("FLUIDITY_") or name in ("DISPLAY", "WAYLAND_DISPLAY", "PYSTRAY_BACKEND"):
            del env[name]
    return env


def _agent_config(folder: Path, **settings: object) -> Path:
    """An agent.yaml in ``folder`` using the certificates in ``folder/certs``."""
    config = folder / "agent.yaml"
    certs = {"ca_file": "certs/ca.crt", "cert_file": "certs/client.crt", "key_file": "certs/client.key"}
    config.write_text(yaml.safe_dump({**certs, **settings}), encoding="utf-8")
    return config


class Started:
    """A built program running as a child, with its combined output collected in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._handle = log.open("wb")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=self._handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, text: str) -> float:
        """Seconds from start until ``text`` appeared in the output (hang-guarded)."""

        def seen() -> bool:
            if self.process.poll() is not None and text not in self.output():
                raise AssertionError(f"exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            return text in self.output()

        wait_until(seen, START_TIMEOUT, f"{text!r} in the output")
        return time.monotonic() - self.started

    def stop(self, signum: int = signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(START_TIMEOUT)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
            self._handle.close()


@pytest.fixture(name="started")
def started_fixture() -> Iterator[list[Started]]:
    running: list[Started] = []
    yield running
    for program in running:
        if program.process.poll() is None:
            program.stop(signal.SIGTERM)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_built_program_answers_version(linux_build: LinuxBuild) -> None:
    started = time.monotonic()
    out = subprocess.run(
        [str(linux_build.executable), "--version"], capture_output=True, text=True, timeout=60
    )
    print(f"\n`fluidity --version` took {time.monotonic() - started:.2f} s")
    assert out.returncode == 0 and out.stdout == f"fluidity {__version__}\n"
    for sub, prog in (("agent", "fluidity-agent"), ("server", "fluidity-server")):
        out = subprocess.run(
            [str(linux_build.executable), sub, "--version"], capture_output=True, text=True, timeout=60
        )
        assert out.stdout.strip() == f"{prog} {__version__}"
    out = subprocess.run([str(linux_build.executable), "nope"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown command 'nope'" in out.stderr


@pytest.mark.slow
def test_bundle_fits_the_budget_and_leaves_gtk_to_the_desktop(linux_build: LinuxBuild) -> None:
    size = build_script.folder_size(linux_build.bundle)
    print(f"\nLinux bundle: {size / 1e6:.1f} MB unpacked (budget {SIZE_BUDGET / 1e6:.0f} MB)")
    assert size <= SIZE_BUDGET
    internal = linux_build.bundle / "_internal"
    assert list((internal / "gi").glob("_gi.*.so")), "PyGObject's module is bundled"
    gui_libraries = [
        path.name for path in internal.iterdir() if bundle_contents.is_system_gui_library(path.name)
    ]
    assert gui_libraries == []
    assert not (internal / "gi_typelibs").exists()
    services = {path.name for path in (internal / "botocore" / "data").iterdir() if path.is_dir()}
    assert services == bundle_contents.BOTOCORE_SERVICES
    assert (internal / "assets" / "tray-connected-64.png").is_file()


@pytest.mark.slow
def test_built_local_default_proxies_curl(
    linux_build: LinuxBuild, tmp_path: Path, started: list[Started]
) -> None:
    """``fluidity local``: the bundle starts itself as the server (``fluidity server``) and the proxy."""
    server_port, proxy_port = free_port(), free_port()
    config = _agent_config(tmp_path, server_port=server_port, listen_port=proxy_port)
    with OriginServer() as origin:
        local = Started(
            [str(linux_build.executable), "local", "--config", str(config)], _user_env(tmp_path / "home"),
            tmp_path / "local.log",
        )  # fmt: skip
        started.append(local)
        ready = local.wait_for("Fluidity proxy ready on")
        print(f"\n`fluidity local` (certificates, server child, tunnel, proxy) ready in {ready:.2f} s")
        reply = curl(f"http://127.0.0.1:{proxy_port}", origin.url("/echo/bundle"))
        assert reply.returncode == 0, reply.stderr
        assert b'"path": "/echo/bundle"' in reply.stdout
        assert (tmp_path / "certs" / "client.key").stat().st_mode & 0o777 == 0o600
        assert local.stop(signal.SIGINT) == 0
    assert not _port_open(server_port), "the server child stopped with the proxy"
    assert "local server stopped" in local.output()


@pytest.mark.slow
def test_built_agent_with_built_server(
    linux_build: LinuxBuild, tmp_path: Path, started: list[Started]
) -> None:
    exe = str(linux_build.executable)
    env = _user_env(tmp_path / "home")
    certs = tmp_path / "certs"
    made = subprocess.run(
        [exe, "certs", "init", "--dir", str(certs)], env=env, capture_output=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    server_port, proxy_port = free_port(), free_port()
    server = Started(
        [exe, "server", "--listen-address", "127.0.0.1", "--listen-port", str(server_port),
         "--allow-networks", "127.0.0.0/8", "--ca-file", str(certs / "ca.crt"),
         "--cert-file", str(certs / "server.crt"), "--key-file", str(certs / "server.key"),
         "--no-emit-metrics"],
        env, tmp_path / "server.log",
    )  # fmt: skip
    started.append(server)
    wait_until(lambda: _port_open(server_port), START_TIMEOUT, "the built server listens")
    agent = Started(
        [exe, "agent", "--lifecycle", "static", "--server-address", "127.0.0.1",
         "--server-port", str(server_port), "--listen-port", str(proxy_port),
         "--ca-file", str(certs / "ca.crt"), "--cert-file", str(certs / "client.crt"),
         "--key-file", str(certs / "client.key")],
        env, tmp_path / "agent.log",
    )  # fmt: skip
    started.append(agent)
    ready = agent.wait_for("proxy ready")
    print(f"\n`fluidity agent` (static server) connected and proxy ready in {ready:.2f} s")
    with OriginServer() as origin:
        reply = curl(f"http://127.0.0.1:{proxy_port}", origin.url("/echo/agent"))
    assert reply.returncode == 0 and b'"path": "/echo/agent"' in reply.stdout, reply.stderr
    assert agent.stop(signal.SIGTERM) == 0
    assert server.stop(signal.SIGTERM) == 0


@pytest.mark.slow
def test_tarball_unpacks_to_a_working_program(linux_build: LinuxBuild, tmp_path: Path) -> None:
    top = f"fluidity-{__version__}"
    with tarfile.open(linux_build.tarball) as tar:
        members = {member.name: member for member in tar.getmembers()}
        executable = members[f"{top}/fluidity"]
        assert executable.mode & 0o755 == 0o755 and executable.uname == "root"
        assert all(name == top or name.startswith(f"{top}/") for name in members)
        tar.extractall(tmp_path, filter="tar")
    out = subprocess.run(
        [str(tmp_path / top / "fluidity"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.stdout == f"fluidity {__version__}\n"


def _dpkg_prefix() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("fakeroot"):
        return ["fakeroot"]
    pytest.skip("installing into a temporary root needs root or fakeroot")


def _dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        *_dpkg_prefix(), "dpkg", f"--root={root}", "--log=/dev/null", "--force-script-chrootless",
        "--force-not-root", "--no-triggers", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_deb_metadata(linux_build: LinuxBuild) -> None:
    info = subprocess.run(
        ["dpkg-deb", "--field", str(linux_build.deb)], capture_output=True, text=True, check=True
    )
    fields = dict(re.findall(r"^([\w-]+): (.*)$", info.stdout, re.M))
    assert fields["Package"] == "fluidity" and fields["Version"] == __version__
    depends = fields["Depends"]
    assert re.search(r"libc6 \(>= 2\.\d+\)", depends)
    for needed in ("gir1.2-gtk-3.0", "libgirepository-1.0-1", "gir1.2-ayatanaappindicator3-0.1 | "):
        assert needed in depends
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(linux_build.deb)], capture_output=True, text=True, check=True
    )
    paths = {line.split()[5].removeprefix(".") for line in listing.stdout.splitlines()}
    expected = {
        "/opt/fluidity/fluidity",
        "/usr/bin/fluidity",
        "/usr/share/applications/fluidity.desktop",
        *(f"/usr/bin/{command}" for command in bundle_contents.PROGRAM_COMMANDS),
        *(f"/usr/share/icons/hicolor/{size}x{size}/apps/fluidity.png" for size in SIZES),
    }
    assert expected <= paths
    assert all(line.split()[1] == "root/root" for line in listing.stdout.splitlines())


@pytest.mark.slow
def test_deb_installs_and_purges_cleanly(linux_build: LinuxBuild, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for folder in ("info", "updates", "triggers"):
        (root / "var" / "lib" / "dpkg" / folder).mkdir(parents=True)
    for name in ("status", "available"):
        (root / "var" / "lib" / "dpkg" / name).touch()
    # The temporary root has no libc6 or GTK packages registered; the host provides them.
    installed = _dpkg(root, "--force-depends", "--install", str(linux_build.deb))
    assert installed.returncode == 0, installed.stderr
    desktop_file = root / "usr" / "share" / "applications" / "fluidity.desktop"
    if shutil.which("desktop-file-validate"):
        valid = subprocess.run(["desktop-file-validate", str(desktop_file)], capture_output=True, text=True)
        assert valid.returncode == 0 and not valid.stdout.strip(), valid.stdout
    out = subprocess.run(
        [str(root / "opt" / "fluidity" / "fluidity"), "--version"], capture_output=True, text=True
    )
    assert out.stdout == f"fluidity {__version__}\n"
    assert os.readlink(root / "usr" / "bin" / "fluidity") == "/opt/fluidity/fluidity"
    assert (root / "usr" / "bin" / "fluidity-agent").read_text() == linux_packages.launcher_script("agent")
    # A file the package did not ship (as if written there later) must not survive removal either.
    (root / "opt" / "fluidity" / "stray.txt").write_text("x")

    purged = _dpkg(root, "--purge", "fluidity")
    assert purged.returncode == 0, purged.stderr
    left = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if not path.is_relative_to(root / "var" / "lib" / "dpkg")
    )
    assert left == ["var", "var/lib"]


# ============================================================================ the built tray (slow, display)


@pytest.mark.slow
@pytest.mark.display
def test_built_tray_shows_its_icon_with_the_desktops_gtk(
    linux_build: LinuxBuild, tmp_path: Path, started: list[Started]
) -> None:
    from tray_fixtures import display_session, missing_display_tools

    missing = missing_display_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    exe = str(linux_build.executable)
    env = _user_env(tmp_path / "home")
    certs = tmp_path / "certs"
    subprocess.run(
        [exe, "certs", "init", "--dir", str(certs)], env=env, capture_output=True, timeout=60, check=True
    )
    config = _agent_config(
        tmp_path,
        lifecycle="static",
        server_address="127.0.0.1",
        server_port=free_port(),
        listen_port=free_port(),
    )
    with display_session() as session:
        empty = session.tray_area(tmp_path / "before.png")
        tray = Started([exe, "--config", str(config)], {**env, **session.env}, tmp_path / "tray.log")
        started.append(tray)

        def icon_docked() -> bool:
            assert tray.process.poll() is None, tray.output()[-3000:]
            return session.tray_area(tmp_path / "now.png").tobytes() != empty.tobytes()

        wait_until(icon_docked, START_TIMEOUT, "the tray icon appears")
        seconds = time.monotonic() - tray.started
        print(f"\nbuilt tray: icon docked {seconds:.2f} s after start (screenshot polling included)")
        maps = Path(f"/proc/{tray.process.pid}/maps").read_text()
        gtk = {line.split()[-1] for line in maps.splitlines() if "libgtk-3.so" in line}
        assert gtk and not any(str(linux_build.bundle) in path for path in gtk), gtk
        assert tray.stop(signal.SIGTERM) == 0, tray.output()[-3000:]
