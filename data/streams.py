"""The train and test streams of the package docstring (data/__init__.py): both pipelines,
the calibration images, build_data."""

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from data.augment import (Normalizer, SeededTransformDataset, crop_coordinates, draw_crop_flip, gather_crops,
                          mix_seed, pad_images)
from data.cifar import CIFAR_CLASS_NAMES, CIFAR_MEAN, CIFAR_STD, load_cifar10, subset_indices
from data.imagenet import IMAGENET_MEAN, IMAGENET_STD, imagenet_datasets, imagenet_resize
from utils.errors import ConfigError

def epoch_order(num_images, epoch, seed, rank, world_size):
    """This process's image indices for `epoch` (shuffled, padded to equal shards)."""
    sampler = DistributedSampler(range(num_images), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


@dataclass
class Stream:
    """Common bookkeeping of a training stream."""

    num_images: int
    batch_size: int          # per process
    seed: int
    rank: int = 0
    world_size: int = 1

    @property
    def steps_per_epoch(self):
        return math.ceil(math.ceil(self.num_images / self.world_size) / self.batch_size)

    def order(self, epoch, start_step):
        return epoch_order(self.num_images, epoch, self.seed, self.rank, self.world_size)[start_step * self.batch_size:]


class TensorTrainStream(Stream):
    """Training batches cropped, flipped and normalised on the device.

    Per epoch: the order, the augmentation draws and the crop coordinates go to the device
    in one copy each; per batch: slices of those, one gather and the normalisation (no
    host synchronisation, no host-to-device copy).
    """

    def __init__(self, images, labels, batch_size, seed, rank, world_size, memory_format):
        super().__init__(len(labels), batch_size, seed, rank, world_size)
        self.padded, self.labels = pad_images(images), labels
        self.height, self.width = images.shape[2:]
        self.normalize = Normalizer(CIFAR_MEAN, CIFAR_STD, images.device, memory_format)

    def batches(self, epoch, start_step=0):
        full = epoch_order(self.num_images, epoch, self.seed, self.rank, self.world_size)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.rank))
        offsets, flips = draw_crop_flip(len(full), generator)
        device = self.padded.device
        order = torch.tensor(full, dtype=torch.long).to(device, non_blocking=True)
        rows, cols = crop_coordinates(offsets.to(device, non_blocking=True), flips.to(device, non_blocking=True),
                                      self.height, self.width)
        labels = self.labels[order]
        for start in range(start_step * self.batch_size, len(full), self.batch_size):
            batch = slice(start, start + self.batch_size)
            images = gather_crops(self.padded, order[batch], rows[batch], cols[batch])
            yield self.normalize(images), labels[batch]


class TensorTestStream:
    def __init__(self, images, labels, batch_size, rank, world_size, memory_format):
        # Each process evaluates its own shard; no image is counted twice.
        self.images, self.labels = images[rank::world_size], labels[rank::world_size]
        self.batch_size = batch_size
        self.normalize = Normalizer(CIFAR_MEAN, CIFAR_STD, images.device, memory_format)
        self.num_images = len(labels)

    @property
    def num_batches(self):
        """Batches of this process per pass (for progress displays)."""
        return math.ceil(len(self.labels) / self.batch_size)

    def batches(self):
        for start in range(0, len(self.labels), self.batch_size):
            batch = slice(start, start + self.batch_size)
            yield self.normalize(self.images[batch]), self.labels[batch]


class LoaderTrainStream(Stream):
    def __init__(self, dataset, batch_size, seed, rank, world_size, num_workers, device, memory_format):
        super().__init__(len(dataset), batch_size, seed, rank, world_size)
        self.dataset, self.num_workers, self.device, self.memory_format = dataset, num_workers, device, memory_format

    def batches(self, epoch, start_step=0):
        order = [(index, epoch) for index in self.order(epoch, start_step)]
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=order, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format),
                   labels.to(self.device, non_blocking=True))


class LoaderTestStream:
    def __init__(self, dataset, batch_size, rank, world_size, num_workers, device, memory_format):
        self.indices = list(range(rank, len(dataset), world_size))
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.device, self.memory_format = device, memory_format
        self.num_images = len(dataset)

    @property
    def num_batches(self):
        """Batches of this process per pass (for progress displays)."""
        return math.ceil(len(self.indices) / self.batch_size)

    def batches(self):
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.indices,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format),
                   labels.to(self.device, non_blocking=True))


@dataclass
class Data:
    train: object
    test: object
    num_classes: int
    input_size: int
    num_train: int
    num_test: int
    # Training images with the test transform, for re-estimating BN statistics (or None).
    calibration: object = None


@dataclass(frozen=True)
class Preprocessing:
    """What an application does to an RGB image before the model, as the run's evaluation did:
    values scaled to [0, 1]; resized so that its short side is `resize` pixels and centre-cropped
    to `input_size` (ImageNet; `resize` None: CIFAR-10's 32x32 images are used as they are);
    then each channel minus `mean`, divided by `std`."""

    mean: tuple
    std: tuple
    input_size: int
    resize: Optional[int] = None

    def to_dict(self) -> dict:
        """Plain data (lists, numbers), as export files store it."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def preprocessing(config) -> Preprocessing:
    """The input normalisation of the config's dataset, as its test transform applies it."""
    if config.dataset == "imagenet":
        size = config.input_size or 224
        return Preprocessing(IMAGENET_MEAN, IMAGENET_STD, size, imagenet_resize(size))
    return Preprocessing(CIFAR_MEAN, CIFAR_STD, config.input_size)


def class_names(config) -> Optional[tuple]:
    """The name of each class (label i: the i-th), or None for ImageNet: its labels are the
    indexes of the sorted class folders of the run's training directory, which the config does
    not record (the folders may have moved or changed since)."""
    return CIFAR_CLASS_NAMES if config.dataset == "cifar10" else None


def per_process_batch(config, world_size):
    if config.batch_size % world_size:
        raise ConfigError(f"--batch_size: the global batch {config.batch_size} does not split evenly over "
                          f"{world_size} processes")
    return config.batch_size // world_size


def build_data(config, device, rank=0, world_size=1, calibration_images=0, training=True):
    """Train and test streams for the config's dataset and pipeline, and a stream of
    `calibration_images` training images that re-estimate BN statistics (the method's answer,
    Method.bn_at_evaluation; 0: none). Not `training` (an evaluation): on CIFAR-10 without
    calibration images no training image is decoded (the train stream is None; num_train is
    still the training set's size)."""
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    batch = per_process_batch(config, world_size)
    if config.dataset == "imagenet":
        if config.data_pipeline == "tensor":
            raise ConfigError("--data_pipeline tensor: only for CIFAR-10 (ImageNet uses the dataloader pipeline)")
        train_set, test_set, num_classes = imagenet_datasets(config)
        args = (rank, world_size, config.num_workers, device, memory_format)
        calibration = loader_calibration(train_set, test_set.transform, calibration_images, config, device,
                                         memory_format)
        return Data(LoaderTrainStream(train_set, batch, config.seed, *args),
                    LoaderTestStream(test_set, config.batch_size, *args),
                    num_classes, config.image_size, len(train_set), len(test_set), calibration)
    # Decoding all 50,000 training images takes seconds that an evaluation would spend for nothing.
    labels_only = not training and not calibration_images
    train_images, train_labels = load_cifar10(config.data_dir, True, config.train_subset, config.seed,
                                              labels_only=labels_only)
    test_images, test_labels = load_cifar10(config.data_dir, False, config.test_subset, config.seed)
    if config.data_pipeline == "dataloader":
        train_set, test_set = cifar_datasets(train_images, train_labels, test_images, test_labels, config.seed)
        args = (rank, world_size, config.num_workers, device, memory_format)
        train = None if labels_only else LoaderTrainStream(train_set, batch, config.seed, *args)
        test = LoaderTestStream(test_set, config.batch_size, *args)
        calibration = loader_calibration(train_set, test_set.transform, calibration_images, config, device,
                                         memory_format)
    else:
        def to_device(images, labels):
            return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device),
                    torch.from_numpy(labels).to(device))
        train = None if labels_only else TensorTrainStream(*to_device(train_images, train_labels), batch,
                                                           config.seed, rank, world_size, memory_format)
        test = TensorTestStream(*to_device(test_images, test_labels), config.batch_size, rank, world_size,
                                memory_format)
        calibration = None
        if calibration_images:
            indices = subset_indices(len(train_labels), calibration_images, config.seed)
            calibration = TensorTestStream(*to_device(train_images[indices], train_labels[indices]),
                                           config.batch_size, 0, 1, memory_format)
    return Data(train, test, 10, 32, len(train_labels), len(test_labels), calibration)


def loader_calibration(train_set, test_transform, calibration_images, config, device, memory_format):
    """The calibration images (the first N training images of a shuffle seeded with --seed, the
    same at every evaluation and after a resume) with the test transform, as whole batches of
    --batch_size on every process (each process computes the same statistics), or None."""
    if not calibration_images:
        return None
    dataset = SeededTransformDataset(train_set.load, train_set.labels, test_transform, config.seed)
    indices = subset_indices(len(dataset), calibration_images, config.seed)
    return LoaderTestStream(Subset(dataset, indices), config.batch_size, 0, 1, config.num_workers, device,
                            memory_format)


def cifar_transforms():
    import torchvision.transforms as T

    train = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                       T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    test = T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    return train, test


class ArrayImages:
    """PIL images from a uint8 [N, H, W, 3] array (picklable for worker processes)."""

    def __init__(self, array):
        self.array = array

    def __call__(self, index):
        from PIL import Image

        return Image.fromarray(self.array[index])


def cifar_datasets(train_images, train_labels, test_images, test_labels, seed):
    """PIL-transform datasets over uint8 arrays (the original's CIFAR pipeline)."""
    train_transform, test_transform = cifar_transforms()
    return (SeededTransformDataset(ArrayImages(train_images), train_labels, train_transform, seed),
            SeededTransformDataset(ArrayImages(test_images), test_labels, test_transform, seed))

