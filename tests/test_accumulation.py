"""Chapter 6's claims about gradient accumulation, each checked by a computation that could come out otherwise."""

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

import batchlab
from batchlab import accumulation, datasets
from batchlab.widgets import AccumulationExplorer


@pytest.fixture(scope="module")
def digits():
    return datasets.digits(train=True)


def first(dataset, n):
    return default_collate([dataset[i] for i in range(n)])


def mlp(seed=0):
    return batchlab.build_model("mlp", in_shape=(1, 8, 8), seed=seed)


def cnn_bn(seed=0):
    return batchlab.build_model("cnn_bn", in_shape=(1, 8, 8), seed=seed)


def snapshot(model):
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    return {k: v.clone() for k, v in model.state_dict().items()}, grads


def unchanged(model, before):
    state, grads = before
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and all(
        (g is None and p.grad is None) or (g is not None and p.grad is not None and torch.equal(g, p.grad))
        for g, p in zip(grads, model.parameters())
    )


def max_weight_difference(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# -- the equivalence ------------------------------------------------------------------------------


def test_accumulated_gradients_equal_the_full_batch_gradient(digits):
    inputs, targets = first(digits, 64)
    full, acc = mlp(), mlp()
    nn.functional.cross_entropy(full(inputs), targets).backward()
    loss = accumulation.accumulate_weighted(acc, accumulation.split_batch((inputs, targets), 4))
    for p, q in zip(full.parameters(), acc.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7)
    assert loss == pytest.approx(nn.functional.cross_entropy(full(inputs), targets).item(), rel=1e-6)
    comparison = batchlab.compare_gradients(mlp(), (inputs, targets), 4)
    assert comparison.equal and comparison.relative_difference < 1e-5
    assert comparison.names == [name for name, _ in mlp().named_parameters()]
    assert comparison.micro_batch_sizes == [16, 16, 16, 16]


def test_training_with_accumulation_follows_the_full_batch_curve_step_by_step(digits):
    # The chapter's claim: after many steps the weights agree to float precision and the curves overlap,
    # while a plain batch of 16 (the micro-batch) is a different run altogether.
    full, accumulated, small = mlp(), mlp(), mlp()
    h_full = batchlab.train(full, digits, batch_size=64, steps=100, progress=False)
    h_acc = batchlab.train(accumulated, digits, batch_size=64, steps=100, accumulation_steps=4, progress=False)
    batchlab.train(small, digits, batch_size=16, steps=100, progress=False)
    assert max_weight_difference(full, accumulated) < 1e-5
    assert max(abs(a - b) for a, b in zip(h_full.loss, h_acc.loss)) < 1e-5
    assert max_weight_difference(full, small) > 1e-2


def test_weighting_matches_uneven_micro_batches_where_the_naive_mean_does_not(digits):
    batch = first(digits, 50)
    weighted = batchlab.compare_gradients(mlp(), batch, [16, 16, 16, 2])
    naive = batchlab.compare_gradients(mlp(), batch, [16, 16, 16, 2], method="naive")
    assert weighted.equal and weighted.relative_difference < 1e-5
    assert not naive.equal and naive.relative_difference > 0.05
    assert naive.accumulated_loss != pytest.approx(naive.full_loss, rel=1e-3)
    assert weighted.accumulated_loss == pytest.approx(weighted.full_loss, rel=1e-6)
    # With equal micro-batches the naive mean is right: the pitfall is only the uneven case.
    assert batchlab.compare_gradients(mlp(), first(digits, 64), 4, method="naive").equal


class TokenTagger(nn.Module):
    """A label for every token of a sequence; padding carries the label -100 (ignored by the loss)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(20, 8), nn.Linear(8, 5)

    def forward(self, tokens):
        return self.head(self.embed(tokens))


def token_loss(outputs, targets):
    return nn.functional.cross_entropy(outputs.flatten(0, 1), targets.flatten(), ignore_index=-100)


def real_tokens(_inputs, targets):
    return (targets != -100).sum()


def padded_batch(lengths, width=10):
    tokens = torch.zeros(len(lengths), width, dtype=torch.long)
    targets = torch.full((len(lengths), width), -100)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.arange(n) + i
        targets[i, :n] = (torch.arange(n) + i) % 5
    return tokens, targets


def test_token_weighting_matches_the_masked_full_batch():
    batch = padded_batch([10, 9, 2, 1, 0, 0])  # the last micro-batch of 2 sequences is all padding
    by_tokens = batchlab.compare_gradients(TokenTagger(), batch, 3, loss_fn=token_loss, count=real_tokens)
    by_samples = batchlab.compare_gradients(TokenTagger(), batch, 3, loss_fn=token_loss)
    assert by_tokens.equal and by_tokens.relative_difference < 1e-5
    # The all-padding micro-batch is skipped: its mean over no tokens would be nan, even with weight 0.
    assert by_tokens.accumulated_loss == pytest.approx(by_tokens.full_loss, rel=1e-6)
    assert not by_samples.equal  # each micro-batch has 2 sequences but 19, 3 and 0 tokens


def test_bad_micro_batches_are_refused_with_what_would_work(digits):
    batch = first(digits, 50)
    with pytest.raises(ValueError, match=r"micro_batches\[3\] must be a positive int, got 0"):
        accumulation.split_batch(batch, [20, 20, 10, 0])
    with pytest.raises(ValueError, match=r"must add up to the batch \(50 samples\), got \[20, 20\] \(sum 40\)"):
        accumulation.split_batch(batch, [20, 20])
    with pytest.raises(
        ValueError,
        match=r"micro_batches=4 does not divide the batch of 50.*use one of \[1, 2, 5.*"
        r"e\.g\. \[13, 13, 13, 11\]",
    ):
        accumulation.split_batch(batch, 4)
    with pytest.raises(ValueError, match="micro_batches must be a positive int, got 0"):
        accumulation.split_batch(batch, 0)
    empty = (batch[0][:0], batch[1][:0])
    with pytest.raises(ValueError, match=r"micro_batches\[1\] has no samples"):
        batchlab.accumulate_weighted(mlp(), [batch, empty])
    with pytest.raises(ValueError, match="more than 0 in all"):
        batchlab.accumulate_weighted(mlp(), [batch], count=lambda x, y: 0)
    with pytest.raises(ValueError, match="accumulation_steps must divide the batch.*50 is not divisible by 3"):
        batchlab.profile_accumulation(mlp(), batch, 3)


def test_a_model_in_eval_mode_is_refused_and_left_alone(digits):
    batch = first(digits, 32)
    model = cnn_bn().eval()
    before = snapshot(model)
    for call in (
        lambda: batchlab.compare_gradients(model, batch, 2),
        lambda: batchlab.accumulate_weighted(model, accumulation.split_batch(batch, 2)),
        lambda: accumulation.batchnorm_statistics(model, batch, 2),
    ):
        with pytest.raises(ValueError, match=r"model is in eval mode.*Call model.train\(\) first"):
            call()
    assert unchanged(model, before) and not model.training


def test_a_failing_micro_batch_leaves_nothing_half_accumulated(digits):
    inputs, targets = first(digits, 32)
    broken = [(inputs[:16], targets[:16]), (inputs[16:, :, :4], targets[16:])]  # wrong shape: fails in forward
    model = cnn_bn()
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        batchlab.accumulate_weighted(model, broken)
    assert unchanged(model, before)  # no gradient, BatchNorm's running statistics as they were
    # Gradients that were there before are put back too.
    nn.functional.cross_entropy(model(inputs), targets).backward()
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        batchlab.accumulate_weighted(model, broken)
    assert unchanged(model, before)


def test_compare_gradients_does_not_touch_the_model(digits):
    model = cnn_bn()
    before = snapshot(model)
    batchlab.compare_gradients(model, first(digits, 32), 2)
    assert unchanged(model, before)


# -- BatchNorm --------------------------------------------------------------------------------------


def test_batchnorm_breaks_the_equivalence_because_it_sees_only_the_micro_batch(digits):
    batch = first(digits, 64)
    comparison = batchlab.compare_gradients(cnn_bn(), batch, 4)
    assert not comparison.equal and comparison.relative_difference > 0.01
    seen = accumulation.batchnorm_statistics(cnn_bn(), batch, 4)
    assert seen["layer"] == "1" and seen["micro_mean"].shape == (4, 32) and seen["full_mean"].shape == (32,)
    assert seen["mean_shift"] > 1e-3 and seen["output_difference"] > 1e-3
    # The full batch's mean is the mean of the four micro-batch means (equal sizes): same data, other statistics.
    torch.testing.assert_close(seen["micro_mean"].mean(0), seen["full_mean"], rtol=1e-4, atol=1e-6)
    one = accumulation.batchnorm_statistics(cnn_bn(), batch, 1)
    assert one["mean_shift"] == 0 and one["output_difference"] == 0
    with pytest.raises(ValueError, match="has no BatchNorm layer"):
        accumulation.batchnorm_statistics(mlp(), batch, 4)
    with pytest.raises(ValueError, match="has no BatchNorm layer"):  # ghost BatchNorm's statistics are fixed
        accumulation.batchnorm_statistics(batchlab.replace_batchnorm(cnn_bn(), "ghost"), batch, 4)


@pytest.mark.parametrize("norm", ["ghost", "group", "layer", "none"])
def test_replacing_batchnorm_restores_the_equivalence(digits, norm):
    original = cnn_bn()
    before = snapshot(original)
    model = batchlab.replace_batchnorm(original, norm, virtual_batch=16)
    assert unchanged(original, before)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) for m in model.modules()) or norm == "ghost"
    assert batchlab.compare_gradients(model, first(digits, 64), 4).equal


def test_ghost_batchnorm_trains_the_same_in_one_pass_and_accumulated(digits):
    runs = {}
    for name, build in (("batchnorm", cnn_bn), ("ghost", lambda: batchlab.replace_batchnorm(cnn_bn(), "ghost"))):
        models = [build(), build()]
        for model, k in zip(models, (1, 4)):
            batchlab.train(model, digits, batch_size=64, steps=20, accumulation_steps=k, progress=False)
        runs[name] = max_weight_difference(*models)
        # Running statistics too: updated once per virtual batch, in the same order both ways.
        buffers = [dict(m.named_buffers()) for m in models]
        runs[name + " buffers"] = max(
            (buffers[0][k] - buffers[1][k]).abs().max().item() for k in buffers[0] if buffers[0][k].is_floating_point()
        )
    assert runs["ghost"] < 1e-5 and runs["ghost buffers"] < 1e-5
    assert runs["batchnorm"] > 1e-3


def test_ghost_batchnorm_details():
    bn = nn.BatchNorm1d(3)
    ghost = batchlab.GhostBatchNorm(bn, 4)
    x = torch.randn(8, 3)
    torch.testing.assert_close(ghost(x), torch.cat([nn.BatchNorm1d(3)(x[:4]), nn.BatchNorm1d(3)(x[4:])]))
    with pytest.raises(ValueError, match="batch of 6 samples, not a multiple of its virtual batch \\(4\\)"):
        ghost(x[:6])
    ghost.eval()
    torch.testing.assert_close(ghost(x[:6]), bn(x[:6]))  # eval: running statistics, any batch size
    with pytest.raises(ValueError, match="virtual_batch must be an int >= 2, got 1"):
        batchlab.GhostBatchNorm(nn.BatchNorm1d(3), 1)
    with pytest.raises(ValueError, match="norm must be one of 'ghost', 'group', 'layer', 'none', got 'batch'"):
        batchlab.replace_batchnorm(cnn_bn(), "batch")
    with pytest.raises(ValueError, match="has no BatchNorm layer to replace"):
        batchlab.replace_batchnorm(mlp(), "group")


# -- memory and time --------------------------------------------------------------------------------


def test_profile_accumulation_measures_train_s_own_step():
    images = datasets.shapes(64, image_size=16, channels=1)
    batch = first(images, 64)
    model = batchlab.build_model("cnn", in_shape=(1, 16, 16), num_classes=5)
    before = snapshot(model)
    reports = {k: batchlab.profile_accumulation(model, batch, k) for k in (1, 4, 16)}
    assert unchanged(model, before)
    # One micro-batch is the ordinary step: the same bytes as profile_step, up to the scalar loss weight.
    assert abs(reports[1].peak_bytes - batchlab.profile_step(model, batch).peak_bytes) <= 16
    # Activations follow the micro-batch; the peak falls with it.
    activations = [reports[k].category_peaks["activations"] for k in (1, 4, 16)]
    assert activations[0] > 3.5 * activations[1] > 3.5 * 3.5 * activations[2]
    assert reports[1].peak_bytes > reports[4].peak_bytes > reports[16].peak_bytes
    # The whole batch stays alive in every setting (as in train, which loads it at once).
    assert all(r.category_peaks["inputs"] >= batch[0].nbytes for r in reports.values())
    seconds = accumulation.accumulation_step_time(model, batch, 4, repeats=2)
    assert 0 < seconds < 60
    with pytest.raises(ValueError, match="repeats must be a positive int, got 0"):
        accumulation.accumulation_step_time(model, batch, 4, repeats=0)


# -- the widget and its computation -------------------------------------------------------------------


def test_accumulation_run_trains_the_same_curve_at_any_micro_batch():
    data = datasets.digits(train=False)
    full = accumulation.accumulation_run(32, effective_batch=32, dataset=data, steps=8)
    split = accumulation.accumulation_run(8, effective_batch=32, dataset=data, steps=8)
    assert (full["accumulation_steps"], split["accumulation_steps"]) == (1, 4)
    assert len(split["loss"]) == 8 and max(abs(a - b) for a, b in zip(full["loss"], split["loss"])) < 1e-5
    activations = [run["memory"].category_peaks["activations"] for run in (full, split)]
    assert activations[1] * 3.5 < activations[0]  # a quarter of the samples at a time
    with pytest.raises(ValueError, match=r"micro_batch must divide the effective batch \(32\), got 6"):
        accumulation.accumulation_run(6, effective_batch=32, dataset=data)


def test_accumulation_widget_follows_its_control():
    widget = AccumulationExplorer(datasets.digits(train=False), effective_batch=32, micro_batch=32, steps=6)
    first_png = bytes(widget.image.value)
    assert first_png.startswith(b"\x89PNG") and "effective batch <b>32</b>" in widget.steps_label.value
    state = widget.set(micro_batch=4)
    assert (state["micro_batch"], state["accumulation_steps"], state["effective_batch"]) == (4, 8, 32)
    assert state["max_loss_difference"] < 1e-5 and set(state["measured"]) == {4, 32}
    assert "x <b>8</b> accumulation steps" in widget.steps_label.value and bytes(widget.image.value) != first_png
    widget.micro_batch.value = 8  # as a learner moving the slider
    assert widget.state["micro_batch"] == 8 and set(widget.state["measured"]) == {4, 8, 32}
    cached = widget._runs[4]
    widget.set(micro_batch=4)
    assert widget._runs[4] is cached  # a setting already run is reused
    with pytest.raises(ValueError, match="micro_batch must be one of"):
        widget.set(micro_batch=3)
    with pytest.raises(ValueError, match=r"set\(\) takes micro_batch"):
        widget.set(steps=3)
    text = widget._repr_mimebundle_()["text/plain"]
    assert text == "AccumulationExplorer(model='mlp', effective_batch=32, steps=6)"
