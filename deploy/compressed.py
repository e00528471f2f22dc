"""A trained model at one compression level as a standalone compressed model: write and load.

The command line is deploy/export.py (`python -m deploy.export`); this module is the library
it, the subspace artefact (deploy/subspace.py) and ONNX export (deploy/onnx_export.py) build on.

    python -m deploy.export --checkpoint RUN/model_final.pt --level 0.5 --out model.pt [--round_to 8]
        [--data_dir DIR]

The level is in the unit of the checkpoint's method (Method.level_unit): a width factor
(structured), the fraction of norm channels kept (structured lec), a TopK fraction
(unstructured) or a bit width (quantized); the method checks its range and maps it to the
layers' Level (LCS+L models take their alpha from it). The method's `export_format` picks how
the compressed model is stored: one module per format in deploy/formats/, registered in
deploy/formats/__init__.py (FORMATS).

What the file holds (a torch.save'd dict of plain data, readable with weights_only=True): a
header (setting, method, model, level and its unit, alpha, channel spec, the input normalisation
and class names of the run's data, ...), the packed dense
tensors, and what the format stores on its own (its module's docstring says what):

* structured (deploy/formats/channels.py), LEC (slimmed_channels.py): a physically narrower
  dense network, i.e. its channel spec (`widths`, `selected`) and its weights; line norms
  resolved at alpha, BN running statistics sliced, or, when the method's evaluations
  re-estimated them (Method.bn_at_evaluation, LEC's default), re-estimated the same way on the
  same training images (read from `--data_dir`), so the exported model gives the evaluated
  accuracy.
* unstructured (topk.py): TopK-masked weights, sparse convs as bitmask plus kept values.
* quantized (int_codes.py): bit-packed integer codes with their scales and zero points, and the
  recorded activation ranges.

Tensors of one kind are concatenated into one flat buffer (deploy/packing.py): torch.save
spends about 270 bytes on every stored tensor, some 15 % of a 4-bit cPreResNet20.

`load_exported(path)` rebuilds the network with the standard layers (`build_model` with the
channel spec; quantized convs that use their stored weights as they are) and returns it in
eval mode; its outputs equal those of the training-time model evaluated at that level.
"""

import os
from typing import Optional

import torch
import torch.nn as nn

from data import Preprocessing, build_data, class_names, preprocessing
from deploy.formats import FORMATS
from deploy.formats.base import ExportFormat
from deploy.state import implied_keys
from deploy.packing import pack_tensors, unpack_tensors
from methods import METHODS, config_from_dict
from methods.base import Method
from methods.config import Config
from models import build_model, model_args
from models.bn_calibration import calibrate_bn
from models.layers import Level, set_level
from utils import checkpoint as ckpt
from utils import checkpoint_schema as schema
from utils.atomic import refuse_overwrite
from utils.errors import CheckpointError, ConfigError, OutputError, shown

FORMAT = "lcs-export"
VERSION = 1
MAX_ROUND_TO = 1024  # no layer of the three networks is wider


# -- the training-time model ------------------------------------------------------------
def num_classes_of(state: dict) -> int:
    """Output channels of the last conv or linear weight of a state dict: the classifier of the
    three networks, and of the converted networks that register their classifier last (as
    torchvision's and timm's do)."""
    layers = [key for key, value in state.items() if key.endswith("weight") and value.dim() in (2, 4)]
    return state[layers[-1]].shape[0]


def checkpoint_config(payload: dict, path: str) -> Config:
    """The Config stored in a checkpoint payload (configs of earlier versions converted)."""
    try:
        return config_from_dict(payload["config"])
    except (TypeError, KeyError, ConfigError) as error:
        raise CheckpointError(f"{path}: its config is not one this project reads ({error})") from None


def checkpoint_method(payload: dict, path: str) -> Method:
    """The method object of a checkpoint (no warmup: exports are taken after it)."""
    config = checkpoint_config(payload, path)
    return METHODS[config.setting][config.method](config, None)


def training_model(payload: dict, path: str) -> tuple[nn.Module, Method]:
    """The model as trained (method layers, both endpoints), in eval mode, and its method."""
    method = checkpoint_method(payload, path)
    config = method.config
    num_classes = num_classes_of(payload["model"])
    model = build_model(config.model, method.layer_factory(), num_classes, **model_args(config), initialize=False)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path}: its weights do not fit {config.model} built for {config.setting}/"
                              f"{config.method} ({str(error).splitlines()[0][:120]})") from None
    method.bind(model)
    model.eval()
    return model, method


def input_size_of(config):
    return config.input_size or 224


# -- levels -----------------------------------------------------------------------------
def resolve_level(method: Method, level: float) -> tuple[Level, Optional[float]]:
    """(Level of the training-time model, alpha) at an export level; ConfigError naming
    --level when the level is outside what the checkpoint's method can export."""
    point = method.export_point(float(level))
    return method.export_level(point), point.alpha


def level_range(method: Method) -> tuple[float, float]:
    """(lowest, highest) level a checkpoint's method exports, in its level unit."""
    levels = method.level_range(method.config)
    return levels.low, levels.high


def uncompressed_level(method: Method) -> float:
    """The least compressed level a checkpoint's method exports (the benchmark's baseline)."""
    return method.level_unit.type(method.level_range(method.config).high)


# -- export -----------------------------------------------------------------------------
def calibration_batches(config, images, data_dir):
    """The run's `images` calibration images (same subset, transform and batches as its
    evaluations) from `data_dir`; ConfigError naming --data_dir when it is not given."""
    if data_dir is None:
        raise ConfigError(f"--data_dir: this {config.setting}/{config.method} run evaluated with BN statistics "
                          f"re-estimated on {images} training images; the export re-estimates "
                          f"them the same way and needs the run's training images (its --data_dir, or "
                          f"--imagenet_dir for ImageNet)")
    key = "imagenet_dir" if config.dataset == "imagenet" else "data_dir"
    if not os.path.isdir(data_dir):
        raise ConfigError(f"--data_dir {data_dir}: no such directory")
    config = config.replaced(**{key: data_dir}, device="cpu")
    return build_data(config, torch.device("cpu"), calibration_images=images).calibration.batches()


def calibrated_state(network, state, batches):
    """`state` with the BN running statistics re-estimated on `batches` for `network`."""
    network.load_state_dict(state)
    calibrate_bn(network, batches)
    fresh = network.state_dict()
    return {key: fresh[key].detach() for key in state}


def export_model(payload: dict, level: float, path: str = "checkpoint", round_to: Optional[int] = None,
                 float_weights: bool = False, data_dir: Optional[str] = None) -> dict:
    """The export (a dict of plain data) of a checkpoint payload at `level`.

    `float_weights` (quantized only) stores the quantized weights as float32 values instead of
    packed codes: the same model, stored uncompressed (the benchmark's baseline). Runs that
    re-estimated BN statistics at evaluation need their training images in `data_dir`."""
    schema.check_model(payload, path)  # tensors only, all finite
    model, method = training_model(payload, path)
    return export_at(model, method, num_classes_of(payload["model"]), level, round_to, float_weights, data_dir)


def export_at(model: nn.Module, method: Method, num_classes: int, level: float, round_to: Optional[int] = None,
              float_weights: bool = False, data_dir: Optional[str] = None,
              bn_statistics: Optional[dict] = None) -> dict:
    """export_model for a training-time model already built (its level is changed).
    `bn_statistics`: the BN running statistics of the level ({state key: tensor}), when known,
    instead of making them as the method's evaluations did."""
    config = method.config
    export_format = FORMATS[method.export_format]
    if round_to is not None and not export_format.takes_round_to:
        users = ", ".join(f"{setting} {name}" for setting, methods in METHODS.items() for name, cls in methods.items()
                          if FORMATS[cls.export_format].takes_round_to)
        raise ConfigError(f"--round_to {round_to}: only for width-factor exports ({users}); this is "
                          f"{config.setting}/{config.method}")
    if round_to is not None and not 1 <= round_to <= MAX_ROUND_TO:
        raise ConfigError(f"--round_to {round_to}: must be a number of channels in 1..{MAX_ROUND_TO}")
    levels, alpha = resolve_level(method, level)
    level = method.level_unit.type(level)
    set_level(model, levels)
    extra_args = {"float_weights": float_weights} if float_weights else {}
    target, state, extra = export_format.export(model, method, num_classes, level, round_to, **extra_args)
    if bn_statistics is not None:  # given (a subspace stores those of its levels)
        state.update(bn_statistics)
    else:  # as the evaluations made them: re-estimated on training images when they were
        images = method.bn_at_evaluation(config).calibration_images
        if images:
            state = calibrated_state(target, state, calibration_batches(config, images, data_dir))
    for key in implied_keys(target):
        state.pop(key, None)
    header = {"format": FORMAT, "version": VERSION, "setting": config.setting, "method": config.method,
              "model_name": config.model, "model_kwargs": config.model_kwargs, "level_name": method.level_unit.name,
              "level": level, "alpha": alpha,
              "num_classes": num_classes, "input_size": input_size_of(config), "norm": config.norm,
              "num_groups": method.norm_groups(config), "widths": None, "selected": None,
              "round_to": round_to, "num_bits": None, **input_metadata(config)}
    header.update(extra)
    header["dense"] = pack_tensors(state)
    return header


def input_metadata(config: Config) -> dict:
    """What an application needs besides the network, as every export stores it: the input
    normalisation of the run's dataset and its class names (None for ImageNet: see
    data.class_names)."""
    names = class_names(config)
    return {"preprocessing": preprocessing(config).to_dict(), "class_names": list(names) if names else None}


def read_input_metadata(content: dict, path: str, kind: str = "export") -> tuple[Optional[Preprocessing],
                                                                                Optional[tuple]]:
    """(Preprocessing, class names) stored in an export or subspace; None for what a file of an
    earlier version does not hold; CheckpointError naming `path` for values of the wrong type."""
    stored, names = content.get("preprocessing"), content.get("class_names")
    fields = set(Preprocessing.__dataclass_fields__)
    if stored is not None and not (isinstance(stored, dict) and set(stored) == fields
                                   and all(isinstance(stored[key], list) for key in ("mean", "std"))
                                   and isinstance(stored["input_size"], int)
                                   and (stored["resize"] is None or isinstance(stored["resize"], int))):
        raise CheckpointError(f"{path}: damaged {kind}: preprocessing is {shown(stored)}, expected a mapping of "
                              f"{', '.join(sorted(fields))}")
    if names is not None and not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        raise CheckpointError(f"{path}: damaged {kind}: class_names is {shown(names)}, expected None or a list "
                              f"of names")
    normalisation = None if stored is None else Preprocessing(tuple(stored["mean"]), tuple(stored["std"]),
                                                              stored["input_size"], stored["resize"])
    return normalisation, None if names is None else tuple(names)


def check_output(path, inputs=(), flag="--out"):
    """ConfigError unless `path` names a file that may be written: in an existing directory,
    not a directory itself, not one of `inputs` (the checkpoint) nor a run directory's own files."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"{flag} {path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a directory; give the name of the file to write")
    refuse_overwrite(flag, path, inputs)


def save_export(path: str, content: dict, inputs=(), flag: str = "--out") -> None:
    """Write an export (or a subspace) to `path` atomically, after check_output; a failed write
    is an OutputError of one line. Files get the mode of every other file this project writes
    (0644 under the usual umask)."""
    check_output(path, inputs, flag)
    ckpt.save(path, content, failure=OutputError)


# -- load -------------------------------------------------------------------------------
def read_export(path, file_format=FORMAT, versions=(VERSION,), kind="exported model",
                command="python -m deploy.export"):
    """The content of a file of `file_format` in one of `versions`; CheckpointError of one line
    for anything else."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such {kind}")
    try:
        content = ckpt.load_plain_data(path)
    except Exception as error:  # torch raises many kinds for damaged files
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path}: not a readable {kind} ({first[:160]})") from None
    if not isinstance(content, dict) or content.get("format") != file_format:
        raise CheckpointError(f"{path}: not this project's {kind} (write it with {command})")
    if content.get("version") not in versions:
        raise CheckpointError(f"{path}: {kind} version {shown(content.get('version'))}, this code reads "
                              f"{' and '.join(map(str, versions))}")
    return content


def format_of(content: dict, path: str = "export") -> ExportFormat:
    """The ExportFormat of an export's content: its method's (Method.export_format)."""
    try:
        return FORMATS[METHODS[content["setting"]][content["method"]].export_format]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: an export of {content.get('setting')}/{content.get('method')}, which this "
                              f"project does not have") from None


def load_exported(path: str, map_location="cpu") -> nn.Module:
    """The exported network as a standard nn.Module in eval mode, with what an application needs
    besides it: `model.preprocessing` (a data.Preprocessing: mean, std, input_size, resize) and
    `model.class_names` (a tuple, label i the i-th; None where the export holds none)."""
    content = read_export(path)
    model = build_exported(content, path, map_location)
    model.preprocessing, model.class_names = read_input_metadata(content, path)
    return model


def build_exported(content: dict, path: str = "export", map_location="cpu") -> nn.Module:
    """The network of an export's content (a dict as export_model returns it)."""
    export_format = format_of(content, path)
    model = build_model(content["model_name"], export_format.factory(content), content["num_classes"],
                        widths=content["widths"], selected=content["selected"],
                        model_kwargs=content.get("model_kwargs"), input_size=content["input_size"], initialize=False)
    state = unpack_tensors(content["dense"])
    state.update(export_format.decode(content))
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
