"""Layers that carry the compression.

Every layer reads the current compression level from its own attributes, which only
`set_level` (below) writes, from a `Level`:

* `alpha`         position on the line for layers with two endpoints (LCS+L):
                  theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1
* `width_factor`  structured sparsity: slimmable convs keep the leading channels
* `topk`          unstructured sparsity: per-layer magnitude TopK fraction kept
* `num_bits`      quantization: bit width of weights and activations
* `act_quant`     quantization, training only: activation quantization has started

Endpoint 0 is the usual `weight`/`bias`, endpoint 1 is `weight1`/`bias1`.
"""

from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.quant import fake_quantize, fake_quantize_tensor

NORM_KINDS = ("BN", "IN", "GN")


def interpolate(p0, p1, alpha):
    """theta(alpha) = (1 - alpha) * p0 + alpha * p1; p1 None means a single point."""
    if p1 is None:
        return p0
    return (1.0 - alpha) * p0 + alpha * p1


def topk_mask(weight, topk_fraction):
    """0/1 mask keeping the numel - floor((1 - k) * numel) largest-magnitude entries.

    The floor is Python's int() of the float product, as in the original; ties are broken
    by position (a stable sort prunes the earlier of two equal magnitudes first).
    """
    numel = weight.numel()
    num_pruned = int((1 - topk_fraction) * numel)
    if num_pruned <= 0:
        return torch.ones_like(weight)
    magnitude = weight.detach().abs().flatten()
    if magnitude.is_cuda:  # one sort, no host synchronisation
        mask = torch.ones(numel, dtype=weight.dtype, device=weight.device)
        mask[magnitude.argsort(stable=True)[:num_pruned]] = 0
        return mask.view_as(weight)
    # On the CPU a selection prunes the same entries as the stable sort, much faster (20M
    # weights, one thread: 0.2 s against 4.9 s for the sort): every magnitude up to the
    # num_pruned-th smallest, less the latest of the entries equal to it beyond those needed.
    threshold = kth_smallest(magnitude, num_pruned)
    pruned = magnitude <= threshold
    surplus = int(pruned.sum()) - num_pruned
    if surplus > 0:
        ties = (magnitude == threshold).nonzero().flatten()
        pruned[ties[len(ties) - surplus:]] = False
    return (~pruned).to(weight.dtype).view_as(weight)


def kth_smallest(values, k):
    """The k-th smallest (1-based) of a flat CPU tensor: NumPy's introselect, about 3x faster
    than torch.kthvalue here (20M values: 0.2 s against 0.6 s); the same value."""
    if values.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.partition(values.numpy(), k - 1)[k - 1:k])[0]
    return values.kthvalue(k).values


def level_layers(model):
    """The layers of `model` that read levels, found once and kept on the model (a network's
    layers do not change once it is built; a compressed network is a new model)."""
    layers = model.__dict__.get("_level_layers")
    if layers is None:
        layers = tuple(module for module in model.modules() if getattr(module, "level_attrs", ()))
        model.__dict__["_level_layers"] = layers
    return layers


class Level(NamedTuple):
    """A compression level as the layers read it; fields left None are not changed.

    A typed value rather than a free-form dict: a misspelt field is a TypeError, not a
    setting silently ignored."""

    alpha: Optional[float] = None         # position on the line (LCS+L only)
    width_factor: Optional[float] = None  # structured sparsity
    topk: Optional[float] = None          # unstructured sparsity
    num_bits: Optional[int] = None        # quantization, every quantized layer
    act_quant: Optional[bool] = None      # quantization: activations quantized (after the warmup)
    layer_bits: Optional[tuple] = None    # quantization: one bit width per quantized layer (LCS+P)

    def items(self):
        """(field, value) of the fields that are set."""
        return [(name, value) for name, value in zip(self._fields, self) if value is not None]


def set_level(model: nn.Module, level: Optional[Level] = None, **fields) -> None:
    """Set a compression level (a Level, or its fields as keywords) on every layer that reads it.

    Runs before every forward pass, so it walks the cached layer list and writes the plain
    attributes straight into their __dict__ (nn.Module.__setattr__ is ten times slower)."""
    if level is None:
        level = Level(**fields)
    values = dict(level.items())
    layer_bits = values.pop("layer_bits", None)
    for layer in level_layers(model):
        attributes = layer.__dict__
        for name in layer.level_attrs:
            if name in values:
                attributes[name] = values[name]
    if layer_bits is not None:
        set_layer_bits(model, layer_bits)


def quant_layers(model):
    return [m for m in model.modules() if isinstance(m, QuantMixin)]


def set_layer_bits(model, bits_per_layer):
    """Give each quantized layer (in module order) its own bit width (LCS+P quantized)."""
    layers = quant_layers(model)
    assert len(layers) == len(bits_per_layer), "one bit width per quantized layer"
    for layer, bits in zip(layers, bits_per_layer):
        layer.num_bits = int(bits)


class LineMixin:
    """Adds endpoint-1 copies of `weight` (and `bias`) to a layer when it lies on a line."""

    def _add_endpoint1(self):
        self.weight1 = nn.Parameter(torch.empty_like(self.weight))
        if getattr(self, "bias", None) is not None:
            self.bias1 = nn.Parameter(torch.empty_like(self.bias))
        else:
            self.bias1 = None

    @property
    def on_line(self):
        return getattr(self, "weight1", None) is not None

    def line_weight(self):
        return interpolate(self.weight, getattr(self, "weight1", None), self.alpha)

    def line_bias(self):
        if self.bias is None:
            return None
        return interpolate(self.bias, getattr(self, "bias1", None), self.alpha)


class ConvOp:
    """The convolution of a conv layer with a given weight and bias: the layers below differ in
    the weight they compute, not in how they apply it (groups and dilation as nn.Conv2d's)."""

    channel_dim = 1

    def apply_weight(self, x, weight, bias=None, groups=None):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups or self.groups)


class LinearOp:
    """As ConvOp for the fully connected twins (converted networks' nn.Linear layers)."""

    channel_dim = -1

    def apply_weight(self, x, weight, bias=None, groups=None):
        return F.linear(x, weight, bias)


class DenseMixin:
    """A dense layer, optionally on a line: its weight (and bias) at alpha."""

    level_attrs = ("alpha",)

    def _init_dense(self, line):
        self.alpha = 1.0
        if line:
            self._add_endpoint1()

    def effective_weight(self):
        return self.line_weight()

    def forward(self, x):
        return self.apply_weight(x, self.effective_weight(), self.line_bias())


class Conv2d(DenseMixin, LineMixin, ConvOp, nn.Conv2d):
    """Dense conv (bias only where a converted network's conv has one); optionally on a line
    (stem/classifier of LCS+L)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, line=False,
                 groups=1, dilation=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias)
        self._init_dense(line)


class Linear(DenseMixin, LineMixin, LinearOp, nn.Linear):
    """Dense fully connected layer; optionally on a line (a converted network's classifier)."""

    def __init__(self, in_features, out_features, bias=True, line=False):
        super().__init__(in_features, out_features, bias=bias)
        self._init_dense(line)


class PickMixin:
    """A dense layer that reads some of its input's channels: `pick` (a buffer of indexes into the
    input's channel dim) selects them first. LEC's slimming of a converted network uses it where a
    norm zeroed channels that other readers of the same tensor still see (network slimming's
    channel selection, placed at the one layer that reads the zeros)."""

    def _init_pick(self, picks):
        self.register_buffer("pick", torch.zeros(picks, dtype=torch.long))

    def forward(self, x):
        return super().forward(x.index_select(self.channel_dim, self.pick))


class PickedConv2d(PickMixin, Conv2d):
    def __init__(self, picks, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_pick(picks)


class PickedLinear(PickMixin, Linear):
    def __init__(self, picks, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_pick(picks)


class SlimMixin:
    """Slimmable layer (SPEC 3.4): the leading max(1, round(C_out * w)) output channels.

    Input channels follow the incoming tensor, except for the stem (`role="first"`, fixed
    3 inputs); the classifier (`role="last"`) keeps all its outputs. A depthwise conv
    (groups == in == out channels, converted networks) keeps as many groups as channels.
    """

    level_attrs = ("width_factor",)

    def _init_slim(self, role):
        assert role in ("first", "body", "last"), role
        self.role = role
        self.width_factor = 1.0

    @property
    def full_out(self):
        return self.out_channels if isinstance(self, nn.Conv2d) else self.out_features

    @property
    def full_in(self):
        return self.in_channels if isinstance(self, nn.Conv2d) else self.in_features

    def active_channels(self, in_channels):
        """(C_in, C_out) used for an input with `in_channels` channels at this width."""
        c_in = self.full_in if self.role == "first" else in_channels
        return c_in, self.out_channels_at(self.width_factor)

    def out_channels_at(self, width_factor: float) -> int:
        """C_out at `width_factor` (the classifier keeps all its outputs)."""
        if self.role == "last":
            return self.full_out
        return max(1, int(round(self.full_out * width_factor)))

    def forward(self, x):
        c_in, c_out = self.active_channels(x.shape[self.channel_dim])
        bias = None if self.bias is None else self.bias[:c_out]
        if getattr(self, "depthwise", False):
            assert c_in == c_out, f"depthwise conv sees {c_in} channels at {c_out} outputs"
            return self.apply_weight(x, self.weight[:c_out], bias, groups=c_out)
        return self.apply_weight(x, self.weight[:c_out, :c_in], bias)


class SlimConv2d(SlimMixin, ConvOp, nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, role="body",
                 groups=1, dilation=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias)
        self._init_slim(role)
        self.depthwise = groups > 1
        assert groups == 1 or groups == in_channels == out_channels, "slimmable convs: dense or depthwise"


class SlimLinear(SlimMixin, LinearOp, nn.Linear):
    def __init__(self, in_features, out_features, bias=True, role="body"):
        super().__init__(in_features, out_features, bias=bias)
        self._init_slim(role)


class TopKMixin:
    """Weight (theta(alpha) on a line) masked to its per-layer TopK (SPEC 3.3); the bias stays dense."""

    level_attrs = ("alpha", "topk")

    def _init_topk(self, line):
        self.alpha = 1.0
        self.topk = 1.0
        if line:
            self._add_endpoint1()

    def mask(self):
        return topk_mask(self.line_weight(), self.topk)

    def effective_weight(self):
        if not self.training:
            return self._cached_eval_weight()
        weight = self.line_weight()
        if self.topk >= 1.0:
            return weight
        # The mask is a constant: gradients reach only the kept entries.
        return weight * topk_mask(weight, self.topk)

    def _cached_eval_weight(self):
        """In evaluation the masked weight is computed once per level (the sort is costly);
        the key includes the parameters' versions, so an optimiser step invalidates it."""
        weights = [self.weight] + ([self.weight1] if self.on_line else [])
        key = (self.alpha, self.topk, tuple((w.data_ptr(), w._version) for w in weights))
        cached = getattr(self, "_eval_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                weight = self.line_weight()
                if self.topk < 1.0:
                    weight = weight * topk_mask(weight, self.topk)
            self._eval_cache = (key, weight)
        return self._eval_cache[1]

    def forward(self, x):
        return self.apply_weight(x, self.effective_weight(), self.line_bias())


class TopKConv2d(TopKMixin, LineMixin, ConvOp, nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, line=False,
                 groups=1, dilation=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias)
        self._init_topk(line)


class TopKLinear(TopKMixin, LineMixin, LinearOp, nn.Linear):
    def __init__(self, in_features, out_features, bias=True, line=False):
        super().__init__(in_features, out_features, bias=bias)
        self._init_topk(line)


class QuantMixin:
    """Fake-quantized weights and inputs (SPEC 3.6), optionally followed by the layer's own norm
    (the original's ConvBn2d).

    Weights are quantized at every forward (for a BN norm, after folding its scale
    gamma / sqrt(running_var + eps) into them, as PyTorch's QAT ConvBn does). Inputs are
    quantized with an EMA range once activation quantization has started (`act_quant`,
    set by the training method after the warmup iterations). In evaluation the inputs are
    quantized only if a range has been recorded (`act_range_ready`); before that they pass
    unquantized (the original quantized them with a [0, 0] range, i.e. to zeros).
    """

    level_attrs = ("alpha", "num_bits", "act_quant")
    ema_momentum = 0.1

    def _init_quant(self, norm, line, num_bits):
        self.norm = norm
        self.alpha = 1.0
        self.num_bits = num_bits
        self.act_quant = False
        self.register_buffer("act_min", torch.zeros(()))
        self.register_buffer("act_max", torch.zeros(()))
        self.register_buffer("act_range_ready", torch.zeros((), dtype=torch.bool))
        if line:
            self._add_endpoint1()

    @property
    def folds_bn(self):
        return isinstance(self.norm, Norm2d) and self.norm.kind == "BN"

    def fold_scale(self):
        """Per-output-channel scale folded into the weight (1 for IN/GN)."""
        if not self.folds_bn:
            return None
        gamma, _ = self.norm.affine()
        return gamma / torch.sqrt(self.norm.running_var + self.norm.eps)

    def _update_range(self, x):
        # The first active batch copies its range, later ones move the EMA. torch.where
        # keeps this free of host synchronisation on GPUs.
        with torch.no_grad():
            batch_min, batch_max = torch.aminmax(x.detach())
            batch_min = torch.clamp(batch_min.float(), max=0.0)
            batch_max = torch.clamp(batch_max.float(), min=0.0)
            ready = self.act_range_ready
            self.act_min.copy_(torch.where(ready, self.act_min.lerp(batch_min, self.ema_momentum), batch_min))
            self.act_max.copy_(torch.where(ready, self.act_max.lerp(batch_max, self.ema_momentum), batch_max))
            self.act_range_ready.fill_(True)

    def quantize_input(self, x):
        if self.training:
            if not self.act_quant:
                return x
            self._update_range(x)
        elif not bool(self.act_range_ready):
            return x
        return fake_quantize(x, self.act_min, self.act_max, self.num_bits)

    def folded_weight(self):
        """The weight at alpha with the fold scale applied, and the scale (None without BN):
        the tensor that is fake-quantized (export stores its integer codes)."""
        scale = self.fold_scale()
        weight = self.line_weight()
        if scale is not None:
            weight = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
        return weight, scale

    def quantized_weight(self):
        """The fake-quantized (scale-folded) weight and the fold scale (None without BN)."""
        weight, scale = self.folded_weight()
        return fake_quantize_tensor(weight, self.num_bits), scale

    def forward(self, x):
        x = self.quantize_input(x)
        weight, scale = self.quantized_weight()
        out = self.apply_weight(x, weight.to(x.dtype))
        channels = (1, -1, 1, 1) if self.channel_dim == 1 else (1, -1)
        if scale is not None:
            out = out / scale.reshape(channels).to(out.dtype)
        bias = self.line_bias()
        if bias is not None:  # the float bias after the scale (a conv with bias, then its norm)
            out = out + bias.reshape(channels).to(out.dtype)
        return self.norm(out) if self.norm is not None else out


class QuantConv2d(QuantMixin, LineMixin, ConvOp, nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 norm=None, line=False, num_bits=8, groups=1, dilation=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias)
        self._init_quant(norm, line, num_bits)


class QuantLinear(QuantMixin, LineMixin, LinearOp, nn.Linear):
    """A converted network's fully connected body layer, quantized as the convs (no norm inside)."""

    def __init__(self, in_features, out_features, bias=True, line=False, num_bits=8):
        super().__init__(in_features, out_features, bias=bias)
        self._init_quant(None, line, num_bits)


class FrozenQuantConv2d(QuantConv2d):
    """The quantized conv of an exported model, fixed at one bit width: `weight` already holds
    the fake-quantized, scale-folded values (decoded from the exported integer codes), so it is
    used as is; inputs are fake-quantized with the recorded range as in QuantConv2d."""

    level_attrs = ()

    def quantized_weight(self):
        return self.weight, self.fold_scale()


class FrozenQuantLinear(QuantLinear):
    """FrozenQuantConv2d's twin for a converted network's quantized linear layers."""

    level_attrs = ()

    def quantized_weight(self):
        return self.weight, None


class Norm2d(LineMixin, nn.Module):
    """BatchNorm / InstanceNorm / GroupNorm, optionally on a line and/or slimmable.

    * On a line, gamma and beta are interpolated; BN running statistics are one buffer
      shared by every alpha.
    * Slimmable (structured sparsity), gamma, beta and running statistics are sliced to the
      leading C channels of the input; BN's running statistics are updated in place on that
      slice by every width (SPEC 3.4).
    * IN always uses instance statistics (affine, no running statistics).
    * GN uses min(C, num_groups) groups.
    * BN with `momentum = None` keeps a cumulative average of the batch statistics, as
      nn.BatchNorm2d does (used to re-estimate them, see models/bn_calibration.py).
    """

    level_attrs = ("alpha",)

    def __init__(self, kind, num_features, line=False, slim=False, num_groups=32,
                 eps=1e-5, momentum=0.1):
        super().__init__()
        assert kind in NORM_KINDS, kind
        assert not (slim and kind == "GN"), "slimmable GroupNorm is not supported"
        self.kind = kind
        self.num_features = num_features
        self.slim = slim
        self.eps = eps
        self.momentum = momentum
        self.num_groups = min(num_features, num_groups) if kind == "GN" else None
        self.alpha = 1.0
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        if kind == "BN":
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            # A plain count, not a buffer: it matters only while momentum is None, and
            # checkpoints stay as they were.
            self.num_batches_tracked = 0
        if line:
            self._add_endpoint1()
            nn.init.ones_(self.weight1)
            nn.init.zeros_(self.bias1)

    def affine(self):
        return self.line_weight(), self.line_bias()

    def reset_running_stats(self):
        """As nn.BatchNorm2d: mean 0, variance 1, no batches counted."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked = 0

    def _momentum(self):
        if self.momentum is not None:
            return self.momentum
        if not self.training:
            return 0.0  # unused: evaluation reads the running statistics
        self.num_batches_tracked += 1
        return 1.0 / self.num_batches_tracked

    def forward(self, x):
        gamma, beta = self.affine()
        channels = x.shape[1]
        if self.kind == "BN":
            running_mean, running_var = self.running_mean, self.running_var
            if self.slim:
                gamma, beta = gamma[:channels], beta[:channels]
                running_mean, running_var = running_mean[:channels], running_var[:channels]
            return F.batch_norm(x, running_mean, running_var, gamma, beta,
                                self.training, self._momentum(), self.eps)
        if self.slim:
            gamma, beta = gamma[:channels], beta[:channels]
        if self.kind == "IN":
            return F.instance_norm(x, weight=gamma, bias=beta, eps=self.eps)
        return F.group_norm(x, self.num_groups, gamma, beta, self.eps)

    def extra_repr(self):
        return (f"{self.kind}, {self.num_features}, line={self.on_line}, slim={self.slim}"
                + (f", groups={self.num_groups}" if self.kind == "GN" else ""))


class NoOp(nn.Module):
    """Placeholder where the norm lives inside the quantized conv."""

    def forward(self, x):
        return x


class ChannelSelection(nn.Module):
    """Network-slimming channel selection: keeps the channels whose index is non-zero.

    The indexes are a frozen parameter (they count in the parameter total, as in the
    original, but never train). Only slimmed LEC models have an index that is not all ones;
    `active` is set on those, so full models skip the selection entirely.
    """

    def __init__(self, num_channels, active=False):
        super().__init__()
        self.indexes = nn.Parameter(torch.ones(num_channels), requires_grad=False)
        self.active = active

    def forward(self, x):
        if not self.active:
            return x
        return x.index_select(1, self.indexes.nonzero().flatten())
