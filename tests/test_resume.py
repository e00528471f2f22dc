"""Resume, preemption and run-directory safety.

A run interrupted after its first epoch (or by SIGTERM in the middle of an epoch, in a real
subprocess) and resumed must record exactly the metrics and end with exactly the weights
of an uninterrupted run with the same seed; damaged checkpoints and occupied run
directories give one-line errors."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from inprocess import (assert_same_tensors, load_checkpoint, one_thread, read_rows, run_script,  # noqa: F401
                       signal_during_final_evaluation, signal_during_step, single_thread)
from training_params import SCRIPTS, parse
from utils import checkpoint as ckpt
from utils.errors import TrainingError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 4  # --train_subset 32 / --batch_size 8
COMMON = ("--epochs", 2, "--test_freq", 1, "--batch_size", 8, "--train_subset", 32, "--test_subset", 16,
          "--seed", 3)
# One method per setting; each keeps state that a checkpoint must carry: BN running statistics
# and the sandwich sampler (us: widths lo, hi and one random width per step), the line, the
# endpoint sampler and a TopK warmup running over both epochs (lcs_l unstructured), quantizer
# ranges started in epoch 1 (quantized, warmup 25 % of 8 steps = 2 steps).
CASES = {
    "structured-us": ("structured_sparsity", ("--method", "us", "--width_factor_samples", 3,
                                              "--eval_width_factors", "1,0.5,0.25"), signal.SIGTERM),
    # The cluster's warning signal before a time limit or preemption (utils/stop_signals.py).
    "unstructured-lcs_l": ("unstructured_sparsity", ("--eval_topk_grid", "0.05,0.5,1"), signal.SIGUSR2),
    "quantized-lcs_l": ("quantized", ("--eval_bit_widths", "3,8", "--warmup_budget", 25), signal.SIGINT),
    # One slimmable network at a fixed width with BN running statistics; a closed terminal.
    "structured-target_width": ("structured_sparsity", ("--method", "target_width", "--width_factor", 0.5),
                                signal.SIGHUP),
}
# 128 + the signal's number, as a shell reports a process ended by it.
EXIT_STATUS = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGHUP: 129, signal.SIGUSR2: 140}


@pytest.fixture(scope="module")
def straight_run(tiny_cifar, tmp_path_factory):
    """The uninterrupted 2-epoch run of a case (made once per module)."""
    made = {}

    def get(name):
        if name not in made:
            save_dir = tmp_path_factory.mktemp("straight") / name
            setting, flags = case_flags(name, tiny_cifar, save_dir)
            with one_thread():
                assert run_script(setting, *flags) == 0
            made[name] = save_dir
        return made[name]
    return get


def case_flags(name, tiny_cifar, save_dir):
    setting, args, _ = CASES[name]
    return setting, (*COMMON, *args, "--data_dir", tiny_cifar, "--save_dir", save_dir)


def assert_same_state(first, second):
    """Nested dicts/lists of tensors and plain values (optimizer state) are identical."""
    if isinstance(first, dict):
        assert first.keys() == second.keys()
        for key in first:
            assert_same_state(first[key], second[key])
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second)
        for a, b in zip(first, second):
            assert_same_state(a, b)
    elif hasattr(first, "shape"):
        assert_same_tensors({"t": first}, {"t": second})
    else:
        assert first == second


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_run_resumed_after_first_epoch_equals_uninterrupted_run(name, straight_run, tiny_cifar, tmp_path, capsys):
    straight = straight_run(name)
    save_dir = tmp_path / "resumed"
    setting, flags = case_flags(name, tiny_cifar, save_dir)
    signum = CASES[name][2]
    # The signal arrives during the last step of epoch 1: the epoch is completed and saved.
    with signal_during_step(STEPS_PER_EPOCH - 1, signum):
        assert run_script(setting, *flags) == EXIT_STATUS[signum]
    out = capsys.readouterr().out
    assert f"Interrupted by {signal.Signals(signum).name} after epoch 1/2" in out
    assert f"Resume with: python {SCRIPTS[setting]} --save_dir {save_dir} --resume" in out
    progress = load_checkpoint(save_dir / ckpt.LAST)["progress"]
    assert (progress["epoch"], progress["step_in_epoch"], progress["global_step"]) == (1, 0, STEPS_PER_EPOCH)
    assert not progress["finished"] and not (save_dir / ckpt.FINAL).exists()
    straight_rows = read_rows(straight)
    assert read_rows(save_dir) == [row for row in straight_rows if row["epoch"] == 0]

    # A kill between recording an evaluation and saving its checkpoint leaves rows the
    # checkpoint does not know of: the resumed run must record them afresh.
    stale = dict(straight_rows[-1], evaluation=1, epoch=1, final=False, accuracy=-1.0)
    with open(save_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(stale) + "\n")

    # The same flags as the first run plus --resume (values equal to the checkpoint's are fine).
    # A signal during the final evaluation lets the run finish.
    with signal_during_final_evaluation(signum):
        assert run_script(setting, *flags, "--resume") == 0
    assert f"Resumed from epoch 2/2, step 0 of {STEPS_PER_EPOCH}, checkpoint {save_dir / ckpt.LAST} (1 evaluation " \
           f"timed before, " in capsys.readouterr().out
    assert read_rows(save_dir) == straight_rows
    assert_same_tensors(load_checkpoint(save_dir / ckpt.FINAL)["model"],
                        load_checkpoint(straight / ckpt.FINAL)["model"])
    assert_same_state(load_checkpoint(save_dir / ckpt.LAST)["optimizer"],
                      load_checkpoint(straight / ckpt.LAST)["optimizer"])


def to_legacy_config(config):
    """A structured lcs_l config as versions before level-unit grids wrote it: the grid in
    alpha (`alpha_grid`), no `eval_param_grid`."""
    config = dict(config)
    low, high = config["width_factor_limits"]
    config["alpha_grid"] = [(width - low) / (high - low) for width in config.pop("eval_param_grid")]
    return config


def test_run_directory_written_before_level_unit_grids_resumes(tiny_cifar, tmp_path, capsys):
    """A run directory whose checkpoint and config.yaml hold an LCS+L grid in alpha and no
    evaluation timings (as earlier versions wrote them) resumes, says where, and ends as the
    uninterrupted run does."""
    flags = (*COMMON, "--norm", "BN", "--eval_width_factors", "1,0.625,0.25", "--data_dir", tiny_cifar)
    straight, legacy = tmp_path / "straight", tmp_path / "legacy"
    assert run_script("structured_sparsity", *flags, "--save_dir", straight) == 0
    with signal_during_step(STEPS_PER_EPOCH + 1, signal.SIGTERM):
        assert run_script("structured_sparsity", *flags, "--save_dir", legacy) == 143
    payload = load_checkpoint(legacy / ckpt.LAST)
    assert len(payload.pop("evaluation_seconds")) == 2  # epochs 0 and 1 were evaluated
    payload["config"] = to_legacy_config(payload["config"])
    assert payload["config"]["alpha_grid"] == [1.0, 0.5, 0.0]
    ckpt.save(str(legacy / ckpt.LAST), payload)
    (legacy / "config.yaml").write_text(yaml.safe_dump(payload["config"], sort_keys=False))

    config, _ = parse("structured_sparsity", ["--config", str(legacy / "config.yaml")])
    assert config.eval_param_grid == [1.0, 0.625, 0.25] and not config.has("alpha_grid")
    capsys.readouterr()
    assert run_script("structured_sparsity", "--save_dir", legacy, "--resume") == 0
    # Interrupted in the second step of epoch 2 (after the step, at 2 of 4).
    assert f"Resumed from epoch 2/2, step 2 of {STEPS_PER_EPOCH}, checkpoint {legacy / ckpt.LAST}\n" in \
        capsys.readouterr().out
    assert read_rows(legacy) == read_rows(straight)
    assert [row["alpha"] for row in read_rows(legacy)][:3] == [1.0, 0.5, 0.0]
    assert_same_tensors(load_checkpoint(legacy / ckpt.FINAL)["model"],
                        load_checkpoint(straight / ckpt.FINAL)["model"])


def test_cases_cover_every_stop_signal():
    """One resume case per signal that stops a run politely."""
    from utils.stop_signals import STOP_SIGNALS
    assert sorted(case[2] for case in CASES.values()) == sorted(STOP_SIGNALS)


def test_cases_cover_the_warmups_state(straight_run):
    """The resume cases really cross the state they claim to: TopK still decaying at the
    epoch-1 evaluation (unstructured) and activation quantization started in epoch 1."""
    rows = read_rows(straight_run("unstructured-lcs_l"))
    warmup = -(-8 * 80 // 100)  # ceil(0.8 * 2 epochs * 32 images / 8) = 7 steps
    epoch1 = {row["level"]: row for row in rows if row["epoch"] == 1 and not row["final"]}
    assert epoch1[0.05]["effective_topk"] == pytest.approx(0.05 + 0.95 * (1 - STEPS_PER_EPOCH / warmup))
    rows = read_rows(straight_run("quantized-lcs_l"))
    assert [row["act_quant"] for row in rows if row["epoch"] == 0] == [False, False]
    assert all(row["act_quant"] for row in rows if row["epoch"] >= 1)


@pytest.mark.slow
def test_sigterm_mid_epoch_in_subprocess_then_printed_resume_command(tiny_cifar, tmp_path, capsys):
    """SIGTERM to a real training process in the middle of an epoch: it finishes the step,
    saves, says how to resume and exits 143; the printed command finishes the run with the
    metrics and weights of an uninterrupted run."""
    steps = 12  # --train_subset 48 / --batch_size 4: the signal lands well inside the epoch
    flags = ("--data_dir", tiny_cifar, "--epochs", 1, "--test_freq", 1, "--batch_size", 4, "--train_subset", 48,
             "--test_subset", 16, "--eval_topk_grid", "0.05,1", "--seed", 1)
    reference = tmp_path / "reference"
    assert run_script("unstructured_sparsity", *flags, "--save_dir", reference) == 0
    capsys.readouterr()

    save_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "train_unstructured.py", *map(str, flags), "--save_dir", str(save_dir)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output, signalled = [], False
    for line in process.stdout:
        output.append(line)
        if line.startswith("epoch 1/1 [") and not signalled:  # the first step is done
            process.send_signal(signal.SIGTERM)
            signalled = True
    status = process.wait(timeout=120)
    output = "".join(output)
    assert status == 143, output
    match = re.search(rf"Interrupted by SIGTERM in epoch 1/1 after step (\d+)/{steps}; saved (\S+)\.", output)
    assert match, output
    stopped_after = int(match.group(1))
    assert 0 < stopped_after < steps
    progress = load_checkpoint(save_dir / ckpt.LAST)["progress"]
    assert (progress["epoch"], progress["step_in_epoch"], progress["global_step"]) == (0, stopped_after,
                                                                                        stopped_after)

    resume = shlex.split(re.search(r"Resume with: (.+)", output).group(1))
    assert resume[0] == "python"
    result = subprocess.run([sys.executable, *resume[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert read_rows(save_dir) == read_rows(reference)
    assert_same_tensors(load_checkpoint(save_dir / ckpt.FINAL)["model"],
                        load_checkpoint(reference / ckpt.FINAL)["model"])


def truncate(path, size=None):
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[:len(data) // 2 if size is None else size])


def assert_one_line_error(stderr, *parts):
    text = stderr.strip()
    assert "\n" not in text and "Traceback" not in text, stderr
    for part in parts:
        assert part in text, text


def test_truncated_checkpoint_is_a_one_line_error(straight_run, tmp_path, cli, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run("unstructured-lcs_l"), run_dir)
    truncate(run_dir / ckpt.LAST)
    truncate(run_dir / ckpt.FINAL)
    result = cli("train_unstructured.py", "--save_dir", run_dir, "--resume", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "train_unstructured.py: error:", str(run_dir / ckpt.LAST),
                          "not a readable checkpoint (truncated or damaged?")

    (run_dir / "empty.pt").write_bytes(b"")
    for path in (run_dir / ckpt.FINAL, run_dir / ckpt.LAST, run_dir / "empty.pt"):
        assert run_script("unstructured_sparsity", "--eval_only", "--checkpoint", path) == 2
        assert_one_line_error(capsys.readouterr().err, str(path), "not a readable checkpoint")


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / ckpt.LAST
    payload = {"format": ckpt.FORMAT, "model": {}, "epoch": 1}
    ckpt.save(path, payload)

    def full_disk(temporary):
        with open(temporary, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    def killed(temporary):
        with open(temporary, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(TrainingError, match="could not be written .No space left on device.; the previous"):
        ckpt.atomic_write(path, full_disk)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write(path, killed)
    assert ckpt.load(path) == payload
    assert os.listdir(tmp_path) == [ckpt.LAST]  # no temporary file left behind


@pytest.mark.parametrize("value, flushed", [(None, True), ("1", True), ("0", False), (" 0 ", False)])
def test_a_write_is_flushed_to_disk_before_its_rename_unless_lcs_fsync_is_0(tmp_path, monkeypatch, value, flushed):
    """The default flushes the temporary file before it replaces the old one (a power cut leaves
    the old or the new file, never an empty one); LCS_FSYNC=0 (the test suite's setting) skips
    the flush and nothing else."""
    from utils import atomic

    if value is None:
        monkeypatch.delenv(atomic.FSYNC_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(atomic.FSYNC_VARIABLE, value)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: events.append(("replace", str(src))) or
                        real_replace(src, dst))
    path = tmp_path / "file.txt"
    atomic.atomic_write(path, lambda temporary: open(temporary, "w").write("new"))
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["file.txt"]
    temporary = atomic.temporary_path(path)
    assert events == ([("fsync", temporary)] if flushed else []) + [("replace", temporary)]


def test_occupied_run_dir_is_refused_and_overwrite_replaces_it(straight_run, tiny_cifar, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run("structured-us"), run_dir)
    before = {name: (run_dir / name).read_bytes() for name in os.listdir(run_dir)}
    setting, flags = case_flags("structured-us", tiny_cifar, run_dir)
    assert run_script(setting, *flags) == 2
    assert_one_line_error(capsys.readouterr().err, f"--save_dir {run_dir}: already holds a run",
                          "pass --resume to continue it or --overwrite to replace it")
    assert {name: (run_dir / name).read_bytes() for name in os.listdir(run_dir)} == before

    one_epoch = [str(flag) for flag in flags]
    one_epoch[one_epoch.index("--epochs") + 1] = "1"
    assert run_script(setting, *one_epoch, "--overwrite") == 0
    rows = read_rows(run_dir)
    assert sorted({row["evaluation"] for row in rows}) == [0, 1]
    assert [row["epoch"] for row in rows if row["final"]] == [1, 1, 1]
    assert load_checkpoint(run_dir / ckpt.FINAL)["config"]["epochs"] == 1
    assert "epochs: 1" in (run_dir / "config.yaml").read_text()


def test_resume_refusals_and_a_finished_run(straight_run, tiny_cifar, tmp_path, capsys):
    straight = straight_run("unstructured-lcs_l")
    setting, flags = case_flags("unstructured-lcs_l", tiny_cifar, straight)
    metrics = (straight / "metrics.jsonl").read_bytes()

    assert run_script(setting, *flags, "--resume") == 0
    assert f"The run in {straight} has already finished (2 epochs)." in capsys.readouterr().out
    assert (straight / "metrics.jsonl").read_bytes() == metrics

    changed = [str(flag) for flag in flags]
    changed[changed.index("--epochs") + 1] = "3"
    assert run_script(setting, *changed, "--resume") == 2
    assert_one_line_error(capsys.readouterr().err,
                          "--epochs: cannot be changed when resuming (the checkpoint's epochs is 2, not 3)")
    assert run_script(setting, "--resume", straight / ckpt.LAST, "--learning_rate", 0.5) == 2
    assert_one_line_error(capsys.readouterr().err, "--learning_rate: cannot be changed when resuming")
    assert run_script(setting, "--resume", straight / ckpt.LAST, "--method", "lcs_p") == 2
    assert_one_line_error(capsys.readouterr().err, "--method: cannot be changed when resuming")

    assert run_script(setting, "--resume", straight / ckpt.FINAL) == 2
    assert_one_line_error(capsys.readouterr().err, "holds a final model of unstructured_sparsity/lcs_l (cpreresnet20), "
                                                   "resuming needs a training checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_script(setting, "--save_dir", empty, "--resume") == 2
    assert_one_line_error(capsys.readouterr().err, f"--resume: no checkpoint_last.pt in {empty}")
    assert run_script("structured_sparsity", "--resume", straight / ckpt.LAST) == 2
    assert_one_line_error(capsys.readouterr().err, "holds a training checkpoint of unstructured_sparsity/lcs_l")


def test_resume_hint_names_torchrun_when_the_run_was_distributed():
    from engine.run_dir import resume_command
    args = ("train_quantized.py", "runs/my run")
    assert resume_command(*args, {}) == "python train_quantized.py --save_dir 'runs/my run' --resume"
    single_node = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}
    assert resume_command(*args, single_node) == (
        "torchrun --standalone --nproc_per_node=4 --signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2 "
        "train_quantized.py --save_dir 'runs/my run' --resume")
    two_nodes = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    assert resume_command(*args, two_nodes).startswith("torchrun <this run's torchrun options")
