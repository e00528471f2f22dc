"""CIFAR augmentation on whole batches of uint8 images, on any device (SPEC 3.10).

Same distribution as torchvision's RandomCrop(32, padding=4) (zero padding) followed by
RandomHorizontalFlip() and Normalize: a crop offset uniform in {0..8} per axis and a flip
with probability 1/2, drawn per image.
"""

import torch
import torch.nn.functional as F


def draw_crop_flip(count, generator, padding=4):
    """Per-image crop offsets [count, 2] in {0..2*padding} and flip flags [count]."""
    offsets = torch.randint(0, 2 * padding + 1, (count, 2), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    return offsets, flips


def crop_flip(images, offsets, flips, padding=4):
    """Crop each zero-padded image at its offset, mirrored where `flips` is set.
    images: uint8 [B, C, H, W]; returns the same shape."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    offsets, flips = offsets.to(device), flips.to(device)
    rows = offsets[:, :1] + torch.arange(height, device=device)           # [B, H]
    cols = offsets[:, 1:] + torch.arange(width, device=device)            # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch_index = torch.arange(batch, device=device)[:, None, None]
    cropped = padded[batch_index, :, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return cropped.permute(0, 3, 1, 2)


def normalize(images, mean, std, memory_format=torch.contiguous_format):
    """uint8 [B, C, H, W] -> float32 (x / 255 - mean) / std, as ToTensor + Normalize."""
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    out = (images.float().div_(255) - mean) / std
    return out.contiguous(memory_format=memory_format)
