"""One ONNX file for a whole trained subspace: the compression level is a graph input.

    python -m deploy.export --checkpoint RUN/model_final.pt --subspace --format onnx --out model.lcs.onnx
        [--levels 1.0,0.5,0.25] [--data_dir DIR] [--check_images N]

    session = onnxruntime.InferenceSession("model.lcs.onnx")
    logits = session.run(None, {"images": x, "level": np.float32(0.5)})[0]

The file is built from the per-level ONNX exports (deploy/onnx_export.py, write_checked: each
traced through its format's ONNX form and checked with ONNX Runtime as `--level L --format onnx`
checks it), so every format's graph is the per-level one, whatever that form is:

* the graph's inputs are `images` and `level` (a float32 scalar in the unit of `--level`);
* the nearest held level is found (ArgMin of |held - level|); a level farther than
  LEVEL_TOLERANCE from every held one runs the error branch, whose node fails with a name that
  says so and lists the held levels (ONNX has no error operator; ONNX Runtime names the failing
  node in its message). Otherwise a balanced tree of `If` nodes on the index picks the level's
  branch: the per-level graph, its tensors renamed, so structured levels run their slimmed
  network and the work shrinks with the width;
* the per-level graphs' tensors are stored once (SharedTensors), each either as it is or derived
  from what is stored by a few nodes: an equal tensor is one initializer; a leading block of a
  stored one (a slimmed network's weights) is a Slice of it; a stored one with its smaller
  magnitudes set to zero (TopK of the same weights) is that tensor masked at a stored threshold,
  one per tensor or one per output channel (a TopK taken before a BatchNorm folded into the
  weights scaled each row); a stored one with some entries zeroed otherwise (LEC's pruned
  channels of a whole norm, TopK ties kept by position) is masked by a stored boolean mask, one
  bit per entry when it is large; a tensor that takes some of the rows, columns, ... of a stored one (LEC's
  channels, chosen by |gamma|, not the leading ones) is a Gather of it with stored indices, found
  by matching values; a tensor on LCS+L's line (of a level at alpha) is computed from the two
  stored endpoints with the float32 operations and order of models.layers.interpolate, then masked
  as its TopK; small-range uint8 tensors (integer codes below 8 bits) are stored bit-packed and
  unpacked in the graph. Each derivation is checked bit for bit here before it is used. The
  derived tensors depend on initializers only, so ONNX Runtime computes them once when it creates
  the session (constant folding), not at each run, and still fuses and prepacks the convs;
* the nodes are written once (LevelBodies): each level's network and each derivation is a call of
  a model-local function (FunctionProto, domain "lcs") whose inputs are the tensors it reads, so
  the levels' networks, alike but for their tensors, are one function and a branch is a few dozen
  call nodes. ONNX Runtime inlines the functions when it creates the session, before it
  optimises, so each branch is again its level's graph.

Why this design (measured in docs/deploying.md): one `If` branch per level keeps each level's
graph exactly the per-level export's (same kernels, same logits), while the shared storage and
the shared functions keep the file within 1.10x the .lcs.pt artefact for every setting and
method. Every level's weights stay constants of its branch (never values computed from the level
input at run time), so the convs are prepacked as in the per-level file. Slicing with
level-dependent bounds at run time would need one graph whose shapes follow the level, and a
where-selection would run every level's network. Without the functions each level's graph
brought its own nodes (the traced GroupNorm's, the derivations': some 14 KiB a level of
cPreResNet20); without the line and the gathers, unstructured LCS+L stored a dense weight set
per level (7.1x the .lcs.pt) and LEC a network per level (3.3x).

`metadata_props` (JSON values) hold what an application needs without this project: format,
setting, method, model, the level unit and the held levels, the input and output names, the
preprocessing and class names (as every export stores them), and the commit of the code that
wrote the file (runs do not record theirs).
"""

import hashlib
import json
import os
import subprocess
import tempfile

import numpy as np

from deploy.compressed import (build_exported, export_at, input_metadata, num_classes_of, resolve_level,
                               training_model)
from deploy.onnx_export import (FLOAT_TOLERANCE, INPUT_NAME, METADATA, OUTPUT_NAME, DeployError, check_images,
                                compare, require_onnx, run_session, session, write_checked)
from deploy.verify import check_levels
from utils import checkpoint_schema as schema
from utils.atomic import atomic_write
from utils.errors import ConfigError, OutputError

FORMAT = "lcs-onnx-subspace"
VERSION = 1
LEVEL_NAME = "level"
LEVEL_TOLERANCE = 1e-6   # |level - held level| accepted (float32 rounding of the levels of every unit)
NO_LEVEL = "level not held"  # the error branch's node name begins with this
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the command ---------------------------------------------------------------------------
def held_levels(method, levels):
    """The levels the file holds: `levels` (--levels, checked against the method's range) or the
    run's evaluation grid, in that order, without repeats."""
    if levels is None:
        return [point.level for point in method.eval_points()]
    unit = method.level_unit.type
    for level in levels:
        try:
            method.check_export_level(method.config, level)
        except ConfigError as error:
            raise ConfigError(str(error).replace(f"--level {level:g}", f"--levels {level:g}", 1)) from None
    return list(dict.fromkeys(unit(level) for level in levels))


def export_subspace_onnx(payload, checkpoint, out, levels=None, data_dir=None, count=256):
    """Write the one-file ONNX subspace of a checkpoint payload to `out` (atomically); the lines
    describing it. Each level's export is checked against the training-time model
    (deploy/verify.py), its ONNX graph with ONNX Runtime (write_checked), and the one file at
    every level against that level's graph, before anything is written."""
    onnx, _ = require_onnx()
    schema.check_model(payload, checkpoint)  # tensors only, all finite
    model, method = training_model(payload, checkpoint)
    levels = held_levels(method, levels)
    num_classes = num_classes_of(payload["model"])
    contents = {level: export_at(model, method, num_classes, level, data_dir=data_dir) for level in levels}
    checked = check_levels(model, method, lambda level: build_exported(contents[level], out), levels, out,
                           data_dir)
    with tempfile.TemporaryDirectory(prefix="lcs-onnx-") as scratch:
        paths, lines = [], []
        for index, level in enumerate(levels):
            path = os.path.join(scratch, f"level_{index}.onnx")
            level_lines, _ = write_checked(contents[level], path, data_dir, count,
                                           name=f"{out} (level {level:g})")
            paths.append(path)
            lines.append(f"level {level:g}: {level_lines[0]}")
        merged = merge([onnx.load(path) for path in paths], levels,
                       metadata(method, levels, contents[levels[0]]), method.level_unit.label,
                       line_endpoints(model), [resolve_level(method, level)[1] for level in levels])
        images, source = check_images(contents[levels[0]], data_dir, count)
        agreement = {}

        def write(temporary):
            onnx.save(merged, temporary)
            agreement["worst"] = check_against_levels(temporary, paths, levels, images, out)

        atomic_write(out, write, failure=OutputError)
    worst = agreement["worst"]
    return [checked, *lines,
            f"one file against the per-level graphs on {source}: largest |Δlogit| {worst:.2g} spreads at any level "
            f"(tolerance {FLOAT_TOLERANCE:g})"]


def line_endpoints(model):
    """[(theta_0, theta_1)] of every tensor of `model` on a line (LCS+L's `weight`/`weight1`,
    `bias`/`bias1`), as float32 arrays."""
    state = {key: value.detach().cpu().numpy() for key, value in model.state_dict().items()}
    return [(state[key[:-1]], value) for key, value in state.items()
            if key.endswith(("weight1", "bias1")) and key[:-1] in state]


def metadata(method, levels, content):
    """The file's metadata_props ({key: JSON value})."""
    config = method.config
    values = {"format": FORMAT, "version": VERSION, "setting": config.setting, "method": config.method,
              "model": config.model, "level_name": method.level_unit.name, "level_unit": method.level_unit.label,
              "levels": [float(level) for level in levels], "inputs": [INPUT_NAME, LEVEL_NAME],
              "output": OUTPUT_NAME, "input_size": content["input_size"], "commit": code_commit(),
              **input_metadata(config)}
    return {key: json.dumps(value) for key, value in values.items() if key not in METADATA or value is not None}


def code_commit():
    """The commit of this checkout (with a mark when files differ from it), or "unknown"."""
    def git(*words):
        try:
            result = subprocess.run(["git", *words], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return result.stdout.strip() if result.returncode == 0 else ""
    commit = git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


class AtLevel:
    """A session of the one file, run like a per-level session (deploy.onnx_export.run_session)."""

    def __init__(self, onnx_session, level):
        self.session, self.level = onnx_session, np.array(level, np.float32)

    def run(self, outputs, feeds):
        return self.session.run(outputs, {**feeds, LEVEL_NAME: self.level})


def check_against_levels(path, level_paths, levels, images, name):
    """The one file at `path` against each level's graph on `images`: the largest per-image
    max |Δlogit| in spreads (deploy.onnx_export.compare), or a DeployError naming `name`."""
    merged, worst = session(path), 0.0
    for level, level_path in zip(levels, level_paths):
        per_level = session(level_path)
        result = compare(AtLevel(merged, level), lambda batch, per_level=per_level: run_session(per_level, batch),
                         images)
        if not result["max_difference"] <= FLOAT_TOLERANCE:  # also refuses NaN
            raise DeployError(f"{name}: not written: at level {level:g} the one file does not reproduce the "
                              f"level's ONNX graph (largest |Δlogit| {result['max_difference']:.2g} spreads, "
                              f"tolerance {FLOAT_TOLERANCE:g})")
        worst = max(worst, result["max_difference"])
    return worst


# -- the graph ------------------------------------------------------------------------------
def merge(models, levels, metadata_props, unit="level", endpoints=(), alphas=None):
    """One onnx.ModelProto from the per-level models (same input and output names): the level
    input selects the level's graph (see the module docstring). `endpoints`: the (theta_0,
    theta_1) of the tensors on a line, `alphas`: each level's position on it (None: off the line)."""
    onnx, _ = require_onnx()
    from onnx import TensorProto, helper

    shared = SharedTensors(endpoints)
    alphas = alphas or [None] * len(models)
    # Larger and denser graphs first, so that the others find their tensors inside theirs.
    order = sorted(range(len(models)), key=lambda index: [-sum(figures) for figures in zip(*(
        tensor_figures(tensor) for tensor in models[index].graph.initializer))])
    bodies = LevelBodies(opset_imports(models))
    branches = {index: branch(models[index].graph, f"L{index}", shared, bodies, alphas[index]) for index in order}
    held = shared.constant(np.asarray(levels, np.float32), "held_levels")
    nodes = [helper.make_node("Sub", [held, LEVEL_NAME], ["level_difference"], name="level_difference"),
             helper.make_node("Abs", ["level_difference"], ["level_distance"], name="level_distance"),
             helper.make_node("ArgMin", ["level_distance"], ["level_index"], name="level_index", axis=0,
                              keepdims=0),
             helper.make_node("ReduceMin", ["level_distance"], ["nearest_distance"], name="nearest_distance",
                              keepdims=0),
             helper.make_node("LessOrEqual", ["nearest_distance",
                                              shared.constant(np.float32(LEVEL_TOLERANCE), "level_tolerance")],
                              ["level_held"], name="level_held"),
             helper.make_node("If", ["level_held"], [OUTPUT_NAME], name="select_level",
                              then_branch=tree(branches, 0, len(levels), shared),
                              else_branch=error_branch(levels, unit, shared))]
    first = models[0].graph
    level_input = helper.make_tensor_value_info(LEVEL_NAME, TensorProto.FLOAT, [])
    graph = helper.make_graph(nodes, "lcs_subspace", [first.input[0], level_input], [first.output[0]],
                              initializer=shared.initializers)
    model = helper.make_model(graph, opset_imports=opset_imports(models) + [helper.make_opsetid(BODY_DOMAIN, 1)],
                              producer_name="lcs deploy.export", functions=bodies.functions)
    model.ir_version = max(m.ir_version for m in models)
    for key, value in metadata_props.items():
        model.metadata_props.add(key=key, value=value)
    return model


def opset_imports(models):
    """The per-level models' opsets (one version per domain, as one exporter writes them)."""
    from onnx import helper

    versions = {}
    for model in models:
        for opset in model.opset_import:
            versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    return [helper.make_opsetid(domain, version) for domain, version in versions.items()]


def tree(branches, low, high, shared):
    """The graph that runs the level of index level_index in [low, high): a branch, or an If
    on level_index < the middle index over two halves."""
    from onnx import helper

    if high - low == 1:
        return branches[low]
    middle = (low + high) // 2
    condition = f"below_{low}_{middle}_{high}"
    nodes = [helper.make_node("Less", ["level_index", shared.constant(np.int64(middle), f"index_{middle}")],
                              [condition], name=condition),
             helper.make_node("If", [condition], [f"logits_{low}_{high}"], name=f"levels_{low}_{high}",
                              then_branch=tree(branches, low, middle, shared),
                              else_branch=tree(branches, middle, high, shared))]
    return helper.make_graph(nodes, f"levels_{low}_{high}", [], [output_info(f"logits_{low}_{high}")])


def output_info(name):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def error_branch(levels, unit, shared):
    """The branch of a level the file does not hold: a Reshape of the level's one value to two
    values, which fails at run time (it depends on the level input, so it is never folded),
    named so that ONNX Runtime's message says what is wrong."""
    from onnx import helper

    name = f"{NO_LEVEL}: the level input ({unit}) must be one of {', '.join(f'{level:g}' for level in levels)}"
    nodes = [helper.make_node("Unsqueeze", [LEVEL_NAME, shared.constant(np.asarray([0], np.int64), "axis_0")],
                              ["level_vector"], name="level_vector"),
             helper.make_node("Reshape", ["level_vector", shared.constant(np.asarray([2], np.int64), "two")],
                              ["no_level"], name=name)]
    return helper.make_graph(nodes, "level_not_held", [], [output_info("no_level")])


def branch(graph, prefix, shared, bodies, alpha=None):
    """A per-level graph as an If branch: its tensors renamed `prefix`.N (short names: a graph
    names every value, and the exporter's long names cost a tenth of a structured file), its
    initializers taken from (or added to) `shared` (for a level at `alpha` on the line, or None),
    the images from the outer graph; the derivation of each tensor and the network are calls of
    functions of `bodies`."""
    from onnx import helper, numpy_helper

    [images] = graph.input
    assert images.name == INPUT_NAME and len(graph.output) == 1, "a per-level graph has one input and one output"
    renamed = {INPUT_NAME: INPUT_NAME, "": ""}

    def short(name):
        if name not in renamed:
            renamed[name] = f"{prefix}.{len(renamed)}"
        return renamed[name]

    nodes, derivations, scalars = [], [], {}

    def constant(name, array):
        """An initializer's or a Constant node's tensor, from the shared storage. A branch that
        reads a stored tensor directly gets a copy of its own, a Slice of all of it (folded at
        load; ONNX Runtime removes an Identity instead): it fuses and re-lays out (NCHWc) only the
        weights a graph holds, as the per-level graph holds them. Scalars are read as stored."""
        local = short(name)
        stored, derived = shared.reference(array, local, alpha)
        if derived:
            derivations.append(derived)
        elif array.ndim:  # in the network's function, whose inputs differ from level to level less
            nodes.extend(shared.sliced(stored, array.shape, local))
        else:
            scalars[local] = stored

    for tensor in graph.initializer:
        constant(tensor.name, numpy_helper.to_array(tensor))
    for node in graph.node:
        assert not any(attribute.g.node or attribute.graphs for attribute in node.attribute), \
            f"{node.name}: per-level graphs with subgraphs are not merged"
        if node.op_type == "Constant" and [attribute.name for attribute in node.attribute] == ["value"]:
            constant(node.output[0], numpy_helper.to_array(node.attribute[0].t))
        elif node.op_type == "Identity" and node.output[0] != graph.output[0].name:
            renamed[node.output[0]] = short(node.input[0])  # the exporter's aliases of weights
        else:
            copy = helper.make_node(node.op_type, [short(name) for name in node.input],
                                    [short(name) for name in node.output], domain=node.domain)
            copy.attribute.extend(node.attribute)
            nodes.append(copy)
    output = renamed[graph.output[0].name]
    calls = [bodies.call(chain, chain[-1].output[0]) for chain in derivations] + [bodies.call(nodes, output, scalars)]
    return helper.make_graph(calls, prefix, [], [output_info(output)])


BODY_DOMAIN = "lcs"  # the domain of the model-local functions that hold the levels' graphs


class LevelBodies:
    """The levels' node lists (each level's network, each derivation of a tensor) as model-local
    functions (onnx FunctionProto): a list whose nodes are another list's, wired alike and
    differing only in the outer tensors they read (stored weights, thresholds, norm parameters,
    shapes), calls that list's function with its own tensors as inputs; each function is written
    once. ONNX Runtime inlines the functions when it creates the session, before it optimises the
    graph, so each branch is again its level's graph: its derived weights folded, its convs
    prepacked (measured in docs/deploying.md)."""

    def __init__(self, opsets):
        self.opsets, self.functions, self.by_body = opsets, [], {}

    def call(self, nodes, output, aliases=None):
        """The node that computes `output` as `nodes` do (a call of their function; one node
        stays itself). `aliases` {name in `nodes`: the tensor the call passes for it}: the stored
        scalars, which one level may read twice where another reads two (two equal scales) and
        whose names the function therefore keeps apart."""
        from onnx import helper

        if len(nodes) == 1:
            return nodes[0]
        produced = {name for node in nodes for name in node.output}
        outer = list(dict.fromkeys(name for node in nodes for name in node.input
                                   if name and name not in produced))
        local = {name: f"i{index}" for index, name in enumerate(outer)}
        for node in nodes:
            for name in node.output:
                local.setdefault(name, f"v{len(local)}")
        body = []
        for node in nodes:
            copy = helper.make_node(node.op_type, [local.get(name, "") for name in node.input],
                                    [local[name] for name in node.output], domain=node.domain)
            copy.attribute.extend(node.attribute)
            body.append(copy)
        key = (len(outer), local[output], b"".join(node.SerializeToString() for node in body))
        if key not in self.by_body:
            name = f"f{len(self.functions)}"
            self.functions.append(helper.make_function(BODY_DOMAIN, name, list(local.values())[:len(outer)],
                                                       [local[output]], body, self.opsets))
            self.by_body[key] = name
        return helper.make_node(self.by_body[key], [(aliases or {}).get(name, name) for name in outer], [output],
                                domain=BODY_DOMAIN)


def tensor_figures(tensor):
    """(bytes, nonzero values) of an initializer."""
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor)
    return array.nbytes, int(np.count_nonzero(array))


# -- shared storage ---------------------------------------------------------------------------
class SharedTensors:
    """The initializers of the one file: each per-level tensor stored once, or derived from a
    stored one by nodes that read initializers only (folded by ONNX Runtime at load)."""

    def __init__(self, endpoints=()):
        self.initializers, self.arrays, self.by_content = [], {}, {}
        self.endpoints = list(endpoints)  # [(theta_0, theta_1)]: stored when a tensor is derived from them

    def constant(self, array, name=None):
        """The name of an initializer holding `array` (an existing equal one if any; a new one is
        named `name`, by default a short name: the names of a branch's inputs are repeated in
        every node that reads them)."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
        if key not in self.by_content:
            from onnx import numpy_helper

            name = name or f"k{len(self.initializers)}"
            self.by_content[key] = name
            self.arrays[name] = array
            self.initializers.append(numpy_helper.from_array(array, name))
        return self.by_content[key]

    def reference(self, array, name, alpha=None):
        """(the name `array` has in the branch, the nodes that derive it) for a per-level tensor
        (of a level at `alpha` on the line, or off it: None)."""
        key = (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
        if key in self.by_content:
            return self.by_content[key], []
        for stored_name, stored in list(self.arrays.items()):
            if stored.dtype != array.dtype or stored.ndim != array.ndim or array.ndim == 0:
                continue
            if stored.shape != array.shape and all(a <= s for a, s in zip(array.shape, stored.shape)):
                if np.array_equal(stored[tuple(slice(0, size) for size in array.shape)], array):
                    return name, self.sliced(stored_name, array.shape, name)
            elif stored.shape == array.shape and array.dtype == np.float32:
                threshold = masked_threshold(stored, array)
                if threshold is not None:
                    return name, self.masked(stored_name, threshold, name)
                if zeroed(stored, array):
                    return name, self.masked(stored_name, None, name, keep=array != 0)
        for stored_name, stored in list(self.arrays.items()):
            if stored.dtype == array.dtype == np.float32 and stored.ndim == array.ndim and all(
                    a <= s for a, s in zip(array.shape, stored.shape)) and stored.shape != array.shape:
                indices = gathered_indices(stored, array)
                if indices is not None:
                    return name, self.gathered(stored_name, indices, name)
        if alpha is not None and array.dtype == np.float32:
            for start, end in self.endpoints:
                if start.size != array.size:  # a norm's parameters are read with shape [C, 1, 1]
                    continue
                point = line_point(start, end, alpha).reshape(array.shape)
                if np.array_equal(point, array):
                    return name, self.on_line(start, end, alpha, array.shape, name)
                threshold = masked_threshold(point, array)
                if threshold is not None:
                    return name, (self.on_line(start, end, alpha, array.shape, f"{name}l")
                                  + self.masked(f"{name}l", threshold, name))
        packed = pack_codes(array)
        if packed is not None:
            return name, self.unpacked(packed, array, name)
        return self.constant(array), []

    def sliced(self, stored_name, shape, name):
        from onnx import helper

        ends, starts = self.constant(np.asarray(shape, np.int64)), self.constant(np.zeros(len(shape), np.int64))
        return [helper.make_node("Slice", [stored_name, starts, ends], [name])]

    def gathered(self, stored_name, indices, name):
        """Nodes that take the entries `indices` (one index array per axis) of a stored tensor."""
        from onnx import helper

        nodes, source = [], stored_name
        full = self.arrays[stored_name].shape
        axes = [axis for axis, index in enumerate(indices) if not np.array_equal(index, np.arange(full[axis]))]
        for axis in axes:
            output = name if axis == axes[-1] else f"{name}g{axis}"
            nodes.append(helper.make_node("Gather", [source, self.constant(indices[axis].astype(np.int32))],
                                          [output], axis=axis))
            source = output
        return nodes

    def masked(self, source, threshold, name, keep=None):
        """Nodes that set the entries of `source` of magnitude below `threshold` to zero, or those
        where the stored boolean mask `keep` is false (LEC's pruned channels of a whole norm)."""
        from onnx import TensorProto, helper

        zero = self.constant(np.zeros((), np.float32))
        if keep is not None:
            # A large mask (a TopK that no threshold reproduces: ties at the boundary, kept by
            # position) is stored as one bit per entry, unpacked as codes are.
            packed = pack_codes(keep.astype(np.uint8))
            if packed is None:
                return [helper.make_node("Where", [self.constant(keep), source, zero], [name])]
            return self.unpacked(packed, keep.astype(np.uint8), f"{name}m") + [
                helper.make_node("Cast", [f"{name}m"], [f"{name}q"], to=TensorProto.BOOL),
                helper.make_node("Where", [f"{name}q", source, zero], [name])]
        return [helper.make_node("Abs", [source], [f"{name}a"]),
                helper.make_node("GreaterOrEqual", [f"{name}a", self.constant(threshold)], [f"{name}k"]),
                helper.make_node("Where", [f"{name}k", source, zero], [name])]

    def on_line(self, start, end, alpha, shape, name):
        """Nodes that compute theta(alpha) of `shape` from the stored endpoints with the float32
        operations of models.layers.interpolate, in its order: torch multiplies a float32 tensor by
        a Python float as by that float rounded to float32, so the tensor is the layer's bit for
        bit (the caller has compared them)."""
        from onnx import helper

        weights = [self.constant(np.float32(1.0 - alpha)), self.constant(np.float32(alpha))]
        reshaped = start.shape != shape
        nodes = [helper.make_node("Mul", [self.constant(start), weights[0]], [f"{name}s"]),
                 helper.make_node("Mul", [self.constant(end), weights[1]], [f"{name}e"]),
                 helper.make_node("Add", [f"{name}s", f"{name}e"], [f"{name}p" if reshaped else name])]
        if reshaped:
            nodes.append(helper.make_node("Reshape", [f"{name}p", self.constant(np.asarray(shape, np.int64))],
                                          [name]))
        return nodes

    def unpacked(self, packed, array, name):
        """Nodes that rebuild an 8-bit integer tensor from its bit planes (pack_codes): bit j of
        value i is bit i % 8 of byte i // 8 of plane j. (Node and value names are short: a
        quantized file has some two thousand nodes.)"""
        from onnx import TensorProto, helper

        planes, low = packed
        bits = planes.shape[0]
        stored = self.constant(planes[:, :, None])
        # Each byte's bit m: shift it to the top, then down to the bottom.
        up = self.constant((7 - np.arange(8, dtype=np.uint8)).reshape(1, 1, 8))
        down = self.constant(np.uint8(7))
        weights = self.constant((1 << np.arange(bits, dtype=np.int32)).reshape(bits, 1, 1))
        shape = self.constant(np.asarray(array.shape, np.int64))
        nodes = [helper.make_node("BitShift", [stored, up], [f"{name}u"], direction="LEFT"),
                 helper.make_node("BitShift", [f"{name}u", down], [f"{name}b"], direction="RIGHT"),
                 helper.make_node("Cast", [f"{name}b"], [f"{name}i"], to=TensorProto.INT32),
                 helper.make_node("Mul", [f"{name}i", weights], [f"{name}w"]),
                 helper.make_node("ReduceSum", [f"{name}w", self.constant(np.asarray([0], np.int64))],
                                  [f"{name}s"], keepdims=0),
                 helper.make_node("Add", [f"{name}s", self.constant(np.int32(low))], [f"{name}o"]),
                 helper.make_node("Cast", [f"{name}o"], [f"{name}c"],
                                  to=TensorProto.UINT8 if array.dtype == np.uint8 else TensorProto.INT8)]
        if array.size % 8:  # the last byte's padding
            nodes += [helper.make_node("Reshape", [f"{name}c", self.constant(np.asarray([-1], np.int64))],
                                       [f"{name}f"]),
                      helper.make_node("Slice", [f"{name}f", self.constant(np.asarray([0], np.int64)),
                                                 self.constant(np.asarray([array.size], np.int64))],
                                       [f"{name}v"])]
        nodes.append(helper.make_node("Reshape", [nodes[-1].output[0], shape], [name]))
        return nodes


def line_point(start, end, alpha):
    """theta(alpha) as the layers compute it (models.layers.interpolate, in torch)."""
    import torch

    from models.layers import interpolate

    return interpolate(torch.from_numpy(start), torch.from_numpy(end), alpha).numpy()


def gathered_indices(stored, array):
    """Per axis, the indices such that stored[np.ix_(*indices)] is `array` (a network that keeps
    some of the channels, not the leading ones: LEC), or None. Each entry of `array` whose value
    occurs once in `stored` says where its row, column, ... came from; the result is checked."""
    nonzero = np.flatnonzero(array)
    if not nonzero.size or not (stored == array.flat[nonzero[0]]).any():  # the common case, quickly
        return None
    values, first, counts = np.unique(stored.reshape(-1), return_index=True, return_counts=True)
    flat = array.reshape(-1)
    at = np.minimum(np.searchsorted(values, flat), len(values) - 1)
    known = np.flatnonzero((values[at] == flat) & (counts[at] == 1))
    source = np.unravel_index(first[at[known]], stored.shape)
    target = np.unravel_index(known, array.shape)
    indices = []
    for axis, size in enumerate(array.shape):
        index = np.full(size, -1, np.int64)
        index[target[axis]] = source[axis]
        if (index < 0).any():
            return None
        indices.append(index)
    return indices if np.array_equal(stored[np.ix_(*indices)], array) else None


def zeroed(stored, array):
    """Whether `array` is `stored` with some entries set to zero."""
    kept = array != 0
    return bool(kept.any()) and not kept.all() and np.array_equal(np.where(kept, stored, 0), array)


def masked_threshold(stored, array):
    """t such that `array` is `stored` with the entries of magnitude below t set to zero (a TopK
    of the same weights): a scalar, or one value per output channel (a [C, 1, ...] array); or
    None."""
    kept = array != 0
    if not kept.any() or kept.all() or not np.array_equal(stored[kept], array[kept]):
        return None
    threshold = np.abs(array[kept]).min()  # of the array's dtype
    if np.array_equal(np.where(np.abs(stored) >= threshold, stored, 0).astype(stored.dtype), array):
        return threshold
    if array.ndim < 2:
        return None
    # One threshold per output channel: a TopK taken before a per-channel scale (a BatchNorm folded
    # into the weights) orders each row's magnitudes as the stored tensor does, not the whole tensor.
    rows = np.where(kept, np.abs(array), np.inf).reshape(array.shape[0], -1).min(axis=1)
    rows = rows.astype(array.dtype).reshape((-1,) + (1,) * (array.ndim - 1))
    if np.array_equal(np.where(np.abs(stored) >= rows, stored, 0).astype(stored.dtype), array):
        return rows
    return None


MIN_PACKED = 1024  # smaller tensors are stored as they are (the unpacking nodes would cost more)


def pack_codes(array):
    """(bit planes [bits, ceil(n / 8)] uint8, lowest value) of an 8-bit integer tensor whose values
    span fewer than 2^7 codes (integer codes below 8 bits), or None."""
    if array.dtype not in (np.uint8, np.int8) or array.size < MIN_PACKED:
        return None
    low = int(array.min())
    bits = max(1, int(array.max()) - low).bit_length()
    if bits >= 8:
        return None
    values = (array.reshape(-1).astype(np.int32) - low).astype(np.uint8)
    planes = np.stack([np.packbits((values >> j) & 1, bitorder="little") for j in range(bits)])
    return planes, low
