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


# In a fresh interpreter: a mistyped flag, a bad YAML value and a value out of range are
# answered (exit status 2) without torch ever being imported (it takes seconds).
TORCH_FREE_ANSWERS = """
import sys
import training_params
for argv in (["--epoch", "3"], ["--config", sys.argv[1]], ["--epochs", "0"], ["--eval_topk_grid", "0.5"]):
    try:
        training_params.main("structured_sparsity", argv)
    except SystemExit as stop:
        assert stop.code == 2, (argv, stop.code)
    else:
        raise AssertionError(f"{argv} was accepted")
print(sorted(name for name in ("torch", "numpy", "models", "data") if name in sys.modules))
"""


def test_flags_and_yaml_are_checked_before_torch_is_imported(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("weight_decay: 1e-4\n")
    done = subprocess.run([sys.executable, "-c", TORCH_FREE_ANSWERS, str(bad_yaml)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    errors = done.stderr.splitlines()
    assert len(errors) == 4 and "did you mean --epochs?" in errors[0] and "write 1.0e-4" in errors[1], errors
    assert done.stdout.strip() == "[]"


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
