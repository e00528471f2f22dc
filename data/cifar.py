"""CIFAR-10 as uint8 arrays, from torchvision's files or from train/ + test/ image folders."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from data.layout import IMAGE_SUFFIXES, TORCHVISION_FOLDER, data_dir_problem, is_image_folders
from utils.errors import DataError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR_CLASSES = 10
# The class of label i: the sorted class folder names (list_image_folder), also torchvision's order.
CIFAR_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def subset_indices(count, subset, seed):
    """The first `subset` indices of a seeded shuffle of range(count) (all, in order, if None)."""
    if subset is None or subset >= count:
        return np.arange(count)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:subset].sort().values.numpy()


def load_cifar10(data_dir, train, subset=None, seed=0, labels_only=False):
    """(images uint8 [N, 32, 32, 3], labels int64 [N]) of one split; `labels_only`: (None,
    labels), no image decoded."""
    problem = data_dir_problem(data_dir)
    if problem:
        raise DataError(f"--data_dir {data_dir}: {problem}")
    if is_image_folders(data_dir):
        return _from_image_folders(data_dir, train, subset, seed, labels_only)
    images, labels = _from_torchvision(data_dir, train, subset, seed)
    return (None if labels_only else images), labels


def _from_torchvision(data_dir, train, subset, seed):
    import torchvision

    folder = os.path.join(data_dir, TORCHVISION_FOLDER)
    present = os.path.isdir(folder)
    try:
        dataset = torchvision.datasets.CIFAR10(root=data_dir, train=train, download=not present)
    except Exception as error:  # network failures and damaged files come in many types
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        if present:
            raise DataError(f"{folder}: not a readable copy of torchvision's CIFAR-10 ({first_line}); delete it "
                            f"to download it again") from None
        raise DataError(
            f"--data_dir {data_dir}: no CIFAR-10 there ({TORCHVISION_FOLDER}/ or train/ and test/ class folders) "
            f"and the download failed ({first_line}); point --data_dir at a local copy") from None
    indices = subset_indices(len(dataset.data), subset, seed)
    return dataset.data[indices], np.asarray(dataset.targets, dtype=np.int64)[indices]


def list_image_folder(root):
    """(sorted class names, [(path, class index)]) of a class-folder tree."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such directory (expected one folder of images per class)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"{root}: no class folders in it")
    samples = []
    for index, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise DataError(f"{folder}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        samples.extend((os.path.join(folder, f), index) for f in files)
    return classes, samples


def check_same_classes(root, classes, reference_root, reference_classes):
    """Labels are indexes into the sorted class names: both splits must name the same classes."""
    if classes != reference_classes:
        missing = sorted(set(reference_classes) - set(classes))
        extra = sorted(set(classes) - set(reference_classes))
        detail = "; ".join(part for part in (f"missing {', '.join(missing[:3])}" if missing else "",
                                             f"not in {reference_root}: {', '.join(extra[:3])}" if extra else "")
                           if part)
        raise DataError(f"{root}: its class folders differ from those of {reference_root} ({detail})")


def read_image(path, size=None):
    """An RGB image as a uint8 array; DataError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot read image ({error})") from None
    if size is not None and array.shape[:2] != size:
        raise DataError(f"{path}: image is {array.shape[1]}x{array.shape[0]}, CIFAR-10 images are 32x32")
    return array


def _from_image_folders(data_dir, train, subset, seed, labels_only=False):
    root = os.path.join(data_dir, "train" if train else "test")
    classes, samples = list_image_folder(root)
    if len(classes) != CIFAR_CLASSES:
        raise DataError(f"{root}: found {len(classes)} class folders, CIFAR-10 has {CIFAR_CLASSES}")
    if not train:
        train_root = os.path.join(data_dir, "train")
        check_same_classes(root, classes, train_root, list_image_folder(train_root)[0])
    indices = subset_indices(len(samples), subset, seed)
    labels = np.asarray([samples[i][1] for i in indices], dtype=np.int64)
    if labels_only:
        return None, labels
    paths = [samples[i][0] for i in indices]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda p: read_image(p, (32, 32)), paths))
    return np.stack(images), labels
