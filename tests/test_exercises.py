import pytest
import torch
from torch.utils.data import Dataset

from batchlab import datasets, exercises


def test_placeholder_prints_the_task(capsys):
    exercises.check_steps_per_epoch(None)
    exercises.check_scaled_lr(None)
    exercises.check_squares_dataset(None)
    exercises.check_normalize_stats(None, None, datasets.shapes(4))
    assert capsys.readouterr().out.count("Your turn") == 4


def test_steps_per_epoch():
    exercises.check_steps_per_epoch(15, n=1438, batch_size=100, drop_last=False)
    exercises.check_steps_per_epoch(14, n=1438, batch_size=100, drop_last=True)
    with pytest.raises(AssertionError, match="last, partial batch"):
        exercises.check_steps_per_epoch(14, n=1438, batch_size=100, drop_last=False)


def test_scaled_lr():
    exercises.check_scaled_lr(0.4, base_lr=0.05, base_batch=32, batch=256)
    with pytest.raises(AssertionError, match="lr / batch size constant"):
        exercises.check_scaled_lr(0.05 * 8**0.5, base_lr=0.05, base_batch=32, batch=256)


def test_normalize_stats():
    ds = datasets.shapes(20, image_size=16)
    images = torch.stack([ds[i][0] for i in range(20)])
    exercises.check_normalize_stats(images.mean((0, 2, 3)), images.std((0, 2, 3)), ds)
    with pytest.raises(AssertionError, match="mean is off"):
        exercises.check_normalize_stats(images.mean((0, 1, 2, 3)).repeat(3) + 0.1, images.std((0, 2, 3)), ds)
    with pytest.raises(AssertionError, match="std is off"):
        per_image_std = images.flatten(2).std(2).mean(0)
        exercises.check_normalize_stats(images.mean((0, 2, 3)), per_image_std, ds)


def test_squares_dataset():
    class Right(Dataset):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return torch.tensor([float(i)]), i * i

    class OffByOne(Right):
        def __len__(self):
            return self.n - 1

    exercises.check_squares_dataset(Right)
    with pytest.raises(AssertionError, match="should be 5, got 4"):
        exercises.check_squares_dataset(OffByOne)
