"""Typed settings: each dataclass field carries its default, its range and its help; one function checks them.

Every settings block of appo declares its fields with ``setting``::

    temperature: float = setting(0.7, "sampling temperature", within=Range(0, 10, open_lo=True))

and calls ``check_fields(self)`` in ``__post_init__``: the value's type (int -> float and list -> tuple are
converted; floats must be finite; a ``Literal`` lists the choices), then the field's ``Range``. A bad value
raises ConfigError naming the field (``appo.config`` puts the block's dotted prefix in front, e.g.
``rollout.temperature``). The blocks are ``appo.rollout.config.RolloutConfig``, ``appo.algos.chain.APPOSettings``,
``appo.algorithms.AlgoConfig`` / ``ARPOSettings`` and ``appo.config``'s own; the trainer's config, the TRL
integration and the verl integration all build and check them here, so a default, a range or a help text is
written once. This module imports nothing from appo, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass
from typing import Literal

# Limits on what a mapping-valued field (data.task_options, rollout.vllm) may hold, aliases expanded; the
# config loader (appo.config) applies MAX_DEPTH to config text too.
MAX_DEPTH = 32
MAX_NODES = 1000


class ConfigError(ValueError):
    """A config value that cannot be used. ``key`` is the dotted key the message names; ``where`` (optional) is
    the file and line it was set on, put in front of the message."""

    def __init__(self, key: str, message: str, where: str | None = None):
        super().__init__(f"{where}: {key}: {message}" if where else f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class Range:
    """The numbers a field accepts: ``lo`` / ``hi`` (None: unbounded), ``open_lo`` / ``open_hi`` exclude the
    bound. NaN lies in no range."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False

    def __contains__(self, value) -> bool:
        above = self.lo is None or (value > self.lo if self.open_lo else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.open_hi else value <= self.hi)
        return bool(above and below)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.open_lo else '>='} {self.lo}"
        return f"in {'(' if self.open_lo else '['}{self.lo}, {self.hi}{')' if self.open_hi else ']'}"


def setting(default=dataclasses.MISSING, help: str = "", *, within: Range | None = None,
            factory=dataclasses.MISSING) -> dataclasses.Field:
    """A dataclass field with its ``help`` text and, for a number (or each number of a pair), the Range
    ``within`` it must lie. ``factory`` instead of ``default`` for a mutable default (a dict, a nested block)."""
    metadata = {"help": help, "range": within}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_range(item: dataclasses.Field) -> Range | None:
    """The Range a field was declared with (``setting(..., within=...)``), or None."""
    return item.metadata.get("range")


def field_help(item: dataclasses.Field) -> str:
    """The help text a field was declared with, or ""."""
    return item.metadata.get("help", "")


def walk(cls, prefix: str = ""):
    """(dotted key, field, type hint) of every field of the dataclass ``cls`` and of the blocks it nests
    (depth first, in declaration order); a nested block's own entry comes before its fields."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        key, hint = f"{prefix}{item.name}", hints[item.name]
        yield key, item, hint
        if dataclasses.is_dataclass(hint):
            yield from walk(hint, f"{key}.")


def shown(value) -> str:
    """``repr(value)`` cut short (long strings, big integers, large or deep containers), for messages."""
    shorter = reprlib.Repr()
    shorter.maxlevel, shorter.maxstring, shorter.maxlong, shorter.maxother = 3, 120, 60, 120
    return shorter.repr(value)


def plain_and_small(value) -> bool:
    """Whether ``value`` holds only JSON-like plain values, at most MAX_NODES of them counted with every alias
    expanded (a YAML alias chain can stand for billions; the walk stops at the limit), nested at most
    MAX_DEPTH deep (aliases can nest deeper than the text that spells them)."""
    stack, count = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_NODES or depth > MAX_DEPTH:
            return False
        if isinstance(item, dict):
            stack += [(child, depth + 1) for child in (*item.keys(), *item.values())]
        elif isinstance(item, (list, tuple)):
            stack += [(child, depth + 1) for child in item]
        elif not isinstance(item, (str, int, float, bool, type(None))):
            return False
    return True


def coerce(value, hint, key: str):
    """``value`` checked against the type ``hint`` of field ``key``, converting int -> float and list -> tuple.
    Floats must be finite; dict keys must be strings. Raises ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(key, f"expected one of {list(typing.get_args(hint))}, got {shown(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        inner = [h for h in typing.get_args(hint) if h is not type(None)]
        return coerce(value, inner[0], key)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(key, f"expected a list, got {shown(value)}")
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(key, f"expected a list of {len(args)} values, got {shown(value)}")
        return tuple(coerce(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(value, args)))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(key, f"expected a number, got {shown(value)}")
        try:  # YAML 1.1 reads "2e-6" (no dot) as a string
            number = float(value)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {shown(value)}") from None
        if not math.isfinite(number):
            raise ConfigError(key, f"expected a finite number, got {shown(value)}")
        return number
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {shown(value)}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(key, f"expected an integer, got {shown(value)}")
    if hint in (str, dict) and not isinstance(value, hint):
        raise ConfigError(key, f"expected {hint.__name__}, got {shown(value)}")
    if hint is dict and not plain_and_small(value):
        raise ConfigError(key, f"expected plain YAML values (numbers, strings, lists, mappings) of at most "
                          f"{MAX_NODES} items in all, nested at most {MAX_DEPTH} deep")
    if hint is dict and not all(isinstance(k, str) for k in value):
        raise ConfigError(key, f"expected a mapping with string keys, got {shown(value)}")
    return value


def check_fields(block, prefix: str = "") -> None:
    """Check and convert, in place, each field of the dataclass instance ``block`` (frozen or not): its type
    (``coerce``) and its declared Range (each number of a pair). A nested block must be an instance of its
    class; its own fields are checked by its own constructor (``check_tree`` walks them all). Raises
    ConfigError naming ``prefix`` + the field."""
    hints = typing.get_type_hints(type(block))
    for item in dataclasses.fields(block):
        key, value, hint = f"{prefix}{item.name}", getattr(block, item.name), hints[item.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(key, f"expected a {hint.__name__} block, got {shown(value)}")
            continue
        value = coerce(value, hint, key)
        object.__setattr__(block, item.name, value)  # the converted value, frozen blocks included
        allowed = field_range(item)
        numbers = value if isinstance(value, tuple) else (value,)
        if allowed is not None and any(isinstance(v, (int, float)) and v not in allowed for v in numbers):
            raise ConfigError(key, f"must be {allowed}, got {shown(value)}")


def check_tree(block, prefix: str = "") -> None:
    """Every check of ``block`` and of each block it nests, as their constructors run them (``__post_init__``:
    ``check_fields`` and the block's own rules), for a config changed after it was built. Errors name
    ``prefix`` + the key."""
    try:
        if hasattr(block, "__post_init__"):
            block.__post_init__()
        else:
            check_fields(block)
    except ConfigError as err:
        raise prefixed(err, prefix) from None
    for item in dataclasses.fields(block):
        value = getattr(block, item.name)
        if dataclasses.is_dataclass(value):
            check_tree(value, f"{prefix}{item.name}.")


def check_renamed(keys, renamed: dict[str, str], prefix: str = "") -> None:
    """Raise ConfigError for the first of ``keys`` that is an old name in ``renamed`` ({old: new}): one line
    naming the new key. ``prefix`` is put in front of both (e.g. "algo.")."""
    for key in keys:
        if key in renamed:
            raise ConfigError(f"{prefix}{key}", f"renamed: use {prefix}{renamed[key]}")


def prefixed(err: ConfigError, prefix: str) -> ConfigError:
    """``err`` with ``prefix`` in front of its key (a block's error, seen from the config that holds it)."""
    return ConfigError(f"{prefix}{err.key}", err.message)
