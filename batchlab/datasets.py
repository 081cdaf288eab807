"""Offline, deterministic data sets for the course (chapters 1-3 and every later chapter).

Nothing here downloads anything:

* :func:`digits` - 1,797 real handwritten digits (8x8 pixels, 10 classes). The pixels are the
  "Optical Recognition of Handwritten Digits" data set (E. Alpaydin, C. Kaynak; UCI Machine Learning
  Repository, CC BY 4.0), the copy that scikit-learn ships, stored in ``batchlab/data/digits.npz``.
* :func:`shapes` - a procedural image data set of any size and resolution. Every item is drawn in
  ``__getitem__`` from its index, so it costs CPU per sample (like decoding a file) and is the same
  on every run and in every worker process.
* :func:`write_image_folder` - writes a data set as PNG files that ``torchvision.datasets.ImageFolder``
  reads, so a chapter can load real files from disk.
* :class:`Countdown` - the smallest useful ``IterableDataset`` (a stream), which chapter 2 runs with
  two worker processes to show why each worker must take its own share of a stream.

Chapter 3's data sets:

* :func:`shapes_image_folder` - a CPU-heavy data set for measuring loaders: PNG files on disk, decoded
  and augmented by a ``torchvision.transforms.v2`` pipeline in every ``__getitem__`` (written once to a
  cache folder).
* The pitfalls of workers: :class:`SharedGeneratorDataset` (a generator the data set owns, copied
  into every worker) and :class:`LookupTable` (Python objects copied on access).
* :func:`token_sequences` - variable-length token sequences (:class:`TokenSequences`, padded with
  :data:`PAD`) for the padding ``collate_fn`` exercise.

Every data set lives in an importable module, so ``DataLoader`` workers can find them on platforms
that *spawn* workers (macOS, Windows) as well as where they fork (Linux).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .validation import check_bool, check_int, check_seed
from .workers import one_thread

DIGITS_TEST_FRACTION = 0.2
SHAPE_CLASSES = ("circle", "cross", "ring", "square", "triangle")  # sorted, as ImageFolder sorts them
MIN_IMAGE_SIZE = 8


class Digits(Dataset):
    """Handwritten digits as ``(image, label)``: a float tensor of shape (1, 8, 8) in [0, 1] and an int."""

    classes = tuple(str(d) for d in range(10))

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def digits(train: bool = True, transform=None) -> Digits:
    """The digits data set, split once and for all into 1,438 training and 359 test images.

    The split is a fixed permutation (seed 0), so ``digits(train=True)`` and ``digits(train=False)``
    never share an image and are the same on every machine. ``transform`` is applied to each image.
    """
    if not isinstance(train, bool):
        raise TypeError(f"train must be True or False, got {train!r}")
    with resources.files("batchlab").joinpath("data/digits.npz").open("rb") as f:
        data = np.load(f)
        images = torch.from_numpy(data["images"].astype(np.float32) / 16.0).unsqueeze(1)
        labels = torch.from_numpy(data["labels"].astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = round(len(labels) * DIGITS_TEST_FRACTION)
    keep = order[n_test:] if train else order[:n_test]
    return Digits(images[keep].clone(), labels[keep].clone(), transform)


class Shapes(Dataset):
    """Procedural shapes (circle, cross, ring, square, triangle), drawn on demand from the index.

    Each item has a random position, size, rotation, colour and background, plus pixel noise; all of
    them come from a NumPy generator seeded with ``[seed, index]``, so an item is identical wherever and
    whenever it is drawn. Returns ``(image, label)``: a float tensor (channels, size, size) in [0, 1]
    and an int indexing :data:`SHAPE_CLASSES`.
    """

    classes = SHAPE_CLASSES

    def __init__(self, n: int, image_size: int, channels: int, seed: int, transform=None):
        self.n, self.image_size, self.channels, self.seed = n, image_size, channels, seed
        self.transform = transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} is out of range for a data set of {self.n} items")
        index %= self.n
        rng = np.random.default_rng([self.seed, index])  # its own stream for every (seed, index)
        label = int(rng.integers(len(SHAPE_CLASSES)))
        image = draw_shape(label, self.image_size, self.channels, rng)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def shapes(n: int, image_size: int = 32, channels: int = 3, seed: int = 0, transform=None) -> Shapes:
    """A data set of ``n`` procedural shape images of ``image_size`` x ``image_size`` pixels.

    Use a different ``seed`` for a test set (``shapes(1000, seed=1)``). ``channels`` is 1 (grey) or 3.
    """
    check_int("n", n, minimum=1)
    check_int("image_size", image_size)
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels to draw a shape, got {image_size}")
    check_int("channels", channels)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (colour), got {channels}")
    check_int("seed", seed, minimum=0, maximum=2**31 - 1)
    return Shapes(n, image_size, channels, seed, transform)


class Countdown(IterableDataset):
    """A stream of the ints ``start - 1, start - 2, ..., 0`` (chapter 2's ``IterableDataset``).

    An ``IterableDataset`` has no length and no index, only ``__iter__``. With ``num_workers > 0`` a
    ``DataLoader`` runs ``__iter__`` once in *every* worker process, so a stream that ignores this
    yields each item once per worker. With ``split_between_workers=True`` (the default) worker ``k``
    of ``n`` takes every ``n``-th item starting at the ``k``-th, so together the workers yield each
    item once; ``False`` shows the duplicates.

    It lives in a module, not in the notebook, because on macOS and Windows worker processes are
    *spawned* and must import the data set's class by name (chapter 3).
    """

    def __init__(self, start: int, split_between_workers: bool = True):
        self.start = check_int("start", start, minimum=0)
        if not isinstance(split_between_workers, bool):
            raise TypeError(f"split_between_workers must be True or False, got {split_between_workers!r}")
        self.split = split_between_workers

    def __iter__(self):
        info = get_worker_info()  # None in the main process, else this worker's id and the number of workers
        first, step = (info.id, info.num_workers) if (info is not None and self.split) else (0, 1)
        return iter(range(self.start - 1 - first, -1, -step))


def draw_shape(label: int, size: int, channels: int, rng: np.random.Generator) -> torch.Tensor:
    """Draw one shape of class ``label`` with position, size, angle, colours and noise from ``rng``.

    The shape is described by a signed distance (negative inside, in pixels), turned into coverage
    with a one-pixel soft edge so that small images stay smooth.
    """
    u = rng.random(4)
    radius = size * (0.2 + 0.15 * u[0])
    margin = radius + 1
    cx = margin + (size - 2 * margin) * u[1]
    cy = margin + (size - 2 * margin) * u[2]
    angle = 2 * math.pi * u[3]
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords - cy, coords - cx, indexing="ij")
    cos, sin = math.cos(angle), math.sin(angle)
    x, y = x * cos + y * sin, -x * sin + y * cos
    distance = _signed_distance(SHAPE_CLASSES[label], x, y, radius)
    coverage = (0.5 - distance).clamp(0, 1)

    foreground = torch.from_numpy(0.55 + 0.45 * rng.random(3, dtype=np.float32))  # a light colour ...
    background = torch.from_numpy(0.4 * rng.random(3, dtype=np.float32))  # ... on a dark one, always visible
    if channels == 1:
        foreground, background = foreground.mean(0, keepdim=True), background.mean(0, keepdim=True)
    image = background[:, None, None] + (foreground - background)[:, None, None] * coverage
    image = image + torch.from_numpy(rng.normal(0, 0.05, image.shape).astype(np.float32))
    return image.clamp(0, 1)


def _signed_distance(shape: str, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    if shape == "circle":
        return torch.hypot(x, y) - r
    if shape == "square":
        return torch.maximum(x.abs(), y.abs()) - 0.8 * r
    if shape == "triangle":  # the largest distance past the three sides of an equilateral triangle
        sides = [x * math.cos(a) + y * math.sin(a) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
        return torch.stack(sides).amax(0) - 0.55 * r
    if shape == "cross":
        arm = 0.3 * r
        horizontal = torch.maximum(x.abs() - r, y.abs() - arm)
        vertical = torch.maximum(y.abs() - r, x.abs() - arm)
        return torch.minimum(horizontal, vertical)
    if shape == "ring":
        return (torch.hypot(x, y) - 0.7 * r).abs() - 0.3 * r
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPE_CLASSES)}")


def write_image_folder(dataset: Dataset, path) -> Path:
    """Write every ``(image, label)`` of ``dataset`` as ``path/<class name>/<index>.png``.

    This is the layout ``torchvision.datasets.ImageFolder(path)`` reads; it numbers classes in the
    sorted order of their names, which is the order of ``dataset.classes`` for the course's data sets,
    so the labels read back are the labels written. Images must be float tensors
    in [0, 1] with 1 or 3 channels; class names come from ``dataset.classes`` when it has them.
    Returns the folder as a ``Path``.
    """
    from torchvision.transforms.v2.functional import to_pil_image

    if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset must be a map-style torch Dataset with a length, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty: there is nothing to write")
    root = Path(path)
    names = getattr(dataset, "classes", None)
    width = len(str(len(dataset) - 1))
    for index in range(len(dataset)):
        image, label = dataset[index]
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"item {index}: image must be a (1 or 3, H, W) tensor, got {shape}")
        folder = root / (names[label] if names else str(label))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        to_pil_image(pixels).save(folder / f"{index:0{width}d}.png")
    return root


# ----------------------------------------------------------------------------------------------------
# A CPU-heavy data set for chapter 3: PNG files decoded and augmented in every __getitem__

SHAPES_FOLDER_SIZE = 1024


def shapes_image_folder(
    n: int = SHAPES_FOLDER_SIZE,
    image_size: int = 128,
    *,
    crop_size: int | None = None,
    augment: bool = True,
    seed: int = 0,
    root=None,
):
    """Procedural shapes written as PNG files and read back with ``torchvision.datasets.ImageFolder``.

    Every ``__getitem__`` reads a file, decodes it (``ImageFolder``'s loader, with Pillow), turns it
    into a uint8 tensor and, with ``augment``, takes a random resized crop of ``crop_size`` pixels
    (default 7/8 of ``image_size``), flips it at random and jitters its colours; then converts to float
    and normalises with the per-channel mean and std of these files.
    That is real CPU work per sample, which is what ``DataLoader`` workers share (chapter 3).

    The files are written once, to ``root`` (default: ``$BATCHLAB_CACHE`` or the system temporary
    folder, under ``batchlab-cache/shapes-<n>-<image_size>px-seed<seed>``), and reused afterwards. A
    ``root`` must be new, empty, or a folder this function wrote with the same ``n``, ``image_size`` and
    ``seed``; anything else is refused with a ``ValueError`` rather than mixed with these files. The
    data set's ``mean`` and ``std`` attributes hold the statistics used by ``Normalize``.
    """
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    check_int("n", n, minimum=1)
    check_int("image_size", image_size, minimum=16)
    crop_size = (
        image_size * 7 // 8 if crop_size is None else check_int("crop_size", crop_size, minimum=8, maximum=image_size)
    )
    check_bool("augment", augment)
    check_seed("seed", seed)
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a folder path (a str or pathlib.Path) or None, got {type(root).__name__}")
    folder = Path(root) if root is not None else _cache_dir() / f"shapes-{n}-{image_size}px-seed{seed}"
    about = {"n": n, "image_size": image_size, "seed": seed}
    mean, std = _write_once(folder, lambda path: write_image_folder(shapes(n, image_size, seed=seed), path), about)
    # ImageFolder's default loader decodes with Pillow; ToImage turns the picture into a uint8 tensor
    steps = [v2.ToImage()]
    if augment:
        steps += [
            v2.RandomResizedCrop(crop_size, scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
        ]
    else:
        steps += [v2.CenterCrop(crop_size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    dataset = ImageFolder(str(folder), transform=v2.Compose(steps))
    dataset.mean, dataset.std = mean, std
    return dataset


def _cache_dir() -> Path:
    return Path(os.environ.get("BATCHLAB_CACHE") or Path(tempfile.gettempdir()) / "batchlab-cache")


def _write_once(folder: Path, write, about: dict) -> tuple[list, list]:
    """Write the folder with ``write(path)`` unless a complete copy exists; return its pixel mean and std.

    The files go to a private temporary folder that is renamed into place only when complete (with
    ``stats.json`` written last), so an interrupted run never leaves a half-written data set behind.
    ``about`` (the arguments that made the files) is kept in ``stats.json``, so that a copy made with
    other arguments is never taken for this one.
    """
    stats_file = folder / "stats.json"
    _check_folder(folder, about)
    if not stats_file.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=folder.parent))
        try:
            with one_thread():  # small per-image operations: one thread is faster on a busy machine
                write(partial)
                (partial / "stats.json").write_text(json.dumps({**_pixel_stats(partial), "about": about}))
            try:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # an empty root given by the caller (Windows cannot rename onto it)
                partial.rename(folder)
            except OSError:  # another process finished first: use its copy
                if not stats_file.exists():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    _check_folder(folder, about)  # a copy another process finished first must match too
    stats = json.loads(stats_file.read_text())
    return stats["mean"], stats["std"]


def _check_folder(folder: Path, about: dict) -> None:
    """Refuse a ``root`` that is a file, a folder of other files, or a copy written with other arguments."""
    wanted = ", ".join(f"{key}={value}" for key, value in about.items())
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"root {str(folder)!r} is a file, not a folder; pass a new or empty folder for the images")
    stats_file = folder / "stats.json"
    if stats_file.exists():
        try:
            written = json.loads(stats_file.read_text()).get("about", about)  # copies from before "about": by name
        except (OSError, ValueError, AttributeError):
            written = None
        if written != about:
            made = ", ".join(f"{k}={v}" for k, v in written.items()) if isinstance(written, dict) else "unknown"
            raise ValueError(
                f"root {str(folder)!r} holds images written with {made}, not {wanted}; pass another "
                "root (a new or empty folder), the same arguments, or root=None for the cache"
            )
    elif folder.is_dir() and any(folder.iterdir()):
        raise ValueError(
            f"root {str(folder)!r} already holds other files, and shapes_image_folder writes into a "
            "folder of its own; pass a new or empty folder, or root=None for the cache"
        )


def _pixel_stats(folder: Path) -> dict:
    """Per-channel mean and std of all pixels of the PNG files in ``folder``, on the [0, 1] scale."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    from torchvision.datasets.folder import pil_loader
    from torchvision.transforms.v2.functional import pil_to_tensor

    for path in sorted(folder.glob("*/*.png")):
        pixels = pil_to_tensor(pil_loader(str(path))).double().div_(255).flatten(1)
        total += pixels.sum(1)
        squares += pixels.square().sum(1)
        count += pixels.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return {"mean": [round(v, 4) for v in mean.tolist()], "std": [round(v, 4) for v in std.tolist()]}


# ----------------------------------------------------------------------------------------------------
# Chapter 3's pitfalls of workers: random numbers and memory


class SharedGeneratorDataset(Dataset):
    """Item ``i`` is ``(i, r)`` with ``r`` drawn from a NumPy generator the data set creates in ``__init__``.

    The pitfall of chapter 3: every worker process gets a *copy* of that generator in the same state,
    so the workers draw the same "random" numbers, and (without persistent workers) every epoch
    repeats the previous one. Pass :func:`seed_worker` as ``worker_init_fn`` to fix it.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n = check_int("n", n, minimum=1)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return index, float(self.rng.random())


class LookupTable(Dataset):
    """Item ``i`` is the number ``i / n``, kept in a Python list (``"list"``) or a NumPy array (``"numpy"``).

    A list holds one Python object per number; reading an object updates its reference count, which
    writes to its memory page. In a forked worker that write makes the operating system copy the page
    (copy-on-write), so the worker slowly gets its own copy of everything it reads. A NumPy array is
    one buffer of raw numbers and reading it writes nothing (chapter 3, memory of workers).
    """

    def __init__(self, n: int, storage: str = "list"):
        check_int("n", n, minimum=1)
        if storage not in ("list", "numpy"):
            raise ValueError(f"storage must be 'list' or 'numpy', got {storage!r}")
        self.storage = storage
        values = np.arange(n, dtype=np.float64) / n
        self.values = values.tolist() if storage == "list" else values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> float:
        return float(self.values[index])


# ----------------------------------------------------------------------------------------------------
# Variable-length token sequences (chapter 3's padding exercise)

PAD = 0  # the token id used for padding; real tokens are 1 .. vocab - 1


class TokenSequences(Dataset):
    """Item ``i`` is ``(tokens, label)``: a 1-D int64 tensor of 1..``max_length`` token ids (never 0) and 0 or 1.

    The label says whether the sequence is longer than half of ``max_length``. Lengths differ from
    item to item, so ``default_collate`` cannot stack them: this is the data set of the exercise.
    """

    def __init__(self, n: int, max_length: int, vocab: int, seed: int):
        self.n, self.max_length, self.vocab, self.seed = n, max_length, vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} is out of range for a data set of {self.n} items")
        rng = np.random.default_rng([self.seed, index])
        length = int(rng.integers(1, self.max_length + 1))
        tokens = torch.from_numpy(rng.integers(1, self.vocab, size=length))
        return tokens, int(2 * length > self.max_length)


def token_sequences(n: int = 100, *, max_length: int = 12, vocab: int = 50, seed: int = 0) -> TokenSequences:
    """A data set of ``n`` variable-length token sequences for the padding exercise (see :class:`TokenSequences`)."""
    check_int("n", n, minimum=1)
    check_int("max_length", max_length, minimum=1)
    check_int("vocab", vocab, minimum=2)
    check_seed("seed", seed)
    return TokenSequences(n, max_length, vocab, seed)
