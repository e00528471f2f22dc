"""One ONNX file whose compression level is a graph input (deploy/onnx_subspace.py): every
setting's file against its per-level ONNX graphs, the level input's errors, the metadata, the
stored size, the command's refusals, and the documented application in an environment with
onnxruntime and numpy only. Skipped only where onnx/onnxruntime are not installed."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install -r requirements-deploy.txt)")
ort = pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (pip install -r requirements-deploy.txt)")

from deploy.compressed import export_model  # noqa: E402
from deploy.onnx_export import write_checked  # noqa: E402
from deploy.onnx_export import session  # noqa: E402
from deploy.onnx_subspace import BODY_DOMAIN, NO_LEVEL, SharedTensors, masked_threshold, merge  # noqa: E402
from test_export import make_checkpoint, refused  # noqa: E402
from test_onnx import post_relu_ranges  # noqa: E402
from utils import checkpoint as ckpt  # noqa: E402
from deploy.export import main  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (setting, method, flags, the levels the file holds): every setting, LEC, each quantized method.
CASES = [
    ("structured_sparsity", "us", (), (1.0, 0.5, 0.25)),
    ("structured_sparsity", "lcs_l", (), (1.0, 0.25)),
    ("structured_sparsity", "lec", ("--bn_calibration_images", "0"), (0.9, 0.4)),
    ("unstructured_sparsity", "lcs_p", (), (1.0, 0.05)),
    ("unstructured_sparsity", "lcs_l", (), (0.5, 0.05)),
    ("quantized", "lcs_l", ("--norm", "BN"), (8, 3)),
    ("quantized", "target_bit_width", (), (8, 3)),
]


def export(tmp_path, setting, method, flags, levels, ranges=False):
    """(checkpoint, its payload, the one file) exported by the command at `levels`."""
    path, *_ = make_checkpoint(tmp_path, setting, method, flags)
    payload = ckpt.load(path)
    if ranges:  # every quantized conv with an activation range: integer convolutions throughout
        post_relu_ranges(payload)
        ckpt.save(path, payload)
    out = str(tmp_path / "model.lcs.onnx")
    main(["--checkpoint", path, "--subspace", "--format", "onnx", "--out", out, "--check_images", "8",
          "--levels", ",".join(f"{level:g}" for level in levels)])
    return path, payload, out


def run(session, images, level):
    return session.run(None, {"images": images, "level": np.array(level, np.float32)})[0]


@pytest.mark.parametrize("setting,method,flags,levels", CASES, ids=[f"{c[0].split('_')[0]}-{c[1]}" for c in CASES])
def test_one_file_gives_each_levels_graph(tmp_path, capsys, setting, method, flags, levels):
    """At every held level, in one session, the logits of the per-level ONNX export (within 1e-4
    of the largest logit); a level it does not hold is ONNX Runtime's error naming the levels."""
    path, payload, out = export(tmp_path, setting, method, flags, levels, ranges=setting == "quantized")
    printed = capsys.readouterr().out
    assert "one file against the per-level graphs" in printed and f"wrote {out}" in printed
    one_file = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(3).standard_normal((6, 3, 32, 32)).astype(np.float32)
    for index, level in enumerate(levels):
        level_path = str(tmp_path / f"level_{index}.onnx")
        write_checked(export_model(payload, level), level_path, count=8)
        expected = ort.InferenceSession(level_path, providers=["CPUExecutionProvider"]).run(
            None, {"images": images})[0]
        logits = run(one_file, images, level)
        assert logits.shape == expected.shape == (6, 10)
        assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max(), level
    with pytest.raises(Exception, match=NO_LEVEL + r": the level input \(.*\) must be one of " +
                       re.escape(", ".join(f"{level:g}" for level in levels))):
        run(one_file, images, levels[-1] / 2 + 0.011)  # inside the range, not held
    meta = {key: json.loads(value) for key, value in one_file.get_modelmeta().custom_metadata_map.items()}
    assert (meta["format"], meta["setting"], meta["method"]) == ("lcs-onnx-subspace", setting, method)
    assert meta["levels"] == [float(level) for level in levels] and meta["inputs"] == ["images", "level"]
    assert meta["preprocessing"]["input_size"] == 32 and meta["class_names"][3] == "cat"
    assert re.fullmatch(r"[0-9a-f]{40}( \(with uncommitted changes\))?|unknown", meta["commit"])


def stored_bytes(path):
    return sum(tensor.ByteSize() for tensor in onnx.load(path).graph.initializer)


def test_levels_share_their_weights(tmp_path):
    """The structured file stores the full-width weights once (the narrower levels are slices of
    them), not one network per level, and stays within 1.10x the .lcs.pt artefact."""
    path, payload, out = export(tmp_path, "structured_sparsity", "us", (), (1.0, 0.75, 0.5, 0.25))
    full = str(tmp_path / "full.onnx")
    write_checked(export_model(payload, 1.0), full, count=8)
    assert stored_bytes(out) <= 1.01 * stored_bytes(full)
    main(["--checkpoint", path, "--subspace", "--out", str(tmp_path / "model.lcs.pt")])
    assert os.path.getsize(out) <= 1.10 * os.path.getsize(tmp_path / "model.lcs.pt")


# (setting, method, flags, the levels the file holds): the runs whose levels share least (LCS+L's
# line, LEC's channel subsets, many TopK or bit-width levels), and the structured and
# target_bit_width runs that met the size first.
SIZE_CASES = [
    ("unstructured_sparsity", "lcs_l", (), (1.0, 0.5, 0.05)),
    ("unstructured_sparsity", "lcs_p", (), (1.0, 0.9, 0.75, 0.5, 0.25, 0.1, 0.05, 0.025)),
    ("quantized", "lcs_l", (), (8, 7, 6, 5, 4, 3)),
    ("quantized", "target_bit_width", (), (8, 7, 6, 5, 4, 3)),
    ("structured_sparsity", "lec", ("--bn_calibration_images", "0"), (1.0, 0.9, 0.75, 0.5, 0.25, 0.05)),
    ("structured_sparsity", "lcs_l", (), (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)),
]


@pytest.mark.parametrize("setting,method,flags,levels", SIZE_CASES,
                         ids=[f"{c[0].split('_')[0]}-{c[1]}" for c in SIZE_CASES])
def test_the_one_file_is_within_1_10x_the_lcs_pt(tmp_path, capsys, setting, method, flags, levels):
    """Every level's tensors derived from what the .lcs.pt stores (a line's endpoints, the full
    channels, the densest weights, bit-packed codes) and every level's network written once: the
    file is at most 1.10x the .lcs.pt artefact, and still gives each level's logits exactly (the
    export's check against the per-level graphs: largest difference 0)."""
    path, payload, out = export(tmp_path, setting, method, flags, levels, ranges=setting == "quantized")
    assert "one file against the per-level graphs on 8 random images: largest |Δlogit| 0 spreads" in \
        capsys.readouterr().out
    main(["--checkpoint", path, "--subspace", "--out", str(tmp_path / "model.lcs.pt")])
    assert os.path.getsize(out) <= 1.10 * os.path.getsize(tmp_path / "model.lcs.pt")
    assert run_time_ops(out, tmp_path / "optimized.onnx") & {"Where", "BitShift", "GreaterOrEqual"} == set()


def run_time_ops(path, optimized):
    """The op types ONNX Runtime runs in the optimised graph of the one file, its branches
    included: the functions inlined, each level's derived tensors folded (none of the derivations'
    ops is left, and no call of a function)."""
    session(path, optimized_path=str(optimized))
    ops = set()

    def collect(graph):
        for node in graph.node:
            ops.add(node.op_type if node.domain != BODY_DOMAIN else "a function call")
            for attribute in node.attribute:
                for subgraph in [attribute.g, *attribute.graphs]:
                    collect(subgraph)
    collect(onnx.load(str(optimized)).graph)
    assert "a function call" not in ops
    return ops


def evaluate(model, feeds=None):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds or {})


@pytest.mark.parametrize("kind", ["slice", "mask", "codes", "line", "gather", "zeroed", "row_mask",
                                  "scattered"])
def test_shared_tensors_rebuild_each_tensor_exactly(kind):
    """Each way a tensor is stored for another (a leading block, TopK zeros, bit planes of codes,
    a TopK point of LCS+L's line as the layers compute it in torch, some rows and columns, some
    entries zeroed, a TopK taken before a per-channel scale (a folded BatchNorm: one threshold per
    row), zeros no threshold gives (a bit per entry)) rebuilds it bit for bit in ONNX Runtime, and
    stores less than the tensor itself besides what it is derived from."""
    import torch
    from onnx import helper, numpy_helper

    from models.layers import interpolate, topk_mask

    rng = np.random.default_rng(0)
    stored = [rng.standard_normal((16, 8, 3, 3)).astype(np.float32)]
    endpoints, alpha = [], None
    if kind == "slice":
        tensor = stored[0][:8, :4].copy()
    elif kind == "mask":
        tensor = np.where(np.abs(stored[0]) >= np.quantile(np.abs(stored[0]), 0.7), stored[0], 0).astype(np.float32)
    elif kind == "codes":
        stored = []
        tensor = (rng.integers(0, 8, (64, 32, 3, 3)) + 124).astype(np.uint8)  # 3-bit codes, as uint8 + 128
    elif kind == "line":
        endpoints, alpha = [(stored[0], rng.standard_normal((16, 8, 3, 3)).astype(np.float32))], 0.3
        stored = []  # the endpoints are stored when a tensor is derived from them
        point = interpolate(*map(torch.from_numpy, endpoints[0]), alpha)
        tensor = (point * topk_mask(point, 0.4)).numpy()
    elif kind == "gather":
        tensor = stored[0][[1, 4, 5, 9, 15]][:, [0, 2, 3]].copy()
    elif kind == "row_mask":  # TopK of the unscaled weights, then each row scaled: no one threshold
        weights, scale = stored[0], np.linspace(0.1, 3, 16, dtype=np.float32)[:, None, None, None]
        kept = np.abs(weights) >= np.quantile(np.abs(weights), 0.6)
        stored = [weights * scale]
        tensor = np.where(kept, stored[0], 0).astype(np.float32)
        assert masked_threshold(stored[0], tensor).shape == (16, 1, 1, 1)
    elif kind == "scattered":  # every other entry: no threshold per tensor or row
        tensor = stored[0] * (np.arange(stored[0].size) % 2).reshape(stored[0].shape).astype(np.float32)
        assert masked_threshold(stored[0], tensor) is None
    else:
        tensor = stored[0] * np.asarray([1, 0] * 8, np.float32)[:, None, None, None]
    shared = SharedTensors(endpoints)
    for array in stored:
        shared.constant(array)
    name, nodes = shared.reference(tensor, "tensor", alpha)
    assert nodes and name == "tensor"
    sources = sum(array.nbytes for array in stored) + sum(start.nbytes + end.nbytes for start, end in endpoints)
    extra = sum(numpy_helper.to_array(t).nbytes for t in shared.initializers) - sources
    assert extra < tensor.nbytes / 2
    if kind == "scattered":  # about one bit per entry, not a byte
        assert extra < tensor.size / 4
    output = helper.make_tensor_value_info("tensor", numpy_helper.from_array(tensor).data_type, None)
    graph = helper.make_graph(nodes, "g", [], [output], initializer=shared.initializers)
    [rebuilt] = evaluate(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert rebuilt.dtype == tensor.dtype and np.array_equal(rebuilt, tensor)


def test_merge_picks_the_branch_of_the_level():
    """Three one-node graphs (images + level index): the level input picks each, within float32
    rounding of the held level; any other level fails in the error branch."""
    from onnx import TensorProto, helper, numpy_helper

    models = []
    for index in range(3):
        graph = helper.make_graph([helper.make_node("Add", ["images", "offset"], ["logits"])], "g",
                                  [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 2])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
                                  [numpy_helper.from_array(np.full(2, index, np.float32), "offset")])
        models.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    merged = merge(models, [0.05, 0.1, 0.75], {"format": json.dumps("test")}, "fraction")
    images = np.zeros((1, 2), np.float32)
    session = ort.InferenceSession(merged.SerializeToString(), providers=["CPUExecutionProvider"])
    for index, level in enumerate([0.05, 0.1, 0.75]):
        assert run(session, images, level).tolist() == [[index, index]]
    for level in (0.0, 0.07, 0.75 + 1e-4, 2.0):
        with pytest.raises(Exception, match=NO_LEVEL + r": the level input \(fraction\) must be one of 0.05, 0.1, "
                                                       r"0.75"):
            run(session, images, level)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, *_ = make_checkpoint(tmp_path_factory.mktemp("refused"), "structured_sparsity", "us")
    return path


def usage_error(capsys, argv):
    """The one stderr line of a refused command (exit status 2): the parser's or the export's."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "deploy.export: error: " in err, err
    return err


def left_behind(folder, names):
    return sorted(name for name in os.listdir(folder) if name not in names)


@pytest.mark.parametrize("argv,message", [
    (["--levels", "0.5,0.1"], "--levels 0.1: structured_sparsity/us checkpoints export"),
    (["--levels", "0.5,x"], "argument --levels: expected comma-separated numbers, got '0.5,x'"),
    (["--out", "{dir}/model.onnx"], "--out {dir}/model.onnx: suffix .onnx does not fit --subspace --format onnx"),
])
def test_bad_flags_are_one_line_and_write_nothing(tmp_path, capsys, checkpoint, argv, message):
    argv = [item.replace("{dir}", str(tmp_path)) for item in argv]
    base = ["--checkpoint", checkpoint, "--subspace", "--format", "onnx"] + (
        [] if "--out" in argv else ["--out", str(tmp_path / "model.lcs.onnx")])
    err = usage_error(capsys, base + argv)
    assert message.replace("{dir}", str(tmp_path)) in err, err
    assert left_behind(tmp_path, []) == []


def test_levels_without_the_one_file_is_refused(tmp_path, capsys, checkpoint):
    err = usage_error(capsys, ["--checkpoint", checkpoint, "--level", "0.5", "--levels", "0.5",
                           "--out", str(tmp_path / "m.pt")])
    assert "--levels: chooses the levels of --subspace --format onnx" in err


@pytest.mark.parametrize("damage", ["another format", "cut"])
def test_a_checkpoint_of_another_format_or_damaged_is_one_line(tmp_path, capsys, checkpoint, damage):
    """An ONNX file, or a checkpoint cut short, given as --checkpoint: one line naming it, and
    nothing written (the one file, its temporary files, the per-level graphs)."""
    bad = tmp_path / "model_final.pt"
    if damage == "another format":
        graph = onnx.helper.make_graph([], "g", [], [])
        bad.write_bytes(onnx.helper.make_model(graph).SerializeToString())
    else:
        data = open(checkpoint, "rb").read()
        bad.write_bytes(data[:len(data) // 2])
    err = refused(capsys, ["--checkpoint", str(bad), "--subspace", "--format", "onnx",
                           "--out", str(tmp_path / "model.lcs.onnx")])
    assert str(bad) in err, err
    assert left_behind(tmp_path, ["model_final.pt"]) == []


def test_a_failed_check_writes_nothing(tmp_path, capsys, checkpoint, monkeypatch):
    """A one file that does not reproduce a level's graph is refused, nothing left behind."""
    import deploy.onnx_subspace as onnx_subspace

    original = onnx_subspace.merge

    def wrong_levels(models, levels, *args):  # each level runs the graph of the next one
        return original(models[1:] + models[:1], levels, *args)
    monkeypatch.setattr(onnx_subspace, "merge", wrong_levels)
    out = tmp_path / "model.lcs.onnx"
    err = refused(capsys, ["--checkpoint", checkpoint, "--subspace", "--format", "onnx", "--out", str(out),
                           "--levels", "1.0,0.5", "--check_images", "8"])
    assert f"{out}: not written: at level 1 the one file does not reproduce the level's ONNX graph" in err, err
    assert left_behind(tmp_path, []) == []


def documented_application():
    """The ```python block of docs/deploying.md that reads model.lcs.onnx."""
    text = open(os.path.join(REPO, "docs", "deploying.md"), encoding="utf-8").read()
    [code] = [block for block in re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
              if "model.lcs.onnx" in block]
    return code


@pytest.mark.slow
def test_the_documented_application_runs_with_onnxruntime_and_numpy_only(tmp_path, checkpoint):
    """The docs' example in a fresh virtual environment that holds onnxruntime and numpy only
    (linked from this environment through a .pth file; torch and this project cannot be
    imported there), in a folder outside the repository."""
    import importlib.util

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    venv, packages, app = tmp_path / "venv", tmp_path / "packages", tmp_path / "app"
    packages.mkdir()
    app.mkdir()
    for name in ("numpy", "onnxruntime"):
        folder = os.path.dirname(importlib.util.find_spec(name).origin)
        os.symlink(folder, packages / name)
        if os.path.isdir(folder + ".libs"):  # the shared libraries of numpy's wheel
            os.symlink(folder + ".libs", packages / (name + ".libs"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300, env=env)
    [venv_site] = (venv / "lib").glob("python*/site-packages")
    (venv_site / "only_onnxruntime_and_numpy.pth").write_text(f"{packages}\n")
    main(["--checkpoint", checkpoint, "--subspace", "--format", "onnx", "--out", str(app / "model.lcs.onnx"),
          "--levels", "1.0,0.5,0.25", "--check_images", "8"])
    (app / "application.py").write_text(documented_application())
    python = str(venv / "bin" / "python")
    isolated = subprocess.run([python, "-c", "import torch"], cwd=app, capture_output=True, text=True, env=env)
    assert "No module named 'torch'" in isolated.stderr
    result = subprocess.run([python, "application.py"], cwd=app, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "structured_sparsity us width factor [1.0, 0.5, 0.25]", lines
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert [line.split()[0] for line in lines[1:]] == ["0.5", "0.25"] and all(
        line.split()[1] in classes for line in lines[1:]), lines
    # A per-level ONNX export, and the one file cut short, in its place: one line each.
    data = (app / "model.lcs.onnx").read_bytes()
    main(["--checkpoint", checkpoint, "--level", "0.5", "--format", "onnx", "--out", str(tmp_path / "level.onnx"),
          "--check_images", "8"])
    (app / "model.lcs.onnx").write_bytes((tmp_path / "level.onnx").read_bytes())
    for expected in ("model.lcs.onnx: not one ONNX file of every level", "model.lcs.onnx: not a readable ONNX file"):
        result = subprocess.run([python, "application.py"], cwd=app, capture_output=True, text=True, timeout=120,
                                env=env)
        assert result.returncode == 1 and result.stderr.startswith(expected) and result.stderr.count("\n") == 1, \
            result.stderr
        (app / "model.lcs.onnx").write_bytes(data[:len(data) // 2])


@pytest.mark.slow
def test_the_benchmark_measures_the_one_file(tmp_path, checkpoint):
    """benchmarks/deploy.py --onnx_subspace: the size against the .lcs.pt and one row per level."""
    result = subprocess.run(
        [sys.executable, "benchmarks/deploy.py", "--checkpoint", checkpoint, "--onnx_subspace", "--levels", "1.0,0.5",
         "--repeats", "1", "--warmup", "0", "--batch_sizes", "1"], cwd=REPO, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"one ONNX file \(width factor an input\): [0-9.]+ KiB = [0-9.]+x the .lcs.pt artefact",
                     result.stdout), result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| 1 |", "| 0.5 |"))]
    assert len(rows) == 2 and all("| 0.0e+00 |" in row for row in rows), result.stdout
