"""LEC (network slimming) baseline: L1 on norm gammas, global-threshold channel pruning and
physical slimming at evaluation, no fine-tuning (SPEC 3.5)."""

from methods.base import TEST_BATCH, BNAtEvaluation, Flag, LevelRange, LevelUnit
from methods.config import Key
from methods.structured import StructuredMethod


class LEC(StructuredMethod):
    name = "lec"
    # Grid values are fractions of all norm channels kept: a unit of their own, on a log axis
    # like TopK's. The original (and this project before issue 22) recorded them as `topk`.
    level_unit = LevelUnit("channel_fraction", "fraction of norm channels kept", scale="log",
                           legacy_names=("topk",))
    compiles_when = ""
    norms = ("BN",)
    export_format = "slimmed_channels"
    own_keys = {
        "bn_update_factor": Key("float?", 0.0, "LEC L1 strength on gammas"),
        # The slimmed network's BN statistics are re-estimated on training images before each
        # evaluation (the original normalised each test batch with its own statistics instead).
        "bn_calibration_images": Key("int", 2048, "training images that re-estimate BN statistics before each "
                                                  "evaluation (0: off)"),
        "lec_test_batch_statistics": Key("bool", False, "normalise each test batch with its own statistics (the "
                                                        "original's evaluation)"),
    }
    own_flags = (Flag("--lec_test_batch_statistics", ("lec_test_batch_statistics",),
                      "evaluate with each test batch's own BN statistics, as the original did (transductive; "
                      "replaces the re-estimation)", switch=True),)
    own_evaluation_keys = ("lec_test_batch_statistics",)
    refused_flags = {**StructuredMethod.refused_flags,
                     "--eval_width_factors": "lec is evaluated at fractions of norm channels kept, not at width "
                                             "factors (set eval_param_grid in a --config file)"}

    @classmethod
    def validate_setting(cls, config, checks):
        super().validate_setting(config, checks)
        from models import MODELS
        from models.slimming import LEC_PLANS  # the networks with a slimming plan by hand (imports torch)
        models = ", ".join(LEC_PLANS)
        checks.require(config.model in LEC_PLANS or config.model not in MODELS, "model",
                       f"lec runs on {models} or a converted network (docs/own_network.md), got {config.model}")
        checks.non_negative("bn_update_factor", config.bn_update_factor)

    @classmethod
    def level_range(cls, config):
        return LevelRange(0, 1, "fractions of norm channels kept", low_open=True)

    @classmethod
    def bn_at_evaluation(cls, config):
        """Each test batch's own statistics with lec_test_batch_statistics (the original's way),
        else as the setting says (re-estimated on training images by default)."""
        if config.lec_test_batch_statistics:
            return BNAtEvaluation(TEST_BATCH)
        return super().bn_at_evaluation(config)

    def layer_factory(self):
        from models.factory import LayerFactory
        return LayerFactory(norm_kind=self.config.norm, body="dense", prunes_channels=True)

    def train_levels(self, step, generator):
        from models.layers import Level
        return [Level()]

    def distinct_train_levels(self):
        return 1

    def after_backward(self, model):
        """Sub-gradient of s * sum |gamma| on every norm weight (biases untouched)."""
        import torch

        from models.layers import Norm2d
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, Norm2d) and module.weight.grad is not None:
                    module.weight.grad.add_(self.config.bn_update_factor * torch.sign(module.weight))

    def eval_levels(self, point, step):
        from models.layers import Level
        return Level()

    def eval_model(self, model, point):
        from models import count_parameters
        from models.slimming import lec_slim
        slim, info = lec_slim(model, self.config.model, self.num_classes, point.level)
        full, kept = count_parameters(model), count_parameters(slim)
        return slim, {"sparsity": 1 - kept / full, "params": kept,
                      "channel_floor_applied": bool(info["floored_layers"])}

    def bind(self, model):
        self.num_classes = model_num_classes(model)


def model_num_classes(model):
    """Outputs of the model's classifier: a converted network's (models/convert.py), else the
    last conv (the three networks end in a 1x1 conv)."""
    import torch

    if hasattr(model, "conversion"):
        classifier = model.get_submodule(model.conversion.classifier)
        return getattr(classifier, "out_features", None) or classifier.out_channels
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    return last.out_channels
