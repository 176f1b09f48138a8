"""12-factor configuration: environment variables structured into an attrs class by cattrs.

Each field names its variable in its metadata (``env("VISIONA_TUNNEL_PORT")``); a value that
does not parse fails at start with a :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
import cattrs

T = TypeVar("T")
_ENV_KEY = "env"


class ConfigError(Exception):
    """A configuration variable is missing or has a bad value."""


_HELP_KEY = "help"


def env(name: str, help: str = "") -> dict[str, str]:
    """Field metadata naming the environment variable a field is read from (and what it
    means, for ``--help``)."""
    return {_ENV_KEY: name, _HELP_KEY: help}


#: ``VISIONA_LOG_LEVEL``'s values (as :mod:`logging` names them, in lower case).
LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "critical")


def variable_of(attribute: attrs.Attribute[Any]) -> str:
    """The environment variable of a field (its name if it has none), for messages."""
    return str(attribute.metadata.get(_ENV_KEY, attribute.name))


def one_of(*choices: str) -> Callable[[object, attrs.Attribute[str], str], None]:
    """An attrs validator: the value, in lower case, is one of ``choices`` (the error names
    the variable)."""

    def check(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
        if value.lower() not in choices:
            expected = ", ".join(choices)
            raise ValueError(f"{variable_of(attribute)}: expected one of {expected}; got {value!r}")

    return check


def port(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    """An attrs validator: a TCP port, 0 (any free one) included."""
    if not 0 <= value <= 65535:
        raise ValueError(f"{variable_of(attribute)}: port must be within 0..65535, got {value}")


def at_least(minimum: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    """An attrs validator: a whole number of at least ``minimum``."""

    def check(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        if value < minimum:
            raise ValueError(f"{variable_of(attribute)}: must be at least {minimum}, got {value}")

    return check


def positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    """An attrs validator: a number above zero."""
    if not value > 0:
        raise ValueError(f"{variable_of(attribute)}: must be positive, got {value}")


def describe_variables(cls: type[Any]) -> str:
    """One line per variable of ``cls``: name, default and meaning (for ``--help``)."""
    lines = []
    for field in attrs.fields(cls):
        if _ENV_KEY not in field.metadata:
            continue
        default = field.default
        shown = "" if default in ("", attrs.NOTHING) else f" [{default}]"
        lines.append(f"  {field.metadata[_ENV_KEY]}{shown}")
        if field.metadata.get(_HELP_KEY):
            lines.append(f"      {field.metadata[_HELP_KEY]}")
    return "\n".join(lines)


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)

    def to_bool(value: Any, _: type) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")

    converter.register_structure_hook(bool, to_bool)
    return converter


_converter = _make_converter()


def variables(cls: type[Any]) -> dict[str, str]:
    """Field name -> environment variable, for an attrs class built with :func:`env`."""
    return {
        field.name: field.metadata[_ENV_KEY]
        for field in attrs.fields(cls)
        if _ENV_KEY in field.metadata
    }


def load(cls: type[T], environ: Mapping[str, str], **overrides: Any) -> T:
    """Build ``cls`` from the variables set in ``environ`` (unset ones keep their defaults).

    Raises:
        ConfigError: naming the variable whose value is missing or does not parse.
    """
    names = variables(cls)
    raw: dict[str, Any] = {
        field: environ[variable] for field, variable in names.items() if variable in environ
    }
    raw.update(overrides)
    try:
        return _converter.structure(raw, cls)
    except cattrs.ClassValidationError as group:
        raise ConfigError(_describe(group, names)) from group
    except (ValueError, TypeError) as exc:  # attrs validators run in __init__
        raise ConfigError(str(exc)) from exc


def _describe(group: cattrs.ClassValidationError, names: dict[str, str]) -> str:
    with_notes, without_notes = group.group_exceptions()
    problems = [f"{names.get(note.name, note.name)}: {exc}" for exc, note in with_notes]
    problems += [str(exc) for exc in without_notes]
    return "bad configuration: " + "; ".join(problems)
