"""What every training method provides, and what each setting adds.

A method is a small strategy object: which layers the network is built from, which levels
to run in each training step, which regulariser to add, which grid to evaluate and what to
report about a level. The training loop is written against this interface only.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from models import conv_macs, profile_convs
from models.factory import LayerFactory
from models.layers import TopKConv2d, quant_layers, set_level
from methods.levels import cosine_squared


@dataclass(frozen=True)
class EvalPoint:
    """One point of the evaluation grid: the level in its own unit, and alpha for LCS+L."""

    level: float
    alpha: float = None


class Method:
    setting = None
    name = None
    level_name = None
    # Config keys this method reads (beyond the common ones), and their defaults.
    config_keys = ()
    defaults = {}
    grid_key = "eval_param_grid"

    def __init__(self, config, warmup_iterations=None):
        self.config = config
        self.warmup_iterations = warmup_iterations

    # -- building ---------------------------------------------------------------------
    def layer_factory(self):
        raise NotImplementedError

    def bind(self, model):
        """Called once with the built model (before training or evaluation)."""

    # -- training ---------------------------------------------------------------------
    def train_levels(self, step, generator):
        """The levels of the forward passes of one training step (one dict per forward)."""
        raise NotImplementedError

    def apply_levels(self, model, levels):
        set_level(model, **levels)

    def distinct_train_levels(self):
        """How many different level settings training runs (None: a new one at almost every
        step). torch.compile builds a graph per setting, so --compile needs a small number."""
        return None

    def regularizer(self, model):
        """An extra loss term for this step, or None."""
        return None

    def after_backward(self, model):
        """Gradient edits between backward and the optimiser step."""

    # -- evaluation -------------------------------------------------------------------
    def eval_points(self):
        return [EvalPoint(level=float(v)) for v in getattr(self.config, self.grid_key)]

    def eval_levels(self, point, step):
        """set_level arguments for an evaluation point at training step `step`."""
        raise NotImplementedError

    def eval_model(self, model, point):
        """The network to evaluate at `point` and extra metrics (LEC slims it)."""
        return model, {}

    def compression_metrics(self, model, input_size):
        """Metrics of the model at its current level (sparsity, bits, MACs, ...)."""
        return {}


class StructuredMethod(Method):
    setting = "structured_sparsity"
    level_name = "width_factor"

    def layer_factory(self):
        return LayerFactory(norm_kind=self.config.norm, body="slim")

    def eval_levels(self, point, step):
        return {"width_factor": point.level}

    def compression_metrics(self, model, input_size):
        return structured_metrics(model, input_size)


def structured_metrics(model, input_size):
    """SPEC 3.4: params = sum over convs of max(1, round(numel * C_in/C_in_max * C_out/C_out_max));
    sparsity = 1 - params / all conv weights. Norm parameters are not counted."""
    records = profile_convs(model, input_size)
    total = sum(r["full_numel"] for r in records.values())
    params = sum(max(1, round(r["full_numel"] * r["c_in"] / r["c_in_max"] * r["c_out"] / r["c_out_max"]))
                 for r in records.values())
    return {"sparsity": 1 - params / total, "conv_params": params, "macs": conv_macs(records)}


class UnstructuredMethod(Method):
    setting = "unstructured_sparsity"
    level_name = "topk"
    line = False

    def layer_factory(self):
        return LayerFactory(norm_kind=self.config.norm, body="topk", num_groups=self.config.num_groups,
                            line_convs=self.line, line_norms=self.line)

    def compression_metrics(self, model, input_size):
        return unstructured_metrics(model)


@torch.no_grad()
def unstructured_metrics(model):
    """SPEC 3.3 from the masks actually applied: zeros in the TopK masks over all conv
    weights (endpoint 0 counted once; norms ignored). Also the effective TopK of the body."""
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    pruned, topk = 0, None
    for module in model.modules():
        if isinstance(module, TopKConv2d):
            mask = module.mask()
            pruned += int(mask.numel() - mask.sum().item())
            topk = module.topk
    return {"sparsity": pruned / total, "nonzero_params": total - pruned, "effective_topk": topk}


class QuantizedMethod(Method):
    setting = "quantized"
    level_name = "num_bits"
    line = False

    def layer_factory(self):
        # With BN the norms (folded into the quantized convs) are never on the line.
        return LayerFactory(norm_kind=self.config.norm, body="quant", num_groups=self.config.num_groups,
                            line_convs=self.line, line_norms=self.line and self.config.norm != "BN")

    def activation_quant(self, step):
        """Activations are quantized from the end of the warmup on (weights from step 0)."""
        return step >= self.warmup_iterations

    def eval_points(self):
        return [EvalPoint(level=int(v)) for v in self.config.eval_param_grid]

    def eval_levels(self, point, step):
        return {"num_bits": int(point.level)}

    def compression_metrics(self, model, input_size):
        layers = quant_layers(model)
        return {"num_bits": layers[0].num_bits if layers else None,
                "act_quant": all(bool(layer.act_range_ready) for layer in layers)}


class LineMethod:
    """LCS+L: two endpoints per line layer and the cos^2 penalty between them (SPEC 3.7)."""

    line = True
    # Regularise the conv weights on the line (unstructured, quantized) or the norm gammas
    # (structured, where only the norms are on the line).
    regularize_norms = False

    def regularizer(self, model):
        pairs = []
        for module in model.modules():
            if getattr(module, "weight1", None) is None:
                continue
            if isinstance(module, nn.Conv2d) or self.regularize_norms:
                pairs.append((module.weight, module.weight1))
        if not pairs:
            return None
        return self.config.beta * cosine_squared(pairs)
