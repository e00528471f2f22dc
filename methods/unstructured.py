"""The unstructured_sparsity setting: TopK convs whose level is the fraction of weights kept."""

from methods.base import Flag, LevelRange, LevelUnit, WarmupMethod
from methods.config import Key
from utils.errors import ConfigError, number_list


class UnstructuredMethod(WarmupMethod):
    setting = "unstructured_sparsity"
    script = "train_unstructured.py"
    description = "Train a network whose unstructured (TopK) sparsity can be chosen at inference time."
    # TopK grids crowd the low end (0.025 ... 0.2 of 14 points); a log axis spreads them.
    level_unit = LevelUnit("topk", "TopK fraction kept", scale="log")
    export_format = "topk"
    deploy_levels = (0.5, 0.25, 0.1, 0.05)
    line = False
    own_flags = (
        Flag("--topk", ("topk",), "target TopK fraction kept, in (0, 1] (default 0.9)", type=float),
        Flag("--topk_lower_bound", ("alpha_sampling",),
             "lowest TopK fraction trained: the sparse, efficient end (needs --eval_topk_grid)",
             type=float),
        Flag("--topk_upper_bound", ("alpha_sampling",),
             "highest TopK fraction trained: the dense, accurate end (needs --eval_topk_grid)",
             type=float),
        Flag("--warmup_budget", ("warmup_budget",),
             "percent of all iterations for the TopK warmup, in (0, 100] (default: 80)", type=float),
        Flag("--eval_topk_grid", ("eval_param_grid",), "comma-separated TopK fractions to evaluate",
             type=number_list(float)),
    )
    BOUNDS = ("--topk_lower_bound", "--topk_upper_bound")

    @classmethod
    def flag_values(cls, args, siblings, skip=()):
        """The two TopK bounds set alpha_sampling together: [lower, upper, 0.5] (SPEC 1.2)."""
        lower, upper = args.topk_lower_bound, args.topk_upper_bound
        entries = super().flag_values(args, siblings, skip=cls.BOUNDS)
        if (lower is None) != (upper is None):
            given = "--topk_lower_bound" if lower is not None else "--topk_upper_bound"
            raise ConfigError(f"{given}: give both --topk_lower_bound and --topk_upper_bound, or neither")
        if lower is None:
            return entries
        cls.check_flag_used(cls.setting_flags(siblings)["--topk_lower_bound"], siblings)
        if not 0 <= lower <= 1:
            raise ConfigError(f"--topk_lower_bound: must be in [0, 1], got {lower}")
        if not 0 <= upper <= 1:
            raise ConfigError(f"--topk_upper_bound: must be in [0, 1], got {upper}")
        if lower >= upper:
            raise ConfigError(f"--topk_lower_bound: must be below --topk_upper_bound, got {lower} >= {upper}")
        if args.eval_topk_grid is None:
            raise ConfigError("--topk_lower_bound: the TopK bounds need --eval_topk_grid (the levels to evaluate)")
        return entries + [("alpha_sampling", [lower, upper, 0.5], "--topk_lower_bound/--topk_upper_bound")]

    def layer_factory(self):
        from models.factory import LayerFactory
        return LayerFactory(norm_kind=self.config.norm, body="topk", num_groups=self.config.num_groups,
                            line_convs=self.line, line_norms=self.line)

    @classmethod
    def level_range(cls, config):
        return LevelRange(0, 1, "TopK fractions", low_open=True)

    def eval_levels(self, point, step):
        from models.layers import Level
        return Level(topk=point.level)

    def export_level(self, point):
        from models.layers import Level
        # The level itself: an export is taken after the warmup's TopK decay.
        return Level(alpha=point.alpha, topk=point.level)

    def compression_metrics(self, model, input_size):
        return unstructured_metrics(model)


def unstructured_metrics(model):
    """SPEC 3.3 from the masks actually applied: zeros in the TopK masks over all conv
    weights (endpoint 0 counted once; norms ignored), and a converted network's linear layers.
    Also the effective TopK of the body."""
    import torch
    import torch.nn as nn

    from models.layers import TopKMixin

    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    pruned, topk = 0, None
    for module in model.modules():
        if isinstance(module, TopKMixin):
            with torch.no_grad():
                mask = module.mask()
            pruned += int(mask.numel() - mask.sum().item())
            topk = module.topk
    return {"sparsity": pruned / total, "nonzero_params": total - pruned, "effective_topk": topk}


class SampledTopK:
    """LCS+L and LCS+P draw TopK fractions (or alphas) with alpha_sampling = [low, high,
    endpoint probability]."""

    own_keys = {"alpha_sampling": Key("floats?", [0.025, 1.0, 0.0], "[low, high, endpoint probability]")}

    @classmethod
    def validate_setting(cls, config, checks):
        super().validate_setting(config, checks)
        sampling = config.alpha_sampling
        checks.require(isinstance(sampling, list) and len(sampling) == 3, "alpha_sampling",
                       f"expected [low, high, endpoint probability], got {sampling}")
        low, high, probability = sampling
        checks.require(0 <= low < high <= 1, "alpha_sampling", f"needs 0 <= low < high <= 1, got {low}, {high}")
        checks.in_range("alpha_sampling", probability, 0, 1, what="the endpoint probability")
