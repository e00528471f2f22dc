"""Reading a YAML config file within bounds: a config is a small flat mapping, so a file that is
large, deeply nested, uses aliases (a 1 KB alias bomb expands to gigabytes when printed) or
repeats a key (the last would silently win) is refused with one line naming the file."""

import os
import stat

import yaml

from utils.errors import ConfigError

MAX_BYTES = 256 * 1024
MAX_DEPTH = 8


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise ConfigError(f"{self.name}:{line}: key {str(key)[:60]!r} is given twice (also on line "
                                      f"{seen[key]}); give each key once")
                seen[key] = line
            except TypeError:  # an unhashable key; the base class names the problem
                break
        return super().construct_mapping(node, deep=deep)


def _syntax_error(path, error):
    mark, context = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
    where = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if getattr(error, "context", None) and context is not None:  # e.g. an unclosed [ further up
        problem += f" ({error.context} from line {context.line + 1})"
    return ConfigError(f"{path}{where}: YAML syntax error: {problem[:200]}")


def _check_events(path, text):
    """Walk the event stream (flat, no recursion) for aliases, anchors and depth."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ConfigError(f"{path}:{line}: YAML anchors and aliases (&name, *name) are not allowed in a config; "
                              f"write each value out")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"{path}:{line}: nested more than {MAX_DEPTH} levels deep; a config is a mapping "
                                  f"of keys to values and lists")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def read_yaml(path):
    """A YAML mapping from `path`, or ConfigError naming the file (and line)."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{path}: is a directory, expected a YAML file")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path}: is not a regular file (a pipe, socket or device), expected a YAML file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_BYTES // 1024} KiB; a config file is a few lines")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: cannot read: not UTF-8 text (byte {error.start})") from None
    data = parse_yaml_text(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def parse_yaml_text(text, source):
    """One YAML value from `text` (a file's contents or a flag's), under the same bounds as a
    config file; ConfigError naming `source` on a syntax error or a refused construct."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_BYTES // 1024} KiB")
    try:
        _check_events(source, text)
        loader = _UniqueKeyLoader(text)
        loader.name = source
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise _syntax_error(source, error) from None
    except (ValueError, OverflowError) as error:  # e.g. an integer of 100,000 digits
        raise ConfigError(f"{source}: a value cannot be read ({str(error).split(';')[0][:120]})") from None
