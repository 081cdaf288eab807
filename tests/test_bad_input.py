"""Issue 16: bad input, generated. Hypothesis draws wrong values for each argument of the public API; every
call must raise a ValueError or TypeError whose message names the argument, quickly, and leave the model,
the optimizer, the gradients, every module's train flag, the global random state and torch's global
settings exactly as they were. Then each function that takes a model is run in four scenarios (success,
bad input, an exception from inside, a KeyboardInterrupt from inside) and must give everything back.

Hypothesis is derandomized here (the same examples on every run) and kept small, so the file runs in
about a minute on two busy cores.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import batchlab
from batchlab import datasets
from batchlab.accumulation import accumulate_weighted, accumulation_step_time, batchnorm_statistics, split_batch
from batchlab.validation import parse_bytes

pytestmark = pytest.mark.timeout(60)  # a hang is a failure, not a stuck run

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- the things the calls are given ---------------------------------------------------------------


def tiny_model():
    """Conv + BatchNorm + dropout + linear on 1x6x6 images, 3 classes: small, with modes and randomness."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * 4 * 4, 3)
        )


def tiny_data(n=16):
    generator = torch.Generator().manual_seed(4)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator))


def tiny_batch(n=8):
    generator = torch.Generator().manual_seed(5)
    return torch.randn(n, 1, 6, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)


MODEL = tiny_model()
OPTIMIZER = torch.optim.SGD(MODEL.parameters(), lr=0.1, momentum=0.9)
DATA = tiny_data()
BATCH = tiny_batch()
OTHER_OPTIMIZER = torch.optim.SGD(tiny_model().parameters(), lr=0.1)  # built for another model


def make_batch(n):
    return tiny_batch(n)


# -- what must not change -------------------------------------------------------------------------


def global_state():
    return (
        torch.get_rng_state(),
        torch.get_default_dtype(),
        torch.is_grad_enabled(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )


def snapshot(model, optimizer=None):
    """Everything a call must give back: weights (and which Parameter objects hold them), gradients,
    every module's train flag, the optimizer's state, the global random state and torch's settings."""
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [id(p) for p in model.parameters()],
        "grads": [None if p.grad is None else (id(p.grad), p.grad.clone()) for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "optimizer": None
        if optimizer is None
        else {
            i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for i, s in optimizer.state_dict()["state"].items()
        },
        "global": global_state(),
    }


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_unchanged(before, model, optimizer=None, skip=()):
    after = snapshot(model, optimizer)
    for key in before:
        if key not in skip:
            assert same(before[key], after[key]), f"{key} changed"


def expect_refusal(call, argument: str):
    """``call()`` raises ValueError/TypeError naming ``argument``; the shared model and optimizer are as before."""
    before = snapshot(MODEL, OPTIMIZER)
    with pytest.raises((ValueError, TypeError)) as caught:
        call()
    assert argument in str(caught.value), f"the message does not name {argument!r}: {caught.value}"
    assert_unchanged(before, MODEL, OPTIMIZER)


# -- bad values ----------------------------------------------------------------------------------


def not_a_number():
    return st.one_of(st.text(max_size=4), st.none(), st.booleans(), st.just([1]), st.just(object()))


def bad_positive_int(limit=None):
    wrong = [st.integers(max_value=0), st.floats(allow_nan=True, allow_infinity=True), not_a_number()]
    if limit is not None:
        wrong.append(st.integers(min_value=limit + 1, max_value=2**70))
    return st.one_of(*wrong)


def bad_positive_float():
    return st.one_of(
        st.floats(max_value=0.0),
        st.just(math.nan),
        st.just(math.inf),
        st.just(-math.inf),
        st.text(max_size=3),
        st.none(),
        st.booleans(),
        st.just(torch.tensor(0.1)),
    )


def bad_seed():
    return st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=2**32, max_value=2**80),
        st.floats(),
        st.text(max_size=3),
        st.booleans(),
    )


def bad_bool():
    return st.one_of(st.integers(), st.text(max_size=3), st.none(), st.floats())


def bad_budget():
    malformed = st.sampled_from(
        ["", "GB", "4 GiBs", "-1GB", "1e99GB", "nan GB", "inf", "4 XB", "0", "0 MiB", "four GiB", "4,5 GB", "2**30"]
    )
    return st.one_of(
        malformed,
        st.integers(max_value=0),
        st.integers(min_value=2**50 + 1, max_value=2**90),
        st.floats(),
        st.booleans(),
        st.just([1024]),
    )


def bad_device():
    return st.one_of(
        st.sampled_from(["tpu", "gpu", "meta", "cuda:99", "", "cpu:x", "CPU"]),
        st.integers(min_value=99, max_value=10**6),
        st.floats(),
        st.booleans(),
        st.just([0]),
    )


def bad_model():
    return st.one_of(
        st.sampled_from(["mlp", "cnn_bn", "resnet18"]),
        st.integers(),
        st.none(),
        st.just(torch.zeros(3)),
        st.just(nn.Identity()),
    )


def bad_dataset(labelled=True):
    wrong = [
        st.text(max_size=4),
        st.integers(),
        st.none(),
        st.just([(torch.zeros(1, 6, 6), 0)]),
        st.just(TensorDataset(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long))),
        st.just(range(8)),
    ]
    if labelled:  # items without a label: fine for batching, not for training
        wrong.append(st.just(TensorDataset(torch.zeros(4, 1, 6, 6))))
    return st.one_of(*wrong)


def bad_loss_fn():
    return st.one_of(
        st.sampled_from(["ce", "cross_entropy", "mse"]), st.integers(), st.booleans(), st.just(torch.zeros(1))
    )


def bad_optimizer():
    return st.one_of(
        st.sampled_from(["SGD", "adamw", "lbfgs", ""]), st.integers(), st.none(), st.booleans(), st.just(OPTIMIZER)
    )


def bad_batch():
    x = torch.zeros(4, 1, 6, 6)
    return st.one_of(
        st.text(max_size=3),
        st.integers(),
        st.none(),
        st.just(x),
        st.just((x,)),
        st.just((x, torch.zeros(3, dtype=torch.long))),
        st.just((x[:0], torch.zeros(0, dtype=torch.long))),
        st.just([1, 2]),
        st.just((x, x, x)),
    )


def bad_sizes():
    return st.one_of(
        st.integers(),
        st.text(max_size=3),
        st.none(),
        st.just([]),
        st.just([0]),
        st.just([4, -1]),
        st.just([10**9]),
        st.just([2.5]),
        st.just(["8"]),
    )


# -- every public function, every argument ---------------------------------------------------------
# name -> (call with one argument replaced, {argument: strategy of bad values}). Each lambda gets the
# argument's name and value and calls with valid values for all the others.


def train_call(arg, value):
    kwargs = dict(batch_size=8, steps=1, progress=False)
    args = {"model": MODEL, "dataset": DATA}
    (args if arg in args else kwargs)[arg] = value
    return lambda: batchlab.train(args["model"], args["dataset"], **kwargs)


def keyword_call(fn, positional: dict, defaults: dict):
    """A call builder for ``fn(*positional.values(), **defaults)`` with one argument replaced."""

    def build(arg, value):
        pos, kw = dict(positional), dict(defaults)
        (pos if arg in pos else kw)[arg] = value
        return lambda: fn(*pos.values(), **kw)

    return build


CASES = {
    "train": (
        train_call,
        {
            "model": bad_model(),
            "dataset": bad_dataset(),
            "batch_size": bad_positive_int(limit=16),
            "steps": bad_positive_int(),
            "epochs": bad_positive_int().filter(lambda v: v is not None),
            "lr": bad_positive_float(),
            "accumulation_steps": bad_positive_int(limit=8),
            "optimizer": bad_optimizer(),
            "loss_fn": bad_loss_fn(),
            "device": bad_device(),
            "seed": bad_seed(),
            "progress": bad_bool(),
            "shuffle": bad_bool(),
            "eval_dataset": bad_dataset().filter(lambda d: d is not None),
            "on_oom": st.one_of(st.text(max_size=4), st.integers(), st.booleans()),
        },
    ),
    "evaluate": (
        keyword_call(batchlab.evaluate, {"model": MODEL, "dataset": DATA}, {}),
        {
            "model": bad_model(),
            "dataset": bad_dataset(),
            "batch_size": bad_positive_int(),
            "device": bad_device(),
        },
    ),
    "gradient_noise": (
        keyword_call(batchlab.gradient_noise, {"model": MODEL, "dataset": DATA, "batch_sizes": [4]}, {"draws": 1}),
        {
            "model": bad_model(),
            "dataset": bad_dataset(),
            "batch_sizes": bad_sizes(),
            "draws": bad_positive_int(),
            "seed": bad_seed(),
            "loss_fn": bad_loss_fn(),
        },
    ),
    "step_times": (
        keyword_call(batchlab.step_times, {"model": MODEL, "dataset": DATA, "batch_sizes": [4]}, {"repeats": 1}),
        {
            "model": bad_model(),
            "dataset": bad_dataset(),
            "batch_sizes": bad_sizes(),
            "repeats": bad_positive_int(),
            "lr": bad_positive_float(),
            "loss_fn": bad_loss_fn(),
        },
    ),
    "train_step": (
        keyword_call(
            batchlab.train_step, {"model": MODEL, "optimizer": OPTIMIZER, "inputs": BATCH[0], "targets": BATCH[1]}, {}
        ),
        {
            "model": bad_model(),
            "optimizer": st.one_of(
                st.sampled_from(["sgd", "adam"]), st.integers(), st.none(), st.just(OTHER_OPTIMIZER), st.just(MODEL)
            ),
            "inputs": st.one_of(
                st.text(max_size=3),
                st.none(),
                st.just([[1.0] * 36] * 8),
                st.just(BATCH[0][:3]),
                st.just(BATCH[0][:0]),
                st.just({}),
                st.just({"x": 1}),
            ),
            "targets": st.one_of(
                st.text(max_size=3),
                st.none(),
                st.just([0] * 8),
                st.just(torch.tensor(1)),
                st.just(BATCH[1][:3]),
            ),
            "loss_fn": bad_loss_fn(),
            "accumulation_steps": st.one_of(
                bad_positive_int(limit=8), st.just([4, 2]), st.just([4, 4, 0]), st.just(["4", "4"]), st.just([])
            ),
            "no_sync": st.one_of(st.text(max_size=3), st.booleans(), st.integers()),
            "precision": st.one_of(st.sampled_from(["half", "fp64", "", "FP32"]), st.none(), st.integers()),
            "scaler": st.one_of(st.text(max_size=3), st.booleans(), st.integers(), st.just(OPTIMIZER)),
        },
    ),
    "profile_step": (
        keyword_call(batchlab.profile_step, {"model": MODEL, "batch": BATCH}, {}),
        {
            "model": bad_model(),
            "batch": bad_batch(),
            "optimizer": bad_optimizer(),
            "loss_fn": bad_loss_fn(),
            "device": bad_device(),
        },
    ),
    "estimate_memory": (
        keyword_call(batchlab.estimate_memory, {"model": MODEL, "batch": BATCH}, {}),
        {
            "model": bad_model(),
            "batch": bad_batch(),
            "optimizer": bad_optimizer(),
            "loss_fn": bad_loss_fn(),
            "device": bad_device(),
            "budget": bad_budget(),
            "accumulation_steps": bad_positive_int(limit=8),
        },
    ),
    "max_batch_size": (
        keyword_call(batchlab.max_batch_size, {"model": MODEL, "make_batch": make_batch}, {"budget": "64MiB"}),
        {
            "model": bad_model(),
            "make_batch": not_a_number(),
            "budget": bad_budget(),
            "optimizer": bad_optimizer(),
            "loss_fn": bad_loss_fn(),
            "limit": bad_positive_int(),
        },
    ),
    "probe_batch_size": (
        keyword_call(batchlab.probe_batch_size, {"model": MODEL, "make_batch": make_batch}, {"max_trials": 2}),
        {
            "model": bad_model(),
            "make_batch": not_a_number(),
            "mode": st.text(max_size=5),
            "start": bad_positive_int(),
            "max_trials": bad_positive_int(),
            "optimizer": bad_optimizer().filter(lambda o: o is not OPTIMIZER),
            "loss_fn": bad_loss_fn(),
            "device": bad_device(),
        },
    ),
    "compare_gradients": (
        keyword_call(batchlab.compare_gradients, {"model": MODEL, "batch": BATCH}, {}),
        {
            "model": bad_model(),
            "batch": bad_batch(),
            "micro_batches": bad_sizes(),
            "loss_fn": bad_loss_fn(),
            "method": st.text(max_size=5),
            "rtol": bad_positive_float(),
            "seed": bad_seed(),
        },
    ),
    "profile_accumulation": (
        keyword_call(batchlab.profile_accumulation, {"model": MODEL, "batch": BATCH, "accumulation_steps": 2}, {}),
        {
            "model": bad_model(),
            "batch": bad_batch(),
            "accumulation_steps": bad_positive_int(limit=8),
            "optimizer": bad_optimizer(),
            "loss_fn": bad_loss_fn(),
        },
    ),
    "replace_batchnorm": (
        keyword_call(batchlab.replace_batchnorm, {"model": MODEL, "norm": "ghost"}, {}),
        {
            "model": bad_model(),
            "norm": st.one_of(st.text(max_size=5), st.integers(), st.none()),
            "virtual_batch": st.one_of(st.integers(max_value=1), not_a_number()),
        },
    ),
    "memory_budget": (
        keyword_call(lambda *a, **k: batchlab.memory_budget(*a, **k).__enter__(), {"budget": "64MiB"}, {}),
        {
            "budget": bad_budget(),
            "model": bad_model().filter(lambda m: m is not None and not isinstance(m, nn.Module)),
            "optimizer": st.one_of(st.sampled_from(["sgd", "adam"]), st.integers(), st.just(MODEL)),
        },
    ),
    "track_memory": (
        keyword_call(lambda *a, **k: batchlab.track_memory(*a, **k).__enter__(), {}, {}),
        {
            "model": bad_model().filter(lambda m: m is not None and not isinstance(m, nn.Module)),
            "optimizer": st.one_of(st.sampled_from(["sgd", "adam"]), st.integers(), st.just(MODEL)),
        },
    ),
    "build_model": (
        keyword_call(batchlab.build_model, {"name": "mlp"}, {"in_shape": (1, 6, 6)}),
        {
            "name": st.one_of(st.text(max_size=6), st.integers(), st.none()),
            "num_classes": bad_positive_int(),
            "in_shape": st.one_of(
                st.just((3,)),
                st.just((0, 6, 6)),
                st.just((1, -6, 6)),
                st.text(max_size=3),
                st.integers(),
                st.none(),
                st.just((1.5, 6, 6)),
            ),
            "seed": bad_seed(),
        },
    ),
    "make_optimizer": (
        keyword_call(batchlab.make_optimizer, {"optimizer": "sgd", "params": list(MODEL.parameters())}, {}),
        {
            "optimizer": bad_optimizer().filter(lambda o: o is not OPTIMIZER),
            "lr": bad_positive_float().filter(lambda v: v is not None),
        },
    ),
    "iter_batches": (
        keyword_call(
            lambda *a, **k: next(iter(batchlab.iter_batches(*a, **k))), {"dataset": DATA, "batch_size": 4}, {}
        ),
        {
            "dataset": bad_dataset(labelled=False),
            "batch_size": bad_positive_int(),
            "shuffle": bad_bool(),
            "drop_last": bad_bool(),
            "seed": bad_seed(),
        },
    ),
    "leak_check": (
        keyword_call(batchlab.leak_check, {"fn": lambda: None}, {"iterations": 2, "warmup": 0}),
        {
            "fn": not_a_number(),
            "iterations": bad_positive_int(),
            "warmup": st.one_of(st.integers(max_value=-1), not_a_number()),
        },
    ),
    "parse_bytes": (
        keyword_call(lambda value: parse_bytes("budget", value), {"value": "1GiB"}, {}),
        {
            "value": bad_budget(),
        },
    ),
    "split_batch": (
        keyword_call(split_batch, {"batch": BATCH, "micro_batches": 2}, {}),
        {
            "batch": bad_batch(),
            "micro_batches": bad_sizes(),
        },
    ),
    "shapes": (
        keyword_call(datasets.shapes, {"n": 4}, {}),
        {
            "n": bad_positive_int(),
            "image_size": bad_positive_int(),
            "channels": bad_positive_int(),
            "seed": bad_seed(),
        },
    ),
    "train_ddp": (
        keyword_call(batchlab.train_ddp, {"model_name": "mlp", "dataset": DATA}, {"batch_size": 8, "steps": 1}),
        {
            "model_name": st.one_of(st.text(max_size=5), st.integers(), st.just(MODEL)),
            "dataset": bad_dataset(),
            "world_size": bad_positive_int(),
            "batch_size": bad_positive_int(limit=16),
            "steps": bad_positive_int(),
            "lr": bad_positive_float(),
            "seed": bad_seed(),
            "no_sync": bad_bool(),
            "drop_last": bad_bool(),
        },
    ),
    "plan_fit": (
        keyword_call(
            batchlab.plan_fit, {"model": MODEL, "make_batch": make_batch}, {"budget": "64MiB", "effective_batch": 16}
        ),
        {
            "model": bad_model(),
            "make_batch": not_a_number(),
            "budget": bad_budget(),
            "effective_batch": bad_positive_int(),
            "optimizer": bad_optimizer(),
            "loss_fn": bad_loss_fn(),
            "device": bad_device(),
            "precisions": st.one_of(
                st.sampled_from(["fp64", "half", ""]), st.integers(), st.just(()), st.just(("fp32", "int8"))
            ),
        },
    ),
    "checkpoint_blocks": (
        keyword_call(batchlab.checkpoint_blocks, {"model": MODEL}, {}),
        {
            "model": bad_model().filter(lambda m: not isinstance(m, nn.Module)),
        },
    ),
    "checkpointed": (
        keyword_call(batchlab.checkpointed, {"model": batchlab.build_model("resnet18")}, {}),
        {
            "model": bad_model().filter(lambda m: not isinstance(m, nn.Module)),
            "segments": st.one_of(st.integers(max_value=0), st.text(max_size=4), st.none(), st.floats()),
            "use_reentrant": bad_bool(),
        },
    ),
    "explain_oom": (
        keyword_call(batchlab.explain_oom, {"error": "CUDA out of memory."}, {}),
        {
            "error": st.one_of(
                st.integers(),
                st.none(),
                st.text(max_size=8),
                st.just(ValueError("bad value")),
                st.just(RuntimeError("shape mismatch")),
            ),
        },
    ),
    "count_parameters": (
        keyword_call(batchlab.count_parameters, {"model": MODEL}, {}),
        {
            "model": bad_model().filter(lambda m: not isinstance(m, nn.Module)),
        },
    ),
    "setup": (keyword_call(batchlab.setup, {"seed": 0}, {}), {"seed": bad_seed()}),
    "launch": (
        keyword_call(batchlab.launch, {"fn": lambda rank, world_size: None}, {}),
        {
            "fn": not_a_number(),
            "nprocs": bad_positive_int(),
            "backend": st.sampled_from(["mpi", "GLOO", ""]),
            "timeout": bad_positive_float().filter(lambda v: v is not None),
            "port": st.one_of(st.integers(max_value=0), st.integers(min_value=65536), st.text(max_size=3)),
            "start_method": st.sampled_from(["forkserver!", "thread", ""]),
        },
    ),
}

PAIRS = [(name, arg) for name, (_, strategies) in CASES.items() for arg in strategies]


@pytest.mark.parametrize("name, arg", PAIRS, ids=[f"{n}-{a}" for n, a in PAIRS])
@SETTINGS
@given(data=st.data())
def test_a_bad_argument_is_refused_by_name_and_changes_nothing(name, arg, data):
    build, strategies = CASES[name]
    value = data.draw(strategies[arg], label=arg)
    # An argument named in the message: ``batch_sizes[0]``, ``micro_batches[1]`` and ``in_shape`` name theirs.
    named = {"value": "budget", "name": "name", "model_name": "model_name"}.get(arg, arg)
    if name == "train" and arg in ("steps", "epochs") and value is None:
        named = "steps"  # "give exactly one of epochs or steps"
    expect_refusal(build(arg, value), named)


def test_every_public_function_that_takes_arguments_is_covered():
    public = {
        n for n in batchlab.__all__ if callable(getattr(batchlab, n)) and not isinstance(getattr(batchlab, n), type)
    }
    checked_elsewhere = {  # their bad input has its own tests (widgets, figures, the loaders' own suites)
        "BatchSizeExplorer",
        "plot_histories",
        "plot_leak_checks",
        "plot_peak_breakdown",
        "plot_step_timeline",
        "loader_sweep",
        "loader_throughput",
        "gpu_reference",
        "process_memory",
        "accumulate_weighted",  # its model, batch and loss_fn: the four scenarios below
    }
    missing = public - set(CASES) - checked_elsewhere
    assert not missing, f"public functions without generated bad input: {sorted(missing)}"


def test_train_step_says_what_is_wrong_and_takes_an_optimizer_over_part_of_the_model():
    inputs, targets = BATCH
    refusals = [
        (dict(optimizer=OTHER_OPTIMIZER), ValueError, r"optimizer does not update model \(Sequential\)"),
        (dict(optimizer="sgd"), TypeError, "optimizer must be a torch.optim.Optimizer over the model's parameters"),
        (
            dict(targets=targets[:3]),
            ValueError,
            r"batch inputs and targets must have the same number of samples, "
            r"got \(8, 1, 6, 6\) and \(3,\)",
        ),
        (dict(targets=torch.tensor(1)), ValueError, "targets must have one target per sample along dim 0"),
        (dict(accumulation_steps=9), ValueError, "accumulation_steps must be at most 8, got 9"),
        (dict(accumulation_steps=[4, 2]), ValueError, r"must add up to the batch \(8\), got \[4, 2\]"),
        (dict(model=nn.Identity()), ValueError, "model has no trainable parameters"),
        (dict(no_sync=True), TypeError, "no_sync must be None or DDP's model.no_sync"),
    ]
    for change, error, message in refusals:
        call = {"model": MODEL, "optimizer": OPTIMIZER, "inputs": inputs, "targets": targets, **change}
        model, optimizer = call.pop("model"), call.pop("optimizer")
        before = snapshot(MODEL, OPTIMIZER)
        with pytest.raises(error, match=message):
            batchlab.train_step(model, optimizer, call.pop("inputs"), call.pop("targets"), **call)
        assert_unchanged(before, MODEL, OPTIMIZER)
    # Fine-tuning: an optimizer over the last layer only is an optimizer over some of the model's parameters.
    model = tiny_model()
    head = torch.optim.SGD(model[-1].parameters(), lr=0.1)
    first = model[0].weight.detach().clone()
    loss = batchlab.train_step(model, head, inputs, targets, accumulation_steps=[4, 4])
    assert math.isfinite(loss) and torch.equal(model[0].weight, first)
    assert model[-1].weight.grad is None  # zero_grad(set_to_none=True) ran: the step went through


# -- four scenarios for each function that takes a model ------------------------------------------


class Fails:
    """A loss function that raises ``error`` on its ``on``-th call (third by default; cross-entropy before)."""

    def __init__(self, error=None, on=3):
        self.error, self.on, self.calls = error, on, 0

    def __call__(self, outputs, targets):
        self.calls += 1
        if self.error is not None and self.calls == self.on:
            raise self.error
        return nn.functional.cross_entropy(outputs, targets)

    def __deepcopy__(self, memo):
        return self


def model_calls(model, loss_fn):
    """Each function that takes a model, called with ``loss_fn`` where it has one."""
    data, batch = tiny_data(), tiny_batch()

    def in_budget(fn):
        def call():
            with batchlab.memory_budget("64MiB", model):
                return fn()

        return call

    def own_steps():
        """The caller's own three forward passes and losses (the third raises in the error scenarios), with
        the global generator forked so that what dropout draws here is not put on the function's account."""
        with torch.random.fork_rng(devices=[]):
            for _ in range(3):
                loss_fn(model(batch[0]), batch[1])

    def block(opened):
        def call():
            with opened() as _:
                own_steps()

        return call

    def then(fn):
        def call():
            if not isinstance(loss_fn, str):
                own_steps()
            return fn()

        return call

    return {
        "train": lambda: batchlab.train(model, data, batch_size=8, steps=3, loss_fn=loss_fn, progress=False),
        "evaluate": then(lambda: batchlab.evaluate(model, data if not isinstance(loss_fn, str) else loss_fn)),
        "gradient_noise": lambda: batchlab.gradient_noise(model, data, [4], draws=2, loss_fn=loss_fn),
        "step_times": lambda: batchlab.step_times(model, data, [4], repeats=2, loss_fn=loss_fn),
        "profile_step": lambda: batchlab.profile_step(model, batch, loss_fn=loss_fn),
        "estimate_memory": lambda: batchlab.estimate_memory(model, batch, loss_fn=loss_fn),
        "max_batch_size": lambda: batchlab.max_batch_size(
            model, make_batch, budget="64MiB", loss_fn=loss_fn, limit=8, device="cpu"
        ),
        "probe_batch_size": in_budget(
            lambda: batchlab.probe_batch_size(model, make_batch, max_trials=3, loss_fn=loss_fn)
        ),
        "compare_gradients": lambda: batchlab.compare_gradients(model, batch, [4, 2, 2], loss_fn=loss_fn),
        "profile_accumulation": lambda: batchlab.profile_accumulation(model, batch, 2, loss_fn=loss_fn),
        "accumulation_step_time": lambda: accumulation_step_time(model, batch, 2, loss_fn=loss_fn, repeats=1),
        "accumulate_weighted": lambda: accumulate_weighted(model, split_batch(batch, 4), loss_fn=loss_fn),
        "batchnorm_statistics": then(
            lambda: batchnorm_statistics(model, batch if not isinstance(loss_fn, str) else loss_fn)
        ),
        "replace_batchnorm": then(
            lambda: batchlab.replace_batchnorm(model, "group" if not isinstance(loss_fn, str) else loss_fn)
        ),
        "memory_budget": block(
            lambda: batchlab.memory_budget("64MiB" if not isinstance(loss_fn, str) else loss_fn, model)
        ),
        "track_memory": block(lambda: batchlab.track_memory(model, loss_fn if isinstance(loss_fn, str) else None)),
    }


# What a successful call changes on purpose: train trains the model in place; accumulate_weighted leaves the
# accumulated gradients in .grad (that is its result); a forward pass in train mode updates BatchNorm's
# running statistics (the calls that run the caller's model outside a copy).
CHANGES_ON_SUCCESS = {
    "train": ("weights", "grads"),
    "accumulate_weighted": ("grads", "weights", "global"),
    "memory_budget": ("weights",),
    "track_memory": ("weights",),
    "evaluate": ("weights",),
    "batchnorm_statistics": ("weights",),
    "replace_batchnorm": ("weights",),
}
# Functions that give the caller's model back after an error inside. memory_budget and track_memory run the
# caller's own code in their block: what it changed before failing is the caller's.
RESTORES_AFTER_ERRORS = set(model_calls(None, None)) - {"accumulate_weighted"}
SCENARIOS = ["success", "bad input", "exception", "keyboard interrupt"]
CALLS = sorted(model_calls(None, None))


def frozen_model():
    """The tiny model in train mode with its BatchNorm frozen, and an existing gradient: all must survive."""
    model = tiny_model().train()
    model[1].eval()
    nn.functional.cross_entropy(model(tiny_batch()[0]), tiny_batch()[1]).backward()
    return model


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", CALLS)
def test_a_function_that_takes_a_model_gives_it_back(name, scenario):
    model = frozen_model()
    errors = {"exception": RuntimeError("the loss failed on its third call"), "keyboard interrupt": KeyboardInterrupt()}
    loss_fn = Fails(errors.get(scenario), on=2 if name in ("estimate_memory", "profile_step") else 3)
    if scenario == "bad input":
        loss_fn = "ce"
    call = model_calls(model, loss_fn)[name]
    before = snapshot(model)
    if scenario == "success":
        call()
        assert_unchanged(before, model, skip=CHANGES_ON_SUCCESS.get(name, ()))
        return
    expected = {
        "bad input": (TypeError, ValueError),
        "exception": RuntimeError,
        "keyboard interrupt": KeyboardInterrupt,
    }[scenario]
    with pytest.raises(expected):
        call()
    skip = () if scenario == "bad input" or name in RESTORES_AFTER_ERRORS else ("weights", "grads", "global")
    if (
        name in ("memory_budget", "track_memory", "evaluate", "batchnorm_statistics", "replace_batchnorm")
        and scenario != "bad input"
    ):
        skip = ("weights",)  # the caller's own forward passes (before the call) ran in train mode
    assert_unchanged(before, model, skip=skip)


def test_nested_budgets_say_so():
    with batchlab.memory_budget("64MiB"):
        with pytest.raises(RuntimeError, match="memory_budget is already active: budgets cannot be nested"):
            with batchlab.memory_budget("32MiB"):
                pass
