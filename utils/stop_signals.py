"""The signals that stop a run politely, and the exit status each one leaves.

A training process that receives one of them saves a checkpoint after its current step and
exits with 128 + the signal's number, the status a shell or a scheduler reports for a process
ended by that signal (SIGTERM 143, SIGINT 130, SIGHUP 129, SIGUSR2 140):

- SIGTERM: a scheduler ending or preempting the job (Slurm sends it at the time limit);
- SIGINT: Ctrl-C;
- SIGHUP: the terminal closed or the ssh session dropped;
- WARNING_SIGNAL (SIGUSR2): the cluster's warning before the end of a job, which Slurm sends
  with `sbatch --signal=USR2@<seconds>`. SIGUSR2 is submitit's own preemption signal (the one
  its executors ask Slurm for and its local executor sends), so one signal serves both; submitit
  advises against SIGUSR1, which NCCL may catch.

No torch here: the sweep (experiments/) imports this without importing torch.
"""

import signal

WARNING_SIGNAL = signal.SIGUSR2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, WARNING_SIGNAL)
# torchrun passes on only the signals it is told to handle (by default SIGTERM, SIGINT, SIGHUP,
# SIGQUIT): the project's torchrun commands add the warning signal, so every rank receives it.
TORCHRUN_SIGNALS = "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIG" + WARNING_SIGNAL.name[3:]


def exit_status(signum: int) -> int:
    """The exit status of a run stopped by `signum`."""
    return 128 + int(signum)


def stopped_by(status: int) -> signal.Signals | None:
    """The stop signal a run's exit status (or a negative Popen status: killed by it) tells of."""
    for signum in STOP_SIGNALS:
        if status in (exit_status(signum), -int(signum)):
            return signum
    return None
