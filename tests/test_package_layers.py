"""The package's layers: imports point one way and form no cycle.

    experiments/ (reproduce.py, over the entry scripts)
      -> entry scripts (train_*.py, compare_runs.py, benchmarks/)
      -> command line (training_params)
      -> engine/ (loop, evaluation, run directory)      deploy/ (export), beside it
      -> methods/ -> models/, and data/
      -> utils/ (errors, checkpoint files, distributed helpers, metrics files)

The graph is read from the source with ast, imports inside functions included, so a cycle
cannot hide behind a function-local import.
"""

import ast
import os
import subprocess
import sys

from conftest import REPO

# Top to bottom; a module may import from its own package or from a lower layer.
LAYERS = [
    {"experiments"},  # reproduce.py runs the entry scripts and compares their runs
    {"train_structured", "train_unstructured", "train_quantized", "compare_runs", "benchmarks"},
    {"training_params"},
    {"engine", "deploy"},
    {"methods"},
    {"models", "data"},
    {"utils"},
]
SKIPPED_DIRS = {"tests", "__pycache__", "docs", "configs", "saved_models", "runs"}
# Packages of one layer that must not import each other.
APART = [("engine", "deploy"), ("models", "data")]


def project_modules():
    """{module name: path} of every Python file of the project (tests excluded)."""
    modules = {}
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def imports_of(path, modules):
    """Project modules imported anywhere in the file (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph():
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def package(module):
    return module.split(".")[0]


def layer(module):
    return next(index for index, packages in enumerate(LAYERS) if package(module) in packages)


def test_the_graph_covers_the_project():
    graph = import_graph()
    assert {"training_params", "engine.train", "engine.run_dir", "deploy.export", "methods.base",
            "models.layers", "data", "utils.errors", "compare_runs"} <= set(graph)
    assert all(package(module) in set().union(*LAYERS) for module in graph), sorted(graph)
    assert "engine.train" in graph["training_params"] and "methods" in graph["engine.train"]


def test_imports_point_down_the_layers():
    wrong = [(module, imported) for module, imports in import_graph().items() for imported in imports
             if package(imported) != package(module) and layer(imported) <= layer(module)]
    assert not wrong, f"imports that point up or sideways: {wrong}"


def test_packages_beside_each_other_stay_apart():
    for module, imports in import_graph().items():
        for first, second in APART:
            for a, b in ((first, second), (second, first)):
                if package(module) == a:
                    assert not [m for m in imports if package(m) == b], f"{module} imports {b}"


def test_no_import_cycle():
    graph = import_graph()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


# In a fresh interpreter: a mistyped flag, a bad YAML value, a value out of range, a wrong
# --data_dir, evaluation levels outside the method's range (of a new run and of a checkpoint) and
# an export --level outside the checkpoint's range are answered (exit status 2, one line) without
# torch ever being imported (it takes seconds).
TORCH_FREE_ANSWERS = """
import json
import sys
import training_params
from deploy import export
bad_yaml, missing, split, checkpoint = sys.argv[1:]
commands = [(training_params.main, "structured_sparsity", argv) for argv in (
    ["--epoch", "3"], ["--config", bad_yaml], ["--epochs", "0"], ["--eval_topk_grid", "0.5"],
    ["--data_dir", missing], ["--data_dir", split], ["--eval_width_factors", "1.5"],
    ["--eval_only", "--checkpoint", checkpoint, "--eval_width_factors", "1.5"])]
commands += [(training_params.main, "unstructured_sparsity", ["--eval_topk_grid", "1.5"]),
             (training_params.main, "quantized", ["--eval_bit_widths", "9"]),
             (export.main, None, ["--checkpoint", checkpoint, "--level", "1.5", "--out", checkpoint + ".w15.pt"])]
for main, setting, argv in commands:
    try:
        main(setting, argv) if setting else main(argv)
    except SystemExit as stop:
        assert stop.code == 2, (argv, stop.code)
    else:
        raise AssertionError(f"{argv} was accepted")
print(json.dumps(sorted(name for name in ("torch", "numpy", "models", "data.streams", "data.cifar",
                                          "deploy.compressed", "deploy.subspace") if name in sys.modules)))
"""


def test_commands_are_checked_before_torch_is_imported(tmp_path):
    import torch

    import training_params
    from utils import checkpoint as ckpt

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("weight_decay: 1e-4\n")
    (tmp_path / "cifar" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "cifar" / "train" / "cat" / "0.png").write_bytes(b"")
    config, _ = training_params.parse("structured_sparsity", ["--save_dir", str(tmp_path / "run")])
    checkpoint = tmp_path / "run" / ckpt.FINAL
    checkpoint.parent.mkdir()
    torch.save({"format": ckpt.FORMAT, "kind": "model", "setting": config.setting, "method": config.method,
                "model_name": config.model, "config": config.to_dict(), "model": {"weight": torch.zeros(2)},
                "epoch": 1, "global_step": 1, "warmup_iterations": None}, checkpoint)
    done = subprocess.run([sys.executable, "-c", TORCH_FREE_ANSWERS, str(bad_yaml), str(tmp_path / "missing"),
                           str(tmp_path / "cifar" / "train"), str(checkpoint)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    errors = done.stderr.splitlines()
    assert len(errors) == 11, errors
    assert "did you mean --epochs?" in errors[0] and "write 1.0e-4" in errors[1], errors
    assert errors[4].endswith(f"--data_dir: no such directory: {tmp_path / 'missing'}"), errors
    assert errors[5].endswith(f"is one split of class folders (train/<class>/ or test/<class>/): pass --data_dir "
                              f"{tmp_path / 'cifar'}"), errors
    assert errors[6].endswith("--eval_width_factors: structured_sparsity/lcs_l evaluates width factors in "
                              "[0.25, 1] (the trained width_factor_limits), got 1.5"), errors
    assert errors[7] == errors[6], errors
    assert "--eval_topk_grid: unstructured_sparsity/lcs_l evaluates" in errors[8] and "got 1.5" in errors[8]
    assert "--eval_bit_widths: quantized/lcs_l evaluates" in errors[9] and "got 9" in errors[9]
    assert errors[10] == ("deploy.export: error: --level 1.5: structured_sparsity/lcs_l checkpoints export width "
                          "factors in [0.25, 1] (the trained width_factor_limits)"), errors
    assert done.stdout.strip() == "[]"
    assert not (tmp_path / "run" / (ckpt.FINAL + ".w15.pt")).exists()


def test_a_checkpoints_header_is_read_without_torch_or_not_at_all(tmp_path):
    """ckpt.read_header gives the checkpoint's entries with its tensors left out, and None for
    what it cannot read that way (load() then reports it)."""
    import pickle

    import torch

    from utils import checkpoint as ckpt

    payload = {"format": ckpt.FORMAT, "config": {"seed": 3}, "model": {"weight": torch.ones(3)}, "epoch": 2}
    torch.save(payload, tmp_path / "good.pt")
    assert ckpt.read_header(str(tmp_path / "good.pt")) == {**payload, "model": {"weight": None}}
    torch.save({**payload, "extra": torch.nn.Linear(1, 1)}, tmp_path / "module.pt")   # a pickled class
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps(payload))                      # not torch's zip
    torch.save({**payload, "format": 0}, tmp_path / "foreign.pt")
    for name in ("module.pt", "pickle.pt", "foreign.pt", "missing.pt"):
        assert ckpt.read_header(str(tmp_path / name)) is None, name


def test_the_command_lines_model_names_are_the_registrys():
    import training_params
    from models import MODELS

    assert training_params.MODELS == sorted(MODELS)


def test_the_check_finds_a_cycle_and_an_upward_import(tmp_path):
    """The checks above can fail: a cycle and an arrow pointing up are reported."""
    graph = {"utils.a": {"methods.b"}, "methods.b": {"utils.a"}}
    assert [(m, i) for m, imports in graph.items() for i in imports if layer(i) <= layer(m)] == [("utils.a",
                                                                                                   "methods.b")]
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from engine import train\n")
    assert imports_of(str(module), {"engine": None, "engine.train": None}) == {"engine", "engine.train"}
