"""Outside methods/, nothing knows a method's or setting's own business (issue 22): no read of
a method's or setting's own config key (`config.get("bn_calibration_images")`,
`config.warmup_budget`) and no hand-kept collection of method or setting names. The owner
answers (Method.bn_at_evaluation, Method.level_unit, ...); everyone else asks. Read with ast."""

import ast

from methods import METHODS, SETTINGS
from methods.base import collect
from methods.config import COMMON_KEYS
from test_package_layers import project_modules


def own_keys():
    """Every key a setting or method declares for itself (legacy keys included)."""
    keys = set()
    for methods in METHODS.values():
        for cls in methods.values():
            keys |= set(collect(cls, "own_keys")) | set(collect(cls, "legacy_keys"))
    return keys - set(COMMON_KEYS)


def names():
    """Every method and setting name."""
    return set(SETTINGS) | {name for methods in METHODS.values() for name in methods}


def _is_config(node):
    """`config`, `self.config`, `method.config`, ...: an expression naming a run's config."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name == "config" or name.endswith("_config")


def key_reads(tree, keys):
    """(line, key) of every config.get("key") and config.key of a key in `keys`."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and _is_config(node.func.value) and node.args and isinstance(node.args[0], ast.Constant)
                and node.args[0].value in keys):
            found.append((node.lineno, node.args[0].value))
        elif isinstance(node, ast.Attribute) and node.attr in keys and _is_config(node.value):
            found.append((node.lineno, node.attr))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "replaced"
              and any(keyword.arg in keys for keyword in node.keywords)):
            found.append((node.lineno, next(k.arg for k in node.keywords if k.arg in keys)))
    return found


def name_lists(tree, known):
    """(line, names) of every list, tuple or set literal holding a method or setting name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            held = [element.value for element in node.elts if isinstance(element, ast.Constant)
                    and isinstance(element.value, str) and element.value in known]
            if held:
                found.append((node.lineno, held))
    return found


def outside_methods():
    for module, path in sorted(project_modules().items()):
        if module.split(".")[0] != "methods":
            yield module, ast.parse(open(path).read(), path)


def test_no_method_key_is_read_outside_methods():
    keys = own_keys()
    assert {"bn_calibration_images", "lec_test_batch_statistics", "warmup_budget", "width_factor_limits"} <= keys
    found = [(module, line, key) for module, tree in outside_methods() for line, key in key_reads(tree, keys)]
    assert not found, f"method keys read outside methods/ (ask the method instead): {found}"


def test_no_list_of_method_or_setting_names_outside_methods():
    found = [(module, line, held) for module, tree in outside_methods() for line, held in name_lists(tree, names())]
    assert not found, f"hand-kept method or setting names outside methods/ (ask the registry): {found}"


def test_the_checks_find_what_they_look_for():
    tree = ast.parse("a = config.get('bn_calibration_images')\nb = self.config.warmup_budget\n"
                     "c = ('structured_sparsity', 'quantized')\nd = config.replaced(bn_calibration_images=0)\n"
                     "e = config.epochs\nf = row.get('bn_calibration_images')\n")
    assert key_reads(tree, own_keys()) == [(1, "bn_calibration_images"), (2, "warmup_budget"),
                                           (4, "bn_calibration_images")]
    assert name_lists(tree, names()) == [(3, ["structured_sparsity", "quantized"])]


# -- level units: the method's, asked by everyone else -----------------------------------------
def test_every_method_has_a_level_unit_and_says_when_it_compiles():
    from test_method_registry import default_method

    for setting, methods in METHODS.items():
        for name, cls in methods.items():
            unit = cls.level_unit
            assert unit.name and unit.label and unit.scale in ("linear", "log"), (setting, name)
            distinct = default_method(setting, name).distinct_train_levels()
            if cls.compiles_when == "":
                assert distinct is not None, (setting, name)
            elif cls.compiles_when is None:
                assert distinct is None, (setting, name)


def test_lec_has_its_own_unit_and_its_old_rows_read_in_it():
    from methods import in_current_units, level_units

    lec, topk = METHODS["structured_sparsity"]["lec"].level_unit, METHODS["unstructured_sparsity"]["lcs_l"].level_unit
    assert lec.name != topk.name and "channels kept" in lec.label and lec.scale == "log"
    assert level_units()[lec.name] is lec and topk.axis_label == "TopK fraction kept (log scale)"
    rows = [{"setting": "structured_sparsity", "method": "lec", "level_name": "topk"},
            {"setting": "unstructured_sparsity", "method": "lcs_l", "level_name": "topk"},
            {"setting": "no_such_setting", "method": "lec", "level_name": "topk"}]
    assert [row["level_name"] for row in in_current_units(rows)] == [lec.name, "topk", "topk"]


def test_quantized_lcs_l_keeps_the_bit_width_it_is_given():
    from test_method_registry import default_method

    method = default_method("quantized", "lcs_l")
    for point in method.eval_points():
        level = method.eval_levels(point, None)
        assert (level.num_bits, level.alpha) == (point.level, method.alpha_of(point.level))
        assert level == method._level(point.alpha)  # what the round trip through alpha gave
