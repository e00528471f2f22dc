"""Faults during a run: a non-finite loss, weights that overflow, a damaged checkpoint, a
save directory that stops accepting writes. The run stops with one line, exits non-zero and
the last good checkpoint stays on disk, byte for byte."""

import errno
import hashlib
import io
import os
import re
import sys

import pytest
import torch

import training_params
from utils import checkpoint as ckpt
from utils.errors import CheckpointError, DataError, TrainingError, one_line
from engine import train
from engine.step import TrainStep
from engine.train import Run

# One TopK level, 16 training images in 2 steps per epoch, 10 test images: the smallest run
# that trains, evaluates and checkpoints.
TINY_RUN = ["--method", "target_topk", "--eval_topk_grid", "1", "--epochs", "2", "--batch_size", "8",
            "--train_subset", "16", "--test_subset", "10", "--test_freq", "1"]
SETTING = "unstructured_sparsity"


def run_main(argv, capsys):
    """training_params.main in this process: (exit status, the stderr lines)."""
    with pytest.raises(SystemExit) as stop:
        training_params.main(SETTING, argv)
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def sha1(path):
    with open(path, "rb") as handle:
        return hashlib.sha1(handle.read()).hexdigest()


def finite_weights(payload):
    return all(bool(torch.isfinite(t).all()) for t in payload["model"].values() if t.is_floating_point())


def no_temporary_files(save_dir):
    return [name for name in os.listdir(save_dir) if ".tmp" in name] == []


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_cifar, tmp_path, capsys):
    save_dir = tmp_path / "run"
    status, lines = run_main(["--data_dir", tiny_cifar, "--save_dir", str(save_dir), "--learning_rate", "1e30",
                              *TINY_RUN], capsys)
    assert status == 1
    assert len(lines) == 1, lines
    match = re.fullmatch(r"train_unstructured\.py: error: non-finite loss \((nan|inf|-inf)\) at epoch (\d+), "
                         r"step (\d+) \(levels: topk=[0-9.]+\); training stopped, the last good checkpoint is "
                         r"(\S+); try a lower --learning_rate \(now 1e\+30\)", lines[0])
    assert match, lines[0]
    epoch, step, path = int(match.group(2)), int(match.group(3)), match.group(4)
    assert path == str(save_dir / ckpt.LAST)
    payload = ckpt.load(path)
    assert finite_weights(payload)
    # The checkpoint comes from before the failing step.
    assert (payload["epoch"], payload["progress"]["step_in_epoch"]) <= (epoch, step)
    assert payload["global_step"] <= epoch * 2 + step
    assert no_temporary_files(save_dir)


@pytest.mark.slow
def test_weights_that_overflow_after_a_finite_loss_are_not_saved(tiny_cifar, tmp_path, capsys, monkeypatch):
    """The last step of an epoch can report a finite loss while its update overflows: the
    end-of-epoch checkpoint must not replace the good one with NaN weights."""
    original = TrainStep.__call__
    calls = iter(range(10**6))

    def overflowing_step(self, *args):
        result = original(self, *args)
        if next(calls) == 1:  # the second (last) step of epoch 0, after its loss
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
        return result

    monkeypatch.setattr(TrainStep, "__call__", overflowing_step)
    save_dir = tmp_path / "run"
    status, lines = run_main(["--data_dir", tiny_cifar, "--save_dir", str(save_dir), *TINY_RUN], capsys)
    assert status == 1
    assert len(lines) == 1 and lines[0].startswith("train_unstructured.py: error: non-finite weights ("), lines
    assert "after 2 training steps (before epoch 1, step 0)" in lines[0], lines[0]
    assert "try a lower --learning_rate" in lines[0]
    payload = ckpt.load(str(save_dir / ckpt.LAST))
    assert finite_weights(payload)
    assert payload["epoch"] == 0 and payload["global_step"] == 0  # the start-of-epoch-0 checkpoint
    assert not (save_dir / ckpt.FINAL).exists()


def _writes_are_refused_by_chmod(tmp_path):
    """False when this process may write into a read-only directory (root)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "file").write_text("x")
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["read_only_directory", "disk_full"])
def test_failed_save_leaves_the_previous_checkpoint_intact(fault, tiny_cifar, tmp_path, capsys, monkeypatch):
    """The second checkpoint of the run (end of epoch 0) fails to be written.

    read_only_directory: the save directory is made read-only just before that save. Where
    chmod does not stop this process (root), opening a file for writing in it is made to fail
    with EACCES instead, as the kernel does for other users.
    disk_full: torch.save writes half of the checkpoint, then the disk is full (ENOSPC)."""
    save_dir = tmp_path / "run"
    last = save_dir / ckpt.LAST
    saved = {"calls": 0, "sha1": None}
    original_save = Run.save_checkpoint

    def save_checkpoint(self):
        saved["calls"] += 1
        if saved["calls"] == 2:
            saved["sha1"] = sha1(last)
            if fault == "read_only_directory":
                save_dir.chmod(0o555)
                if not _writes_are_refused_by_chmod(tmp_path):
                    monkeypatch.setattr(ckpt, "open", refuse_writes_in(save_dir), raising=False)
        return original_save(self)

    real_torch_save = torch.save

    def torch_save_until_disk_full(payload, handle, *args, **kwargs):
        if saved["calls"] < 2:
            return real_torch_save(payload, handle, *args, **kwargs)
        buffer = io.BytesIO()
        real_torch_save(payload, buffer)
        handle.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Run, "save_checkpoint", save_checkpoint)
    if fault == "disk_full":
        monkeypatch.setattr(torch, "save", torch_save_until_disk_full)
    try:
        status, lines = run_main(["--data_dir", tiny_cifar, "--save_dir", str(save_dir), *TINY_RUN], capsys)
    finally:
        save_dir.chmod(0o755)
    assert status == 1
    assert len(lines) == 1, lines
    reason = "Permission denied" if fault == "read_only_directory" else "No space left on device"
    assert lines[0] == (f"train_unstructured.py: error: {last}: could not be written ({reason}); the previous "
                        f"version, if any, is intact"), lines[0]
    assert saved["calls"] == 2
    assert sha1(last) == saved["sha1"]
    assert ckpt.load(str(last))["epoch"] == 0
    assert no_temporary_files(save_dir)


def refuse_writes_in(directory):
    """An `open` that fails like a read-only directory for files opened for writing in it."""
    import builtins

    def guarded_open(path, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and os.path.dirname(os.path.abspath(path)) == str(directory):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return builtins.open(path, mode, *args, **kwargs)
    return guarded_open


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def half_then_full(temporary):
        with open(temporary, "w") as handle:
            handle.write("new, cut short")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(TrainingError, match=r"metrics\.jsonl: could not be written \(No space left on device\)"):
        ckpt.atomic_write(str(path), half_then_full)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    ckpt.save(str(path), {"format": ckpt.FORMAT, "kind": "training", "setting": SETTING,
                          "model": {"weight": torch.arange(50000.0)}, "config": {}})
    data = path.read_bytes()
    assert ckpt.load(str(path))["model"]["weight"][-1] == 49999.0
    for length in (0, 1, len(data) // 3, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut_{length}.pt"
        cut.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(cut))}: not a readable checkpoint "
                                                  r"\(truncated or damaged\?"):
            ckpt.load(str(cut))


def test_worker_errors_reach_the_user_as_their_own_line():
    """A DataError raised in a DataLoader worker is re-raised in the main process with the
    worker's traceback in its message; the user sees the original line only."""
    from torch.utils.data._utils.worker import ExceptionWrapper

    try:
        raise DataError("/data/train/n01/broken.JPEG: cannot read image (image file is truncated)")
    except DataError:
        wrapped = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(DataError) as raised:
        wrapped.reraise()
    assert "Traceback" in str(raised.value)
    assert one_line(raised.value) == "/data/train/n01/broken.JPEG: cannot read image (image file is truncated)"
    assert one_line(DataError("a\n  b")) == "a b"


def test_unexpected_os_errors_are_one_line(monkeypatch, capsys):
    """A failed read or write no check foresaw still ends with one line and status 1."""
    def full_disk(config, options):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/results.csv")

    monkeypatch.setattr(training_params, "parse", lambda setting, argv: (None, None))
    monkeypatch.setattr(train, "run", full_disk)  # main imports it once the command is checked
    status, lines = run_main([], capsys)
    assert status == 1
    assert lines == ["train_unstructured.py: error: /runs/x/results.csv: No space left on device"]


def test_state_mismatch_names_missing_unexpected_and_reshaped_tensors():
    expected = {"conv.weight": torch.zeros(4, 3, 3, 3), "bn.weight": torch.zeros(4), "bn.bias": torch.zeros(4)}
    found = {"conv.weight": torch.zeros(8, 3, 3, 3), "bn.weight": torch.zeros(4), "fc.weight": torch.zeros(2)}
    assert ckpt.state_mismatch(expected, found) == (
        "1 tensor(s) missing, e.g. bn.bias; 1 unexpected, e.g. fc.weight; 1 of another shape, e.g. conv.weight "
        "(8, 3, 3, 3) instead of (4, 3, 3, 3)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_finite_finds_nan_and_infinity_anywhere(dtype):
    """The finiteness check of checkpoints and weights (aminmax): NaN, +inf and -inf at the
    first, a middle and the last position of tensors of awkward sizes; an empty tensor is finite."""
    from utils.checkpoint_schema import finite

    generator = torch.Generator().manual_seed(0)
    assert bool(finite(torch.zeros(0, dtype=dtype)))
    for size in (1, 7, 33, 1000, 4099):
        clean = torch.randn(size, generator=generator).to(dtype)
        assert bool(finite(clean)) and finite(clean).shape == ()
        for position in {0, size // 2, size - 1}:
            for bad in (float("nan"), float("inf"), -float("inf")):
                tensor = clean.clone()
                tensor[position] = bad
                assert not bool(finite(tensor.view(1, -1))), (size, position, bad)
