"""The errors the library raises for bad input; every command prints them as one line and exits with 2
(`exit_code`)."""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable


class W2WError(ValueError):
    """Bad input: the message names the file or value and what was expected."""


class LayoutError(W2WError):
    """A LoRA layout does not match what it is applied to."""


class SpaceError(W2WError):
    """A space, or a model or value used with it, is not what was expected."""


class FileFormatError(W2WError):
    """A file is missing, truncated, corrupt or of another kind than expected."""


class PickleRefusedError(W2WError):
    """A file needs unpickling (which can run arbitrary code) and the user did not allow it."""


class ArgumentError(W2WError):
    """A number or choice given to a command or function is outside what it accepts."""


class SettingError(ArgumentError):
    """A config refuses the value of one of its fields: `setting` names the field (a command names its flag
    instead), `problem` says what was expected."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem


class OutputError(W2WError):
    """An output cannot be written where asked: it would replace an input, a directory or a folder
    that is not an earlier output of its kind, or the disk refuses the write."""


class NoFaceError(W2WError):
    """A photograph in which the face detector finds no face."""


class FamilyError(W2WError):
    """A base pipeline of no family w2w knows (bases.FAMILIES)."""


def exit_code(prog: str, job: Callable[[], object]) -> int:
    """Run `job`, the work of the command `prog`: 0 when it ends; bad input (a W2WError, or an OSError such
    as a full disk) prints the one line `PROG: error: ...` and gives 2; Ctrl-C prints `PROG: interrupted`
    and gives 130, also when a library caught the signal into an error of its own (diffusers' weight loader
    wraps every Exception into "Unable to load weights ..."); never a traceback. Shared by `w2w`,
    inversion/invert.py and train_dreambooth.py."""
    try:
        with ctrl_c_heard() as heard:
            job()
    except (W2WError, OSError) as error:
        if heard:  # the error is the Ctrl-C's doing
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


@contextmanager
def ctrl_c_heard():
    """A list that holds True once Ctrl-C (SIGINT) arrives in the block, which still raises KeyboardInterrupt
    as before. Only Python's own handler is wrapped, in the main thread (signals reach no other); elsewhere
    the list stays empty."""
    heard = []
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield heard
        return

    def handler(signum, frame):
        heard.append(True)
        previous(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield heard
    finally:
        signal.signal(signal.SIGINT, previous)
