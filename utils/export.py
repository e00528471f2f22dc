"""Export a trained model at one compression level as a standalone compressed model, and load it.

    python -m utils.export --checkpoint RUN/model_final.pt --level 0.5 --out model.pt [--round_to 8]
        [--data_dir DIR]
    python -m utils.export --checkpoint RUN/model_final.pt --level 8 --format onnx --out model.onnx
    python -m utils.export --checkpoint RUN/model_final.pt --subspace --out model.lcs.pt

--format onnx and --subspace are written by the deploy package (deploy.onnx_export,
deploy.subspace); this module keeps the per-level export they build on.

The level is in the unit of the checkpoint's setting: a width factor (structured lcs_l, lcs_p,
us, ns), the fraction of norm channels kept (structured lec), a TopK fraction (unstructured) or
a bit width (quantized). LCS+L models take their alpha from the level.

What the file holds (a torch.save'd dict of plain data, readable with weights_only=True):

* structured, LEC: a physically narrower dense network, i.e. its channel spec (`widths`,
  `selected`, as the model constructors take it) and its weights; line norms resolved at alpha,
  BN running statistics sliced, or, when the run's evaluations re-estimated them
  (`bn_calibration_images`, LEC's default), re-estimated the same way on the same training
  images (read from `--data_dir`), so the exported model gives the evaluated accuracy.
* unstructured: the weights at alpha masked to their TopK; each body conv whose bitmask plus
  kept values is smaller than the dense tensor is stored that way.
* quantized: the body conv weights (after the BN fold) as integer codes bit-packed at b bits
  with their per-tensor scale and zero point, and the recorded activation ranges.

Tensors of one kind are concatenated into one flat buffer (with their names and shapes):
torch.save spends about 270 bytes on every stored tensor, some 15 % of a 4-bit cPreResNet20.

`load_exported(path)` rebuilds the network with the standard layers (`build_model` with the
channel spec; quantized convs that use their stored weights as they are) and returns it in
eval mode; its outputs equal those of the training-time model evaluated at that level.
"""

import dataclasses
import math
import os
import sys

import torch

from methods import METHODS
from data import build_data
from methods.levels import alpha_to_bits, bits_to_alpha, width_to_alpha
from models import build_model, channel_spec
from models.bn_calibration import calibrate_bn
from models.factory import dense_factory, frozen_quant_factory
from models.layers import (ChannelSelection, LineMixin, QuantConv2d, TopKConv2d, quant_layers,
                           set_level)
from models.quant import dequantize, grid_limits, quantize_tensor_to_int
from models.slimming import lec_slim
from training_params import Config
from utils import checkpoint as ckpt
from utils import checkpoint_schema as schema
from utils.atomic import refuse_overwrite
from utils.errors import CheckpointError, ConfigError, UsageParser, UserError, one_line

FORMAT = "lcs-export"
VERSION = 1
ACT_BUFFERS = ("act_min", "act_max", "act_range_ready")
MAX_ROUND_TO = 1024  # no layer of the three networks is wider
MAX_CHECK_IMAGES = 10_000  # the CIFAR-10 test split
LEVEL_NAMES = {"structured_sparsity": "width_factor", "unstructured_sparsity": "topk", "quantized": "num_bits"}


# -- storage helpers (pure) --------------------------------------------------------------
def pack_bits(values, num_bits):
    """Non-negative integers below 2**num_bits, num_bits each, little-endian into uint8 bytes."""
    values = values.flatten().to(torch.uint8)
    bits = (values.unsqueeze(1) >> torch.arange(num_bits, dtype=torch.uint8)) & 1
    bits = bits.flatten()
    bits = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)]).view(-1, 8)
    packed = torch.zeros(len(bits), dtype=torch.uint8)
    for position in range(8):
        packed |= bits[:, position] << position
    return packed


def unpack_bits(packed, num_bits, count):
    """The first `count` integers of `num_bits` bits each from pack_bits' bytes (int64)."""
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    bits = bits.flatten()[:count * num_bits].view(count, num_bits).to(torch.int64)
    return (bits << torch.arange(num_bits)).sum(dim=1)


def concat(tensors, dtype=torch.float32):
    """Flat tensors joined into one (an empty tensor of `dtype` for none)."""
    return torch.cat([t.flatten() for t in tensors]) if tensors else torch.zeros(0, dtype=dtype)


def pack_tensors(tensors):
    """{name: float tensor} as one flat float32 buffer plus names and shapes."""
    return {"names": list(tensors), "shapes": [list(t.shape) for t in tensors.values()],
            "values": concat([t.detach().float().cpu() for t in tensors.values()])}


def unpack_tensors(group):
    tensors, offset = {}, 0
    for name, shape in zip(group["names"], group["shapes"]):
        count = math.prod(shape)
        tensors[name] = group["values"][offset:offset + count].view(shape)
        offset += count
    return tensors


def round_up_widths(widths, full_widths, multiple):
    """Each width rounded up to a multiple of `multiple`, never above the layer's full width."""
    return {name: min(full_widths[name], math.ceil(width / multiple) * multiple)
            for name, width in widths.items()}


# -- the training-time model ------------------------------------------------------------
def num_classes_of(state):
    """Output channels of the last conv weight of a state dict (every model's classifier)."""
    convs = [key for key, value in state.items() if key.endswith("weight") and value.dim() == 4]
    return state[convs[-1]].shape[0]


def checkpoint_config(payload, path):
    """The Config stored in a checkpoint payload."""
    try:
        config = Config(**payload["config"])
        METHODS[config.setting][config.method]
    except (TypeError, KeyError) as error:
        raise CheckpointError(f"{path}: its config is not one this project reads ({error})") from None
    return config


def training_model(payload, path):
    """The model as trained (method layers, both endpoints), in eval mode, and its config."""
    config = checkpoint_config(payload, path)
    method = METHODS[config.setting][config.method](config, None)
    num_classes = num_classes_of(payload["model"])
    model = build_model(config.model, method.layer_factory(), num_classes)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path}: its weights do not fit {config.model} built for {config.setting}/"
                              f"{config.method} ({str(error).splitlines()[0][:120]})") from None
    method.bind(model)
    model.eval()
    return model, config


def input_size_of(config):
    return config.input_size or 224


# -- levels -----------------------------------------------------------------------------
def _require_level(condition, config, level, allowed):
    if not condition:
        raise ConfigError(f"--level {level:g}: {config.setting}/{config.method} checkpoints export {allowed}")


def _structured_level(config, level):
    if config.method == "lec":
        _require_level(0 < level <= 1, config, level, "a fraction of norm channels kept in (0, 1]")
        return {}, None
    if config.method == "ns":
        _require_level(0 < level <= 1, config, level, "width factors in (0, 1]")
        return {"width_factor": level}, None
    low, high = config.width_factor_limits
    _require_level(low <= level <= high, config, level,
                   f"width factors in [{low:g}, {high:g}] (the trained width_factor_limits)")
    if config.method != "lcs_l":
        return {"width_factor": level}, None
    alpha = width_to_alpha(level, low, high)
    return {"alpha": alpha, "width_factor": level}, alpha


def _unstructured_level(config, level):
    _require_level(0 < level <= 1, config, level, "TopK fractions in (0, 1]")
    if config.method != "lcs_l":
        return {"topk": level}, None
    return {"alpha": level, "topk": level}, level


def _quantized_level(config, level):
    low, high = _quantized_range(config)
    _require_level(float(level).is_integer() and low <= level <= high, config, level,
                   f"integer bit widths in {low}..{high}")
    bits = int(level)
    if config.method != "lcs_l":
        return {"num_bits": bits}, None
    # The alpha the run evaluated this bit width at (e.g. 0.499 for 5 bits), else the grid rule.
    on_grid = [a for a in config.alpha_grid or [] if alpha_to_bits(a, low, high) == bits]
    alpha = float(on_grid[0]) if on_grid else bits_to_alpha(bits, low, high)
    return {"alpha": alpha, "num_bits": bits}, alpha


def _structured_range(config):
    return (0.0, 1.0) if config.method in ("lec", "ns") else tuple(config.width_factor_limits)


def _unstructured_range(config):
    return 0.0, 1.0


def _quantized_range(config):
    return (config.min_bits, config.max_bits) if config.method in ("lcs_l", "lcs_p") else (3, 8)


# (lowest, highest) level a checkpoint exports; fractions (0, 1] exclude their lower end.
LEVEL_RANGES = {"structured_sparsity": _structured_range, "unstructured_sparsity": _unstructured_range,
                "quantized": _quantized_range}
LEVEL_RESOLVERS = {"structured_sparsity": _structured_level, "unstructured_sparsity": _unstructured_level,
                   "quantized": _quantized_level}


def resolve_level(config, level):
    """(set_level arguments, alpha) of the training-time model at an export level; ConfigError
    naming --level when the level is outside what the checkpoint's method can export."""
    return LEVEL_RESOLVERS[config.setting](config, float(level))


def level_range(config):
    """(lowest, highest) level of a checkpoint's method, in its level unit."""
    return LEVEL_RANGES[config.setting](config)


def uncompressed_level(config):
    """The least compressed level of a checkpoint's setting (the benchmark's baseline)."""
    return level_range(config)[1]


# -- export -----------------------------------------------------------------------------
@torch.no_grad()
def effective_state(model):
    """The state of a model at its current level: line layers resolved at alpha (no endpoint-1
    entries), TopK convs masked, everything else as stored."""
    state = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        local = dict(module.named_parameters(recurse=False))
        local.update(module.named_buffers(recurse=False))
        if hasattr(module, "effective_weight"):
            local["weight"] = module.effective_weight()
        elif isinstance(module, LineMixin) and "weight" in local:
            local["weight"], local["bias"] = module.line_weight(), module.line_bias()
        for key, value in local.items():
            if key not in ("weight1", "bias1") and value is not None:
                state[prefix + key] = value.detach()
    return state


def implied_keys(model):
    """State entries the constructor sets and an export leaves out: the all-ones indexes of
    inactive channel selections and the activation buffers of quantized convs (their ranges
    travel separately)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, ChannelSelection) and not module.active:
            keys.add(f"{name}.indexes")
        elif isinstance(module, QuantConv2d):
            keys.update(f"{name}.{buffer}" for buffer in ACT_BUFFERS)
    return keys


def _leading(tensor, shape):
    """The leading block of `tensor` with `shape` (the channels a slimmable layer keeps)."""
    return tensor[tuple(slice(0, size) for size in shape)]


def _export_structured(model, config, num_classes, level, round_to):
    if config.method == "lec":
        slim, info = lec_slim(model, config.model, num_classes, level)
        return slim, effective_state(slim), {"widths": info["widths"], "selected": info["selected"]}
    widths = channel_spec(model, input_size_of(config))
    if round_to:
        full = {name: module.out_channels for name, module in model.named_modules() if name in widths}
        widths = round_up_widths(widths, full, round_to)
    dense = build_model(config.model, dense_factory(config.norm), num_classes, widths=widths)
    source = effective_state(model)
    state = {key: _leading(source[key], target.shape) for key, target in dense.state_dict().items()}
    return dense, state, {"widths": widths, "selected": None}


def _export_unstructured(model, config, num_classes):
    dense = build_model(config.model, dense_factory(config.norm, config.num_groups or 32), num_classes)
    state = effective_state(model)
    names, shapes, masks, values = [], [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, TopKConv2d):
            continue
        mask = module.mask().bool()
        kept = int(mask.sum())
        # A bitmask plus the kept values only pays off below about 97 % density.
        if 32 * kept + mask.numel() >= 32 * mask.numel():
            continue
        weight = state.pop(f"{name}.weight")
        names.append(f"{name}.weight")
        shapes.append(list(mask.shape))
        masks.append(mask.flatten().cpu())
        values.append(weight[mask].float().cpu())
    sparse = {"names": names, "shapes": shapes, "mask": pack_bits(concat(masks, torch.bool), 1),
              "values": concat(values)}
    return dense, state, {"sparse": sparse}


def _export_quantized(model, config, num_classes, num_bits, float_weights):
    frozen = build_model(config.model, frozen_quant_factory(config.norm, num_bits, config.num_groups or 32),
                         num_classes)
    state = effective_state(model)
    q_min, _ = grid_limits(num_bits)
    names, shapes, codes, scales, zero_points = [], [], [], [], []
    act_names, act_min, act_max = [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, QuantConv2d):
            continue
        folded, _ = module.folded_weight()
        layer_codes, scale, zero_point = quantize_tensor_to_int(folded, num_bits)
        weight = dequantize(layer_codes, scale, zero_point)
        assert torch.equal(weight, module.quantized_weight()[0]), f"{name}: codes do not reproduce the fake-quant"
        if float_weights:
            state[f"{name}.weight"] = weight
        else:
            del state[f"{name}.weight"]
            names.append(f"{name}.weight")
            shapes.append(list(folded.shape))
            codes.append((layer_codes - q_min).flatten().cpu())
            scales.append(scale.cpu())
            zero_points.append(zero_point.cpu())
        if bool(module.act_range_ready):
            act_names.append(name)
            act_min.append(module.act_min.float().cpu())
            act_max.append(module.act_max.float().cpu())
    quantized = {"names": names, "shapes": shapes, "codes": pack_bits(concat(codes), num_bits),
                 "scales": concat(scales), "zero_points": concat(zero_points, torch.int32)}
    act_ranges = {"names": act_names, "min": concat(act_min), "max": concat(act_max)}
    return frozen, state, {"quantized": quantized, "act_ranges": act_ranges, "num_bits": num_bits}


def calibration_batches(config, data_dir):
    """The run's calibration images (same subset, transform and batches as its evaluations)
    from `data_dir`; ConfigError naming --data_dir when it is not given."""
    if data_dir is None:
        raise ConfigError(f"--data_dir: this {config.setting}/{config.method} run evaluated with BN statistics "
                          f"re-estimated on {config.bn_calibration_images} training images; the export re-estimates "
                          f"them the same way and needs the run's training images (its --data_dir, or "
                          f"--imagenet_dir for ImageNet)")
    key = "imagenet_dir" if config.dataset == "imagenet" else "data_dir"
    if not os.path.isdir(data_dir):
        raise ConfigError(f"--data_dir {data_dir}: no such directory")
    config = dataclasses.replace(config, **{key: data_dir}, device="cpu")
    return build_data(config, torch.device("cpu")).calibration.batches()


def calibrated_state(network, state, batches):
    """`state` with the BN running statistics re-estimated on `batches` for `network`."""
    network.load_state_dict(state)
    calibrate_bn(network, batches)
    fresh = network.state_dict()
    return {key: fresh[key].detach() for key in state}


def export_model(payload, level, path="checkpoint", round_to=None, float_weights=False, data_dir=None):
    """The export (a dict of plain data) of a checkpoint payload at `level`.

    `float_weights` (quantized only) stores the quantized weights as float32 values instead of
    packed codes: the same model, stored uncompressed (the benchmark's baseline). Runs that
    re-estimated BN statistics at evaluation need their training images in `data_dir`."""
    schema.check_model(payload, path)  # tensors only, all finite
    model, config = training_model(payload, path)
    return export_at(model, config, num_classes_of(payload["model"]), level, round_to, float_weights, data_dir)


def export_at(model, config, num_classes, level, round_to=None, float_weights=False, data_dir=None):
    """export_model for a training-time model already built (its level is changed)."""
    setting = config.setting
    if round_to is not None and (setting != "structured_sparsity" or config.method == "lec"):
        raise ConfigError(f"--round_to {round_to}: only for width-factor exports (structured lcs_l, lcs_p, us, "
                          f"ns); this is {setting}/{config.method}")
    if round_to is not None and not 1 <= round_to <= MAX_ROUND_TO:
        raise ConfigError(f"--round_to {round_to}: must be a number of channels in 1..{MAX_ROUND_TO}")
    levels, alpha = resolve_level(config, level)
    set_level(model, **levels)
    if setting == "structured_sparsity":
        target, state, extra = _export_structured(model, config, num_classes, float(level), round_to)
        if config.bn_calibration_images:
            state = calibrated_state(target, state, calibration_batches(config, data_dir))
    elif setting == "unstructured_sparsity":
        target, state, extra = _export_unstructured(model, config, num_classes)
    else:
        target, state, extra = _export_quantized(model, config, num_classes, levels["num_bits"], float_weights)
    for key in implied_keys(target):
        state.pop(key, None)
    level_name = "topk" if config.method == "lec" else LEVEL_NAMES[setting]
    header = {"format": FORMAT, "version": VERSION, "setting": setting, "method": config.method,
              "model_name": config.model, "level_name": level_name,
              "level": int(level) if setting == "quantized" else float(level), "alpha": alpha,
              "num_classes": num_classes, "input_size": input_size_of(config), "norm": config.norm,
              "num_groups": config.num_groups or 32, "widths": None, "selected": None,
              "round_to": round_to, "num_bits": None}
    header.update(extra)
    header["dense"] = pack_tensors(state)
    return header


def save_export(path, content, inputs=(), flag="--out"):
    """Write an export to `path`; ConfigError where that would replace one of `inputs` (the
    checkpoint) or a run directory's own files."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"{flag} {path}: directory {directory} does not exist")
    refuse_overwrite(flag, path, inputs)
    ckpt.save(path, content)


# -- load -------------------------------------------------------------------------------
def read_export(path, file_format=FORMAT, version=VERSION, kind="exported model", command="python -m utils.export"):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such {kind}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for damaged files
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path}: not a readable {kind} ({first[:160]})") from None
    if not isinstance(content, dict) or content.get("format") != file_format:
        raise CheckpointError(f"{path}: not this project's {kind} (write it with {command})")
    if content.get("version") != version:
        raise CheckpointError(f"{path}: {kind} version {content.get('version')}, this code reads {version}")
    return content


def _factory(content):
    if content["setting"] == "quantized":
        return frozen_quant_factory(content["norm"], content["num_bits"], content["num_groups"])
    return dense_factory(content["norm"], content["num_groups"])


def _stored_state(content):
    state = unpack_tensors(content["dense"])
    sparse = content.get("sparse")
    if sparse:
        counts = [math.prod(shape) for shape in sparse["shapes"]]
        mask = unpack_bits(sparse["mask"], 1, sum(counts)).bool()
        flat = torch.zeros(sum(counts), dtype=sparse["values"].dtype)
        flat[mask] = sparse["values"]
        state.update(unpack_tensors({"names": sparse["names"], "shapes": sparse["shapes"], "values": flat}))
    quantized = content.get("quantized")
    if quantized and quantized["names"]:
        counts = [math.prod(shape) for shape in quantized["shapes"]]
        q_min, _ = grid_limits(content["num_bits"])
        codes = unpack_bits(quantized["codes"], content["num_bits"], sum(counts)) + q_min
        for name, shape, layer_codes, scale, zero_point in zip(
                quantized["names"], quantized["shapes"], codes.split(counts), quantized["scales"],
                quantized["zero_points"]):
            state[name] = dequantize(layer_codes, scale, zero_point).view(shape)
    ranges = content.get("act_ranges")
    if ranges:
        for name, low, high in zip(ranges["names"], ranges["min"], ranges["max"]):
            state.update({f"{name}.act_min": low, f"{name}.act_max": high,
                          f"{name}.act_range_ready": torch.tensor(True)})
    return state


def load_exported(path, map_location="cpu"):
    """The exported network as a standard nn.Module in eval mode."""
    return build_exported(read_export(path), path, map_location)


def build_exported(content, path="export", map_location="cpu"):
    """The network of an export's content (a dict as export_model returns it)."""
    model = build_model(content["model_name"], _factory(content), content["num_classes"],
                        widths=content["widths"], selected=content["selected"])
    state = _stored_state(content)
    defaults = model.state_dict()
    missing = [key for key in defaults if key not in state and key not in implied_keys(model)]
    unexpected = [key for key in state if key not in defaults]
    if missing or unexpected:
        raise CheckpointError(f"{path}: damaged export (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key in defaults:
        state.setdefault(key, defaults[key])
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: damaged export ({str(error).splitlines()[0][:160]})") from None
    return model.to(map_location).eval()


# -- command line -----------------------------------------------------------------------
def describe(content, size_bytes):
    lines = [f"{content['setting']}/{content['method']} {content['model_name']}: {content['level_name']} "
             f"{content['level']:g}" + (f" (alpha {content['alpha']:g})" if content["alpha"] is not None else "")
             + f", {size_bytes / 1024:.1f} KiB"]
    if content["widths"]:
        lines.append("channels: " + ", ".join(f"{name} {width}" for name, width in content["widths"].items()))
    if content["selected"]:
        lines.append("selected: " + ", ".join(f"{name} {count}" for name, count in content["selected"].items()))
    sparse = content.get("sparse")
    if sparse:
        lines.append(f"{len(sparse['names'])} convs stored as bitmask + kept values "
                     f"({sparse['values'].numel():,} weights kept)")
    quantized = content.get("quantized")
    if quantized:
        ranges = len(content["act_ranges"]["names"])
        lines.append(f"{len(quantized['names'])} convs stored as {content['num_bits']}-bit codes; activation "
                     f"ranges recorded for {ranges} of them" + ("" if ranges else " (activations are not "
                                                                 "quantized, as in the run's evaluation)"))
    if content["round_to"]:
        lines.append(f"widths rounded up to multiples of {content['round_to']} (at most the full width): this "
                     f"network has more channels than the model at width {content['level']:g}, so its outputs "
                     f"are not comparable with that level's evaluation")
    return "\n".join(lines)


def build_parser():
    parser = UsageParser(
        prog="python -m utils.export",
        description="Write a standalone compressed model at one level of a trained checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="model_final.pt or checkpoint_last.pt of a run")
    parser.add_argument("--level", type=float,
                        help="width factor (structured), fraction of channels kept (lec), TopK fraction "
                             "(unstructured) or bit width (quantized)")
    parser.add_argument("--subspace", action="store_true",
                        help="write the whole trained subspace instead of one level (load it with "
                             "deploy.load_subspace and pick the level at run time)")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument("--round_to", type=int, help="round structured widths up to a multiple of this")
    parser.add_argument("--format", default="pt", choices=("pt", "onnx"),
                        help="pt (this project's file) or onnx (checked with ONNX Runtime; needs "
                             "requirements-deploy.txt)")
    parser.add_argument("--data_dir", help="the run's data (CIFAR-10 folder or ImageNet root): its training images "
                                           "re-estimate BN statistics when the run's evaluations did (lec by "
                                           "default); onnx: its CIFAR-10 test images check the export "
                                           "(default: random images)")
    parser.add_argument("--check_images", type=int, default=256, help="onnx: images to check the export on")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subspace == (args.level is not None):
        parser.error("give either --level LEVEL (one level) or --subspace (every level)")
    if args.subspace and (args.format != "pt" or args.round_to):
        parser.error("--subspace writes a pt file of the trained widths; --format onnx and --round_to take --level")
    try:
        if not 1 <= args.check_images <= MAX_CHECK_IMAGES:
            raise ConfigError(f"--check_images {args.check_images}: must be in 1..{MAX_CHECK_IMAGES}")
        refuse_overwrite("--out", args.out, [args.checkpoint])  # before the work of exporting
        payload = ckpt.load(args.checkpoint)
        if args.subspace:
            from deploy.subspace import describe as describe_subspace, make_subspace, save_subspace
            content = make_subspace(payload, path=args.checkpoint)
            save_subspace(args.out, content)
            lines = [describe_subspace(content, os.path.getsize(args.out))]
        else:
            content = export_model(payload, args.level, path=args.checkpoint, round_to=args.round_to,
                                   data_dir=args.data_dir)
            lines = WRITERS[args.format](args, content)
    except UserError as error:
        print(f"utils.export: error: {one_line(error)}", file=sys.stderr)
        sys.exit(error.exit_code)
    print("\n".join(lines))
    print(f"wrote {args.out}")


def _write_pt(args, content):
    save_export(args.out, content, inputs=[args.checkpoint])
    return [describe(content, os.path.getsize(args.out))]


def _write_onnx(args, content):
    from deploy.onnx_export import write_checked
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise ConfigError(f"--out {args.out}: directory {os.path.dirname(os.path.abspath(args.out))} does not exist")
    lines = write_checked(content, args.out, args.data_dir, args.check_images)
    # The .pt storage lines (bitmasks, packed codes) do not describe the ONNX file.
    summary = [line for line in describe(content, os.path.getsize(args.out)).splitlines()
               if " stored as " not in line]
    return [summary[0].replace("KiB", "KiB of ONNX", 1)] + summary[1:] + lines


WRITERS = {"pt": _write_pt, "onnx": _write_onnx}


if __name__ == "__main__":
    main()
