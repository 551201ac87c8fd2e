"""Typed settings from defaults, a YAML file, FLUIDITY_* environment variables and flags.

Why one loader: the agent and the server need the same precedence rules
(flag > environment > file > default) and the same errors that say which key, in which
file, was wrong. A settings class is a frozen dataclass deriving from ``Settings``; each
default is written once, in that dataclass, and per-field metadata ("kind", "help")
tells the loader how to parse text and what to print in ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import ipaddress
import logging
import math
import os
import re
import textwrap
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import platformdirs

from server.durations import format_duration, parse_duration
from server.errors import FluidityError

if TYPE_CHECKING:
    import yaml

APP_NAME = "fluidity"
ENV_PREFIX = "FLUIDITY_"
#: How a secret is shown anywhere it could be printed (repr, logs, error messages).
MASK = "***"

_log = logging.getLogger(__name__)

S = TypeVar("S", bound="Settings")


def default_cert_dir() -> Path:
    """Where ``fluidity-certs`` writes and both programs look for certificates by default."""
    return platformdirs.user_data_path(APP_NAME, appauthor=False) / "certs"


class ConfigError(FluidityError):
    """A setting is missing, unknown or malformed; the message names the source and the key."""

    def __init__(self, source: str, key: str | None, detail: str) -> None:
        self.source = source
        self.key = key
        self.detail = detail
        super().__init__(f"{source}: {key}: {detail}" if key else f"{source}: {detail}")


class FieldError(FluidityError, ValueError):
    """Raised by a settings class when one field's value is unacceptable.

    The loader turns it into a ConfigError naming where that key's value came from.
    """

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key
        self.detail = detail


# --------------------------------------------------------------------------- declaring settings


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    kind: str | None = None,
    default_factory: Callable[[], Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    secret: bool = False,
) -> Any:
    """A dataclass field carrying the loader's metadata.

    ``kind`` refines parsing and checks: "duration" (float seconds, > 0), "port" (1..65535;
    pass minimum=0 to allow an ephemeral port), "cidr" (each item a network), "url"
    (http/https), "path" (informational; Path fields are paths anyway), "host_pattern" (the
    program checks the items; ``<local>`` there is a value, not a template placeholder).
    ``secret`` masks the value in repr, logs and errors.
    """
    metadata = {"help": help, "kind": kind, "minimum": minimum, "maximum": maximum, "secret": secret}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def duration(default: str, *, help: str, allow_zero: bool = False) -> Any:
    """A duration field written as text ("10s") and stored as float seconds."""
    return setting(parse_duration(default), help=help, kind="duration", minimum=0.0 if allow_zero else None)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What the loader knows about one field: its parsed type and its metadata."""

    name: str
    base: type
    item: type | None
    optional: bool
    choices: tuple[str, ...] | None
    kind: str | None
    help: str
    minimum: float | None
    maximum: float | None
    secret: bool
    field: dataclasses.Field[Any]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def bounds(self) -> tuple[float | None, float | None]:
        """The allowed numeric range for this field (or each list item)."""
        low, high = self.minimum, self.maximum
        if self.kind == "port":
            low = 1 if low is None else low
            high = 65535 if high is None else high
        return low, high

    def default_value(self) -> Any:
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return self.field.default


_SCALARS: tuple[type, ...] = (str, int, float, bool, Path)


def _analyse(name: str, hint: Any, field: dataclasses.Field[Any]) -> FieldSpec:
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(members) != 1:
            raise TypeError(f"setting {name}: only Optional[X] unions are supported, got {hint!r}")
        optional, hint = True, members[0]
    origin = typing.get_origin(hint)
    choices: tuple[str, ...] | None = None
    item: type | None = None
    if origin is Literal:
        choices = tuple(typing.get_args(hint))
        if not all(isinstance(choice, str) for choice in choices):
            raise TypeError(f"setting {name}: Literal choices must be strings")
        base: type = str
    elif origin is list:
        (item,) = typing.get_args(hint)
        if item not in (str, int):
            raise TypeError(f"setting {name}: only list[str] and list[int] are supported")
        base = list
    elif hint in _SCALARS:
        base = hint
    else:
        raise TypeError(f"setting {name}: unsupported type {hint!r}")
    meta = field.metadata
    return FieldSpec(
        name=name,
        base=base,
        item=item,
        optional=optional,
        choices=choices,
        kind=meta.get("kind"),
        help=meta.get("help", ""),
        minimum=meta.get("minimum"),
        maximum=meta.get("maximum"),
        secret=bool(meta.get("secret", False)),
        field=field,
    )


_SPECS: dict[type, dict[str, FieldSpec]] = {}


def field_specs(cls: type) -> dict[str, FieldSpec]:
    """The settings of ``cls`` by name, in declaration order."""
    cached = _SPECS.get(cls)
    if cached is not None:
        return cached
    if not (dataclasses.is_dataclass(cls) and issubclass(cls, Settings)):
        raise TypeError(f"{cls!r} is not a Settings dataclass")
    if cls.__repr__ is not Settings.__repr__:
        raise TypeError(f"{cls.__name__} must be declared with @dataclass(frozen=True, repr=False)")
    hints = typing.get_type_hints(cls)
    specs = {f.name: _analyse(f.name, hints[f.name], f) for f in dataclasses.fields(cls)}
    _SPECS[cls] = specs
    return specs


# --------------------------------------------------------------------------- checking typed values


def _show(spec: FieldSpec, value: object) -> str:
    return repr(MASK) if spec.secret else repr(value)


def _range_text(low: float | None, high: float | None) -> str:
    def number(value: float) -> str:
        return str(int(value)) if float(value).is_integer() else str(value)

    if low is not None and high is not None:
        return f" {number(low)}..{number(high)}"
    if low is not None:
        return f" >= {number(low)}"
    if high is not None:
        return f" <= {number(high)}"
    return ""


def _check_item(spec: FieldSpec, kind_type: type, value: object) -> str | None:
    """Why ``value`` is not acceptable for this field, or None when it is."""
    low, high = spec.bounds()
    if spec.kind == "duration":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return f"expected a duration in seconds, got {_show(spec, value)}"
        if low is None and value <= 0:
            return f"must be a positive duration, got {format_duration(max(value, 0.0))}"
        if low is not None and value < low:
            return f"must be at least {format_duration(low)}, got {format_duration(max(value, 0.0))}"
        if high is not None and value > high:
            return f"must be at most {format_duration(high)}, got {format_duration(value)}"
        return None
    if kind_type is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {_show(spec, value)}"
    if kind_type is int or kind_type is float:
        numeric = (int,) if kind_type is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            noun = "an integer" if kind_type is int else "a number"
            return f"expected {noun}{_range_text(low, high)}, got {_show(spec, value)}"
        if (low is not None and value < low) or (high is not None and value > high):
            noun = "an integer" if kind_type is int else "a number"
            return f"expected {noun}{_range_text(low, high)}, got {_show(spec, value)}"
        return None
    if kind_type is Path:
        return None if isinstance(value, Path) else f"expected a path, got {_show(spec, value)}"
    if not isinstance(value, str):
        return f"expected text, got {_show(spec, value)}"
    if spec.choices is not None and value not in spec.choices:
        return f"expected one of {', '.join(spec.choices)}, got {_show(spec, value)}"
    if spec.kind == "cidr":
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"expected a network like 10.0.0.0/8 or ::1/128, got {value!r}"
    if spec.kind == "url" and not re.fullmatch(r"https?://[^\s/?#]+\S*", value):
        return f"expected an http:// or https:// URL, got {_show(spec, value)}"
    return None


def check_value(spec: FieldSpec, value: object) -> str | None:
    """Why ``value`` cannot be stored in this field, or None when it can."""
    if value is None:
        return None if spec.optional else "must be set"
    if spec.base is list:
        if not isinstance(value, list):
            return f"expected a list, got {_show(spec, value)}"
        assert spec.item is not None
        for index, item in enumerate(value, start=1):
            problem = _check_item(spec, spec.item, item)
            if problem:
                return f"item {index}: {problem}"
        return None
    return _check_item(spec, spec.base, value)


class Settings:
    """Base of every settings dataclass: field checks, cross-field rules and a masked repr.

    Declare subclasses with ``@dataclass(frozen=True, repr=False)`` so the masked repr
    below is kept and secrets never reach a log line.
    """

    def __post_init__(self) -> None:
        for spec in field_specs(type(self)).values():
            problem = check_value(spec, getattr(self, spec.name))
            if problem:
                raise FieldError(spec.name, problem)
        self.validate()

    def validate(self) -> None:
        """Cross-field rules; raise FieldError naming the key to blame."""

    def warnings(self) -> list[tuple[str, str]]:
        """(key, message) pairs for legal but probably unintended values."""
        return []

    def describe(self) -> dict[str, object]:
        """JSON-safe view for logging the effective settings: secrets masked, durations as text."""
        view: dict[str, object] = {}
        for spec in field_specs(type(self)).values():
            view[spec.name] = _describe_value(spec, getattr(self, spec.name))
        return view

    def __repr__(self) -> str:
        shown = []
        for spec in field_specs(type(self)).values():
            value = getattr(self, spec.name)
            shown.append(
                f"{spec.name}={MASK!r}" if spec.secret and value is not None else f"{spec.name}={value!r}"
            )
        return f"{type(self).__name__}({', '.join(shown)})"


def _describe_value(spec: FieldSpec, value: object) -> object:
    if value is None:
        return None
    if spec.secret:
        return MASK
    if spec.kind == "duration" and isinstance(value, int | float):
        return format_duration(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return list(value)
    return value


# --------------------------------------------------------------------------- parsing raw input

_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})
_PLACEHOLDER = re.compile(r"<[^<>]*>")


class _BadValue(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class _Origin:
    """Where a raw value came from: a label for errors and the base for relative paths."""

    label: str
    base_dir: Path
    textual: bool


def _absolute(path: Path, base_dir: Path) -> Path:
    path = path.expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))


def _parse_item(spec: FieldSpec, kind_type: type, raw: object, origin: _Origin) -> object:
    if isinstance(raw, str) and spec.kind != "host_pattern" and _PLACEHOLDER.fullmatch(raw.strip()):
        shown = "" if spec.secret else f" {raw.strip()!r}"
        raise _BadValue(
            f"is still the placeholder{shown}: replace it with the real value, or set {spec.env_var}"
        )
    low, high = spec.bounds()
    if spec.kind == "duration":
        try:
            return parse_duration(raw.strip() if isinstance(raw, str) else raw)  # type: ignore[arg-type]
        except ValueError as error:
            raise _BadValue(str(error)) from None
    if kind_type is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        if isinstance(raw, str) and raw.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return raw.strip().lower() in _TRUE_WORDS
        raise _BadValue(f"expected true or false (or yes/no, on/off, 1/0), got {_show(spec, raw)}")
    if kind_type is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"\s*[-+]?\d+\s*", raw):
            return int(raw)
        raise _BadValue(f"expected an integer{_range_text(low, high)}, got {_show(spec, raw)}")
    if kind_type is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                number = float(raw)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
        raise _BadValue(f"expected a number{_range_text(low, high)}, got {_show(spec, raw)}")
    if kind_type is Path:
        if isinstance(raw, Path) or (isinstance(raw, str) and raw.strip()):
            return _absolute(Path(raw.strip() if isinstance(raw, str) else raw), origin.base_dir)
        raise _BadValue(f"expected a path, got {_show(spec, raw)}")
    if not isinstance(raw, str):
        raise _BadValue(f"expected text, got {_show(spec, raw)}; put it in quotes")
    value = raw.strip()
    if spec.choices is not None:
        for choice in spec.choices:
            if value.lower() == choice.lower():
                return choice
    if spec.kind == "cidr":
        try:
            return str(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise _BadValue(f"expected a network like 10.0.0.0/8 or ::1/128, got {value!r}") from None
    return value


def _parse(spec: FieldSpec, raw: object, origin: _Origin) -> object:
    if raw is None:
        if spec.optional:
            return None
        raise _BadValue("has no value; give one or remove the line to use the default")
    if origin.textual and isinstance(raw, str) and not raw.strip() and (spec.optional or spec.base is list):
        return None if spec.optional else []
    if spec.base is list:
        items: object = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list | tuple):
            raise _BadValue(f"expected a list, got {_show(spec, raw)}")
        assert spec.item is not None
        parsed = []
        for index, item in enumerate(items, start=1):
            if isinstance(item, str) and not item.strip() and isinstance(raw, str):
                continue
            try:
                parsed.append(_parse_item(spec, spec.item, item, origin))
            except _BadValue as error:
                raise _BadValue(f"item {index}: {error.detail}") from None
        return parsed
    return _parse_item(spec, spec.base, raw, origin)


# --------------------------------------------------------------------------- files


@functools.cache
def _strict_loader() -> type[yaml.SafeLoader]:
    """A SafeLoader that rejects a key given twice instead of silently keeping the last one.

    Built on first use: PyYAML is imported only when a settings file is read (the agent's
    idle memory is part of what it costs to leave running).
    """
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)  # type: ignore[no-untyped-call]
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"setting {key!r} is given more than once", key_node.start_mark
                )
            seen.add(key)
        return loader.construct_mapping(node)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return StrictLoader


def read_settings_file(path: Path) -> dict[str, object]:
    """The mapping in a YAML settings file; ConfigError naming the file for anything else."""
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(label, None, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(label, None, "is a directory, not a settings file") from None
    except UnicodeDecodeError:
        raise ConfigError(label, None, "is not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(label, None, f"cannot be read: {error.strerror or error}") from None
    import yaml

    try:
        data = yaml.load(text, Loader=_strict_loader())  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(label, None, f"is not valid YAML ({where}{problem})") from None
    if data is None:
        raise ConfigError(label, None, "is empty; expected settings as `key: value` lines")
    if not isinstance(data, dict):
        raise ConfigError(
            label, None, f"expected settings as `key: value` lines, got a {type(data).__name__}"
        )
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(label, str(key), "setting names must be text")
    return data


def _unknown(spec_names: list[str], key: str) -> str:
    import difflib  # only for a mistyped key

    close = difflib.get_close_matches(key, spec_names, n=1)
    return f"unknown setting; did you mean {close[0]}?" if close else "unknown setting"


# --------------------------------------------------------------------------- loading


def load(
    cls: type[S],
    path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> S:
    """Settings of ``cls``: overrides (flags) > FLUIDITY_<KEY> variables > ``path`` > defaults.

    ``env`` defaults to os.environ; only FLUIDITY_* variables naming a field are read.
    Override values that are None mean "not given". Raises ConfigError.
    """
    specs = field_specs(cls)
    environment = os.environ if env is None else env
    cwd = Path.cwd()
    chosen: dict[str, tuple[object, _Origin]] = {}
    file_label = str(path) if path is not None else None
    if path is not None:
        data = read_settings_file(path)
        origin = _Origin(str(path), Path(os.path.abspath(path)).parent, textual=False)
        for key, value in data.items():
            if key not in specs:
                raise ConfigError(str(path), key, _unknown(list(specs), key))
            chosen[key] = (value, origin)
    for spec in specs.values():
        if spec.env_var in environment:
            chosen[spec.name] = (
                environment[spec.env_var],
                _Origin(f"environment variable {spec.env_var}", cwd, textual=True),
            )
    for key, value in (overrides or {}).items():
        if key not in specs:
            raise ConfigError("command line", key, _unknown(list(specs), key))
        if value is not None:
            chosen[key] = (value, _Origin(f"command-line flag {specs[key].flag}", cwd, textual=True))

    def source_of(key: str) -> str:
        if key in chosen:
            return chosen[key][1].label
        return file_label or "settings (no config file)"

    values: dict[str, object] = {}
    for key, (raw, origin) in chosen.items():
        try:
            values[key] = _parse(specs[key], raw, origin)
        except _BadValue as error:
            raise ConfigError(origin.label, key, error.detail) from None
    try:
        settings = cls(**values)
    except FieldError as error:
        raise ConfigError(source_of(error.key), error.key, error.detail) from None
    for key, message in settings.warnings():
        _log.warning("%s: %s: %s", source_of(key), key, message, extra={"setting": key})
    return settings


def program_parser(
    prog: str, summary: str, examples: Sequence[str], *, usage: str | None = None
) -> argparse.ArgumentParser:
    """A parser whose ``--help`` starts with one short usage line and worked examples.

    argparse's own usage line lists every flag (dozens for the agent), which hides how to
    start the program; the flags are listed below the examples anyway.
    """
    lines = [textwrap.fill(summary, 79), "", "examples:", *(f"  {example}" for example in examples)]
    return argparse.ArgumentParser(
        prog=prog,
        usage=usage or f"{prog} [--config PATH] [--KEY-NAME VALUE ...]",
        description="\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_arguments(
    parser: argparse.ArgumentParser, cls: type[Settings], *, exclude: Collection[str] = ()
) -> None:
    """Add ``--config PATH`` and one ``--key-name`` flag per setting (default None = not given).

    ``exclude`` names settings a program decides itself, so it does not offer flags it would ignore.
    """
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help="YAML settings file; flags and FLUIDITY_* environment variables override it",
    )
    for spec in field_specs(cls).values():
        if spec.name in exclude:
            continue
        parser.add_argument(
            spec.flag, dest=spec.name, default=None, help=_flag_help(spec), **_flag_kind(spec)
        )


def _flag_kind(spec: FieldSpec) -> dict[str, Any]:
    if spec.base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if spec.choices is not None:
        return {"choices": spec.choices}
    if spec.base is list:
        item = {"cidr": "CIDR", "port": "PORT"}.get(spec.kind or "", "N" if spec.item is int else "ITEM")
        return {"metavar": f"{item}[,{item}...]"}
    metavar = {"duration": "DURATION", "port": "PORT", "url": "URL"}.get(spec.kind or "")
    if metavar is None:
        metavar = {Path: "PATH", int: "N", float: "NUMBER"}.get(spec.base, "TEXT")
    return {"metavar": metavar}


def _flag_help(spec: FieldSpec) -> str:
    default = spec.default_value()
    if spec.secret or default is None or default == [] or default == "":
        default_text = ""
    elif spec.kind == "duration":
        default_text = f"default {format_duration(default)}; "
    elif isinstance(default, bool):
        default_text = f"default {'on' if default else 'off'}; "
    elif isinstance(default, list):
        default_text = f"default {','.join(str(item) for item in default)}; "
    else:
        default_text = f"default {default}; "
    text = f"{spec.help} ({default_text}env {spec.env_var})"
    return text.replace("%", "%%")


def overrides_from_args(namespace: argparse.Namespace, cls: type[Settings]) -> dict[str, object]:
    """The settings given on the command line, ready for ``load(..., overrides=...)``."""
    return {
        name: getattr(namespace, name)
        for name in field_specs(cls)
        if getattr(namespace, name, None) is not None
    }


def settings_flags(
    namespace: argparse.Namespace, cls: type[Settings], *, cwd: Path | None = None
) -> list[str]:
    """The settings given on the command line as flags again (paths made absolute).

    For starting the same program later from elsewhere (at login), so it behaves the same.
    Secrets are left out: a login entry is a file other programs may read.
    """
    base = cwd or Path.cwd()
    flags: list[str] = []
    for spec in field_specs(cls).values():
        value = getattr(namespace, spec.name, None)
        if value is None or spec.secret:
            continue
        if spec.base is bool:
            flags.append(spec.flag if value else "--no-" + spec.flag.removeprefix("--"))
        elif spec.base is Path and str(value).strip():
            flags += [spec.flag, str(_absolute(Path(str(value).strip()), base))]
        else:
            flags += [spec.flag, str(value)]
    return flags


def load_from_args(
    cls: type[S],
    namespace: argparse.Namespace,
    *,
    default_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> S:
    """Load with ``--config`` (or ``default_path`` when that file exists) and the given flags."""
    path: Path | None = getattr(namespace, "config", None)
    if path is None and default_path is not None and default_path.is_file():
        path = default_path
    return load(cls, path, env=env, overrides=overrides_from_args(namespace, cls))


def without_settings_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment without FLUIDITY_* variables, for starting another program.

    Both programs read the same FLUIDITY_<KEY> names (listen_port, log_file, ...), so a child
    server started by the agent must not inherit the agent's overrides.
    """
    source = os.environ if env is None else env
    return {name: value for name, value in source.items() if not name.startswith(ENV_PREFIX)}
