"""What benchmarks/deploy.py measures of the deployment formats: the subspace artefact's size and
level-switch time, and ONNX Runtime sessions that time like torch models."""

import json
import os
import statistics
import time

import numpy as np
import torch

from deploy.subspace import load_subspace, make_subspace, save_subspace
from deploy.compressed import export_model, save_export


def subspace_report(payload, path, out_dir, baseline_size, switches, levels):
    """Size of the subspace artefact against one float32 model (`baseline_size` bytes) and
    against the per-level files of the run's grid, and the median time of `switches` level
    switches (sub.at over `levels` in turn, each followed by one forward of one image)."""
    file = os.path.join(out_dir, "model.lcs.pt")
    save_subspace(file, make_subspace(payload, path))
    sub = load_subspace(file)
    per_level = 0
    for index, level in enumerate(sub.levels):
        level_file = os.path.join(out_dir, f"grid_{index}.pt")
        save_export(level_file, export_model(payload, level, path=path))
        per_level += os.path.getsize(level_file)
    size = os.path.getsize(file)
    image = torch.zeros(1, 3, sub.model_input_size, sub.model_input_size)
    times = []
    with torch.inference_mode():
        sub.at(levels[0])(image)
        for switch in range(switches):
            level = levels[(switch + 1) % len(levels)]
            start = time.perf_counter()
            model = sub.at(level)
            times.append(time.perf_counter() - start)
            model(image)
    return {"size": size, "baseline_size": baseline_size, "per_level_size": per_level,
            "grid_levels": len(sub.levels), "switch_ms": 1000 * statistics.median(times), "switches": switches}


def describe_subspace(report):
    return (f"subspace artefact: {report['size'] / 1024:.1f} KiB = {report['size'] / report['baseline_size']:.3f}x "
            f"one float32 model ({report['baseline_size'] / 1024:.1f} KiB), "
            f"{report['size'] / report['per_level_size']:.3f}x the {report['grid_levels']} per-level files of the "
            f"run's grid ({report['per_level_size'] / 1024:.1f} KiB); level switch (sub.at) median "
            f"{report['switch_ms']:.2f} ms over {report['switches']} switches")


class OnnxRunner:
    """An ONNX Runtime session called like a torch model (CPU tensors in and out)."""

    def __init__(self, path, threads):
        from deploy.onnx_export import INPUT_NAME, session

        self.session = session(path, threads=threads)
        self.input_name = INPUT_NAME

    def __call__(self, images):
        return self.session.run(None, {self.input_name: images.numpy()})[0]


def onnx_runners(exported, out_dir, thread_counts, checkpoint):
    """[({threads: runner}, ONNX file size, (integer convs, convs of int8 weights) or None)] for
    benchmark rows [(label, model, size, content)] of `checkpoint`, a session per count of
    `thread_counts`; every file is checked with ONNX Runtime first, and a failed check names the
    checkpoint and the level (not the file, which may be a temporary one)."""
    from deploy.onnx_export import write_checked

    runners = []
    for index, (label, model, _, content) in enumerate(exported):
        file = os.path.join(out_dir, f"model_{index}.onnx")
        _, kernels = write_checked(content, file, count=64, name=f"{checkpoint} (level {label})")
        integer = None
        if kernels:
            integer = (sum(kind == "integer" for kind in kernels.values()),
                       sum(kind != "float" for kind in kernels.values()))
        runners.append(({threads: OnnxRunner(file, threads) for threads in thread_counts}, os.path.getsize(file),
                        integer))
    return runners



def onnx_subspace_report(payload, path, out_dir, levels, batch_sizes, repeats, warmup, threads):
    """The one ONNX file whose level is an input (deploy/onnx_subspace.py) against the per-level
    ONNX exports of the same checkpoint: its size against the .lcs.pt artefact and the per-level
    files; per held level the largest |logit difference| relative to the largest |logit|, and the
    median latencies at each thread count and batch size, timed interleaved in one process: per
    round and level, the one file twice (its first call after a level switch, then a call at the
    same level) and the per-level file once."""
    import onnx

    from deploy.onnx_export import INPUT_NAME, session, write_checked
    from deploy.onnx_subspace import LEVEL_NAME, export_subspace_onnx

    one_file, artefact = os.path.join(out_dir, "model.lcs.onnx"), os.path.join(out_dir, "model.lcs.pt")
    export_subspace_onnx(payload, path, one_file, levels, count=64)
    save_subspace(artefact, make_subspace(payload, path))
    metadata = {entry.key: json.loads(entry.value) for entry in onnx.load(one_file).metadata_props}
    held, level_files = metadata["levels"], []
    for index, level in enumerate(held):
        level_files.append(os.path.join(out_dir, f"level_{index}.onnx"))
        write_checked(export_model(payload, level, path=path), level_files[-1], count=64)
    size = metadata["input_size"]
    images = torch.randn(max(batch_sizes), 3, size, size, generator=torch.Generator().manual_seed(0)).numpy()
    report = {"size": os.path.getsize(one_file), "artefact_size": os.path.getsize(artefact), "levels": held,
              "per_level_size": sum(os.path.getsize(file) for file in level_files), "metadata": metadata,
              "rows": {}, "logits": {}}
    for thread_count in threads:
        merged = session(one_file, threads=thread_count)
        per_level = [session(file, threads=thread_count) for file in level_files]
        for batch in batch_sizes:
            x = images[:batch]
            feeds = [{INPUT_NAME: x, LEVEL_NAME: np.array(level, np.float32)} for level in held]
            times = [([], [], []) for _ in held]  # first call after a switch, next call, per-level file
            for round_index in range(warmup + repeats):
                for index, level_session in enumerate(per_level):
                    measured = (timed(merged, feeds[index]), timed(merged, feeds[index]),
                                timed(level_session, {INPUT_NAME: x}))
                    if round_index >= warmup:
                        for values, value in zip(times[index], measured):
                            values.append(value)
            for level, (first, steady, alone) in zip(held, times):
                report["rows"][(level, thread_count, batch)] = [1000 * statistics.median(values)
                                                                for values in (first, steady, alone)]
        for index, level in enumerate(held):
            expected = per_level[index].run(None, {INPUT_NAME: images})[0]
            actual = merged.run(None, feeds[index] | {INPUT_NAME: images})[0]
            report["logits"][level] = float(np.abs(actual - expected).max() / np.abs(expected).max())
    return report


def timed(onnx_session, feeds):
    start = time.perf_counter()
    onnx_session.run(None, feeds)
    return time.perf_counter() - start


def describe_onnx_subspace(report, threads, batch_sizes):
    """The report as lines: the sizes, then a table of one row per held level."""
    meta = report["metadata"]
    lines = [f"one ONNX file ({meta['level_unit']} an input): {report['size'] / 1024:.1f} KiB = "
             f"{report['size'] / report['artefact_size']:.3f}x the .lcs.pt artefact "
             f"({report['artefact_size'] / 1024:.1f} KiB), {report['size'] / report['per_level_size']:.3f}x the "
             f"{len(report['levels'])} per-level ONNX files ({report['per_level_size'] / 1024:.1f} KiB)",
             "latency: median ms of the one file / the per-level file (ratio per-level / one file: >= 1 is as "
             "fast); switch = the one file's first call after a level switch"]
    head = ["level", "max |Δlogit| / max |logit|"]
    for thread_count in threads:
        for batch in batch_sizes:
            head += [f"{thread_count}t b{batch} ms", "x", "switch ms"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for level in report["levels"]:
        cells = [f"{level:g}", f"{report['logits'][level]:.1e}"]
        for thread_count in threads:
            for batch in batch_sizes:
                first, steady, alone = report["rows"][(level, thread_count, batch)]
                cells += [f"{steady:.2f} / {alone:.2f}", f"{alone / steady:.2f}x", f"{first:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
