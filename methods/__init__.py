"""Registry of training methods, per setting: one line per method."""

from methods.config import Config
from methods.lcs_l import LcsLQuantized, LcsLStructured, LcsLUnstructured
from methods.lcs_p import LcsPQuantized, LcsPStructured, LcsPUnstructured
from methods.lec import LEC
from methods.ns import NS
from methods.quantized import QuantizedMethod
from methods.structured import StructuredMethod
from methods.target_bit_width import TargetBitWidth
from methods.target_topk import TargetTopK
from methods.target_width import TargetWidth
from methods.unstructured import UnstructuredMethod
from methods.us import US

# The settings, each a Method subclass holding what its methods share (script, flags, level unit).
SETTINGS = {cls.setting: cls for cls in (StructuredMethod, UnstructuredMethod, QuantizedMethod)}
METHODS = {setting: {} for setting in SETTINGS}


def register(cls):
    """Add a method class under its setting and name (the first registered is the default)."""
    assert cls.setting in METHODS, f"{cls.__name__}: unknown setting {cls.setting!r}"
    METHODS[cls.setting][cls.name] = cls
    return cls


register(LcsLStructured)
register(LcsPStructured)
register(US)
register(NS)
register(LEC)
register(TargetWidth)
register(LcsLUnstructured)
register(LcsPUnstructured)
register(TargetTopK)
register(LcsLQuantized)
register(LcsPQuantized)
register(TargetBitWidth)

DEFAULT_METHOD = "lcs_l"


def method_class(setting, name):
    return METHODS[setting][name]


def level_units():
    """{unit name: LevelUnit} of every registered method (plots and tables of any runs)."""
    return {cls.level_unit.name: cls.level_unit for methods in METHODS.values() for cls in methods.values()}


def in_current_units(rows):
    """Metrics rows with the level names of earlier versions (LevelUnit.legacy_names, e.g. LEC's
    `topk`) replaced by their method's unit name, in place; rows of unknown methods unchanged."""
    for row in rows:
        cls = METHODS.get(row.get("setting"), {}).get(row.get("method"))
        if cls is not None and row.get("level_name") in cls.level_unit.legacy_names:
            row["level_name"] = cls.level_unit.name
    return rows


def compilable_methods():
    """The methods --compile takes, as text ("structured_sparsity ns, ..., quantized lcs_l with
    discrete_alpha_map")."""
    return ", ".join(f"{setting} {name}" + (f" {cls.compiles_when}" if cls.compiles_when else "")
                     for setting, methods in METHODS.items() for name, cls in methods.items()
                     if cls.compiles_when is not None)


def config_from_dict(values):
    """The Config of a stored config dict (a checkpoint's), legacy keys converted; KeyError or
    ConfigError for a setting, method or key this version does not know."""
    cls = METHODS[values["setting"]][values["method"]]
    values = {key: value for key, value in values.items() if key not in ("setting", "method")}
    sources = {key: f"'{key}'" for key in values}
    cls.upgrade(values, sources)
    unknown = sorted(set(values) - set(cls.config_keys()))
    if unknown:
        raise KeyError(unknown[0])
    config = Config(cls.setting, cls.name, cls.config_keys(), values)
    cls.complete(config)
    return config
