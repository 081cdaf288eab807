"""leak_check (chapter 5): each classic leak is caught, its fix is not, and the message says what grows."""

import gc

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import batchlab
from batchlab import exercises


class Loop:
    """A small model, optimizer and batch, plus the state a training loop keeps between iterations."""

    def __init__(self):
        self.model = batchlab.build_model("mlp", in_shape=(1, 8, 8))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 1, 8, 8, generator=generator)
        self.y = torch.randint(0, 10, (32,), generator=generator)
        self.loss_fn = nn.CrossEntropyLoss()
        self.total = 0.0
        self.kept = []

    def loss(self):
        return self.loss_fn(self.model(self.x), self.y)

    def update(self, loss):
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


class Record:
    pass


# Each pair: (what leaks, the same iteration fixed). Both take a fresh Loop.
def sum_loss_before_backward(s):
    loss = s.loss()
    s.total = s.total + loss  # keeps every iteration's graph (its nodes) alive
    s.update(loss)


def sum_loss_before_backward_fixed(s):
    loss = s.loss()
    s.total = s.total + loss.item()
    s.update(loss)


def keep_outputs(s):
    s.kept.append(s.model(s.x))  # each output holds its graph and the activations it saved


def keep_outputs_fixed(s):
    s.kept = [s.model(s.x).argmax(1).tolist()]  # keep plain numbers, and only the latest


def evaluate_with_grad(s):
    s.total = s.total + s.loss()  # no backward ever frees these graphs


def evaluate_with_grad_fixed(s):
    with torch.no_grad():
        s.total = s.total + s.loss()


def cycle(s):
    record = Record()
    record.me = record  # a reference cycle: freed only when the garbage collector runs
    record.output = s.model(s.x).detach()


def cycle_fixed(s):
    record = Record()
    record.output = s.model(s.x).detach()


def add_loss_after_backward(s):
    loss = s.loss()
    s.update(loss)
    s.total += loss  # no storage kept (backward freed it), but the graph's nodes stay


def add_loss_after_backward_fixed(s):
    loss = s.loss()
    s.update(loss)
    s.total += loss.item()


PAIRS = {
    "sum_loss_before_backward": (sum_loss_before_backward, sum_loss_before_backward_fixed, "autograd graph nodes"),
    "keep_outputs": (keep_outputs, keep_outputs_fixed, "tensor memory grows"),
    "evaluate_with_grad": (evaluate_with_grad, evaluate_with_grad_fixed, "tensor memory grows"),
    "cycle": (cycle, cycle_fixed, "reference cycles"),
    "add_loss_after_backward": (add_loss_after_backward, add_loss_after_backward_fixed, "autograd graph nodes"),
}


@pytest.mark.parametrize("name", PAIRS)
def test_each_leak_is_caught_and_its_fix_is_not(name):
    leak, fixed, what = PAIRS[name]
    state = Loop()
    report = batchlab.leak_check(lambda: leak(state), iterations=10)
    assert report.leaking, report
    assert what in report.message, report.message
    state = Loop()
    report = batchlab.leak_check(lambda: fixed(state), iterations=10)
    assert not report.leaking, report
    assert report.bytes_per_iteration == 0 and report.nodes_per_iteration == 0
    assert "stay flat" in report.message


def test_growth_without_storage_is_named():
    state = Loop()
    report = batchlab.leak_check(lambda: add_loss_after_backward(state), iterations=10)
    assert report.bytes_per_iteration == 0  # nothing a memory counter would see
    assert report.nodes_per_iteration > 0 and "AddBackward0" in report.message


def test_bytes_per_iteration_is_what_is_kept():
    kept = []
    report = batchlab.leak_check(lambda: kept.append(torch.zeros(1000)), iterations=6)
    assert report.bytes_per_iteration == 4000  # float32: 4 bytes each
    assert report.bytes == [4000 * (i + 1) for i in range(6)]
    assert "3.9 KiB per iteration" in report.message and "Tensor +1" in report.message


def test_a_one_off_cost_or_a_bounded_cache_is_not_a_leak():
    calls, cache = [], []

    def once():
        calls.append(None)
        if len(calls) == 4:  # allocates once, during the measured iterations
            cache.append(torch.zeros(1000))

    assert not batchlab.leak_check(once, iterations=10, warmup=0).leaking

    def bounded():
        cache.append(torch.zeros(100))
        del cache[:-3]  # keeps the last three

    assert not batchlab.leak_check(bounded, iterations=10, warmup=0).leaking


def test_garbage_collection_is_restored():
    assert gc.isenabled()
    batchlab.leak_check(lambda: None, iterations=2)
    assert gc.isenabled()
    gc.disable()
    try:
        batchlab.leak_check(lambda: None, iterations=2)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ZeroDivisionError):
        batchlab.leak_check(lambda: 1 / 0, iterations=3, warmup=0)
    assert gc.isenabled()
    with batchlab.track_memory():  # the failed check left no tracker behind
        pass


def test_bad_arguments_get_clear_errors():
    with pytest.raises(TypeError, match="fn must be a function"):
        batchlab.leak_check("train")
    with pytest.raises(ValueError, match="iterations must be at least 2"):
        batchlab.leak_check(lambda: None, iterations=1)
    with pytest.raises(TypeError, match="iterations must be an int"):
        batchlab.leak_check(lambda: None, iterations=2.5)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        batchlab.leak_check(lambda: None, warmup=-1)
    with batchlab.track_memory():
        with pytest.raises(RuntimeError, match="leak_check cannot run inside a track_memory or memory_budget block"):
            batchlab.leak_check(lambda: None, iterations=2)


def test_plot_leak_checks():
    kept = []
    leak = batchlab.leak_check(lambda: kept.append(torch.zeros(10)), iterations=3, label="leak")
    flat = batchlab.leak_check(lambda: torch.zeros(10), iterations=3, label="fixed")
    fig = batchlab.plot_leak_checks([leak, flat])
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert [line.get_label() for line in fig.axes[0].lines] == ["leak", "fixed"]
    with pytest.raises(TypeError, match="LeakReport"):
        batchlab.plot_leak_checks([])


def test_listed_node_types_add_up_to_the_growth():
    state = Loop()
    report = batchlab.leak_check(lambda: sum_loss_before_backward(state), iterations=10)
    listed = report.message.split("autograd graph nodes grow by ")[1].split(": a tensor")[0]
    total, types = listed.split(" per iteration (")
    growths = [float(item.split(" +")[1]) for item in types.rstrip(")").split(", ")]
    assert sum(growths) == float(total) == report.nodes_per_iteration == 11  # every type is listed
    assert "NllLossBackward0 +1" in report.message


def test_describe_sums_the_types_past_the_limit():
    from batchlab.leaks import _describe

    types = {f"Type{i}": 1.0 for i in range(8)} | {"Big": 3.0}
    assert _describe(types, limit=3) == "Big +3, Type0 +1, Type1 +1, +6 in 6 other types"
    assert _describe({"A": 2.0, "B": 1.0}) == "A +2, B +1"


# --- exercise 1: a forward hook that keeps a number ------------------------------------------------------


def hook_exercise():
    """The exercise's setting: a training step of a small model, the layer to hook and the list to keep."""
    state = Loop()
    return state, state.model[1], lambda: state.update(state.loss()), []


def test_check_hook_fix_accepts_a_hook_that_keeps_a_float(capsys):
    state, layer, step, means = hook_exercise()
    exercises.check_hook_fix(lambda module, inputs, output: means.append(output.mean().item()), layer, step, means)
    assert capsys.readouterr().out.startswith("Correct: tensor memory, autograd graph nodes and Python objects")
    assert not layer._forward_hooks and means == []  # the check removed its hooks and its calls' values


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        (lambda m, i, output: None, "one value to the list per forward pass: 13 passes, 0 values"),
        ("keeps the output", "still growing: tensor memory grows"),
        ("keeps output.mean()", "still growing: .*autograd graph nodes grow"),
        ("keeps a detached mean", "still growing"),
        ("keeps the max", "the mean of the layer's output"),
        (lambda m, i, output: 1 / 0, "the step raised ZeroDivisionError"),
    ],
)
def test_check_hook_fix_rejects_hooks_that_keep_nothing_or_a_tensor(hook, message):
    state, layer, step, means = hook_exercise()
    hooks = {
        "keeps the output": lambda m, i, output: means.append(output),
        "keeps output.mean()": lambda m, i, output: means.append(output.mean()),
        "keeps a detached mean": lambda m, i, output: means.append(output.detach().mean()),
        "keeps the max": lambda m, i, output: means.append(output.max().item()),
    }
    with pytest.raises(AssertionError, match=message):
        exercises.check_hook_fix(hooks.get(hook, hook), layer, step, means)
    assert not layer._forward_hooks  # removed even when the check fails


def test_check_hook_fix_cannot_be_passed_without_a_hook(capsys):
    # The trivial answer to the old exercise: a step that runs with no hook at all. The check registers
    # the learner's hook itself, so a do-nothing hook (or none) cannot pass.
    state, layer, step, means = hook_exercise()
    with pytest.raises(AssertionError, match="0 values"):
        exercises.check_hook_fix(lambda *args: None, layer, step, means)
    with pytest.raises(AssertionError, match="the step never ran the layer"):
        exercises.check_hook_fix(lambda m, i, output: means.append(output.mean().item()), layer, lambda: None, means)
    exercises.check_hook_fix(None, layer, step, means)
    assert capsys.readouterr().out.startswith("Your turn:")
    with pytest.raises(TypeError, match="hook must be a function"):
        exercises.check_hook_fix("keep_mean", layer, step, means)
    with pytest.raises(TypeError, match="kept must be the list"):
        exercises.check_hook_fix(lambda *args: None, layer, step, None)
