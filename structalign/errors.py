"""The project's own error types.

A `StructalignError` is a mistake a user can make (a config key, a path, a file, a value, a run that diverged or was
interrupted): the CLI prints it as one line. Anything else is a bug and keeps its traceback.
"""


class StructalignError(Exception):
    """A user-facing problem, reported as one line naming what is wrong."""
