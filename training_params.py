"""The command line: flags and YAML configs -> one validated, typed run configuration.

Merge order (SPEC 1.2, later wins):
  1. configs/<setting>/<method>.yaml
  2. the per-model / per-dataset table below (epochs, test_freq, batch size, momentum,
     weight decay; it always overrides the YAML, as in the original)
  3. the file given with --config (e.g. a run's saved config.yaml)
  4. command-line flags
then the keys' defaults for what is still unset, then validation. The flags every script
shares are here; a setting's and a method's own flags, keys, checks and levels belong to
their classes in methods/. Every user mistake raises ConfigError with one line naming the
flag or file/key, the bad value and what is allowed.

Flags and YAML files are checked before torch is imported (it takes seconds, more on a busy
machine): nothing this module imports at its top imports torch, and what needs torch (the
data folders' check, a checkpoint, training) is imported where it is used.
"""

import argparse
import math
import os
import sys

from data.layout import DEFAULT_DATA_DIR, data_dir_problem
from engine import run_dir
from engine.run_dir import RunOptions
from methods import DEFAULT_METHOD, METHODS, SETTINGS
from methods.config import COMMON_KEYS, Checks, Config
from utils.errors import ConfigError, UsageParser, UserError, one_line, shown
from utils.model_spec import parse_model_kwargs, parse_model_spec
from utils.yaml_io import read_yaml

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG_ROOT = os.path.join(REPO_ROOT, "configs")

SCRIPTS = {setting: cls.script for setting, cls in SETTINGS.items()}
DATASETS = ("cifar10", "imagenet")
DATASET_MODELS = {"cifar10": ("cpreresnet20", "vgg19"), "imagenet": ("resnet18", "vgg19")}
# The networks of models.MODELS (the registry imports torch; a test keeps the two equal).
MODELS = sorted({model for models in DATASET_MODELS.values() for model in models})
NORMS = ("IN", "BN", "GN")
DEVICES = ("auto", "cpu", "cuda")
DATA_PIPELINES = ("auto", "tensor", "dataloader")
# Keys that only say where or how to run: they may change when resuming or evaluating.
# eval_at_start changes what is recorded, not what is trained (evaluation leaves the model and
# the random streams as they were).
RUNTIME_KEYS = {"data_dir", "imagenet_dir", "device", "num_workers", "save_dir", "data_pipeline", "threads",
                "eval_at_start", "tensorboard"}
# Keys that do not say what a run trains: where and how it runs, and its own run id (new at
# each run's start): two runs that differ only in these trained the same thing.
NON_TRAINING_KEYS = RUNTIME_KEYS | {"run_id"}


# -- per-model / per-dataset overrides (the original's training_params.model_data_params) --
DEFAULT_PARAMS = {"epochs": 200, "test_freq": 20, "batch_size": 128, "momentum": 0.9, "weight_decay": 5e-4}
DEFAULT_IMAGENET_PARAMS = {"epochs": 90, "test_freq": 1, "batch_size": 128, "momentum": 0.9,
                           "weight_decay": 5e-5}
VGG_IMAGENET_PARAMS = {"epochs": 90, "test_freq": 1, "batch_size": 256, "momentum": 0.9, "weight_decay": 5e-5}


def model_data_params(model, dataset):
    if dataset == "imagenet":
        return VGG_IMAGENET_PARAMS if model == "vgg19" else DEFAULT_IMAGENET_PARAMS
    return DEFAULT_PARAMS


# -- keys and YAML files ----------------------------------------------------------------
def allowed_keys(setting, method):
    """The keys a YAML file or checkpoint config of this setting and method may hold."""
    return set(METHODS[setting][method].file_keys())


def all_keys():
    """{key: Key} over every registered method (for messages and tests)."""
    keys = dict(COMMON_KEYS)
    for methods in METHODS.values():
        for cls in methods.values():
            keys.update(cls.file_keys())
    return keys


def _check_entry(source, key, value, setting, method):
    keys = METHODS[setting][method].file_keys()
    if key not in keys:
        if key not in all_keys():
            raise ConfigError(f"{source}: unknown key {shown(key)} (allowed: {', '.join(sorted(keys))})")
        raise ConfigError(f"{source}: key {shown(key)} is not used by {setting}/{method}")
    spec = keys[key]
    if not spec.accepts(value):
        hint = ""
        if isinstance(value, str) and spec.kind.rstrip("?") in ("float", "int") and _is_number_text(value):
            hint = " (YAML reads numbers like 1e-4 as text: write 1.0e-4)"
        raise ConfigError(f"{source}: key '{key}' must be {spec.describe_kind()}, got {shown(value)}{hint}")


def _is_number_text(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def method_yaml_path(setting, method):
    return os.path.join(CONFIG_ROOT, setting, f"{method}.yaml")


# -- flags -----------------------------------------------------------------------------
def _add_common_flags(parser):
    add = parser.add_argument
    add("--model", help="network: cpreresnet20 (default), resnet18, vgg19, or a network converted from "
                        "torchvision.<builder>, timm.<name> or package.module:callable (docs/own_network.md)")
    add("--model_kwargs", help="arguments of a converted network's builder: key=value[,key=value...] "
                               "(e.g. width_mult=0.5) or a YAML mapping")
    add("--init_from", metavar="FILE",
        help="a converted network starts from these weights of the unconverted network (a state_dict, or a "
             "checkpoint holding one under 'state_dict' or 'model'); both ends of an LCS+L line start there")
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
    add("--train_subset", type=int, help="train on the first N training images after a seeded shuffle")
    add("--test_subset", type=int, help="evaluate on the first N test images after a seeded shuffle")
    add("--image_size", type=int, help="ImageNet crop size (default: 224)")
    add("--data_pipeline", choices=DATA_PIPELINES,
        help="tensor: CIFAR held on the device, augmented there in batches; dataloader: PIL transforms in "
             "worker processes; auto (default): tensor for CIFAR-10, dataloader for ImageNet")
    add("--amp", action="store_true", default=None,
        help="bfloat16 autocast (CUDA, or a CPU with bfloat16 units; default: off, fp32)")
    add("--channels_last", action="store_true", default=None, help="channels-last memory format")
    add("--compile", action="store_true", default=None, help="torch.compile the network")
    add("--threads", type=int, help="CPU threads per process (default: the usable cores not busy with other "
                                     "work, at most 16, shared among torchrun's local processes; "
                                     "OMP_NUM_THREADS when set)")
    add("--eval_at_start", action=argparse.BooleanOptionalAction, default=None,
        help="evaluate the grid before training, as the original does (epoch 0 in the metrics; default); "
             "--no-eval_at_start skips it")
    add("--tensorboard", action="store_true", default=None,
        help="TensorBoard curves in <save_dir>/tensorboard (needs requirements-tensorboard.txt)")
    add("--resume", nargs="?", const="last", metavar="CHECKPOINT",
        help="continue the run in save_dir from checkpoint_last.pt, or from the given checkpoint")
    add("--overwrite", action="store_true", help="replace a run already in save_dir")
    add("--eval_only", action="store_true", help="evaluate --checkpoint (or a converted network from --init_from, "
                                                 "as trained weights would be) at the grid and exit (no training)")
    add("--checkpoint", help="checkpoint to evaluate with --eval_only")


def build_parser(setting):
    methods = METHODS[setting]
    cls = SETTINGS[setting]
    # No abbreviations: a mistyped flag such as --learning_rat must not pass for another.
    parser = UsageParser(prog=cls.script, description=cls.description, allow_abbrev=False,
                         elsewhere=other_scripts_flags(setting))
    parser.add_argument("--method", choices=list(methods),
                        help=f"training method (default: {DEFAULT_METHOD}; one of {', '.join(methods)})")
    _add_common_flags(parser)
    for flag in cls.setting_flags(methods).values():
        users = [name for name, method in methods.items() if method.uses_flag(flag)]
        flag.add_to(parser, users if len(users) < len(methods) else None)
    return parser


def other_scripts_flags(setting):
    """{flag: the other scripts that take it} for the flags the `setting` script does not have."""
    own = set(SETTINGS[setting].setting_flags(METHODS[setting]))
    elsewhere = {}
    for other, cls in SETTINGS.items():
        for name, flag in cls.setting_flags(METHODS[other]).items():
            if other != setting and name not in own and flag.help != argparse.SUPPRESS:
                elsewhere.setdefault(name, []).append(cls.script)
    return elsewhere


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

    def drop(self, key):
        self.values.pop(key, None)
        self.sources.pop(key, None)


FLAG_KEYS = ("model", "model_kwargs", "init_from", "dataset", "norm", "epochs", "test_freq", "learning_rate",
             "batch_size", "momentum", "weight_decay", "save_dir", "data_dir", "imagenet_dir", "seed", "device",
             "num_workers", "train_subset", "test_subset", "image_size", "data_pipeline", "amp", "channels_last",
             "compile", "threads", "eval_at_start", "tensorboard")


def _apply_file(layers, data, path, setting, method):
    for key, value in data.items():
        if key in ("setting", "method"):
            continue
        _check_entry(path, key, value, setting, method)
        layers.set(key, value, f"{path}: key '{key}'")
        replaced = METHODS[setting][method].file_keys()[key].replaces
        if replaced:  # a file of an earlier version: its legacy key wins over the layers before it
            layers.drop(replaced)


def merge(setting, args, base=None, base_source=None):
    """(config, sources) for `args`, not yet validated. `base` (a dict) replaces steps 1-3
    when resuming or evaluating a checkpoint; then only the flags are applied on top.
    save_dir stays None unless given (engine.run_dir.locate decides it)."""
    layers = _Layers()
    config_file = read_yaml(args.config) if args.config else {}
    if base is None:
        base = {}
        if config_file.get("setting", setting) != setting:
            raise ConfigError(f"{args.config}: holds a {config_file['setting']} config, but "
                              f"{SCRIPTS[setting]} trains {setting}")
    method = args.method or base.get("method") or config_file.get("method") or DEFAULT_METHOD
    if not isinstance(method, str) or method not in METHODS[setting]:
        source = base_source or args.config
        raise ConfigError(f"{source}: key 'method' is {method!r}, not one of {', '.join(METHODS[setting])}")
    cls = METHODS[setting][method]
    if base:
        # Every key of a checkpoint's config must be known: a key this version does not read
        # would otherwise be dropped without a word.
        _apply_file(layers, base, base_source, setting, method)
    else:
        _apply_file(layers, read_yaml(method_yaml_path(setting, method)), method_yaml_path(setting, method),
                    setting, method)
        model = args.model or config_file.get("model") or layers.get("model") or COMMON_KEYS["model"].default
        dataset = args.dataset or config_file.get("dataset") or layers.get("dataset") or COMMON_KEYS["dataset"].default
        for key, value in model_data_params(model, dataset).items():
            layers.set(key, value, f"the {model}/{dataset} default for '{key}'")
        _apply_file(layers, config_file, args.config, setting, method)
    for key in FLAG_KEYS:
        if getattr(args, key, None) is not None:
            layers.set(key, getattr(args, key), f"--{key}")
    for key, value, source in cls.flag_values(args, METHODS[setting]):
        layers.set(key, value, source)
    cls.upgrade(layers.values, layers.sources)
    config = Config(setting, method, cls.config_keys(), layers.values)
    if config.dataset == "imagenet" and config.image_size is None:
        config.image_size = 224
    if config.num_workers is None:
        config.num_workers = 16 if config.dataset == "imagenet" else 2
    cls.complete(config)
    return config, layers.sources


# -- validation ------------------------------------------------------------------------
def validate(config, sources):
    """Every check of SPEC 1.1 / SPEC 5 and the project's own, first failure raised: the
    common keys here, then the setting's and method's (Method.validate)."""
    c, checks = config, Checks(sources)
    spec = _model_spec(c, checks)
    checks.require(c.dataset in DATASETS, "dataset",
                   f"unknown dataset {c.dataset!r} (allowed: {', '.join(DATASETS)})")
    allowed = DATASET_MODELS[c.dataset]
    if not spec.external:
        if "model" in sources:
            checks.require(c.model in allowed, "model",
                           f"{c.model} does not run on {c.dataset} (allowed: {', '.join(allowed)})")
        checks.require(c.model in allowed, "dataset", f"{c.dataset} needs --model {' or '.join(allowed)} (the "
                                                      f"default {c.model} is a CIFAR-10 network)")
    checks.require(c.norm in NORMS, "norm", f"unknown norm {c.norm!r} (allowed: IN, BN, GN)")
    _validate_numbers(c, checks)
    _validate_data_source(c, checks)
    checks.require(c.device in DEVICES, "device", f"must be auto, cpu or cuda, got {c.device!r}")
    checks.require(c.data_pipeline in DATA_PIPELINES, "data_pipeline",
                   f"must be auto, tensor or dataloader, got {c.data_pipeline!r}")
    if c.dataset == "imagenet":
        checks.require(c.data_pipeline != "tensor", "data_pipeline",
                       "tensor holds CIFAR-10 on the device; ImageNet needs dataloader (or auto)")
    METHODS[c.setting][c.method].validate(c, checks)


MAX_SEED = 2**32 - 1  # NumPy's seed range
# ImageNet networks need more than one position in their last stage (instance norm and
# batch norm with one-image batches cannot normalise a single value): image_size / 32 > 1
# for ResNet18, / 16 for VGG19 (its last conv stage sits before the fifth pooling).
MIN_IMAGE_SIZE = {"resnet18": 33, "vgg19": 32}


# What makes sense, so that a typo cannot start a thousand workers or a batch no memory holds.
UPPER_BOUNDS = {"epochs": 100_000, "batch_size": 65_536, "num_workers": 256, "threads": 1024, "image_size": 1024}


def _model_spec(c, checks):
    """The parsed --model (and --model_kwargs, made a mapping in the config), checked as text:
    whether the builder exists is known once torch is imported (models/convert.py)."""
    try:
        spec = parse_model_spec(c.model, MODELS)
        c.model_kwargs = parse_model_kwargs(c.model_kwargs, checks.source("model_kwargs")) or None
    except ConfigError as error:
        message = str(error).partition(": ")[2]
        key = "model_kwargs" if str(error).startswith(checks.source("model_kwargs")) else "model"
        raise ConfigError(f"{checks.source(key)}: {message}") from None
    checks.require(spec.external or not c.model_kwargs, "model_kwargs",
                   f"only for a converted network (torchvision., timm., package.module:callable), not {c.model}")
    checks.require(spec.external or not c.init_from, "init_from",
                   f"only for a converted network (torchvision., timm., package.module:callable), not {c.model}")
    checks.require(c.init_from is None or os.path.isfile(c.init_from), "init_from",
                   f"no such file: {c.init_from}")
    return spec


def _validate_numbers(c, checks):
    for key in ("epochs", "batch_size", "test_freq"):
        checks.require(getattr(c, key) >= 1, key, f"must be at least 1, got {getattr(c, key)}")
    for key, high in UPPER_BOUNDS.items():
        value = getattr(c, key)
        checks.require(value is None or value <= high, key, f"must be at most {high}, got {value}")
    for key in ("learning_rate", "weight_decay"):
        value = getattr(c, key)
        checks.require(math.isfinite(value) and value >= 0, key, f"must be a finite number >= 0, got {value}")
    checks.require(math.isfinite(c.momentum) and 0 <= c.momentum < 1, "momentum",
             f"must be in [0, 1), got {c.momentum}")
    checks.require(0 <= c.seed <= MAX_SEED, "seed", f"must be in 0..{MAX_SEED}, got {c.seed}")
    checks.require(c.num_workers >= 0, "num_workers", f"must be 0 or more, got {c.num_workers}")
    checks.require(c.threads is None or c.threads >= 1, "threads", f"must be at least 1, got {c.threads}")
    for key in ("train_subset", "test_subset"):
        value = getattr(c, key)
        checks.require(value is None or value >= 1, key, f"must be at least 1, got {value}")
    if c.image_size is not None and c.dataset == "imagenet":
        minimum = MIN_IMAGE_SIZE.get(c.model, 1)
        checks.require(c.image_size >= minimum, "image_size",
                 f"{c.model} needs at least {minimum} (its last stage must keep more than one position), "
                 f"got {c.image_size}")


def _validate_data_source(c, checks):
    """Paths that must exist before anything is read or written, and dataset flags that
    would otherwise be ignored."""
    for key in ("save_root", "save_dir", "data_dir", "imagenet_dir"):
        value = getattr(c, key)
        checks.require(value is None or value.strip() != "", key, "must not be empty")
    if c.dataset == "imagenet":
        checks.require(c.imagenet_dir is not None, "dataset", "imagenet needs --imagenet_dir (the ImageNet root)")
        checks.require(os.path.isdir(c.imagenet_dir), "imagenet_dir", f"no such directory: {c.imagenet_dir}")
        checks.require(not checks.given_as_flag("data_dir"), "data_dir",
                 "only used for cifar10 (ImageNet is read from --imagenet_dir)")
        return
    for key in ("imagenet_dir", "image_size"):
        checks.require(not checks.given_as_flag(key), key, "only used with --dataset imagenet")
    # The default ./data may be missing: CIFAR-10 is downloaded there. A directory given
    # explicitly must exist (a typo must not trigger a download into a new folder) and must
    # not be one of the common wrong places (a split folder, an archive, ...). The default is
    # checked when the data is read (data.cifar.load_cifar10).
    if os.path.normpath(c.data_dir) != DEFAULT_DATA_DIR:
        problem = data_dir_problem(c.data_dir)
        checks.require(problem is None, "data_dir", problem)


# -- entry -----------------------------------------------------------------------------
def parse(setting, argv=None):
    """(Config, RunOptions) from command-line arguments; ConfigError on any mistake."""
    args = build_parser(setting).parse_args(argv)
    options = RunOptions(resume=args.resume, overwrite=args.overwrite, eval_only=args.eval_only,
                         checkpoint=args.checkpoint)
    for flag in ("resume", "checkpoint", "config"):
        if getattr(args, flag) == "":
            raise ConfigError(f"--{flag}: the path is empty")
    if options.checkpoint and args.init_from:
        raise ConfigError("--init_from: not used with --checkpoint (the checkpoint holds the weights)")
    if options.checkpoint and not options.eval_only:
        raise ConfigError("--checkpoint: only used with --eval_only (to continue training use --resume PATH)")
    if options.eval_only and options.resume:
        raise ConfigError("--resume: cannot be combined with --eval_only")
    if options.resume and options.overwrite:
        raise ConfigError("--overwrite: cannot be combined with --resume")
    if options.checkpoint and options.overwrite:
        raise ConfigError("--overwrite: cannot be combined with --eval_only --checkpoint (evaluation adds rows to the "
                          "run's metrics and replaces nothing)")
    if not (options.resume or options.checkpoint):
        config = _resolved(merge(setting, args), options)
        # --eval_only without a checkpoint: the network of the flags from --init_from's weights.
        if options.eval_only and not config.init_from:
            raise ConfigError("--eval_only: needs --checkpoint PATH (the trained model to evaluate) or --init_from "
                              "FILE (a converted network's weights)")
        return config, options
    # Resuming or evaluating: the checkpoint's config is the base, flags may change only
    # where and how to run (and, for evaluation, the grid).
    path = options.checkpoint if options.eval_only else options.resume
    if path == "last":
        config = _resolved(merge(setting, args), options)
        path = options.resume = run_dir.last_checkpoint(config.save_dir)
    base = run_dir.checkpoint_config(path, setting, training=not options.eval_only)
    action = "evaluating a checkpoint" if options.eval_only else "resuming"
    if args.config:
        raise ConfigError(f"--config: not used when {action} (the checkpoint's config is)")
    if args.method and args.method != base.get("method"):
        raise ConfigError(f"--method: cannot be changed when {action} (the checkpoint holds a "
                          f"{base.get('method')} model, not {args.method})")
    config, sources = merge(setting, args, base=base, base_source=path)
    _refuse_changes(base, config, sources, options.eval_only)
    if options.eval_only and args.save_dir is None:
        config.save_dir = None  # evaluation results go next to the checkpoint
    config = _resolved((config, sources), options)
    if options.eval_only:
        run_dir.check_own_model(config.save_dir, path, config.run_id)
    return config, options


def run_config(setting, argv=None):
    """The validated Config of a script's command line, without running it (what a training loop
    of one's own trains with, engine/api.py)."""
    return parse(setting, argv)[0]


def _resolved(merged, options):
    """The merged config validated, with its run directory located."""
    config, sources = merged
    validate(config, sources)
    run_dir.locate(config, options, sources.get("save_dir"))
    return config


def _refuse_changes(base, config, sources, eval_only):
    """The resolved config may differ from the checkpoint's only where and how to run (and,
    for an evaluation, in batch size, test subset and grid): anything else would change
    the run. Flags repeating the checkpoint's values are fine."""
    cls = METHODS[config.setting][config.method]
    allowed = set(RUNTIME_KEYS)
    if eval_only:
        allowed |= {"batch_size", "test_subset"} | set(cls.evaluation_keys())
    base = dict(base)
    cls.upgrade(base, {key: key for key in base})
    for key, value in config.to_dict().items():
        # A key the checkpoint lacks (written before the key existed) takes its default.
        if key in allowed or key not in base or base[key] == value:
            continue
        flag = sources.get(key, f"--{key}")
        action = "evaluating a checkpoint" if eval_only else "resuming"
        raise ConfigError(f"{flag}: cannot be changed when {action} (the checkpoint's {key} is {base[key]}, "
                          f"not {value})")


def main(setting, argv=None):
    """Entry point of the three scripts: parse, then train or evaluate."""
    config = None
    try:
        config, options = parse(setting, argv)
        from engine.train import run  # torch, once the command is known to be right
        status = run(config, options)
    except UserError as error:
        _exit_with_error(setting, one_line(error), error.exit_code)
    except OSError as error:
        # A read or write the checks above could not foresee (a disk filling up while the
        # metrics are written, a directory that became read-only, ...).
        where = f"{error.filename}: " if error.filename else ""
        _exit_with_error(setting, f"{where}{error.strerror or one_line(error)}", 1)
    except (MemoryError, RuntimeError) as error:
        if _device_out_of_memory(error):
            _exit_with_error(setting, f"out of memory on the device ({one_line(error)[:200]}); try a smaller "
                                      f"--batch_size", 1)
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


def _device_out_of_memory(error):
    """torch.cuda.OutOfMemoryError (torch.OutOfMemoryError from torch 2.5 on); torch raises it
    only once imported."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


def _exit_with_error(setting, message, status):
    print(f"{SETTINGS[setting].script}: error: {message}", file=sys.stderr)
    sys.exit(status)
