"""How much of each image reaches the classifier of a freshly initialised cPreResNet20, per norm.

The network ends with norm -> ReLU -> global average pool -> classifier. InstanceNorm sets the
mean and variance of every channel of every image over its 8x8 positions, so the pooled value
of a channel, the mean of ReLU(gamma * z + beta), is nearly the same for every image; GroupNorm
does so per group of channels, BatchNorm only over the batch. This script measures it: the
standard deviation across real test images of the pooled features (relative to their mean)
and of the initial logits, in training mode, for BN, GN and IN. Why the IN and GN runs of
docs/results.md start slowly.

    python experiments/norm_signal.py --data_dir data/cifar10-jpeg [--images 500] [--seed 0]
"""

import argparse
import glob
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from data.cifar import CIFAR_MEAN, CIFAR_STD  # noqa: E402
from models import build_model  # noqa: E402
from models.factory import dense_factory  # noqa: E402


def test_images(data_dir, count):
    """`count` test images spread evenly over the class folders, normalised as for training."""
    from PIL import Image

    files = sorted(glob.glob(os.path.join(data_dir, "test", "*", "*")))
    if not files:
        sys.exit(f"norm_signal.py: error: --data_dir {data_dir}: no test/<class>/<image> files")
    files = files[::max(1, len(files) // count)][:count]
    pixels = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in files])
    images = torch.tensor(pixels).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def signal(norm, images, seed):
    torch.manual_seed(seed)
    model = build_model("cpreresnet20", dense_factory(norm), 10).train()
    pooled = {}

    def keep_input(module, inputs, output):  # returns None: the output stays the logits
        pooled["x"] = inputs[0].flatten(1)

    model.fc.register_forward_hook(keep_input)
    with torch.no_grad():
        logits = model(images)
    features = pooled["x"]
    return features.mean().item(), features.std(0).mean().item(), logits.std(0).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="data/cifar10-jpeg")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images = test_images(args.data_dir, args.images)
    print(f"{len(images)} real test images, cPreResNet20 at initialisation (seed {args.seed}), training mode")
    print("norm  pooled features: mean  std across images  ratio   initial logits: std across images")
    for norm in ("BN", "GN", "IN"):
        mean, spread, logits = signal(norm, images, args.seed)
        print(f"{norm:4}  {mean:22.4f}  {spread:17.4f}  {spread / mean:5.3f}   {logits:33.4f}")


if __name__ == "__main__":
    main()
