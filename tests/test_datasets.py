import pytest
import torch
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from batchlab import datasets


def test_digits_split_is_fixed_and_disjoint():
    train, test = datasets.digits(train=True), datasets.digits(train=False)
    assert (len(train), len(test)) == (1438, 359)
    image, label = train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and isinstance(label, int)
    assert torch.equal(datasets.digits().images, train.images)  # the same split every time
    train_rows = {tuple(x.flatten().tolist()) for x in train.images}
    overlap = sum(tuple(x.flatten().tolist()) in train_rows for x in test.images)
    assert overlap <= 5  # a few digits are pixel-identical by chance; the split itself shares no index
    assert sorted(set(train.labels.tolist())) == list(range(10))


def test_digits_applies_transform():
    ds = datasets.digits(transform=v2.Normalize(mean=[0.5], std=[0.5]))
    image, _ = ds[3]
    assert torch.allclose(image, (datasets.digits()[3][0] - 0.5) / 0.5)


def test_shapes_items_are_deterministic_per_index():
    a, b = datasets.shapes(50, seed=3), datasets.shapes(50, seed=3)
    for i in (0, 17, 49, -1):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert not torch.equal(a[0][0], datasets.shapes(50, seed=4)[0][0])
    image, label = a[0]
    assert image.shape == (3, 32, 32) and 0 <= label < len(datasets.SHAPE_CLASSES)
    assert datasets.shapes(5, image_size=20, channels=1)[0][0].shape == (1, 20, 20)


def test_shapes_covers_every_class():
    labels = [datasets.shapes(300)[i][1] for i in range(300)]
    assert set(labels) == set(range(len(datasets.SHAPE_CLASSES)))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(n=0), ValueError, "n must be a positive int, got 0"),
        (dict(n=-5), ValueError, "n must be a positive int, got -5"),
        (dict(n=2.5), TypeError, "n must be an int"),
        (dict(n=10, image_size=4), ValueError, "image_size must be at least 8"),
        (dict(n=10, image_size=-32), ValueError, "image_size must be at least 8"),
        (dict(n=10, channels=2), ValueError, "channels must be 1 (grey) or 3"),
    ],
)
def test_shapes_rejects_bad_sizes(kwargs, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        datasets.shapes(**kwargs)


def test_shapes_out_of_range_index():
    with pytest.raises(IndexError):
        datasets.shapes(3)[3]


def test_write_image_folder_round_trips_through_imagefolder(tmp_path):
    ds = datasets.shapes(12, image_size=16)
    root = datasets.write_image_folder(ds, tmp_path / "shapes")
    folder = ImageFolder(root, transform=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]))
    assert len(folder) == 12
    assert folder.classes == sorted(folder.classes)
    by_name = {path.rsplit("/", 1)[-1]: label for path, label in folder.samples}
    for index in range(12):
        image, label = ds[index]
        name = f"{index:02d}.png"
        assert folder.classes[by_name[name]] == datasets.SHAPE_CLASSES[label]
    loaded, _ = folder[0]
    original = ds[int(folder.samples[0][0].rsplit("/", 1)[-1][:2])][0]
    assert (loaded - original).abs().max() <= 1 / 255 + 1e-6  # only the 8-bit rounding differs


def test_write_image_folder_rejects_empty_and_wrong_items(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        datasets.write_image_folder(torch.utils.data.TensorDataset(torch.zeros(0, 1, 4, 4)), tmp_path)
    bad = torch.utils.data.TensorDataset(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"item 0: image must be a \(1 or 3, H, W\) tensor, got \(5,\)"):
        datasets.write_image_folder(bad, tmp_path)


def test_countdown_streams_every_item_once_per_loader():
    assert list(datasets.Countdown(4)) == [3, 2, 1, 0]  # in the main process: the whole stream
    assert list(datasets.Countdown(0)) == []


@pytest.mark.parametrize("split, expected", [(True, [0, 1, 2, 3, 4, 5]), (False, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])])
def test_countdown_with_two_workers_splits_or_duplicates(split, expected):
    loader = torch.utils.data.DataLoader(
        datasets.Countdown(6, split_between_workers=split), batch_size=3, num_workers=2
    )
    assert sorted(int(x) for batch in loader for x in batch) == expected


def test_countdown_rejects_bad_arguments():
    with pytest.raises(ValueError, match="start must be an int >= 0, got -1"):
        datasets.Countdown(-1)
    with pytest.raises(TypeError, match="split_between_workers must be True or False"):
        datasets.Countdown(3, split_between_workers="yes")
