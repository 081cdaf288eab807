"""How fast a small CNN learns the procedural shapes (the claim in datasets.shapes and chapter 2).

    python benchmarks/shapes_accuracy.py

Trains ``build_model("cnn_bn")`` on ``shapes(8000)`` at 32x32 for 3 epochs (batch 64, SGD lr 0.02,
momentum 0.9) and prints the test accuracy on ``shapes(1000, seed=1)`` and the wall-clock time,
data generation included. Goal: >= 90% in under 60 s on a 2-core machine.
"""

import platform
import time

import psutil
import torch

import batchlab
from batchlab import datasets


def main():
    print(f"machine: {platform.machine()}, {psutil.cpu_count()} cores, torch {torch.__version__}")
    start = time.perf_counter()
    model = batchlab.build_model("cnn_bn", in_shape=(3, 32, 32), num_classes=5)
    history = batchlab.train(
        model,
        datasets.shapes(8000, seed=0),
        batch_size=64,
        epochs=3,
        lr=0.02,
        eval_dataset=datasets.shapes(1000, seed=1),
        progress=False,
    )
    seconds = time.perf_counter() - start
    accuracy = history.eval_accuracy[-1]
    print(f"test accuracy after each epoch: {[round(a, 3) for a in history.eval_accuracy]}")
    print(
        f"final accuracy {accuracy:.3f} (goal >= 0.90) in {seconds:.1f} s (goal < 60 s): "
        f"{'met' if accuracy >= 0.9 and seconds < 60 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
