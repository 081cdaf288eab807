"""The exercise checks of every chapter: None prints the task, a wrong answer gets a hint, a right one passes."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import batchlab
from batchlab import datasets, exercises, loaders
from batchlab import explorer as ex
from batchlab.exercises import chapter6
from batchlab.validation import GiB


def test_every_chapter_check_is_re_exported_and_starts_with_your_turn():
    import importlib
    import inspect
    import pkgutil

    found = {}
    for info in pkgutil.iter_modules(exercises.__path__):
        module = importlib.import_module(f"batchlab.exercises.{info.name}")
        found |= {
            name: f
            for name, f in vars(module).items()
            if name.startswith("check_") and inspect.isfunction(f) and f.__module__ == module.__name__
        }
    assert set(found) == {name for name in exercises.__all__ if name.startswith("check_")}
    for name, function in found.items():
        assert getattr(exercises, name) is function and name in exercises.__all__
        assert "your_turn(" in inspect.getsource(function), f"{name} should print its task with your_turn"


def test_your_turn_prints_the_task_while_any_answer_is_missing(capsys):
    assert exercises.your_turn("do it.", 1, None) is True
    assert capsys.readouterr().out == "Your turn: do it.\n"
    assert exercises.your_turn("do it.", 0, False, "") is False
    assert capsys.readouterr().out == ""


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


# -- chapter 0: the explorer's largest batch ------------------------------------------------------------


def test_the_check_of_chapter_0_does_not_give_the_answer_away(capsys):
    exercises.check_largest_batch(None)
    assert "Your turn" in capsys.readouterr().out
    right = ex.largest_batch_for("cnn_bn", "GPU 8 GiB (simulated)")
    for wrong in (right + 1, right - 1, 0, float(right)):
        with pytest.raises(AssertionError) as caught:
            exercises.check_largest_batch(wrong)
        assert str(right) not in str(caught.value).replace(repr(wrong), "")
    exercises.check_largest_batch(right)
    assert capsys.readouterr().out.startswith(f"Correct: {right} images of 3x224x224")


# -- chapter 3: a padding collate_fn, the fastest num_workers, persistent workers ----------------------


def pad_collate(samples):
    tokens, labels = zip(*samples)
    lengths = torch.tensor([len(t) for t in tokens])
    padded = torch.nn.utils.rnn.pad_sequence(list(tokens), batch_first=True, padding_value=datasets.PAD)
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    return padded, mask, torch.tensor(labels)


def test_check_padding_collate_accepts_a_right_answer(capsys):
    exercises.check_padding_collate(pad_collate)
    out = capsys.readouterr().out
    assert out.startswith("Correct:") and out.count("✓") == 4


def test_check_padding_collate_placeholder(capsys):
    exercises.check_padding_collate(None)
    assert capsys.readouterr().out.startswith("Your turn:")
    with pytest.raises(TypeError, match="collate_fn must be a function"):
        exercises.check_padding_collate("pad")


def global_max(samples):
    padded, mask, labels = pad_collate(samples)
    width = 9  # pads every batch to the longest sequence of the whole data set
    return (
        torch.nn.functional.pad(padded, (0, width - padded.shape[1])),
        torch.nn.functional.pad(mask, (0, width - mask.shape[1])),
        labels,
    )


def no_mask(samples):
    padded, _, labels = pad_collate(samples)
    return padded, labels


def inverted_mask(samples):
    padded, mask, labels = pad_collate(samples)
    return padded, ~mask, labels


def pads_with_minus_one(samples):
    padded, mask, labels = pad_collate(samples)
    return padded.masked_fill(~mask, -1), mask, labels


def not_written(samples):
    raise NotImplementedError("write the body")


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (no_mask, r"expected \(padded, mask, labels\), got a tuple of 2"),
        (lambda s: pad_collate(s)[0], r"expected \(padded, mask, labels\), got a Tensor"),
        (global_max, "longest in this batch"),
        (inverted_mask, "mask should be True for its"),
        (pads_with_minus_one, "should end with padding 0"),
        (not_written, "raised NotImplementedError: write the body"),
        (lambda s: (*pad_collate(s)[:2], torch.tensor([0] * len(s))), r"labels\[\d\] should be sample"),
    ],
)
def test_check_padding_collate_explains_wrong_answers(wrong, message):
    with pytest.raises(AssertionError, match=message):
        exercises.check_padding_collate(wrong)


def test_check_best_num_workers_reads_the_learners_measurements(capsys, monkeypatch):
    monkeypatch.setattr(loaders, "usable_cores", lambda: 2)
    measured = {(64, 0): 400.0, (64, 1): 380.0, (64, 2): 700.0, (64, 3): 650.0, (32, 3): 9999.0}
    exercises.check_best_num_workers(None, measured)
    assert capsys.readouterr().out.startswith("Your turn: measure num_workers from 0 to one more than your usable")
    exercises.check_best_num_workers(2, measured)
    assert capsys.readouterr().out.startswith("Correct: num_workers=2 delivered 700 samples/s, 1.75x")
    with pytest.raises(AssertionError, match="num_workers=3 is not the fastest"):
        exercises.check_best_num_workers(3, measured)  # the faster (32, 3) is another batch size
    with pytest.raises(AssertionError, match="measure num_workers=3 at batch size 64 first"):
        exercises.check_best_num_workers(2, {k: v for k, v in measured.items() if k != (64, 3)})
    with pytest.raises(AssertionError, match="an int"):
        exercises.check_best_num_workers("2", measured)
    with pytest.raises(TypeError, match="measured must be a LoaderSweep"):
        exercises.check_best_num_workers(2, [700.0])


def test_check_best_num_workers_takes_a_sweep_and_explains_a_surprise(capsys, monkeypatch):
    monkeypatch.setattr(loaders, "usable_cores", lambda: 1)
    stats = [
        loaders.LoaderStats("DataLoader", 64, n, runs_samples_per_second=(rate,))
        for n, rate in ((0, 500.0), (1, 450.0), (2, 460.0))
    ]
    exercises.check_best_num_workers(0, loaders.LoaderSweep(stats, 1))
    assert "No workers came out on top" in capsys.readouterr().out


def test_check_persistent_prediction(capsys):
    exercises.check_persistent_prediction(None, None)
    assert capsys.readouterr().out.startswith("Your turn:")
    exercises.check_persistent_prediction(False, True)
    assert capsys.readouterr().out.startswith("Correct.")
    with pytest.raises(AssertionError, match="epoch 2 against epoch 1"):
        exercises.check_persistent_prediction(True, True)  # the answer without persistent workers
    with pytest.raises(AssertionError, match="the two workers"):
        exercises.check_persistent_prediction(False, False)
    with pytest.raises(AssertionError, match="True or False"):
        exercises.check_persistent_prediction("no", True)


# -- chapter 6: accumulation loops ----------------------------------------------------------------------


def naive_loop(model, optimizer, inputs, targets, accumulation_steps):
    for x, y in zip(inputs.chunk(accumulation_steps), targets.chunk(accumulation_steps)):
        (nn.functional.cross_entropy(model(x), y) / accumulation_steps).backward()
    optimizer.step()
    optimizer.zero_grad()


def test_loop_bug_check_tells_the_bugs_apart(capsys):
    loops = {bug: chapter6.reference_loop(bug) for bug in chapter6.BUGS}
    exercises.check_loop_bugs(dict.fromkeys(loops), loops)
    assert capsys.readouterr().out.startswith("Your turn: name the bug of each loop")
    exercises.check_loop_bugs({bug: bug for bug in loops}, loops)
    assert capsys.readouterr().out.startswith("Correct")
    swapped = {
        "missing loss scaling": "steps every micro-batch",
        "zero_grad in the wrong place": "zero_grad in the wrong place",
        "steps every micro-batch": "missing loss scaling",
    }
    with pytest.raises(AssertionError, match="is not its bug"):
        exercises.check_loop_bugs(swapped, loops)
    with pytest.raises(ValueError, match="one of 'missing loss scaling'"):
        exercises.check_loop_bugs({bug: "no idea" for bug in loops}, loops)


def test_accumulation_loop_check_wants_weighting_by_share(capsys):
    exercises.check_accumulation_loop(None)
    assert capsys.readouterr().out.startswith("Your turn")
    exercises.check_accumulation_loop(chapter6.reference_loop(None))
    assert capsys.readouterr().out.startswith("Correct")
    with pytest.raises(AssertionError, match="the last micro-batch here has 11 samples"):
        exercises.check_accumulation_loop(naive_loop)  # right for equal micro-batches only
    with pytest.raises(AssertionError, match="Even with four equal micro-batches"):
        exercises.check_accumulation_loop(chapter6.reference_loop("missing loss scaling"))


# -- chapter 9: out-of-memory messages and a plan -------------------------------------------------------


def test_the_three_messages_have_three_causes_in_three_forms():
    from batchlab.exercises.chapter9 import OOM_MESSAGES

    causes = [batchlab.explain_oom(message).cause for message in OOM_MESSAGES]
    assert causes == ["fragmentation", "single_allocation", "other_processes"]
    two_zero, one_x, two_two = OOM_MESSAGES
    assert "max_split_size_mb" in two_zero and "total capacity;" in two_zero
    assert "already allocated" in one_x and "max_split_size_mb" not in one_x
    assert "Including non-PyTorch memory" in two_two and "Process 4121 has" in two_two


def test_check_oom_causes_names_the_wrong_message_without_its_cause(capsys):
    exercises.check_oom_causes(None)
    assert capsys.readouterr().out.startswith("Your turn: name the cause of each of the messages A, B, C")
    exercises.check_oom_causes(["fragmentation", "single_allocation", "other_processes"])
    out = capsys.readouterr().out
    assert out.startswith("Correct:") and "  C: other_processes" in out
    with pytest.raises(AssertionError, match=r"^message C: not right") as wrong:
        exercises.check_oom_causes(("fragmentation", "single_allocation", "out_of_memory"))
    assert "other_processes" not in str(wrong.value)
    with pytest.raises(AssertionError, match=r"^messages A, B: not right"):
        exercises.check_oom_causes(["out_of_memory", "fragmentation", "other_processes"])
    with pytest.raises(ValueError, match="answers must be a list of 3 causes"):
        exercises.check_oom_causes("fragmentation")
    with pytest.raises(ValueError, match="each cause must be one of 'single_allocation'.*got \\['leak'\\]"):
        exercises.check_oom_causes(["fragmentation", "leak", "other_processes"])


PLAN_TASK = dict(model_name="cnn", in_shape=(1, 28, 28), effective_batch=4096, optimizer="sgd", gpu_gib=1)


@pytest.fixture(scope="module")
def small_plan():
    model = batchlab.build_model("cnn", in_shape=(1, 28, 28))

    def make_batch(n):
        return torch.empty(n, 1, 28, 28, device="meta"), torch.zeros(n, dtype=torch.long, device="meta")

    budget = GiB - batchlab.CUDA_CONSTANTS["cuda_context"][0]
    return batchlab.plan_fit(
        model, make_batch, budget=budget, effective_batch=4096, precisions="fp32", checkpointing=False, progress=False
    )


def test_check_plan_accepts_the_tasks_plan(small_plan, capsys):
    exercises.check_plan(None, **PLAN_TASK)
    assert capsys.readouterr().out.startswith("Your turn: plan build_model('cnn', in_shape=(1, 28, 28))")
    assert small_plan.accumulation_steps > 1  # the task is one that needs a plan
    exercises.check_plan(small_plan, **PLAN_TASK)
    assert capsys.readouterr().out.startswith("Correct: 1 ways fit; the best runs")


def test_check_plan_explains_what_is_wrong(small_plan):
    with pytest.raises(AssertionError, match="is the whole card"):
        exercises.check_plan(dataclasses.replace(small_plan, budget=GiB), **PLAN_TASK)
    with pytest.raises(AssertionError, match="is not what a 1 GiB GPU leaves PyTorch"):
        exercises.check_plan(dataclasses.replace(small_plan, budget=GiB // 2), **PLAN_TASK)
    with pytest.raises(AssertionError, match="the task asks for 4096"):
        exercises.check_plan(dataclasses.replace(small_plan, effective_batch=2048), **PLAN_TASK)
    with pytest.raises(AssertionError, match="the task's is 'adam'"):
        exercises.check_plan(small_plan, **{**PLAN_TASK, "optimizer": "adam"})
    with pytest.raises(AssertionError, match="the task's GPU is a CUDA device"):
        exercises.check_plan(dataclasses.replace(small_plan, device="cpu"), **PLAN_TASK)
    other_model = dataclasses.replace(small_plan.options[0], peak_bytes=small_plan.peak_bytes + 512)
    with pytest.raises(AssertionError, match="check the model and its input shape"):
        exercises.check_plan(dataclasses.replace(small_plan, options=[other_model]), **PLAN_TASK)
    with pytest.raises(AssertionError, match="give the FitPlan that batchlab.plan_fit returns, got dict"):
        exercises.check_plan({"micro_batch": 64}, **PLAN_TASK)
