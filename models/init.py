"""Initialisation of SPEC 3.1, and builds that skip it."""

import contextlib
import math

import torch
import torch.nn as nn

from models.layers import Norm2d


def kaiming_init(model):
    """Kaiming-normal (fan-in, ReLU gain) for every conv endpoint; gamma = 1, beta = 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if getattr(module, "weight1", None) is not None:
                nn.init.kaiming_normal_(module.weight1, mode="fan_in", nonlinearity="relu")
        elif isinstance(module, Norm2d):
            for name in ("weight", "weight1"):
                if getattr(module, name, None) is not None:
                    nn.init.ones_(getattr(module, name))
            for name in ("bias", "bias1"):
                if getattr(module, name, None) is not None:
                    nn.init.zeros_(getattr(module, name))


def redraw_endpoint1(model, skip=(), classifier_std=None, classifier=None):
    """Network-slimming style endpoint-1 init (cPreResNet, VGG): conv weight1 ~ N(0, 2/(k*k*C_out)),
    norm gamma1 = 0.5, beta1 = 0. Endpoint 0 keeps its Kaiming init and gamma = 1."""
    for module in model.modules():
        if module in skip:
            continue
        if isinstance(module, nn.Conv2d) and getattr(module, "weight1", None) is not None:
            if module is classifier and classifier_std is not None:
                nn.init.normal_(module.weight1, 0.0, classifier_std)
                continue
            kh, kw = module.kernel_size
            nn.init.normal_(module.weight1, 0.0, math.sqrt(2.0 / (kh * kw * module.out_channels)))
        elif isinstance(module, Norm2d) and getattr(module, "weight1", None) is not None:
            nn.init.constant_(module.weight1, 0.5)
            nn.init.zeros_(module.bias1)


RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                "xavier_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def random_init_skipped():
    """Layers built inside get zeros instead of random draws, and the global random state is left
    as it was: for a network whose every weight is loaded right after (an export, a checkpoint
    read back) or whose weights are never used (the topology check's throwaway build). The
    draws, then overwritten, cost most of such a build for a torchvision network (its own init,
    then the converted layers'; VGG11's classifier: 120M draws); zeros cost a memset. Constant
    inits (ones, zeros) still run: buffers a load may leave out keep their constructor's values."""
    saved = {name: getattr(nn.init, name) for name in RANDOM_INITS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, _zeroed)
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


@torch.no_grad()
def _zeroed(tensor, *args, **kwargs):
    return tensor.zero_()
