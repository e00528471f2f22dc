"""BatchNorm statistics of a network as it is evaluated (SPEC 3.5, 5).

Running statistics collected during training describe the network that was trained: a
slimmed LEC copy, or a slimmable network at a width between the ones trained, normalises
with statistics that no longer fit. `calibrate_bn` re-estimates them on calibration images,
the way torch.optim.swa_utils.update_bn does: reset every BN layer, set momentum None
(cumulative average of the batch statistics), forward in training mode without gradients,
then restore the momenta. Works for this project's `Norm2d` (kind BN) and torch's BatchNorm.
"""

import contextlib

import torch
import torch.nn as nn

from models.layers import Norm2d


def bn_layers(model):
    """The layers of `model` that keep running statistics."""
    return [module for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            or isinstance(module, Norm2d) and module.kind == "BN"]


@contextlib.contextmanager
def bn_training_mode(model, momentum):
    """Only the BN layers in training mode (normalising each batch with its own statistics),
    with `momentum`; every other layer keeps its mode, and everything is restored after."""
    layers = bn_layers(model)
    saved = [(layer, layer.training, layer.momentum) for layer in layers]
    try:
        for layer in layers:
            layer.train()
            layer.momentum = momentum
        yield layers
    finally:
        for layer, training, layer_momentum in saved:
            layer.train(training)
            layer.momentum = layer_momentum


@torch.no_grad()
def calibrate_bn(model, batches):
    """Replace the running statistics of every BN layer by the cumulative average of the batch
    statistics over `batches` (pairs of images and labels); returns the number of images.

    With equal batches, running_mean is the exact mean of each layer's inputs and running_var
    the mean of the per-batch unbiased variances (with one batch: the exact unbiased variance).
    """
    count = 0
    with bn_training_mode(model, momentum=None) as layers:
        for layer in layers:
            layer.reset_running_stats()
        for images, _ in batches:
            model(images)
            count += len(images)
    return count


@contextlib.contextmanager
def own_batch_statistics(model):
    """Evaluate as the original evaluated LEC: every BN layer normalises each batch with that
    batch's own statistics (training mode), and the running statistics are left unchanged
    (momentum 0)."""
    with bn_training_mode(model, momentum=0.0):
        yield model


@contextlib.contextmanager
def preserved_bn_statistics(model):
    """Restore the running statistics of `model` on exit (calibrating a network that is still
    being trained must not change what training continues from)."""
    layers = bn_layers(model)
    saved = [(layer.running_mean.clone(), layer.running_var.clone(), _copy(layer.num_batches_tracked))
             for layer in layers]
    try:
        yield model
    finally:
        with torch.no_grad():
            for layer, (mean, var, count) in zip(layers, saved):
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                if isinstance(count, torch.Tensor):
                    layer.num_batches_tracked.copy_(count)
                else:
                    layer.num_batches_tracked = count


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value
