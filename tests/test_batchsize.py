import pytest
import torch

import batchlab
from batchlab import datasets


def test_gradient_noise_shrinks_like_one_over_sqrt_batch():
    model = batchlab.build_model("mlp", in_shape=(1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    noise = batchlab.gradient_noise(model, datasets.digits(), [4, 16, 64], draws=30)
    errors = [row.relative_error for row in noise]
    # 4x the batch halves the error (within sampling noise), and the direction improves.
    assert 1.6 < errors[0] / errors[1] < 2.5 and 1.6 < errors[1] / errors[2] < 2.5
    assert noise[0].cosine < noise[1].cosine < noise[2].cosine
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_full_batch_gradient_has_no_noise():
    ds = datasets.digits(train=False)
    (row,) = batchlab.gradient_noise(batchlab.build_model("mlp", in_shape=(1, 8, 8)), ds, [len(ds)], draws=2)
    assert row.relative_error < 1e-5 and row.cosine > 0.99999


def test_step_times_are_positive_and_leave_the_model_alone():
    model = batchlab.build_model("mlp", in_shape=(1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    times = batchlab.step_times(model, datasets.digits(), [1, 64], repeats=2)
    assert [t.batch_size for t in times] == [1, 64]
    assert all(t.seconds > 0 and t.samples_per_second > 0 for t in times)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_batch_sizes_are_checked():
    model = batchlab.build_model("mlp", in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"batch_sizes\[0\] must be at most 359, got 1000"):
        batchlab.gradient_noise(model, datasets.digits(train=False), [1000])
    with pytest.raises(ValueError, match=r"batch_sizes\[0\] must be a positive int, got 0"):
        batchlab.step_times(model, datasets.digits(train=False), [0])
