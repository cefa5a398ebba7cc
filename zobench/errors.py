"""Errors the user can fix: the CLI prints their message as one line, without a traceback."""


class ZobenchError(Exception):
    """Bad input or an unreachable resource; the message says what went wrong and how to fix it."""


class RefusedInput(ZobenchError):
    """Bad input found once a command has started, before it changed anything (a trajectory replayed on a device
    that draws another z): exit 2, as the input refused at start-up."""


class Diverged(Exception):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """The run was stopped by Ctrl-C or SIGTERM."""
