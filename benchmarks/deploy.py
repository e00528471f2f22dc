"""Size and speed of exported models over a grid of compression levels.

    python benchmarks/deploy.py --checkpoint RUN/model_final.pt [--levels 1.0,0.5,0.25]
                                [--device cpu|cuda] [--repeats 20] [--batch_sizes 1,64]
                                [--threads 1,16] [--runtime torch|onnxruntime]

Every level, and the uncompressed model (width 1.0 / TopK 1.0 / the same network with float32
weights), is exported with deploy.export, written to a file and loaded back. The table gives, per
level: nonzero parameters, MACs for one image (FlopCounterMode on the loaded model), file size
and the median latency at each batch size, each with its ratio uncompressed / this level
(higher = smaller or faster). Latencies are timed round-robin over all models and thread
counts, one call each per round after a warm-up, so that load from other processes spreads over
all of them; a table per thread count.

With --runtime onnxruntime every model is exported to ONNX (quantized levels as integer convs),
checked against the torch model, and timed in ONNX Runtime on the CPU with each --threads count
of intra-op threads; the file column is then the ONNX file, and ratios compare with the uncompressed model
in ONNX Runtime. Both runtimes also report the subspace artefact (deploy.subspace): its size
against one float32 model and against the per-level files of the run's grid, and the median
time to switch level.
"""

import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from utils.errors import UsageParser, number_list  # noqa: E402
from utils import checkpoint as ckpt  # noqa: E402
from utils.errors import ConfigError, UserError, one_line  # noqa: E402
from deploy.formats import FORMATS  # noqa: E402
from deploy.compressed import (checkpoint_method, export_model, load_exported,  # noqa: E402
                               resolve_level, save_export, uncompressed_level)
from deploy.measure import (describe_onnx_subspace, describe_subspace, onnx_runners,  # noqa: E402
                            onnx_subspace_report, subspace_report)


def build_parser():
    parser = UsageParser(prog="benchmarks/deploy.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="model_final.pt or checkpoint_last.pt of a run")
    parser.add_argument("--levels", type=number_list(float), help="levels to export (default: a grid per setting)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch_sizes", type=number_list(int), default=[1, 64])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per model and batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per model and batch size first")
    parser.add_argument("--threads", type=number_list(int), default=[torch.get_num_threads()],
                        help="comma-separated CPU thread counts, each timed (default: torch's)")
    parser.add_argument("--round_to", type=int, help="as deploy.export --round_to (structured widths)")
    parser.add_argument("--data_dir", help="as deploy.export --data_dir (runs that re-estimated BN statistics)")
    parser.add_argument("--out_dir", help="keep the exported files here (default: a temporary directory)")
    parser.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime"),
                        help="time the models in torch or, exported to ONNX, in ONNX Runtime (CPU)")
    parser.add_argument("--switches", type=int, default=20, help="level switches timed on the subspace artefact")
    parser.add_argument("--onnx_subspace", action="store_true",
                        help="measure the one ONNX file whose level is an input against the per-level ONNX files "
                             "(--levels: the levels it holds, default the run's grid; 1 thread and all threads)")
    return parser


# CPU flags of int8 dot-product instructions (/proc/cpuinfo), where int8 kernels gain most.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")


def cpu_description():
    """CPU model (with family/model numbers, which tell generic names apart), CPU count, and its
    int8 dot-product instructions (VNNI, AMX, ARM dotprod) or their absence."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    numbers = f" (family {fields['cpu family']}, model {fields['model']})" if "model" in fields else ""
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    dot = [flag for flag in INT8_DOT_FLAGS if flag in flags]
    int8 = (f"int8 dot products: {', '.join(dot)}" if dot else
            f"no int8 dot products (none of {', '.join(INT8_DOT_FLAGS)})" if flags else "CPU flags unknown")
    return f"{name}{numbers}, {os.cpu_count()} logical CPUs, {int8}"


def load_average():
    try:
        return "load average %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def nonzero_parameters(model):
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


@torch.no_grad()
def macs(model, input_size, device):
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, input_size, input_size, device=device))
    return counter.get_total_flops() // 2


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WithThreads:
    """A torch model called with `threads` CPU threads (torch's setting is global)."""

    def __init__(self, model, threads):
        self.model, self.threads = model, threads

    def __call__(self, images):
        torch.set_num_threads(self.threads)
        return self.model(images)


@torch.inference_mode()
def latencies_ms(models, batch_size, input_size, device, warmup, repeats):
    """Per model, the median wall-clock time and the median CPU time of this process (ms) of one
    forward of a batch, timed round-robin. CPU time counts only this process's work, so it is
    the steadier figure when other processes share the CPU."""
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    for model in models:
        for _ in range(warmup):
            model(x)
    synchronize(device)
    wall, cpu = [[] for _ in models], [[] for _ in models]
    for _ in range(repeats):
        for index, model in enumerate(models):
            start, start_cpu = time.perf_counter(), time.process_time()
            model(x)
            synchronize(device)
            wall[index].append(time.perf_counter() - start)
            cpu[index].append(time.process_time() - start_cpu)
    return [(1000 * statistics.median(w), 1000 * statistics.median(c)) for w, c in zip(wall, cpu)]


def timed_batch(models, batch_size, input_size, device, args):
    try:
        return latencies_ms(models, batch_size, input_size, device, args.warmup, args.repeats)
    except (MemoryError, RuntimeError) as error:  # torch's allocators raise RuntimeError subclasses
        if not isinstance(error, MemoryError) and "memory" not in str(error):
            raise
        raise ConfigError(f"--batch_sizes {batch_size}: out of memory at this batch size on {device}; "
                          f"use smaller batches") from None


def valid_level(method, level):
    try:
        resolve_level(method, level)
    except ConfigError:
        return False
    return True


# Bounds of the numeric flags: beyond them a run only exhausts memory or time (a batch of a
# million images), or crashes torch (tens of thousands of threads).
MAX_BATCH_SIZE = 4096
MAX_REPEATS = 100_000
MAX_LEVELS = 64


def check_args(args):
    def bound(flag, value, low, high):
        if not low <= value <= high:
            raise ConfigError(f"{flag} {value}: must be in {low}..{high}")

    bound("--repeats", args.repeats, 1, MAX_REPEATS)
    bound("--warmup", args.warmup, 0, MAX_REPEATS)
    if not args.threads or len(args.threads) > MAX_LEVELS:
        raise ConfigError(f"--threads: give 1 to {MAX_LEVELS} thread counts")
    for threads in args.threads:
        bound("--threads", threads, 1, os.cpu_count() or 1)
    if not args.batch_sizes or len(args.batch_sizes) > MAX_LEVELS:
        raise ConfigError(f"--batch_sizes: give 1 to {MAX_LEVELS} batch sizes")
    for batch_size in args.batch_sizes:
        bound("--batch_sizes", batch_size, 1, MAX_BATCH_SIZE)
    if args.levels is not None and not 1 <= len(args.levels) <= MAX_LEVELS:
        raise ConfigError(f"--levels: give 1 to {MAX_LEVELS} levels")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    bound("--switches", args.switches, 1, MAX_REPEATS)
    if (args.runtime == "onnxruntime" or args.onnx_subspace) and args.device != "cpu":
        raise ConfigError(f"--runtime onnxruntime: runs on the CPU only, not --device {args.device}")
    if args.out_dir and not os.path.isdir(args.out_dir):
        raise ConfigError(f"--out_dir {args.out_dir}: no such directory")


def export_all(payload, method, path, levels, round_to, out_dir, device, data_dir=None):
    """[(label, loaded model, file size, export header)], the uncompressed model first (for
    integer codes: the same model with float32 weights)."""
    quantized = FORMATS[method.export_format].float_weights
    base = uncompressed_level(method)
    jobs = [("float32" if quantized else "uncompressed", base, True, None)]
    jobs += [(f"{level:g}", level, False, round_to) for level in levels]
    results = []
    for label, level, is_base, rounding in jobs:
        content = export_model(payload, level, path=path, round_to=rounding, float_weights=is_base and quantized,
                               data_dir=data_dir)
        file = os.path.join(out_dir, f"export_{'base' if is_base else label}.pt")
        save_export(file, content, inputs=[path], flag="--out_dir")
        results.append((label, load_exported(file, map_location=device), os.path.getsize(file), content))
    return results


def onnxruntime_version():
    import onnxruntime
    return onnxruntime.__version__


def ratio(base, value):
    return f"{base / value:.2f}x" if value else "-"


def table(rows, batch_sizes, cpu_time):
    head = ["level", "alpha", "nonzero params", "x", "MACs", "x", "file KiB", "x"]
    for batch in batch_sizes:
        head += [f"b{batch} ms", "x"] + ([f"b{batch} CPU ms", "x"] if cpu_time else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]
    for row in rows:
        cells = [row["label"], "-" if row["alpha"] is None else f"{row['alpha']:.4g}",
                 f"{row['params']:,}", ratio(base["params"], row["params"]),
                 f"{row['macs']:,}", ratio(base["macs"], row["macs"]),
                 f"{row['size'] / 1024:.1f}", ratio(base["size"], row["size"])]
        for (wall, cpu), (base_wall, base_cpu) in zip(row["ms"], base["ms"]):
            cells += [f"{wall:.2f}", ratio(base_wall, wall)]
            if cpu_time:
                cells += [f"{cpu:.2f}", ratio(base_cpu, cpu)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args):
    check_args(args)
    torch.set_num_threads(max(args.threads))
    device = torch.device(args.device)
    payload = ckpt.load(args.checkpoint)
    method = checkpoint_method(payload, args.checkpoint)
    config = method.config
    # The uncompressed model is always measured first; these are the levels compared with it.
    levels = args.levels or [level for level in method.deploy_levels if valid_level(method, level)]
    load_before = load_average()
    if args.onnx_subspace:
        return run_onnx_subspace(args, payload, config, load_before)
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = args.out_dir or scratch
        exported = export_all(payload, method, args.checkpoint, levels, args.round_to, out_dir, device,
                              args.data_dir)
        subspace = subspace_report(payload, args.checkpoint, out_dir, exported[0][2], args.switches,
                                   [content["level"] for _, _, _, content in exported])
        runners = (onnx_runners(exported, out_dir, args.threads, args.checkpoint) if args.runtime == "onnxruntime"
                   else None)
    # Every (thread count, model) in one round-robin, so that both see the same load.
    models = [runners[index][0][threads] if runners else WithThreads(model, threads)
              for threads in args.threads for index, (_, model, _, _) in enumerate(exported)]
    input_size = exported[0][3]["input_size"]
    timings = [timed_batch(models, batch, input_size, device, args) for batch in args.batch_sizes]
    torch.set_num_threads(max(args.threads))
    where = cpu_description() if device.type == "cpu" else torch.cuda.get_device_name(device)
    base = exported[0][3]
    print(f"{config.setting}/{config.method} {config.model} ({config.norm}) from {args.checkpoint}")
    print(f"device {args.device}: {where}; torch {torch.__version__}; "
          f"{load_before} before, {load_average()} after")
    print(f"runtime {args.runtime}" + (f" (onnxruntime {onnxruntime_version()}, CPU execution provider, "
                                       f"intra-op threads as below; file = the ONNX file)" if runners else ""))
    print(f"latency = median of {args.repeats} calls after {args.warmup} warm-up calls, input {input_size}x"
          f"{input_size}" + ("; CPU ms = CPU time of this process per call" if device.type == "cpu" else ""))
    print(f"levels are {base['level_name']}; ratios (x) = uncompressed ({exported[0][0]}, level "
          f"{base['level']:g}) / this level, at the same thread count")
    if args.round_to:
        print(f"widths rounded up to multiples of {args.round_to}: these networks differ from the trained "
              f"model at their level")
    tables = {}
    for position, threads in enumerate(args.threads):
        rows = []
        for index, (label, model, size, content) in enumerate(exported):
            column = position * len(exported) + index
            rows.append({"label": label, "alpha": content["alpha"], "params": nonzero_parameters(model),
                         "macs": macs(model, input_size, device), "size": runners[index][1] if runners else size,
                         "ms": [timing[column] for timing in timings]})
        print(f"{threads} thread{'s' if threads > 1 else ''}:")
        print(table(rows, args.batch_sizes, cpu_time=device.type == "cpu"))
        tables[threads] = rows
    if runners and any(integer for _, _, integer in runners):
        print("integer convs in ONNX Runtime's optimised graph: " + ", ".join(
            f"{label} {integer[0]} of {integer[1]} int8-weight convs"
            for (label, _, _, _), (_, _, integer) in zip(exported, runners) if integer))
    print(describe_subspace(subspace))
    return tables


def run_onnx_subspace(args, payload, config, load_before):
    threads = sorted({1, os.cpu_count() or 1})
    with tempfile.TemporaryDirectory() as scratch:
        report = onnx_subspace_report(payload, args.checkpoint, args.out_dir or scratch, args.levels,
                                      args.batch_sizes, args.repeats, args.warmup, threads)
    print(f"{config.setting}/{config.method} {config.model} ({config.norm}) from {args.checkpoint}")
    print(f"{cpu_description()}; onnxruntime {onnxruntime_version()}, CPU execution provider, intra-op threads "
          f"{' and '.join(map(str, threads))}; {load_before} before, {load_average()} after")
    print(f"latency = median of {args.repeats} rounds after {args.warmup} warm-up rounds")
    print("\n".join(describe_onnx_subspace(report, threads, args.batch_sizes)))
    return report


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as error:
        print(f"benchmarks/deploy.py: error: {one_line(error)}", file=sys.stderr)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
