"""The structured_sparsity setting: slimmable networks whose level is a channel width factor."""

import argparse

from methods.base import CALIBRATED, BNAtEvaluation, Flag, LevelRange, LevelUnit, Method
from methods.config import Key
from utils.errors import ConfigError, number_list


class StructuredMethod(Method):
    setting = "structured_sparsity"
    script = "train_structured.py"
    description = "Train a network whose channel width can be chosen at inference time."
    level_unit = LevelUnit("width_factor", "width factor")
    norms = ("IN", "BN")  # slimmable layers take IN or BN
    export_format = "channels"
    deploy_levels = (0.75, 0.5, 0.25)
    # New widths meet new shapes at almost every step: cuDNN's heuristics, no autotuning stall.
    cudnn_benchmark = False
    own_flags = (
        Flag("--width_factors_list", ("width_factors_list",), "comma-separated widths trained per batch",
             type=number_list(float)),
        Flag("--width_factor_limits", ("width_factor_limits",),
             "lo,hi: range of widths trained", type=number_list(float)),
        Flag("--width_factor_samples", ("width_factor_samples",),
             "widths per batch, both ends included (default 4)", type=int),
        Flag("--eval_width_factors", ("eval_param_grid",), "comma-separated width factors to evaluate",
             type=number_list(float), aliases=("--list",)),
        Flag("--bn_calibration_images", ("bn_calibration_images",),
             "before each evaluation, re-estimate the BN running statistics of the network as evaluated on this "
             "many training images (test transform, seeded subset); 0: off (default: 2048 for lec, 0 for the "
             "others; BN only)", type=int),
        # The structured setting has no warmup: accepted only to be refused with a clear message.
        Flag("--warmup_budget", ("warmup_budget",), argparse.SUPPRESS, type=float),
    )
    own_keys = {"bn_calibration_images": Key("int", 0, "training images that re-estimate BN statistics before "
                                                       "each evaluation (0: off)")}
    own_evaluation_keys = ("bn_calibration_images",)
    BN_STATISTICS = ("--bn_calibration_images", "--lec_test_batch_statistics")
    refused_flags = {"--warmup_budget": "the structured setting has no warmup (only train_unstructured.py and "
                                        "train_quantized.py take it)"}

    @classmethod
    def flag_values(cls, args, siblings, skip=()):
        """--bn_calibration_images and --lec_test_batch_statistics: one way of getting the BN
        statistics of an evaluation. A flag for one mode switches off the other when that came
        from a file or default; both given as flags is an error."""
        entries = super().flag_values(args, siblings, skip)
        images, test_batch = args.bn_calibration_images, args.lec_test_batch_statistics
        if test_batch and images:
            raise ConfigError(f"--lec_test_batch_statistics: evaluates with test-batch statistics, so it excludes "
                              f"--bn_calibration_images {images} (give 0 or leave it out)")
        if test_batch and images is None:
            entries.append(("bn_calibration_images", 0, "--lec_test_batch_statistics"))
        if images and cls.has_key("lec_test_batch_statistics"):
            entries.append(("lec_test_batch_statistics", False, "--bn_calibration_images"))
        return entries

    @classmethod
    def validate_setting(cls, config, checks):
        super().validate_setting(config, checks)
        images = config.bn_calibration_images
        checks.require(images >= 0, "bn_calibration_images",
                       f"must be 0 (off) or a number of training images, got {images}")
        checks.require(images == 0 or config.norm == "BN", "bn_calibration_images",
                       f"re-estimates BN running statistics, but --norm {config.norm} keeps none (only BN does); "
                       f"use 0")
        checks.require(not (config.get("lec_test_batch_statistics") and images), "lec_test_batch_statistics",
                       f"evaluates with test-batch statistics, so it excludes bn_calibration_images {images} "
                       f"(set it to 0)")

    @classmethod
    def bn_at_evaluation(cls, config):
        """Re-estimated on bn_calibration_images training images when it is set (BN only)."""
        images = config.bn_calibration_images
        return BNAtEvaluation(CALIBRATED, images) if images else BNAtEvaluation()

    def layer_factory(self):
        from models.factory import LayerFactory
        return LayerFactory(norm_kind=self.config.norm, body="slim")

    @classmethod
    def level_range(cls, config):
        return LevelRange(0, 1, "width factors", low_open=True)

    def eval_levels(self, point, step):
        from models.layers import Level
        return Level(width_factor=point.level)

    def compression_metrics(self, model, input_size):
        return structured_metrics(model, input_size)


def structured_metrics(model, input_size):
    """SPEC 3.4: params = sum over convs of max(1, round(numel * C_in/C_in_max * C_out/C_out_max));
    sparsity = 1 - params / all conv weights. Norm parameters are not counted."""
    from models import conv_macs, profile_convs

    records = profile_convs(model, input_size)
    total = sum(r["full_numel"] for r in records.values())
    params = sum(max(1, round(r["full_numel"] * r["c_in"] / r["c_in_max"] * r["c_out"] / r["c_out_max"]))
                 for r in records.values())
    return {"sparsity": 1 - params / total, "conv_params": params, "macs": conv_macs(records)}


# Forward passes per step: more is a typo, not a recipe.
MAX_SAMPLES = 64


class WidthRange:
    """Methods that train a range of widths [lo, hi] with the sandwich rule (lcs_l, lcs_p, us):
    they evaluate and export only widths inside the trained range."""

    own_keys = {
        "width_factor_limits": Key("floats?", [0.25, 1.0], "[low, high] width factors"),
        "width_factor_samples": Key("int?", 4, "widths per batch (sandwich)"),
    }

    @classmethod
    def level_range(cls, config):
        low, high = config.width_factor_limits
        return LevelRange(low, high, "width factors", note="the trained width_factor_limits")

    @classmethod
    def validate_setting(cls, config, checks):
        super().validate_setting(config, checks)
        limits = config.width_factor_limits
        checks.require(isinstance(limits, list) and len(limits) == 2, "width_factor_limits",
                       f"expected two width factors lo,hi, got {limits}")
        low, high = limits
        checks.require(0 < low < high <= 1, "width_factor_limits", f"must satisfy 0 < lo < hi <= 1, got {low},{high}")
        minimum = cls.min_samples_for(config)
        checks.require(config.width_factor_samples >= minimum, "width_factor_samples",
                       f"must be at least {minimum} (the sandwich rule trains both ends), got "
                       f"{config.width_factor_samples}")
        checks.require(config.width_factor_samples <= MAX_SAMPLES, "width_factor_samples",
                       f"must be at most {MAX_SAMPLES}, got {config.width_factor_samples}")

    @classmethod
    def min_samples_for(cls, config):
        return 2  # the sandwich rule trains both ends
