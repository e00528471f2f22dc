"""What a CIFAR-10 --data_dir points at, read from directory listings only: the command line
checks it before torch is imported (this module imports neither torch nor NumPy), the loader
(data.cifar) before reading."""

import os

TORCHVISION_FOLDER = "cifar-10-batches-py"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
DEFAULT_DATA_DIR = "data"


def is_image_folders(path):
    return os.path.isdir(os.path.join(path, "train")) or os.path.isdir(os.path.join(path, "test"))


def _is_cifar_root(path):
    return is_image_folders(path) or os.path.isdir(os.path.join(path, TORCHVISION_FOLDER))


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
        where = f"--data_dir {parent}" if is_image_folders(parent) else "the folder holding train/ and test/"
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
