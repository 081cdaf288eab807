"""Chapter 3: manual batching equals DataLoader; loader measurements are sane and leave no worker behind."""

import gc
import os
import signal
import threading
import time

import psutil
import pytest
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset

import batchlab
from batchlab import batching, datasets, loaders, process, workers
from batchlab.exercises import chapter3
from batchlab.widgets import LoaderExplorer


def children():
    """Live child processes of this test process (DataLoader workers, if any were left behind).

    Python's multiprocessing resource tracker, which spawned workers start once and which lives as long
    as the test session, is not a worker and is not counted.
    """
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


def started_since(before, wait=2.0):
    """Pids of child processes started since ``before`` that are still alive after ``wait`` seconds."""
    psutil.wait_procs([p for p in children() if p.pid not in before], timeout=wait)
    return [p.pid for p in children() if p.pid not in before]


@pytest.fixture(autouse=True)
def no_workers_left():
    """Every test must end with no more child processes than it started with."""
    before = {p.pid for p in children()}
    yield
    left = started_since(before, wait=5)
    assert not left, f"worker processes left behind: {left}"


@pytest.fixture(scope="module")
def digits():
    return datasets.digits(train=True)


@pytest.fixture(scope="module")
def small_images():
    """Cheap procedural images: enough samples for a few timed batches, fast to draw."""
    return datasets.shapes(160, image_size=16)


def assert_same_batches(ours, theirs):
    ours, theirs = list(ours), list(theirs)
    assert len(ours) == len(theirs), f"{len(ours)} batches vs {len(theirs)}"
    for number, (a, b) in enumerate(zip(ours, theirs)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and torch.equal(x, y), f"batch {number} differs"


# --- iter_batches equals DataLoader -----------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_iter_batches_equals_dataloader(digits, shuffle, drop_last):
    seed = 7
    sampler = (
        RandomSampler(digits, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(digits)
    )
    loader = DataLoader(digits, batch_size=100, sampler=sampler, drop_last=drop_last)
    ours = list(batchlab.iter_batches(digits, 100, shuffle=shuffle, drop_last=drop_last, seed=seed))
    assert_same_batches(ours, loader)
    # 1,438 samples: 14 full batches, and a last one of 38 unless drop_last drops it
    assert len(ours) == (14 if drop_last else 15)
    assert len(ours[-1][0]) == (100 if drop_last else 38)


def test_shuffled_order_is_the_seeded_permutation():
    data = TensorDataset(torch.arange(23))
    (indices,) = zip(*batchlab.iter_batches(data, 5, shuffle=True, seed=3))
    order = torch.randperm(23, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat(indices), order)
    (again,) = zip(*batchlab.iter_batches(data, 5, shuffle=True, seed=3))
    (other,) = zip(*batchlab.iter_batches(data, 5, shuffle=True, seed=4))
    assert torch.equal(torch.cat(again), order) and not torch.equal(torch.cat(other), order)


class Flip(Dataset):
    """Digits whose transform flips each image with probability 1/2 and records what it was given."""

    def __init__(self, base):
        self.base, self.seen = base, []

    def __len__(self):
        return 64

    def __getitem__(self, index):
        image, label = self.base[index]
        self.seen.append(tuple(image.shape))
        if torch.rand(()) < 0.5:  # draws from the global generator, as torchvision transforms do
            image = image.flip(-1)
        return image, label


def test_random_per_sample_transforms_match_dataloader(digits):
    data = Flip(digits)
    torch.manual_seed(1)
    ours = list(batchlab.iter_batches(data, 10))
    torch.manual_seed(1)
    # With generator=None a DataLoader would draw its workers' base seed from the global generator
    # first, shifting every random number after it; its own generator keeps the global one in step.
    theirs = list(DataLoader(data, batch_size=10, generator=torch.Generator()))
    assert_same_batches(ours, theirs)
    assert set(data.seen) == {(1, 8, 8)}  # the transform saw one sample at a time, never a batch


def test_custom_collate_fn_is_used(digits):
    batches = list(batchlab.iter_batches(digits, 500, collate_fn=len))
    assert batches == [500, 500, 438]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int, got 0"),
        ({"batch_size": 2.5}, TypeError, "batch_size must be an int, got 2.5"),
        ({"batch_size": 4, "shuffle": "yes"}, TypeError, "shuffle must be True or False, got 'yes'"),
        ({"batch_size": 4, "collate_fn": 3}, TypeError, "collate_fn must be a function"),
    ],
)
def test_iter_batches_rejects_bad_arguments_when_called(digits, kwargs, error, message):
    with pytest.raises(error, match=message):
        batchlab.iter_batches(digits, **kwargs)  # no next(): checked before the first batch


def test_iter_batches_rejects_empty_and_non_datasets():
    with pytest.raises(ValueError, match="dataset is empty"):
        batchlab.iter_batches(TensorDataset(torch.zeros(0, 3)), 4)
    with pytest.raises(TypeError, match="map-style torch Dataset"):
        batchlab.iter_batches([1, 2, 3], 2)


class Ragged(Dataset):
    """Images whose size changes at ``index >= change_at``: they cannot be stacked into one batch."""

    def __init__(self, n=64, change_at=2):
        self.n, self.change_at = n, change_at

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        size = 8 if index < self.change_at else 6
        return torch.zeros(3, size, size), index % 2


def test_uncollatable_samples_name_the_field_and_shapes():
    with pytest.raises(ValueError) as error:
        next(batchlab.iter_batches(Ragged(), 4))
    message = str(error.value)
    assert "field [0]" in message
    assert "samples[0] has shape (3, 8, 8)" in message and "samples[2] has shape (3, 6, 6)" in message
    assert "collate_fn that pads" in message


def test_collate_problem_in_dicts_and_mixed_types():
    samples = [{"x": torch.zeros(2), "y": 1}, {"x": torch.zeros(3), "y": 0}]
    assert "field ['x'] has tensors of different shapes" in batching.collate_problem(samples)
    assert "field [1] mixes types" in batching.collate_problem([(torch.zeros(1), 1), (torch.zeros(1), "a")])
    assert batching.collate_problem([(torch.zeros(2), 1), (torch.ones(2), 0)]) is None
    batch = batching.collate([(torch.zeros(2), 1), (torch.ones(2), 0)])
    assert batch[0].shape == (2, 2) and batch[1].tolist() == [1, 0]


# --- loader_throughput and loader_sweep ---------------------------------------------------------------


def test_loader_throughput_returns_sane_stats(small_images):
    rng_state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    before = {p.pid for p in children()}
    single = batchlab.loader_throughput(small_images, batch_size=16, num_workers=0, batches=4, warmup=1, repeats=2)
    workers = batchlab.loader_throughput(small_images, batch_size=16, num_workers=2, batches=4, warmup=1, repeats=2)
    assert not started_since(before, wait=0.5)  # the workers are gone when the function returns
    for stats in (single, workers):
        assert isinstance(stats, batchlab.LoaderStats)
        assert len(stats.runs_samples_per_second) == len(stats.runs_first_batch_seconds) == 2
        assert 0 < stats.samples_per_second < float("inf")
        assert 0 < stats.first_batch_seconds < 60
        assert 0 <= stats.busy_fraction < 4
    assert (single.num_workers, workers.num_workers) == (0, 2)
    # without workers the main process does the loading itself; with workers it mostly waits
    assert single.busy_fraction > workers.busy_fraction
    assert str(workers).startswith("DataLoader(batch_size=16, num_workers=2): ")
    # the caller's random state and thread count are as they were
    assert torch.equal(torch.random.get_rng_state(), rng_state) and torch.get_num_threads() == threads


def test_iter_batches_throughput_is_measured_the_same_way(small_images):
    stats = loaders.iter_batches_throughput(small_images, batch_size=16, batches=3, warmup=1, repeats=2)
    assert stats.loader == "iter_batches" and stats.setting == "iter_batches(batch_size=16)"
    assert len(stats.runs_samples_per_second) == 2 and stats.samples_per_second > 0


def test_warmup_zero_times_the_first_batch_too(small_images):
    stats = batchlab.loader_throughput(small_images, batch_size=16, batches=1, warmup=0, repeats=1)
    # one batch, timed from iter(): its rate is exactly batch size / time to the first batch (+ clock reads)
    assert stats.samples_per_second == pytest.approx(16 / stats.first_batch_seconds, rel=0.2)


def test_persistent_workers_start_once(small_images):
    stats = batchlab.loader_throughput(
        small_images,
        batch_size=16,
        num_workers=1,
        persistent_workers=True,
        prefetch_factor=4,
        batches=2,
        warmup=1,
        repeats=3,
    )
    assert len(stats.runs_first_batch_seconds) == 3
    assert "persistent_workers=True, prefetch_factor=4" in stats.setting


def test_more_workers_than_cores_warning_is_kept(small_images):
    too_many = loaders.usable_cores() + 1
    stats = batchlab.loader_throughput(
        small_images, batch_size=16, num_workers=too_many, batches=1, warmup=1, repeats=1
    )
    assert any("worker" in message for message in stats.warnings)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int, got 0"),
        ({"batch_size": 8, "num_workers": -1}, ValueError, "num_workers must be an int >= 0, got -1"),
        ({"batch_size": 8, "prefetch_factor": 2}, ValueError, "prefetch_factor=2 needs num_workers > 0"),
        ({"batch_size": 8, "num_workers": 2, "prefetch_factor": 0}, ValueError, "prefetch_factor must be a positive"),
        ({"batch_size": 8, "persistent_workers": True}, ValueError, "persistent_workers=True needs num_workers > 0"),
        ({"batch_size": 8, "num_workers": 2, "pin_memory": 1}, TypeError, "pin_memory must be True or False"),
        ({"batch_size": 8, "num_workers": 2, "batches": 100}, ValueError, r"dataset has 160 samples, but"),
        ({"batch_size": 8, "num_workers": 2, "repeats": 0}, ValueError, "repeats must be a positive int"),
    ],
)
def test_loader_throughput_rejects_bad_arguments_before_workers_start(small_images, kwargs, error, message):
    with pytest.raises(error, match=message):
        batchlab.loader_throughput(small_images, **kwargs)


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="dataset is empty"):
        batchlab.loader_throughput(TensorDataset(torch.zeros(0, 2)), batch_size=4, num_workers=2)


def test_uncollatable_first_batch_fails_in_the_main_process():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"field \[0\] has tensors of different shapes"):
        batchlab.loader_throughput(Ragged(change_at=2), batch_size=4, num_workers=2, batches=2, warmup=1)
    assert time.perf_counter() - start < 5  # refused before any worker was started


def test_uncollatable_later_batch_fails_in_a_worker_and_stops_all_workers():
    # the first batch collates, so the check passes; a worker meets the bad samples later
    data = Ragged(n=64, change_at=40)
    before = {p.pid for p in children()}
    with pytest.raises(
        ValueError, match=r"field \[0\] has tensors of different shapes \(samples\[0\] has shape"
    ) as error:
        batchlab.loader_throughput(data, batch_size=8, num_workers=2, batches=6, warmup=1, repeats=1)
    # checked while the traceback (which keeps the loader's iterator alive) is still held
    assert error.traceback and not started_since(before)


class Slow(Dataset):
    def __len__(self):
        return 400

    def __getitem__(self, index):
        time.sleep(0.01)
        return torch.zeros(2), 0


def test_keyboard_interrupt_leaves_no_worker_behind(ctrl_c):
    before = {p.pid for p in children()}
    timer = threading.Timer(1.0, os.kill, args=(os.getpid(), signal.SIGINT))  # Ctrl-C, one second in
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt) as interrupt:
            batchlab.loader_throughput(Slow(), batch_size=4, num_workers=2, batches=90, warmup=1, repeats=5)
    finally:
        timer.cancel()
    # checked while the traceback (which keeps the loader's iterator alive) is still held
    assert interrupt.traceback and not started_since(before)


def test_stop_workers_adapter_still_matches_torch(small_images):
    """batchlab uses one private DataLoader API; fail loudly here if torch renames it."""
    iterator = iter(DataLoader(small_images, batch_size=8, num_workers=1))
    try:
        assert hasattr(iterator, "_workers") and callable(getattr(iterator, "_shutdown_workers", None)), (
            "torch changed DataLoader's private _shutdown_workers/_workers: update workers.stop_workers"
        )
        next(iterator)
        assert len(children()) >= 1
    finally:
        workers.stop_workers(iterator)
    assert not [p for p in children() if p.pid in {w.pid for w in iterator._workers}]
    workers.stop_workers(None)  # nothing to do
    workers.stop_workers(iter(DataLoader(small_images, batch_size=8)))  # single process: nothing to do


def test_frozen_gc_freezes_only_inside_the_block():
    assert gc.get_freeze_count() == 0
    with workers.frozen_gc():
        assert gc.get_freeze_count() > 0  # what a worker forked here inherits
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own freeze is left as it is
    try:
        frozen = gc.get_freeze_count()
        with workers.frozen_gc():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_loader_sweep_table_and_figure(small_images):
    sweep = batchlab.loader_sweep(small_images, num_workers=(0, 1), batch_size=(8, 16), repeats=2, batches=2, warmup=1)
    assert sorted((s.batch_size, s.num_workers) for s in sweep.stats) == [(8, 0), (8, 1), (16, 0), (16, 1)]
    assert all(len(s.runs_samples_per_second) == 2 for s in sweep.stats)
    assert sweep.cores == loaders.usable_cores()
    lines = str(sweep).splitlines()
    assert len(lines) == 5 and "samples/s" in lines[0]
    assert sweep.speedup(1, batch_size=8) == pytest.approx(
        next(s for s in sweep.stats if (s.batch_size, s.num_workers) == (8, 1)).samples_per_second
        / next(s for s in sweep.stats if (s.batch_size, s.num_workers) == (8, 0)).samples_per_second
    )
    fig = sweep.figure(highlight=(8, 1))
    assert isinstance(fig, Figure)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "batch size 8" in labels and "batch size 16" in labels
    assert f"{sweep.cores} usable CPU cores" in labels
    with pytest.raises(ValueError, match="num_workers=3"):
        sweep.speedup(3)


def test_loader_sweep_checks_every_setting_first(small_images):
    with pytest.raises(ValueError, match="num_workers must be an int >= 0, got -1"):
        batchlab.loader_sweep(small_images, num_workers=(0, -1))
    with pytest.raises(ValueError, match="dataset has 160 samples"):
        batchlab.loader_sweep(small_images, num_workers=(0,), batch_size=(8, 64), batches=2, warmup=1)


def test_loader_sweep_names_a_bad_grid_or_option(small_images):
    for bad in (None, "32", 32.0, {32}):
        with pytest.raises(TypeError, match=r"batch_size must be an int or a non-empty list of ints, got"):
            batchlab.loader_sweep(small_images, batch_size=bad)
    with pytest.raises(TypeError, match="num_workers must be an int or a non-empty list of ints, got None"):
        batchlab.loader_sweep(small_images, num_workers=None)
    with pytest.raises(ValueError, match=r"batch_size must be an int or a non-empty list of ints, got \(\)"):
        batchlab.loader_sweep(small_images, batch_size=[])
    with pytest.raises(TypeError, match="batch_size must be an int, got True"):
        batchlab.loader_sweep(small_images, batch_size=[True])
    with pytest.raises(TypeError, match="unknown options batchs; it passes these to loader_throughput: batches"):
        batchlab.loader_sweep(small_images, batchs=2)
    sweep = batchlab.loader_sweep(small_images, num_workers=range(1), batch_size=16, repeats=1, batches=1, warmup=1)
    assert [(s.batch_size, s.num_workers) for s in sweep.stats] == [(16, 0)]


def test_loader_stats_without_runs_print_and_explain():
    empty = loaders.LoaderStats("DataLoader", 8, 2)
    assert str(empty) == "DataLoader(batch_size=8, num_workers=2): not measured (no runs)"
    assert repr(empty).startswith("LoaderStats(loader='DataLoader', batch_size=8")
    with pytest.raises(ValueError, match=r"DataLoader\(batch_size=8, num_workers=2\) has no runs yet"):
        _ = empty.samples_per_second
    assert str(loaders.LoaderSweep([], 2)).split() == [
        "batch",
        "size",
        "workers",
        "samples/s",
        "first",
        "batch",
        "main",
        "busy",
    ]  # the header of a table without rows


@pytest.mark.parametrize(
    "call",
    [
        lambda data: list(batchlab.iter_batches(data, 64)),
        lambda data: batchlab.loader_throughput(data, batch_size=64),
        lambda data: loaders.iter_batches_throughput(data, batch_size=64),
        lambda data: batchlab.loader_sweep(data, batch_size=64),
        lambda data: workers.worker_memory(data, batch_size=64),
    ],
)
def test_every_loader_function_says_an_empty_dataset_is_empty(call):
    # not "batch_size must be at most 0, got 64": the data set is what is wrong
    with pytest.raises(ValueError, match="dataset is empty: it must hold at least one sample"):
        call(TensorDataset(torch.zeros(0, 2)))


def test_usable_cores():
    assert 1 <= loaders.usable_cores() <= os.cpu_count()


def test_cgroup_quotas_of_both_versions_are_read(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert loaders._cgroup_cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert loaders._cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert loaders._cgroup_cpu_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert loaders._cgroup_cpu_quota(v1) is None
    assert loaders._cgroup_cpu_quota(tmp_path / "missing") is None


# --- the CPU-heavy image folder ------------------------------------------------------------------------


def test_shapes_image_folder_is_written_once_and_reads_back(tmp_path):
    root = tmp_path / "folder"
    data = datasets.shapes_image_folder(20, 32, augment=False, root=root)
    assert len(data) == 20 and data.classes == list(datasets.SHAPE_CLASSES)
    source = datasets.shapes(20, 32)
    by_index = {int(os.path.basename(path)[:-4]): label for path, label in data.samples}
    assert by_index == {i: source[i][1] for i in range(20)}  # the labels written are the labels read
    image, _ = data[0]
    assert image.shape == (3, 28, 28) and image.dtype == torch.float32  # centre crop of 7/8
    assert len(data.mean) == len(data.std) == 3 and all(0 < s < 1 for s in data.std)
    stamp = (root / "stats.json").stat().st_mtime_ns
    again = datasets.shapes_image_folder(20, 32, augment=True, crop_size=24, root=root)
    assert (root / "stats.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert again.mean == data.mean and again[0][0].shape == (3, 24, 24)
    assert not list(tmp_path.glob("*.partial-*"))  # no half-written copy left


def test_normalised_pixels_have_zero_mean_and_unit_std(tmp_path):
    data = datasets.shapes_image_folder(16, 16, crop_size=16, augment=False, root=tmp_path / "f")
    pixels = torch.stack([data[i][0] for i in range(len(data))]).transpose(0, 1).flatten(1)
    torch.testing.assert_close(pixels.mean(1), torch.zeros(3), atol=2e-3, rtol=0)
    torch.testing.assert_close(pixels.std(1), torch.ones(3), atol=2e-3, rtol=0)


def test_augmentation_is_reproducible_with_a_seeded_generator(tmp_path):
    data = datasets.shapes_image_folder(16, 32, root=tmp_path / "f")

    def first_batches(workers):
        loader = DataLoader(data, batch_size=4, num_workers=workers, generator=torch.Generator().manual_seed(5))
        return list(loader)[:2]

    assert_same_batches(first_batches(2), first_batches(2))
    with pytest.raises(AssertionError):  # the same images, but each worker draws from its own seed
        assert_same_batches(first_batches(0), first_batches(2))


def test_image_folder_works_with_spawned_workers(tmp_path):
    """On macOS and Windows workers are spawned: the data set and helpers must pickle by module name."""
    data = datasets.shapes_image_folder(8, 32, root=tmp_path / "f")
    loader = DataLoader(
        data,
        batch_size=4,
        num_workers=1,
        multiprocessing_context="spawn",
        collate_fn=batching.collate,
        worker_init_fn=workers.seed_worker,
        generator=torch.Generator().manual_seed(0),
    )
    batches = list(loader)
    assert [tuple(images.shape) for images, _ in batches] == [(4, 3, 28, 28)] * 2


def test_image_folder_refuses_a_folder_it_did_not_write(tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="root '.*notes' already holds other files"):
        datasets.shapes_image_folder(8, 16, root=other)
    assert [p.name for p in other.iterdir()] == ["todo.txt"]  # left as it was
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        datasets.shapes_image_folder(8, 16, root=tmp_path / "file")
    with pytest.raises(TypeError, match="root must be a folder path"):
        datasets.shapes_image_folder(8, 16, root=5)


def test_image_folder_reuses_its_own_folder_only_for_the_same_arguments(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is taken
    data = datasets.shapes_image_folder(8, 16, crop_size=16, root=empty)
    assert len(data) == 8
    assert len(datasets.shapes_image_folder(8, 16, crop_size=16, augment=False, root=empty)) == 8  # reused
    with pytest.raises(ValueError, match="holds images written with n=8, image_size=16, seed=0, not n=12"):
        datasets.shapes_image_folder(12, 16, root=empty)
    with pytest.raises(ValueError, match="not n=8, image_size=16, seed=1"):
        datasets.shapes_image_folder(8, 16, seed=1, root=empty)


def test_image_folder_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="crop_size must be at most 32"):
        datasets.shapes_image_folder(4, 32, crop_size=40, root=tmp_path)
    with pytest.raises(ValueError, match="n must be a positive int"):
        datasets.shapes_image_folder(0, root=tmp_path)


# --- pitfalls: random numbers and memory in workers ------------------------------------------------------


def random_numbers(worker_init_fn, seed, epochs=2):
    """The random numbers of each epoch, from a 2-worker loader over a data set that owns a generator."""
    data = datasets.SharedGeneratorDataset(8)
    loader = DataLoader(
        data, batch_size=2, num_workers=2, worker_init_fn=worker_init_fn, generator=torch.Generator().manual_seed(seed)
    )
    return [[batch[1].tolist() for batch in loader] for _ in range(epochs)]


def test_copied_generator_repeats_across_workers_and_epochs():
    first, second = random_numbers(None, seed=0)
    # batches 0 and 1 come from workers 0 and 1: same numbers; and epoch 2 repeats epoch 1
    assert first[0] == first[1] and first == second


def test_seed_worker_gives_distinct_reproducible_numbers():
    first, second = random_numbers(workers.seed_worker, seed=0)
    assert first[0] != first[1] and first != second
    assert random_numbers(workers.seed_worker, seed=0) == [first, second]  # the same on every run
    assert random_numbers(workers.seed_worker, seed=1)[0] != first


def test_python_list_is_copied_into_workers_and_numpy_array_is_not():
    n = 400_000  # a list of 400k Python floats is ~13 MB of objects; each worker reads half of them
    as_list = workers.worker_memory(datasets.LookupTable(n, "list"), batch_size=20_000, num_workers=2)
    as_array = workers.worker_memory(datasets.LookupTable(n, "numpy"), batch_size=20_000, num_workers=2)
    assert len(as_list) == len(as_array) == 2
    assert all(isinstance(m, process.ProcessMemory) for m in as_list + as_array)
    assert all(m.uss_bytes > 0 and m.rss_bytes >= m.uss_bytes for m in as_list + as_array)
    assert all(m.tensor_bytes is None and m.other_bytes is None for m in as_list)  # not countable from outside
    assert "its tensors are not known" in repr(as_list[0])
    extra = sorted(a.uss_bytes - b.uss_bytes for a, b in zip(as_list, as_array))
    assert extra[0] > 2e6, f"reading a list should copy megabytes into each worker, got {extra} bytes"


def test_lookup_table_and_datasets_check_arguments():
    assert datasets.LookupTable(4, "numpy")[2] == datasets.LookupTable(4, "list")[2] == 0.5
    with pytest.raises(ValueError, match="storage must be 'list' or 'numpy'"):
        datasets.LookupTable(4, "dict")
    with pytest.raises(ValueError, match="num_workers must be a positive int"):
        workers.worker_memory(datasets.LookupTable(4), batch_size=2, num_workers=0)


# --- the padding exercise's data set --------------------------------------------------------------------


def test_token_sequences():
    data = datasets.token_sequences(50, max_length=7, seed=1)
    lengths = {len(data[i][0]) for i in range(50)}
    assert min(lengths) >= 1 and max(lengths) <= 7 and len(lengths) > 3
    assert all((data[i][0] != datasets.PAD).all() and data[i][0].dtype == torch.int64 for i in range(50))
    assert torch.equal(data[3][0], datasets.token_sequences(50, max_length=7, seed=1)[3][0])
    with pytest.raises(IndexError):
        data[50]


# --- the widget -------------------------------------------------------------------------------------------


def test_loader_widget_measures_each_setting_and_shows_the_cores(small_images):
    widget = LoaderExplorer(small_images, num_workers=0, batch_size=16, batches=2, warmup=1)
    first_png = bytes(widget.image.value)
    assert first_png.startswith(b"\x89PNG")
    assert f"{loaders.usable_cores()} usable CPU cores" in widget.summary.value
    assert widget.num_workers.max == loaders.usable_cores() + 2
    widget.num_workers.value = 1  # as a learner moves the slider
    state = widget.state
    assert state["cores"] == loaders.usable_cores() and (state["batch_size"], state["num_workers"]) == (16, 1)
    assert set(state["measured"]) == {(16, 0), (16, 1)} and state["samples_per_second"] > 0
    assert "the speed of num_workers=0" in widget.summary.value and bytes(widget.image.value) != first_png
    state = widget.set(batch_size=8)
    assert set(state["measured"]) == {(16, 0), (16, 1), (8, 1)}
    assert "num_workers 1" in widget.summary.value and "batch size 8" in widget.summary.value
    assert widget._repr_mimebundle_()["text/plain"] == "LoaderExplorer(batches=2, warmup=1)"
    with pytest.raises(ValueError, match="batch_size must be one of"):
        widget.set(batch_size=7)
    with pytest.raises(ValueError, match="set\\(\\) takes num_workers and batch_size"):
        widget.set(workers=2)


def test_loader_widget_batch_sizes_fit_the_dataset(small_images):
    widget = LoaderExplorer(small_images, batch_size=8, batches=8, warmup=2)  # 10 batches of at most 16
    assert widget.batch_size.options == (8, 16)
    with pytest.raises(ValueError, match="too few"):
        LoaderExplorer(datasets.shapes(10, image_size=16), batches=2)


# --- what persistent workers do to a generator the data set owns (exercise 3's answer) -------------------


def test_persistent_workers_keep_moving_but_still_agree():
    before = {p.pid for p in children()}
    first, second = chapter3.persistent_worker_numbers(epochs=2)
    assert first[0] == first[1] and second[0] == second[1]  # the two workers' copies start alike
    assert first != second  # each copy's generator moves on into epoch 2
    assert started_since(before) == []  # the persistent workers stopped with their loader
