"""experiments/reproduce.py --launcher slurm (experiments/launchers.py), through submitit.

Without a cluster: submitit's LocalExecutor runs the jobs on this machine (--slurm_executor
local), the same code path as on Slurm. A tiny sweep is submitted, its job is sent the warning
signal while it trains (as Slurm does before a time limit or a preemption): the run saves its
checkpoint, submitit requeues the job, the run resumes and ends with the numbers and weights of
an uninterrupted run; calling the sweep again while it runs or once it has finished submits
nothing. The sbatch options the flags give, and the refusals, in one line each.
"""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from cli_helpers import micro_cifar  # noqa: F401  (fixture)
from conftest import REPO
from inprocess import assert_same_tensors
from test_reproduce import sweep, write_recipe
from utils.stop_signals import WARNING_SIGNAL

submitit = pytest.importorskip("submitit", reason="submitit is not installed (pip install -r requirements-slurm.txt)")

RUN = ("quantized", "target_bit_width")
LOCAL_JOBS = ("--launcher", "slurm", "--slurm_executor", "local", "--slurm_gpus", 0, "--slurm_time", 10)


def descendants(pid):
    """{pid: command line} of the processes below `pid`."""
    found = {}
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            children = [int(child) for child in handle.read().split()]
    except OSError:
        return found
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as handle:
                found[child] = handle.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        found.update(descendants(child))
    return found


def job_processes(controller):
    """(the job's task: submitit's process, which Slurm would signal; the training below it)."""
    processes = descendants(controller)
    task = next(pid for pid, command in processes.items() if "submitit.core._submit" in command)
    training = next(pid for pid, command in processes.items() if "train_quantized.py" in command)
    return task, training


def wait_until(condition, what, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def log_text(path):
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds the job's processes in /proc")
def test_tiny_sweep_submitted_preempted_requeued_resumed_equals_uninterrupted_run(tmp_path, micro_cifar):
    recipe = write_recipe(tmp_path / "tiny.yaml", "--epochs 8 --batch_size 2 --threads 1 --no-eval_at_start "
                                                  "--test_freq 8", ["/".join(RUN)])
    out = tmp_path / "out"
    run_dir = out / RUN[0] / RUN[1]
    common = ("--recipe", recipe, "--data_dir", micro_cifar)

    submitted = sweep(*common, "--out", out, *LOCAL_JOBS)
    assert submitted.returncode == 0, submitted.stderr
    assert f"submitted {'/'.join(RUN)} as job " in submitted.stdout
    record = json.loads((run_dir / "sweep_run.json").read_text())
    assert record["status"] == "submitted" and record["job"]["executor"] == "local"
    controller = int(record["job"]["id"])

    # While the job trains (held still with SIGSTOP, so that it cannot finish meanwhile): called
    # again, the sweep shows it running and submits nothing; --summary_only shows it too.
    wait_until(lambda: "epoch 2/8" in log_text(run_dir / "train.log"), "the run's second epoch")
    task, training = job_processes(controller)
    os.kill(training, signal.SIGSTOP)
    try:
        again = sweep(*common, "--out", out, *LOCAL_JOBS)
        assert again.returncode == 0, again.stderr
        assert f"{'/'.join(RUN)}: running (job {controller})" in again.stdout and "submitted " not in again.stdout
        summary = sweep(*common, "--out", out, *LOCAL_JOBS, "--summary_only")
        assert summary.returncode == 0, summary.stderr
        assert f"| {'/'.join(RUN)} | 0 | running (job {controller}) |" in (out / "summary.md").read_text()
        # The warning signal to the job's task, as Slurm sends it before the end of a job.
        os.kill(task, WARNING_SIGNAL)
        time.sleep(0.5)  # the task passes it on to the training process
    finally:
        os.kill(training, signal.SIGCONT)
    wait_until(lambda: not os.path.exists(f"/proc/{controller}"), "the job's end")

    log = log_text(run_dir / "train.log")
    assert f"Interrupted by {WARNING_SIGNAL.name} in epoch" in log or f"Interrupted by {WARNING_SIGNAL.name} after" \
        in log, log[-2000:]
    assert "Resumed from epoch" in log and log.count("Slurm job ") == 2
    job_log = "".join(path.read_text() for path in (out / "slurm_jobs").glob("*_log.out"))
    assert "Requeued job" in job_log and "Job completed successfully" in job_log

    # Called again: finished, nothing submitted; the summary has the run's results.
    final = sweep(*common, "--out", out, *LOCAL_JOBS)
    assert final.returncode == 0, final.stderr
    assert f"{'/'.join(RUN)}: finished" in final.stdout and "submitted " not in final.stdout
    text = (out / "summary.md").read_text()
    assert f"| {'/'.join(RUN)} | 0 | finished |" in text and "| num_bits |" in text

    # The same run, uninterrupted, by the local launcher.
    reference = sweep(*common, "--out", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    reference_dir = tmp_path / "reference" / RUN[0] / RUN[1]

    def final_rows(directory):
        rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        return [(row["level"], row["accuracy"], row["loss"], row["step"]) for row in rows if row["final"]]
    assert final_rows(run_dir) == final_rows(reference_dir)
    assert_same_tensors(*(torch.load(directory / "model_final.pt", weights_only=True)["model"]
                          for directory in (run_dir, reference_dir)))


def flags(**given):
    values = {"slurm_time": 240, "slurm_gpus": 1, "slurm_cpus": None, "slurm_partition": None,
              "slurm_account": None, "slurm_option": [], "slurm_signal_delay_s": 120}
    values.update(given)
    return SimpleNamespace(**values)


def test_flags_give_the_sbatch_options(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    from experiments import launchers
    args = flags(slurm_partition="gpu", slurm_time=300, slurm_gpus=4, slurm_cpus=8, slurm_account="lab",
                 slurm_option=["qos=high", "--constraint=a100"])
    text = _make_sbatch_string(command="CMD", folder=str(tmp_path), **launchers.slurm_parameters(args))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=300", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=8", "#SBATCH --account=lab",
                 "#SBATCH --qos=high", "#SBATCH --constraint=a100", "#SBATCH --nodes=1",
                 f"#SBATCH --signal={WARNING_SIGNAL.name[3:]}@120"):
        assert line in text.splitlines(), text
    assert f"export PYTHONPATH={REPO}" in text  # the job imports the project from any folder
    cpu_parameters = launchers.slurm_parameters(flags(slurm_gpus=0))
    cpu_job = _make_sbatch_string(command="CMD", folder=str(tmp_path), **cpu_parameters)
    assert "gpus" not in cpu_job and "#SBATCH --ntasks-per-node=1" in cpu_job.splitlines()


def test_dry_run_describes_the_jobs():
    result = sweep("--recipe", "cpu", "--dry_run", "--out", "/nonexistent/out", "--launcher", "slurm",
                   "--slurm_partition", "gpu", "--slurm_option", "qos=high")
    assert result.returncode == 0, result.stderr
    assert ("# each run a job on Slurm: partition gpu, 240 min per job, 1 GPU(s) per run as 1 task(s), --qos=high; "
            f"{WARNING_SIGNAL.name} 120 s before the limit: checkpoint, requeue, resume") in result.stdout


@pytest.mark.parametrize("args, environ, message", [
    (["--slurm_partition", "gpu"], {}, "--slurm_partition: only used with --launcher slurm"),
    (["--launcher", "slurm", "--gpus", "0,1"], {}, "--gpus: not used with --launcher slurm"),
    (["--launcher", "slurm", "--slurm_option", "qos"], {}, "--slurm_option 'qos': expected KEY=VALUE"),
    (["--launcher", "slurm", "--slurm_time", "0"], {}, "--slurm_time 0: must lie in 1..525600 minutes"),
    (["--launcher", "slurm", "--slurm_signal_delay_s", "900", "--slurm_time", "10"], {},
     "--slurm_signal_delay_s 900: must lie between 10 s and the time limit (600 s)"),
    (["--launcher", "slurm"], {"SUBMITIT_PREEMPT_SIGNAL": "USR1"}, "SUBMITIT_PREEMPT_SIGNAL=USR1: the runs save"),
    (["--launcher", "slurm"], {"PATH": os.path.dirname(sys.executable)}, "no Slurm here (sbatch not found)"),
])
def test_refused_in_one_line_before_anything_is_written(tmp_path, args, environ, message):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "reproduce.py"), "--recipe", "cpu",
                             "--out", str(out), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, **environ))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert not out.exists()


def test_missing_submitit_names_the_requirements_file(tmp_path, monkeypatch, capsys):
    from experiments import reproduce
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    out = tmp_path / "out"
    assert reproduce.main(["--recipe", "cpu", "--out", str(out), "--launcher", "slurm",
                           "--slurm_executor", "local"]) == 2
    assert capsys.readouterr().err == ("reproduce.py: error: --launcher slurm: needs the submitit package: "
                                       "pip install -r requirements-slurm.txt\n")
    assert not out.exists()
