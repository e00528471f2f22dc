"""The weights of a training-time model at its current level, as the export formats store them."""

import torch

from models.layers import ChannelSelection, LineMixin, QuantMixin

ACT_BUFFERS = ("act_min", "act_max", "act_range_ready")


@torch.no_grad()
def effective_state(model: torch.nn.Module) -> dict:
    """The state of a model at its current level: line layers resolved at alpha (no endpoint-1
    entries), TopK convs masked, everything else as stored."""
    state = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        local = dict(module.named_parameters(recurse=False))
        local.update(module.named_buffers(recurse=False))
        if hasattr(module, "effective_weight"):
            local["weight"] = module.effective_weight()
            if isinstance(module, LineMixin) and local.get("bias") is not None:
                local["bias"] = module.line_bias()  # a converted network's conv or linear bias
        elif isinstance(module, LineMixin) and "weight" in local:
            local["weight"], local["bias"] = module.line_weight(), module.line_bias()
        for key, value in local.items():
            if key not in ("weight1", "bias1") and value is not None:
                state[prefix + key] = value.detach()
    return state


def implied_keys(model: torch.nn.Module) -> set:
    """State entries the constructor sets and an export leaves out: the all-ones indexes of
    inactive channel selections and the activation buffers of quantized convs (their ranges
    travel separately)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, ChannelSelection) and not module.active:
            keys.add(f"{name}.indexes")
        elif isinstance(module, QuantMixin):
            keys.update(f"{name}.{buffer}" for buffer in ACT_BUFFERS)
    return keys
