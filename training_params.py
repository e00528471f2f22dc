"""Command-line flags and YAML configs -> one validated, typed run configuration.

Merge order (SPEC 1.2, later wins):
  1. configs/<setting>/<method>.yaml
  2. the per-model / per-dataset table below (epochs, test_freq, batch size, momentum,
     weight decay; it always overrides the YAML, as in the original)
  3. the file given with --config (e.g. a run's saved config.yaml)
  4. command-line flags
then code defaults for what is still unset, then validation. Every user mistake raises
ConfigError with one line naming the flag or file/key, the bad value and what is allowed.
"""

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from data.cifar import DEFAULT_DATA_DIR, data_dir_problem
from methods import METHODS
from methods.levels import bits_to_alpha, width_to_alpha
from models import MODELS
from utils.errors import ConfigError, UsageParser, UserError, number_list, one_line, shown
from utils.yaml_io import read_yaml

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG_ROOT = os.path.join(REPO_ROOT, "configs")

SCRIPTS = {
    "structured_sparsity": "train_structured.py",
    "unstructured_sparsity": "train_unstructured.py",
    "quantized": "train_quantized.py",
}
DATASETS = ("cifar10", "imagenet")
DATASET_MODELS = {"cifar10": ("cpreresnet20", "vgg19"), "imagenet": ("resnet18", "vgg19")}
NORMS = ("IN", "BN", "GN")
DEVICES = ("auto", "cpu", "cuda")
DATA_PIPELINES = ("auto", "tensor", "dataloader")


# -- per-model / per-dataset overrides (the original's training_params.model_data_params) --
DEFAULT_PARAMS = {"epochs": 200, "test_freq": 20, "batch_size": 128, "momentum": 0.9, "weight_decay": 5e-4}
DEFAULT_IMAGENET_PARAMS = {"epochs": 90, "test_freq": 1, "batch_size": 128, "momentum": 0.9,
                           "weight_decay": 5e-5}
VGG_IMAGENET_PARAMS = {"epochs": 90, "test_freq": 1, "batch_size": 256, "momentum": 0.9, "weight_decay": 5e-5}


def model_data_params(model, dataset):
    if dataset == "imagenet":
        return VGG_IMAGENET_PARAMS if model == "vgg19" else DEFAULT_IMAGENET_PARAMS
    return DEFAULT_PARAMS


# -- the typed schema ------------------------------------------------------------------
def _key(kind, default=None, doc=""):
    return field(default=default, metadata={"kind": kind, "doc": doc})


@dataclass
class Config:
    """Every key a config may hold. `kind` is the YAML type: int, float, bool, str,
    floats/ints (lists), or one of those with '?' (may be null)."""

    setting: str = _key("str")
    method: str = _key("str")
    model: str = _key("str", "cpreresnet20", "cpreresnet20, resnet18 or vgg19")
    dataset: str = _key("str", "cifar10", "cifar10 or imagenet")
    norm: str = _key("str", None, "IN, BN or GN")
    num_groups: Optional[int] = _key("int?", None, "GroupNorm groups (32; min(C, groups) per layer)")
    epochs: int = _key("int", 200)
    batch_size: int = _key("int", 128, "global batch (split over processes under torchrun)")
    test_freq: int = _key("int", 20, "evaluate and checkpoint every N epochs")
    learning_rate: float = _key("float", 0.01)
    momentum: float = _key("float", 0.9)
    weight_decay: float = _key("float", 5e-4)
    warmup_budget: Optional[float] = _key("float?", None, "percent of all iterations (unstructured, quantized)")
    save_root: str = _key("str", "saved_models", "<save_root>/<method>/<model>/<dataset>/<norm> is the default save_dir")
    save_dir: Optional[str] = _key("str?")
    # levels and their sampling
    alpha_sampling: Optional[list] = _key("floats?", None, "[low, high, endpoint probability]")
    alpha_grid: Optional[list] = _key("floats?", None, "LCS+L evaluation grid in alpha")
    eval_param_grid: Optional[list] = _key("floats?", None, "evaluation grid in level units")
    topk: Optional[float] = _key("float?", None, "target TopK fraction (target_topk)")
    width_factor_limits: Optional[list] = _key("floats?", None, "[low, high] width factors")
    width_factor_samples: Optional[int] = _key("int?", None, "widths per batch (sandwich)")
    width_factor_sampling_method: Optional[str] = _key("str?", None, "sandwich or point")
    apply_beta_to_norm: Optional[bool] = _key("bool?", None, "cos^2 penalty on norm gammas")
    width_factors_list: Optional[list] = _key("floats?", None, "NS widths")
    bn_update_factor: Optional[float] = _key("float?", None, "LEC L1 strength on gammas")
    num_bits: Optional[int] = _key("int?", None, "target bit width")
    min_bits: Optional[int] = _key("int?")
    max_bits: Optional[int] = _key("int?")
    discrete_alpha_map: Optional[bool] = _key("bool?", None, "alpha drawn from {1/n, ..., 1}")
    beta: Optional[float] = _key("float?", None, "weight of the cos^2 line penalty")
    # BN statistics at evaluation (structured)
    bn_calibration_images: Optional[int] = _key("int", None, "training images that re-estimate BN statistics "
                                                              "before each evaluation (0: off)")
    lec_test_batch_statistics: Optional[bool] = _key("bool", None, "LEC: normalise each test batch with its own "
                                                                    "statistics (the original's evaluation)")
    # where and how to run
    data_dir: str = _key("str", "./data")
    imagenet_dir: Optional[str] = _key("str?")
    image_size: Optional[int] = _key("int?", None, "ImageNet crop size (224)")
    seed: int = _key("int", 0)
    device: str = _key("str", "auto")
    num_workers: Optional[int] = _key("int?")
    threads: Optional[int] = _key("int?", None, "CPU threads per process (null: chosen at start, see --threads)")
    eval_at_start: bool = _key("bool", True, "evaluate the grid before the first training step (epoch 0)")
    train_subset: Optional[int] = _key("int?")
    test_subset: Optional[int] = _key("int?")
    data_pipeline: str = _key("str", "auto", "auto, tensor or dataloader")
    amp: bool = _key("bool", False)
    channels_last: bool = _key("bool", False)
    compile: bool = _key("bool", False)

    def to_dict(self):
        """The keys that matter for this setting and method (what config.yaml holds)."""
        keys = allowed_keys(self.setting, self.method) | {"setting", "method"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in keys}

    @property
    def input_size(self):
        return 32 if self.dataset == "cifar10" else self.image_size


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
COMMON_KEYS = {"model", "dataset", "norm", "epochs", "batch_size", "test_freq", "learning_rate", "momentum",
               "weight_decay", "save_root", "save_dir", "data_dir", "imagenet_dir", "image_size", "seed",
               "device", "num_workers", "train_subset", "test_subset", "data_pipeline", "amp",
               "channels_last", "compile", "threads", "eval_at_start"}
WARMUP_SETTINGS = ("unstructured_sparsity", "quantized")
# Settings whose evaluation may re-estimate BN statistics (--bn_calibration_images).
CALIBRATION_SETTINGS = ("structured_sparsity",)
# Keys that only say where or how to run: they may change when resuming or evaluating.
# eval_at_start changes what is recorded, not what is trained (evaluation leaves the model and
# the random streams as they were).
RUNTIME_KEYS = {"data_dir", "imagenet_dir", "device", "num_workers", "save_dir", "data_pipeline", "threads",
                "eval_at_start"}


def allowed_keys(setting, method):
    keys = set(COMMON_KEYS) | set(METHODS[setting][method].config_keys)
    if setting in WARMUP_SETTINGS:
        keys |= {"warmup_budget", "num_groups"}
    if setting in CALIBRATION_SETTINGS:
        keys.add("bn_calibration_images")
    return keys


def _type_ok(kind, value):
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None:
        return optional
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind in ("floats", "ints"):
        return isinstance(value, list) and all(_type_ok(kind[:-1], v) for v in value)
    raise AssertionError(kind)


KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
              "floats": "a list of numbers", "ints": "a list of integers"}


def _check_entry(source, key, value, setting, method):
    if key not in FIELDS:
        raise ConfigError(f"{source}: unknown key {shown(key)} (allowed: {', '.join(sorted(allowed_keys(setting, method)))})")
    if key not in allowed_keys(setting, method):
        raise ConfigError(f"{source}: key {shown(key)} is not used by {setting}/{method}")
    kind = FIELDS[key].metadata["kind"]
    if not _type_ok(kind, value):
        hint = ""
        if isinstance(value, str) and kind.rstrip("?") in ("float", "int") and _is_number_text(value):
            hint = " (YAML reads numbers like 1e-4 as text: write 1.0e-4)"
        raise ConfigError(f"{source}: key '{key}' must be {KIND_WORDS[kind.rstrip('?')]}, got {shown(value)}{hint}")


def _is_number_text(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def method_yaml_path(setting, method):
    return os.path.join(CONFIG_ROOT, setting, f"{method}.yaml")


# -- flags -----------------------------------------------------------------------------
def _add_common_flags(parser, setting):
    add = parser.add_argument
    add("--model", choices=sorted(MODELS), help="network (default: cpreresnet20)")
    add("--dataset", choices=DATASETS, help="cifar10 (default) or imagenet")
    add("--imagenet_dir", help="ImageNet root with training/ + validation/ (or train/ + val/) class folders")
    add("--data_dir", help="CIFAR-10 root: torchvision's files (downloaded there when missing) or train/ and "
                           "test/ class folders (default: ./data)")
    add("--save_dir", help="run directory, used as given (default: <save_root>/<method>/<model>/<dataset>/<norm>)")
    add("--norm", choices=NORMS, help="norm layers (default: the method's YAML)")
    add("--epochs", type=int, help="training epochs (default: 200 on CIFAR-10, 90 on ImageNet)")
    add("--test_freq", type=int, help="evaluate the grid and checkpoint every N epochs (default: 20; 1 on ImageNet)")
    add("--learning_rate", type=float, help="peak learning rate (default: the method's YAML)")
    add("--batch_size", type=int, help="global train and test batch size (default: 128; VGG19 on ImageNet 256)")
    add("--momentum", type=float, help="SGD momentum (default: 0.9)")
    add("--weight_decay", type=float, help="SGD weight decay (default: 5e-4; 5e-5 on ImageNet)")
    add("--config", help="a YAML file applied over the method's config (e.g. a run's config.yaml)")
    add("--seed", type=int, help="seed of Python, NumPy, torch and the data order (default: 0)")
    add("--device", choices=DEVICES, help="auto (CUDA when available, default), cpu or cuda")
    add("--num_workers", type=int, help="data-loading worker processes (default: 2 on CIFAR-10, 16 on ImageNet)")
    add("--threads", type=int, help="CPU threads per process (default: the usable cores not busy with other "
                                     "work, at most 16, shared among torchrun's local processes; "
                                     "OMP_NUM_THREADS when set)")
    add("--eval_at_start", action=argparse.BooleanOptionalAction, default=None,
        help="evaluate the grid before training, as the original does (epoch 0 in the metrics; default); "
             "--no-eval_at_start skips it")
    add("--train_subset", type=int, help="train on the first N training images after a seeded shuffle")
    add("--test_subset", type=int, help="evaluate on the first N test images after a seeded shuffle")
    add("--image_size", type=int, help="ImageNet crop size (default: 224)")
    add("--data_pipeline", choices=DATA_PIPELINES,
        help="tensor: CIFAR held on the device, augmented there in batches; dataloader: PIL transforms in "
             "worker processes; auto (default): tensor for CIFAR-10, dataloader for ImageNet")
    add("--amp", action="store_true", default=None, help="bfloat16 autocast (CUDA, or a CPU with bfloat16 units; default: off, fp32)")
    add("--channels_last", action="store_true", default=None, help="channels-last memory format")
    add("--compile", action="store_true", default=None, help="torch.compile the network")
    add("--resume", nargs="?", const="last", metavar="CHECKPOINT",
        help="continue the run in save_dir from checkpoint_last.pt, or from the given checkpoint")
    add("--overwrite", action="store_true", help="replace a run already in save_dir")
    add("--eval_only", action="store_true", help="evaluate --checkpoint at the grid and exit (no training)")
    add("--checkpoint", help="checkpoint to evaluate with --eval_only")
    if setting == "structured_sparsity":  # accepted only to be refused with a clear message
        add("--warmup_budget", type=float, help=argparse.SUPPRESS)
        add("--bn_calibration_images", type=int,
            help="before each evaluation, re-estimate the BN running statistics of the network as evaluated "
                 "on this many training images (test transform, seeded subset); 0: off (default: 2048 for lec, "
                 "0 for the others; BN only)")
        add("--lec_test_batch_statistics", action="store_true", default=None,
            help="lec: evaluate with each test batch's own BN statistics, as the original did (transductive; "
                 "replaces the re-estimation)")
    else:  # accepted only to be refused with a clear message
        add("--bn_calibration_images", type=int, help=argparse.SUPPRESS)
        add("--lec_test_batch_statistics", action="store_true", default=None, help=argparse.SUPPRESS)


def build_parser(setting):
    methods = list(METHODS[setting])
    # No abbreviations: a mistyped flag such as --learning_rat must not pass for another.
    parser = UsageParser(prog=SCRIPTS[setting], description=SETTING_DESCRIPTIONS[setting], allow_abbrev=False)
    parser.add_argument("--method", choices=methods, help=f"training method (default: lcs_l; one of {', '.join(methods)})")
    _add_common_flags(parser, setting)
    add = parser.add_argument
    if setting == "unstructured_sparsity":
        add("--topk", type=float, help="target TopK fraction kept, in (0, 1] (target_topk; default 0.9)")
        add("--topk_lower_bound", type=float,
            help="lowest TopK fraction trained: the sparse, efficient end (lcs_l, lcs_p; needs --eval_topk_grid)")
        add("--topk_upper_bound", type=float,
            help="highest TopK fraction trained: the dense, accurate end (lcs_l, lcs_p; needs --eval_topk_grid)")
        add("--warmup_budget", type=float, help="percent of all iterations for the TopK warmup, in (0, 100] (default: 80)")
        add("--eval_topk_grid", type=number_list(float), help="comma-separated TopK fractions to evaluate")
    elif setting == "structured_sparsity":
        add("--width_factors_list", type=number_list(float), help="comma-separated widths trained per batch (ns)")
        add("--width_factor_limits", type=number_list(float), help="lo,hi: range of widths trained (lcs_l, lcs_p, us)")
        add("--width_factor_samples", type=int, help="widths per batch, both ends included (lcs_l, lcs_p, us; default 4)")
        add("--eval_width_factors", "--list", dest="eval_width_factors", type=number_list(float),
            help="comma-separated width factors to evaluate")
    else:
        add("--bit_width", type=number_list(int), help="bit width to train at, 3..8 (target_bit_width; default 6)")
        add("--eval_bit_widths", type=number_list(int), help="comma-separated bit widths to evaluate, 3..8")
        add("--bit_width_limits", type=number_list(int), help="min,max: range of bit widths trained (lcs_l, lcs_p)")
        add("--warmup_budget", type=float,
            help="percent of all iterations before activations are quantized, in (0, 100] (default: 80)")
    return parser


SETTING_DESCRIPTIONS = {
    "structured_sparsity": "Train a network whose channel width can be chosen at inference time.",
    "unstructured_sparsity": "Train a network whose unstructured (TopK) sparsity can be chosen at inference time.",
    "quantized": "Train a network whose bit width can be chosen at inference time.",
}


@dataclass
class RunOptions:
    """What to do with the config (not part of it)."""

    resume: Optional[str] = None        # None, "last" or a checkpoint path
    overwrite: bool = False
    eval_only: bool = False
    checkpoint: Optional[str] = None


# -- merging -----------------------------------------------------------------------------
class _Layers:
    """Values with the place each came from, for error messages."""

    def __init__(self):
        self.values, self.sources = {}, {}

    def set(self, key, value, source):
        self.values[key] = value
        self.sources[key] = source

    def get(self, key, default=None):
        return self.values.get(key, default)


FLAG_KEYS = ("model", "dataset", "norm", "epochs", "test_freq", "learning_rate", "batch_size", "momentum",
             "weight_decay", "save_dir", "data_dir", "imagenet_dir", "seed", "device", "num_workers",
             "train_subset", "test_subset", "image_size", "data_pipeline", "amp", "channels_last", "compile",
             "warmup_budget", "threads", "eval_at_start")


def _apply_file(layers, data, path, setting, method):
    for key, value in data.items():
        if key in ("setting", "method"):
            continue
        _check_entry(path, key, value, setting, method)
        layers.set(key, value, f"{path}: key '{key}'")


def _flag_given(args, name):
    return getattr(args, name, None) is not None


def _apply_setting_flags(layers, args, setting, method):
    """Flags whose config mapping depends on the setting (SPEC 1.2, CLI -> config)."""
    def refuse(flag, allowed):
        raise ConfigError(f"--{flag}: not used by --method {method} (only by {allowed})")

    _apply_bn_statistics_flags(layers, args, setting, method, refuse)
    if setting == "structured_sparsity":
        if _flag_given(args, "warmup_budget"):
            raise ConfigError("--warmup_budget: the structured setting has no warmup (only train_unstructured.py "
                              "and train_quantized.py take it)")
        if _flag_given(args, "width_factors_list"):
            if method != "ns":
                refuse("width_factors_list", "ns")
            layers.set("width_factors_list", args.width_factors_list, "--width_factors_list")
        for flag in ("width_factor_limits", "width_factor_samples"):
            if _flag_given(args, flag):
                if method in ("ns", "lec"):
                    refuse(flag, "lcs_l, lcs_p, us")
                layers.set(flag, getattr(args, flag), f"--{flag}")
        if _flag_given(args, "eval_width_factors"):
            if method == "lec":
                raise ConfigError("--eval_width_factors: lec is evaluated at fractions of norm channels kept, "
                                  "not at width factors (set eval_param_grid in a --config file)")
            layers.set("eval_width_factors", args.eval_width_factors, "--eval_width_factors")
    elif setting == "unstructured_sparsity":
        if _flag_given(args, "topk"):
            if method != "target_topk":
                refuse("topk", "target_topk")
            layers.set("topk", args.topk, "--topk")
        lower, upper = args.topk_lower_bound, args.topk_upper_bound
        if (lower is None) != (upper is None):
            given = "--topk_lower_bound" if lower is not None else "--topk_upper_bound"
            raise ConfigError(f"{given}: give both --topk_lower_bound and --topk_upper_bound, or neither")
        if lower is not None:
            if method == "target_topk":
                refuse("topk_lower_bound", "lcs_l, lcs_p")
            if not 0 <= lower <= 1:
                raise ConfigError(f"--topk_lower_bound: must be in [0, 1], got {lower}")
            if not 0 <= upper <= 1:
                raise ConfigError(f"--topk_upper_bound: must be in [0, 1], got {upper}")
            if lower >= upper:
                raise ConfigError(f"--topk_lower_bound: must be below --topk_upper_bound, got {lower} >= {upper}")
            if args.eval_topk_grid is None:
                raise ConfigError("--topk_lower_bound: the TopK bounds need --eval_topk_grid (the levels to evaluate)")
            layers.set("alpha_sampling", [lower, upper, 0.5], "--topk_lower_bound/--topk_upper_bound")
        if args.eval_topk_grid is not None:
            key = "alpha_grid" if method == "lcs_l" else "eval_param_grid"
            layers.set(key, args.eval_topk_grid, "--eval_topk_grid")
    else:
        if _flag_given(args, "bit_width"):
            if method != "target_bit_width":
                refuse("bit_width", "target_bit_width")
            if len(args.bit_width) != 1:
                raise ConfigError(f"--bit_width: expected one integer, got {args.bit_width}")
            layers.set("num_bits", args.bit_width[0], "--bit_width")
        if _flag_given(args, "bit_width_limits"):
            if method == "target_bit_width":
                refuse("bit_width_limits", "lcs_l, lcs_p")
            limits = args.bit_width_limits
            if len(limits) != 2:
                raise ConfigError(f"--bit_width_limits: expected exactly two integers min,max, got {limits}")
            layers.set("min_bits", limits[0], "--bit_width_limits")
            layers.set("max_bits", limits[1], "--bit_width_limits")
            if method == "lcs_l":
                layers.set("alpha_grid", None, "--bit_width_limits")
            elif args.eval_bit_widths is None:
                layers.set("eval_param_grid", list(range(limits[0], limits[1] + 1)), "--bit_width_limits")
        if _flag_given(args, "eval_bit_widths"):
            layers.set("eval_bit_widths", args.eval_bit_widths, "--eval_bit_widths")


def _apply_bn_statistics_flags(layers, args, setting, method, refuse):
    """--bn_calibration_images and --lec_test_batch_statistics: one way of getting the BN
    statistics of an evaluation. A flag for one mode switches off the other when that came
    from a file or default; both given as flags is an error."""
    given = [flag for flag in ("bn_calibration_images", "lec_test_batch_statistics") if _flag_given(args, flag)]
    if given and setting not in CALIBRATION_SETTINGS:
        raise ConfigError(f"--{given[0]}: only train_structured.py re-estimates BN statistics; {setting} networks "
                          f"are evaluated with their running statistics")
    if "lec_test_batch_statistics" in given and method != "lec":
        refuse("lec_test_batch_statistics", "lec")
    for flag in given:
        layers.set(flag, getattr(args, flag), f"--{flag}")
    test_batch = layers.get("lec_test_batch_statistics")
    images = layers.get("bn_calibration_images")
    if not test_batch or images == 0:
        return
    if "bn_calibration_images" in given and "lec_test_batch_statistics" in given:
        raise ConfigError(f"--lec_test_batch_statistics: evaluates with test-batch statistics, so it excludes "
                          f"--bn_calibration_images {images} (give 0 or leave it out)")
    if "bn_calibration_images" in given:
        layers.set("lec_test_batch_statistics", False, "--bn_calibration_images")
    elif images is None or "lec_test_batch_statistics" in given:
        layers.set("bn_calibration_images", 0, "--lec_test_batch_statistics")


def _derive(layers, setting, method):
    """Grids given in level units for LCS+L become alpha grids (after all layers merged)."""
    values = layers.values
    if "eval_width_factors" in values:
        widths, source = values.pop("eval_width_factors"), layers.sources.pop("eval_width_factors")
        if method == "lcs_l":
            low, high = _width_limits(values.get("width_factor_limits"), layers.sources)
            for w in widths:
                if not low <= w <= high:
                    raise ConfigError(f"{source}: width {w} is outside the trained width_factor_limits "
                                      f"[{low}, {high}]")
            layers.set("alpha_grid", [width_to_alpha(w, low, high) for w in widths], source)
        else:
            layers.set("eval_param_grid", widths, source)
    if setting == "quantized" and method == "lcs_l":
        low, high = values.get("min_bits"), values.get("max_bits")
        if "eval_bit_widths" in values:
            bits, source = values.pop("eval_bit_widths"), layers.sources.pop("eval_bit_widths")
            _check_bits_range(source, low, high)
            for b in bits:
                if not low <= b <= high:
                    raise ConfigError(f"{source}: bit width {b} is outside the trained range [{low}, {high}]")
            layers.set("alpha_grid", [bits_to_alpha(b, low, high) for b in bits], source)
        elif values.get("alpha_grid", 0) is None:  # --bit_width_limits without a grid
            _check_bits_range("--bit_width_limits", low, high)
            grid = [math.floor(1000 * i / (high - low + 1)) / 1000 for i in range(1, high - low + 2)]
            layers.set("alpha_grid", grid, "--bit_width_limits")
    elif "eval_bit_widths" in values:
        layers.set("eval_param_grid", values.pop("eval_bit_widths"), layers.sources.pop("eval_bit_widths"))


def _width_limits(limits, sources):
    _require(isinstance(limits, list) and len(limits) == 2, sources, "width_factor_limits",
             f"expected two width factors lo,hi, got {limits}")
    low, high = limits
    _require(0 < low < high <= 1, sources, "width_factor_limits", f"must satisfy 0 < lo < hi <= 1, got {low},{high}")
    return low, high


def _check_bits_range(source, low, high):
    if not (isinstance(low, int) and isinstance(high, int) and 3 <= low < high <= 8):
        raise ConfigError(f"{source}: bit width limits must satisfy 3 <= min < max <= 8, got {low},{high}")


def merge(setting, args, base=None, base_source=None):
    """The config for `args`. `base` (a dict) replaces steps 1-3 when resuming or evaluating
    a checkpoint; then only the flags are applied on top."""
    layers = _Layers()
    config_file = read_yaml(args.config) if args.config else {}
    if base is None:
        base = {}
        if config_file.get("setting", setting) != setting:
            raise ConfigError(f"{args.config}: holds a {config_file['setting']} config, but "
                              f"{SCRIPTS[setting]} trains {setting}")
    method = args.method or base.get("method") or config_file.get("method") or "lcs_l"
    if not isinstance(method, str) or method not in METHODS[setting]:
        source = base_source or args.config
        raise ConfigError(f"{source}: key 'method' is {method!r}, not one of {', '.join(METHODS[setting])}")
    if base:
        # Every key of a checkpoint's config must be known: a key this version does not read
        # would otherwise be dropped without a word.
        _apply_file(layers, base, base_source, setting, method)
    else:
        _apply_file(layers, read_yaml(method_yaml_path(setting, method)), method_yaml_path(setting, method),
                    setting, method)
        model = args.model or config_file.get("model") or layers.get("model") or "cpreresnet20"
        dataset = args.dataset or config_file.get("dataset") or layers.get("dataset") or "cifar10"
        for key, value in model_data_params(model, dataset).items():
            layers.set(key, value, f"the {model}/{dataset} default for '{key}'")
        _apply_file(layers, config_file, args.config, setting, method)
    for key in FLAG_KEYS:
        if _flag_given(args, key) and not (key == "warmup_budget" and setting == "structured_sparsity"):
            layers.set(key, getattr(args, key), f"--{key}")
    _apply_setting_flags(layers, args, setting, method)
    _derive(layers, setting, method)
    config = Config(setting=setting, method=method)
    if setting in CALIBRATION_SETTINGS:
        config.bn_calibration_images = 0
    for key, value in METHODS[setting][method].defaults.items():
        setattr(config, key, value)
    if setting in WARMUP_SETTINGS:
        config.warmup_budget = 80.0
    for key, value in layers.values.items():
        setattr(config, key, value)
    if config.norm == "GN" and setting in WARMUP_SETTINGS and config.num_groups is None:
        config.num_groups = 32
    if config.dataset == "imagenet" and config.image_size is None:
        config.image_size = 224
    if config.num_workers is None:
        config.num_workers = 16 if config.dataset == "imagenet" else 2
    validate(config, layers.sources)
    save_key = "save_dir"
    if config.save_dir is None:
        config.save_dir = os.path.join(config.save_root, method, config.model, config.dataset, config.norm)
        save_key = "save_root"
    check_save_dir(config.save_dir, _source(layers.sources, save_key))
    return config


# -- validation ------------------------------------------------------------------------
def _source(sources, key):
    return sources.get(key, f"'{key}'")


def _require(condition, sources, key, message):
    if not condition:
        raise ConfigError(f"{_source(sources, key)}: {message}")


def _in_range(sources, key, value, low, high, low_open=False, what="values"):
    ok = (low < value if low_open else low <= value) and value <= high
    bracket = "(" if low_open else "["
    _require(ok, sources, key, f"{what} must be in {bracket}{low}, {high}], got {value}")


def validate(config, sources):
    """Every check of SPEC 1.1 / SPEC 5 and the project's own, first failure raised."""
    c, s = config, sources
    _require(c.model in MODELS, s, "model", f"unknown model {c.model!r} (allowed: {', '.join(sorted(MODELS))})")
    _require(c.dataset in DATASETS, s, "dataset", f"unknown dataset {c.dataset!r} (allowed: {', '.join(DATASETS)})")
    allowed = DATASET_MODELS[c.dataset]
    if "model" in s:
        _require(c.model in allowed, s, "model", f"{c.model} does not run on {c.dataset} (allowed: {', '.join(allowed)})")
    _require(c.model in allowed, s, "dataset", f"{c.dataset} needs --model {' or '.join(allowed)} (the default "
                                               f"{c.model} is a CIFAR-10 network)")
    _require(c.norm in NORMS, s, "norm", f"unknown norm {c.norm!r} (allowed: IN, BN, GN)")
    _validate_numbers(c, s)
    _validate_data_source(c, s)
    _require(c.device in DEVICES, s, "device", f"must be auto, cpu or cuda, got {c.device!r}")
    _require(c.data_pipeline in DATA_PIPELINES, s, "data_pipeline",
             f"must be auto, tensor or dataloader, got {c.data_pipeline!r}")
    if c.dataset == "imagenet":
        _require(c.data_pipeline != "tensor", s, "data_pipeline",
                 "tensor holds CIFAR-10 on the device; ImageNet needs dataloader (or auto)")
    if c.setting in WARMUP_SETTINGS:
        _require(c.warmup_budget is not None, s, "warmup_budget", "must be a percentage in (0, 100], got null")
        _in_range(s, "warmup_budget", c.warmup_budget, 0, 100, low_open=True, what="the warmup budget (percent)")
        if c.norm == "GN":
            # Every norm of the three networks has a power-of-two channel count.
            _require(c.num_groups >= 1 and c.num_groups & (c.num_groups - 1) == 0, s, "num_groups",
                     f"must be a power of two (it must divide the channel counts), got {c.num_groups}")
    for key in METHODS[c.setting][c.method].config_keys:
        _require(getattr(c, key) is not None, s, key,
                 f"{c.setting}/{c.method} needs '{key}' (set it in the YAML or with its flag)")
    VALIDATORS[c.setting](c, s)


MAX_SEED = 2**32 - 1  # NumPy's seed range
# ImageNet networks need more than one position in their last stage (instance norm and
# batch norm with one-image batches cannot normalise a single value): image_size / 32 > 1
# for ResNet18, / 16 for VGG19 (its last conv stage sits before the fifth pooling).
MIN_IMAGE_SIZE = {"resnet18": 33, "vgg19": 32}


# What makes sense, so that a typo cannot start a thousand workers or a batch no memory holds.
UPPER_BOUNDS = {"epochs": 100_000, "batch_size": 65_536, "num_workers": 256, "threads": 1024, "image_size": 1024,
                "width_factor_samples": 64}
MAX_GRID_POINTS = 256


def _validate_numbers(c, s):
    for key in ("epochs", "batch_size", "test_freq"):
        _require(getattr(c, key) >= 1, s, key, f"must be at least 1, got {getattr(c, key)}")
    for key, high in UPPER_BOUNDS.items():
        value = getattr(c, key)
        _require(value is None or value <= high, s, key, f"must be at most {high}, got {value}")
    for key in ("learning_rate", "weight_decay"):
        value = getattr(c, key)
        _require(math.isfinite(value) and value >= 0, s, key, f"must be a finite number >= 0, got {value}")
    _require(math.isfinite(c.momentum) and 0 <= c.momentum < 1, s, "momentum",
             f"must be in [0, 1), got {c.momentum}")
    _require(0 <= c.seed <= MAX_SEED, s, "seed", f"must be in 0..{MAX_SEED}, got {c.seed}")
    _require(c.num_workers >= 0, s, "num_workers", f"must be 0 or more, got {c.num_workers}")
    _require(c.threads is None or c.threads >= 1, s, "threads", f"must be at least 1, got {c.threads}")
    for key in ("train_subset", "test_subset"):
        value = getattr(c, key)
        _require(value is None or value >= 1, s, key, f"must be at least 1, got {value}")
    if c.image_size is not None and c.dataset == "imagenet":
        minimum = MIN_IMAGE_SIZE[c.model]
        _require(c.image_size >= minimum, s, "image_size",
                 f"{c.model} needs at least {minimum} (its last stage must keep more than one position), "
                 f"got {c.image_size}")
    for key in ("bn_update_factor", "beta"):
        value = getattr(c, key)
        _require(value is None or (math.isfinite(value) and value >= 0), s, key,
                 f"must be a finite number >= 0, got {value}")


def _given_as_flag(sources, key):
    return sources.get(key) == f"--{key}"


def _validate_data_source(c, s):
    """Paths that must exist before anything is read or written, and dataset flags that
    would otherwise be ignored."""
    for key in ("save_root", "save_dir", "data_dir", "imagenet_dir"):
        value = getattr(c, key)
        _require(value is None or value.strip() != "", s, key, "must not be empty")
    if c.dataset == "imagenet":
        _require(c.imagenet_dir is not None, s, "dataset", "imagenet needs --imagenet_dir (the ImageNet root)")
        _require(os.path.isdir(c.imagenet_dir), s, "imagenet_dir", f"no such directory: {c.imagenet_dir}")
        _require(not _given_as_flag(s, "data_dir"), s, "data_dir",
                 "only used for cifar10 (ImageNet is read from --imagenet_dir)")
        return
    for key in ("imagenet_dir", "image_size"):
        _require(not _given_as_flag(s, key), s, key, "only used with --dataset imagenet")
    # The default ./data may be missing: CIFAR-10 is downloaded there. A directory given
    # explicitly must exist (a typo must not trigger a download into a new folder) and must
    # not be one of the common wrong places (a split folder, an archive, ...). The default is
    # checked when the data is read (data.cifar.load_cifar10).
    if os.path.normpath(c.data_dir) != DEFAULT_DATA_DIR:
        problem = data_dir_problem(c.data_dir)
        _require(problem is None, s, "data_dir", problem)


def check_save_dir(save_dir, source):
    """The run directory must be a directory or creatable as one."""
    path = os.path.abspath(save_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "is a file" if os.path.abspath(save_dir) == path else f"lies under the file {path}"
        raise ConfigError(f"{source}: the run directory {save_dir} {what}, expected a directory")


def _check_grid(s, key, grid, low, high, low_open=True, what="grid values"):
    _require(isinstance(grid, list) and len(grid) > 0, s, key, "the evaluation grid is empty")
    _require(len(grid) <= MAX_GRID_POINTS, s, key, f"at most {MAX_GRID_POINTS} values, got {len(grid)}")
    for value in grid:
        _in_range(s, key, value, low, high, low_open=low_open, what=what)


def _validate_structured(c, s):
    _require(c.norm != "GN", s, "norm", "GN is not supported by the structured setting (slimmable layers "
                                         "take IN or BN)")
    images = c.bn_calibration_images
    _require(images >= 0, s, "bn_calibration_images", f"must be 0 (off) or a number of training images, got {images}")
    _require(images == 0 or c.norm == "BN", s, "bn_calibration_images",
             f"re-estimates BN running statistics, but --norm {c.norm} keeps none (only BN does); use 0")
    _require(not (c.lec_test_batch_statistics and images), s, "lec_test_batch_statistics",
             f"evaluates with test-batch statistics, so it excludes bn_calibration_images {images} (set it to 0)")
    if c.method in ("lec", "ns"):
        _require(c.norm == "BN", s, "norm", f"{c.method} needs BN, got {c.norm}")
    if c.method == "lec":
        _require(c.model in ("cpreresnet20", "vgg19"), s, "model",
                 f"lec runs on cpreresnet20 or vgg19, got {c.model}")
        _require(c.bn_update_factor is None or c.bn_update_factor >= 0, s, "bn_update_factor",
                 f"must be non-negative, got {c.bn_update_factor}")
        _check_grid(s, "eval_param_grid", c.eval_param_grid, 0, 1, what="fractions of channels kept")
        return
    if c.method == "ns":
        _check_grid(s, "width_factors_list", c.width_factors_list or [], 0, 1, what="width factors")
        _check_grid(s, "eval_param_grid", c.eval_param_grid, 0, 1, what="width factors")
        return
    low, high = _width_limits(c.width_factor_limits, s)
    sampling = c.width_factor_sampling_method or "sandwich"
    _require(sampling in ("sandwich", "point"), s, "width_factor_sampling_method",
             f"must be sandwich or point, got {sampling!r}")
    minimum = 2 if sampling == "sandwich" else 1
    _require(c.width_factor_samples is not None and c.width_factor_samples >= minimum, s, "width_factor_samples",
             f"must be at least {minimum} (the sandwich rule trains both ends), got {c.width_factor_samples}")
    if c.method == "lcs_l":
        _check_grid(s, "alpha_grid", c.alpha_grid, 0, 1, low_open=False, what="alphas")
        _require(c.beta is None or c.beta >= 0, s, "beta", f"must be non-negative, got {c.beta}")
    else:
        _check_grid(s, "eval_param_grid", c.eval_param_grid, 0, 1, what="width factors")
        for w in c.eval_param_grid:
            _require(low <= w <= high, s, "eval_param_grid",
                     f"width {w} is outside the trained width_factor_limits [{low}, {high}]")


def _validate_unstructured(c, s):
    if c.method in ("lcs_l", "lcs_p"):
        sampling = c.alpha_sampling
        _require(isinstance(sampling, list) and len(sampling) == 3, s, "alpha_sampling",
                 f"expected [low, high, endpoint probability], got {sampling}")
        low, high, probability = sampling
        _require(0 <= low < high <= 1, s, "alpha_sampling", f"needs 0 <= low < high <= 1, got {low}, {high}")
        _in_range(s, "alpha_sampling", probability, 0, 1, what="the endpoint probability")
    if c.method == "lcs_l":
        _check_grid(s, "alpha_grid", c.alpha_grid, 0, 1, what="TopK fractions")
        _require(c.beta is None or c.beta >= 0, s, "beta", f"must be non-negative, got {c.beta}")
    else:
        _check_grid(s, "eval_param_grid", c.eval_param_grid, 0, 1, what="TopK fractions")
    if c.method == "target_topk":
        _in_range(s, "topk", c.topk, 0, 1, low_open=True, what="the TopK fraction")


def _validate_quantized(c, s):
    if c.method in ("lcs_l", "lcs_p"):
        _check_bits_range(_source(s, "min_bits"), c.min_bits, c.max_bits)
    if c.method == "target_bit_width":
        _require(c.num_bits in range(3, 9), s, "num_bits", f"bit width must be an integer in 3..8, got {c.num_bits}")
    if c.method == "lcs_l":
        _check_grid(s, "alpha_grid", c.alpha_grid, 0, 1, low_open=False, what="alphas")
        _require(isinstance(c.discrete_alpha_map, bool), s, "discrete_alpha_map", "must be true or false")
        _require(c.beta is None or c.beta >= 0, s, "beta", f"must be non-negative, got {c.beta}")
        return
    grid = c.eval_param_grid
    _require(isinstance(grid, list) and len(grid) > 0, s, "eval_param_grid", "the evaluation grid is empty")
    _require(len(grid) <= MAX_GRID_POINTS, s, "eval_param_grid", f"at most {MAX_GRID_POINTS} values, got {len(grid)}")
    low, high = (c.min_bits, c.max_bits) if c.method == "lcs_p" else (3, 8)
    for bits in grid:
        _require(float(bits).is_integer() and low <= bits <= high, s, "eval_param_grid",
                 f"bit widths must be integers in {low}..{high}"
                 f"{' (the trained min_bits..max_bits)' if c.method == 'lcs_p' else ''}, got {bits}")
    c.eval_param_grid = [int(b) for b in grid]


VALIDATORS = {"structured_sparsity": _validate_structured, "unstructured_sparsity": _validate_unstructured,
              "quantized": _validate_quantized}


# -- entry -----------------------------------------------------------------------------
def parse(setting, argv=None):
    """(Config, RunOptions) from command-line arguments; ConfigError on any mistake."""
    args = build_parser(setting).parse_args(argv)
    options = RunOptions(resume=args.resume, overwrite=args.overwrite, eval_only=args.eval_only,
                         checkpoint=args.checkpoint)
    for flag in ("resume", "checkpoint", "config"):
        if getattr(args, flag) == "":
            raise ConfigError(f"--{flag}: the path is empty")
    if options.eval_only and not options.checkpoint:
        raise ConfigError("--eval_only: needs --checkpoint PATH (the trained model to evaluate)")
    if options.checkpoint and not options.eval_only:
        raise ConfigError("--checkpoint: only used with --eval_only (to continue training use --resume PATH)")
    if options.eval_only and options.resume:
        raise ConfigError("--resume: cannot be combined with --eval_only")
    if options.resume and options.overwrite:
        raise ConfigError("--overwrite: cannot be combined with --resume")
    if options.eval_only and options.overwrite:
        raise ConfigError("--overwrite: cannot be combined with --eval_only (evaluation adds rows to the "
                          "run's metrics and replaces nothing)")
    if not (options.resume or options.eval_only):
        return merge(setting, args), options
    # Resuming or evaluating: the checkpoint's config is the base, flags may change only
    # where and how to run (and, for evaluation, the grid).
    from utils.checkpoint import checkpoint_path_for_resume, read_checkpoint_config
    path = options.checkpoint if options.eval_only else options.resume
    if path == "last":
        path = checkpoint_path_for_resume(merge(setting, args).save_dir)
        options.resume = path
    base = read_checkpoint_config(path, setting, training=not options.eval_only)
    action = "evaluating a checkpoint" if options.eval_only else "resuming"
    if args.config:
        raise ConfigError(f"--config: not used when {action} (the checkpoint's config is)")
    if args.method and args.method != base.get("method"):
        raise ConfigError(f"--method: cannot be changed when {action} (the checkpoint holds a "
                          f"{base.get('method')} model, not {args.method})")
    config = merge(setting, args, base=base, base_source=path)
    _refuse_changes(setting, base, config, options.eval_only)
    if options.eval_only and args.save_dir is None:
        config.save_dir = os.path.dirname(os.path.abspath(path))
    return config, options


GRID_FLAGS = {"structured_sparsity": "--eval_width_factors", "unstructured_sparsity": "--eval_topk_grid",
              "quantized": "--eval_bit_widths"}
# Config keys set by flags of another name.
KEY_FLAGS = {"num_bits": "--bit_width", "min_bits": "--bit_width_limits", "max_bits": "--bit_width_limits",
             "alpha_sampling": "--topk_lower_bound/--topk_upper_bound"}


def _refuse_changes(setting, base, config, eval_only):
    """The resolved config may differ from the checkpoint's only where and how to run (and,
    for an evaluation, in batch size, test subset and grid): anything else would change
    the run. Flags repeating the checkpoint's values are fine."""
    allowed = set(RUNTIME_KEYS)
    if eval_only:
        allowed |= {"batch_size", "test_subset", "alpha_grid", "eval_param_grid", "bn_calibration_images",
                    "lec_test_batch_statistics"}
    for key, value in config.to_dict().items():
        # A key the checkpoint lacks (written before the key existed) takes its default.
        if key in allowed or key not in base or base[key] == value:
            continue
        if key in ("alpha_grid", "eval_param_grid"):
            flag = GRID_FLAGS[setting]
        else:
            flag = KEY_FLAGS.get(key, f"--{key}")
        action = "evaluating a checkpoint" if eval_only else "resuming"
        raise ConfigError(f"{flag}: cannot be changed when {action} (the checkpoint's {key} is {base[key]}, "
                          f"not {value})")


def main(setting, argv=None):
    """Entry point of the three scripts: parse, then train or evaluate."""
    from utils.train import run

    config = None
    try:
        config, options = parse(setting, argv)
        status = run(config, options)
    except UserError as error:
        _exit_with_error(setting, one_line(error), error.exit_code)
    except OSError as error:
        # A read or write the checks above could not foresee (a disk filling up while the
        # metrics are written, a directory that became read-only, ...).
        where = f"{error.filename}: " if error.filename else ""
        _exit_with_error(setting, f"{where}{error.strerror or one_line(error)}", 1)
    except torch.cuda.OutOfMemoryError as error:  # torch.OutOfMemoryError from torch 2.5 on
        _exit_with_error(setting, f"out of memory on the device ({one_line(error)[:200]}); try a smaller "
                                  f"--batch_size", 1)
    except (MemoryError, RuntimeError) as error:
        if not isinstance(error, MemoryError) and "can't allocate memory" not in str(error):
            raise
        _exit_with_error(setting, "out of memory on the host (a tensor could not be allocated); try a smaller "
                                  "--batch_size or --image_size", 1)
    except KeyboardInterrupt:
        # A second Ctrl-C (the first stops after the current step and saves), or one before
        # training began: stop at once. A write in progress is abandoned whole (atomic), so
        # the last checkpoint on disk stays valid.
        where = f" in {config.save_dir}" if config is not None else ""
        _exit_with_error(setting, f"interrupted (Ctrl-C) before a checkpoint could be saved; stopped at once, the "
                                  f"last checkpoint written{where}, if any, is intact (resume with --resume)", 130)
    sys.exit(status)


def _exit_with_error(setting, message, status):
    print(f"{SCRIPTS[setting]}: error: {message}", file=sys.stderr)
    sys.exit(status)
