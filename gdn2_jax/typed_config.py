"""Typed config dataclasses: field types checked at construction, and the one `key=value` parser.

Every config dataclass (`ModelConfig`, the training config's sections, `SamplingConfig`) calls
`check_types` in its `__post_init__`, so a value of the wrong type (`allow_neg_eigval="False"`,
`tie_embeddings=2`, `hidden_size=64.5`) is refused where it is made, whether it comes from
Python, a JSON file or a command line. Every command line that overrides config fields
(train.py's and `gdn2_jax.evaluate`'s `--set section.key=value`, `gdn2_jax.convert`'s
`--set field=value`) goes through `apply_overrides`, which parses the text by the field's
declared type:

- `bool`: `true` or `false` (any case), nothing else;
- `int`, `float`: numbers (`1e3` is an int when it is whole);
- `Literal[...]`: one of the listed choices;
- `tuple[X, ...]`: comma-separated items, optionally in `()` or `[]` (`block_pattern=gdn2,swa`);
- `X | None`: `none` (any case) or an X.

Pure Python: config files import it without importing JAX.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal


class ConfigError(ValueError):
    """A config value, file or override that cannot be applied."""


# ---------------------------------------------------------------------------------------------
# Construction checks


def check_types(cfg: Any) -> None:
    """Raises ConfigError naming the first field whose value does not have its declared type."""
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if not _matches(value, hints[field.name]):
            raise ConfigError(
                f"{type(cfg).__name__}.{field.name} must be {describe(hints[field.name])}, "
                f"got {value!r} ({type(value).__name__})"
            )


def require(cfg: Any, name: str, ok: bool, requirement: str) -> None:
    """Raises ConfigError "Cls.name must be <requirement>, got <value>" unless `ok`."""
    if not ok:
        raise ConfigError(
            f"{type(cfg).__name__}.{name} must be {requirement}, got {getattr(cfg, name)!r}"
        )


def require_positive(cfg: Any, *names: str) -> None:
    """Optional fields left at None (unset) pass; a set value must be > 0."""
    for name in names:
        value = getattr(cfg, name)
        require(cfg, name, value is None or value > 0, "> 0")


def require_non_negative(cfg: Any, *names: str) -> None:
    """Optional fields left at None (unset) pass; a set value must be >= 0."""
    for name in names:
        value = getattr(cfg, name)
        require(cfg, name, value is None or value >= 0, ">= 0")


def _is_number(value: Any, kind: type) -> bool:
    # bool is an int subclass in Python, but `hidden_size=True` is a mistake, not a 1.
    return isinstance(value, kind) and not isinstance(value, bool)


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in args)
    if origin is Literal:
        return any(type(value) is type(choice) and value == choice for choice in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(item, args[0]) for item in value)
        return len(value) == len(args) and all(map(_matches, value, args))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_number(value, numbers.Integral)
    if hint is float:
        return _is_number(value, numbers.Real)
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"check_types does not know the field type {hint!r}")


def describe(hint: Any) -> str:
    """The type as a user reads it: "an int", "one of 'a', 'b'", "an int or None", ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(option) for option in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        item = describe(args[0]) if args else "values"
        return f"a tuple whose items are each {item}"
    if hint is type(None):
        return "None"
    name = getattr(hint, "__name__", str(hint))
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


# ---------------------------------------------------------------------------------------------
# Parsing `key=value` overrides


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """`cfg` with each `a.b=value` applied in order; any error names the key it concerns."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            cfg = _set_path(cfg, key.split("."), raw.strip(), key)
        except ConfigError as e:
            raise ConfigError(f"{key}={raw.strip()}: {e}") from None
    return cfg


def _set_path(node: Any, parts: list[str], raw: str, full_key: str) -> Any:
    name = parts[0]
    check_field_name(type(node), name, full_key)
    current = getattr(node, name)
    if len(parts) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{name!r} is a value, not a section")
        return dataclasses.replace(node, **{name: _set_path(current, parts[1:], raw, full_key)})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"{full_key!r} is a section; set one of its fields")
    hint = typing.get_type_hints(type(node))[name]
    return dataclasses.replace(node, **{name: parse_value(raw, hint)})


def check_field_name(cls: type, name: str, full_key: str) -> None:
    """Raises ConfigError unless `cls` declares the field `name` (with a did-you-mean hint)."""
    names = [f.name for f in dataclasses.fields(cls)]
    if name in names:
        return
    removed = getattr(cls, "REMOVED_FIELDS", {})
    if name in removed:
        raise ConfigError(f"{cls.__name__}.{name} was removed: {removed[name]}")
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"unknown config key {full_key!r}: {cls.__name__} has no field {name!r}"
        f" (fields: {', '.join(names)}){hint}"
    )


def parse_value(raw: str, hint: Any) -> Any:
    """The text of an override as a value of the field's declared type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() == "none":
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return parse_value(raw, option)
            except ConfigError:
                continue
        raise ConfigError(f"expected {describe(hint)}, got {raw!r}")
    if origin is Literal:
        for choice in args:
            if str(choice) == raw:
                return choice
        raise ConfigError(f"{raw!r} is not one of {', '.join(map(repr, args))}")
    if origin is tuple:
        return _parse_tuple(raw, args)
    if hint is bool:
        if raw.lower() not in ("true", "false"):
            raise ConfigError(f"expected true or false, got {raw!r}")
        return raw.lower() == "true"
    if hint is str:
        return raw
    if hint in (int, float):
        return _parse_number(raw, hint)
    raise ConfigError(f"fields of type {hint} cannot be set from the command line")


def _parse_number(raw: str, kind: type) -> int | float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"expected {describe(kind)}, got {raw!r}") from None
    if kind is float:
        return value
    if not value.is_integer():
        raise ConfigError(f"expected {describe(kind)}, got {raw!r}")
    # Whole digits parse exactly (float would round ids above 2**53); "1e3" goes through float.
    digits = raw.replace("_", "")
    return int(digits) if digits.lstrip("+-").isdigit() else int(value)


def _parse_tuple(raw: str, args: tuple) -> tuple:
    """Accepts `a,b`, `(a, b)`, `[1, 2]` or `("a", "b")`; `()` is the empty tuple."""
    text = raw.strip()
    if text[:1] in "([" and text[-1:] in ")]":
        text = text[1:-1]
    items = [x.strip().strip("'\"") for x in text.split(",") if x.strip()]
    item_type = args[0] if args else str
    return tuple(parse_value(x, item_type) for x in items)


# ---------------------------------------------------------------------------------------------
# Dicts (JSON files, stored checkpoint configs)


def from_dict(cls: type, d: Mapping) -> Any:
    """The dataclass `cls` rebuilt from `dataclasses.asdict`-style data (lists back to tuples).

    Keys the dataclass does not declare are an error, except those it lists in its
    `REMOVED_FIELDS` (fields older versions stored), which are dropped."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{cls.__name__}: expected a mapping of its fields, got {d!r}")
    hints = typing.get_type_hints(cls)
    removed = getattr(cls, "REMOVED_FIELDS", {})
    kwargs = {}
    for name, value in d.items():
        if name in removed:
            continue
        check_field_name(cls, name, name)
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            kwargs[name] = from_dict(hint, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
