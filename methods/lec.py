"""LEC (network slimming) baseline: L1 on norm gammas, global-threshold channel pruning and
physical slimming at evaluation, no fine-tuning (SPEC 3.5)."""

import torch

from methods.base import Method
from models import count_parameters
from models.factory import LayerFactory
from models.layers import Norm2d
from models.slimming import lec_slim


class LEC(Method):
    setting = "structured_sparsity"
    name = "lec"
    # Grid values are fractions of all norm channels kept; the original recorded them as
    # `topk`, and so do we.
    level_name = "topk"
    config_keys = ("bn_update_factor", "eval_param_grid", "lec_test_batch_statistics")
    # The slimmed network's BN statistics are re-estimated on training images before each
    # evaluation (the original normalised each test batch with its own statistics instead).
    defaults = {"bn_update_factor": 0.0, "bn_calibration_images": 2048, "lec_test_batch_statistics": False}

    def layer_factory(self):
        return LayerFactory(norm_kind=self.config.norm, body="dense")

    def train_levels(self, step, generator):
        return [{}]

    def distinct_train_levels(self):
        return 1

    @torch.no_grad()
    def after_backward(self, model):
        """Sub-gradient of s * sum |gamma| on every norm weight (biases untouched)."""
        for module in model.modules():
            if isinstance(module, Norm2d) and module.weight.grad is not None:
                module.weight.grad.add_(self.config.bn_update_factor * torch.sign(module.weight))

    def eval_levels(self, point, step):
        return {}

    def eval_model(self, model, point):
        slim, info = lec_slim(model, self.config.model, self.num_classes, point.level)
        full, kept = count_parameters(model), count_parameters(slim)
        return slim, {"sparsity": 1 - kept / full, "params": kept,
                      "channel_floor_applied": bool(info["floored_layers"])}

    def bind(self, model):
        self.num_classes = model_num_classes(model)


def model_num_classes(model):
    """Output channels of the model's last conv (its classifier)."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    return last.out_channels
