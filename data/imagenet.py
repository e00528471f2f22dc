"""ImageNet (or any class-folder dataset of that layout) with the original's transforms."""

import os

from data.augment import SeededTransformDataset
from data.cifar import check_same_classes, list_image_folder, read_image, subset_indices
from utils.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = (("training", "validation"), ("train", "val"))


class FolderImages:
    """PIL images of a list of (path, label) samples; unreadable files raise DataError."""

    def __init__(self, samples):
        self.paths = [path for path, _ in samples]

    def __call__(self, index):
        from PIL import Image

        return Image.fromarray(read_image(self.paths[index]))


def imagenet_folders(root):
    if not os.path.isdir(root):
        raise DataError(f"--imagenet_dir {root}: no such directory")
    for train, val in LAYOUTS:
        if os.path.isdir(os.path.join(root, train)) and os.path.isdir(os.path.join(root, val)):
            return os.path.join(root, train), os.path.join(root, val)
    raise DataError(f"--imagenet_dir {root}: expected training/ and validation/ (or train/ and val/) class folders")


def imagenet_resize(size):
    """The short side the test transform resizes to before its centre crop of `size`: 256 / 224
    of the crop size, as Resize(256) + CenterCrop(224) at full size."""
    return round(size * 256 / 224)


def imagenet_transforms(size):
    import torchvision.transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    test = T.Compose([T.Resize(imagenet_resize(size)), T.CenterCrop(size), T.ToTensor(), normalize])
    return train, test


def imagenet_datasets(config):
    """(train dataset, validation dataset, number of classes)."""
    train_root, val_root = imagenet_folders(config.imagenet_dir)
    train_classes, train_samples = list_image_folder(train_root)
    val_classes, val_samples = list_image_folder(val_root)
    check_same_classes(val_root, val_classes, train_root, train_classes)
    if len(train_classes) < 2:
        raise DataError(f"{train_root}: needs at least 2 class folders, found {len(train_classes)}")
    train_samples = [train_samples[i] for i in subset_indices(len(train_samples), config.train_subset, config.seed)]
    val_samples = [val_samples[i] for i in subset_indices(len(val_samples), config.test_subset, config.seed)]
    train_transform, test_transform = imagenet_transforms(config.image_size)
    return (SeededTransformDataset(FolderImages(train_samples), [label for _, label in train_samples],
                                   train_transform, config.seed),
            SeededTransformDataset(FolderImages(val_samples), [label for _, label in val_samples],
                                   test_transform, config.seed),
            len(train_classes))
