"""Helpers for tests that run the training scripts inside the test process (no interpreter
start-up per run) and interrupt them with a real signal at a chosen training step."""

import contextlib
import json
import os
import threading

import pytest
import torch

import training_params
from engine import train


def run_script(setting, *args):
    """Run a training script's entry point (parse, train or evaluate); its exit status."""
    with pytest.raises(SystemExit) as exit_info:
        training_params.main(setting, [str(arg) for arg in args])
    return exit_info.value.code


@contextlib.contextmanager
def signal_during_step(step, signum):
    """Send `signum` to this process while training step `step` (0-based, counted from the
    start of a fresh run begun inside this context) is running, as a scheduler or Ctrl-C would."""
    calls = iter(range(10**9))
    with _signal_when(train.TrainStep, "__call__", lambda *args, **kwargs: next(calls) == step, signum):
        yield


@contextlib.contextmanager
def signal_during_final_evaluation(signum):
    with _signal_when(train.Run, "record_evaluation", lambda run, *args, final=False, **kwargs: final, signum):
        yield


@contextlib.contextmanager
def _signal_when(owner, method_name, condition, signum):
    assert threading.current_thread() is threading.main_thread(), "signal handlers need the main thread"
    original = getattr(owner, method_name)

    def method(self, *args, **kwargs):
        if condition(self, *args, **kwargs):
            os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    setattr(owner, method_name, method)
    try:
        yield
    finally:
        setattr(owner, method_name, original)


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread on a shared machine; both runs of a comparison
    must use the same thread count anyway."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the scripts' default --threads honours it
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(autouse=True)
def single_thread():
    """Autouse in the modules that import it."""
    with one_thread():
        yield


def read_rows(save_dir):
    with open(os.path.join(save_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
