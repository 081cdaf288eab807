"""Real GPU measurements shipped with batchlab, to cite and to check the estimator against (chapters 1, 4, 6).

``batchlab/data/gpu_memory_h100.json`` was measured on one NVIDIA H100 80GB with PyTorch 2.11; its
``about`` field says how.
"""

from __future__ import annotations

import json
from importlib import resources


def gpu_reference() -> dict:
    """Real measurements of training steps on an NVIDIA H100 (PyTorch 2.11), shipped with batchlab.

    ``about`` and ``env`` say how they were measured; ``rows`` hold, per model, optimizer and batch
    size, the bytes allocated before the step, the peak allocated and the peak reserved; ``context``
    is what a process holds on the GPU beyond PyTorch's allocator (the CUDA context).
    """
    text = resources.files("batchlab").joinpath("data", "gpu_memory_h100.json").read_text(encoding="utf-8")
    return json.loads(text)
