"""Chapter 8's additions: the gradient noise scale estimator and the chapter's exercise checks."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchlab
from batchlab import datasets, exercises
from batchlab.batchsize import noise_scale


def _linear_problem(n=64, features=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, features, generator=generator)
    targets = torch.randint(0, 3, (n,), generator=generator)
    model = nn.Linear(features, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, features, generator=generator))
        model.bias.zero_()
    return model, TensorDataset(inputs, targets)


def _exact_noise(model, dataset):
    """|G|^2 and tr(Sigma) from every sample's own gradient (population covariance, divided by n)."""
    grads = []
    for x, y in dataset:
        model.zero_grad()
        nn.functional.cross_entropy(model(x[None]), y[None]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    grads = torch.stack(grads).double()
    mean = grads.mean(0)
    return mean.square().sum().item(), (grads - mean).square().sum(1).mean().item()


def test_noise_scale_matches_per_sample_gradients():
    model, dataset = _linear_problem()
    gradient_sq, trace = _exact_noise(model, dataset)
    estimate = noise_scale(model, dataset, batch_sizes=(2, 32), draws=3000)
    assert estimate.gradient_norm_sq == pytest.approx(gradient_sq, rel=0.1)
    assert estimate.trace_covariance == pytest.approx(trace, rel=0.1)
    assert estimate.b_simple == pytest.approx(trace / gradient_sq, rel=0.15)
    assert estimate.steps_factor(estimate.b_simple) == pytest.approx(2.0)


def test_identical_samples_have_no_noise():
    model, dataset = _linear_problem()
    x, y = dataset[0]
    same = TensorDataset(x.repeat(40, 1), y.repeat(40))
    estimate = noise_scale(model, same, batch_sizes=(4, 16), draws=3)
    assert abs(estimate.b_simple) < 1e-3
    assert estimate.gradient_norm_sq == pytest.approx(estimate.small_norm_sq, rel=1e-5)


def test_noise_scale_is_reproducible_and_leaves_the_model_and_random_state_alone():
    model = batchlab.build_model("mlp", in_shape=(1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    a = noise_scale(model, datasets.digits(train=False), draws=5, seed=3)
    b = noise_scale(model, datasets.digits(train=False), draws=5, seed=3)
    c = noise_scale(model, datasets.digits(train=False), draws=5, seed=4)
    assert a == b and a != c
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert "B_simple" in repr(a) and a.batch_sizes == (8, 256)


@pytest.mark.parametrize(
    "batch_sizes, message",
    [
        ((8,), "batch_sizes must be two batch sizes"),
        (8, "batch_sizes must be two batch sizes"),
        ((64, 8), r"small < big, got \(64, 8\)"),
        ((8, 8), r"small < big, got \(8, 8\)"),
        ((0, 8), "batch_sizes item must be a positive int, got 0"),
    ],
)
def test_noise_scale_refuses_bad_batch_sizes(batch_sizes, message):
    model = batchlab.build_model("mlp", in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=message):
        noise_scale(model, datasets.digits(train=False), batch_sizes=batch_sizes)


def test_noise_scale_refuses_bad_draws_model_and_dataset():
    model = batchlab.build_model("mlp", in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="draws must be a positive int, got 0"):
        noise_scale(model, datasets.digits(train=False), draws=0)
    with pytest.raises(TypeError, match="model"):
        noise_scale("mlp", datasets.digits(train=False))
    with pytest.raises(TypeError, match="dataset"):
        noise_scale(model, [1, 2, 3])


def test_chapter_8_placeholders_print_the_task(capsys):
    exercises.check_bytes_per_parameter(None)
    exercises.check_checkpoint_segments(None)
    exercises.check_critical_batch(None)
    assert capsys.readouterr().out.count("Your turn") == 3


def test_bytes_per_parameter():
    for optimizer, expected in (("sgd", 8), ("momentum", 12), ("adam", 16), ("adamw", 16)):
        exercises.check_bytes_per_parameter(expected, optimizer=optimizer)
    with pytest.raises(AssertionError, match="one per buffer the optimizer keeps"):
        exercises.check_bytes_per_parameter(12, optimizer="adam")
    with pytest.raises(ValueError, match="optimizer must be one of 'sgd'.*got 'lion'"):
        exercises.check_bytes_per_parameter(8, optimizer="lion")


def test_bytes_per_parameter_agree_with_a_measured_step():
    model = batchlab.build_model("mlp", in_shape=(1, 8, 8))
    n = batchlab.count_parameters(model)
    batch = (torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    report = batchlab.profile_step(model, batch, optimizer="adam")
    kept = sum(report.category_peaks[c] for c in ("parameters", "gradients", "optimizer_state"))
    exercises.check_bytes_per_parameter(round(kept / n), optimizer="adam")


def test_checkpoint_segments(capsys):
    exercises.check_checkpoint_segments(4, layers=16)
    assert "8 layers' activations instead of 16" in capsys.readouterr().out
    for wrong in (1, 16, 2, 8, 4.0):
        with pytest.raises(AssertionError, match="Which number of segments makes that sum smallest"):
            exercises.check_checkpoint_segments(wrong, layers=16)
    exercises.check_checkpoint_segments(3, layers=9)
    with pytest.raises(ValueError, match="layers must be a positive int, got 0"):
        exercises.check_checkpoint_segments(1, layers=0)


def test_critical_batch(capsys):
    exercises.check_critical_batch(160)
    exercises.check_critical_batch(0.5 / 0.01 * 2, gradient_norm_sq=0.01, trace_covariance=1.0)
    assert capsys.readouterr().out.count("Correct") == 2
    with pytest.raises(AssertionError, match="as large as the squared gradient"):
        exercises.check_critical_batch(math.sqrt(160))
    with pytest.raises(AssertionError, match="as large as the squared gradient"):
        exercises.check_critical_batch("160")
