"""Typed command options: one frozen dataclass per command, declared once, from which come

- the command line (`add_arguments`: an argparse parser; `from_namespace`),
- the workflow's options (`from_mapping`: a YAML mapping checked and converted with the same rules, so a typo,
  a bad choice or a bad number fails when the file is loaded, naming the stage and the option), and
- a Ray job's command line (`to_argv`), the one place where options become text again.

A field is declared with `option(...)`: its help, its choices, whether it is required. Option names are the
field names with dashes: `holdout_fraction` is `--holdout-fraction` on the command line and
`holdout-fraction` in a workflow file. Only the standard library here: `infgen --help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_UNSET = object()


Choices = Callable[[], Iterable[str]] | Iterable[str] | None


def option(default: Any = _UNSET, *, help: str, choices: Choices = None, repeat: bool = False,
           metavar: str | None = None) -> Any:  # fmt: skip
    """A command option. No default: required. `choices`: the allowed values, or a function returning them
    (called only when a value is checked, so a command can list presets defined in heavy modules).
    `repeat`: a list option given once per value (`--latent-file A --latent-file B`) rather than once with
    several values (`--sizes 512 1024`)."""
    metadata = {"help": help, "choices": choices, "repeat": repeat, "metavar": metavar}
    if default is _UNSET:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def names_in(module: str, attribute: str) -> Callable[[], tuple[str, ...]]:
    """A function giving the names in `module`.`attribute` (a dict's keys, a tuple's items), importing the
    module only when called: presets and resource fields live in the stages' config modules, which the
    instant `infgen --help` must not import."""

    def names() -> tuple[str, ...]:
        return tuple(functools.reduce(getattr, attribute.split("."), importlib.import_module(module)))

    return names


def flag_name(field_name: str) -> str:
    return field_name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class _Kind:
    base: type  # str, int, float or bool
    is_list: bool
    optional: bool


def _kind(options_class: type, field: dataclasses.Field) -> _Kind:
    hint = typing.get_type_hints(options_class)[field.name]
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arguments = [argument for argument in typing.get_args(hint) if argument is not type(None)]
        optional, hint = True, arguments[0]
    if typing.get_origin(hint) is list:
        return _Kind(typing.get_args(hint)[0], True, optional)
    return _Kind(hint, False, optional)


def _fields(options_class: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options_class))


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _choices(field: dataclasses.Field) -> tuple[str, ...] | None:
    choices = field.metadata["choices"]
    if choices is None:
        return None
    return tuple(choices() if callable(choices) else choices)


def _convert(field: dataclasses.Field, kind: _Kind, text: str) -> Any:
    """One value from its text, as argparse would take it; ValueError says what was wrong."""
    try:
        value = kind.base(text)
    except ValueError:
        raise ValueError(f"invalid {kind.base.__name__} value: {text!r}") from None
    choices = _choices(field)
    if choices is not None and value not in choices:
        raise ValueError(f"invalid choice: {value!r} (choose from {', '.join(choices)})")
    return value


# --- the command line -----------------------------------------------------------------------------------
class _HelpWithChoices(str):
    """A help text that lists its option's choices when argparse formats it (`help % params`), so choices
    defined in heavy modules are imported only for `--help` of that command, never to build the parser."""

    def __new__(cls, text: str, field: dataclasses.Field):
        help_text = super().__new__(cls, text)
        help_text.field = field
        return help_text

    def __mod__(self, params) -> str:
        return f"{str.__mod__(self, params)} (one of: {', '.join(_choices(self.field))})"


def add_arguments(parser: argparse.ArgumentParser, options_class: type) -> None:
    for field in _fields(options_class):
        kind = _kind(options_class, field)
        flag = f"--{flag_name(field.name)}"
        help_text = field.metadata["help"]
        if field.metadata["choices"] is not None:
            help_text = _HelpWithChoices(help_text, field)
        if kind.base is bool:
            parser.add_argument(flag, dest=field.name, action="store_true", help=help_text)
            continue

        def convert(text: str, field=field, kind=kind) -> Any:
            try:
                return _convert(field, kind, text)
            except ValueError as error:
                raise argparse.ArgumentTypeError(str(error)) from None

        convert.__name__ = kind.base.__name__  # argparse names the type in its own messages
        arguments: dict[str, Any] = {"dest": field.name, "type": convert, "help": help_text,
                                     "metavar": field.metadata["metavar"]}  # fmt: skip
        if _required(field):
            arguments["required"] = True
        else:
            arguments["default"] = _default(field)
        if kind.is_list:
            if field.metadata["repeat"]:
                arguments["action"] = "append"
            else:
                arguments["nargs"] = "+"
        parser.add_argument(flag, **arguments)


def overrides(options, fields: Mapping[str, str]) -> dict[str, Any]:
    """{config field: option value} for the options in `fields` ({option: config field}) that were given
    (not None): what a command changes in its preset."""
    given = {name: getattr(options, name) for name in fields}
    return {fields[name]: value for name, value in given.items() if value is not None}


def from_namespace(options_class: type, namespace: argparse.Namespace):
    return options_class(**{field.name: getattr(namespace, field.name) for field in _fields(options_class)})


# --- a workflow file -----------------------------------------------------------------------------------
def from_mapping(options_class: type, values: Mapping[str, Any], command: str, fixed: Mapping[str, Any] = {}):
    """The options from a workflow stage's mapping (names with dashes, spelled out in full), plus `fixed`
    values the workflow sets itself (the output). Raises ValueError naming the option."""
    by_name = {flag_name(field.name): field for field in _fields(options_class)}
    arguments: dict[str, Any] = {}
    for name, value in values.items():
        field = by_name.get(name)
        if field is None:
            raise ValueError(
                f"unknown option {name!r} for `infgen {command}` (options are spelled out in full, without "
                "dashes)"
            )
        kind = _kind(options_class, field)
        try:
            arguments[field.name] = _value(field, kind, value)
        except ValueError as error:
            raise ValueError(f"option {name!r}: {error}") from None
    arguments.update(fixed)
    missing = [flag_name(field.name) for field in _fields(options_class)
               if _required(field) and field.name not in arguments]  # fmt: skip
    if missing:
        raise ValueError(f"`infgen {command}` needs option(s) {', '.join(repr(name) for name in missing)}")
    return options_class(**arguments)


def _value(field: dataclasses.Field, kind: _Kind, value: Any) -> Any:
    if kind.base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if value is None:
        if kind.optional or kind.is_list:
            return [] if kind.is_list else None
        raise ValueError("needs a value")
    if kind.is_list:
        values = value if isinstance(value, list) else [value]
        return [_convert(field, kind, str(item)) for item in values]
    if isinstance(value, (list, dict)):
        raise ValueError(f"expected one value, got {value!r}")
    return _convert(field, kind, str(value))


# --- a Ray job's command line, and what identifies a stage's output ----------------------------------------
def to_argv(options, last: str | None = "output") -> list[str]:
    """The options as command-line arguments: every value that differs from its default (required ones
    always), in declaration order, with `last` (the output) at the end where it is easy to read."""
    fields = sorted(_fields(type(options)), key=lambda field: field.name == last)
    argv: list[str] = []
    for field in fields:
        value = getattr(options, field.name)
        if not _required(field) and value == _default(field):
            continue
        flag = f"--{flag_name(field.name)}"
        if isinstance(value, bool):
            argv.append(flag)
        elif isinstance(value, list):
            if field.metadata["repeat"]:
                for item in value:
                    argv += [flag, str(item)]
            else:
                argv += [flag, *(str(item) for item in value)]
        else:
            argv += [flag, str(value)]
    return argv


def output_defining(options, resource_fields: tuple[str, ...]) -> dict[str, Any]:
    """The options a stage's output depends on: every value set to something else than its default, without
    the resource options (the stage config's RESOURCE_FIELDS: how it runs, not what it makes). Their hash
    identifies the stage's config in a workflow record."""
    kept = {}
    for field in _fields(type(options)):
        value = getattr(options, field.name)
        if field.name not in resource_fields and (_required(field) or value != _default(field)):
            kept[field.name] = value
    return kept
