"""The errors the library raises for bad input; the CLI prints them as one line and exits with 2."""


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


class OutputError(W2WError):
    """An output cannot be written where asked: it would replace an input, a directory or a folder
    that is not an earlier output of its kind, or the disk refuses the write."""


class NoFaceError(W2WError):
    """A photograph in which the face detector finds no face."""


class FamilyError(W2WError):
    """A base pipeline of no family w2w knows (bases.FAMILIES)."""
