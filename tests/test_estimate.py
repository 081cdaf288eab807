"""The GPU memory estimator, checked against real H100 measurements and against CPU measurements."""

import pytest
import torch
from torch import nn

import batchlab
from batchlab.estimate import CUDA_CONSTANTS, cudnn_workspace, estimate_memory
from batchlab.max_batch import max_batch_size
from batchlab.reference import gpu_reference

REFERENCE_MODELS = {
    "mlp_28": ("mlp", (1, 28, 28)),
    "cnn_28": ("cnn_bn", (1, 28, 28)),
    "resnet18_32": ("resnet18", (3, 32, 32)),
}
MiB = 2**20


def meta_batch(n, in_shape, dtype=torch.float32):
    inputs = torch.empty(n, *in_shape, device="meta", dtype=dtype)
    return inputs, torch.zeros(n, dtype=torch.long, device="meta")


@pytest.mark.parametrize("row", gpu_reference()["rows"], ids=lambda r: f"{r['model']}-{r['opt']}-{r['batch']}")
def test_estimate_matches_the_h100_reference(row):
    name, in_shape = REFERENCE_MODELS[row["model"]]
    report = estimate_memory(
        batchlab.build_model(name, in_shape=in_shape),
        meta_batch(row["batch"], in_shape),
        optimizer=row["opt"],
        device="cuda",
    )
    error = report.peak_bytes / row["peak_allocated"] - 1
    bar = 0.10 if row["peak_allocated"] >= 256 * MiB else 0.25
    assert abs(error) <= bar, (
        f"estimated {report.peak_bytes / MiB:.1f} MiB, measured "
        f"{row['peak_allocated'] / MiB:.1f} MiB ({error:+.1%}, bar ±{bar:.0%})"
    )
    assert report.reserved_bytes >= report.peak_bytes


def test_breakdown_adds_up_and_names_the_gpu_extras():
    model = batchlab.build_model("cnn_bn", in_shape=(1, 28, 28))
    report = estimate_memory(model, meta_batch(512, (1, 28, 28)))
    assert sum(report.breakdown.values()) == report.peak_bytes
    cublas = CUDA_CONSTANTS["cublas_workspace"][0] * CUDA_CONSTANTS["cublas_handles"][0]
    assert report.breakdown["workspaces"] >= cublas
    params = sum(p.numel() * 4 for p in model.parameters())
    assert params <= report.breakdown["parameters"] < params * 1.01
    assert report.breakdown["activations"] > report.breakdown["parameters"]


def test_cpu_estimate_agrees_with_a_cpu_measurement():
    model = batchlab.build_model("cnn_bn", in_shape=(3, 32, 32), num_classes=5)
    batch = (torch.randn(64, 3, 32, 32), torch.randint(0, 5, (64,)))
    measured = batchlab.profile_step(model, batch, optimizer="adam")
    estimated = estimate_memory(model, batch, optimizer="adam", device="cpu")
    assert abs(estimated.peak_bytes / measured.peak_bytes - 1) < 0.02
    assert estimated.breakdown["optimizer_state"] == measured.breakdown["optimizer_state"]


def test_the_callers_model_and_batch_are_untouched():
    model = batchlab.build_model("cnn_bn", in_shape=(1, 28, 28))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    estimate_memory(model, batch, optimizer="adam")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.device.type == "cpu" for p in model.parameters())
    assert batch[0].device.type == "cpu"


def test_cuda_attention_does_not_store_the_attention_matrix():
    # On CUDA attention runs in fused kernels: saved memory grows with the sequence, not its square.
    # On the CPU, with dropout, the math kernel keeps the (length x length) attention matrix.
    model = batchlab.build_model("transformer", in_shape=(1024,))

    def activations(length, device):
        tokens = torch.zeros(8, length, dtype=torch.long, device="meta")
        report = estimate_memory(model, (tokens, torch.zeros(8, dtype=torch.long, device="meta")), device=device)
        return report.breakdown["activations"]

    gpu_growth = activations(1024, "cuda") / activations(512, "cuda")
    cpu_growth = activations(1024, "cpu") / activations(512, "cpu")
    assert 1.9 < gpu_growth < 2.1, gpu_growth
    assert cpu_growth > 3, cpu_growth


def test_cudnn_workspace_model():
    conv = torch.ops.aten.convolution.default
    x, w = torch.empty(64, 32, 14, 14, device="meta"), torch.empty(64, 32, 3, 3, device="meta")
    args = (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    assert cudnn_workspace(conv, args) == 32 * 9 * 64 * 14 * 14 * 4  # the lowered input matrix
    big = (torch.empty(4096, 32, 14, 14, device="meta"), w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    assert cudnn_workspace(conv, big) == 0  # above the limit cuDNN picks a workspace-free kernel
    assert cudnn_workspace(torch.ops.aten.relu.default, (x,)) == 0


def test_a_cudnn_workspace_that_does_not_fit_falls_back_to_an_engine_without_one(monkeypatch):
    model = batchlab.build_model("cnn_bn", in_shape=(1, 28, 28))
    with_workspaces = estimate_memory(model, meta_batch(64, (1, 28, 28)))
    assert with_workspaces.breakdown["workspaces"] > 64 * MiB + 1 * MiB  # cuBLAS's 65 MiB and cuDNN's on top
    limit = CUDA_CONSTANTS["cudnn_gemm_workspace_limit"]
    monkeypatch.setitem(CUDA_CONSTANTS, "cudnn_gemm_workspace_limit", (0, limit[1]))
    without = estimate_memory(model, meta_batch(64, (1, 28, 28)))
    monkeypatch.setitem(CUDA_CONSTANTS, "cudnn_gemm_workspace_limit", limit)
    # Only the workspace-free step fits this budget; PyTorch then runs cuDNN's next engine, and so does the replay.
    budget = without.reserved_bytes
    assert with_workspaces.reserved_bytes > budget
    squeezed = estimate_memory(model, meta_batch(64, (1, 28, 28)), budget=budget)
    assert squeezed.reserved_bytes <= budget and squeezed.peak_bytes <= with_workspaces.peak_bytes


def test_simulated_capacity_raises_out_of_memory():
    model = batchlab.build_model("resnet18", in_shape=(3, 64, 64))
    estimate_memory(model, meta_batch(64, (3, 64, 64)), budget="1GiB")
    with pytest.raises(torch.OutOfMemoryError, match="Simulated CUDA out of memory"):
        estimate_memory(model, meta_batch(1024, (3, 64, 64)), budget="1GiB")


def test_max_batch_size_answers_the_largest_batch_that_leaves_room_for_its_margin():
    model = batchlab.build_model("cnn_bn", in_shape=(1, 28, 28))
    make = lambda n: meta_batch(n, (1, 28, 28))  # noqa: E731
    budget = 512 * MiB
    n = max_batch_size(model, make, budget=budget)
    # it runs with one more segment for its largest tensor kept free...
    report = estimate_memory(model, make(n), budget=budget, keep_margin=True)
    assert report.reserved_bytes + report.margin_bytes <= budget
    bigger = n + max(1, n // 100) + 1  # ...and a batch past the search's 1% does not
    with pytest.raises(torch.OutOfMemoryError):
        estimate_memory(model, make(bigger), budget=budget, keep_margin=True)


def test_the_margin_is_one_more_segment_of_the_steps_largest_allocation():
    from batchlab.allocator import block_size, segment_size

    model = batchlab.build_model("cnn_bn", in_shape=(1, 28, 28))
    for n in (512, 1024):  # conv1's output is the largest tensor; cuDNN's modelled workspaces are smaller here
        conv1_output = n * 32 * 28 * 28 * 4
        cuda = estimate_memory(model, meta_batch(n, (1, 28, 28)))
        assert cuda.margin_bytes == segment_size(block_size(conv1_output))
        assert estimate_memory(model, meta_batch(n, (1, 28, 28)), device="cpu").margin_bytes == 0  # exact there
    measured = batchlab.profile_step(model, (torch.randn(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)))
    assert measured.margin_bytes == 0  # a measurement has no margin
    # keep_margin: the measured step runs with its margin of the budget unused, releasing cached segments for it
    batch = meta_batch(1024, (1, 28, 28))
    for budget in (cuda.reserved_bytes + cuda.margin_bytes, cuda.reserved_bytes):
        kept = estimate_memory(model, batch, budget=budget, keep_margin=True)
        assert kept.reserved_bytes + kept.margin_bytes <= budget and kept.margin_bytes == cuda.margin_bytes
    with pytest.raises(torch.OutOfMemoryError):  # the tensors alone leave no room for it
        estimate_memory(model, batch, budget=cuda.peak_bytes + cuda.margin_bytes // 2, keep_margin=True)


def test_max_batch_size_handles_batchnorm_models_that_need_two_samples():
    model = batchlab.build_model("resnet18", in_shape=(3, 32, 32))
    assert max_batch_size(model, lambda n: meta_batch(n, (3, 32, 32)), budget="400MiB") > 100


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(budget="lots"), ValueError, "budget 'lots' is not a memory size"),
        (dict(budget="60MiB"), ValueError, r"even a batch of 1 does not fit in 60.0 MiB.*workspaces 65.0 MiB"),
        (
            dict(budget="4GiB", make_batch=lambda n: meta_batch(n + 1, (1, 28, 28))),
            ValueError,
            r"make_batch\(1\) must return a batch of 1 samples",
        ),
        (dict(budget="4GiB", make_batch="not callable"), TypeError, "make_batch must be a function"),
        (dict(budget="4GiB", optimizer="lbfgs"), ValueError, "optimizer must be 'sgd', 'adam' or a function"),
    ],
)
def test_max_batch_size_refuses_bad_input(kwargs, error, match):
    kwargs = {"make_batch": lambda n: meta_batch(n, (1, 28, 28)), **kwargs}
    with pytest.raises(error, match=match):
        max_batch_size(batchlab.build_model("mlp", in_shape=(1, 28, 28)), **kwargs)


class NeedsData(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x) * float(x.sum())  # reads a value: impossible without data


def test_a_model_the_meta_device_cannot_run_is_named():
    with pytest.raises(NotImplementedError, match=r"meta device.*in forward, .*test_estimate.py:\d+.*profile_step"):
        estimate_memory(NeedsData(), (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)))


def test_a_cpu_estimate_falls_back_to_measuring():
    model, batch = NeedsData(), (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.warns(UserWarning, match="Measuring the step on the CPU instead"):
        report = estimate_memory(model, batch, device="cpu")
    assert report.peak_bytes == batchlab.profile_step(model, batch).peak_bytes
    assert len(report.warnings) == 1 and report.warnings[0].startswith("not an estimate: the meta device could not")
    assert "warning: not an estimate" in repr(report)


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class Unusual(nn.Module):
    """A linear layer followed by a custom autograd function and a cumulative sum (CUB scratch on CUDA)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return Square.apply(self.linear(x)).cumsum(dim=1)


def test_an_estimate_warns_of_what_it_does_not_model():
    batch = meta_batch(8, (4,))
    report = estimate_memory(Unusual(), batch, device="cuda")
    assert report.warnings == [
        "custom autograd function Square: its forward is counted as it ran on the meta device, but memory its "
        "backward or a compiled kernel keeps outside PyTorch's operators is not",
        "aten.cumsum uses scratch memory from CUB (sort / scan temporaries) on CUDA, which this estimate does not "
        "model: the real peak may be higher",
    ]
    assert "warning: custom autograd function Square" in repr(report)
    # On the CPU the estimate counts tensors only, so the CUDA library note does not apply.
    assert [w.split(":")[0] for w in estimate_memory(Unusual(), batch, device="cpu").warnings] == [
        "custom autograd function Square"
    ]


def test_an_ordinary_model_gets_no_warnings():
    model = batchlab.build_model("cnn_bn", in_shape=(1, 28, 28))
    report = estimate_memory(model, meta_batch(4, (1, 28, 28)), device="cuda")
    assert report.warnings == [] and "warning" not in repr(report)
    checkpointed = estimate_memory(model, meta_batch(4, (1, 28, 28)), checkpointing="blocks")
    assert checkpointed.warnings == []


def test_accumulation_lowers_the_estimated_peak_as_measured_on_the_cpu():
    model = batchlab.build_model("cnn_bn", in_shape=(1, 28, 28))
    batch = meta_batch(256, (1, 28, 28))
    whole, split = (estimate_memory(model, batch, device="cpu", accumulation_steps=k) for k in (1, 4))
    assert split.breakdown["activations"] < whole.breakdown["activations"] / 3.5
    gpu = [estimate_memory(model, batch, accumulation_steps=k).peak_bytes for k in (1, 4, 16)]
    assert gpu[0] > gpu[1] > gpu[2]
    with pytest.raises(ValueError, match="accumulation_steps must be at most 256, got 512"):
        estimate_memory(model, batch, accumulation_steps=512)


# -- chapter 8: precision and checkpointing in the estimate --------------------------------------------


@pytest.mark.parametrize(
    "name, shape, make, precision",
    [
        ("cnn_bn", (1, 28, 28), lambda: torch.randn(32, 1, 28, 28), "bf16"),
        ("cnn_bn", (1, 28, 28), lambda: torch.randn(32, 1, 28, 28), "fp16"),
        ("transformer", (32,), lambda: torch.randint(0, 1000, (8, 32)), "bf16"),
    ],
)
def test_cpu_estimate_under_precision_matches_cpu_measurement(name, shape, make, precision):
    model = batchlab.build_model(name, in_shape=shape)
    batch = (make(), torch.randint(0, 10, (len(make()),)))
    measured = batchlab.profile_step(model, batch, optimizer="adam", precision=precision)
    estimated = batchlab.estimate_memory(model, batch, optimizer="adam", device="cpu", precision=precision)
    fp32 = batchlab.profile_step(model, batch, optimizer="adam")
    assert estimated.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.03)
    assert measured.peak_bytes < fp32.peak_bytes
    assert precision in estimated.label


def test_an_enclosing_autocast_is_honoured_and_a_conflicting_one_refused():
    model = batchlab.build_model("cnn_bn", in_shape=(1, 28, 28))
    batch = (torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    fp32 = batchlab.estimate_memory(model, batch, optimizer="adam")
    bf16 = batchlab.estimate_memory(model, batch, optimizer="adam", precision="bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = batchlab.estimate_memory(model, batch, optimizer="adam")
        with pytest.raises(ValueError, match=r"inside torch.autocast\(dtype=bf16\) with precision='fp16'"):
            batchlab.estimate_memory(model, batch, precision="fp16")
        assert torch.is_autocast_enabled("cpu")  # the caller's region is still there
    assert inside.peak_bytes == bf16.peak_bytes != fp32.peak_bytes
    assert "bf16" in inside.label


def test_gpu_estimates_shrink_with_low_precision_and_the_largest_batch_grows():
    model = batchlab.build_model("resnet18", in_shape=(3, 64, 64))

    def make(n):
        return torch.empty(n, 3, 64, 64, device="meta"), torch.empty(n, dtype=torch.long, device="meta")

    fp32 = batchlab.estimate_memory(model, make(32), optimizer="adam")
    bf16 = batchlab.estimate_memory(model, make(32), optimizer="adam", precision="bf16")
    fp16 = batchlab.estimate_memory(model, make(32), optimizer="adam", precision="fp16")
    assert bf16.peak_bytes < fp32.peak_bytes
    assert abs(fp16.peak_bytes - bf16.peak_bytes) < 64 * 1024  # same casts; GradScaler adds a few scalars
    assert bf16.breakdown["optimizer_state"] == fp32.breakdown["optimizer_state"]  # fp32 state either way
    small = batchlab.max_batch_size(model, make, budget="1GiB", optimizer="adam")
    large = batchlab.max_batch_size(model, make, budget="1GiB", optimizer="adam", precision="bf16")
    assert large > small


def test_checkpointing_lowers_the_gpu_estimate_and_raises_the_largest_batch():
    model = batchlab.build_model("resnet18", in_shape=(3, 64, 64))

    def make(n):
        return meta_batch(n, (3, 64, 64))

    large = batchlab.build_model("resnet18", in_shape=(3, 224, 224))
    plain = estimate_memory(large, meta_batch(64, (3, 224, 224)), optimizer="adam", precision="bf16")
    blocks = estimate_memory(
        large, meta_batch(64, (3, 224, 224)), optimizer="adam", precision="bf16", checkpointing="blocks"
    )
    assert blocks.peak_bytes < 0.9 * plain.peak_bytes
    assert blocks.breakdown["activations"] > 0  # saved segment inputs and one recomputed segment
    assert max_batch_size(model, make, budget="1GiB", optimizer="adam", checkpointing="blocks") > max_batch_size(
        model, make, budget="1GiB", optimizer="adam"
    )


def test_an_autocast_block_pytorch_switched_off_is_refused_not_ignored():
    import warnings

    model = batchlab.build_model("mlp", in_shape=(1, 8, 8))
    batch = meta_batch(8, (1, 8, 8))
    bf16 = estimate_memory(model, batch, optimizer="adam", precision="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "CUDA is not available ... Disabling autocast"
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if torch.cuda.is_available():
                assert estimate_memory(model, batch, optimizer="adam").peak_bytes == bf16.peak_bytes
            else:
                with pytest.raises(ValueError, match=r"inside a torch.autocast block that is switched off"):
                    estimate_memory(model, batch, optimizer="adam")
            assert estimate_memory(model, batch, optimizer="adam", precision="bf16").peak_bytes == bf16.peak_bytes
        with torch.autocast("cpu", enabled=False):
            with pytest.raises(ValueError, match="switched off"):
                max_batch_size(model, lambda n: meta_batch(n, (1, 8, 8)), budget="1GiB")
    assert "bf16" not in estimate_memory(model, batch, optimizer="adam").label  # outside the blocks: fp32 again
