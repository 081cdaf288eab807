"""How the estimator runs recurrent layers: as the one cuDNN call of a GPU, or as the CPU's layer loop (chapter 4).

On a GPU, ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` run the whole sequence, every layer and direction, in
one cuDNN kernel (``aten._cudnn_rnn``), and backward in two more (``_cudnn_rnn_backward``: data, then
weights). On the meta device the same module falls back to PyTorch's step-by-step decomposition: a
few dozen operations per time step, which is slow to replay and keeps different tensors than the
GPU does. :func:`use_cudnn_kernels` makes a meta copy's recurrent layers allocate what the cuDNN call
allocates on the GPU, through :class:`CudnnRNN`, an autograd function with no arithmetic:

* **weights**: ``module.cuda()`` flattens a recurrent layer's parameters into one buffer, so the call
  copies nothing; the weight gradient is one flat buffer of the same size, each parameter's
  ``.grad`` a view of it (what ``_cudnn_rnn_backward`` returns).
* **outputs**: the output sequence ``(T, N, D*H)`` (or batch-first) and the last hidden state
  ``(L*D, N, H)`` (and, for LSTM, the last cell state).
* **reserve space**: what backward needs that the outputs do not hold, kept from forward to backward
  (``cudnnGetRNNTempSpaceSizes`` in training mode; cuDNN does not publish the formula). Our model:
  for every layer, direction and time step, the gate values (``G`` values per hidden unit: LSTM 4, GRU 4
  = its 3 gates and the candidate's hidden part, plain RNN 1), the LSTM cell state, and the output of
  every layer but the last (the last layer's output is the returned sequence, saved as it is).
* **workspace**: scratch memory for one call, freed when the call returns. Our model: one layer's
  input projection for all time steps at once, ``T*N*D*gates*H``
  values (gates: LSTM 4, GRU 3, RNN 1), in forward, in backward-data and in backward-weights.

The two sizes are a model of the kernels' needs, not numbers measured from cuDNN:
``benchmarks/gpu_check.py`` compares them with a GPU where one is at hand. Layers cuDNN's path does not
take as modelled here (dropout between layers, ``proj_size``, packed or unbatched sequences) keep the
step-by-step replay.

The CPU has no such kernel: it loops over the steps. But on the meta device PyTorch's loop differs from
the CPU's: for a CPU tensor it computes every step's input projection at once, before the loop (the
``pre_compute_input`` branch of ``aten/src/ATen/native/RNN.cpp``), which keeps a different set of
tensors. :func:`use_cpu_layers` gives a meta copy's ``nn.GRU`` / ``nn.RNN`` layers the CPU's loop, op
for op, so a CPU estimate keeps what a CPU step keeps. ``nn.LSTM`` on a CPU runs through oneDNN
(``mkldnn_rnn_layer``), whose workspace is not modelled: its CPU estimate says so in its warnings.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}  # gate blocks of the input projection
SAVED_GATES = {"LSTM": 4, "GRU": 4, "RNN_TANH": 1, "RNN_RELU": 1}  # values per hidden unit kept for backward


@dataclass(frozen=True)
class RNNShape:
    """The geometry of one cuDNN RNN call: mode, layers L, directions D, hidden H, steps T, batch N."""

    mode: str
    layers: int
    directions: int
    hidden: int
    steps: int
    batch: int
    batch_first: bool

    def workspace_elements(self) -> int:
        """Values of scratch memory one call (forward, backward-data or backward-weights) takes."""
        return self.steps * self.batch * self.directions * GATES[self.mode] * self.hidden

    def reserve_elements(self) -> int:
        """Values kept from forward to backward besides the outputs (see the module docstring)."""
        per_step = self.batch * self.hidden * self.directions
        kept = SAVED_GATES[self.mode] + (1 if self.mode == "LSTM" else 0)
        return self.steps * per_step * (self.layers * kept + self.layers - 1)


def rnn_shape(module: nn.RNNBase, inputs: torch.Tensor) -> RNNShape:
    steps, batch = (inputs.shape[1], inputs.shape[0]) if module.batch_first else inputs.shape[:2]
    return RNNShape(
        module.mode,
        module.num_layers,
        2 if module.bidirectional else 1,
        module.hidden_size,
        steps,
        batch,
        module.batch_first,
    )


class CudnnRNN(torch.autograd.Function):
    """The memory of ``_cudnn_rnn`` and its backward, with empty tensors of the kernel's sizes (no values)."""

    @staticmethod
    def forward(ctx, shape: RNNShape, inputs, hx, cx, *weights):
        size = inputs.element_size()
        scratch = inputs.new_empty(shape.workspace_elements() * size, dtype=torch.uint8)
        reserve = inputs.new_empty(shape.reserve_elements() * size, dtype=torch.uint8)
        outer = (shape.batch, shape.steps) if shape.batch_first else (shape.steps, shape.batch)
        output = inputs.new_empty(*outer, shape.directions * shape.hidden)
        hy = torch.empty_like(hx)
        cy = torch.empty_like(cx) if cx is not None else None
        del scratch  # the workspace lives only while the kernel runs
        ctx.shape = shape
        ctx.save_for_backward(inputs, hx, cx, output, reserve, *weights)
        return (output, hy, cy) if cy is not None else (output, hy)

    @staticmethod
    def backward(ctx, grad_output, grad_hy, grad_cy=None):
        inputs, hx, cx, _output, _reserve, *weights = ctx.saved_tensors
        size = inputs.element_size()
        scratch = inputs.new_empty(ctx.shape.workspace_elements() * size, dtype=torch.uint8)  # backward data
        grad_inputs, grad_hx = torch.empty_like(inputs), torch.empty_like(hx)
        grad_cx = torch.empty_like(cx) if cx is not None else None
        del scratch
        scratch = inputs.new_empty(ctx.shape.workspace_elements() * size, dtype=torch.uint8)  # backward weights
        flat = inputs.new_empty(sum(w.numel() for w in weights))  # one buffer, as cuDNN's weight space
        grads, start = [], 0
        for w in weights:
            grads.append(flat[start : start + w.numel()].view_as(w))
            start += w.numel()
        del scratch
        return (None, grad_inputs, grad_hx, grad_cx, *grads)


def _kernel_forward(module: nn.RNNBase, step_by_step, inputs, hx=None):
    """``module.forward`` for a meta copy: one :class:`CudnnRNN` call where cuDNN would take the layer."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3:
        return step_by_step(inputs, hx)  # packed or unbatched sequences: the replay of the steps
    shape = rnn_shape(module, inputs)
    states = (shape.layers * shape.directions, shape.batch, module.hidden_size)
    if hx is None:
        zeros = inputs.new_zeros(states)
        hx = (zeros, inputs.new_zeros(states)) if module.mode == "LSTM" else zeros
    h, c = hx if module.mode == "LSTM" else (hx, None)
    weights = [w for layer in module.all_weights for w in layer]
    out = CudnnRNN.apply(shape, inputs, h, c, *weights)
    return (out[0], (out[1], out[2])) if module.mode == "LSTM" else (out[0], out[1])


def use_cudnn_kernels(model: nn.Module) -> list:
    """Make the recurrent layers of ``model`` (a meta copy) run as one cuDNN call each; their names.

    Only layers cuDNN's path takes as :class:`CudnnRNN` models it: no dropout between layers, no
    ``proj_size``. Other layers keep PyTorch's step-by-step replay.
    """
    names = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.RNNBase)
            and module.mode in GATES
            and module.proj_size == 0
            and (module.dropout == 0 or module.num_layers == 1)
        ):
            module.forward = functools.partial(_kernel_forward, module, module.forward)
            names.append(name or type(module).__name__)
    return names


def reserve_bytes(module: nn.RNNBase, inputs: torch.Tensor) -> int:
    """The reserve space our model gives ``module`` on ``inputs`` (bytes): for tests and chapter 4."""
    return rnn_shape(module, inputs).reserve_elements() * inputs.element_size()


def _cpu_cell(mode: str, step_input, hidden, w_hh, b_hh):
    """One step of the CPU's cell with its input projection already computed (RNN.cpp's op order)."""
    hgates = nn.functional.linear(hidden, w_hh, b_hh)
    if mode == "GRU":
        ig, hg = step_input.unsafe_chunk(3, 1), hgates.unsafe_chunk(3, 1)
        reset = hg[0].add_(ig[0]).sigmoid_()
        update = hg[1].add_(ig[1]).sigmoid_()
        new = ig[2].add(hg[2].mul_(reset)).tanh_()
        return (hidden - new).mul_(update).add_(new)
    total = hgates.add_(step_input)
    return torch.tanh(total) if mode == "RNN_TANH" else torch.relu(total)


def _cpu_direction(module, layer_input, hidden, layer: int, suffix: str, reverse: bool):
    """One direction of one layer: the input projection of all steps, then the loop; (outputs, last hidden)."""
    name = f"l{layer}{suffix}"
    w_ih, w_hh = getattr(module, f"weight_ih_{name}"), getattr(module, f"weight_hh_{name}")
    b_ih = getattr(module, f"bias_ih_{name}") if module.bias else None
    b_hh = getattr(module, f"bias_hh_{name}") if module.bias else None
    steps = nn.functional.linear(layer_input, w_ih, b_ih).unbind(0)
    outputs = []
    for step_input in reversed(steps) if reverse else steps:
        hidden = _cpu_cell(module.mode, step_input, hidden, w_hh, b_hh)
        outputs.append(hidden)
    if reverse:
        outputs.reverse()
    return torch.stack(outputs, 0), hidden


def _cpu_forward(module: nn.RNNBase, step_by_step, inputs, hx=None):
    """``module.forward`` for a meta copy estimated for the CPU: the CPU's layer loop (GRU and RNN)."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3:
        return step_by_step(inputs, hx)
    directions = 2 if module.bidirectional else 1
    x = inputs.transpose(0, 1) if module.batch_first else inputs  # time-major, as aten's loop
    if hx is None:
        hx = torch.zeros(module.num_layers * directions, x.shape[1], module.hidden_size, dtype=x.dtype, device=x.device)
    hiddens, finals = hx.unbind(0), []
    for layer in range(module.num_layers):
        outs = []
        for d, suffix in enumerate(("", "_reverse")[:directions]):
            out, last = _cpu_direction(module, x, hiddens[layer * directions + d], layer, suffix, reverse=d == 1)
            outs.append(out)
            finals.append(last)
        x = outs[0] if directions == 1 else torch.cat(outs, outs[0].dim() - 1)
        if module.dropout and module.training and layer < module.num_layers - 1:
            x = nn.functional.dropout(x, module.dropout, training=True)
    output = x.transpose(0, 1) if module.batch_first else x
    return output, torch.stack(finals, 0)


def use_cpu_layers(model: nn.Module) -> list:
    """Give the ``nn.GRU`` / ``nn.RNN`` layers of ``model`` (a meta copy) the CPU's layer loop; the names
    of the ``nn.LSTM`` layers, whose oneDNN path on the CPU is not modelled (they keep the replay)."""
    unmodelled = []
    for name, module in model.named_modules():
        if isinstance(module, nn.RNNBase) and module.mode in ("GRU", "RNN_TANH", "RNN_RELU"):
            module.forward = functools.partial(_cpu_forward, module, module.forward)
        elif isinstance(module, nn.RNNBase):
            unmodelled.append(name or type(module).__name__)
    return unmodelled
