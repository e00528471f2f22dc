"""Runs and files that must not be lost: one writer per run directory (a second one refused, a
killed one's lock recovered), writes that fail on a full disk without a traceback or damage, a
second Ctrl-C that stops at once and leaves a valid checkpoint, and metrics.jsonl kept strict
JSON when a loss overflows. (Hostile inputs are rows of the table in test_errors.py.)"""

import errno
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from cli_helpers import REPO, micro_cifar, run_script  # noqa: F401  (micro_cifar is a fixture)
from utils import checkpoint as ckpt
import compare_runs as compare
from deploy import export
from utils.atomic import RUN_DIR_FILES
from utils.run_lock import LOCK_FILE
from engine.run_dir import RUN_FILES
from engine.train import Run

SCRIPT = "train_unstructured.py"
# One TopK level, a few steps per epoch on micro_cifar (20 training images).
TINY = ["--method", "target_topk", "--eval_topk_grid", "1", "--batch_size", "8", "--test_freq", "1"]


def child_env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def sha1(path):
    with open(path, "rb") as handle:
        return hashlib.sha1(handle.read()).hexdigest()


def hidden_temporaries(directory):
    return [name for name in os.listdir(directory) if ".tmp" in name]


def one_error_line(result, *parts):
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert len(lines) == 1, result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def test_run_dir_files_are_the_runs_files():
    assert set(RUN_DIR_FILES) == set(RUN_FILES)


# -- 1. one writer per run directory -----------------------------------------------------
def wait_for(condition, what, process, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the first run ended early ({process.returncode}): {process.stderr.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_second_writer_is_refused_and_a_killed_writers_lock_is_recovered(micro_cifar, tmp_path):
    save_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, os.path.join(REPO, SCRIPT), *TINY, "--data_dir", micro_cifar,
                              "--save_dir", save_dir, "--epochs", "1000"], cwd=REPO, env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = save_dir / LOCK_FILE
        wait_for(lambda: (save_dir / ckpt.LAST).exists() and lock.exists()
                 and f"pid {first.pid} " in lock.read_text(), "the first run's checkpoint", first)
        config = (save_dir / "config.yaml").read_bytes()
        fresh = [*TINY, "--data_dir", micro_cifar, "--save_dir", save_dir, "--epochs", 1]
        attempts = {"a second run": fresh, "--overwrite": [*fresh, "--overwrite"],
                    "--resume": ["--save_dir", save_dir, "--resume"]}
        for name, argv in attempts.items():
            result = run_script(SCRIPT, *argv)
            assert result.returncode == 2, name
            one_error_line(result, f"--save_dir {save_dir}: another process is writing to this run directory "
                                   f"(pid {first.pid} on ", "train_unstructured.py")
        result = run_script(SCRIPT, "--eval_only", "--checkpoint", save_dir / ckpt.LAST)
        assert result.returncode == 2
        one_error_line(result, f"pid {first.pid} ")
        assert (save_dir / "config.yaml").read_bytes() == config
        assert first.poll() is None  # undisturbed
    finally:
        first.kill()
        first.wait()
    # A SIGKILL releases the lock but leaves its file and, had it been writing, a temporary file.
    assert f"pid {first.pid} " in (save_dir / LOCK_FILE).read_text()
    stale = save_dir / f".metrics.jsonl.tmp{first.pid}"
    stale.write_text("half a file")
    result = run_script(SCRIPT, *TINY, "--data_dir", micro_cifar, "--save_dir", save_dir, "--epochs", 1,
                        "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and not (save_dir / LOCK_FILE).exists()
    assert "epochs: 1\n" in (save_dir / "config.yaml").read_text()


# -- 3. a full disk ----------------------------------------------------------------------
def mount_tmpfs(directory, size):
    """A real tiny file system (root only, where mounts are allowed); False where it cannot be made."""
    directory.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True)
    return done.returncode == 0


def fill(directory):
    """Write into `directory` until its file system is full (unbuffered: every byte that fits lands;
    appending: a second call takes what was freed since)."""
    with open(directory / "filler", "ab", buffering=0) as handle:
        for size in (65536, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as error:
                assert error.errno == errno.ENOSPC


def torch_writer_failure(payload, handle, *args, **kwargs):
    """What torch.save raises when the file's write fails: its zip writer's RuntimeError, with
    the file's OSError as its context."""
    handle.write(b"PK\x03\x04 half a checkpoint")
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_full_disk_is_one_line_and_keeps_the_previous_files(disk, micro_cifar, tmp_path, monkeypatch):
    """The second checkpoint of a run, an export, a comparison and an --eval_only are written to
    a full disk: one line each, the previous files intact, no temporary file left."""
    root = tmp_path / "disk"
    mounted = disk == "tmpfs" and mount_tmpfs(root, "8m")
    if disk == "tmpfs" and not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated case covers the code path")
    if not mounted:
        root.mkdir(exist_ok=True)
    try:
        save_dir = root / "run"
        saves = {"count": 0, "sha1": None}
        original_save = Run.save_checkpoint

        def save_checkpoint(self):
            saves["count"] += 1
            if saves["count"] == 2:  # the disk fills up after the first checkpoint
                saves["sha1"] = sha1(save_dir / ckpt.LAST)
                if mounted:
                    fill(root)
                else:
                    monkeypatch.setattr(torch, "save", torch_writer_failure)
            return original_save(self)

        monkeypatch.setattr(Run, "save_checkpoint", save_checkpoint)
        result = run_script(SCRIPT, *TINY, "--data_dir", micro_cifar, "--save_dir", save_dir, "--epochs", 2)
        assert result.returncode == 1
        one_error_line(result, f"train_unstructured.py: error: {save_dir / ckpt.LAST}: could not be written (No "
                               f"space left on device); the previous version, if any, is intact")
        assert saves["count"] == 2 and sha1(save_dir / ckpt.LAST) == saves["sha1"]
        assert ckpt.load(str(save_dir / ckpt.LAST))["epoch"] == 0
        assert hidden_temporaries(save_dir) == [] and not (save_dir / LOCK_FILE).exists()

        out = root / "model.pt"
        status, line = tool_error(export.main, ["--checkpoint", str(save_dir / ckpt.LAST), "--level", "1",
                                                "--out", str(out)])
        assert status == 2 and line == (f"deploy.export: error: {out}: could not be written (No space left on "
                                         f"device); the previous version, if any, is intact")
        assert not out.exists() and hidden_temporaries(root) == []
        if mounted:  # matplotlib's writer, through the same atomic write
            status, line = tool_error(compare.main, [str(save_dir), "--out", str(root / "compare.png")])
            assert status == 1 and "compare.png: could not be written (No space left on device)" in line
            assert hidden_temporaries(root) == []
            # --eval_only into the full run directory (its lock file cannot record the holder either)
            rows = (save_dir / "metrics.jsonl").read_bytes()
            fill(root)  # what the failed writes above gave back
            result = run_script(SCRIPT, "--eval_only", "--checkpoint", save_dir / ckpt.LAST)
            assert result.returncode == 1
            one_error_line(result, f"{save_dir / 'metrics.jsonl'}: could not be written (No space left on device)")
            assert (save_dir / "metrics.jsonl").read_bytes() == rows
            assert hidden_temporaries(save_dir) == [] and not (save_dir / LOCK_FILE).exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=True)


def tool_error(main, argv):
    """(exit status, the single stderr line) of a tool's main."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            pytest.raises(SystemExit) as stop:
        main(argv)
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    return stop.value.code, lines[0]


# -- 9. a second Ctrl-C ------------------------------------------------------------------
# The real script under runpy, with two real SIGINTs sent by the process to itself: the first
# during the third training step (the run stops after it and saves), the second while that
# checkpoint is being written.
SECOND_CTRL_C = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
from utils import checkpoint as ckpt
from engine.step import TrainStep
steps = [0]
original_step, original_write = TrainStep.__call__, ckpt._write_payload
def step(self, *args):
    steps[0] += 1
    if steps[0] == 3:
        os.kill(os.getpid(), signal.SIGINT)
    return original_step(self, *args)
def write(path, payload):
    if steps[0] >= 3:
        with open(path, "wb") as handle:
            handle.write(b"PK half a checkpoint")
        os.kill(os.getpid(), signal.SIGINT)
    original_write(path, payload)
TrainStep.__call__, ckpt._write_payload = step, write
sys.argv = [{script!r}] + {argv!r}
runpy.run_path(os.path.join({repo!r}, {script!r}), run_name="__main__")
"""


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_without_a_traceback(micro_cifar, tmp_path):
    save_dir = tmp_path / "run"
    argv = [*TINY, "--data_dir", micro_cifar, "--save_dir", str(save_dir), "--epochs", "1"]
    code = SECOND_CTRL_C.format(repo=REPO, script=SCRIPT, argv=argv)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 130, done.stderr
    assert "Interrupted by SIGINT" not in done.stdout  # the saving the first Ctrl-C began was cut short
    one_error_line(done, "train_unstructured.py: error: interrupted (Ctrl-C)", f"in {save_dir}, if any, is intact")
    # The checkpoint of the start of epoch 0 stays, whole; the run resumes from it and finishes.
    assert ckpt.load(str(save_dir / ckpt.LAST))["progress"]["global_step"] == 0
    assert hidden_temporaries(save_dir) == [] and not (save_dir / LOCK_FILE).exists()
    result = run_script(SCRIPT, "--save_dir", save_dir, "--resume")
    assert result.returncode == 0, result.stderr
    assert (save_dir / ckpt.FINAL).exists()


# -- 6. strict JSON when a loss overflows -------------------------------------------------
def strict_json(line):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")
    return json.loads(line, parse_constant=refuse)


@pytest.mark.slow
def test_metrics_stay_strict_json_when_the_loss_is_not_finite(micro_cifar, tmp_path):
    """Finite weights so large that the logits overflow: the evaluation's loss is NaN, which
    metrics.jsonl records as null with the reason beside it."""
    save_dir = tmp_path / "run"
    assert run_script(SCRIPT, *TINY, "--data_dir", micro_cifar, "--save_dir", save_dir, "--epochs", 1,
                      "--train_subset", 8).returncode == 0
    payload = ckpt.load(str(save_dir / ckpt.FINAL))
    classifier = [name for name, value in payload["model"].items() if value.dim() >= 2][-1]
    payload["model"][classifier] = payload["model"][classifier].sign() * 3e38
    huge = tmp_path / "huge.pt"
    torch.save(payload, huge)
    result = run_script(SCRIPT, "--eval_only", "--checkpoint", huge, "--save_dir", save_dir)
    assert result.returncode == 0, result.stderr
    with open(save_dir / "metrics.jsonl") as handle:
        rows = [strict_json(line) for line in handle]
    last = rows[-1]
    assert last["eval_only"] and last["loss"] is None and last["non_finite"]["loss"] in ("nan", "inf")
    assert all(row["loss"] is not None and "non_finite" not in row for row in rows[:-1])
