import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import batchlab
from batchlab import datasets


@pytest.fixture(scope="module")
def digits():
    return datasets.digits(train=True)


def small_mlp(seed=0):
    return batchlab.build_model("mlp", in_shape=(1, 8, 8), seed=seed)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_gives_same_history_and_weights(digits):
    a, b = small_mlp(), small_mlp()
    ha = batchlab.train(a, digits, batch_size=32, steps=20, progress=False)
    hb = batchlab.train(b, digits, batch_size=32, steps=20, progress=False)
    assert ha == hb  # every field but the wall-clock times
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    hc = batchlab.train(small_mlp(), digits, batch_size=32, steps=20, seed=1, progress=False)
    assert hc.loss != ha.loss


def test_history_records_each_step(digits):
    h = batchlab.train(
        small_mlp(), digits, batch_size=100, epochs=2, progress=False, eval_dataset=datasets.digits(train=False)
    )
    steps_per_epoch = len(digits) // 100
    assert len(h.loss) == 2 * steps_per_epoch and h.steps[-1] == 2 * steps_per_epoch
    assert h.samples == [100 * (i + 1) for i in range(2 * steps_per_epoch)]
    assert h.seconds == sorted(h.seconds) and h.samples_per_second > 0
    assert h.eval_steps == [steps_per_epoch, 2 * steps_per_epoch]
    assert h.eval_accuracy[-1] > 0.7  # two epochs of an MLP on digits; chance is 0.1
    assert h.loss[-1] < h.loss[0]


def test_training_leaves_global_rng_alone(digits):
    state = torch.random.get_rng_state()
    batchlab.train(small_mlp(), digits, batch_size=64, steps=3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_accumulation_gives_the_same_weights(digits):
    a, b = small_mlp(), small_mlp()
    batchlab.train(a, digits, batch_size=64, steps=30, progress=False)
    batchlab.train(b, digits, batch_size=64, steps=30, accumulation_steps=4, progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_optimizers_by_name_and_by_function(digits):
    adam = batchlab.train(small_mlp(), digits, batch_size=64, steps=15, optimizer="adam", lr=1e-3, progress=False)
    assert adam.loss[-1] < adam.loss[0]
    custom = batchlab.train(
        small_mlp(),
        digits,
        batch_size=64,
        steps=15,
        progress=False,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    assert custom.loss[-1] < custom.loss[0]


def test_cnn_learns_shapes_to_90_percent():
    # The chapters rely on this: a small CNN learns the procedural shapes well in a few epochs
    # (benchmarks/shapes_accuracy.py times the same run).
    model = batchlab.build_model("cnn_bn", in_shape=(3, 32, 32), num_classes=5)
    h = batchlab.train(
        model,
        datasets.shapes(8000, seed=0),
        batch_size=64,
        epochs=3,
        lr=0.02,
        eval_dataset=datasets.shapes(1000, seed=1),
        progress=False,
    )
    assert h.eval_accuracy[-1] >= 0.9, h.eval_accuracy


class WrongItems(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"x": torch.zeros(3)}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(batch_size=0), ValueError, "batch_size must be a positive int, got 0"),
        (dict(batch_size=-8), ValueError, "batch_size must be a positive int, got -8"),
        (dict(batch_size=16.0), TypeError, r"batch_size must be an int, got 16.0 \(float\)"),
        (dict(batch_size=5000), ValueError, r"batch_size must be at most the data set size \(1438\), got 5000"),
        (dict(batch_size=64, accumulation_steps=3), ValueError, "64 is not divisible by 3"),
        (dict(batch_size=64, accumulation_steps=0), ValueError, "accumulation_steps must be a positive int"),
        (dict(batch_size=64, optimizer="rmsprop"), ValueError, "optimizer must be 'sgd', 'adam' or a function"),
        (dict(batch_size=64, epochs=1, steps=5), ValueError, "give exactly one of epochs or steps"),
        (dict(batch_size=64, steps=None), ValueError, "give exactly one of epochs or steps"),
        (dict(batch_size=64, lr=-0.1), ValueError, "lr must be a positive number, got -0.1"),
        (dict(batch_size=64, device="gpu0"), ValueError, "device must be a torch device"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(digits, kwargs, error, match):
    kwargs = {"steps": 5, **kwargs} if "epochs" not in kwargs else kwargs
    model = small_mlp()
    before = weights(model)
    with pytest.raises(error, match=match):
        batchlab.train(model, digits, progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_dataset_of_the_wrong_type_is_named():
    with pytest.raises(TypeError, match=r"must yield \(input tensor, integer label\) pairs, but item 0 is a dict"):
        batchlab.train(small_mlp(), WrongItems(), batch_size=2, steps=1, progress=False)
    with pytest.raises(TypeError, match="map-style torch Dataset"):
        batchlab.train(small_mlp(), [1, 2, 3], batch_size=2, steps=1, progress=False)


def test_failure_mid_training_restores_the_model(digits):
    model = small_mlp()
    model.eval()
    before = weights(model)
    calls = {"n": 0}

    def flaky_loss(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if the learner pressed stop in the middle of training
        return nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(KeyboardInterrupt):
        batchlab.train(model, digits, batch_size=32, steps=10, loss_fn=flaky_loss, progress=False)
    assert calls["n"] == 5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_evaluate_restores_mode():
    model = small_mlp()
    ds = TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    accuracy = batchlab.evaluate(model, ds)
    assert 0 <= accuracy <= 1 and model.training
