"""Write a trained model at one level as a standalone compressed model (or its whole subspace).

    python -m deploy.export --checkpoint RUN/model_final.pt --level 0.5 --out model.pt [--round_to 8]
        [--data_dir DIR]
    python -m deploy.export --checkpoint RUN/model_final.pt --level 8 --format onnx --out model.onnx
    python -m deploy.export --checkpoint RUN/model_final.pt --subspace --out model.lcs.pt

The level is in the unit of the checkpoint's method; deploy/compressed.py writes and loads the
per-level export (what the file holds is described there), deploy/subspace.py the subspace
artefact and deploy/onnx_export.py the ONNX file. The command, and --level against the
checkpoint's config, are checked before torch is imported (it takes seconds): those modules
are imported once the command is known to be right.
"""

import os
import sys

from methods import METHODS, SETTINGS, config_from_dict
from utils import checkpoint as ckpt
from utils.errors import ConfigError, UsageParser, UserError, one_line

MAX_CHECK_IMAGES = 10_000  # the CIFAR-10 test split
DEFAULT_CHECK_IMAGES = 256


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
    parser.add_argument("--out", required=True, help="file to write")
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
    if args.subspace and (args.format != "pt" or args.round_to):
        parser.error("--subspace writes a pt file of the trained widths; --format onnx and --round_to take --level")
    if args.check_images is not None and args.format != "onnx":
        parser.error(f"--check_images {args.check_images}: checks ONNX exports only; give it with --format onnx "
                     f"and --level")
    try:
        if args.check_images is not None and not 1 <= args.check_images <= MAX_CHECK_IMAGES:
            raise ConfigError(f"--check_images {args.check_images}: must be in 1..{MAX_CHECK_IMAGES}")
        if args.level is not None:
            check_level(args.checkpoint, args.level)
        from deploy.compressed import check_output, export_model  # torch, once the command is right
        from deploy.subspace import describe as describe_subspace
        from deploy.subspace import make_subspace, save_subspace

        check_output(args.out, [args.checkpoint])  # before the work of exporting
        payload = ckpt.load(args.checkpoint)
        if args.subspace:
            content = make_subspace(payload, path=args.checkpoint, data_dir=args.data_dir)
            save_subspace(args.out, content)
            lines = [describe_subspace(content, os.path.getsize(args.out))]
        else:
            content = export_model(payload, args.level, path=args.checkpoint, round_to=args.round_to,
                                   data_dir=args.data_dir)
            lines = WRITERS[args.format](args, content)
    except UserError as error:
        print(f"deploy.export: error: {one_line(error)}", file=sys.stderr)
        sys.exit(error.exit_code)
    print("\n".join(lines))
    print(f"wrote {args.out}")


def check_level(path, level):
    """ConfigError when `level` lies outside what the checkpoint's method exports, from its config
    read without torch; what cannot be read that way is left to the export, which checks again."""
    header = ckpt.read_header(path)
    try:
        config = config_from_dict(header["config"])
    except (TypeError, KeyError, ConfigError):  # no header, or a config the export will refuse
        return
    METHODS[config.setting][config.method].check_export_level(config, level)


def _write_pt(args, content):
    from deploy.compressed import save_export

    save_export(args.out, content, inputs=[args.checkpoint])
    return [describe(content, os.path.getsize(args.out))]


def _write_onnx(args, content):
    from deploy.onnx_export import write_checked

    lines, _ = write_checked(content, args.out, args.data_dir, args.check_images or DEFAULT_CHECK_IMAGES)
    # The .pt storage lines (bitmasks, packed codes) do not describe the ONNX file.
    summary = [line for line in describe(content, os.path.getsize(args.out)).splitlines()
               if " stored as " not in line]
    return [summary[0].replace("KiB", "KiB of ONNX", 1)] + summary[1:] + lines


WRITERS = {"pt": _write_pt, "onnx": _write_onnx}


if __name__ == "__main__":
    main()
