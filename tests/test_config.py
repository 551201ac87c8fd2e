"""Settings loading: precedence, parsing, errors users see, and the shipped configs/*.yaml."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from desktop.config import (
    AgentConfig,
    default_agent_config_path,
    default_log_path,
    load_agent_config,
)
from server.config import ServerConfig, load_server_config
from server.config_loader import (
    ConfigError,
    FieldError,
    Settings,
    add_arguments,
    default_cert_dir,
    load,
    load_from_args,
    overrides_from_args,
    setting,
    without_settings_env,
)
from server.durations import format_duration, parse_duration

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
LAMBDA_ENV = {
    "FLUIDITY_API_URL": "https://abc123.execute-api.eu-west-1.amazonaws.com/prod",
    "FLUIDITY_API_KEY": "s3cr3t-api-key-value",
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_error(cls: type[Settings], path: Path | None, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load(cls, path, **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("1h0m5s", 3605.0),
        ("1.5s", 1.5),
        ("90", 90.0),
        ("0.5", 0.5),
        (" 20s ", 20.0),
        ("0s", 0.0),
        (45, 45.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_accepts(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["-5s", "-5", "abc", "", "5x", "s", "1m30", "1.5.2s", "1 m", "10S", "inf", "nan", -1, float("nan"), True],
)
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="expected a duration like"):
        parse_duration(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.25, "250ms"), (10, "10s"), (60, "1m"), (90, "1m30s"), (3600, "1h"), (3601.5, "1h1.5s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**10))
def test_format_duration_round_trips_to_the_millisecond(millis: int) -> None:
    assert parse_duration(format_duration(millis / 1000)) == pytest.approx(millis / 1000, abs=1e-6)


def test_format_duration_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_duration(-1)


# --------------------------------------------------------------------------- precedence

PRECEDENCE_CASES = [
    # key, default, file text, file value, env text, env value, flag value, flag result
    ("listen_port", 8443, "9000", 9000, "9001", 9001, "9002", 9002),
    ("connect_timeout", 10.0, '"20s"', 20.0, "1m", 60.0, "250ms", 0.25),
    ("emit_metrics", False, "true", True, "no", False, True, True),
    ("allow_ports", [], "[80, 443]", [80, 443], "22,8080", [22, 8080], "1", [1]),
    ("allow_networks", [], '["10.0.0.0/8"]', ["10.0.0.0/8"],
     "::1/128, 192.168.1.7/24", ["::1/128", "192.168.1.0/24"], "", []),
    ("aws_region", None, "eu-west-1", "eu-west-1", "us-east-1", "us-east-1", "ap-south-1", "ap-south-1"),
    ("log_level", "info", "debug", "debug", "WARNING", "warning", "error", "error"),
    ("metrics_namespace", "Fluidity", "FromFile", "FromFile", "FromEnv", "FromEnv", "FromFlag", "FromFlag"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "default", "file_text", "file_value", "env_text", "env_value", "flag", "flag_value"),
    PRECEDENCE_CASES,
)
def test_flag_beats_env_beats_file_beats_default(
    tmp_path: Path,
    key: str,
    default: object,
    file_text: str,
    file_value: object,
    env_text: str,
    env_value: object,
    flag: object,
    flag_value: object,
) -> None:
    path = write(tmp_path / "server.yaml", f"{key}: {file_text}\n")
    env_var = "FLUIDITY_" + key.upper()
    assert getattr(load(ServerConfig, None, env={}), key) == default
    assert getattr(load(ServerConfig, path, env={}), key) == file_value
    assert getattr(load(ServerConfig, path, env={env_var: env_text}), key) == env_value
    from_flag = load(ServerConfig, path, env={env_var: env_text}, overrides={key: flag})
    assert getattr(from_flag, key) == flag_value
    # A flag that was not given (None) does not hide the environment.
    assert getattr(load(ServerConfig, path, env={env_var: env_text}, overrides={key: None}), key) == env_value


def test_flags_parsed_by_argparse_override_file_and_env(tmp_path: Path) -> None:
    path = write(tmp_path / "s.yaml", "listen_port: 9000\nemit_metrics: true\nshutdown_grace: 5s\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, ServerConfig)
    args = parser.parse_args(["--config", str(path), "--listen-port", "9100", "--no-emit-metrics"])
    assert args.max_payload is None  # not given means "not given", never the default
    assert overrides_from_args(args, ServerConfig) == {"listen_port": "9100", "emit_metrics": False}
    config = load_from_args(
        ServerConfig, args, env={"FLUIDITY_LISTEN_PORT": "9050", "FLUIDITY_SHUTDOWN_GRACE": "7s"}
    )
    assert (config.listen_port, config.emit_metrics, config.shutdown_grace) == (9100, False, 7.0)


def test_help_lists_every_setting_with_its_default_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="fluidity-agent")
    add_arguments(parser, AgentConfig)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for spec_flag in (
        "--config PATH",
        "--listen-port PORT",
        "--connection-timeout DURATION",
        "--no-kill-on-disconnect",
    ):
        assert spec_flag in text
    assert "default 1m30s; env FLUIDITY_CONNECTION_TIMEOUT" in text
    assert "{static,local,lambda,ecs}" in text


def test_environment_is_read_from_os_environ_and_only_fluidity_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLUIDITY_LISTEN_PORT", "9443")
    monkeypatch.setenv("LISTEN_PORT", "1")
    monkeypatch.setenv("FLUIDITY_SOMETHING_ELSE", "ignored")
    assert load(ServerConfig, None).listen_port == 9443
    assert load(ServerConfig, None, env={"LISTEN_PORT": "1"}).listen_port == 8443


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("1", True), ("yes", True), ("on", True), ("TRUE", True),
     ("false", False), ("0", False), ("no", False), ("off", False), ("Off", False)],
)  # fmt: skip
def test_environment_booleans(text: str, value: bool) -> None:
    assert load(ServerConfig, None, env={"FLUIDITY_EMIT_METRICS": text}).emit_metrics is value


def test_empty_environment_variable_clears_an_optional_setting(tmp_path: Path) -> None:
    path = write(tmp_path / "s.yaml", "aws_region: eu-west-1\nallow_ports: [443]\n")
    config = load(ServerConfig, path, env={"FLUIDITY_AWS_REGION": "", "FLUIDITY_ALLOW_PORTS": ""})
    assert (config.aws_region, config.allow_ports) == (None, [])


# --------------------------------------------------------------------------- errors users see


def test_unknown_key_names_the_file_and_key_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.yaml", "server_address: 10.0.0.1\nlisten_prot: 8080\n")
    assert load_error(AgentConfig, path) == f"{path}: listen_prot: unknown setting; did you mean listen_port?"
    path = write(tmp_path / "other.yaml", "colour: blue\n")
    assert load_error(AgentConfig, path) == f"{path}: colour: unknown setting"


def test_unknown_override_is_an_error() -> None:
    assert "did you mean emit_metrics?" in load_error(ServerConfig, None, overrides={"emit_metric": True})


@pytest.mark.parametrize(
    ("yaml_line", "expected"),
    [
        ("server_port: abc", "server_port: expected an integer 1..65535, got 'abc'"),
        ("server_port: 70000", "server_port: expected an integer 1..65535, got 70000"),
        ("server_port: 0", "server_port: expected an integer 1..65535, got 0"),
        ("server_port: 84.43", "server_port: expected an integer 1..65535, got 84.43"),
        ("listen_port: -1", "listen_port: expected an integer 0..65535, got -1"),
        ("connection_timeout: -5s", "connection_timeout: expected a duration like"),
        ("connection_timeout: soon", "connection_timeout: expected a duration like"),
        ("connection_timeout: 0s", "connection_timeout: must be a positive duration, got 0s"),
        ("kill_on_disconnect: maybe", "kill_on_disconnect: expected true or false"),
        ("lifecycle: cloud", "lifecycle: expected one of static, local, lambda, ecs, got 'cloud'"),
        ("log_level: verbose", "log_level: expected one of debug, info, warning, error"),
        ("server_name: 123", "server_name: expected text, got 123; put it in quotes"),
        ("server_name:", "server_name: has no value"),
        ("max_payload: 512", "max_payload: expected an integer 1024..16777216, got 512"),
        ("initial_window: 4096", "initial_window: must be at least max_payload (65536), got 4096"),
        ("keepalive_timeout: 5s", "keepalive_timeout: must be longer than keepalive_interval (10s)"),
        ("connection_timeout: 5s", "connection_timeout: must be at least connect_timeout (10s)"),
        ("ca_file: ''", "ca_file: expected a path"),
        ("api_url: ftp://example.com", "api_url: expected an http:// or https:// URL"),
    ],
)
def test_bad_value_names_file_and_key(tmp_path: Path, yaml_line: str, expected: str) -> None:
    path = write(tmp_path / "agent.yaml", f"server_address: 10.0.0.1\n{yaml_line}\n")
    message = load_error(AgentConfig, path)
    assert message.startswith(f"{path}: {expected}")


def test_bad_server_values(tmp_path: Path) -> None:
    path = write(tmp_path / "server.yaml", "allow_networks: [10.0.0.0/8, not-a-network]\n")
    assert load_error(ServerConfig, path) == (
        f"{path}: allow_networks: item 2: expected a network like 10.0.0.0/8 or ::1/128, got 'not-a-network'"
    )
    path = write(tmp_path / "server.yaml", "allow_ports: [443, 99999]\n")
    assert (
        load_error(ServerConfig, path)
        == f"{path}: allow_ports: item 2: expected an integer 1..65535, got 99999"
    )
    path = write(tmp_path / "server.yaml", "allow_ports: 443\n")
    assert load_error(ServerConfig, path) == f"{path}: allow_ports: expected a list, got 443"


def test_bad_environment_and_flag_values_name_their_source() -> None:
    message = load_error(ServerConfig, None, env={"FLUIDITY_LISTEN_PORT": "abc"})
    assert (
        message
        == "environment variable FLUIDITY_LISTEN_PORT: listen_port: expected an integer 0..65535, got 'abc'"
    )
    message = load_error(ServerConfig, None, env={"FLUIDITY_EMIT_METRICS": "perhaps"})
    assert message.startswith(
        "environment variable FLUIDITY_EMIT_METRICS: emit_metrics: expected true or false"
    )
    message = load_error(ServerConfig, None, overrides={"agent_timeout": "forever"})
    assert message.startswith("command-line flag --agent-timeout: agent_timeout: expected a duration like")


def test_bad_file_value_is_irrelevant_when_overridden(tmp_path: Path) -> None:
    path = write(tmp_path / "s.yaml", "listen_port: abc\n")
    assert load(ServerConfig, path, env={"FLUIDITY_LISTEN_PORT": "9000"}).listen_port == 9000


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "is empty; expected settings as `key: value` lines"),
        ("# only a comment\n", "is empty; expected settings as `key: value` lines"),
        ("- listen_port\n- 8443\n", "expected settings as `key: value` lines, got a list"),
        ("just text\n", "expected settings as `key: value` lines, got a str"),
        ("listen_port: [1, 2\n", "is not valid YAML (line 2, column 1:"),
        ("listen_port: 1\nlisten_port: 2\n",
         "is not valid YAML (line 2, column 1: setting 'listen_port' is given more than once)"),
        ("1: x\n", "1: setting names must be text"),
    ],
)  # fmt: skip
def test_malformed_file_names_the_file(tmp_path: Path, content: str, expected: str) -> None:
    path = write(tmp_path / "server.yaml", content)
    assert load_error(ServerConfig, path).startswith(f"{path}: {expected}")


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert load_error(ServerConfig, missing) == f"{missing}: no such file"
    assert load_error(ServerConfig, tmp_path) == f"{tmp_path}: is a directory, not a settings file"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"listen_port: \xff\xfe\n")
    assert load_error(ServerConfig, binary) == f"{binary}: is not UTF-8 text"


def test_lifecycle_requirements_name_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.yaml", "lifecycle: lambda\n")
    message = load_error(AgentConfig, path)
    assert message.startswith(f"{path}: api_url: lifecycle 'lambda' needs the control-plane URL")
    assert "FLUIDITY_API_URL" in message
    path = write(tmp_path / "agent.yaml", "lifecycle: lambda\napi_url: https://api.example.com/prod\n")
    assert load_error(AgentConfig, path).startswith(
        f"{path}: api_key: lifecycle 'lambda' needs the control-plane API key"
    )
    path = write(tmp_path / "agent.yaml", "lifecycle: static\nlisten_port: 8081\n")
    assert load_error(AgentConfig, path) == (
        f"{path}: server_address: lifecycle 'static' needs the server's host name or IP"
    )
    assert load_error(AgentConfig, None, env={}).startswith("settings (no config file): server_address:")
    for lifecycle in ("local", "ecs"):
        assert load(AgentConfig, None, env={"FLUIDITY_LIFECYCLE": lifecycle}).lifecycle == lifecycle


@pytest.mark.parametrize(
    ("lifecycle", "setting_value", "expected"),
    [("lambda", None, True), ("ecs", None, True), ("local", None, False), ("static", None, False),
     ("lambda", False, False), ("static", True, True)],
)  # fmt: skip
def test_effective_kill_on_disconnect(lifecycle: str, setting_value: bool | None, expected: bool) -> None:
    config = AgentConfig(
        lifecycle=lifecycle,  # type: ignore[arg-type]
        server_address="10.0.0.1",
        api_url="https://api.example.com/prod",
        api_key="k",
        kill_on_disconnect=setting_value,
    )
    assert config.effective_kill_on_disconnect() is expected


def test_warnings_are_logged_with_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "server.yaml", "shutdown_grace: 45s\n")
    with caplog.at_level(logging.WARNING, logger="server.config_loader"):
        assert load(ServerConfig, path, env={}).shutdown_grace == 45.0
        load(AgentConfig, None, env={"FLUIDITY_SERVER_ADDRESS": "h", "FLUIDITY_LISTEN_ADDRESS": "0.0.0.0"})
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith(f"{path}: shutdown_grace: is 45s; ECS kills the task 30s after SIGTERM")
    assert messages[1].startswith(
        "environment variable FLUIDITY_LISTEN_ADDRESS: listen_address: is '0.0.0.0'"
    )


# --------------------------------------------------------------------------- paths


def test_relative_paths_in_a_file_resolve_against_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(
        tmp_path / "etc" / "conf" / "server.yaml", "ca_file: ../certs/ca.crt\nlog_file: logs/s.log\n"
    )
    config = load(ServerConfig, Path("etc/conf/server.yaml"), env={})
    assert config.ca_file == tmp_path / "etc" / "certs" / "ca.crt"
    assert config.log_file == path.parent / "logs" / "s.log"


def test_relative_paths_from_env_and_flags_resolve_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "conf" / "server.yaml", "cert_file: mine.crt\n")
    monkeypatch.chdir(tmp_path)
    config = load(
        ServerConfig,
        path,
        env={"FLUIDITY_CA_FILE": "certs/ca.crt", "FLUIDITY_CERT_FILE": "env.crt"},
        overrides={"key_file": "keys/server.key", "cert_file": "flag.crt"},
    )
    assert config.ca_file == tmp_path / "certs" / "ca.crt"
    assert config.key_file == tmp_path / "keys" / "server.key"
    assert config.cert_file == tmp_path / "flag.crt"


def test_absolute_and_home_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path / "s.yaml", f"ca_file: {tmp_path / 'abs' / 'ca.crt'}\nkey_file: ~/k.key\n")
    config = load(ServerConfig, path, env={})
    assert config.ca_file == tmp_path / "abs" / "ca.crt"
    assert config.key_file == tmp_path / "home" / "k.key"


def test_default_locations_follow_the_platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_cert_dir() == tmp_path / "data" / "fluidity" / "certs"
    server, agent = ServerConfig(), AgentConfig(server_address="h")
    assert (server.ca_file, server.cert_file, server.key_file) == tuple(
        default_cert_dir() / name for name in ("ca.crt", "server.crt", "server.key")
    )
    assert (agent.ca_file, agent.cert_file, agent.key_file) == tuple(
        default_cert_dir() / name for name in ("ca.crt", "client.crt", "client.key")
    )
    assert default_agent_config_path() == tmp_path / "config" / "fluidity" / "agent.yaml"
    assert default_log_path().name == "fluidity.log"
    assert tmp_path in default_log_path().parents


def test_default_agent_config_file_is_used_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="no config file"):
        load_agent_config(None, env={})
    write(default_agent_config_path(), "server_address: tunnel.example.com\n")
    assert load_agent_config(None, env={}).server_address == "tunnel.example.com"
    explicit = write(tmp_path / "other.yaml", "server_address: other.example.com\n")
    assert load_agent_config(explicit, env={}).server_address == "other.example.com"
    args = argparse.Namespace(config=None)
    assert load_from_args(
        AgentConfig, args, default_path=default_agent_config_path(), env={}
    ).server_address == ("tunnel.example.com")


# --------------------------------------------------------------------------- secrets and direct use


def test_api_key_is_masked_everywhere_it_could_be_printed(tmp_path: Path) -> None:
    config = load(AgentConfig, CONFIGS / "agent.yaml", env=LAMBDA_ENV)
    secret = LAMBDA_ENV["FLUIDITY_API_KEY"]
    assert config.api_key == secret
    for text in (repr(config), str(config), f"{config}", str(config.describe())):
        assert secret not in text
        assert "'***'" in text
    path = write(tmp_path / "agent.yaml", "server_address: h\napi_key: 12345678\n")
    message = load_error(AgentConfig, path)
    assert message == f"{path}: api_key: expected text, got '***'; put it in quotes"
    assert "12345678" not in message
    path = write(tmp_path / "agent.yaml", "server_address: h\napi_key: '<paste the key>'\n")
    assert load_error(AgentConfig, path) == (
        f"{path}: api_key: is still the placeholder: replace it with the real value, or set FLUIDITY_API_KEY"
    )


def test_describe_is_json_friendly() -> None:
    described = load(ServerConfig, CONFIGS / "server.local.yaml").describe()
    assert described["shutdown_grace"] == "5s"
    assert described["allow_networks"] == ["127.0.0.0/8", "::1/128"]
    assert isinstance(described["ca_file"], str)


def test_settings_are_frozen_and_validated_when_built_directly() -> None:
    config = ServerConfig(listen_port=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen_port = 1  # type: ignore[misc]
    with pytest.raises(FieldError, match="listen_port: expected an integer 0..65535, got 70000"):
        ServerConfig(listen_port=70000)
    with pytest.raises(FieldError, match="connect_timeout: expected a duration in seconds, got '10s'"):
        ServerConfig(connect_timeout="10s")  # type: ignore[arg-type]
    with pytest.raises(FieldError, match="initial_window: must be at least max_payload"):
        dataclasses.replace(config, max_payload=4 << 20)


def test_settings_class_must_keep_the_masked_repr() -> None:
    @dataclasses.dataclass(frozen=True)
    class Leaky(Settings):
        token: str = setting("", help="t", secret=True)

    with pytest.raises(TypeError, match="repr=False"):
        Leaky()


def test_without_settings_env_drops_only_fluidity_variables() -> None:
    env = {"PATH": "/bin", "FLUIDITY_LISTEN_PORT": "8080", "HOME": "/h"}
    assert without_settings_env(env) == {"PATH": "/bin", "HOME": "/h"}
    assert "FLUIDITY_X" not in without_settings_env({**os.environ, "FLUIDITY_X": "1"})


# --------------------------------------------------------------------------- the shipped files


def test_every_shipped_config_loads() -> None:
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {path.name for path in files} >= {
        "agent.yaml",
        "agent.local.yaml",
        "server.yaml",
        "server.local.yaml",
    }
    for path in files:
        if path.name.startswith("server"):
            load(ServerConfig, path, env={})
        else:
            load(AgentConfig, path, env=LAMBDA_ENV)


def test_shipped_server_configs_match_the_runbook() -> None:
    cloud = load_server_config(CONFIGS / "server.yaml", env={})
    assert (cloud.listen_address, cloud.listen_port) == ("0.0.0.0", 8443)
    assert (cloud.emit_metrics, cloud.metrics_interval, cloud.shutdown_grace) == (True, 60.0, 20.0)
    assert cloud.ca_file == Path("/etc/fluidity/certs/ca.crt")
    assert (cloud.metrics_namespace, cloud.cluster_name, cloud.service_name) == (
        "Fluidity",
        "fluidity",
        "fluidity-server",
    )
    local = load_server_config(CONFIGS / "server.local.yaml", env={})
    assert (local.listen_address, local.listen_port, local.emit_metrics) == ("127.0.0.1", 8443, False)
    assert local.allow_networks == ["127.0.0.0/8", "::1/128"]
    assert local.cert_file == REPO / "certs" / "server.crt"


def test_shipped_agent_configs() -> None:
    message = load_error(AgentConfig, CONFIGS / "agent.yaml", env={})
    assert message.startswith(f"{CONFIGS / 'agent.yaml'}: api_url: is still the placeholder")
    assert "FLUIDITY_API_URL" in message
    cloud = load_agent_config(CONFIGS / "agent.yaml", env=LAMBDA_ENV)
    assert (cloud.lifecycle, cloud.connection_timeout, cloud.api_url) == (
        "lambda",
        90.0,
        LAMBDA_ENV["FLUIDITY_API_URL"],
    )
    assert cloud.effective_kill_on_disconnect()
    assert cloud.ca_file == REPO / "certs" / "ca.crt"
    assert (
        load_agent_config(
            CONFIGS / "agent.yaml", env={**LAMBDA_ENV, "FLUIDITY_CONNECTION_TIMEOUT": "120s"}
        ).connection_timeout
        == 120.0
    )
    local = load_agent_config(CONFIGS / "agent.local.yaml", env={})
    assert (local.lifecycle, local.server_address, local.listen_address, local.listen_port) == (
        "local",
        "127.0.0.1",
        "127.0.0.1",
        8080,
    )
    assert local.local_server_config == CONFIGS / "server.local.yaml"
    assert load_server_config(local.local_server_config, env={}).listen_address == "127.0.0.1"
