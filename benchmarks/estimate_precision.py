"""Mixed precision and activation checkpointing in the memory estimate (chapter 8, issue 12).

    python benchmarks/estimate_precision.py [--quick] [--write results.json]

1. For the course models at 224 px (the transformer: 224 tokens) and a few batch sizes, the estimated
   peak allocated and peak reserved memory of one Adam step on a CUDA GPU in fp32, bf16 and fp16.
2. Activation checkpointing: the estimated peak (bf16, Adam) against the number of checkpointed segments.
3. On this machine's CPU: the measured peak (``profile_step``) next to the CPU estimate, for fp32, bf16
   and checkpointing (goal: within 3%).
4. Only where a CUDA GPU is present: real bf16 and fp16 autocast steps (``max_memory_allocated``) next
   to the estimate, with the device and PyTorch version (goal for bf16: within 10% for steps of 256 MiB or
   more, 25% for all). Without a GPU this part says so and prints nothing else. ``--write PATH`` saves
   the GPU rows as JSON with their provenance (device, PyTorch, CUDA, how they were measured), in the
   shape of ``batchlab/data/gpu_memory_h100.json``'s rows plus ``precision`` and ``in_shape``.
"""

import json
import os
import platform
import sys
import time

import psutil
import torch

import batchlab
import batchlab.precision

MiB, GiB = 2**20, 2**30
MODELS = [("mlp", (3, 224, 224)), ("cnn_bn", (3, 224, 224)), ("resnet18", (3, 224, 224)), ("transformer", (224,))]


def meta_batch(name, in_shape, n):
    if name == "transformer":
        inputs = torch.zeros(n, *in_shape, dtype=torch.long, device="meta")
    else:
        inputs = torch.empty(n, *in_shape, device="meta")
    return inputs, torch.zeros(n, dtype=torch.long, device="meta")


def real_batch(name, in_shape, n, device="cpu"):
    g = torch.Generator().manual_seed(0)
    if name == "transformer":
        inputs = torch.randint(0, batchlab.models.VOCAB_SIZE, (n, *in_shape), generator=g)
    else:
        inputs = torch.randn(n, *in_shape, generator=g)
    return inputs.to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def precision_table(batches) -> None:
    print("1. estimated GPU memory of one Adam step (peak allocated / peak reserved, GiB)")
    print(f"{'model':12} {'batch':>5} | {'fp32':>13} | {'bf16':>13} | {'fp16':>13} | bf16 / fp32")
    for name, in_shape in MODELS:
        model = batchlab.build_model(name, in_shape=in_shape)
        for n in batches:
            cells, peaks = [], {}
            for precision in batchlab.PRECISIONS:
                report = batchlab.estimate_memory(
                    model, meta_batch(name, in_shape, n), optimizer="adam", precision=precision
                )
                peaks[precision] = report.peak_bytes
                cells.append(f"{report.peak_bytes / GiB:6.2f} / {report.reserved_bytes / GiB:5.2f}")
            print(f"{name:12} {n:>5} | {' | '.join(cells)} | {peaks['bf16'] / peaks['fp32']:.2f}")
    print()


def checkpointing_table(batch) -> None:
    print(f"2. estimated GPU peak (bf16, Adam, batch {batch}) against checkpointed segments, GiB")
    for name, in_shape in MODELS:
        model = batchlab.build_model(name, in_shape=in_shape)
        blocks = len(batchlab.checkpoint_blocks(model))
        counts = [None] + sorted({1, 2, max(1, round(blocks**0.5)), blocks})
        cells = []
        for segments in counts:
            report = batchlab.estimate_memory(
                model, meta_batch(name, in_shape, batch), optimizer="adam", precision="bf16", checkpointing=segments
            )
            cells.append(f"{'none' if segments is None else segments}: {report.peak_bytes / GiB:.2f}")
        print(f"{name:12} ({blocks} blocks)  " + "   ".join(cells))
    print()


def cpu_table() -> bool:
    print("3. CPU: measured peak (profile_step) vs CPU estimate, MiB")
    cases = [
        ("cnn_bn", (1, 28, 28), 64),
        ("resnet18", (3, 64, 64), 32),
        ("transformer", (64,), 16),
        ("mlp", (1, 28, 28), 2048),
    ]
    levers = [("fp32", None), ("bf16", None), ("fp32", "blocks"), ("fp32", 2), ("bf16", "blocks")]
    all_ok = True
    print(
        f"{'model':12} {'batch':>5} {'precision':9} {'checkpointing':>13} | {'measured':>8} {'estimate':>8} "
        f"{'error':>7} ok"
    )
    for name, in_shape, n in cases:
        model = batchlab.build_model(name, in_shape=in_shape)
        batch = real_batch(name, in_shape, n)
        for precision, checkpointing in levers:
            measured = batchlab.profile_step(
                model, batch, optimizer="adam", precision=precision, checkpointing=checkpointing
            )
            estimated = batchlab.estimate_memory(
                model, batch, optimizer="adam", device="cpu", precision=precision, checkpointing=checkpointing
            )
            error = estimated.peak_bytes / measured.peak_bytes - 1
            ok = abs(error) <= 0.03
            all_ok &= ok
            print(
                f"{name:12} {n:>5} {precision:9} {str(checkpointing):>13} | {measured.peak_bytes / MiB:8.2f} "
                f"{estimated.peak_bytes / MiB:8.2f} {error:+7.2%} {'yes' if ok else 'NO'}"
            )
    print(f"every row within 3%: {'yes' if all_ok else 'NO'}\n")
    return all_ok


def measure_gpu(name, in_shape, n, precision) -> dict:
    """Memory of a second Adam step (bytes), measured as the H100 reference rows were."""
    model = batchlab.build_model(name, in_shape=in_shape).cuda()
    inputs, targets = real_batch(name, in_shape, n, "cuda")
    opt = batchlab.make_optimizer("adam", model.parameters())
    scaler = batchlab.precision.make_scaler("cuda", precision)
    batchlab.train_step(model, opt, inputs, targets, precision=precision, scaler=scaler)  # optimizer state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    batchlab.train_step(model, opt, inputs, targets, precision=precision, scaler=scaler)
    torch.cuda.synchronize()
    row = {
        "model": name,
        "in_shape": list(in_shape),
        "opt": "adam",
        "batch": n,
        "precision": precision,
        "before_step": before,
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
    }
    del model, opt, inputs, targets, scaler
    torch.cuda.empty_cache()
    return row


def gpu_table() -> list:
    if not torch.cuda.is_available():
        print("4. no CUDA GPU here: no real bf16 / fp16 measurements (run this script on a GPU to get them)")
        return []
    rows = []
    print(
        f"4. real GPU steps: {torch.cuda.get_device_name()}, PyTorch {torch.__version__}, CUDA "
        f"{torch.version.cuda}; Adam; max_memory_allocated of the second step vs the estimate, MiB"
    )
    cases = [
        ("cnn_bn", (1, 28, 28), [64, 512, 4096]),
        ("resnet18", (3, 32, 32), [32, 256, 1024]),
        ("resnet18", (3, 224, 224), [16, 64]),
        ("transformer", (224,), [16, 128]),
    ]
    for name, in_shape, batches in cases:
        for n in batches:
            for precision in ("bf16", "fp16"):
                row = measure_gpu(name, in_shape, n, precision)
                rows.append(row)
                real = row["peak_allocated"]
                estimated = batchlab.estimate_memory(
                    batchlab.build_model(name, in_shape=in_shape),
                    meta_batch(name, in_shape, n),
                    optimizer="adam",
                    precision=precision,
                )
                bar = 0.10 if real >= 256 * MiB else 0.25
                error = estimated.peak_bytes / real - 1
                print(
                    f"{name:12} {str(in_shape):14} {n:>5} {precision} | {real / MiB:9.1f} "
                    f"{estimated.peak_bytes / MiB:9.1f} {error:+7.1%} bar {bar:.0%} "
                    f"{'yes' if abs(error) <= bar else 'NO'}"
                )
    return rows


def main():
    quick = "--quick" in sys.argv
    print(
        f"machine: {platform.machine()}, {psutil.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
        f"PyTorch {torch.__version__}\n"
    )
    start = time.perf_counter()
    precision_table([16, 64] if quick else [16, 64, 256])
    checkpointing_table(64)
    cpu_table()
    rows = gpu_table()
    if "--write" in sys.argv and rows:
        path = sys.argv[sys.argv.index("--write") + 1]
        about = (
            f"Measured on one {torch.cuda.get_device_name()} (PyTorch {torch.__version__}, CUDA "
            f"{torch.version.cuda}) by benchmarks/estimate_precision.py: a model built on the GPU, one "
            f"batchlab.train_step (Adam, forward and loss under torch.autocast('cuda', dtype); fp16 with "
            f"torch.amp.GradScaler) to create the optimizer state, peak counters reset, a second step "
            f"measured. Inputs: torch.randn (token ids for the transformer), targets in 0..9."
        )
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"about": about, "rows": rows}, f, indent=1)
            f.write("\n")
        print(f"wrote {len(rows)} rows to {path}")
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
