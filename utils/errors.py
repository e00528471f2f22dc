"""Errors meant for the user: the entry scripts print them as one line, without a traceback."""


class UserError(Exception):
    """A mistake or a fault the user can act on. `exit_code` is the process status."""

    exit_code = 2


class ConfigError(UserError):
    """A bad flag, YAML key or combination (a usage error)."""


class DataError(UserError):
    """Missing, empty, malformed or unreadable data; the message names the path."""


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged or belongs to another run."""


class TrainingError(UserError):
    """A fault during training (non-finite loss, a failed save); the last good checkpoint stays."""

    exit_code = 1
