"""The sweep on a Slurm cluster: each run of experiments/reproduce.py as a Slurm job, through
submitit (an optional dependency: pip install -r requirements-slurm.txt).

    python experiments/reproduce.py --recipe paper --data_dir data/cifar10-jpeg --out results/paper \
        --launcher slurm --slurm_partition gpu --slurm_time 240 --slurm_gpus 1

* A job runs the run's own command (the entry script, as the local launcher does) in the folder
  the sweep was called from; with --slurm_gpus N it is one job of N tasks, one process per GPU,
  which join the project's DDP through the variables torchrun would set (RANK, WORLD_SIZE, ...,
  from submitit's TorchDistributedEnvironment).
* Preemption and time limits: Slurm sends the warning signal (utils.stop_signals.WARNING_SIGNAL,
  SIGUSR2, submitit's own) --slurm_signal_delay_s seconds before the end, to every process of
  the job. The job passes it (and SIGTERM, SIGHUP) on to its training process, which saves its
  checkpoint after its current step and exits; the processes of a multi-GPU run agree to stop
  together. Then submitit's own handler requeues the job, which continues with --resume (bit-exact).
* Calling the sweep again reads each run's state from its record (sweep_run.json: the job's id,
  its state from Slurm's sacct) and its files: finished, queued, running, or ended unfinished
  (failed, with its log's last line); it submits only what is neither finished nor queued or
  running. The sweep returns once the jobs are submitted: nothing depends on its shell.
* --slurm_executor local runs the same jobs on this machine with submitit's LocalExecutor (no
  queue; its controller process stands in for Slurm, the time limit and the warning signal
  included): a check of a recipe, and the tests' way to run this path without a cluster.
"""

import contextlib
import datetime
import os
import shlex
import shutil
import signal
import subprocess
import sys

from engine import run_dir as run_files
from utils.errors import ConfigError
from utils.stop_signals import WARNING_SIGNAL, stopped_by

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS_FOLDER = "slurm_jobs"   # under --out: submitit's pickles and each job's own log
MAX_REQUEUES = 1000          # time-limit requeues submitit allows a job (its default, 3, ends long runs)
QUEUED = {"PENDING", "REQUEUED", "CONFIGURING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


def add_arguments(parser):
    """The launcher flags of reproduce.py."""
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: the runs as processes of this machine (default); slurm: each run as a "
                             "Slurm job through submitit (docs/cluster.md)")
    parser.add_argument("--slurm_partition", help="Slurm partition of the jobs (default: the cluster's)")
    parser.add_argument("--slurm_time", type=int, default=240,
                        help="time limit of each job in minutes; a run that needs longer is requeued and "
                             "resumed (default: 240)")
    parser.add_argument("--slurm_gpus", type=int, default=1,
                        help="GPUs per run: one job of that many tasks under DDP; 0 for CPU jobs (default: 1)")
    parser.add_argument("--slurm_cpus", type=int, default=None,
                        help="CPUs per task (default: the cluster's)")
    parser.add_argument("--slurm_account", help="Slurm account charged (default: the user's)")
    parser.add_argument("--slurm_option", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra sbatch option, e.g. qos=high or constraint=a100 (repeatable)")
    parser.add_argument("--slurm_signal_delay_s", type=int, default=120,
                        help="seconds before the time limit at which Slurm sends the warning signal SIGUSR2 "
                             "(default: 120)")
    parser.add_argument("--slurm_executor", choices=("slurm", "local"), default="slurm",
                        help="local: submitit's LocalExecutor runs the jobs on this machine (a check without a "
                             "cluster; default: slurm)")


SLURM_FLAGS = ("slurm_partition", "slurm_account", "slurm_option", "slurm_cpus")


def check(args):
    """The launcher flags, checked before anything runs or is written."""
    if args.launcher == "local":
        given = [name for name in SLURM_FLAGS if getattr(args, name)]
        if given:
            raise ConfigError(f"--{given[0]}: only used with --launcher slurm")
        return
    if args.gpus is not None:
        raise ConfigError("--gpus: not used with --launcher slurm (Slurm gives each job its GPUs: --slurm_gpus N)")
    if not 1 <= args.slurm_time <= 525600:
        raise ConfigError(f"--slurm_time {args.slurm_time}: must lie in 1..525600 minutes")
    if not 0 <= args.slurm_gpus <= 64:
        raise ConfigError(f"--slurm_gpus {args.slurm_gpus}: must lie in 0..64")
    if args.slurm_cpus is not None and not 1 <= args.slurm_cpus <= 1024:
        raise ConfigError(f"--slurm_cpus {args.slurm_cpus}: must lie in 1..1024")
    if not 10 <= args.slurm_signal_delay_s < 60 * args.slurm_time:
        raise ConfigError(f"--slurm_signal_delay_s {args.slurm_signal_delay_s}: must lie between 10 s and the "
                          f"time limit ({60 * args.slurm_time} s)")
    sbatch_options(args.slurm_option)
    submitit_signal = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", WARNING_SIGNAL.name[3:])
    if submitit_signal != WARNING_SIGNAL.name[3:]:
        raise ConfigError(f"SUBMITIT_PREEMPT_SIGNAL={submitit_signal}: the runs save their checkpoint on "
                          f"{WARNING_SIGNAL.name}; unset it or set it to {WARNING_SIGNAL.name[3:]}")
    if not args.dry_run:
        require_submitit()
        if args.slurm_executor == "slurm" and not args.summary_only and shutil.which("sbatch") is None:
            raise ConfigError("--launcher slurm: no Slurm here (sbatch not found); run it on the cluster's login "
                              "node, or try the jobs on this machine with --slurm_executor local")


def sbatch_options(options):
    """{key: value} of the --slurm_option KEY=VALUE flags."""
    parsed = {}
    for option in options:
        key, equals, value = option.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not equals or not key or not value or not key.replace("_", "").isalnum():
            raise ConfigError(f"--slurm_option {option!r}: expected KEY=VALUE, an sbatch option without its "
                              f"dashes, e.g. qos=high")
        parsed[key] = value
    return parsed


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher slurm: needs the submitit package: pip install -r requirements-slurm.txt") \
            from None
    return submitit


def make_executor(args, folder):
    """submitit's executor of the jobs, with every Slurm parameter of the flags."""
    submitit = require_submitit()
    if args.slurm_executor == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=MAX_REQUEUES)
        executor.update_parameters(timeout_min=args.slurm_time, gpus_per_node=args.slurm_gpus,
                                   tasks_per_node=max(1, args.slurm_gpus), signal_delay_s=args.slurm_signal_delay_s,
                                   stderr_to_stdout=True, setup=job_setup())
        return executor
    executor = submitit.SlurmExecutor(folder, max_num_timeout=MAX_REQUEUES)
    executor.update_parameters(**slurm_parameters(args))
    return executor


def job_setup():
    """Shell lines before each job: the jobs import the project (experiments.launchers) wherever
    the sweep was called from."""
    return [f"export PYTHONPATH={shlex.quote(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}"]


def slurm_parameters(args):
    """submitit.SlurmExecutor's parameters (its sbatch options) of the flags."""
    parameters = {"time": args.slurm_time, "nodes": 1, "ntasks_per_node": max(1, args.slurm_gpus),
                  "signal_delay_s": args.slurm_signal_delay_s, "stderr_to_stdout": True, "setup": job_setup(),
                  "additional_parameters": sbatch_options(args.slurm_option)}
    if args.slurm_gpus:
        parameters["gpus_per_node"] = args.slurm_gpus
    for key, value in (("partition", args.slurm_partition), ("account", args.slurm_account),
                       ("cpus_per_task", args.slurm_cpus)):
        if value:
            parameters[key] = value
    return parameters


def describe(args):
    """One comment line of the dry run: where and how the jobs would go."""
    where = "this machine (submitit's LocalExecutor)" if args.slurm_executor == "local" else "Slurm"
    parts = [f"partition {args.slurm_partition}" if args.slurm_partition else "the default partition",
             f"{args.slurm_time} min per job", f"{args.slurm_gpus} GPU(s) per run as {max(1, args.slurm_gpus)} task(s)"]
    if args.slurm_account:
        parts.append(f"account {args.slurm_account}")
    parts += [f"--{key}={value}" for key, value in sbatch_options(args.slurm_option).items()]
    return (f"# each run a job on {where}: {', '.join(parts)}; {WARNING_SIGNAL.name} {args.slurm_signal_delay_s} s "
            f"before the limit: checkpoint, requeue, resume")


# ----------------------------------------------------------------------------- a run's job

class TrainingJob:
    """What one job runs: the run's command as the sweep chose it from the run directory (fresh,
    --resume, or --overwrite of a run killed before its first checkpoint), and --resume once the
    run has saved a checkpoint, so that a requeued job (by submitit, or by Slurm after a
    preemption) continues the run. Pickled by submitit."""

    def __init__(self, command, resume_command, run_dir, log, cwd):
        self.command, self.resume_command = list(command), list(resume_command)
        self.run_dir, self.log, self.cwd = run_dir, log, cwd

    def __call__(self):
        import submitit

        job = submitit.JobEnvironment()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if job.num_tasks > 1:  # one process per GPU, as torchrun would start them
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            env.update({key: os.environ[key] for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                         "LOCAL_RANK", "LOCAL_WORLD_SIZE")})
        main = job.global_rank == 0
        command = self.resume_command if self.checkpoint_saved() else self.command
        log = open(os.path.join(self.cwd, self.log), "ab") if main else None  # the other ranks: the job's log
        if log:
            now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            log.write(f"\n[{now}] Slurm job {job.job_id}: {shlex.join(command)}\n".encode())
            log.flush()
        child = subprocess.Popen(command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        requeue = signal.getsignal(WARNING_SIGNAL)  # submitit's: checkpoint() and requeue
        received = set()

        def pass_on(signum, frame):
            received.add(signum)
            child.send_signal(signum)  # the run saves its checkpoint after its current step

        for signum in (signal.SIGTERM, signal.SIGHUP, WARNING_SIGNAL):
            signal.signal(signum, pass_on)
        status = child.wait()
        if log:
            log.close()
        # Only the warning requeues: SIGTERM alone is Slurm ending the job (scancel, or a
        # preemption that Slurm requeues itself); the run's checkpoint is saved either way.
        if WARNING_SIGNAL in received and stopped_by(status) is not None and main and callable(requeue):
            requeue(WARNING_SIGNAL, None)  # submitit requeues the job and ends this process
        if status != 0 and stopped_by(status) is None:
            raise RuntimeError(f"the run ended with exit status {status} (its log: {self.log})")
        return "finished" if status == 0 else "stopped"

    def checkpoint_saved(self):
        return os.path.isfile(os.path.join(self.cwd, run_files.path(self.run_dir, run_files.LAST)))

    def checkpoint(self, *args, **kwargs):
        """submitit's hook before a requeue: the same job (it continues from the run's checkpoint)."""
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(self)


# ----------------------------------------------------------------------------- the sweep's side

def job_state(record, out):
    """queued, running or ended (or unknown) of the run's last job, from its record."""
    job = record.get("job")
    if not isinstance(job, dict) or "id" not in job:
        return "ended"
    if job.get("executor") == "local":  # no queue: the controller process runs the job while it lives
        try:
            with open(f"/proc/{int(job['id'])}/cmdline", "rb") as handle:
                alive = b"submitit.local._local" in handle.read()
        except (OSError, ValueError):
            alive = False
        return "running" if alive else "ended"
    submitit = require_submitit()
    state = submitit.SlurmJob(os.path.join(out, JOBS_FOLDER), str(job["id"])).state.split(" ")[0].upper()
    if state in QUEUED:
        return "queued"
    if state in RUNNING:
        return "running"
    return "unknown" if state in ("UNKNOWN", "") else "ended"


def update_states(runs, out, sweep):
    """Each run's outcome for the summary (finished, queued, running, failed, not started)."""
    for run in runs:
        record = sweep.read_record(run.run_dir)
        run.last_line = sweep.last_log_line(os.path.join(run.run_dir, sweep.LOG))
        if run.state == "finished":
            run.outcome = "finished"
        elif not record.get("job"):
            run.outcome = "not started"
        else:
            state = job_state(record, out)
            job = record["job"]["id"]
            run.outcome = {"queued": f"queued (job {job})", "running": f"running (job {job})",
                           "unknown": f"state unknown (job {job}; sacct does not know it yet)"}.get(state, "failed")


@contextlib.contextmanager
def output_not_inherited(local):
    """The local executor's controller process inherits the sweep's stdout and stderr, and would
    hold them open until its job ends (whoever reads the sweep's output through a pipe would wait
    for the job): it gets /dev/null instead (its tasks write to their own logs)."""
    if not local:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in (*saved, null):
            os.close(descriptor)


def submit(runs, args, commit, sweep):
    """Submit what is neither finished nor queued nor running; print every run's state."""
    update_states(runs, args.out, sweep)
    to_submit = [run for run in runs if run.outcome in ("failed", "not started")]
    for run in runs:
        if run not in to_submit:
            print(f"{run.spec.setting}/{run.spec.name}: {run.outcome}", flush=True)
    if not to_submit:
        return
    executor = make_executor(args, os.path.join(args.out, JOBS_FOLDER))
    for run in to_submit:
        if run.outcome == "failed":
            print(f"{run.spec.setting}/{run.spec.name}: failed ({run.last_line}); submitting it again", flush=True)
        if args.slurm_executor == "slurm":
            executor.update_parameters(job_name=f"lcs-{run.spec.setting}-{run.spec.name}")
        os.makedirs(run.run_dir, exist_ok=True)
        with output_not_inherited(args.slurm_executor == "local"):
            job = executor.submit(TrainingJob(sweep.command_for(run), run.base_command + ["--resume"], run.run_dir,
                                              os.path.join(run.run_dir, sweep.LOG), os.getcwd()))
        record = sweep.read_record(run.run_dir)
        record.setdefault("segments", [])
        record.update(command=sweep.shown_command(run.base_command), setting=run.spec.setting,
                      method=run.spec.method, seed=run.base_command[run.base_command.index("--seed") + 1],
                      status="submitted", job={"id": job.job_id, "executor": args.slurm_executor})
        record["segments"].append({"started": sweep._now(), "command": sweep.shown_command(run.base_command),
                                   "commit": commit, "machine": f"{args.slurm_executor} job {job.job_id}"})
        sweep.write_record(run.run_dir, record)
        run.outcome = f"queued (job {job.job_id})"
        print(f"[{sweep._now()}] submitted {run.spec.setting}/{run.spec.name} as job {job.job_id}", flush=True)
