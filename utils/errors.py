"""Errors meant for the user: the entry scripts print them as one line, without a traceback."""

import argparse


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


MAX_MESSAGE = 600  # characters of an error line; the values in it are cut (see shown)


def shown(value, limit=60):
    """repr(value) cut to about `limit` characters, for quoting a user's value in a message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def one_line(error):
    """The message of `error` as one line (at most MAX_MESSAGE characters).

    An exception raised in a DataLoader worker process reaches the main process re-raised with
    the worker's traceback folded into its message; the original message is its last line,
    after the exception's qualified name."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Traceback" in lines[1]:
        name, separator, message = lines[-1].partition(": ")
        text = message if separator and name.endswith(type(error).__name__) else lines[-1]
    else:
        text = " ".join(line.strip() for line in lines)
    return text if len(text) <= MAX_MESSAGE else f"{text[:MAX_MESSAGE - 12]} ... (cut)"


class UsageParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr with exit status 2
    (argparse's default prints the whole usage block first)."""

    def error(self, message):
        if len(message) > MAX_MESSAGE:  # e.g. an "invalid int value" of 5,000 digits
            message = f"{message[:MAX_MESSAGE - 12]} ... (cut)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def number_list(kind):
    """argparse type for comma-separated numbers; `kind` int refuses non-integers."""
    def parse(text):
        values = []
        for item in text.split(","):
            item = item.strip()
            try:
                value = float(item)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
            if kind is int:
                if not value.is_integer():
                    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
                value = int(value)
            values.append(value)
        return values
    parse.__name__ = "list"  # argparse names the type in "invalid list value" messages
    return parse
