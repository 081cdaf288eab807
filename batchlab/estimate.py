"""How much memory would a training step need on a GPU? Estimated without a GPU (chapter 4).

:func:`estimate_memory` runs one training step of a *copy* of the model on PyTorch's ``meta``
device, where tensors have shapes but no data, so nothing of the model's or the batch's size is
allocated. :func:`batchlab.track_memory` watches the step as it would on a real device, and for
``device="cuda"`` every allocation and free is replayed through a model of CUDA's caching allocator
(:mod:`batchlab.allocator`), with what the GPU libraries add (:data:`CUDA_CONSTANTS`):

* the caching allocator rounds every tensor up to 512 bytes, and gives a tensor a whole cached
  block when splitting it is not worth it;
* cuBLAS keeps a workspace per thread that runs matrix products (forward and backward);
* cuDNN needs scratch memory for some convolution algorithms;
* attention runs through fused kernels on CUDA that never store the attention matrix;
* optimizers use their multi-tensor ("foreach") implementation on CUDA, whose temporaries span
  all parameters at once.

With ``precision="bf16"`` / ``"fp16"`` (chapter 8) the forward pass and the loss follow the cast
policy of ``torch.autocast`` on the estimated device, simulated for meta tensors (which autocast does
not serve) by :class:`batchlab.precision.SimulatedAutocast`: products and convolutions get low-precision
inputs and one cached low-precision copy of each weight (counted where backward saves it, in
``activations``), softmax, losses and norms run in float32, and everything else runs in the dtype of
its inputs. With ``checkpointing`` the model runs through :func:`batchlab.checkpointed`; what its
recomputation makes during backward counts as activations.

:func:`batchlab.max_batch_size` (:mod:`batchlab.max_batch`) uses it to find the largest batch that fits a memory budget.
"""

from __future__ import annotations

import copy
import math
import traceback
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from .allocator import CachingAllocator, block_size, segment_size
from .checkpointing import apply_checkpointing, check_checkpointing, tuning_label
from .memory import CATEGORIES, MemoryReport, profile_step
from .precision import (
    autocast_depth,
    check_precision,
    enclosing_autocast,
    make_scaler,
    simulate_autocast_for,
)
from .rnn_kernels import use_cpu_layers, use_cudnn_kernels
from .steps import check_accumulation, check_optimizer, make_optimizer, train_step
from .torch_internals import attention_kernels
from .tracker import track_storages
from .validation import (
    MiB,
    batch_length,
    check_batch,
    check_bool,
    check_choice,
    check_loss_fn,
    check_trainable,
    inputs_to,
    parse_bytes,
)

# Every constant of the CUDA model, with where it comes from. Measured values come from
# batchlab/data/gpu_memory_h100.json (NVIDIA H100 80GB, PyTorch 2.11, CUDA 13).
CUDA_CONSTANTS = {
    "cublas_workspace": (
        32 * MiB,
        "cuBLAS workspace per handle: NVIDIA's recommended size for Hopper GPUs "
        "(cuBLAS documentation, cublasSetWorkspace), allocated by PyTorch through its "
        "caching allocator the first time a handle multiplies matrices",
    ),
    "cublas_handles": (
        2,
        "forward runs on the Python thread, backward on autograd's device thread, each with "
        "its own cuBLAS handle and so its own workspace",
    ),
    "other_workspace": (
        1 * MiB,
        "the rest of the 65 MiB that stays allocated after all models are deleted "
        "(reference: context.allocated = 68,157,440 bytes = 2 x 32 MiB + 1 MiB)",
    ),
    "cudnn_gemm_workspace_limit": (
        64 * MiB,
        "cuDNN convolutions: we assume cuDNN's heuristics pick a GEMM-based "
        "algorithm whose workspace is the lowered (im2col) matrix while that "
        "matrix is at most this size, and a workspace-free implicit GEMM "
        "above it. Calibrated on the reference rows (cnn_28 batch 64 and "
        "resnet18_32 batch 32 match with it; cnn_28 batch 512 shows no "
        "large workspace)",
    ),
    "cuda_context": (
        808_255_488,
        "memory a CUDA process holds outside PyTorch's allocator (CUDA context, "
        "kernels): reference context.mem_get_info_used - context.reserved",
    ),
}
GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "_addmm_activation")

# Operations that take scratch memory on CUDA from a library this model does not simulate (the tensors
# they return are counted; their temporary buffers are not). An estimate that meets one says so in
# MemoryReport.warnings. Operator names as the dispatcher sees them (aten.<name>).
UNMODELLED_CUDA_OPS = {
    **dict.fromkeys(("_fft_r2c", "_fft_c2r", "_fft_c2c"), "cuFFT (plan workspace)"),
    **dict.fromkeys(
        (
            "_linalg_svd",
            "_linalg_eigh",
            "linalg_eig",
            "linalg_qr",
            "_linalg_solve_ex",
            "linalg_lu_factor_ex",
            "linalg_cholesky_ex",
            "_linalg_det",
            "_linalg_slogdet",
            "linalg_inv_ex",
            "linalg_solve_triangular",
            "triangular_solve",
        ),
        "cuSOLVER / MAGMA",
    ),
    **dict.fromkeys(
        (
            "sort",
            "topk",
            "kthvalue",
            "median",
            "cumsum",
            "cumprod",
            "_unique2",
            "unique_dim",
            "unique_consecutive",
            "nonzero",
            "embedding_dense_backward",
            "_embedding_bag",
            "_embedding_bag_backward",
            "bincount",
            "histc",
            "randperm",
        ),
        "CUB (sort / scan temporaries)",
    ),
    **dict.fromkeys(("_cudnn_rnn", "_cudnn_rnn_backward", "_ctc_loss", "grid_sampler_2d"), "cuDNN"),
}
# torch's own autograd functions, whose memory the estimate sees like any other operation's.
KNOWN_AUTOGRAD_FUNCTIONS = ("CheckpointFunctionBackward", "CudnnRNNBackward")


def _constant(name: str) -> int:
    return CUDA_CONSTANTS[name][0]


def cudnn_workspace(func, args) -> int:
    """Bytes of cuDNN scratch memory our model assumes for one convolution call (0 for other ops).

    Forward and weight-gradient lower the input to a (kernel area x input channels) by (output
    positions) matrix; the input-gradient lowers the output gradient the same way, with output channels
    and input positions. See ``CUDA_CONSTANTS["cudnn_gemm_workspace_limit"]`` for when it applies.
    """
    name = func.overloadpacket.__name__
    if name == "convolution":
        inputs, weight = args[0], args[1]
        lowered = weight.shape[1] * math.prod(weight.shape[2:]) * _conv_out_positions(inputs, weight, args)
    elif name == "convolution_backward":
        grad_out, inputs, weight, wanted = args[0], args[1], args[2], args[-1]
        lowered = weight.shape[1] * math.prod(weight.shape[2:]) * grad_out.shape[0] * math.prod(grad_out.shape[2:])
        if wanted[0]:  # the input gradient is computed too
            lowered = max(
                lowered, weight.shape[0] * math.prod(weight.shape[2:]) * inputs.shape[0] * math.prod(inputs.shape[2:])
            )
    else:
        return 0
    nbytes = lowered * weight.element_size()
    return nbytes if nbytes <= _constant("cudnn_gemm_workspace_limit") else 0


def _conv_out_positions(inputs, weight, args) -> int:
    stride, padding, dilation = args[3], args[4], args[5]
    positions = inputs.shape[0]
    for i, size in enumerate(inputs.shape[2:]):
        kernel = dilation[i] * (weight.shape[2 + i] - 1) + 1
        positions *= (size + 2 * padding[i] - kernel) // stride[i] + 1
    return positions


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (no memory is used).

    ``deepcopy`` is told, through its memo, to use a meta twin wherever it meets a parameter or
    buffer, so the copy never holds real data and the caller's model is not touched.
    """
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


class _AllocatorReplay:
    """Replays what a :class:`~batchlab.tracker.MemoryTracker` sees through a CUDA caching allocator model.

    The tracker calls :meth:`allocated`, :meth:`freed` and :meth:`after_op`; the replay adds the
    library workspaces, remembers which tensors were alive at the highest allocated moment, and keeps the
    largest allocation the two steps make (``largest``, bytes: the unit of :func:`margin_bytes`).
    """

    def __init__(self, budget: int | None = None):
        self.allocator = CachingAllocator(budget)
        self.measuring = False
        self.largest = 0
        self.blocks: dict = {}  # tracker serial -> allocator block
        self.sizes: dict = {}  # tracker serial -> bytes the tensor asked for
        self.library_blocks: list = []  # cuBLAS workspaces, allocated at the first matrix product
        self.peak = -1
        self.at_peak: tuple = ({}, 0, "")  # (serial -> block size, workspace bytes, phase)
        self.tracker = None
        self.unmodelled: dict = {}  # operator name -> the library whose scratch memory is not modelled

    def allocated(self, serial: int, nbytes: int) -> None:
        self._note_request(nbytes)
        self.blocks[serial], self.sizes[serial] = self.allocator.malloc(nbytes), nbytes
        self._note_peak()

    def freed(self, serial: int) -> None:
        block = self.blocks.pop(serial, None)
        if block is not None:
            self.allocator.free(block)

    def after_op(self, func, args, out) -> None:
        name = func.overloadpacket.__name__
        if name in UNMODELLED_CUDA_OPS:
            self.unmodelled[name] = UNMODELLED_CUDA_OPS[name]
        if name in GEMM_OPS and not self.library_blocks:
            sizes = [_constant("cublas_workspace")] * _constant("cublas_handles") + [_constant("other_workspace")]
            self.library_blocks = [self.allocator.malloc(size) for size in sizes]
            self._note_peak()
        workspace = cudnn_workspace(func, args)
        if workspace:  # cuDNN's scratch memory lives only while the convolution runs
            self._note_request(workspace)
            try:
                block = self.allocator.malloc(workspace)
            except torch.OutOfMemoryError:
                return  # PyTorch then tries cuDNN's next engine: we assume one that needs no workspace
            self._note_peak(block.size)
            self.allocator.free(block)

    def _note_request(self, nbytes: int) -> None:
        self.largest = max(self.largest, nbytes)

    def _note_peak(self, scratch: int = 0) -> None:
        if self.measuring and self.allocator.allocated > self.peak:
            self.peak = self.allocator.allocated
            workspace = sum(b.size for b in self.library_blocks) + scratch
            live = {serial: block.size for serial, block in self.blocks.items()}
            self.at_peak = (live, workspace, self.tracker.phase if self.tracker else "")

    def breakdown(self, category_of) -> dict:
        """Bytes by category at the peak: tensors, library workspaces, and the allocator's rounding."""
        live, workspace, _phase = self.at_peak
        totals = dict.fromkeys(CATEGORIES, 0)
        for serial in live:
            totals[category_of(serial)] += self.sizes[serial]
        totals["workspaces"] = workspace
        totals["allocator rounding"] = sum(live.values()) - sum(self.sizes[s] for s in live)
        return totals


def _check_estimate_args(model, batch, optimizer, loss_fn, device, precision, checkpointing):
    check_trainable(model)
    inputs, targets = check_batch(batch, keyword_inputs=True)
    check_optimizer(optimizer)
    check_loss_fn(loss_fn)
    check_choice("device", device, ("cuda", "cpu"))
    check_precision(precision)
    check_checkpointing(model, checkpointing)  # a model without blocks is refused before anything runs
    integers = isinstance(inputs, torch.Tensor) and not (inputs.is_floating_point() or inputs.is_complex())
    if integers and not any(isinstance(m, nn.Embedding) for m in model.modules()):
        # The meta device does not check dtypes: without this, a step that cannot run gets an estimate.
        raise TypeError(
            f"batch inputs have dtype {inputs.dtype}, but {type(model).__name__} has no nn.Embedding "
            f"to take integers: give float inputs (e.g. inputs.float()), as the real step needs"
        )
    return inputs, targets


def honour_autocast(precision: str) -> str:
    """The precision an estimate made inside a ``torch.autocast`` region runs in: the region's.

    The estimator's step runs on the meta device, which autocast does not serve, so a region around
    the call would otherwise change nothing. ``precision="fp32"`` (the default) takes the region's
    dtype; a different low precision than the region's is refused, and so is a region that is switched
    off (``torch.autocast("cuda")`` on a machine without CUDA), whose precision cannot be known.
    """
    enclosing = enclosing_autocast()
    if enclosing is None and precision == "fp32" and autocast_depth() > 0:
        raise ValueError(
            "estimate_memory was called inside a torch.autocast block that is switched off (PyTorch "
            "turns torch.autocast('cuda') off, with a warning, where there is no CUDA GPU), so it "
            "cannot tell which precision you mean: pass precision='bf16' or 'fp16' instead of the block "
            "(the estimate simulates CUDA's autocast on any machine)"
        )
    if enclosing is None or enclosing == precision:
        return precision
    if precision != "fp32" or enclosing not in ("bf16", "fp16"):
        raise ValueError(
            f"estimate_memory was called inside torch.autocast(dtype={enclosing}) with "
            f"precision={precision!r}: say one precision, either by leaving the autocast block or "
            f"by passing precision={enclosing!r} (an estimate runs its own autocast)"
        )
    return enclosing


@contextmanager
def _outside_autocast():
    """Leave any enclosing autocast region for the estimate's own step (a CPU fallback runs real tensors)."""
    regions = [torch.autocast(d, enabled=False) for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)]
    for region in regions:
        region.__enter__()
    try:
        yield
    finally:
        for region in reversed(regions):
            region.__exit__(None, None, None)


@contextmanager
def _explain_meta_failures():
    """Turn an operation that the meta device cannot run into an error that says where it is."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as error:
        if "meta" not in str(error).lower():
            raise
        frames = [
            f
            for f in traceback.extract_tb(error.__traceback__)
            if "/torch/" not in f.filename and "/batchlab/" not in f.filename
        ]
        last = frames[-1] if frames else None
        where = f" (in {last.name}, {last.filename}:{last.lineno}: {last.line})" if last else ""
        raise NotImplementedError(
            f"estimate_memory runs the step on PyTorch's meta device, where tensors have no values, and this "
            f"model needs one{where}: {str(error).splitlines()[0]}. Measure the step instead with "
            f"batchlab.profile_step(model, batch) on a real device."
        ) from error


def estimate_memory(
    model: nn.Module,
    batch,
    *,
    optimizer="sgd",
    loss_fn=None,
    device: str = "cuda",
    budget=None,
    accumulation_steps: int = 1,
    precision: str = "fp32",
    checkpointing=None,
    keep_margin: bool = False,
) -> MemoryReport:
    """The peak memory of one training step of ``model`` on ``batch`` = (inputs, targets) on ``device``.

    The step is forward, loss (default cross-entropy), backward, ``optimizer.step()`` and
    ``zero_grad(set_to_none=True)``, after a first step that creates the optimizer state, as in
    :func:`batchlab.profile_step`. Nothing of the model's or batch's size is allocated: a copy of the
    model runs on the meta device (``model`` and ``batch`` are only read).

    ``device="cuda"`` predicts ``torch.cuda.max_memory_allocated`` (``peak_bytes``) and
    ``max_memory_reserved`` (``reserved_bytes``) of a CUDA GPU, with the allocator and library effects
    of :data:`CUDA_CONSTANTS`; ``breakdown`` adds ``workspaces`` and ``allocator rounding`` to the
    tensor categories. ``device="cpu"`` predicts the tensor bytes a CPU step holds at its peak.
    ``budget`` (bytes or a string like ``"4GiB"``) makes the simulated GPU that small: a step that
    does not fit raises ``torch.OutOfMemoryError``, as on a real GPU; with ``keep_margin=True`` the measured
    step must also leave ``margin_bytes`` of the budget unused (:func:`margin_bytes`, max_batch_size's rule;
    no effect on the CPU). ``accumulation_steps`` splits the
    batch into that many micro-batches (or micro-batches of the sizes listed) whose gradients are
    accumulated, as ``batchlab.train`` does.

    ``precision`` (chapter 8): ``"bf16"`` / ``"fp16"`` run forward and loss under the cast policy of
    ``torch.autocast`` on ``device`` (:data:`batchlab.precision.AUTOCAST_POLICIES`): products and
    convolutions in low precision, with one low-precision copy of each weight kept while the graph
    needs it; softmax, losses and norms in float32; weights, gradients and optimizer state float32;
    fp16 adds GradScaler's tensors. A call inside a ``torch.autocast`` block takes its precision (see
    :func:`honour_autocast`). ``checkpointing`` (None, ``"blocks"`` or a number of segments) runs the
    model through :func:`batchlab.checkpointed`: the recomputation in backward counts as activations.
    """
    inputs, targets = _check_estimate_args(model, batch, optimizer, loss_fn, device, precision, checkpointing)
    budget = parse_bytes("budget", budget) if budget is not None else None
    check_bool("keep_margin", keep_margin)
    check_accumulation(accumulation_steps, batch_length(inputs))
    precision = honour_autocast(precision)
    levers = dict(precision=precision, checkpointing=checkpointing)
    try:
        with _outside_autocast():
            return _estimate(
                model, inputs, targets, optimizer, loss_fn, device, budget, accumulation_steps, keep_margin, **levers
            )
    except NotImplementedError as error:
        if device != "cpu" or accumulation_steps != 1 or targets.device.type == "meta":
            raise
        # A CPU estimate can fall back on measuring: the batch is real, so run the real step.
        warnings.warn(f"{error} Measuring the step on the CPU instead.", stacklevel=2)
        with _outside_autocast():
            report = profile_step(
                model, (inputs, targets), optimizer=optimizer, loss_fn=loss_fn, device="cpu", **levers
            )
        report.warnings.append(
            f"not an estimate: the meta device could not run this model, so the step was "
            f"measured on the CPU with the real batch ({str(error).splitlines()[0][:200]})"
        )
        return report


def custom_functions(loss: torch.Tensor) -> set:
    """The names of the custom ``torch.autograd.Function`` nodes in the graph that produced ``loss``.

    Their forward runs on the meta device like any code, but a custom backward (or a forward that calls
    a compiled kernel) may keep or make memory the estimate cannot see, so a report lists them.
    """
    found, seen = set(), set()
    todo = [loss.grad_fn] if loss.grad_fn is not None else []
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        name = type(node).__name__
        if isinstance(node, torch.autograd.function.BackwardCFunction) and name not in KNOWN_AUTOGRAD_FUNCTIONS:
            found.add(name.removesuffix("Backward"))
        todo.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return found


def _watching_custom_functions(loss_fn, found: set):
    """``loss_fn``, noting the custom autograd functions behind each loss it returns in ``found``."""

    def watched(outputs, targets):
        loss = loss_fn(outputs, targets)
        if isinstance(loss, torch.Tensor):
            found.update(custom_functions(loss))
        return loss

    return watched


def _warnings(functions: set, replay) -> list:
    """What this estimate did not model, in words a learner can act on (MemoryReport.warnings)."""
    notes = [
        f"custom autograd function {name}: its forward is counted as it ran on the meta device, but memory "
        f"its backward or a compiled kernel keeps outside PyTorch's operators is not"
        for name in sorted(functions)
    ]
    if replay is not None:
        notes += [
            f"aten.{op} uses scratch memory from {library} on CUDA, which this estimate does not model: the "
            f"real peak may be higher"
            for op, library in sorted(replay.unmodelled.items())
        ]
    return notes


def _estimate(
    model,
    inputs,
    targets,
    optimizer,
    loss_fn,
    device,
    budget,
    accumulation_steps,
    keep_margin,
    *,
    precision,
    checkpointing,
) -> MemoryReport:
    loss_fn = check_loss_fn(loss_fn)
    work = _meta_copy(model).train()
    # A recurrent layer runs as it would on the device (batchlab.rnn_kernels): one cuDNN call on CUDA (low
    # precision keeps the replay), the CPU's own layer loop on the CPU.
    kernels = use_cudnn_kernels(work) if device == "cuda" and precision == "fp32" else []
    cpu_lstms = use_cpu_layers(work) if device == "cpu" else []
    inputs, targets = inputs_to(inputs, "meta"), targets.to("meta")
    # The optimizer a real run would build: on CUDA PyTorch picks the multi-tensor (foreach) code.
    opt = make_optimizer(optimizer, list(work.parameters()), foreach=device == "cuda")
    replay = _AllocatorReplay(budget) if device == "cuda" else None
    work = apply_checkpointing(work, checkpointing)
    tracking = track_storages(work, opt, record=True, observer=replay)
    functions = set()
    step = dict(
        loss_fn=loss_fn,
        accumulation_steps=accumulation_steps,
        precision=precision,
        scaler=make_scaler("meta", precision),
    )
    with _explain_meta_failures(), attention_kernels(device), simulate_autocast_for(device), tracking as tracker:
        tracker.adopt([inputs, targets], "inputs")
        if replay is not None:
            replay.largest = 0  # the margin is about what the steps allocate, not the batch made before them
        # warm-up: optimizer state, cached blocks; its graph is searched for custom autograd functions
        train_step(work, opt, inputs, targets, **{**step, "loss_fn": _watching_custom_functions(loss_fn, functions)})
        tracker.begin_measurement()
        if replay is not None:
            replay.tracker, replay.measuring = tracker, True
            replay.allocator.reset_peaks()
            if keep_margin and budget is not None:  # the warm-up made the same requests as the measured step
                replay.allocator.limit(budget - margin_bytes(replay.largest))
        train_step(work, opt, inputs, targets, **step)
    report = tracker.report(
        label=f"{type(model).__name__}, batch {batch_length(inputs)}, "
        f"{optimizer if isinstance(optimizer, str) else 'custom optimizer'}"
        f"{tuning_label(precision, checkpointing)}, estimated for {device}"
    )
    report.device = device
    report.warnings = (
        _warnings(functions, replay)
        + [
            f"{name} is modelled as one cuDNN call whose reserve space and workspace sizes are batchlab's model "
            f"(batchlab.rnn_kernels), not numbers measured from cuDNN"
            for name in kernels
        ]
        + [
            f"{name} (nn.LSTM) runs on the CPU through oneDNN (mkldnn_rnn_layer), whose workspace this estimate does "
            f"not model: measure it with batchlab.profile_step"
            for name in cpu_lstms
        ]
    )
    if replay is None and budget is not None and report.peak_bytes > budget:
        # CUDA's opening words, so that tools that match CUDA's text (Accelerate, Lightning) recognise it.
        raise torch.OutOfMemoryError(
            f"CUDA out of memory. (Simulated by batchlab.estimate_memory for device "
            f"{device!r}: the step needs {report.peak_bytes / MiB:.2f} MiB of tensors at "
            f"its peak, more than the {budget / MiB:.2f} MiB budget; no GPU ran out of "
            f"memory.)"
        )
    if replay is not None:
        report.peak_bytes = replay.allocator.peak_allocated
        report.reserved_bytes = replay.allocator.peak_reserved
        report.breakdown = replay.breakdown(tracker.category_of)
        report.peak_phase = replay.at_peak[2] or report.peak_phase
        report.margin_bytes = margin_bytes(replay.largest)
    return report


def margin_bytes(largest: int) -> int:
    """The room a step must leave free at its worst moment to count as fitting (:func:`batchlab.max_batch_size`).

    On CUDA it is one more block for the step's ``largest`` allocation, as big as the segment the caching
    allocator would ask the driver for (:func:`batchlab.allocator.segment_size`); on the CPU it is 0, as
    there is no caching allocator to model and the CPU estimate is exact for the tensors (chapter 4).

    Why this much: the replay places every block where PyTorch's allocator rules put it, for the order in
    which this estimate allocates; a real run allocates a little differently (the kernels' own temporaries,
    where library workspaces land), and where the replay reused a cached block that is not free in the real
    run, the real allocator needs a new segment. One such miss costs at most one segment of the largest
    request, so the margin grows with the batch. What it does not cover: cuDNN's convolution workspaces on a
    large GPU, which the replay does not know (on the H100 reference they leave the real reserved memory up
    to 240 MiB above the replay's); they shrink when memory is short, as PyTorch then tries cuDNN's next
    engine, so they weigh on a large card's reserved memory more than on the largest batch of a small one
    (benchmarks/estimate_vs_gpu.py).
    """
    return segment_size(block_size(largest)) if largest else 0
