"""How close is the GPU memory estimate to a real GPU? And how fast is max_batch_size?

    python benchmarks/estimate_vs_gpu.py

1. For every row of batchlab/data/gpu_memory_h100.json (real H100 measurements, PyTorch 2.11), the
   estimated peak allocated and peak reserved memory next to the measured ones. Bars from issue 4:
   within +-10% of peak_allocated for rows whose real peak is >= 256 MiB, +-25% for every row.
2. max_batch_size for each reference model with the budget set to what the real GPU reserved at the
   largest measured batch: the real run shows that batch fits, so the answer should not be far below.
   Then the reserved bar of issue 15: within +-10% of max_memory_reserved for rows of 256 MiB or more,
   never more than 10% below it.
3. max_batch_size for torchvision's resnet18 at 3x224x224 on a 4 GiB GPU: answer, estimates, seconds
   (goal of issue 15: <= 5 s on this machine, quiet). Two sizes are named apart, as in chapter 4: the GPU's memory
   (4 GiB) and the budget for PyTorch (the ``budget=`` of max_batch_size: the GPU's memory minus the
   CUDA context of batchlab.CUDA_CONSTANTS). The timed search uses the budget for PyTorch, so its
   answer is chapter 4's; a last line gives the answer with the whole 4 GiB as the budget, for comparison.
4. max_batch_size for recurrent language models (nn.GRU, nn.LSTM; on CUDA each is one modelled cuDNN
   call, batchlab.rnn_kernels): answer, estimates, seconds (goal <= 5 s).
"""

import os
import platform
import statistics
import time

import psutil
import torch

import batchlab
import batchlab.estimate as estimate
import batchlab.max_batch as max_batch
from batchlab.reference import gpu_reference

MiB = 2**20
MODELS = {"mlp_28": ("mlp", (1, 28, 28)), "cnn_28": ("cnn_bn", (1, 28, 28)), "resnet18_32": ("resnet18", (3, 32, 32))}


def meta_batch(in_shape):
    return lambda n: (torch.empty(n, *in_shape, device="meta"), torch.zeros(n, dtype=torch.long, device="meta"))


def accuracy_table(reference) -> bool:
    print(
        f"{'model':12} {'opt':4} {'batch':>5} | {'peak MiB':>8} {'estimate':>8} {'error':>7} {'bar':>4} ok "
        f"| {'reserved':>8} {'estimate':>8} {'error':>7} | {'margin':>6} {'real-est':>8} {'in margin':>9}"
    )
    all_ok, reserved_errors, covered = True, [], []
    for row in reference["rows"]:
        name, in_shape = MODELS[row["model"]]
        report = batchlab.estimate_memory(
            batchlab.build_model(name, in_shape=in_shape), meta_batch(in_shape)(row["batch"]), optimizer=row["opt"]
        )
        error = report.peak_bytes / row["peak_allocated"] - 1
        bar = 0.10 if row["peak_allocated"] >= 256 * MiB else 0.25
        ok = abs(error) <= bar
        all_ok &= ok
        reserved_error = report.reserved_bytes / row["peak_reserved"] - 1
        missed = row["peak_reserved"] - report.reserved_bytes  # what the real allocator reserved beyond the replay
        inside = missed <= report.margin_bytes
        if row["peak_reserved"] >= 256 * MiB:
            reserved_errors.append(reserved_error)
            covered.append(inside)
        print(
            f"{row['model']:12} {row['opt']:4} {row['batch']:>5} | {row['peak_allocated'] / MiB:8.1f} "
            f"{report.peak_bytes / MiB:8.1f} {error:+7.1%} {bar:4.0%} {'yes' if ok else 'NO '}"
            f"| {row['peak_reserved'] / MiB:8.1f} {report.reserved_bytes / MiB:8.1f} {reserved_error:+7.1%} "
            f"| {report.margin_bytes / MiB:6.1f} {missed / MiB:+8.1f} {'yes' if inside else 'NO':>9}"
        )
    print(f"every row within its bar: {'yes' if all_ok else 'NO'}")
    inside = sum(abs(e) <= 0.10 for e in reserved_errors)
    print(
        f"reserved, rows of 256 MiB or more: {inside} of {len(reserved_errors)} within +-10%; median "
        f"{statistics.median(reserved_errors):+.1%}, lowest {min(reserved_errors):+.1%} (bar: >= -10%): "
        f"{'met' if inside == len(reserved_errors) else 'NOT met'}"
    )
    print(
        f"max_batch_size's margin (one more segment of the step's largest allocation) covers what the real GPU "
        f"reserved beyond the replay in {sum(covered)} of {len(covered)} of those rows\n"
    )
    return all_ok


def budget_table(reference) -> None:
    print("max_batch_size with the budget the real GPU reserved at the largest measured batch:")
    largest = {}
    for row in reference["rows"]:
        key = (row["model"], row["opt"])
        if row["batch"] > largest.get(key, {"batch": 0})["batch"]:
            largest[key] = row
    for (model, opt), row in largest.items():
        name, in_shape = MODELS[model]
        n = batchlab.max_batch_size(
            batchlab.build_model(name, in_shape=in_shape),
            meta_batch(in_shape),
            budget=row["peak_reserved"],
            optimizer=opt,
            progress=False,
        )
        print(
            f"  {model:12} {opt:4} budget {row['peak_reserved'] / MiB:7.1f} MiB: measured batch {row['batch']:>5} "
            f"fits; max_batch_size says {n:>6} ({n / row['batch']:.2f}x)"
        )
    print()


def timed_search(model, make_batch, repeats: int = 3, **kwargs):
    """max_batch_size(model, make_batch, **kwargs): (answer, estimates it made, median seconds)."""
    calls = []
    original = max_batch.estimate_memory

    def counted(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    max_batch.estimate_memory = counted
    try:
        times, answer = [], None
        for _ in range(repeats):
            calls.clear()
            start = time.perf_counter()
            answer = batchlab.max_batch_size(model, make_batch, progress=False, **kwargs)
            times.append(time.perf_counter() - start)
    finally:
        max_batch.estimate_memory = original
    return answer, len(calls), statistics.median(times)


def resnet18_224_timing(repeats: int = 3) -> None:
    model = batchlab.build_model("resnet18", in_shape=(3, 224, 224))
    gpu_memory = 4 * 2**30  # bytes on the card
    budget = gpu_memory - batchlab.CUDA_CONSTANTS["cuda_context"][0]  # bytes PyTorch may use of it
    answer, calls, median = timed_search(model, meta_batch((3, 224, 224)), repeats, budget=budget)
    print(
        f"resnet18, 3x224x224, SGD, GPU memory {gpu_memory / 2**30:.2f} GiB = budget for PyTorch "
        f"{budget / 2**30:.2f} GiB (CUDA context taken off, as in chapter 4): max_batch_size = {answer} "
        f"after {calls} estimates; median {median:.2f} s of {repeats} runs (goal <= 5 s): "
        f"{'met' if median <= 5 else 'NOT met'}"
    )
    whole = batchlab.max_batch_size(model, meta_batch((3, 224, 224)), budget=gpu_memory, progress=False)
    print(
        f"resnet18, 3x224x224, SGD, budget for PyTorch {gpu_memory / 2**30:.2f} GiB (the whole card, no context "
        f"taken off; a GPU of {(gpu_memory + gpu_memory - budget) / 2**30:.2f} GiB): max_batch_size = {whole}"
    )


class LanguageModel(torch.nn.Module):
    """Embedding 5000 x 256, a 2-layer recurrent layer of 512 units, a linear head: next-token logits."""

    def __init__(self, cell):
        super().__init__()
        self.embed = torch.nn.Embedding(5000, 256)
        self.rnn = cell(256, 512, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(512, 5000)

    def forward(self, tokens):
        out, _state = self.rnn(self.embed(tokens))
        return self.head(out).flatten(0, 1)


def token_loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits, targets.flatten())


def recurrent_timing(repeats: int = 3, steps: int = 128) -> None:
    tokens = lambda n: (
        torch.zeros(n, steps, dtype=torch.long, device="meta"),  # noqa: E731
        torch.zeros(n, steps, dtype=torch.long, device="meta"),
    )
    for cell in (torch.nn.GRU, torch.nn.LSTM):
        answer, calls, median = timed_search(LanguageModel(cell), tokens, repeats, budget="4GiB", loss_fn=token_loss)
        print(
            f"{cell.__name__} language model (2 x 512, {steps} tokens), SGD, budget 4 GiB: max_batch_size = "
            f"{answer} after {calls} estimates; median {median:.2f} s of {repeats} runs (goal <= 5 s): "
            f"{'met' if median <= 5 else 'NOT met'}"
        )


def convolution_slack(name, in_shape, row):
    """(the estimate of ``row``, the most cuDNN workspace in MiB any one convolution of its measured step could
    have taken without raising the real peak: the real peak minus what the replay holds when that convolution
    runs, its output included)."""
    allocated = []
    original = estimate._AllocatorReplay.after_op  # the replay's per-operation hook: read the allocator at convolutions

    def watched(self, func, args, out):
        if self.measuring and func.overloadpacket.__name__ in ("convolution", "convolution_backward"):
            allocated.append(self.allocator.allocated)
        return original(self, func, args, out)

    estimate._AllocatorReplay.after_op = watched
    try:
        report = batchlab.estimate_memory(
            batchlab.build_model(name, in_shape=in_shape), meta_batch(in_shape)(row["batch"]), optimizer=row["opt"]
        )
    finally:
        estimate._AllocatorReplay.after_op = original
    return report, (row["peak_allocated"] - min(allocated)) / MiB if allocated else 0.0


def workspace_table(reference) -> None:
    print(
        "Where the missing reserved memory can come from: cuDNN picks its convolution engines on the GPU, and each\n"
        "takes a workspace for the call. The real peak bounds it: at the convolution where the replay holds least,\n"
        "a workspace up to 'room' MiB would not have raised the measured peak, yet needs a segment of its own if no\n"
        "cached block is that large. Rows of 256 MiB or more where the replay reserves less than the real GPU:"
    )
    for row in reference["rows"]:
        name, in_shape = MODELS[row["model"]]
        if row["peak_reserved"] < 256 * MiB:
            continue
        report, room = convolution_slack(name, in_shape, row)
        missed = (row["peak_reserved"] - report.reserved_bytes) / MiB
        if missed <= 0:
            continue
        print(
            f"  {row['model']:12} {row['opt']:4} {row['batch']:5}: real reserved {missed:+6.1f} MiB beyond the replay; "
            f"room for a cuDNN workspace {room:6.1f} MiB: {'could be one workspace' if missed <= room else 'more'}"
        )
    print()


def main():
    print(
        f"machine: {platform.machine()}, {psutil.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
        f"torch {torch.__version__}"
    )
    reference = gpu_reference()
    print(f"reference: {reference['env']['device']}, torch {reference['env']['torch']}\n")
    accuracy_table(reference)
    workspace_table(reference)
    budget_table(reference)
    resnet18_224_timing()
    recurrent_timing()


if __name__ == "__main__":
    main()
