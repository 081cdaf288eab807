"""batchlab.plan_fit: plans that keep the effective batch, fit the budget, rank by cost, and train as promised."""

import copy
import math

import pytest
import torch
from torch import nn

import batchlab
from batchlab import datasets
from batchlab.plan import (
    RECOMPUTE,
    describe_micro_batches,
    micro_step_seconds,
    reference_step_times,
    split_evenly,
)

BUDGET = 3 * 2**20  # the cnn on the digits needs about 7.4 MiB of tensors for a step of 250 samples
EFFECTIVE = 250


@pytest.fixture(scope="module")
def digits():
    return datasets.digits(train=True)


@pytest.fixture(scope="module")
def make_batch(digits):
    inputs = torch.stack([digits[i][0] for i in range(len(digits))])
    targets = torch.tensor([digits[i][1] for i in range(len(digits))])
    return lambda n: (inputs[:n], targets[:n])


def cnn():
    return batchlab.build_model("cnn", in_shape=(1, 8, 8))


@pytest.fixture(scope="module")
def plan(make_batch):
    return batchlab.plan_fit(cnn(), make_batch, budget=BUDGET, effective_batch=EFFECTIVE, device="cpu")


def test_every_option_keeps_the_effective_batch_exactly(plan):
    assert len(plan.options) == 4  # fp32 and bf16, with and without checkpointing
    for option in plan.options:
        assert sum(option.micro_batches) == EFFECTIVE
        assert max(option.micro_batches) - min(option.micro_batches) <= 1  # as equal as possible
        assert option.accumulation_steps == len(option.micro_batches)
        assert option.micro_batch == max(option.micro_batches)


def test_uneven_micro_batches_when_no_divisor_fits(make_batch):
    plan = batchlab.plan_fit(
        cnn(),
        make_batch,
        budget=BUDGET,
        effective_batch=EFFECTIVE,
        device="cpu",
        precisions="fp32",
        checkpointing=False,
    )
    assert plan.options[0].max_micro_batch == 96  # 250 / 96 -> 3 micro-batches, and 3 does not divide 250
    assert plan.micro_batches == [84, 83, 83]
    assert plan.micro_batch == 84 and plan.accumulation_steps == 3
    assert plan.train_kwargs()["accumulation_steps"] == [84, 83, 83]
    assert "84 x 1 + 83 x 2" in repr(plan)


def test_every_option_fits_its_estimate_and_uses_the_fewest_micro_batches(plan, make_batch):
    model = cnn()
    for option in plan.options:
        assert option.micro_batch <= option.max_micro_batch
        assert option.peak_bytes <= BUDGET and option.reserved_bytes is None  # the CPU has no caching allocator
        # the fewest micro-batches: one fewer would need a micro-batch above what fits, or its accumulated
        # step (the whole batch's inputs alive all along) would not leave max_batch_size's margin free
        fewer = option.accumulation_steps - 1
        if fewer and math.ceil(EFFECTIVE / fewer) <= option.max_micro_batch:
            with pytest.raises(torch.OutOfMemoryError):
                batchlab.estimate_memory(
                    model,
                    make_batch(EFFECTIVE),
                    device="cpu",
                    budget=BUDGET,
                    keep_margin=True,
                    accumulation_steps=split_evenly(EFFECTIVE, fewer) if fewer > 1 else 1,
                    precision=option.precision,
                    checkpointing="blocks" if option.checkpointing else None,
                )
        # the accumulated step, estimated again, fits the budget (estimate_memory raises if not)
        batchlab.estimate_memory(
            model,
            make_batch(2 * option.micro_batch),
            device="cpu",
            budget=BUDGET,
            accumulation_steps=2,
            precision=option.precision,
            checkpointing="blocks" if option.checkpointing else None,
        )
    first = plan.options[0]
    assert first.max_micro_batch == batchlab.max_batch_size(
        model,
        make_batch,
        budget=BUDGET,
        device="cpu",
        limit=EFFECTIVE,
        precision=first.precision,
        checkpointing="blocks" if first.checkpointing else None,
    )


def test_options_are_ranked_by_the_cost_model(plan):
    costs = [option.cost for option in plan.options]
    assert costs == sorted(costs)
    whole = micro_step_seconds(EFFECTIVE)
    for option in plan.options:
        expected = (
            sum(
                micro_step_seconds(n, precision=option.precision, checkpointing=option.checkpointing)
                for n in option.micro_batches
            )
            / whole
        )
        assert option.cost == pytest.approx(expected)
    assert plan.options[0] is plan.chosen and plan.precision == plan.options[0].precision
    assert [o.checkpointing for o in plan.options[-2:]] == [True, True]  # recomputation costs a third more


def test_cost_model_numbers():
    fixed, per_sample, floor = reference_step_times()
    # The line through the reference's batch-64 and batch-256 steps, the floor at batch 1 (H100, ResNet-18).
    assert fixed + 64 * per_sample == pytest.approx(0.014572668075561523)
    assert fixed + 256 * per_sample == pytest.approx(0.05246574878692627)
    assert micro_step_seconds(1) == floor == pytest.approx(0.006504130363464355)
    assert micro_step_seconds(256, checkpointing=True) == pytest.approx(fixed + 256 * per_sample * RECOMPUTE)
    assert split_evenly(256, 3) == (86, 85, 85) and split_evenly(256, 2) == (128, 128)
    assert describe_micro_batches((128, 128)) == "128 x 2"


def test_the_plan_trains_without_oom_and_equals_the_large_batch(make_batch, digits):
    model, large, refused = cnn(), cnn(), cnn()
    plan = batchlab.plan_fit(
        model,
        make_batch,
        budget=BUDGET,
        effective_batch=EFFECTIVE,
        device="cpu",
        precisions="fp32",
        checkpointing=False,
    )
    run = dict(steps=2, progress=False, lr=0.05)
    with pytest.raises(torch.OutOfMemoryError):  # the large batch does not fit the budget
        with batchlab.memory_budget(BUDGET, refused):
            batchlab.train(refused, digits, batch_size=EFFECTIVE, **run)
    with batchlab.memory_budget(BUDGET, model):
        planned = batchlab.train(model, digits, **plan.train_kwargs(), **run)
    reference = batchlab.train(large, digits, batch_size=EFFECTIVE, **run)
    assert planned.loss == pytest.approx(reference.loss, abs=1e-6)
    for a, b in zip(model.parameters(), large.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_takes_the_plan_itself(plan, digits):
    run = dict(steps=1, progress=False, lr=0.05)
    a, b = cnn(), cnn()
    by_plan = batchlab.train(a, digits, plan=plan, **run)
    by_kwargs = batchlab.train(b, digits, **plan.train_kwargs(), **run)
    assert by_plan == by_kwargs
    with pytest.raises(ValueError, match="train got plan= and batch_size=3, but the plan says batch_size="):
        batchlab.train(cnn(), digits, plan=plan, batch_size=3, **run)
    with pytest.raises(TypeError, match="plan must be a batchlab.FitPlan"):
        batchlab.train(cnn(), digits, plan={"batch_size": 8}, **run)
    with pytest.raises(TypeError, match=r"train needs batch_size= \(samples per optimizer step\) or plan="):
        batchlab.train(cnn(), digits, **run)


def test_train_kwargs_and_learning_rate(plan):
    kwargs = plan.train_kwargs()
    assert kwargs["batch_size"] == EFFECTIVE and kwargs["optimizer"] == "sgd"
    assert kwargs["precision"] == plan.precision
    assert kwargs["checkpointing"] == ("blocks" if plan.checkpointing else None)
    sizes = plan.micro_batches  # equal micro-batches as a number, uneven ones as the list of their sizes
    assert kwargs["accumulation_steps"] == (plan.accumulation_steps if len(set(sizes)) == 1 else list(sizes))
    assert plan.learning_rate(0.05, 50) == pytest.approx(0.25)
    assert "plan.learning_rate(base_lr, base_batch)" in repr(plan) and f"batch {EFFECTIVE}" in repr(plan)
    with pytest.raises(ValueError, match="base_batch must be a positive int, got 0"):
        plan.learning_rate(0.05, 0)


def test_plan_prints_as_a_table_with_the_chosen_one_marked(plan):
    lines = repr(plan).splitlines()
    assert lines[0].startswith(f"FitPlan: effective batch {EFFECTIVE} in 3.0 MiB on cpu (4 options")
    assert lines[1].split() == [
        "micro-batches",
        "steps",
        "largest",
        "fitting",
        "precision",
        "checkpointing",
        "peak",
        "reserved",
        "cost",
    ]
    assert lines[2].startswith("*") and not any(line.startswith("*") for line in lines[3:])
    assert len(lines) == 2 + 4 + 1  # title, header, one row per option, the learning-rate note
    assert [line.split()[-1] for line in lines[2:6]] == [f"{o.cost:.2f}" for o in plan.options]


def test_train_refuses_micro_batch_sizes_that_do_not_add_up(digits):
    with pytest.raises(ValueError, match=r"add up to batch_size \(64\), got \[30, 30\] \(sum 60\)"):
        batchlab.train(cnn(), digits, batch_size=64, accumulation_steps=[30, 30], steps=1, progress=False)


def test_gpu_plan_reserved_memory_fits(make_batch):
    def meta_batch(n):
        return torch.empty(n, 3, 224, 224, device="meta"), torch.empty(n, dtype=torch.long, device="meta")

    with torch.device("meta"):
        model = batchlab.build_model("mlp", in_shape=(3, 224, 224))
    budget = 4 * 2**30 - batchlab.CUDA_CONSTANTS["cuda_context"][0]
    plan = batchlab.plan_fit(model, meta_batch, budget=budget, effective_batch=1024, checkpointing=False)
    for option in plan.options:
        assert sum(option.micro_batches) == 1024
        assert option.peak_bytes <= option.reserved_bytes <= budget


def test_nothing_fits_when_only_the_whole_batchs_inputs_do_not():
    def meta_batch(n):
        return torch.empty(n, 3, 224, 224, device="meta"), torch.empty(n, dtype=torch.long, device="meta")

    with torch.device("meta"):
        model = batchlab.build_model("mlp", in_shape=(3, 224, 224))
    with pytest.raises(
        ValueError,
        match=r"a micro-batch of 1 fits budget .* alone .* but a step of 4096 samples "
        r"keeps the whole batch's inputs alive",
    ):
        batchlab.plan_fit(
            model, meta_batch, budget="3.25GiB", effective_batch=4096, checkpointing=False, progress=False
        )


def test_nothing_fits_says_what_batch_one_needs_and_the_lever(make_batch):
    with pytest.raises(ValueError) as info:
        batchlab.plan_fit(cnn(), make_batch, budget="800KiB", effective_batch=64, device="cpu", optimizer="adam")
    message = str(info.value)
    assert message.startswith("nothing fits: plan_fit found no way to run 64 samples per step in budget 800.0 KiB")
    assert "not even micro-batches of 1 (tried fp32, fp32 checkpointed, bf16, bf16 checkpointed)" in message
    assert "A batch of 1 in fp32 needs 1.1 MiB (optimizer_state 414.1 KiB," in message
    assert "over the budget" in message
    for category in ("parameters", "gradients", "optimizer_state", "activations"):
        assert category in message
    levers = message.split("The lever that helps most comes first: ")[1]
    assert levers.startswith("an optimizer with less state than 'adam'")  # Adam keeps two buffers per weight
    assert levers.index("(enough alone)") < levers.index(";")  # and it alone would be enough


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat, self.fc = nn.Flatten(), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.flat(x))


def test_model_without_blocks(make_batch):
    plan = batchlab.plan_fit(NoBlocks(), make_batch, budget="1MiB", effective_batch=32, device="cpu")
    assert {o.checkpointing for o in plan.options} == {False}
    assert "NoBlocks has no blocks" in repr(plan)
    with pytest.raises(ValueError, match="checkpointing=True needs a model with blocks"):
        batchlab.plan_fit(NoBlocks(), make_batch, budget="1MiB", effective_batch=32, device="cpu", checkpointing=True)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(effective_batch=0), ValueError, "effective_batch must be a positive int, got 0"),
        (dict(effective_batch=-8), ValueError, "effective_batch must be a positive int, got -8"),
        (dict(effective_batch=64.0), TypeError, r"effective_batch must be an int, got 64.0 \(float\)"),
        (dict(effective_batch=True), TypeError, "effective_batch must be an int, got True"),
        (
            dict(effective_batch=5000),
            ValueError,
            "effective_batch 5000 is larger than make_batch can make: "
            r"make_batch\(5000\) returned inputs of shape \(1438, 1, 8, 8\)",
        ),
        (
            dict(make_batch=lambda n: (torch.zeros(n, 1, 8, 8 if n == 1 else 9), torch.zeros(n, dtype=torch.long))),
            ValueError,
            r"make_batch must build samples of one shape, but it gave \{1: \(1, 8, 8\), 64: \(1, 8, 9\)",
        ),
        (dict(budget="lots"), ValueError, "budget 'lots' is not a memory size"),
        (dict(budget=0), ValueError, "budget must be a positive amount of memory, got 0"),
        (
            dict(budget="100 KiB"),
            ValueError,
            r"budget 100.0 KiB is smaller than the model's weights and gradients "
            r"alone \(414.1 KiB\)",
        ),
        (dict(precisions="fp8"), ValueError, "precisions must be one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
        (dict(precisions=("fp32", "half")), ValueError, "precisions must be one of .*got 'half'"),
        (dict(precisions=()), ValueError, r"precisions must be one setting or a non-empty tuple of them \('fp32'"),
        (dict(checkpointing="yes"), ValueError, "checkpointing must be one setting or a non-empty tuple"),
        (dict(checkpointing=(False, 1)), TypeError, "checkpointing must be True or False, got 1"),
        (dict(device="tpu"), ValueError, "device must be one of 'cuda', 'cpu', got 'tpu'"),
        (dict(optimizer="lion"), ValueError, "optimizer must be 'sgd', 'adam' or a function"),
        (dict(make_batch="digits"), TypeError, "make_batch must be a function n -> .inputs, targets., got 'digits'"),
        (
            dict(make_batch=lambda n: (torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))),
            ValueError,
            r"make_batch\(1\) must return 1 samples: make_batch\(1\) returned inputs of shape \(8, 1, 8, 8\)",
        ),
        (
            dict(make_batch=lambda n: (torch.zeros(n, 1, 8, 8), torch.zeros(n + 1, dtype=torch.long))),
            ValueError,
            r"make_batch\(1\) inputs and targets must have the same number of samples",
        ),
    ],
)
def test_bad_input_is_refused_before_anything_runs(make_batch, monkeypatch, change, error, match):
    def no_estimate(*args, **kwargs):
        raise AssertionError("an estimate ran before the arguments were checked")

    monkeypatch.setattr(batchlab.plan, "estimate_memory", no_estimate)
    monkeypatch.setattr(batchlab.plan, "max_batch_size", no_estimate)
    args = dict(budget=BUDGET, effective_batch=64, device="cpu", make_batch=make_batch) | change
    with pytest.raises(error, match=match):
        batchlab.plan_fit(cnn(), args.pop("make_batch"), **args)


def test_make_batch_of_the_wrong_sample_shape(make_batch):
    def images_12x12(n):
        return torch.zeros(n, 1, 12, 12), torch.zeros(n, dtype=torch.long)

    with pytest.raises(
        ValueError,
        match=r"make_batch returned inputs of shape \(1, 1, 12, 12\), which the model "
        r"cannot take: .* make_batch\(n\) must build n samples of the shape",
    ):
        batchlab.plan_fit(cnn(), images_12x12, budget=BUDGET, effective_batch=64, device="cpu")


def test_model_is_only_read(make_batch):
    model = cnn()
    before = copy.deepcopy(model.state_dict())
    batchlab.plan_fit(model, make_batch, budget=BUDGET, effective_batch=64, device="cpu", precisions="fp32")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])
    assert all(p.grad is None for p in model.parameters())


def test_each_estimate_runs_once_and_max_batch_size_once_per_setting(make_batch, monkeypatch):
    estimates, searches = [], []
    real_estimate, real_search = batchlab.plan.estimate_memory, batchlab.plan.max_batch_size

    def estimate(model, batch, **kwargs):
        estimates.append(
            (
                len(batch[0]),
                kwargs["accumulation_steps"],
                kwargs["precision"],
                kwargs["checkpointing"],
                kwargs["budget"],
            )
        )
        return real_estimate(model, batch, **kwargs)

    def search(*args, **kwargs):
        searches.append((kwargs["precision"], kwargs["checkpointing"]))
        return real_search(*args, **kwargs)

    monkeypatch.setattr(batchlab.plan, "estimate_memory", estimate)
    monkeypatch.setattr(batchlab.plan, "max_batch_size", search)
    with pytest.raises(ValueError, match="nothing fits"):  # the error reuses the batch-1 estimates
        batchlab.plan_fit(cnn(), make_batch, budget="800KiB", effective_batch=64, device="cpu", optimizer="adam")
    assert len(estimates) == len(set(estimates)) == 3  # fp32, bf16, fp32 checkpointed at batch 1
    assert searches == [("fp32", None), ("fp32", "blocks"), ("bf16", None), ("bf16", "blocks")]


def test_train_halves_uneven_micro_batches_on_oom(digits):
    model = cnn()
    with batchlab.memory_budget(BUDGET, model):
        history = batchlab.train(
            model, digits, batch_size=EFFECTIVE, accumulation_steps=[200, 50], steps=1, progress=False, on_oom="halve"
        )
    assert history.notes == [
        f"step 1: out of memory; now 4 micro-batches of about 63 samples (the effective batch is still {EFFECTIVE})"
    ]


def test_a_plan_of_many_micro_batches_is_estimated_as_the_whole_step_train_runs():
    # The whole batch's inputs stay alive through the step: the plan's peak is that of the real step.
    model = batchlab.build_model("cnn", in_shape=(1, 28, 28))

    def make(n):
        return torch.empty(n, 1, 28, 28, device="meta"), torch.empty(n, dtype=torch.long, device="meta")

    whole = batchlab.estimate_memory(model, make(4096), device="cuda")
    plan = batchlab.plan_fit(
        model,
        make,
        budget=int(whole.peak_bytes * 0.4),
        effective_batch=4096,
        precisions="fp32",
        checkpointing=False,
        progress=False,
    )
    assert plan.accumulation_steps > 2
    real = batchlab.estimate_memory(  # in the budget with its margin kept, as plan_fit checks it
        model, make(4096), accumulation_steps=list(plan.micro_batches), budget=plan.budget, keep_margin=True
    )
    assert plan.peak_bytes == real.peak_bytes
