"""Flags in one spelling per command: kebab-case for `w2w` subcommands, underscores for the scripts that
mirror the original code; each command also takes the other spelling, which its --help does not show."""
from __future__ import annotations

import argparse
import copy


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
