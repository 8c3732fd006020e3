"""Datasets for distillation: image folders, Hugging Face datasets, the built-in Fashion-MNIST.

Transforms come from the teacher's own data config (timm ``resolve_data_config`` /
``create_transform``; for transformers, its image-processor mean/std/size). Grey images are
turned into 3 channels.
"""

from __future__ import annotations

import gzip
import os
import random
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, Subset

from castle_convert.config import DataError, error_line  # noqa: F401 - castle_convert.data.DataError, as before
from castle_convert.preprocess import DataConfig, data_config  # noqa: F401 - the teacher's preprocessing
from castle_convert.runtime import available_memory  # noqa: F401 - castle_convert.data.available_memory, as before

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


@dataclass
class DataBundle:
    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    classes: list[str]


# -- transforms ----------------------------------------------------------------------------------

def build_transform(cfg: DataConfig, train: bool, augmentation: str = "light") -> Callable:
    from timm.data import create_transform
    if not train or augmentation == "none":
        return create_transform(input_size=cfg.input_size, is_training=False, mean=cfg.mean, std=cfg.std,
                                interpolation=cfg.interpolation, crop_pct=cfg.crop_pct)
    return create_transform(input_size=cfg.input_size, is_training=True, mean=cfg.mean, std=cfg.std,
                            interpolation=cfg.interpolation, hflip=0.5,
                            auto_augment="rand-m9-mstd0.5" if augmentation == "strong" else None,
                            scale=(0.08, 1.0) if augmentation == "strong" else (0.35, 1.0))


class Transformed(Dataset):
    """Applies a transform to (PIL image, label) samples; images become RGB first.

    With ``seed`` set, random augmentation of sample ``i`` in epoch ``e`` draws from RNGs seeded by
    ``(seed, e, i)`` only: the same images whatever the process count, worker count or resume point
    (the global RNG state is left as it was).
    """

    def __init__(self, base: Dataset, transform: Callable, seed: Optional[int] = None):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        if image.mode != "RGB":
            image = to_rgb(image, f"image {i}")
        if self.seed is None:
            return self.transform(image), label
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        torch.random.default_generator.manual_seed(sample_seed)   # CPU only: torch.manual_seed is 30× slower
        random.seed(sample_seed)
        try:
            return self.transform(image), label
        finally:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)


# -- sources -------------------------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not; a truncated or damaged file is a one-line
    DataError naming it."""
    import zlib
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:       # gzip: EOFError for a cut file (click would say "Aborted!")
        raise DataError(f"{path} cannot be read ({error_line(e, 120)}): the file is truncated or damaged; "
                        "reinstall it (apt-get install --reinstall dataset-fashion-mnist) or copy it again") from None
    ndim = raw[3] if len(raw) >= 4 else 0
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    size = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) < 4 or raw[2] != 0x08 or not ndim or len(raw) != size:
        raise DataError(f"{path} is not a complete IDX (MNIST-format) file ({len(raw)} bytes, header says "
                        f"{size if ndim else '?'}): reinstall it (apt-get install --reinstall dataset-fashion-mnist) "
                        "or copy it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class ArrayImages(Dataset):
    """uint8 images (N, H, W) + labels as (PIL 'L' image, int) samples."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i], mode="L"), int(self.labels[i])


def fashion_mnist_dir() -> Optional[Path]:
    for d in [os.environ.get("CASTLE_FASHION_MNIST_DIR"), *FASHION_MNIST_DIRS]:
        if d and (Path(d) / "train-images-idx3-ubyte.gz").exists():
            return Path(d)
    return None


def load_fashion_mnist() -> tuple[ArrayImages, ArrayImages]:
    root = fashion_mnist_dir()
    if root is not None:
        split = {}
        for name, prefix in (("train", "train"), ("val", "t10k")):
            split[name] = ArrayImages(_read_idx(root / f"{prefix}-images-idx3-ubyte.gz"),
                                      _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz"))
        return split["train"], split["val"]
    try:
        from datasets import load_dataset
        ds = load_dataset("fashion_mnist")
    except Exception as e:  # noqa: BLE001 - offline / not cached
        raise DataError(
            "Fashion-MNIST is not available: install it with `apt-get install dataset-fashion-mnist` "
            "(files under /usr/share/datasets/fashion-mnist/), point CASTLE_FASHION_MNIST_DIR at a "
            f"folder with the four *-ubyte.gz files, or go online for Hugging Face datasets ({type(e).__name__}).") from e
    return tuple(ArrayImages(np.stack([np.asarray(im) for im in ds[s]["image"]]), np.asarray(ds[s]["label"]))
                 for s in ("train", "test"))


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def to_rgb(image: Image.Image, where: str) -> Image.Image:
    """``image`` upright (EXIF orientation applied) as 8-bit RGB.

    16-bit greyscale (``I;16*``, or ``I`` with values in 0..65535) is scaled by 255/65535 and float
    greyscale (``F``) with values in [0, 1] by 255 — a plain ``convert("RGB")`` clips both (white / black
    images). Other integer or float ranges are refused: their scale is unknown.
    """
    from PIL import ImageOps
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(image, dtype=np.float64)                            # (H, W)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F":
            if not (np.isfinite(a).all() and 0.0 <= lo and hi <= 1.0):
                raise DataError(f"{where} is a float image with values in [{lo:g}, {hi:g}]; float images are read "
                                "as values in [0, 1]: save it as an 8-bit (or 16-bit) PNG or JPEG")
            a = a * 255.0
        else:
            if lo < 0 or hi > 65535:
                raise DataError(f"{where} is a 32-bit integer image with values in [{lo:g}, {hi:g}] (beyond 16 bits): "
                                "save it as an 8-bit (or 16-bit) PNG or JPEG")
            a = a * (255.0 / 65535.0)
        image = Image.fromarray(np.rint(a).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def _read_image(path: str) -> Image.Image:
    """An image file as upright 8-bit RGB (:func:`to_rgb`); a corrupt or unreadable file is a one-line DataError."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return to_rgb(image, path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path} cannot be read as an image ({error_line(e, 120)}): "
                        "remove or replace the file") from None


class ImageFiles(Dataset):
    """One split of an image folder, ``root/<class>/**/<image>``, as torchvision's ``ImageFolder`` lists it
    (classes and files in sorted order) but reading only what is really in the tree: regular files with an
    image extension, in real sub-folders. Hidden entries (``.ipynb_checkpoints``, ``._x.jpg``) are not read;
    symbolic links (a link out of the tree, or back into it: a loop) and special files (a FIFO or device named
    ``x.png``) are skipped and counted in ``skipped``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.skipped: list[str] = []
        self.classes = []
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                self.skipped.append(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                self.classes.append(entry.name)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for c in self.classes:
            walked = []
            for dirpath, dirnames, filenames in os.walk(self.root / c, followlinks=False):
                keep = []
                for d in dirnames:                              # os.walk lists links to folders as folders
                    if d.startswith("."):
                        continue
                    if os.path.islink(os.path.join(dirpath, d)):
                        self.skipped.append(os.path.join(dirpath, d))
                    else:
                        keep.append(d)
                dirnames[:] = keep
                walked.append((dirpath, filenames))
            for dirpath, filenames in sorted(walked):
                for name in sorted(filenames):
                    if name.startswith(".") or not name.lower().endswith(IMG_EXTENSIONS):
                        continue
                    path = os.path.join(dirpath, name)
                    if stat.S_ISREG(os.lstat(path).st_mode):    # not a link, FIFO, socket or device
                        self.samples.append((path, self.class_to_idx[c]))
                    else:
                        self.skipped.append(path)
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        return _read_image(path), target


def load_image_folder(root: Path) -> tuple[Dataset, Dataset, list[str]]:
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise DataError(f"--data {root}: expected an image-folder layout with {root}/train/<class>/* and "
                        f"{root}/val/<class>/*; missing {', '.join(missing)}/")
    train, val = (ImageFiles(root / s) for s in ("train", "val"))
    for split, ds in (("train", train), ("val", val)):
        if not ds.classes:
            raise DataError(f"--data {root}: {root / split} has no class folders (expected {split}/<class>/*.jpg)")
        counts = np.bincount(ds.targets, minlength=len(ds.classes))
        empty = [ds.classes[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise DataError(f"--data {root}: {root / split / empty[0]} has no images (extensions "
                            f"{', '.join(IMG_EXTENSIONS[:4])}, ...): add images or remove the empty class folder")
        if ds.skipped:
            warnings.warn(f"--data {root}: {len(ds.skipped)} entries of {split}/ not read (e.g. "
                          f"{os.path.relpath(ds.skipped[0], root)}): symbolic links are not followed and special "
                          "files (FIFOs, devices) are not images; copy the images into the folder instead")
    if train.classes != val.classes:
        only_train = [c for c in train.classes if c not in val.class_to_idx]
        only_val = [c for c in val.classes if c not in train.class_to_idx]
        parts = [f"only in {s}/: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                 for s, names in (("train", only_train), ("val", only_val)) if names]
        raise DataError(f"--data {root}: train/ and val/ have different class folders ({'; '.join(parts)}): "
                        "give both splits the same class folders")
    return train, val, train.classes


class HFImages(Dataset):
    def __init__(self, ds: Any, image_key: str, label_key: str):
        self.ds, self.image_key, self.label_key = ds, image_key, label_key

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self.ds[i]
        image = row[self.image_key]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        return image, int(row[self.label_key])


def load_hf_dataset(spec: str) -> tuple[Dataset, Dataset, list[str]]:
    from datasets import load_dataset
    name, _, config = spec.partition(":")
    try:
        ds = load_dataset(name, config or None)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"--data hf:{spec}: cannot load Hugging Face dataset '{name}' "
                        f"({type(e).__name__}: {str(e)[:200]}). Offline, it must be in the local "
                        "datasets cache (HF_DATASETS_OFFLINE=1 uses only the cache).") from e
    splits = list(ds)
    train_split = "train" if "train" in ds else splits[0]
    val_split = next((s for s in ("validation", "val", "test") if s in ds), None)
    if val_split is None:
        raise DataError(f"--data hf:{spec}: needs a validation/val/test split besides '{train_split}' (has {splits})")
    features = ds[train_split].features
    image_key = next((k for k in ("image", "img", "pixel_values") if k in features), None)
    label_key = next((k for k in ("label", "labels", "fine_label") if k in features), None)
    if image_key is None or label_key is None:
        raise DataError(f"--data hf:{spec}: cannot find image and label columns in {list(features)}")
    names = getattr(features[label_key], "names", None)
    classes = list(names) if names else [str(i) for i in sorted(set(ds[train_split][label_key]))]
    return (HFImages(ds[train_split], image_key, label_key), HFImages(ds[val_split], image_key, label_key),
            classes)


class Materialized(Dataset):
    """A deterministic (no-augmentation) dataset transformed once and held as tensors.

    Small datasets (Fashion-MNIST: 60k × 3×28×28) then cost nothing per step and need no loader
    workers competing with training for the CPU.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


MATERIALIZE_MAX_BYTES = 2 << 30


def maybe_materialize(ds: Dataset, max_bytes: int = MATERIALIZE_MAX_BYTES) -> Dataset:
    """Transform a deterministic dataset once if its tensors fit in ``max_bytes``."""
    if len(ds) == 0:
        return ds
    first = ds[0][0]
    if first.numel() * first.element_size() * len(ds) > max_bytes:
        return ds
    images = torch.empty((len(ds), *first.shape), dtype=first.dtype)
    labels = torch.empty(len(ds), dtype=torch.long)
    for i in range(len(ds)):
        images[i], labels[i] = ds[i]
    return Materialized(images, labels)


def _subset(ds: Dataset, n: Optional[int], seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, idx.sort().values.tolist())


def build_data(spec: str, teacher: nn.Module, *, resolution: Optional[int] = None, augmentation: str = "light",
               max_train_samples: Optional[int] = None, max_eval_samples: Optional[int] = None,
               seed: int = 0, materialize: bool = True) -> DataBundle:
    """``spec``: ``natural`` (unlabeled, :mod:`castle_convert.natural`), ``fashion-mnist``,
    ``hf:NAME[:CONFIG]``, or a directory with train/ and val/.

    With ``materialize``, deterministic splits (val always, train without augmentation) whose
    transformed tensors fit in 2 GiB are transformed once up front (see :class:`Materialized`).
    """
    if spec == "fashion-mnist":
        train, val = load_fashion_mnist()
        classes = FASHION_MNIST_CLASSES
    elif spec == "natural":                    # unlabeled: max_train_samples is the number of images made
        from castle_convert import natural
        train, val = natural.datasets(max_train_samples or natural.DEFAULT_TRAIN_IMAGES, seed)
        max_train_samples, classes = None, []
    elif spec.startswith("hf:"):
        train, val, classes = load_hf_dataset(spec[3:])
    else:
        root = Path(spec).expanduser()
        if not root.exists():
            raise DataError(f"--data {spec}: no such directory (and not 'fashion-mnist' or 'hf:NAME')")
        train, val, classes = load_image_folder(root)
    cfg = data_config(teacher, resolution)
    train = Transformed(_subset(train, max_train_samples, seed), build_transform(cfg, True, augmentation),
                        seed=None if augmentation == "none" else seed)   # seeded only if random
    val = Transformed(_subset(val, max_eval_samples, seed + 1), build_transform(cfg, False))
    if materialize:
        val = maybe_materialize(val)
        if augmentation == "none":
            train = maybe_materialize(train)
    return DataBundle(name=spec, train=train, val=val, num_classes=len(classes), classes=list(classes))
