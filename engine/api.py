"""The pieces the training loop uses, for a loop of your own (plain PyTorch, Lightning, a trainer).

    config = training_params.run_config("unstructured_sparsity", ["--model", "torchvision.mobilenet_v2"])
    lcs = Compressible(config, num_classes=10, num_train=50_000)
    lcs.model                       # the converted network (the setting's layers, the method's norms)
    loss = lcs.backward(x, y)       # one step's levels: forward passes, losses, regulariser, backward
    lcs.learning_rate(epoch)        # the scripts' schedule, if you want it
    lcs.evaluate(0.5, batches)      # accuracy (%) at a level, in the setting's unit

The configuration is the scripts' own (`training_params.run_config`: their command-line flags
over the method's YAML config, checked the same way). The network is named as `--model` names it (one of
the three networks, `torchvision.<builder>`, `timm.<name>` or `package.module:callable`), so the
exports (`python -m deploy.export`) can rebuild it from a checkpoint. `backward` is the engine's
own step without the optimiser (engine/step.py): a loop that steps an SGD optimiser with the
config's learning rate, momentum and weight decay on the scripts' batches trains exactly what the
scripts train (tests/test_own_network.py checks it bit for bit on the CPU).
"""

from typing import Iterable

import torch

from engine.step import TrainStep
from engine.train import seed_everything
from methods import METHODS
from methods.config import Config
from methods.levels import cosine_lr
from models import build_model, model_args
from utils.distributed import Context


class Compressible:
    """A network made compressible for a setting and method, and what one training step of the
    method does with it."""

    def __init__(self, config: Config, *, num_classes: int, num_train: int, device: str = "cpu"):
        """`config`: a validated run configuration (training_params.run_config); `num_train`:
        training images per epoch (the methods' warmups are counted in steps of the config's batch
        size over them); `device`: where the model lives."""
        self.config = config
        method_class = METHODS[config.setting][config.method]
        seed_everything(self.config.seed)  # as the scripts do before building the network
        self.method = method_class(self.config, method_class.warmup_iterations_for(self.config, num_train))
        self.device = torch.device(device)
        self.model = build_model(self.config.model, self.method.layer_factory(), num_classes,
                                 init_from=self.config.init_from, **model_args(self.config)).to(self.device)
        self.method.bind(self.model)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.steps = 0  # steps taken: the method's warmups and samplers count them
        self._step = TrainStep(self.model, self.method, None, Context(device=self.device), self.config)

    def backward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One training step without the optimiser: the levels the method draws for it, a forward
        and backward pass per level (losses summed), the regulariser, the method's gradient edits.
        Returns the mean loss per pass (on the device); step your optimiser after it."""
        levels = self.method.train_levels(self.steps, self.generator)
        loss, _ = self._step.backward(levels, images.to(self.device), labels.to(self.device))
        self.steps += 1
        return loss

    def learning_rate(self, epoch: int) -> float:
        """The scripts' learning rate in `epoch` (SPEC's cosine schedule with its warmup)."""
        return cosine_lr(self.config.learning_rate, epoch, self.config.epochs)

    def set_level(self, level: float) -> None:
        """Put the model at `level` (the setting's unit: width factor, TopK fraction or bit width)
        as the method evaluates it; the level is checked against what the method can evaluate."""
        point = self.method.export_point(float(level))
        self.method.apply_levels(self.model, self.method.eval_levels(point, self.steps))

    @torch.no_grad()
    def evaluate(self, level: float, batches: Iterable) -> float:
        """Accuracy (%) at `level` on `batches` of (images, labels), in eval mode with the running
        statistics (the scripts' default for every method but LEC)."""
        was_training = self.model.training
        self.model.eval()
        self.set_level(level)
        correct = total = 0
        try:
            for images, labels in batches:
                logits = self.model(images.to(self.device))
                correct += int((logits.argmax(1) == labels.to(self.device)).sum())
                total += len(labels)
        finally:
            self.model.train(was_training)
        return 100.0 * correct / max(total, 1)
