"""Running the training scripts in end-to-end tests, and reading what a run wrote.

Most runs go through `training_params.main(setting, argv)`, the function each entry script
calls, inside the test process: the same parser, loop and files as the script, without paying
the interpreter and torch start-up (about 5 s of CPU) for every configuration. Each test file
also runs its script once as a real subprocess. Runs use one CPU thread: the tiny networks
and batches run faster that way, and tests never oversubscribe a shared machine.
"""

import contextlib
import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

import training_params  # noqa: E402

SETTING_OF_SCRIPT = {script: setting for setting, script in training_params.SCRIPTS.items()}
RUN_FILES = ("config.yaml", "metrics.jsonl", "results.csv", "accuracy_vs_compression.png",
             "checkpoint_last.pt", "model_final.pt")
# Keys every metrics.jsonl row holds (issue 2, "Run outputs").
ROW_KEYS = {"epoch", "setting", "method", "model", "dataset", "norm", "level_name", "level", "alpha",
            "accuracy", "loss", "sparsity", "num_bits", "final", "num_images"}
# Test split size of micro_cifar (below).
MICRO_CIFAR_TEST_IMAGES = 10


@pytest.fixture(scope="session")
def micro_cifar(tmp_path_factory):
    """CIFAR-10 image folders with 2 training and 1 test image per class: a 1-epoch run is one
    training step and the grid evaluations cost little, so every configuration can run."""
    from conftest import CIFAR_CLASSES, make_image_folder

    root = str(tmp_path_factory.mktemp("micro_cifar"))
    make_image_folder(os.path.join(root, "train"), CIFAR_CLASSES, 2, 32, seed=4)
    make_image_folder(os.path.join(root, "test"), CIFAR_CLASSES, 1, 32, seed=5)
    return root


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_script(script, *args):
    """`python <script> args...` executed in this process (see the module docstring)."""
    out, err = io.StringIO(), io.StringIO()
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the scripts' default --threads honours it
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            training_params.main(SETTING_OF_SCRIPT[script], [str(a) for a in args])
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        torch.set_num_threads(threads)
        _restore_env("OMP_NUM_THREADS", omp)
    return Result(code, out.getvalue(), err.getvalue())


def _restore_env(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def run_subprocess(script, *args, timeout=300):
    """`python <script> args...` as a child process from the repository root."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, os.path.join(REPO, script), *map(str, args)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    return Result(done.returncode, done.stdout, done.stderr)


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def read_metrics(save_dir):
    with open(os.path.join(save_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def evaluations(rows):
    """The rows grouped by evaluation, in the order they were recorded."""
    grouped = {}
    for row in rows:
        grouped.setdefault(row["evaluation"], []).append(row)
    return [grouped[index] for index in sorted(grouped)]


def read_results_csv(save_dir):
    with open(os.path.join(save_dir, "results.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


def read_config(save_dir):
    with open(os.path.join(save_dir, "config.yaml")) as handle:
        return yaml.safe_load(handle)


def assert_config_reloads(save_dir, setting):
    """config.yaml fed back with --config resolves to the very same config."""
    config, _ = training_params.parse(setting, ["--config", os.path.join(save_dir, "config.yaml")])
    assert config.to_dict() == read_config(save_dir)


def check_run(save_dir, *, setting, method, norm, levels, model="cpreresnet20", dataset="cifar10",
              alphas=None, num_images=MICRO_CIFAR_TEST_IMAGES, evaluated_epochs=(0, 1)):
    """What every finished run must have written (issue 2, "Run outputs"); returns the rows.

    `levels` (and `alphas` for lcs_l) is the expected grid, in order, of every evaluation;
    `evaluated_epochs` the epochs of the evaluations (a 1-epoch run: epoch 0 and the end)."""
    for name in RUN_FILES:
        assert os.path.isfile(os.path.join(save_dir, name)), f"{name} missing"
    assert os.path.getsize(os.path.join(save_dir, "accuracy_vs_compression.png")) > 1000
    rows = read_metrics(save_dir)
    level_name = {"structured_sparsity": "width_factor", "unstructured_sparsity": "topk",
                  "quantized": "num_bits"}[setting]
    if method == "lec":
        level_name = "channel_fraction"  # fractions of norm channels kept, a unit of their own
    for row in rows:
        missing = ROW_KEYS - set(row)
        assert not missing, f"keys missing from metrics.jsonl: {missing}"
        assert (row["setting"], row["method"], row["model"], row["dataset"], row["norm"], row["level_name"]) == \
            (setting, method, model, dataset, norm, level_name)
        assert 0.0 <= row["accuracy"] <= 1.0
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        assert row["num_images"] == num_images
        if method != "lcs_l":
            assert row["alpha"] is None
        if setting == "quantized":
            assert row["num_bits"] == row["level"] and isinstance(row["num_bits"], int)
            assert row["sparsity"] is None
        else:
            assert 0.0 <= row["sparsity"] < 1.0
            assert row["num_bits"] is None
    evaluated = evaluations(rows)
    assert [group[0]["epoch"] for group in evaluated] == list(evaluated_epochs)
    assert [group[0]["final"] for group in evaluated] == [False] * (len(evaluated) - 1) + [True]
    for group in evaluated:
        assert all(row["final"] == group[0]["final"] and row["epoch"] == group[0]["epoch"] for row in group)
        assert [row["level"] for row in group] == pytest.approx(levels, abs=1e-9)
        if alphas is not None:
            assert [row["alpha"] for row in group] == pytest.approx(alphas, abs=1e-9)
    final = evaluated[-1]
    # results.csv lists the final evaluation sorted by level.
    table = read_results_csv(save_dir)
    expected = sorted(final, key=lambda row: row["level"])
    assert [float(line["level"]) for line in table] == pytest.approx([row["level"] for row in expected])
    assert [float(line["accuracy"]) for line in table] == pytest.approx([row["accuracy"] for row in expected])
    assert all(line["final"] == "True" for line in table)
    assert_config_reloads(save_dir, setting)
    assert_checkpoints(save_dir, evaluated_epochs[-1])
    return rows


def assert_checkpoints(save_dir, epochs):
    """Both checkpoints are plain data (weights_only) holding the model, the epoch and the
    run's config; the training one also the optimiser state."""
    config = read_config(save_dir)
    for name, extra in (("checkpoint_last.pt", "optimizer"), ("model_final.pt", None)):
        payload = torch.load(os.path.join(save_dir, name), map_location="cpu", weights_only=True)
        assert payload["model"] and payload["epoch"] == epochs and payload["config"] == config, name
        if extra:
            assert payload[extra]["state"], name


def help_entries(help_text):
    """{option string: its description} from argparse's --help output."""
    options = help_text.split("options:", 1)[1]
    entries = {}
    for entry in re.split(r"\n(?=  -)", options):
        # "  --a A, --b A   text", or the text on the following lines.
        match = re.match(r"\s*(\S.*?)(?: {2,}|\n|$)(.*)", entry, re.S)
        if match:
            invocation, description = match.groups()
            for option in re.findall(r"--?\w+", invocation):
                entries[option] = " ".join(description.split())
    return entries


def acceptance_args(method, data_dir, save_dir):
    """The acceptance command of issues 2-4 (micro_cifar is smaller than the subsets: all of
    it is used)."""
    return ["--method", method, "--data_dir", data_dir, "--epochs", 1, "--train_subset", 256,
            "--test_subset", 256, "--save_dir", save_dir]


def assert_help_documents(script, flags):
    """--help exits 0 and describes every flag in `flags`; returns {flag: description}."""
    result = run_script(script, "--help")
    assert result.returncode == 0
    entries = help_entries(result.stdout)
    for flag in flags:
        assert entries.get(flag), f"{flag} missing or undocumented in --help"
    return entries


# Flags every script adds to the original's (issue 2).
NEW_FLAGS = ("--data_dir", "--imagenet_dir", "--seed", "--device", "--num_workers", "--train_subset",
             "--test_subset", "--config")
# SPEC 1.1: the flags common to the three scripts.
COMMON_SPEC_FLAGS = ("--model", "--dataset", "--imagenet_dir", "--save_dir", "--norm", "--epochs", "--test_freq",
                     "--learning_rate", "--batch_size", "--momentum", "--weight_decay", "--method")


def assert_refused(script, args, flag, data_dir, save_dir, runner=run_script):
    """A refused value: non-zero exit, one line on stderr naming the flag, no traceback,
    nothing written."""
    result = runner(script, *args, "--data_dir", data_dir, "--epochs", 1, "--save_dir", save_dir)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert flag in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not os.path.exists(save_dir)
    return result
