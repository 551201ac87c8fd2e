"""The tunnel server image (server/Dockerfile) and the Makefiles that build it.

No Docker engine runs in the test environment, so the image is checked in two ways: the
Dockerfile and .dockerignore are parsed and held to the rules (multi-stage, non-root, exec
form, nothing secret in the build context), and the build stage's RUN lines are executed for
real into a fresh virtualenv, offline, from wheels of the packages installed here. That venv
must then start the server and pass the image's HEALTHCHECK command.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tunnel_fixtures import Pki, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "server" / "Dockerfile"
REQUIREMENTS = ROOT / "server" / "requirements.txt"
BIN = Path(sys.executable).parent
#: What the desktop app needs and the server image must not carry.
DESKTOP_ONLY = ("pystray", "PIL", "cryptography")


# ----------------------------------------------------------------------------- Dockerfile model


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions (comments dropped, continuation lines joined)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = arguments.split()
            stages.append(Stage(parts[0], parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        else:
            stages[-1].instructions.append(Instruction(keyword, " ".join(arguments.split())))
    return stages


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form instruction (fails the test if it is shell form)."""
    parsed = json.loads(arguments)
    assert isinstance(parsed, list) and all(isinstance(item, str) for item in parsed), arguments
    return parsed


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def test_image_is_multi_stage_on_python_312_slim(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    assert all(stage.base == "python:3.12-slim" for stage in stages)
    assert stages[0].name == "build"


def test_final_stage_runs_the_server_as_non_root_in_exec_form(stages: list[Stage]) -> None:
    final = stages[-1]
    (user,) = final.all("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert final.all("EXPOSE") == ["8443"]
    (entrypoint,) = final.all("ENTRYPOINT")
    assert exec_form(entrypoint) == ["fluidity-server"]
    (command,) = final.all("CMD")
    assert exec_form(command) == ["--config", "/etc/fluidity/server.yaml"]
    (healthcheck,) = final.all("HEALTHCHECK")
    options, _, probe = healthcheck.partition(" CMD ")
    assert all(option.startswith("--") for option in options.split())
    assert exec_form(probe) == ["fluidity-server", "--config", "/etc/fluidity/server.yaml", "--health-check"]
    assert final.all("STOPSIGNAL") == ["SIGTERM"]


def test_final_stage_gets_only_the_venv_and_the_config(stages: list[Stage]) -> None:
    final = stages[-1]
    copies = final.all("COPY")
    assert copies == ["--from=build /opt/venv /opt/venv", "configs/server.yaml /etc/fluidity/server.yaml"]
    for run in final.all("RUN"):
        assert "pip" not in run and "apt-get" not in run  # no installs, so no build tools or caches
    assert any("/opt/venv/bin" in env for env in final.all("ENV"))


def test_pip_never_keeps_a_cache_and_the_venv_has_no_pip(stages: list[Stage]) -> None:
    runs = [run for stage in stages for run in stage.all("RUN")]
    installs = [part for run in runs for part in run.split("&&") if re.search(r"\bpip\b.*\binstall\b", part)]
    assert installs and all("--no-cache-dir" in part for part in installs)
    assert any("python -m venv --without-pip /opt/venv" in run for run in runs)


# ----------------------------------------------------------------------------- build context


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: ``*`` and ``?`` stop at ``/``, ``**`` crosses folders."""
    out = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out += "(?:.*/)?"
            index += 3
        elif pattern.startswith("**", index):
            out += ".*"
            index += 2
        elif pattern[index] == "*":
            out += "[^/]*"
            index += 1
        elif pattern[index] == "?":
            out += "[^/]"
            index += 1
        else:
            out += re.escape(pattern[index])
            index += 1
    return re.compile(out + r"\Z")


def context_files(root: Path) -> list[str]:
    """Files Docker sends as the build context: .dockerignore rules, last match wins.

    A rule matches a path or any of its parent folders, as in Docker's pattern matcher.
    """
    rules = []
    for line in (root / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append(
                (negated, line.lstrip("!").strip("/"), _dockerignore_regex(line.lstrip("!").strip("/")))
            )

    def excluded(relative: str) -> bool:
        parts = relative.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negated, _, regex in rules:
            if any(regex.match(candidate) for candidate in candidates):
                result = not negated
        return result

    def may_reinclude(folder: str) -> bool:
        return any(
            negated and (text.startswith(folder + "/") or text.startswith("*")) for negated, text, _ in rules
        )

    kept: list[str] = []
    for current, folders, files in os.walk(root):
        base = Path(current).relative_to(root).as_posix()
        prefix = "" if base == "." else base + "/"
        # Skip excluded folders (.venv, .git, ...) unless a ! rule could bring back a file inside.
        folders[:] = sorted(f for f in folders if not excluded(prefix + f) or may_reinclude(prefix + f))
        kept.extend(prefix + name for name in sorted(files) if not excluded(prefix + name))
    return sorted(kept)


@pytest.fixture(scope="module")
def context() -> list[str]:
    return context_files(ROOT)


def test_build_context_holds_no_keys_venv_or_history(context: list[str]) -> None:
    tops = {path.split("/")[0] for path in context}
    assert tops <= {"pyproject.toml", "README.md", "server", "desktop", "lambdas", "configs"}
    assert [p for p in context if p.startswith("configs/")] == ["configs/server.yaml"]
    assert not [p for p in context if p.endswith((".key", ".pem", ".crt")) or "__pycache__" in p]
    assert "server/main.py" in context and "server/requirements.txt" in context


def test_every_copied_path_is_in_the_build_context(stages: list[Stage], context: list[str]) -> None:
    for stage in stages:
        for copy in stage.all("COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _ = copy.split()
            for source in sources:
                assert any(p == source or p.startswith(source.rstrip("/") + "/") for p in context), source


def test_requirements_cover_every_third_party_import_of_the_server() -> None:
    required = _dependency_closure(requirement_lines())  # botocore comes with boto3, for example
    providers = importlib.metadata.packages_distributions()
    imported: set[str] = set()
    for source in (ROOT / "server").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "server"}
    needed = {canonicalize_name(dist) for name in third_party for dist in providers.get(name, [name])}
    assert needed <= required, f"server imports {sorted(needed - required)} missing from {REQUIREMENTS.name}"
    assert not {canonicalize_name(n) for n in ("pystray", "pillow", "cryptography")} & required
    assert {canonicalize_name(Requirement(line).name) for line in requirement_lines()} == {
        "boto3",
        "pyyaml",
        "platformdirs",
    }


def requirement_lines() -> list[str]:
    lines = []
    for raw in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


# ----------------------------------------------------------------------------- Makefiles


@pytest.mark.parametrize("makefile", ["Makefile", "Makefile.linux", "Makefile.macos", "Makefile.win"])
def test_make_docker_build_server_builds_the_image_for_fargate(makefile: str) -> None:
    shown = subprocess.run(
        ["make", "-n", "-f", makefile, "docker-build-server"],
        capture_output=True, text=True, cwd=ROOT, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip
    assert shown == "docker build --platform linux/amd64 -f server/Dockerfile -t fluidity-server:latest ."


def test_make_local_targets_use_the_project_venv_and_local_configs(tmp_path: Path) -> None:
    """In a checkout without certificates, run-server-local makes them first."""
    for name in ("Makefile", "Makefile.linux", "Makefile.win"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").touch()
    (tmp_path / ".venv" / "Scripts").mkdir(parents=True)
    (tmp_path / ".venv" / "Scripts" / "python.exe").touch()

    def dry_run(makefile: str, target: str) -> list[str]:
        return subprocess.run(
            ["make", "-n", "-f", makefile, target], capture_output=True, text=True, cwd=tmp_path, timeout=30,
            check=True,
        ).stdout.splitlines()  # fmt: skip

    assert dry_run("Makefile.linux", "run-server-local") == [
        ".venv/bin/fluidity-certs init --dir certs",
        ".venv/bin/fluidity-server --config configs/server.local.yaml",
    ]
    assert dry_run("Makefile.win", "run-agent-local")[-1] == (
        ".venv/Scripts/fluidity-agent --config configs/agent.local.yaml"
    )
    assert dry_run("Makefile.linux", "test") == [".venv/bin/python -m pytest "]
    assert dry_run("Makefile.linux", "deploy") == [".venv/bin/fluidity-deploy deploy "]
    assert dry_run("Makefile.linux", "destroy") == [".venv/bin/fluidity-deploy destroy "]
    assert ".venv/bin/cfn-lint server/cloudformation.yaml lambdas/cloudformation.yaml" in dry_run(
        "Makefile.linux", "lint"
    )
    (tmp_path / ".venv").rename(tmp_path / "elsewhere")  # no venv: tools come from PATH
    assert (
        dry_run("Makefile.linux", "run-agent-local")[-1] == "fluidity-agent --config configs/agent.local.yaml"
    )


@pytest.mark.parametrize("makefile", ["Makefile.linux", "Makefile.macos", "Makefile.win"])
def test_every_make_target_the_runbook_names_exists_for_each_os(makefile: str) -> None:
    for target in ("run-server-local", "run-agent-local", "docker-build-server", "build", "doctor"):
        subprocess.run(
            ["make", "-n", "-f", makefile, target],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
            check=True,
        )


@pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "fluidity-agent").exists(), reason="needs the project's .venv"
)
def test_make_build_makes_the_runbooks_first_command_work(tmp_path: Path) -> None:
    """`./build/fluidity-agent --config ./configs/agent.yaml` after one `make build`."""
    out = tmp_path / "build"
    subprocess.run(
        ["make", "build", f"BUILD_DIR={out}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUIDITY_")}
    for name in ("fluidity-agent", "fluidity-server"):
        shown = subprocess.run(
            [str(out / name), "--version"], capture_output=True, text=True, timeout=60, check=True, env=env
        )
        assert shown.stdout.strip() == f"{name} 0.1.0"
    first = subprocess.run(
        [str(out / "fluidity-agent"), "--config", "./configs/agent.yaml"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert first.returncode == 2  # it runs, and says what to fill in before it can connect
    assert "api_url: is still the placeholder" in first.stderr


def test_windows_launchers_have_a_cmd_twin_for_powershell(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "installer"))
    try:
        import launchers
    finally:
        sys.path.pop(0)
    scripts = tmp_path / "Scripts"
    scripts.mkdir()
    for name in launchers.PROGRAMS:
        (scripts / f"{name}.exe").touch()
    written = launchers.write_launchers(tmp_path / "build", str(scripts), windows=True)
    twin = (tmp_path / "build" / "fluidity-agent.cmd").read_bytes().decode("utf-8")
    assert twin.endswith(
        f'"{(scripts / "fluidity-agent.exe").resolve().as_posix().replace("/", chr(92))}" %*\r\n'
    )
    assert len(written) == 2 * len(launchers.PROGRAMS)
    with pytest.raises(SystemExit, match="install Fluidity first"):
        launchers.write_launchers(tmp_path / "b2", str(tmp_path / "nowhere"), windows=False)


# ----------------------------------------------------------------------------- fresh venv (slow)


def _dependency_closure(requirements: list[str]) -> set[str]:
    """Installed distributions that ``requirements`` pull in (markers evaluated, no extras)."""
    environment = {str(key): str(value) for key, value in default_environment().items()} | {"extra": ""}
    found: set[str] = set()
    pending = [Requirement(r) for r in requirements]
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found.add(name)
        pending.extend(Requirement(r) for r in importlib.metadata.distribution(name).requires or [])
    return found


def _repack_as_wheel(name: str, wheelhouse: Path) -> None:
    """Rebuild the wheel an installed distribution came from, using its RECORD and WHEEL tags."""
    dist = importlib.metadata.distribution(name)
    tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")]  # fmt: skip
    project = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    # Compressed tag set, e.g. py2.py3-none-any, as in the original wheel's file name.
    columns = zip(*(tag.split("-") for tag in tags), strict=True)
    tag_set = "-".join(".".join(dict.fromkeys(column)) for column in columns)
    target = wheelhouse / f"{project}-{dist.version}-{tag_set}.whl"
    record_name = ""
    records = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for file in dist.files or []:
            parts = file.parts
            if parts[0] == ".." or "__pycache__" in parts:
                continue  # scripts are regenerated by pip; bytecode is recompiled
            if parts[-1] in ("INSTALLER", "REQUESTED", "direct_url.json"):
                continue
            if parts[-1] == "RECORD" and parts[0].endswith(".dist-info"):
                record_name = file.as_posix()
                continue
            source = Path(str(dist.locate_file(file)))
            if not source.is_file():
                continue
            data = source.read_bytes()
            archive.writestr(file.as_posix(), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{file.as_posix()},sha256={digest},{len(data)}")
        archive.writestr(record_name, "\n".join([*records, f"{record_name},,"]) + "\n")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of everything the Dockerfile's pip lines need, so they run without the internet."""
    house = tmp_path_factory.mktemp("wheelhouse")
    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"][
        "requires"
    ]
    missing = []
    for name in sorted(_dependency_closure(requirement_lines())):
        _repack_as_wheel(name, house)
    for requirement in build_requires:
        try:
            installed = importlib.metadata.version(Requirement(requirement).name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if not Requirement(requirement).specifier.contains(installed, prereleases=True):
            missing.append(f"{requirement} (installed: {installed})")
    assert not missing, f"install the build requirements {missing} in the test environment to build offline"
    for name in _dependency_closure(build_requires):
        _repack_as_wheel(name, house)
    return house


@dataclass
class FreshVenv:
    path: Path

    @property
    def bin(self) -> Path:
        return self.path / "bin"


def _install_env(wheelhouse: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PIP_NO_INDEX="1",
        PIP_FIND_LINKS=str(wheelhouse),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return env


@pytest.fixture(scope="module")
def image_venv(
    stages: list[Stage], context: list[str], wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FreshVenv]:
    """Run the build stage's RUN lines, as written, in a copy of the build context."""
    if not (ROOT / "server" / "main.py").exists():
        pytest.skip("server/main.py (the fluidity-server entry point) is not written yet")
    base = tmp_path_factory.mktemp("image")
    workdir = base / "src"
    for relative in context:
        (workdir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, workdir / relative)
    venv = FreshVenv(base / "venv")
    env = _install_env(wheelhouse)
    for run in stages[0].all("RUN"):
        command = run.replace("/opt/venv", str(venv.path))
        result = subprocess.run(
            ["/bin/sh", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"RUN {run}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    yield venv


@pytest.mark.slow
def test_fresh_image_venv_has_the_server_and_nothing_of_the_desktop(image_venv: FreshVenv) -> None:
    help_text = subprocess.run(
        [str(image_venv.bin / "fluidity-server"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "--config" in help_text
    probe = (
        "import importlib.util, json; import boto3, yaml, platformdirs, server.main, server.metrics, "
        "server.tunnel_server; "
        f"print(json.dumps([m for m in {list(DESKTOP_ONLY)!r} if importlib.util.find_spec(m)]))"
    )
    result = subprocess.run(
        [str(image_venv.bin / "python"), "-I", "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assert not (image_venv.bin / "pip").exists()


@pytest.mark.slow
def test_fresh_image_venv_starts_the_server_and_passes_the_healthcheck(
    image_venv: FreshVenv, stages: list[Stage], pki: Pki, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        "PATH": f"{image_venv.bin}{os.pathsep}/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FLUIDITY_LISTEN_ADDRESS": "127.0.0.1",
        "FLUIDITY_LISTEN_PORT": str(port),
        "FLUIDITY_CA_FILE": str(pki.path("ca.crt")),
        "FLUIDITY_CERT_FILE": str(pki.path("server.crt")),
        "FLUIDITY_KEY_FILE": str(pki.path("server.key")),
        "FLUIDITY_EMIT_METRICS": "false",
        "FLUIDITY_SHUTDOWN_GRACE": "1s",
        "FLUIDITY_HEARTBEAT_FILE": str(tmp_path / "heartbeat"),
    }
    # The image's config file, where the image has it; the environment overrides the rest.
    config = str(ROOT / "configs" / "server.yaml")
    (healthcheck,) = stages[-1].all("HEALTHCHECK")
    probe = [
        part.replace("/etc/fluidity/server.yaml", config)
        for part in exec_form(healthcheck.partition(" CMD ")[2])
    ]
    (command,) = stages[-1].all("CMD")
    args = [part.replace("/etc/fluidity/server.yaml", config) for part in exec_form(command)]
    assert subprocess.run(probe, env=env, capture_output=True, timeout=10, check=False).returncode == 1
    log = tmp_path / "server.log"
    with log.open("w") as log_file:
        server = subprocess.Popen(
            ["fluidity-server", *args], env=env, stdout=log_file, stderr=log_file, cwd=tmp_path
        )
    try:
        healthy = False
        for _ in range(100):  # hang guard: about 10 s for the listener to come up
            if server.poll() is not None:
                break
            if subprocess.run(probe, env=env, capture_output=True, timeout=10, check=False).returncode == 0:
                healthy = True
                break
            try:
                server.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
        assert healthy, f"server exit code {server.poll()}, log:\n{log.read_text()}"
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
