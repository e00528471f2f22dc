"""CIFAR augmentation on whole batches of uint8 images, on any device (SPEC 3.10).

Same distribution as torchvision's RandomCrop(32, padding=4) (zero padding) followed by
RandomHorizontalFlip() and Normalize: a crop offset uniform in {0..8} per axis and a flip
with probability 1/2, drawn per image.

The work is split so that the training step does as little as possible: the images are
zero-padded once, the pixel coordinates of every crop of an epoch are computed once per
epoch, and a batch is then one gather (crop and flip together) plus the normalisation,
all on the device, with no host synchronisation.
"""

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

PADDING = 4


def draw_crop_flip(count, generator, padding=PADDING):
    """Per-image crop offsets [count, 2] (row, column) in {0..2*padding} and flip flags [count]."""
    offsets = torch.randint(0, 2 * padding + 1, (count, 2), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    return offsets, flips


def pad_images(images, padding=PADDING):
    """Zero-pad uint8 [N, C, H, W] images on every side (done once per dataset)."""
    return F.pad(images, (padding, padding, padding, padding))


def crop_coordinates(offsets, flips, height, width):
    """Rows [N, H] and columns [N, W] of the padded image that each output pixel reads;
    a flipped image reads its columns right to left."""
    device = offsets.device
    rows = offsets[:, :1] + torch.arange(height, device=device)
    cols = offsets[:, 1:] + torch.arange(width, device=device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    return rows, cols


def gather_crops(padded, index, rows, cols):
    """The crops of padded[index] at the given coordinates: uint8 [B, C, H, W] (a
    channels-last view of one gather)."""
    cropped = padded[index[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return cropped.permute(0, 3, 1, 2)


def crop_flip(images, offsets, flips, padding=PADDING):
    """Crop each zero-padded image at its offset, mirrored where `flips` is set.
    images: uint8 [B, C, H, W]; returns the same shape."""
    _, _, height, width = images.shape
    device = images.device
    rows, cols = crop_coordinates(offsets.to(device), flips.to(device), height, width)
    return gather_crops(pad_images(images, padding), torch.arange(len(images), device=device), rows, cols)


class Normalizer:
    """uint8 [B, C, H, W] -> float32 (x / 255 - mean) / std, as ToTensor + Normalize (the same
    operations in the same order, so the values are bit-identical to torchvision's)."""

    def __init__(self, mean, std, device, memory_format=torch.contiguous_format):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.memory_format = memory_format

    def __call__(self, images):
        out = images.to(torch.float32, memory_format=self.memory_format)
        return out.div_(255).sub_(self.mean).div_(self.std)


def mix_seed(*parts):
    """A 63-bit seed from several integers (seed, epoch, rank, index, ...)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & ((1 << 63) - 1)
    return value


class SeededTransformDataset(Dataset):
    """Applies PIL transforms with the torch RNG seeded per (seed, epoch, image), so the
    augmentation of an image does not depend on worker count or on where a run resumed."""

    def __init__(self, load, labels, transform, seed):
        self.load, self.labels, self.transform, self.seed = load, labels, transform, seed

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        image = self.load(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, index))
            image = self.transform(image)
        return image, int(self.labels[index])
