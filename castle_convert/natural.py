"""Natural RGB images offline: the built-in ``natural`` data source and its held-out evaluation photos.

No natural-image dataset installs on these machines; what does is a few hundred desktop wallpapers in
Debian packages (photos mixed with renderings, one picture often in several sizes). This module turns
them, plus procedural images that carry natural-image statistics, into a distillation set:

* **Sources**: every wallpaper of the packages in :data:`PACKAGES` found on disk, one per picture (the
  largest of its sizes), at least 400 px on the short side, not near-constant. A fixed set of whole
  *photos* (:data:`HELD_OUT`) never enters the training set: it is the evaluation set.
* **Training images** (:func:`training_images`): seeded multi-scale square crops of the other sources
  (log-uniform scale from 6 % to 100 % of the short side, random position and mirror) plus procedural
  images (:mod:`castle_convert.procedural`: dead leaves, coloured 1/f noise, shapes with textures),
  made once and cached as one uint8 array under ``CASTLE_CACHE/natural/``.
* **Held-out views** (:func:`held_out_views`): each held-out photo as a centre square and four corner
  squares (70 % of the short side), resized to any resolution from the full-size photo (real detail at
  448/518 px, not an upsampled crop).

The scikit-image and scikit-learn sample photos are reserved for independent evaluation and are never
used here.

Licences (Debian copyright files): ``mate-backgrounds`` and ``plasma-workspace-wallpapers`` GPL-2+;
``gnome-backgrounds`` and ``ukui-wallpapers`` CC-BY-SA-3.0; ``lomiri-wallpapers`` CC-BY-4.0,
CC-BY-SA-3.0/4.0, CC0-1.0 per file. The images are used to train locally; none is redistributed in a
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from castle_convert.config import DataError

PACKAGES = {
    "mate-backgrounds": "GPL-2+",
    "gnome-backgrounds": "CC-BY-SA-3.0",
    "ukui-wallpapers": "CC-BY-SA-3.0",
    "plasma-workspace-wallpapers": "GPL-2+",
    "lomiri-wallpapers": "CC-BY-4.0 / CC-BY-SA-3.0 / CC-BY-SA-4.0 / CC0-1.0 (per file)",
}
INSTALL = "apt-get install -y " + " ".join(PACKAGES)
ROOTS = ("/usr/share/backgrounds", "/usr/share/wallpapers")
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MIN_SIDE = 400
# Whole photos kept out of every training set: the evaluation set (names as :func:`source_name` gives them).
HELD_OUT = ("Dragonfly_by_Bolly", "Wine_by_Jakkub_Mede", "friends_by_Aitzol_Berasategi",
            "life_by_Aitzol_Berasategi", "picosdeeuropa_by_Aitzol_Berasategi", "Picture_0B_by_freespace",
            "LadyBird", "Storm", "EveningGlow", "FallenLeaf", "Path", "OneStandsOut")
MIN_HELD_OUT = 6
VERSION = 2                  # bump when the crops or generators change: the cache key includes it
# Smallest crop box relative to the crop's own size: a box much smaller than its output is only an upsampled blur
# (at 448 px, boxes of at least 224 px of the source photo; at 112 px the 6 % floor of the short side rules).
MIN_BOX = 0.5


class NaturalDataError(DataError):
    """The wallpaper packages are missing, or the cache cannot be written (the message says what to do)."""


@dataclass(frozen=True)
class Source:
    name: str                # file stem, or the folder name of a KDE wallpaper package (+ "-dark")
    path: Path
    size: tuple[int, int]    # (width, height)


def source_name(path: Path) -> str:
    """``Path`` for ``/usr/share/wallpapers/Path/contents/images/2560x1600.jpg``; the stem otherwise
    (size suffixes such as ``_3840x2160`` removed, so the sizes of one picture share a name)."""
    parts = path.parts
    if "contents" in parts:                                    # KDE layout: NAME/contents/images[_dark]/WxH.ext
        i = parts.index("contents")
        return parts[i - 1] + ("-dark" if parts[i + 1].endswith("_dark") else "")
    stem = path.stem
    head, _, tail = stem.rpartition("_")
    if head and "x" in tail and tail.replace("x", "").isdigit():
        stem = head
    return stem


def _informative(crop: Image.Image) -> bool:
    """Not flat (the plain areas of renderings, solid colours, a bare sky): contrast plus edge energy of a
    64-px grey thumbnail (grey-level std + 5 × mean |gradient| > 20; about 40 % of random crops fail)."""
    g = np.asarray(crop.convert("L").resize((64, 64), Image.BILINEAR), dtype=np.float32)
    edges = np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()
    return float(g.std() + 5.0 * edges) > 20.0


def _rgb(im: Image.Image) -> Image.Image:
    """RGB, transparent areas on grey (not black), EXIF orientation applied."""
    from PIL import ImageOps
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        back = Image.new("RGBA", im.size, (128, 128, 128, 255))
        return Image.alpha_composite(back, im).convert("RGB")
    return im.convert("RGB")


def find_sources(roots: Optional[Sequence[str]] = None) -> list[Source]:
    """One :class:`Source` per picture under ``roots``: the largest file of each name, ≥ 400 px (headers only)."""
    best: dict[str, Source] = {}
    for root in ROOTS if roots is None else roots:
        for dirpath, _, files in os.walk(root):                # does not follow directory links
            for f in sorted(files):
                path = Path(dirpath) / f
                if path.suffix.lower() not in SUFFIXES or not path.is_file():
                    continue
                try:
                    with Image.open(path) as im:
                        size = im.size
                except OSError:
                    continue
                name = source_name(path)
                old = best.get(name)
                if old is None or size[0] * size[1] > old.size[0] * old.size[1]:
                    best[name] = Source(name, path, size)
    return sorted((s for s in best.values() if min(s.size) >= MIN_SIDE), key=lambda s: s.name)


def split_sources(sources: Optional[list[Source]] = None) -> tuple[list[Source], list[Source]]:
    """``(training sources, held-out photos)``; a one-line error when the packages are not installed."""
    sources = find_sources() if sources is None else sources
    held = [s for s in sources if s.name in HELD_OUT]
    train = [s for s in sources if s.name not in HELD_OUT]
    if len(held) < MIN_HELD_OUT or len(train) < 20:
        raise NaturalDataError(
            f"--data natural needs the Debian wallpaper packages (found {len(train)} training pictures and "
            f"{len(held)} of the {len(HELD_OUT)} held-out photos under {', '.join(ROOTS)}): {INSTALL}")
    return train, held


def _load(source: Source) -> Image.Image:
    with Image.open(source.path) as im:
        return _rgb(im)


def _crop_boxes(rng: np.random.Generator, size: tuple[int, int], n: int, min_scale: float) -> list[tuple]:
    """``n`` square boxes: side log-uniform in [min_scale, 1] × short side, uniform position."""
    w, h = size
    short = min(w, h)
    sides = np.exp(rng.uniform(np.log(min_scale), 0.0, n)) * short
    boxes = []
    for s in sides:
        s = max(16, int(s))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        boxes.append((x, y, x + s, y + s))
    return boxes


def _make_training_images(n: int, size: int, seed: int, procedural_fraction: float,
                          train: Optional[list[Source]] = None) -> np.ndarray:
    from castle_convert import procedural
    train = split_sources()[0] if train is None else train
    rng = np.random.default_rng(seed)
    n_proc = int(round(n * procedural_fraction))
    n_crops = n - n_proc
    per_source = np.bincount(rng.integers(0, len(train), n_crops), minlength=len(train))
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    i = 0
    for source, count in zip(train, per_source):
        if not count:
            continue
        image = _load(source)
        made = tries = 0
        while made < count and tries < 20 * count:           # flat crops are drawn again (then the picture is skipped)
            box, = _crop_boxes(rng, image.size, 1, min_scale=min(1.0, max(0.06, MIN_BOX * size / min(image.size))))
            tries += 1
            crop = image.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)
            if not _informative(crop):
                continue
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            out[i] = np.asarray(crop)
            i += 1
            made += 1
    n_proc = n - i                                            # procedural images fill what the crops did not
    for j in range(n_proc):
        out[i + j] = procedural.generate(rng, size, kind=j % len(procedural.KINDS))
    return out[rng.permutation(n)]


def cache_key(n: int, size: int, seed: int, procedural_fraction: float,
              split: Optional[tuple[list[Source], list[Source]]] = None) -> str:
    train, held = split_sources() if split is None else split
    listing = json.dumps([VERSION, n, size, seed, procedural_fraction, [(s.name, s.size) for s in train],
                          sorted(s.name for s in held)])
    return hashlib.sha256(listing.encode()).hexdigest()[:12]


def _checksum(images: np.ndarray) -> str:
    """sha1 of the array's bytes (damage detection; the fastest of hashlib's here), read in 16 MiB pieces: a
    memory map is never copied whole."""
    h = hashlib.sha1()
    flat = images.reshape(-1)
    step = 16 << 20
    for i in range(0, flat.shape[0], step):
        h.update(np.ascontiguousarray(flat[i:i + step]))
    return h.hexdigest()


def _read_cache(file: Path, shape: tuple[int, ...]) -> tuple[Optional[np.ndarray], Optional[str]]:
    """``(images, None)`` when ``file`` holds exactly the cached array its sidecar ``.sha1`` file describes
    (shape, dtype uint8, size, checksum), else ``(None, what is wrong)``; nothing there: ``(None, None)``."""
    sidecar = file.with_suffix(".sha1")
    if not file.exists() and not file.is_symlink():
        return None, None
    if file.is_symlink() or not file.is_file():
        return None, "it is not a regular file"
    try:
        expected = sidecar.read_text().strip() if sidecar.is_file() and not sidecar.is_symlink() else None
        images = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:            # empty, truncated header, garbage
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'unreadable'}"
    if images.dtype != np.uint8 or tuple(images.shape) != tuple(shape):
        return None, f"it holds a {images.dtype} array of shape {tuple(images.shape)}, not uint8 {tuple(shape)}"
    if expected is None:
        return None, "its checksum file is missing (the write did not finish)"
    if _checksum(images) != expected:
        return None, "its checksum does not match (damaged or edited)"
    return images, None


def _remove_stale_temps(folder: Path) -> None:
    """Temporary files of earlier writes (``.train-PID-*``) whose process is gone: a killed or failed write."""
    for tmp in folder.glob(".train-*"):
        pid = tmp.name[len(".train-"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue                                      # a write still running in another process
            except ProcessLookupError:
                pass
            except OSError:
                continue
        elif pid.isdigit():
            continue
        try:
            tmp.unlink()
        except OSError:
            pass


def _cache_folder(folder: Path) -> Path:
    """``folder`` created and checked writable, else a one-line :class:`NaturalDataError` naming CASTLE_CACHE."""
    def refuse(why: str) -> NaturalDataError:
        return NaturalDataError(f"cannot write the natural-image cache {folder} ({why}): set CASTLE_CACHE to a "
                                "writable directory, e.g. CASTLE_CACHE=/tmp/castle_cache")
    for p in [folder, *folder.parents]:
        if p.is_symlink() and not p.exists():
            raise refuse(f"{p} is a symbolic link to nothing")
        if p.exists():
            if not p.is_dir():
                raise refuse(f"{p} is a file, not a directory")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".train-{os.getpid()}-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise refuse(e.strerror or type(e).__name__) from None
    return folder


def _check_room(n: int, size: int, folder: Path) -> None:
    """``n`` images of ``size`` px are made in memory, then written: a one-line :class:`NaturalDataError` when
    either cannot hold them (a recipe's ``data.max_train_samples`` is input too), before any work."""
    import shutil

    from castle_convert.runtime import available_memory
    need = n * size * size * 3
    free = available_memory()
    if free is not None and need > 0.8 * free:
        raise NaturalDataError(f"{n} natural training images at {size} px need {need / 2 ** 30:.1f} GiB of memory, "
                               f"more than the {free / 2 ** 30:.1f} GiB available: use at most --set "
                               f"data.max_train_samples={max(1, int(0.8 * free) // (size * size * 3))}")
    existing = next((p for p in [folder, *folder.parents] if p.is_dir()), None)
    disk = shutil.disk_usage(existing).free if existing is not None else None
    if disk is not None and need + (1 << 20) > disk:
        raise NaturalDataError(f"{n} natural training images at {size} px need {need / 2 ** 30:.1f} GiB in the cache "
                               f"{folder}, which has {disk / 2 ** 30:.1f} GiB free: free space there, set CASTLE_CACHE "
                               f"to another disk, or use fewer (--set data.max_train_samples=...)")


def _write_cache(images: np.ndarray, file: Path) -> None:
    """``file`` (and its ``.sha1``) written atomically: a temporary file renamed into place; whatever fails
    (disk full, a kill signal as KeyboardInterrupt) removes the temporary file."""
    folder = file.parent
    fd, tmp = tempfile.mkstemp(prefix=f".train-{os.getpid()}-", suffix=".npy", dir=folder)
    sidecar = file.with_suffix(".sha1")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, images)
        with open(tmp + ".sha1", "w") as f:
            f.write(_checksum(images) + "\n")
        os.replace(tmp + ".sha1", sidecar)                  # renames replace a link itself, never its target
        os.replace(tmp, file)
    except BaseException as e:
        for p in (tmp, tmp + ".sha1"):
            try:
                os.unlink(p)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise NaturalDataError(f"cannot write the natural-image cache {file} ({e.strerror or type(e).__name__}): "
                                   "free space there or set CASTLE_CACHE to another directory") from None
        raise


def training_images(n: int = 4000, size: int = 224, seed: int = 0, procedural_fraction: float = 0.25,
                    cache: Optional[Path] = None, progress: bool = True) -> np.ndarray:
    """``(n, size, size, 3)`` uint8 RGB training images (see the module docstring), cached in one ``.npy`` file
    with a ``.sha1`` checksum beside it. A cache file that does not hold exactly that (truncated, empty, garbage,
    another shape, a checksum that differs) is made again; temporary files of killed writes are removed."""
    from castle_convert.cache import cache_dir
    folder = Path(cache) if cache is not None else cache_dir() / "natural"
    split = split_sources()                                   # read the picture headers once
    file = folder / f"train-{n}-{size}px-seed{seed}-{cache_key(n, size, seed, procedural_fraction, split)}.npy"
    if folder.is_dir():
        _remove_stale_temps(folder)
    images, damaged = _read_cache(file, (n, size, size, 3))
    if images is not None:
        return images
    _check_room(n, size, folder)
    _cache_folder(folder)                                     # writable, before a minute of work
    if progress:
        what = f"the cache file {file.name} is damaged ({damaged}): making it again" if damaged else \
            f"making {n} training images at {size} px (first use, cached in {folder})"
        print(f"natural images: {what} ...", flush=True)
    images = _make_training_images(n, size, seed, procedural_fraction, train=split[0])
    _write_cache(images, file)
    return np.load(file, mmap_mode="r")


def view_boxes(size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """The five evaluation views of a photo: the centre square, then four corner squares of 70 %."""
    w, h = size
    s = min(w, h)
    boxes = [((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)]
    c = int(0.7 * s)
    for x, y in ((0, 0), (w - c, 0), (0, h - c), (w - c, h - c)):
        boxes.append((x, y, x + c, y + c))
    return boxes


def iter_held_out_views(resolution: int, max_images: Optional[int] = None) -> Iterator[np.ndarray]:
    """The held-out views one at a time, ``(resolution, resolution, 3)`` uint8 each, made from the full-size photo:
    five per held-out photo, view by view (every photo's centre square first, then every photo's first corner, ...),
    so the first ``max_images`` cover as many photos as possible. Only the views asked for are made (a 4096-px view
    is 50 MB: making all 60 before the first one ran out of memory); a photo is decoded once and kept only while
    later views need it."""
    _, held = split_sources()
    total = len(held) * len(view_boxes((1, 1)))
    count = total if not max_images else min(int(max_images), total)
    photos: dict[str, Image.Image] = {}
    for i in range(count):
        view, source = divmod(i, len(held))
        src = held[source]
        image = photos.get(src.name) or _load(src)
        if i + len(held) < count:                             # this photo gives a later view too: keep it
            photos[src.name] = image
        else:
            photos.pop(src.name, None)
        yield np.asarray(image.resize((resolution, resolution), Image.BICUBIC, box=view_boxes(image.size)[view],
                                      reducing_gap=3.0))


def held_out_views(resolution: int, max_images: Optional[int] = None) -> np.ndarray:
    """``(V, resolution, resolution, 3)`` uint8: :func:`iter_held_out_views` as one array (the first ``max_images``
    views, or all of them)."""
    return np.stack(list(iter_held_out_views(resolution, max_images)))


DEFAULT_TRAIN_IMAGES = 4000
CACHE_SIZE = 448             # px of the cached training crops (resized to the recipe's resolution by the transform):
                             # real detail up to the resolutions the main job trains at
VAL_SIZE = 256               # px of the held-out views given to the teacher's eval transform


class NaturalImages(Dataset):
    """uint8 (N, H, W, 3) array → (PIL RGB image, label 0) samples: the unlabeled natural images."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return Image.fromarray(np.asarray(self.images[i]), mode="RGB"), 0


def datasets(n: int = DEFAULT_TRAIN_IMAGES, seed: int = 0, progress: bool = True):
    """``(train, val)`` for ``--data natural``: ``n`` training images and the held-out photos' views,
    as (PIL image, 0) samples (no labels)."""
    return (NaturalImages(training_images(n, CACHE_SIZE, seed, progress=progress)),
            NaturalImages(held_out_views(VAL_SIZE)))
