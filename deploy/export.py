"""Write a trained model at one level as a standalone compressed model (or its whole subspace).

    python -m deploy.export --checkpoint RUN/model_final.pt --level 0.5 --out model.pt [--round_to 8]
        [--data_dir DIR]
    python -m deploy.export --checkpoint RUN/model_final.pt --level 8 --format onnx --out model.onnx
    python -m deploy.export --checkpoint RUN/model_final.pt --subspace --out model.lcs.pt
    python -m deploy.export --checkpoint RUN/model_final.pt --subspace --format onnx --out model.lcs.onnx \
        [--levels 1.0,0.5,0.25]

The level is in the unit of the checkpoint's method; deploy/compressed.py writes and loads the
per-level export (what the file holds is described there), deploy/subspace.py the subspace
artefact, deploy/onnx_export.py the ONNX file and deploy/onnx_subspace.py the one ONNX file whose
level is an input. Every artefact is compared with the
training-time model before it is written (deploy/verify.py). An existing --out is replaced only
with --force; SIGTERM and Ctrl-C leave nothing behind (exit status 143 and 130, as training).
The command, and --level against the checkpoint's config, are checked before torch is imported
(it takes seconds): the modules that need it are imported once the command is known to be right.
"""

import contextlib
import os
import signal
import sys
import threading

from methods import METHODS, SETTINGS, config_from_dict
from utils import checkpoint as ckpt
from utils.errors import EXIT_INTERRUPTED, ConfigError, UsageParser, UserError, number_list, one_line

MAX_CHECK_IMAGES = 10_000  # the CIFAR-10 test split
DEFAULT_CHECK_IMAGES = 256
# What --out must end with, per thing written (a per-level .pt is not named like a subspace).
SUFFIXES = {"pt": ".pt", "onnx": ".onnx", "subspace": ".lcs.pt", "subspace_onnx": ".lcs.onnx"}
KIND_FLAGS = {"pt": "--format pt", "onnx": "--format onnx", "subspace": "--subspace",
              "subspace_onnx": "--subspace --format onnx"}


def describe(content, size_bytes):
    """What an export holds: its method, level and size, then its format's own lines."""
    from deploy.compressed import format_of

    lines = [f"{content['setting']}/{content['method']} {content['model_name']}: {content['level_name']} "
             f"{content['level']:g}" + (f" (alpha {content['alpha']:g})" if content["alpha"] is not None else "")
             + f", {size_bytes / 1024:.1f} KiB"]
    return "\n".join(lines + format_of(content).describe(content))


def level_units_text():
    """What --level means, from the registry: each setting's unit, then the methods with their own
    ("width factor (structured_sparsity), fraction of norm channels kept (structured_sparsity lec), ...")."""
    parts = []
    for setting, cls in SETTINGS.items():
        parts.append(f"{cls.level_unit.label} ({setting})")
        parts += [f"{method.level_unit.label} ({setting} {name})" for name, method in METHODS[setting].items()
                  if method.level_unit != cls.level_unit]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def build_parser():
    parser = UsageParser(
        prog="python -m deploy.export",
        description="Write a standalone compressed model at one level of a trained checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="model_final.pt or checkpoint_last.pt of a run")
    parser.add_argument("--level", type=float,
                        help=f"the level in the unit of the checkpoint's method: {level_units_text()}")
    parser.add_argument("--subspace", action="store_true",
                        help="write the whole trained subspace instead of one level (load it with "
                             "deploy.load_subspace and pick the level at run time)")
    parser.add_argument("--levels", type=number_list(float),
                        help="--subspace --format onnx: the levels the file holds, comma-separated, within the "
                             "trained range (default: the run's evaluation grid)")
    parser.add_argument("--out", required=True, help="file to write: *.pt (--format pt), *.onnx (--format onnx), "
                                                     "*.lcs.pt (--subspace) or *.lcs.onnx (--subspace --format onnx)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists (else refused)")
    parser.add_argument("--round_to", type=int, help="round structured widths up to a multiple of this")
    parser.add_argument("--format", default="pt", choices=("pt", "onnx"),
                        help="pt (this project's file) or onnx (checked with ONNX Runtime; needs "
                             "requirements-deploy.txt)")
    parser.add_argument("--data_dir", help="the run's data (CIFAR-10 folder or ImageNet root): its training images "
                                           "re-estimate BN statistics when the run's evaluations did (lec by "
                                           "default); onnx: its CIFAR-10 test images check the export "
                                           "(default: random images)")
    parser.add_argument("--check_images", type=int, help=f"onnx: images to check the export on (default "
                                                         f"{DEFAULT_CHECK_IMAGES})")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subspace == (args.level is not None):
        parser.error("give either --level LEVEL (one level) or --subspace (every level)")
    if args.subspace and args.round_to:
        parser.error("--subspace writes the trained widths; --round_to takes --level")
    if args.levels is not None and not (args.subspace and args.format == "onnx"):
        parser.error("--levels: chooses the levels of --subspace --format onnx; give one level with --level")
    if args.check_images is not None and args.format != "onnx":
        parser.error(f"--check_images {args.check_images}: checks ONNX exports only; give it with --format onnx "
                     f"and --level")
    try:
        with signals_raised():
            lines = export(args)
    except UserError as error:
        print(f"deploy.export: error: {one_line(error)}", file=sys.stderr)
        sys.exit(error.exit_code)
    except Interrupted as stop:
        print(f"deploy.export: interrupted by {signal.Signals(stop.signum).name}; {args.out} was not written (a "
              f"previous file there is intact)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED[stop.signum])
    print("\n".join(lines))
    print(f"wrote {args.out}")


def export(args):
    """Export, check against the training-time model, write; the lines describing what was written."""
    if args.check_images is not None and not 1 <= args.check_images <= MAX_CHECK_IMAGES:
        raise ConfigError(f"--check_images {args.check_images}: must be in 1..{MAX_CHECK_IMAGES}")
    if os.path.isdir(args.out):  # before its suffix: a directory has none to judge
        raise ConfigError(f"--out {args.out}: is a directory; give the name of the file to write")
    check_suffix(args.out, kind_of(args))
    for level in [args.level] if args.level is not None else args.levels or []:
        check_level(args.checkpoint, level, "--level" if args.level is not None else "--levels")
    from deploy.compressed import build_exported, check_output, export_at, num_classes_of, training_model
    from deploy.verify import check_levels, level_text  # torch, once the command is right
    from utils import checkpoint_schema as schema

    check_output(args.out, [args.checkpoint])  # before the work of exporting
    if os.path.exists(args.out) and not args.force:
        raise ConfigError(f"--out {args.out}: already exists; pass --force to replace it")
    payload = ckpt.load(args.checkpoint)
    if args.subspace:
        return _write_subspace(args, payload)
    schema.check_model(payload, args.checkpoint)  # tensors only, all finite
    model, method = training_model(payload, args.checkpoint)
    content = export_at(model, method, num_classes_of(payload["model"]), args.level, args.round_to,
                        data_dir=args.data_dir)
    if args.round_to:
        checked = (f"not checked against the training-time model: --round_to {args.round_to} keeps more channels "
                   f"than the model at {level_text(method, content['level'])}")
    else:
        checked = check_levels(model, method, lambda level: build_exported(content, args.out), [content["level"]],
                               args.out, args.data_dir)
    return WRITERS[args.format](args, content, checked)


def kind_of(args):
    """What is written: a key of SUFFIXES."""
    if args.subspace:
        return "subspace_onnx" if args.format == "onnx" else "subspace"
    return args.format


def check_level(path, level, flag="--level"):
    """ConfigError naming `flag` when `level` lies outside what the checkpoint's method exports,
    from its config read without torch; what cannot be read that way is left to the export,
    which checks again."""
    header = ckpt.read_header(path)
    try:
        config = config_from_dict(header["config"])
    except (TypeError, KeyError, ConfigError):  # no header, or a config the export will refuse
        return
    try:
        METHODS[config.setting][config.method].check_export_level(config, level)
    except ConfigError as error:
        raise ConfigError(str(error).replace("--level", flag, 1)) from None


def check_suffix(out, kind):
    """ConfigError naming --out unless its name ends with the suffix of what is written."""
    given = next((suffix for suffix in sorted(SUFFIXES.values(), key=len, reverse=True) if out.endswith(suffix)),
                 os.path.splitext(out)[1])
    if given != SUFFIXES[kind]:
        allowed = ", ".join(f"{suffix} ({KIND_FLAGS[name]})" for name, suffix in SUFFIXES.items())
        raise ConfigError(f"--out {out}: suffix {given or '(none)'} does not fit {KIND_FLAGS[kind]}; allowed: "
                          f"{allowed}")


def _write_subspace(args, payload):
    if args.format == "onnx":
        from deploy.onnx_subspace import export_subspace_onnx

        lines = export_subspace_onnx(payload, args.checkpoint, args.out, args.levels, args.data_dir,
                                     args.check_images or DEFAULT_CHECK_IMAGES)
        return lines + [f"{os.path.getsize(args.out) / 1024:.1f} KiB of ONNX, the level an input"]
    from deploy.compressed import training_model
    from deploy.subspace import Subspace, make_subspace, save_subspace
    from deploy.subspace import describe as describe_subspace
    from deploy.verify import check_levels

    content = make_subspace(payload, path=args.checkpoint, data_dir=args.data_dir)
    model, method = training_model(payload, args.checkpoint)
    checked = check_levels(model, method, Subspace(content, args.out).at, content["levels"], args.out,
                           args.data_dir)
    save_subspace(args.out, content)
    return [describe_subspace(content, os.path.getsize(args.out)), checked]


def _write_pt(args, content, checked):
    from deploy.compressed import save_export

    save_export(args.out, content, inputs=[args.checkpoint])
    return [describe(content, os.path.getsize(args.out)), checked]


def _write_onnx(args, content, checked):
    from deploy.onnx_export import write_checked

    lines, _ = write_checked(content, args.out, args.data_dir, args.check_images or DEFAULT_CHECK_IMAGES)
    # The .pt storage lines (bitmasks, packed codes) do not describe the ONNX file.
    summary = [line for line in describe(content, os.path.getsize(args.out)).splitlines()
               if " stored as " not in line]
    return [summary[0].replace("KiB", "KiB of ONNX", 1)] + summary[1:] + [checked] + lines


WRITERS = {"pt": _write_pt, "onnx": _write_onnx}


class Interrupted(BaseException):
    """SIGTERM or SIGINT during an export: not an Exception, so that nothing treats it as a
    failure to report; the atomic write in progress removes its temporary file."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_raised():
    """SIGTERM and SIGINT raise Interrupted while the export runs (main thread only)."""
    def stop(signum, frame):
        raise Interrupted(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, stop) for signum in EXIT_INTERRUPTED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    main()
