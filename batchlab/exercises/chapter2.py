"""The checks of chapter 2's exercises: a map-style ``Dataset`` and the statistics for ``Normalize``."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .turn import your_turn


def check_normalize_stats(mean, std, dataset: Dataset):
    """Chapter 2: per-channel mean and std of ``dataset``'s images (for ``v2.Normalize``)."""
    if your_turn("compute the per-channel mean and std over every pixel of every image.", mean, std):
        return
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    channels = images.transpose(0, 1).flatten(1)
    expected_mean, expected_std = channels.mean(1), channels.std(1)
    mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    assert mean.shape == expected_mean.shape, (
        f"mean should have one value per channel ({len(expected_mean)}), got shape {tuple(mean.shape)}"
    )
    assert torch.allclose(mean, expected_mean, atol=1e-3), (
        "mean is off: average over the images, the height and the width, but not over the channels"
    )
    assert torch.allclose(std, expected_std, atol=1e-3), (
        "std is off: it is the spread of all pixels of a channel, not the average of per-image stds"
    )
    print(
        f"Correct: mean {[round(m, 3) for m in expected_mean.tolist()]}, "
        f"std {[round(s, 3) for s in expected_std.tolist()]}"
    )


def check_squares_dataset(dataset_class):
    """Chapter 2: a map-style ``Dataset`` whose item ``i`` is ``(tensor([i]), i * i)`` for ``i < n``."""
    if your_turn("complete SquaresDataset and pass the class (not an instance) here.", dataset_class):
        return
    ds = dataset_class(5)
    assert isinstance(ds, Dataset), "SquaresDataset should subclass torch.utils.data.Dataset"
    assert len(ds) == 5, f"len(SquaresDataset(5)) should be 5, got {len(ds)}: what should __len__ return?"
    for i in range(5):
        x, y = ds[i]
        assert torch.is_tensor(x) and x.tolist() == [float(i)], f"item {i}: the input should be tensor([{i}.])"
        assert y == i * i, f"item {i}: the target should be {i * i}, got {y}"
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch[0].shape == (5, 1), "a DataLoader should stack the inputs into shape (5, 1)"
    print("Correct: a DataLoader can batch your data set.")
