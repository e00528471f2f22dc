"""Training and test data as streams of device batches.

Two pipelines with the same sample order and the same augmentation distribution:

* tensor:     CIFAR-10 held as one uint8 tensor on the training device; crops, flips and
              normalisation done there per batch (no per-image Python work).
* dataloader: a torch DataLoader with PIL transforms in worker processes (the original's
              pipeline; the only one for ImageNet).

Every epoch's order comes from torch's DistributedSampler (seed, epoch; one shard per
process under torchrun) and every augmentation draw from (seed, epoch, rank / image), so a
run resumed mid-epoch sees exactly the batches the uninterrupted run would have seen.

Those streams live in data/streams.py and import torch; the package imports them on first use
of one of their names (`from data import build_data`), so that data.layout, which the command
line reads to check --data_dir, costs no torch import.
"""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module("data.streams"), name)
