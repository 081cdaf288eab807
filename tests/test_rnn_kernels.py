"""Recurrent layers in the estimator: one cuDNN call on CUDA, the CPU's own step-by-step replay on the CPU."""

import copy

import pytest
import torch
from torch import nn

import batchlab
from batchlab.rnn_kernels import RNNShape, reserve_bytes, use_cpu_layers, use_cudnn_kernels


def meta_copy(module):
    return copy.deepcopy(module).to("meta")


def shapes(out):
    """The shapes of a recurrent layer's result: (output, h) or (output, (h, c))."""
    output, state = out
    return [output.shape] + [t.shape for t in (state if isinstance(state, tuple) else (state,))]


class Tagger(nn.Module):
    """Embedding, a recurrent layer, a linear head: a token-per-step classifier (targets of shape (N, T))."""

    def __init__(self, cell=nn.GRU, **kwargs):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.rnn = cell(16, 32, batch_first=True, **kwargs)
        self.head = nn.Linear(32 * (2 if kwargs.get("bidirectional") else 1), 7)

    def forward(self, x):
        out, _state = self.rnn(self.embed(x))
        return self.head(out).flatten(0, 1)


def per_token_loss(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets.flatten())


def token_batch(n=4, steps=12, device="cpu"):
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 50, (n, steps), generator=g), torch.randint(0, 7, (n, steps), generator=g)
    return tuple(t.to(device) for t in batch)


@pytest.mark.parametrize(
    "cell, kwargs",
    [
        (nn.GRU, {}),
        (nn.GRU, {"num_layers": 2, "dropout": 0.2}),
        (nn.GRU, {"bidirectional": True}),
        (nn.RNN, {"num_layers": 2}),
    ],
    ids=["gru", "gru2-dropout", "bigru", "rnn2"],
)
def test_a_cpu_rnn_estimate_matches_the_cpu_measurement(cell, kwargs):
    torch.manual_seed(0)
    model, batch = Tagger(cell, **kwargs), token_batch()
    estimate = batchlab.estimate_memory(model, batch, loss_fn=per_token_loss, device="cpu")
    measured = batchlab.profile_step(model, batch, loss_fn=per_token_loss, device="cpu")
    assert estimate.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.02)
    assert estimate.warnings == []  # the CPU's own layer loop, not a model of a kernel


def test_a_cpu_lstm_estimate_says_what_it_does_not_model():
    report = batchlab.estimate_memory(Tagger(nn.LSTM), token_batch(), loss_fn=per_token_loss, device="cpu")
    assert report.warnings == [
        "rnn (nn.LSTM) runs on the CPU through oneDNN (mkldnn_rnn_layer), whose workspace "
        "this estimate does not model: measure it with batchlab.profile_step"
    ]


def test_the_kernel_returns_what_the_module_returns():
    for cell in (nn.GRU, nn.LSTM):
        torch.manual_seed(0)
        real = cell(16, 32, num_layers=2, batch_first=True, bidirectional=True)
        meta = meta_copy(real)
        assert use_cudnn_kernels(meta) == [cell.__name__]
        x = torch.zeros(3, 5, 16)
        want, got = real(x), meta(x.to("meta"))
        assert shapes(got) == shapes(want)
        assert isinstance(got[1], tuple) == (cell is nn.LSTM)


def test_the_weight_gradient_is_one_flat_buffer_as_cudnn_returns_it():
    meta = meta_copy(nn.LSTM(16, 32, num_layers=2))
    use_cudnn_kernels(meta)
    out, _ = meta(torch.empty(7, 3, 16, device="meta", requires_grad=True))
    out.sum().backward()
    params = list(meta.parameters())
    total = sum(p.numel() * p.element_size() for p in params)
    assert all(p.grad.untyped_storage().nbytes() == total for p in params)


def test_reserve_space_model_by_hand():
    # LSTM, 2 layers, 1 direction, H = 8, T = 5, N = 3: per step and layer 4 gates + the cell state, plus
    # the first layer's output: 5 * 3 * 8 * (2 * 5 + 1) values of 4 bytes.
    lstm = nn.LSTM(4, 8, num_layers=2)
    assert reserve_bytes(lstm, torch.empty(5, 3, 4, device="meta")) == 5 * 3 * 8 * 11 * 4
    gru = RNNShape("GRU", layers=1, directions=2, hidden=8, steps=5, batch=3, batch_first=False)
    assert gru.reserve_elements() == 5 * 3 * 8 * 2 * 4 and gru.workspace_elements() == 5 * 3 * 2 * 3 * 8


def test_layers_the_kernel_does_not_model_keep_the_replay():
    assert use_cudnn_kernels(meta_copy(nn.GRU(4, 8, num_layers=2, dropout=0.5))) == []
    assert use_cudnn_kernels(meta_copy(nn.LSTM(4, 8, proj_size=4))) == []


def test_a_cuda_rnn_estimate_runs_the_kernel_and_says_so():
    model = Tagger(nn.LSTM)
    report = batchlab.estimate_memory(model, token_batch(device="meta"), loss_fn=per_token_loss, device="cuda")
    assert (
        "rnn is modelled as one cuDNN call whose reserve space and workspace sizes are batchlab's model "
        "(batchlab.rnn_kernels), not numbers measured from cuDNN" in report.warnings
    )
    assert not any("custom autograd function" in w for w in report.warnings)
    longer = batchlab.estimate_memory(model, token_batch(steps=24, device="meta"), loss_fn=per_token_loss)
    assert longer.peak_bytes > report.peak_bytes


@pytest.mark.parametrize("cell", [nn.GRU, nn.RNN])
def test_the_cpu_layer_loop_computes_what_the_module_computes(cell):
    torch.manual_seed(0)
    real = cell(6, 5, num_layers=2, bidirectional=True, batch_first=True)
    loop = copy.deepcopy(real)
    use_cpu_layers(loop)
    x, h = torch.randn(3, 7, 6), torch.randn(4, 3, 5)
    for args in ((x,), (x, h)):
        (out, last), (want_out, want_last) = loop(*args), real(*args)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(last, want_last)
