"""Datasets: where images and labels come from, split into train and test.

A dataset is two `Split`s of image sources plus class names. Sources give every image an id (a hash
of its content) without decoding it, so a cache lookup never touches pixels, and decode images only
in the batches the backbone asks for.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tarfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..encoding import images
from ..errors import FeatureCacheError
from .sampling import train_test_indices

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
BUILTINS = ("digits", "fashion-mnist", "mnist", "cifar10")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


class ArrayImages:
    """Images held in one uint8 array (N, H, W) or (N, H, W, C)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    @cached_property
    def ids(self) -> list[str]:
        return [images.array_hash(a) for a in self.array]

    def load(self, index: int) -> np.ndarray:
        return images.array_to_rgb(self.array[index], f"image {index}")

    def name(self, index: int) -> str:
        return f"#{index}"

    def native_size(self) -> int | None:
        """Side of the images when all are square and the same size, else None."""
        h, w = self.array.shape[1:3]
        return h if h == w else None

    def subset(self, indices: np.ndarray) -> ArrayImages:
        return ArrayImages(self.array[indices])


class FileImages:
    """Image files; ids hash the file bytes, so renaming or moving a file keeps its features."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    @cached_property
    def ids(self) -> list[str]:
        return [images.content_hash(images.read_file(p)) for p in self.paths]

    def load(self, index: int) -> np.ndarray:
        return images.load_file(self.paths[index])

    def check(self, index: int) -> None:
        """Raise the error `load` would, cheaply (run on every file before an extraction)."""
        images.check_file(self.paths[index])

    def name(self, index: int) -> str:
        return str(self.paths[index])

    def native_size(self) -> int | None:
        return None  # files may differ in size; the model's default size applies

    def subset(self, indices: np.ndarray) -> FileImages:
        return FileImages([self.paths[i] for i in indices])


@dataclass
class Split:
    images: ArrayImages | FileImages
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> Split:
        indices = np.asarray(indices)
        return Split(self.images.subset(indices), self.labels[indices])


@dataclass
class Dataset:
    name: str
    class_names: tuple[str, ...]
    train: Split
    test: Split

    def fingerprint(self) -> str:
        """Hash of both splits' image ids and labels: which exact data a run was fitted on."""
        h = hashlib.blake2b(digest_size=8)
        for split in (self.train, self.test):
            h.update("".join(split.images.ids).encode())
            h.update(np.asarray(split.labels, dtype=np.int64).tobytes())
        return h.hexdigest()

    def native_size(self) -> int | None:
        a, b = self.train.images.native_size(), self.test.images.native_size()
        return a if a == b else None

    def drop(self, ids) -> list[str]:
        """Leave images with these ids out of both splits, labels alongside, in place (so every holder
        of this dataset agrees); returns the names of those dropped."""
        ids, dropped = set(ids), []
        for attr in ("train", "test"):
            split = getattr(self, attr)
            gone = [k for k, i in enumerate(split.images.ids) if i in ids]
            if gone:
                dropped += [split.images.name(k) for k in gone]
                setattr(self, attr, split.subset(np.setdiff1d(np.arange(len(split)), gone)))
        return dropped


def load_dataset(spec: str, data_dir: str | None = None, test_size: float = 0.25, seed: int = 0,
                 max_train: int | None = None, max_test: int | None = None) -> Dataset:
    """Resolve `--data`: a built-in name, an .npz file, or a folder of images."""
    # Checked for every source, also those with a split of their own (which do not use it): a value that
    # cannot be a share is a mistake wherever it is given.
    if not 0 < test_size < 1:
        raise FeatureCacheError(f"--test-size {test_size}: must be between 0 and 1 (e.g. 0.25)")
    path = Path(spec).expanduser()
    if spec in BUILTINS and not path.exists():
        ds = _BUILTIN_LOADERS[spec](data_dir, test_size, seed)
    elif path.suffix == ".npz" and path.is_file():
        ds = _load_npz(path)
    elif path.is_dir():
        ds = _load_folder(path, test_size, seed)
    elif path.exists():
        raise FeatureCacheError(f"--data {spec}: not a folder or an .npz file")
    else:
        raise FeatureCacheError(
            f"--data {spec}: no such path or dataset; give a folder of class subfolders, "
            f"an .npz with x_train/y_train/x_test/y_test, or one of: {', '.join(BUILTINS)}")
    ds = Dataset(ds.name, ds.class_names,
                 _subsample(ds.train, max_train, seed, "--max-train"),
                 _subsample(ds.test, max_test, seed, "--max-test"))
    _check_classes(ds)
    return ds


def _check_classes(ds: Dataset) -> None:
    if len(ds.train) == 0 or len(ds.test) == 0:
        raise FeatureCacheError(f"--data {ds.name}: the train or test split is empty; add images")
    present = np.unique(ds.train.labels)
    if len(present) < 2:
        raise FeatureCacheError(
            f"--data {ds.name}: the train split has only one class ({ds.class_names[present[0]]!r}); "
            "a classifier needs at least two")


def _subsample(split: Split, n: int | None, seed: int, option: str) -> Split:
    """A stratified, seeded subset of n images (all of them when n is None or >= the size)."""
    if n is None or n >= len(split):
        return split
    if n < 1:
        raise FeatureCacheError(f"{option} {n}: must be at least 1")
    counts = np.bincount(split.labels)
    stratify = bool(counts[counts > 0].min() >= 2 and n >= len(counts))
    keep, _ = train_test_indices(split.labels, seed, train_size=n, stratify=stratify)
    return split.subset(np.sort(keep))


def _stratified_split(images_, labels, test_size: float, seed: int, name: str, class_names=None):
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    if (counts[counts > 0] < 2).any():
        small = [i for i, c in enumerate(counts) if c == 1][0]
        which = f"class {class_names[small]!r}" if class_names else f"class index {small}"
        raise FeatureCacheError(f"--data {name}: {which} has a single image; "
                                "each class needs at least two to split into train and test")
    tr, te = train_test_indices(labels, seed, test_size=test_size)
    tr, te = np.sort(tr), np.sort(te)
    return Split(images_.subset(tr), labels[tr]), Split(images_.subset(te), labels[te])


# ---- folders ---------------------------------------------------------------------------------

def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_by_class(root: Path) -> dict[str, list[Path]]:
    out = {}
    for d in _class_folders(root):
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        out[d.name] = files
    return out


def _load_folder(root: Path, test_size: float, seed: int) -> Dataset:
    subdirs = {p.name for p in _class_folders(root)}
    if {"train", "test"} <= subdirs:
        train, test = _files_by_class(root / "train"), _files_by_class(root / "test")
        _no_empty_class(root / "train", train)
        names = tuple(sorted(set(train) | set(test)))
        return Dataset(str(root), names, _folder_split(train, names), _folder_split(test, names))
    by_class = _files_by_class(root)
    if not by_class:
        raise FeatureCacheError(f"--data {root}: no class subfolders; put each class's images in "
                                "a folder named after the class (or use train/ and test/)")
    _no_empty_class(root, by_class)
    names = tuple(by_class)
    whole = _folder_split(by_class, names)
    train, test = _stratified_split(whole.images, whole.labels, test_size, seed, str(root), names)
    return Dataset(str(root), names, train, test)


def _no_empty_class(root: Path, by_class: dict[str, list[Path]]) -> None:
    """A class folder with no files would be a class no head can learn (an empty row in every report): more
    likely a mistake than a wish, so say so rather than carry it."""
    empty = [name for name, files in by_class.items() if not files]
    if empty:
        raise FeatureCacheError(f"--data {root}: class folder {empty[0]!r} holds no files; put its images in it "
                                "or remove the folder")


def _folder_split(by_class: dict[str, list[Path]], names: tuple[str, ...]) -> Split:
    paths, labels = [], []
    for name, files in by_class.items():
        paths += files
        labels += [names.index(name)] * len(files)
    return Split(FileImages(paths), np.asarray(labels, dtype=np.int64))


# ---- array formats ---------------------------------------------------------------------------

def _arrays_dataset(name, class_names, x_train, y_train, x_test, y_test) -> Dataset:
    y_train, y_test = np.asarray(y_train).ravel().astype(np.int64), np.asarray(y_test).ravel().astype(np.int64)
    if class_names is None:
        n = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
        class_names = tuple(str(i) for i in range(n))
    return Dataset(name, tuple(class_names), Split(ArrayImages(x_train), y_train),
                   Split(ArrayImages(x_test), y_test))


def _load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise FeatureCacheError(f"{path}: missing arrays {', '.join(sorted(missing))}; "
                                        "an .npz dataset needs x_train, y_train, x_test, y_test")
            names = tuple(str(s) for s in z["class_names"]) if "class_names" in z.files else None
            return _arrays_dataset(str(path), names, z["x_train"], z["y_train"], z["x_test"], z["y_test"])
    except (OSError, ValueError) as e:
        raise FeatureCacheError(f"{path}: not a readable .npz file ({e})") from e


def _load_digits(data_dir, test_size, seed) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 intensities scaled to 0..255, as an 8-bit image would hold them.
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    train, test = _stratified_split(ArrayImages(x), d.target, test_size, seed, "digits")
    return Dataset("digits", tuple(str(i) for i in range(10)), train, test)


def read_idx(path: Path) -> np.ndarray:
    """An MNIST-style idx file (optionally gzipped) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FeatureCacheError(f"{path}: cannot read idx file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise FeatureCacheError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise FeatureCacheError(f"{path}: truncated idx file ({arr.size} of {int(np.prod(dims))} values)")
    return arr.reshape(dims)


def _idx_dataset(name: str, folder: Path, class_names) -> Dataset:
    def find(stem):
        for cand in (f"{stem}", f"{stem}.gz"):
            if (folder / cand).is_file():
                return folder / cand
        raise FeatureCacheError(f"--data {name}: {folder / stem}[.gz] not found; "
                                f"give --data-dir with the folder that holds the idx files")

    return _arrays_dataset(name, class_names,
                           read_idx(find("train-images-idx3-ubyte")), read_idx(find("train-labels-idx1-ubyte")),
                           read_idx(find("t10k-images-idx3-ubyte")), read_idx(find("t10k-labels-idx1-ubyte")))


def _load_fashion_mnist(data_dir, test_size, seed) -> Dataset:
    folder = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    if not folder.is_dir():
        raise FeatureCacheError(f"--data fashion-mnist: {folder} not found; install it with "
                                "`apt-get install dataset-fashion-mnist` or give --data-dir")
    return _idx_dataset("fashion-mnist", folder, FASHION_MNIST_CLASSES)


def _load_mnist(data_dir, test_size, seed) -> Dataset:
    folder = Path(data_dir) if data_dir else Path("~/.keras/datasets/mnist").expanduser()
    if not folder.is_dir():
        raise FeatureCacheError("--data mnist: give --data-dir with the folder that holds the MNIST idx files")
    return _idx_dataset("mnist", folder, tuple(str(i) for i in range(10)))


def _load_cifar10(data_dir, test_size, seed) -> Dataset:
    """The CIFAR-10 "python version": the .tar.gz archive or its extracted cifar-10-batches-py folder."""
    cands = [Path(data_dir)] if data_dir else []
    keras_home = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "datasets"
    cands += [keras_home / "cifar-10-batches-py", keras_home / "cifar-10-python.tar.gz"]
    for c in cands:
        if c.is_dir() and (c / "cifar-10-batches-py").is_dir():
            c = c / "cifar-10-batches-py"
        if c.is_dir() and (c / "test_batch").is_file():
            return _cifar10_from(lambda n: (c / n).read_bytes(), str(c))
        if c.is_file() and c.name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(c) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

                def read(n):
                    if n not in members:
                        raise FeatureCacheError(f"{c}: archive has no {n}; is it cifar-10-python.tar.gz?")
                    return tar.extractfile(members[n]).read()

                return _cifar10_from(read, str(c))
    raise FeatureCacheError("--data cifar10: archive not found; give --data-dir with cifar-10-python.tar.gz "
                            f"or its extracted cifar-10-batches-py folder (looked in {', '.join(map(str, cands))})")


def _cifar10_from(read, where: str) -> Dataset:
    def batch(n):
        try:
            d = pickle.loads(read(n), encoding="bytes")  # the official format is a pickle of arrays
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return x, np.asarray(d[b"labels"], dtype=np.int64)
        except FeatureCacheError:
            raise
        except Exception as e:
            raise FeatureCacheError(f"{where}: {n} is not a CIFAR-10 batch ({e})") from e

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = batch("test_batch")
    return _arrays_dataset("cifar10", _cifar10_names(read, where), np.concatenate([p[0] for p in parts]),
                           np.concatenate([p[1] for p in parts]), x_test, y_test)


def _cifar10_names(read, where: str) -> tuple[str, ...]:
    """Class names from batches.meta (the archive's own), else the standard list."""
    try:
        raw = read("batches.meta")
    except (FeatureCacheError, OSError):
        return CIFAR10_CLASSES
    try:
        names = tuple(n.decode() for n in pickle.loads(raw, encoding="bytes")[b"label_names"])
    except Exception as e:
        raise FeatureCacheError(f"{where}: batches.meta is not a CIFAR-10 meta file ({e})") from e
    if len(names) != len(CIFAR10_CLASSES):
        raise FeatureCacheError(f"{where}: batches.meta names {len(names)} classes, CIFAR-10 has 10")
    return names


_BUILTIN_LOADERS = {"digits": _load_digits, "fashion-mnist": _load_fashion_mnist,
                    "mnist": _load_mnist, "cifar10": _load_cifar10}


@dataclass(frozen=True)
class DataOptions:
    """How `--data` is read: everything that decides which images form train and test."""
    data: str
    data_dir: str | None = None
    test_size: float = 0.25
    seed: int = 0
    max_train: int | None = None
    max_test: int | None = None

    def load(self) -> Dataset:
        return load_dataset(self.data, self.data_dir, self.test_size, self.seed, self.max_train, self.max_test)

    def args(self) -> list[str]:
        out = ["--data", self.data]
        for flag, value, default in (("--data-dir", self.data_dir, None), ("--test-size", self.test_size, 0.25),
                                     ("--seed", self.seed, 0), ("--max-train", self.max_train, None),
                                     ("--max-test", self.max_test, None)):
            if value != default:
                out += [flag, str(value)]
        return out
