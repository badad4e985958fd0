"""The project's own error types.

A `StructalignError` is a mistake a user can make (a config key, a path, a file, a value, a run that diverged or was
interrupted): the CLI prints it as one line. Anything else is a bug and keeps its traceback.
"""


class StructalignError(Exception):
    """A user-facing problem, reported as one line naming what is wrong."""


class MissingFileError(StructalignError, FileNotFoundError):
    """A file or folder the user named does not exist (still a FileNotFoundError for callers that catch that)."""


class InputError(StructalignError, ValueError):
    """A value or file content the user gave cannot be used (still a ValueError for callers that catch that)."""
