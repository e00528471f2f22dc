"""Errors meant for the user: the entry scripts print them as one line, without a traceback."""

import argparse
import difflib
import re
import signal

# Exit status of a command stopped by a signal: the shell's 128 + signal number.
EXIT_INTERRUPTED = {signal.SIGTERM: 143, signal.SIGINT: 130}


class UserError(Exception):
    """A mistake or a fault the user can act on. `exit_code` is the process status."""

    exit_code = 2


class ConfigError(UserError):
    """A bad flag, YAML key or combination (a usage error)."""


class DataError(UserError):
    """Missing, empty, malformed or unreadable data; the message names the path."""


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged or belongs to another run."""


class OutputError(UserError):
    """A file a tool (export, benchmark) was asked to write could not be written: an unwritable
    or full file system. Nothing was written."""


class TrainingError(UserError):
    """A fault during training (non-finite loss, a failed save); the last good checkpoint stays."""

    exit_code = 1


MAX_MESSAGE = 600  # characters of an error line; the values in it are cut (see shown)


def shown(value, limit=60):
    """repr(value) on one line (a tensor's repr spans several), cut to about `limit` characters,
    for quoting a user's value in a message."""
    text = re.sub(r"\s*\n\s*", " ", repr(value))
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
    (argparse's default prints the whole usage block first). `elsewhere`: {flag: the other
    commands that take it}, named when one of those flags is given here."""

    def __init__(self, *args, elsewhere=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.elsewhere = elsewhere or {}

    def error(self, message):
        if len(message) > MAX_MESSAGE:  # e.g. an "invalid int value" of 5,000 digits
            message = f"{message[:MAX_MESSAGE - 12]} ... (cut)"
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(unrecognized_message(unknown, self.flag_names(), self.elsewhere))
        return parsed

    def flag_names(self):
        """The flags a user may type (hidden ones left out)."""
        return [option for action in self._actions if action.help != argparse.SUPPRESS
                for option in action.option_strings if option.startswith("--")]


def _spelling(flag):
    """A flag with its dashes and underscores made equal (--train-subset = --train_subset)."""
    return "--" + flag[2:].replace("-", "_")


def closest_flag(given, flags):
    """The valid flag `given` most probably meant, or None: the same flag with dashes for
    underscores (or the reverse), else the closest spelling (difflib)."""
    name = given.split("=", 1)[0]
    spelled = {_spelling(flag): flag for flag in flags}
    if _spelling(name) in spelled:
        return spelled[_spelling(name)]
    matches = difflib.get_close_matches(_spelling(name), list(spelled), n=1, cutoff=0.7)
    return spelled[matches[0]] if matches else None


def unrecognized_message(unknown, flags, elsewhere=None):
    """argparse's "unrecognized arguments" line, with a hint for each flag: the command that
    takes it (a flag of another command in `elsewhere`), else the closest valid flag."""
    elsewhere = elsewhere or {}
    hints = []  # (the hint alone, the hint among others)
    for token in unknown:
        name = token.split("=", 1)[0]
        if name in elsewhere:
            text = f"{name} is a flag of {' and '.join(elsewhere[name])}"
            hints.append((text, text))
        elif token.startswith("--") and closest_flag(token, flags):
            text = f"did you mean {closest_flag(token, flags)}?"
            hints.append((text, f"{name}: {text}"))
    message = f"unrecognized arguments: {' '.join(unknown)}"
    if len(hints) == 1:
        return f"{message} ({hints[0][0]})"
    if hints:
        return f"{message} ({'; '.join(among for _, among in hints)})"
    return message


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
