"""CIFAR-10 as uint8 arrays, from torchvision's files or from train/ + test/ image folders."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from utils.errors import DataError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR_CLASSES = 10
# The class of label i: the sorted class folder names (list_image_folder), also torchvision's order.
CIFAR_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TORCHVISION_FOLDER = "cifar-10-batches-py"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


def subset_indices(count, subset, seed):
    """The first `subset` indices of a seeded shuffle of range(count) (all, in order, if None)."""
    if subset is None or subset >= count:
        return np.arange(count)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:subset].sort().values.numpy()


def load_cifar10(data_dir, train, subset=None, seed=0):
    """(images uint8 [N, 32, 32, 3], labels int64 [N]) of one split."""
    problem = data_dir_problem(data_dir)
    if problem:
        raise DataError(f"--data_dir {data_dir}: {problem}")
    if _is_image_folders(data_dir):
        return _from_image_folders(data_dir, train, subset, seed)
    return _from_torchvision(data_dir, train, subset, seed)


# -- what --data_dir points at ----------------------------------------------------------
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
DEFAULT_DATA_DIR = "data"


def _is_image_folders(path):
    return os.path.isdir(os.path.join(path, "train")) or os.path.isdir(os.path.join(path, "test"))


def _is_cifar_root(path):
    return _is_image_folders(path) or os.path.isdir(os.path.join(path, TORCHVISION_FOLDER))


def _entries(path):
    try:
        return sorted(os.scandir(path), key=lambda entry: entry.name)
    except OSError:
        return []


def _holds_images(path):
    try:
        with os.scandir(path) as entries:  # stops at the first image
            return any(entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file() for entry in entries)
    except OSError:
        return False


def _parent(path):
    return os.path.dirname(os.path.normpath(path)) or "."


def data_dir_problem(data_dir):
    """Why `data_dir` is not a CIFAR-10 root, saying what to pass instead; None when it is one
    (train/ + test/ image folders or torchvision's cifar-10-batches-py/) or when torchvision
    may download CIFAR-10 into it: a missing default ./data, or a directory holding no images,
    class folders or archives. Reads directory listings only (and an archive's first entry)."""
    if os.path.isfile(data_dir):
        if data_dir.lower().endswith(ARCHIVE_SUFFIXES):
            return f"is an archive; {_unpack_advice(data_dir)}"
        return "is a file, expected the folder holding train/ and test/ (or cifar-10-batches-py/)"
    if not os.path.isdir(data_dir):
        if os.path.normpath(data_dir) == DEFAULT_DATA_DIR:
            return None
        return f"no such directory: {data_dir}"
    if _is_cifar_root(data_dir):
        return None
    entries = _entries(data_dir)
    folders = [entry.path for entry in entries if entry.is_dir()]
    for folder in folders:  # unpacked one level too deep, e.g. data/ holding data/cifar10-jpeg/
        if _is_cifar_root(folder):
            return f"holds CIFAR-10 one level down: pass --data_dir {folder}"
    if os.path.basename(os.path.normpath(data_dir)) == TORCHVISION_FOLDER or \
            any(entry.name.startswith("data_batch_") for entry in entries):
        return f"is torchvision's {TORCHVISION_FOLDER} folder itself: pass its parent, --data_dir {_parent(data_dir)}"
    if any(_holds_images(folder) for folder in folders):
        parent = _parent(data_dir)
        where = f"--data_dir {parent}" if _is_image_folders(parent) else "the folder holding train/ and test/"
        return f"is one split of class folders (train/<class>/ or test/<class>/): pass {where}"
    if _holds_images(data_dir):
        return ("holds images directly; expected train/<class>/*.jpg and test/<class>/*.jpg below it "
                "(one folder per class)")
    archives = [entry.path for entry in entries if entry.is_file() and entry.name.lower().endswith(ARCHIVE_SUFFIXES)]
    if archives:
        return f"holds the archive {os.path.basename(archives[0])}, not unpacked; {_unpack_advice(archives[0])}"
    return None


def _archive_top(path):
    """The first path component of the archive's first entry ('' when it cannot be read)."""
    import tarfile
    import zipfile

    try:
        if path.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                first = names[0] if names else ""
        else:
            with tarfile.open(path) as archive:
                member = archive.next()
                first = member.name if member else ""
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile):
        return ""
    parts = [part for part in first.split("/") if part not in ("", ".")]
    return parts[0] if parts else ""


def _unpack_advice(archive):
    """How to unpack `archive` and what --data_dir to pass then, from the archive's layout."""
    name = os.path.basename(archive)
    lower = name.lower()
    stem = archive[:-len(next(suffix for suffix in ARCHIVE_SUFFIXES if lower.endswith(suffix)))]
    folder = os.path.dirname(archive) or "."
    top = _archive_top(archive)

    def unpack(into):
        if lower.endswith(".zip"):
            return f"unzip {archive} -d {into}"
        return f"tar x{'z' if lower.endswith(('.gz', '.tgz')) else ''}f {archive} -C {into}"
    if top in ("train", "test"):  # train/ and test/ at the top: unpack into a folder of their own
        return f"unpack it with: mkdir -p {stem} && {unpack(stem)}; then pass --data_dir {stem}"
    if top == TORCHVISION_FOLDER:
        return f"unpack it with: {unpack(folder)}; then pass --data_dir {folder}"
    if top:
        return f"unpack it with: {unpack(folder)}; then pass --data_dir {os.path.join(folder, top)}"
    return (f"unpack it with: mkdir -p {stem} && {unpack(stem)}; then pass the folder holding train/ and test/ "
            f"(or {TORCHVISION_FOLDER}/)")


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


def _from_image_folders(data_dir, train, subset, seed):
    root = os.path.join(data_dir, "train" if train else "test")
    classes, samples = list_image_folder(root)
    if len(classes) != CIFAR_CLASSES:
        raise DataError(f"{root}: found {len(classes)} class folders, CIFAR-10 has {CIFAR_CLASSES}")
    if not train:
        train_root = os.path.join(data_dir, "train")
        check_same_classes(root, classes, train_root, list_image_folder(train_root)[0])
    indices = subset_indices(len(samples), subset, seed)
    paths = [samples[i][0] for i in indices]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda p: read_image(p, (32, 32)), paths))
    labels = np.asarray([samples[i][1] for i in indices], dtype=np.int64)
    return np.stack(images), labels
