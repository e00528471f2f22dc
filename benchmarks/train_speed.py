"""Training speed of this project's loop against a loop built like the original's.

For one method per setting (lcs_l, structured / unstructured / quantized), both loops train
the same network (cPreResNet20) with the same method, batch size and training images, in
the same process:

* original-style: a torchvision-style CIFAR dataset (uint8 array -> PIL image ->
  RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize), a DataLoader with
  2 worker processes (pinned memory on CUDA), a blocking copy of every batch, levels set by
  walking all modules, every loss read back with .item(), fp32, cudnn.benchmark on (CUDA).
* this project: engine.train's epoch loop (Run.train_epoch with TrainStep) with the data
  pipeline and speed flags given here (default: the on-device tensor pipeline, fp32).

With --compare_flags, this project's loop runs once per combination of its speed flags (fp32,
--channels_last, --amp, --amp --channels_last), every combination measured in the same run,
and the fastest combination per setting and over all settings is named: the flags to use on
the machine it ran on. --amp changes the numerics (bfloat16 autocast); the recipes keep fp32
unless they say otherwise (docs/speed.md).

The loops take turns epoch by epoch, so a change in machine load hits all of them. The first epoch
of each loop is reported on its own (worker start-up, autotuning, compilation); the median of
the later ones is the steady state that images/s, ms/step and the speed-up are computed from.

    python benchmarks/train_speed.py --device cpu                      # small, on the CPU
    python benchmarks/train_speed.py --device cpu --threads 2 --compare_flags   # the fastest flags here
    python benchmarks/train_speed.py --device cuda --images 50000 --epochs 3
"""

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import cifar_transforms  # noqa: E402
from data.cifar import load_cifar10  # noqa: E402
from methods import DEFAULT_METHOD, METHODS, SETTINGS  # noqa: E402
from methods.levels import cosine_lr  # noqa: E402
from models import build_model  # noqa: E402
from training_params import parse  # noqa: E402
from utils.distributed import Context, pick_device  # noqa: E402
from utils.errors import UsageParser, UserError  # noqa: E402
from engine.progress import RunClock  # noqa: E402
from engine.step import TrainStep, configure_backends  # noqa: E402
from engine.train import Run, StopFlag  # noqa: E402

METHOD = DEFAULT_METHOD  # lcs_l, in every setting
CIFAR_EPOCH = 50_000
DEFAULT_DATA = "data/cifar10-jpeg"


def parse_args(argv=None):
    parser = UsageParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated subset of {', '.join(SETTINGS)}")
    parser.add_argument("--data_dir", default=None,
                        help=f"CIFAR-10 as for training (default: {DEFAULT_DATA} if present, else ./data)")
    parser.add_argument("--images", type=int, default=2560, help="training images per epoch (default: 2560)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loop, the first one reported apart")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the original-style loop")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--after_warmup", action="store_true",
                        help="time the steps after the warmup (TopK at its target, activations quantized)")
    parser.add_argument("--data_pipeline", choices=("tensor", "dataloader"), default="tensor",
                        help="this project's data pipeline (default: tensor)")
    parser.add_argument("--amp", action="store_true", help="this project's loop with bfloat16 autocast (CUDA)")
    parser.add_argument("--channels_last", action="store_true", help="this project's loop in channels-last")
    parser.add_argument("--compare_flags", action="store_true",
                        help="this project's loop with every combination of --amp and --channels_last in one "
                             "run, and the fastest named")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.compare_flags and (args.amp or args.channels_last):
        parser.error("--compare_flags: measures every combination of --amp and --channels_last; leave those out")
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for setting in args.settings:
        if setting not in SETTINGS:
            parser.error(f"--settings: unknown setting {setting!r} (allowed: {', '.join(SETTINGS)})")
    # Bounds beyond which a run only exhausts memory, processes or time (or crashes torch).
    bounds = {"images": (1, 1_300_000), "batch_size": (1, 65_536), "epochs": (1, 1000), "workers": (0, 256),
              "threads": (1, os.cpu_count() or 1), "seed": (0, 2**32 - 1)}
    for name, (low, high) in bounds.items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            parser.error(f"--{name}: must be in {low}..{high}, got {value}")
    if args.data_dir is None:
        args.data_dir = DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else "./data"
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the original-style loop ---------------------------------------------------------------
class OriginalStyleCIFAR(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: array -> PIL image -> transforms."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


class OriginalStyleLoop:
    def __init__(self, config, images, labels, device, workers, warmup):
        self.device = device
        self.method = METHODS[config.setting][config.method](config, warmup)
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, self.method.layer_factory(), 10).to(device)
        self.method.bind(self.model)
        self.network = torch.nn.DataParallel(self.model) if device.type == "cuda" else self.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.learning_rate,
                                         momentum=config.momentum, weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.loader = DataLoader(OriginalStyleCIFAR(images, labels, cifar_transforms()[0]),
                                 batch_size=config.batch_size, shuffle=True, num_workers=workers,
                                 pin_memory=device.type == "cuda")
        self.steps_per_epoch = len(self.loader)

    def epoch(self, first_step, lr):
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        step = first_step
        for batch_index, (images, labels) in enumerate(self.loader):
            images, labels = images.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad()
            levels_list = self.method.train_levels(step, self.generator)
            total = 0.0
            for index, levels in enumerate(levels_list):
                self.method.apply_levels(self.model, levels)
                logits = self.network(images)
                loss = F.cross_entropy(logits, labels)
                if index == len(levels_list) - 1:
                    penalty = self.method.regularizer(self.model)
                    if penalty is not None:
                        loss = loss + penalty
                loss.backward()
                total += loss.item()
            self.method.after_backward(self.model)
            self.optimizer.step()
            if batch_index % 10 == 0:  # the original's progress line
                (logits.argmax(dim=1) == labels).float().mean().item()
            step += 1


# -- this project's loop -------------------------------------------------------------------
class ProjectLoop:
    def __init__(self, config, options, device):
        context = Context(device=device)
        self.run = Run(config, options, context)
        self.run.clock = RunClock(config, self.run.data.train.steps_per_epoch)  # Run.train() sets it otherwise
        self.step = TrainStep(self.run.model, self.run.method, self.run.optimizer, context, config)
        self.steps_per_epoch = self.run.data.train.steps_per_epoch
        self.device, self.config = device, config

    def epoch(self, first_step, lr, epoch):
        configure_backends(self.run.method, self.device)
        for group in self.run.optimizer.param_groups:
            group["lr"] = lr
        self.run.progress.epoch, self.run.progress.step_in_epoch = epoch, 0
        self.run.progress.global_step = first_step
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            self.run.train_epoch(self.step, lr, StopFlag())


SPEED_FLAGS = ("--amp", "--channels_last")
FLAG_SETS = ((), ("--channels_last",), ("--amp",), ("--amp", "--channels_last"))  # --compare_flags


def flag_sets(args):
    """{loop name: the speed flags of a project loop} measured in this run."""
    if args.compare_flags:
        return {"project " + (" ".join(flags) or "fp32"): flags for flags in FLAG_SETS}
    return {"this project": tuple(flag for flag in SPEED_FLAGS if getattr(args, flag[2:]))}


def project_config(setting, args, device, save_dir, flags):
    argv = ["--method", METHOD, "--data_dir", args.data_dir, "--train_subset", str(args.images),
            "--test_subset", "16", "--batch_size", str(args.batch_size), "--device", device.type,
            "--data_pipeline", args.data_pipeline, "--seed", str(args.seed), "--save_dir", save_dir,
            "--num_workers", str(args.workers), *flags]
    return parse(setting, argv)


def timed(device, function, *args):
    synchronize(device)
    start = time.perf_counter()
    function(*args)
    synchronize(device)
    return time.perf_counter() - start


def measure(setting, args, device, images, labels):
    """{loop name: (first epoch s, [later epochs s], steps per epoch)} for one setting."""
    with tempfile.TemporaryDirectory() as save_dir:
        projects = {}
        for index, (name, flags) in enumerate(flag_sets(args).items()):
            config, options = project_config(setting, args, device, os.path.join(save_dir, str(index)), flags)
            projects[name] = ProjectLoop(config, options, device)
        steps_per_epoch = next(iter(projects.values())).steps_per_epoch
        warmup = next(iter(projects.values())).run.method.warmup_iterations
        original = OriginalStyleLoop(config, images, labels, device, args.workers, warmup)
        first_step = warmup if (args.after_warmup and warmup) else 0
        lr = cosine_lr(config.learning_rate, 0, config.epochs)
        times = {name: [] for name in ("original-style", *projects)}
        for epoch in range(args.epochs):
            start = first_step + epoch * steps_per_epoch
            times["original-style"].append(timed(device, original.epoch, start, lr))
            for name, project in projects.items():
                times[name].append(timed(device, project.epoch, start, lr, epoch))
        steps = {"original-style": original.steps_per_epoch, **dict.fromkeys(projects, steps_per_epoch)}
        return {name: (values[0], values[1:] or values[:1], steps[name]) for name, values in times.items()}


def describe_device(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def format_results(results, args):
    header = (f"{'setting':<28} {'loop':<30} {'first epoch s':>13} {'epoch s':>9} {'images/s':>9} "
              f"{'ms/step':>8} {'s per 50k':>9} {'speed-up':>8}")
    lines = [header, "-" * len(header)]
    for setting, loops in results.items():
        baseline = statistics.median(loops["original-style"][1])
        for name, (first, later, steps) in loops.items():
            epoch_s = statistics.median(later)
            rate = args.images / epoch_s
            speedup = f"{baseline / epoch_s:.2f}x"
            lines.append(f"{setting + '/' + METHOD:<28} {name:<30} {first:>13.3f} {epoch_s:>9.3f} {rate:>9.1f} "
                         f"{1000 * epoch_s / steps:>8.1f} {CIFAR_EPOCH / rate:>9.1f} {speedup:>8}")
    return "\n".join(lines)


def fastest(results):
    """Lines naming the fastest flag combination per setting and over all settings (the least
    total of the settings' median epoch times), against fp32 and the original-style loop."""
    def median(loop):
        return statistics.median(loop[1])

    def flags_of(name):
        return name.removeprefix("project ")

    lines = ["Fastest speed flags on this machine (median epoch time, every combination measured in this run):"]
    for setting, loops in results.items():
        projects = {name: loop for name, loop in loops.items() if name != "original-style"}
        best = min(projects, key=lambda name: median(projects[name]))
        lines.append(f"  {setting}: {flags_of(best)} ({median(projects['project fp32']) / median(projects[best]):.2f}x "
                     f"fp32, {median(loops['original-style']) / median(projects[best]):.2f}x the original-style loop)")
    names = [name for name in next(iter(results.values())) if name != "original-style"]
    totals = {name: sum(median(loops[name]) for loops in results.values()) for name in names}
    best = min(totals, key=totals.get)
    lines.append(f"  all settings: {flags_of(best)} ({totals['project fp32'] / totals[best]:.2f}x fp32)")
    lines.append("--amp changes the numerics (bfloat16 autocast): the recipes keep fp32 unless they say otherwise.")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
        images, labels = load_cifar10(args.data_dir, True, args.images, args.seed)
        args.images = len(labels)
        flags = " or ".join(" ".join(flags) or "fp32" for flags in flag_sets(args).values())
        print(f"cPreResNet20, batch {args.batch_size}, {args.images} training images per epoch, "
              f"{args.epochs} epochs per loop{', after the warmup' if args.after_warmup else ''}; "
              f"this project: {args.data_pipeline} pipeline, {flags}; original-style: DataLoader with "
              f"{args.workers} workers, fp32\ndevice: {describe_device(device)}; torch {torch.__version__}",
              flush=True)
        results = {}
        for setting in args.settings:
            results[setting] = measure(setting, args, device, images, labels)
            print(f"measured {setting}", flush=True)
    except UserError as error:
        print(f"train_speed.py: error: {error}", file=sys.stderr)
        return 2
    print(format_results(results, args), flush=True)
    if args.compare_flags:
        print(fastest(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
