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


def pytest_configure(config):
    config.addinivalue_line("markers", "realdata: trains on the shared CIFAR-10 copy (skipped when absent)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


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
