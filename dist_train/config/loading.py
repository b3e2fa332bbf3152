"""Reading a config: YAML presets with `base:` inheritance, dotted `--set` overrides, coercion to the
schema's types and validation, each failure one line naming the source and the dotted key."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from dist_train.config.schema import Config, ConfigError
from dist_train.errors import first_line

_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _Check:
    """Collects nothing: the first failed check raises, naming the dotted key and source."""

    def __init__(self, source: str, prefix: str = ""):
        self.source, self.prefix = source, prefix

    def at(self, prefix: str) -> _Check:
        return _Check(self.source, f"{self.prefix}{prefix}.")

    def that(self, key: str, ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(self.source, self.prefix + key, message)

    def range(self, key: str, value: float, low: float, high: float, open_low=False, open_high=False) -> None:
        too_low = value <= low if open_low else value < low
        too_high = value >= high if open_high else value > high
        if too_low or too_high:
            interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            raise ConfigError(self.source, self.prefix + key, f"{value} is outside {interval}")


# ---------------------------------------------------------------- loading and overrides


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset (following `base:` inheritance), apply `key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        raw = _read_with_bases(Path(path))
        source = str(path)
    for override in overrides or []:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError("--set", override, "expected key=value")
        parsed = _override_value(key.strip(), value)
        _check_override(key.strip(), parsed)
        _set_dotted(raw, key.strip(), parsed, "--set")
    config = _build(Config, raw, source, "")
    try:
        validate(config, source)
    except ConfigError as error:
        raise blame_override(error, overrides or []) from None
    return config


def blame_override(error: ConfigError, overrides: list[str]) -> ConfigError:
    """A value set on the command line (`key=value`) is reported as coming from --set, not the preset file."""
    for key in (override.partition("=")[0].strip() for override in overrides):
        if error.key == key or error.key.startswith((key + ".", key + "[")):
            return ConfigError("--set", error.key, error.message)
    return error


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    config = _build(Config, raw, source, "")
    validate(config, source)
    return config


def section_from_dict(cls: type, raw: Any, source: str, prefix: str) -> Any:
    """One section (e.g. ModelConfig from an export's metadata) with the same types and checks as a YAML file."""
    section = _build(cls, raw, source, prefix)
    _validate_tree(section, _Check(source, f"{prefix}."))
    return section


def validate(config: Config, source: str) -> None:
    """Run every section's checks, then the cross-section ones."""
    check = _Check(source)
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, check.at(section.name))
    config.validate(check)


def _validate_tree(node: Any, check: _Check) -> None:
    if hasattr(node, "validate"):
        node.validate(check)
    for item in dataclasses.fields(node):
        value = getattr(node, item.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, check.at(item.name))
        elif isinstance(value, list):
            for index, element in enumerate(value):
                if dataclasses.is_dataclass(element):
                    _validate_tree(element, check.at(f"{item.name}[{index}]"))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """The resolved config, with any credential from the environment masked."""
    from dist_train.redact import scrub_secrets

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(scrub_secrets(to_dict(config)), sort_keys=False))


def _override_value(key: str, value: str) -> Any:
    """A --set value as YAML reads it (1e-3 a float, [a, b] a list); one that is not YAML named, not a traceback."""
    try:
        return yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError("--set", key, f"{value!r} is not a valid YAML value ({first_line(error)}); quote a "
                                        f"string, e.g. --set '{key}=\"{value}\"'") from None


def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), "", "config file not found")
    if path.resolve() in seen:
        raise ConfigError(str(path), "base", "inheritance cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(str(path), "", f"not valid YAML: {first_line(error)}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "", "not a text file: give a YAML config such as configs/airogs_v3.yaml") from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "", "top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return _tag_source(raw, str(path))
    merged = _read_with_bases(path.parent / base, seen + (path.resolve(),))
    _deep_merge(merged, _tag_source(raw, str(path)))
    cast(_Sourced, merged).source = str(path)  # as for sections: a top-level mistake is this file's, not the base's
    return merged


class _Sourced(dict):
    """A mapping that remembers which file its keys came from, for error messages."""

    source: str = ""


def _tag_source(raw: dict[str, Any], source: str) -> dict[str, Any]:
    tagged = _Sourced()
    tagged.source = source
    for key, value in raw.items():
        tagged[key] = _tag_source(value, source) if isinstance(value, dict) else value
    return tagged


def _deep_merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            if isinstance(value, _Sourced) and isinstance(into[key], _Sourced):
                into[key].source = value.source
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _check_override(key: str, value: Any) -> None:
    """Type-check one --set value on its own, so an error names --set rather than the preset file."""
    node: Any = Config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        known = {item.name for item in dataclasses.fields(node)}
        prefix = ".".join(parts[:depth])
        if part not in known:
            close = difflib.get_close_matches(part, sorted(known), n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError("--set", key, f"unknown key{hint}")
        annotation = typing.get_type_hints(node)[part]
        if depth == len(parts) - 1:
            _coerce(annotation, value, "--set", key)
        elif not dataclasses.is_dataclass(annotation):
            raise ConfigError("--set", key, f"'{'.'.join(parts[:depth + 1])}' has no sub-keys")
        node = annotation


def _set_dotted(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = _Sourced()
            child.source = source
            node[part] = child
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    source = getattr(raw, "source", "") or source
    if not isinstance(raw, dict):
        raise ConfigError(source, prefix.rstrip("."), f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {item.name for item in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
            raise ConfigError(source, prefix + str(key), f"unknown key{hint}")
    values = {key: _coerce(hints[key], value, source, prefix + key) for key, value in raw.items()}
    return cls(**values)


def _coerce(annotation: Any, value: Any, source: str, key: str) -> Any:
    """Check `value` against a type annotation; ints and float literals widen to floats, nothing else."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build(cast(type, annotation), value, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(option, value, source, key)
            except ConfigError:
                continue
        raise ConfigError(source, key, f"expected {_describe(annotation)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(source, key, f"expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected a list, got {value!r}")
        return [_coerce(args[0], element, source, f"{key}[{index}]") for index, element in enumerate(value)]
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(source, key, f"expected null, got {value!r}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if annotation in (int, float) and isinstance(value, bool):
        raise ConfigError(source, key, f"expected {annotation.__name__}, got {value!r}")
    if isinstance(value, annotation):
        return value
    raise ConfigError(source, key, f"expected {_describe(annotation)}, got {value!r}")


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(annotation))
    if origin is Literal:
        return " or ".join(map(repr, typing.get_args(annotation)))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))
