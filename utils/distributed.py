"""torchrun / DistributedDataParallel helpers (one process per GPU, or gloo on CPU)."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import ConfigError


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def pick_device(name, local_rank=0):
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_name):
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context(device=pick_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world_size, local_rank, device)


def teardown(context):
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor, context):
    if context.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_process(flag, context, device):
    """True if `flag` is set in any process (every process must call this together)."""
    return bool(max_over_processes(1 if flag else 0, context, device))


def max_over_processes(value: int, context, device) -> int:
    """The largest of a small non-negative integer over all processes (every process must call
    this together)."""
    if not context.distributed:
        return value
    tensor = torch.tensor([float(value)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier(context):
    if context.distributed:
        dist.barrier()


def count_usable_cores():
    """The cores this process may run on (its CPU affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_workers(requested, usable_cores=None):
    """(data-loading worker processes, a note when fewer than `requested`): at most one per
    usable core. More workers than cores only wait on each other (torch's DataLoader warns
    about it at every epoch and evaluation); the run goes on with as many as there are cores."""
    if usable_cores is None:
        usable_cores = count_usable_cores()
    if requested <= usable_cores:
        return requested, None
    return usable_cores, (f"--num_workers {requested}: this process may use {usable_cores} CPU core(s); "
                          f"using {usable_cores} data-loading worker(s)")


MAX_DEFAULT_THREADS = 16  # small CIFAR networks gain little beyond this


@dataclass
class ThreadChoice:
    threads: int
    reason: str  # how the number was chosen, for the start-up line


def choose_threads(requested, environ=os.environ, usable_cores=None, load_average=None):
    """CPU threads for this process: --threads when given, else OMP_NUM_THREADS when set,
    else the usable cores not already busy (cores minus the 1-minute load average: more
    threads than free cores make OpenMP's threads wait on each other, several times slower
    on a loaded machine), at most MAX_DEFAULT_THREADS, shared among torchrun's local processes."""
    if requested is not None:
        return ThreadChoice(requested, "--threads")
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return ThreadChoice(int(omp), "OMP_NUM_THREADS")
    if usable_cores is None:
        usable_cores = count_usable_cores()
    if load_average is None:
        load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    local_processes = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    free = max(1, min(usable_cores, MAX_DEFAULT_THREADS, usable_cores - round(load_average)))
    threads = max(1, free // local_processes)
    reason = f"{usable_cores} usable cores, load average {load_average:.1f}"
    if local_processes > 1:
        reason += f", {local_processes} local processes"
    return ThreadChoice(threads, reason)
