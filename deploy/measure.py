"""What benchmarks/deploy.py measures of the deployment formats: the subspace artefact's size and
level-switch time, and ONNX Runtime sessions that time like torch models."""

import os
import statistics
import time

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
