"""Flags in one spelling per command: kebab-case for `w2w` subcommands, underscores for the scripts that
mirror the original code; a command that mirrors the original also takes the other spelling, which its
--help does not show. A config (a frozen dataclass whose fields carry their help in `metadata`) makes
its own flags (`add_config_flags`) and is made back from them (`config_from_args`)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import typing
from contextlib import contextmanager

from .errors import SettingError


def spellings(name: str, kebab: bool) -> list[str]:
    """The option strings of flag `name` (underscore or kebab form): the command's own spelling first."""
    underscore, dashed = f"--{name.replace('-', '_')}", f"--{name.replace('_', '-')}"
    return list(dict.fromkeys([dashed, underscore] if kebab else [underscore, dashed]))


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, kebab: bool,
             **kwargs) -> argparse.Action:
    """Add flag `name` in both spellings, the command's own first, stored at `name` (underscores)."""
    return parser.add_argument(*spellings(name, kebab), dest=name.replace("-", "_"), **kwargs)


def flag(name: str, kebab: bool) -> str:
    """Flag `name` as the command spells it in --help and in its errors."""
    return spellings(name, kebab)[0]


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (`w2w COMMAND: error: ...`, exit code 2), like every
    other error of w2w; `w2w COMMAND --help` shows the usage."""

    def error(self, message: str):
        # argparse names a flag by all its spellings ("argument --lora-r/--lora_r: ..."): the first is the command's
        message = re.sub(r"^argument (-[\w-]+)(?:/-[\w-]+)+:", r"argument \1:", message)
        self.exit(2, f"{self.prog}: error: {message}\n")


class OneSpellingFormatter(argparse.RawDescriptionHelpFormatter):
    """--help and usage that show each flag in its first spelling (with its --no- form) only."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        return super()._format_action_invocation(_first_spelling(action))

    def _format_usage(self, usage, actions, groups, prefix):
        return super()._format_usage(usage, [_first_spelling(action) for action in actions], groups, prefix)


def _first_spelling(action: argparse.Action) -> argparse.Action:
    """A copy of `action` for display, with its first option string (and --no- form) only."""
    shown = 2 if isinstance(action, argparse.BooleanOptionalAction) else 1
    if len(action.option_strings) <= shown:
        return action
    trimmed = copy.copy(action)
    trimmed.option_strings = action.option_strings[:shown]
    return trimmed


# ----------------------------------------------------------------------------- configs that make their own flags

def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config: type, kebab: bool = True,
                     both: bool = False, skip: tuple[str, ...] = (), defaults: dict | None = None) -> None:
    """A flag per field of the frozen dataclass `config` (but `skip`), spelled as the command spells flags
    (`kebab`; with `both`, the other spelling taken too): its type from the annotation (int, float, str,
    bool, X | None, tuple[X, ...] or list[X] for several values), its default (or `defaults`' for the fields
    it names), and from the field's metadata its help ("help"), and where given "choices", "type" (an
    argparse type that checks the value, such as checks.COUNT), "metavar" and "flags" (more option strings,
    such as "-k"). `config_from_args` makes the config of the parsed flags."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        if field.name in skip:
            continue
        kind, nargs = flag_type(hints[field.name])
        default = (defaults or {}).get(field.name, None if field.default is dataclasses.MISSING else field.default)
        names = spellings(field.name, kebab) if both else spellings(field.name, kebab)[:1]
        shown = "" if default in (None, False) or "default" in field.metadata["help"] else " (default: %(default)s)"
        settings = dict(dest=field.name, default=default, help=field.metadata["help"] + shown)
        if kind is bool:
            settings["action"] = argparse.BooleanOptionalAction
        else:
            settings |= dict(type=field.metadata.get("type", kind), nargs=nargs, choices=field.metadata.get("choices"),
                             metavar=field.metadata.get("metavar"))
        parser.add_argument(*names, *field.metadata.get("flags", ()), **settings)


def flag_type(hint) -> tuple[type, str | None]:
    """(argparse type, nargs) of a field's type: int, float, str, bool, X | None (X), a union of str with
    others such as str | os.PathLike (str), tuple[X, ...] or list[X] (X, several values)."""
    if typing.get_origin(hint) in (tuple, list):
        return flag_type(typing.get_args(hint)[0])[0], "+"
    options = [option for option in typing.get_args(hint) or (hint,) if option is not type(None)]
    if len(options) > 1:
        return str, None
    return options[0], None


def config_from_args(config: type, args: argparse.Namespace, kebab: bool = True):
    """The `config` of the parsed flags (its fields that `args` holds; several values of a tuple field as a
    tuple). A SettingError it raises names the field's flag as the command spells it."""
    hints = typing.get_type_hints(config)
    values = {}
    for field in dataclasses.fields(config):
        if hasattr(args, field.name):
            value = getattr(args, field.name)
            many = typing.get_origin(hints[field.name]) is tuple and value is not None
            values[field.name] = tuple(value) if many else value
    with named_as_flags(kebab):
        return config(**values)


@contextmanager
def named_as_flags(kebab: bool = True):
    """A SettingError raised inside names its setting's flag, as the command spells it, instead."""
    try:
        yield
    except SettingError as error:
        raise SettingError(flag(error.setting, kebab), error.problem) from None


def config_argv(config, kebab: bool = True) -> list[str]:
    """The command line that `add_config_flags` parses back into `config` (for a process started with it)."""
    argv = []
    for field in dataclasses.fields(config):
        value, name = getattr(config, field.name), flag(field.name, kebab)
        if isinstance(value, bool):
            argv.append(name if value else f"--no-{name[2:]}")
        elif isinstance(value, (tuple, list)):
            argv += [name, *map(str, value)]
        elif value is not None:
            argv += [name, str(value)]
    return argv
