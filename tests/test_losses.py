"""The default loss on a model's own output: what it takes, what it refuses (and how it says so), and
outputs and keyword inputs that reach a learner's loss_fn as they are."""

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchlab
from batchlab.losses import LANGUAGE_MODEL_LOSS, DefaultLoss, output_logits
from batchlab.steps import micro_batches


class TinyLM(nn.Module):
    def __init__(self, vocab=50, width=8):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, ids, attention_mask=None):
        h = self.embed(ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.head(h)


class Wrapped(nn.Module):
    """TinyLM's logits wrapped the way other libraries return them: 'tuple', 'dict' or 'object'."""

    def __init__(self, kind):
        super().__init__()
        self.lm, self.kind = TinyLM(), kind

    def forward(self, ids):
        logits = self.lm(ids)
        flat = logits.mean(1)  # (batch, vocab): what the default loss can take with (batch,) targets
        if self.kind == "tuple":
            return flat, logits
        if self.kind == "dict":
            return {"logits": flat, "hidden": logits}
        return types.SimpleNamespace(logits=flat, hidden=logits)


def lm_batch(n, length=6, vocab=50):
    return torch.randint(0, vocab, (n, length)), torch.randint(0, vocab, (n, length))


def test_language_model_with_the_default_loss_says_to_pass_loss_fn():
    for call in (
        lambda: batchlab.estimate_memory(TinyLM(), lm_batch(4)),
        lambda: batchlab.max_batch_size(TinyLM(), lm_batch, budget="1GiB"),
        lambda: batchlab.plan_fit(TinyLM(), lm_batch, budget="1GiB", effective_batch=8),
    ):
        with pytest.raises(ValueError, match="pass loss_fn") as error:
            call()
        assert "logits (batch, length, vocab)" in str(error.value)
        assert LANGUAGE_MODEL_LOSS in str(error.value)
        assert "(4, 6, 50)" in str(error.value) or "(1, 6, 50)" in str(error.value)


def test_the_language_model_loss_in_the_message_works():
    loss_fn = lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten())
    report = batchlab.estimate_memory(TinyLM(), lm_batch(4), loss_fn=loss_fn)
    assert report.peak_bytes > 0
    assert batchlab.max_batch_size(TinyLM(), lm_batch, budget="80MiB", loss_fn=loss_fn) > 1


@pytest.mark.parametrize("kind", ["tuple", "dict", "object"])
def test_outputs_reach_loss_fn_as_they_are_and_the_default_loss_finds_the_logits(kind):
    model, seen = Wrapped(kind), []

    def loss_fn(output, targets):
        seen.append(type(output))
        logits = output[0] if kind == "tuple" else output["logits"] if kind == "dict" else output.logits
        return F.cross_entropy(logits, targets)

    ids, targets = torch.randint(0, 50, (4, 6)), torch.randint(0, 50, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    given = batchlab.train_step(model, opt, ids, targets, loss_fn=loss_fn)
    assert seen == [{"tuple": tuple, "dict": dict, "object": types.SimpleNamespace}[kind]]
    default = batchlab.train_step(model, opt, ids, targets)  # lr 0: the same weights
    assert default == pytest.approx(given)


def test_default_loss_refuses_an_ambiguous_dict_and_other_outputs():
    with pytest.raises(TypeError, match=r"cannot tell which of the model's outputs \['a', 'b'\]"):
        output_logits({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="pass loss_fn"):
        output_logits("text")
    only = torch.zeros(2, 3)
    assert output_logits({"scores": only, "n": 3}) is only
    with pytest.raises(ValueError, match="Pass loss_fn"):
        DefaultLoss()(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


def test_default_loss_equals_cross_entropy_on_what_it_accepts():
    logits, classes = torch.randn(4, 5, 7), torch.randint(0, 5, (4, 7))
    assert DefaultLoss()(logits, classes) == F.cross_entropy(logits, classes)
    probabilities = torch.softmax(torch.randn(4, 5), 1)
    assert DefaultLoss()(logits[..., 0], probabilities) == F.cross_entropy(logits[..., 0], probabilities)


def keyword_batch(n):
    ids, targets = lm_batch(n)
    return {"ids": ids, "attention_mask": torch.ones(n, 6)}, targets


def test_keyword_inputs_are_cut_into_micro_batches_and_passed_as_keywords():
    inputs, targets = keyword_batch(5)
    parts = micro_batches(inputs, targets, [3, 2])
    assert [sorted(p[0]) for p in parts] == [["attention_mask", "ids"]] * 2
    assert torch.equal(parts[1][0]["ids"], inputs["ids"][3:]) and torch.equal(parts[1][1], targets[3:])
    loss_fn = lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten())
    model = TinyLM()
    expected = loss_fn(model(**inputs), targets).item()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    assert batchlab.train_step(
        model, opt, inputs, targets, loss_fn=loss_fn, accumulation_steps=[3, 2]
    ) == pytest.approx(expected)


def test_keyword_inputs_in_the_estimator_and_the_planner():
    loss_fn = lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten())
    plain = batchlab.estimate_memory(TinyLM(), lm_batch(4), loss_fn=loss_fn)
    keyword = batchlab.estimate_memory(TinyLM(), keyword_batch(4), loss_fn=loss_fn)
    assert keyword.breakdown["inputs"] == plain.breakdown["inputs"] + 4 * 6 * 4  # the float32 mask
    plan = batchlab.plan_fit(
        TinyLM(),
        keyword_batch,
        budget="1GiB",
        effective_batch=8,
        loss_fn=loss_fn,
        checkpointing=False,
        precisions="fp32",
    )
    assert sum(plan.micro_batches) == 8
    with pytest.raises(ValueError, match="same number of samples"):
        batchlab.estimate_memory(TinyLM(), ({"ids": torch.zeros(4, 6, dtype=torch.long)}, torch.zeros(3, 6)))


def test_keyword_inputs_are_refused_where_a_step_runs_for_real():
    """profile_step and the other measuring tools take tensors only: the refusal names the batch."""
    refused = r"batch must be a pair \(inputs, targets\) of tensors, as a DataLoader yields, got"
    with pytest.raises(TypeError, match=refused):
        batchlab.profile_step(TinyLM(), keyword_batch(2))
