"""Shared fixtures: tiny image-folder datasets made on the fly, the real CIFAR-10 copy, and a
helper that runs the CLI scripts as subprocesses."""

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_CIFAR = os.environ.get("LCS_CIFAR10_DIR", os.path.join(REPO, "data", "cifar10-jpeg"))
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# One CPU thread per test process (and for the scripts it starts, whose default --threads
# honours OMP_NUM_THREADS): the tensors are tiny, and two worker processes each running as many
# OpenMP threads as there are cores made the ONNX matrix 7-9 times slower on the 2-core machine
# (threads spinning while waiting for a core another process holds).
os.environ["OMP_NUM_THREADS"] = "1"
# No flush to disk before each atomic rename (utils/atomic.py), for the scripts the tests start
# too: the suite's runs write thousands of small files, and the flushes were about 8 % of the
# CLI tests' time. Writes stay atomic for every reader; tests/test_resume.py checks the flush
# where the variable is unset.
os.environ["LCS_FSYNC"] = "0"


def pytest_configure(config):
    config.addinivalue_line("markers", "realdata: trains on the shared CIFAR-10 copy (skipped when absent)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


# -- parallel runs -----------------------------------------------------------------------------
# `python -m pytest` runs on 2 worker processes (pytest-xdist; `-n 2 --dist loadscope` in
# pyproject.toml; `-n 0` runs in this process). A work unit is a test file, so that module- and
# file-level fixtures (trained tiny models, checkpoints) are built once; the files whose tests
# share nothing costly are split into one unit per test, so that their long tests run on both
# workers; but the ONNX matrix's accept and refuse tests of one method x norm form one unit, so
# that the second reuses the tiny model and graphs the first made (test_onnx.py's session
# fixtures). Units are handed out longest first (the seconds each took on the 2-core development
# machine with two workers; a unit not listed counts as short), so that no long unit starts last.
SPLIT_FILES = ("tests/test_realdata.py", "tests/test_onnx.py", "tests/test_onnx_subspace.py",
               "tests/test_own_network.py")
ONNX_MATRIX = "quantized_graph_matrix"
UNIT_SECONDS = {
    "tests/test_realdata.py::test_quantized": 123,
    "tests/test_realdata.py::test_structured": 70,
    "tests/test_realdata.py::test_unstructured": 45,
    "tests/test_realdata.py::test_lec": 21,
    "tests/test_realdata.py::test_the_default": 9,
    "tests/test_realdata.py::test_init_from": 30,
    "tests/test_own_network.py::test_topology_matrix[vgg11_bn": 13,
    "tests/test_own_network.py::test_topology_matrix[vgg11_bn-unstructured": 17,
    "tests/test_own_network.py::test_topology_matrix[vgg11_bn-structured": 17,
    "tests/test_own_network.py::test_a_converted_network_exports": 5,
    "tests/test_own_network.py::test_a_converted_network_exports_every_artefact_checked_against_the_training_time_"
    "model[resnet18": 8,
    "tests/test_own_network.py::test_a_converted_network_exports_every_artefact_checked_against_the_training_time_"
    "model[efficientnet_b0": 7,
    "tests/test_own_network.py::test_topology_matrix": 3,
    "tests/test_topology.py": 3,
    "tests/test_onnx.py::quantized_graph_matrix": 15,
    "tests/test_onnx.py::quantized_graph_matrix[target_bit_width-GN": 17,
    "tests/test_onnx.py::quantized_graph_matrix[lcs_l-GN": 17,
    "tests/test_onnx.py::quantized_graph_matrix[lcs_p-GN": 16,
    "tests/test_onnx.py::test_benchmark_runs_with_both_runtimes[onnx": 9,
    "tests/test_onnx.py::test_every_quantized_conv_runs_as_an_integer_convolution": 6,
    "tests/test_onnx.py::test_onnx_runtime_reproduces_the_model": 4,
    "tests/test_onnx.py::test_resnet18_and_vgg19_export_and_pass_the_check[vgg19": 6,
    "tests/test_onnx.py::test_resnet18_and_vgg19_export_and_pass_the_check[resnet18": 4,
    "tests/test_onnx_subspace.py::test_one_file_gives_each_levels_graph": 3,
    "tests/test_onnx_subspace.py::test_the_one_file_is_within_1_10x_the_lcs_pt": 5,
    "tests/test_distributed.py": 60,
    "tests/test_reproduce.py": 47,
    "tests/test_resume.py": 33,
    "tests/test_cli_unstructured.py": 26,
    "tests/test_cli_structured.py": 28,
    "tests/test_cli_quantized.py": 26,
    "tests/test_quickstart.py": 25,
    "tests/test_cluster.py": 27,
    "tests/test_train_speed.py": 19,
    "tests/test_export.py": 18,
    "tests/test_subspace.py": 15,
    "tests/test_errors.py": 13,
    "tests/test_fuzz_flags.py": 11,
    "tests/test_hardening.py": 12,
    "tests/test_eval_only.py": 9,
    "tests/test_first_run.py": 9,
    "tests/test_bn_calibration.py": 6,
}


def unit_seconds(scope):
    matches = [prefix for prefix in UNIT_SECONDS if scope.startswith(prefix)]
    return UNIT_SECONDS[max(matches, key=len)] if matches else 0


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            if path not in SPLIT_FILES:
                return path
            if path == "tests/test_onnx.py" and "_quantized_graph_is_" in nodeid:
                # The ONNX matrix: accept and refuse of one method x norm share a unit (and the model)
                return f"{path}::{ONNX_MATRIX}[{nodeid.split('[', 1)[1]}"
            return nodeid

        def _assign_work_unit(self, node):
            longest = max(self.workqueue, key=unit_seconds)  # the first of equals: collection order
            self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

    return FileScheduling(config, log)


def make_image_folder(root, classes, per_class, size, seed=0):
    """Class folders of random PNG images (class-dependent colour, so a model can learn)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            base = rng.integers(0, 256, size=(size, size, 3))
            base[..., index % 3] = (base[..., index % 3] + 40 * index) % 256
            Image.fromarray(base.astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.png"))
    return root


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """torch.set_num_threads(1) in each test process (the variable above already did it where
    torch was imported after it; this covers a torch imported earlier, e.g. by a plugin)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    """CIFAR-10 layout: train/ (8 per class) and test/ (4 per class), 32x32 images."""
    root = str(tmp_path_factory.mktemp("tiny_cifar"))
    make_image_folder(os.path.join(root, "train"), CIFAR_CLASSES, 8, 32, seed=0)
    make_image_folder(os.path.join(root, "test"), CIFAR_CLASSES, 4, 32, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory):
    """ImageNet layout (training/ + validation/), 4 classes of 40x40 images."""
    root = str(tmp_path_factory.mktemp("tiny_imagenet"))
    classes = ("n01", "n02", "n03", "n04")
    make_image_folder(os.path.join(root, "training"), classes, 4, 40, seed=2)
    make_image_folder(os.path.join(root, "validation"), classes, 2, 40, seed=3)
    return root


@pytest.fixture(scope="session")
def real_cifar():
    if not os.path.isdir(os.path.join(REAL_CIFAR, "train")):
        pytest.skip(f"real CIFAR-10 not found at {REAL_CIFAR} (unpack ../shared/data/cifar10-jpeg.tar.gz there "
                    f"or set LCS_CIFAR10_DIR)")
    return REAL_CIFAR


def run_cli(script, *args, timeout=600, env=None):
    """Run `python <script> args...` from the repository root; returns CompletedProcess."""
    command = [sys.executable, os.path.join(REPO, script), *map(str, args)]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli
