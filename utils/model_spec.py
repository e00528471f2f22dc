"""What `--model` and `--model_kwargs` may say, checked without importing torch.

`--model` is one of the project's three networks, or a network built elsewhere and converted:
`torchvision.<builder>` (a classification builder of torchvision.models), `timm.<name>` (timm's
model name; timm installed), or `package.module:callable` (the user's function, called with
`num_classes=` and the keyword arguments). `--model_kwargs` gives those arguments as
`key=value,key=value` (values read as YAML scalars: 0.5, true, 7, text) or as a YAML mapping.
"""

import keyword
import re
from typing import NamedTuple

from utils.errors import ConfigError
from utils.yaml_io import parse_yaml_text

SOURCES = ("torchvision", "timm")
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_NAME}(\.{_NAME})*"


class ModelSpec(NamedTuple):
    source: str   # "registered", "torchvision", "timm" or "callable"
    target: str   # the registered name, the builder's name, or "package.module:callable"

    @property
    def external(self):
        return self.source != "registered"


def parse_model_spec(text: str, registered) -> ModelSpec:
    """The ModelSpec of a --model value; ConfigError (one line) for what cannot name a network."""
    allowed = (f"{', '.join(sorted(registered))}, torchvision.<builder>, timm.<name> or "
               "package.module:callable")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"--model: must name a network ({allowed}), got {text!r}")
    if text in registered:
        return ModelSpec("registered", text)
    if ":" in text:
        module, _, function = text.partition(":")
        if not re.fullmatch(_DOTTED, module) or not re.fullmatch(_NAME, function) or keyword.iskeyword(function):
            raise ConfigError(f"--model: {text!r} is no package.module:callable (allowed: {allowed})")
        return ModelSpec("callable", text)
    source, _, name = text.partition(".")
    if source in SOURCES and re.fullmatch(_NAME, name or ""):
        return ModelSpec(source, name)
    raise ConfigError(f"--model: unknown network {text!r} (allowed: {allowed})")


def parse_model_kwargs(value, source="--model_kwargs") -> dict:
    """{name: value} from `key=value,...` text or a mapping (YAML's `model_kwargs:`)."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        mapping = value
    elif isinstance(value, str) and value.lstrip().startswith("{"):
        mapping = parse_yaml_text(value, source)
    elif isinstance(value, str):
        mapping = {}
        for item in value.split(","):
            key, equals, text = item.partition("=")
            if not equals or not key.strip():
                raise ConfigError(f"{source}: expected key=value[,key=value...], got {item.strip()!r}")
            mapping[key.strip()] = parse_yaml_text(text.strip(), source) if text.strip() else ""
    else:
        raise ConfigError(f"{source}: expected key=value[,key=value...] or a mapping, got {value!r}")
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping of builder arguments, got {mapping!r}")
    for key, item in mapping.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"{source}: {key!r} is no argument name")
        if key == "num_classes":
            raise ConfigError(f"{source}: num_classes is set from the dataset; leave it out")
        if not isinstance(item, (bool, int, float, str, list, type(None))):
            raise ConfigError(f"{source}: {key} must be a number, text, true/false, null or a list, got {item!r}")
    return dict(mapping)
