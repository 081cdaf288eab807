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
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .validation import check_int

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
        raise ValueError(
            f"image_size must be at least {MIN_IMAGE_SIZE} pixels to draw a shape, got {image_size}"
        )
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
