"""Real GPU measurements shipped with batchlab, to cite and to check the estimator against (chapters 1, 4, 6).

``batchlab/data/gpu_memory_h100.json`` was measured on one NVIDIA H100 80GB with PyTorch 2.11; its
``about`` field says how.
"""

from __future__ import annotations

import json
from importlib import resources

from .estimate import CUDA_CONSTANTS
from .validation import parse_bytes


def gpu_reference() -> dict:
    """Real measurements of training steps on an NVIDIA H100 (PyTorch 2.11), shipped with batchlab.

    ``about`` and ``env`` say how they were measured; ``rows`` hold, per model, optimizer and batch
    size, the bytes allocated before the step, the peak allocated and the peak reserved; ``context``
    is what a process holds on the GPU beyond PyTorch's allocator (the CUDA context).
    """
    text = resources.files("batchlab").joinpath("data", "gpu_memory_h100.json").read_text(encoding="utf-8")
    return json.loads(text)


# Common cards: name -> (total memory in bytes, where the figure comes from). Sizes from NVIDIA's
# specification pages are the nominal "GB", which for these memories is GiB (the chips come in powers of
# two: nvidia-smi shows 12288 MiB for a 12 GB RTX 3060); what CUDA reports as the total is a little less
# (ECC and the driver keep some: the H100 below is nominally 80 GB). A measured total replaces the nominal
# one where batchlab has it.
_H100_TOTAL = 85_017_493_504
_SPEC = "NVIDIA specifications, nominal"
GPUS = {
    "T4": (
        15 * 2**30,
        "NVIDIA specifications 16 GB GDDR6, of which ECC (on by default) keeps 1 GiB: nvidia-smi shows 15360 MiB",
    ),
    "V100-16GB": (16 * 2**30, f"{_SPEC} 16 GB HBM2"),
    "V100-32GB": (32 * 2**30, f"{_SPEC} 32 GB HBM2"),
    "A10G": (24 * 2**30, f"{_SPEC} 24 GB GDDR6 (AWS G5 instances)"),
    "L4": (24 * 2**30, f"{_SPEC} 24 GB GDDR6"),
    "A100-40GB": (40 * 2**30, f"{_SPEC} 40 GB HBM2"),
    "A100-80GB": (80 * 2**30, f"{_SPEC} 80 GB HBM2e"),
    "H100-80GB": (
        _H100_TOTAL,
        "measured: torch.cuda.mem_get_info total of an NVIDIA H100 80GB HBM3 "
        "(batchlab/data/gpu_memory_h100.json, context.total)",
    ),
    "RTX3060": (12 * 2**30, f"{_SPEC} 12 GB GDDR6"),
    "RTX3080": (10 * 2**30, f"{_SPEC} 10 GB GDDR6X"),
    "RTX3090": (24 * 2**30, f"{_SPEC} 24 GB GDDR6X"),
    "RTX4070": (12 * 2**30, f"{_SPEC} 12 GB GDDR6X"),
    "RTX4080": (16 * 2**30, f"{_SPEC} 16 GB GDDR6X"),
    "RTX4090": (24 * 2**30, f"{_SPEC} 24 GB GDDR6X"),
}


def gpu_memory(gpu, name: str = "gpu") -> dict:
    """What a GPU gives PyTorch: ``{"gpu", "total_bytes", "context_bytes", "budget_bytes", "source"}``.

    ``gpu`` is a card of :data:`GPUS` (spelled loosely: ``"rtx 4090"``, ``"h100"`` when only one size
    is listed) or a size such as ``"12GiB"``. The budget PyTorch may use is the total minus the CUDA
    context (``CUDA_CONSTANTS["cuda_context"]``, measured on the H100; it differs a little between cards
    and CUDA versions, which the estimator's safety margin absorbs).
    """
    context, context_source = CUDA_CONSTANTS["cuda_context"]
    if isinstance(gpu, str) and gpu and not gpu.strip()[0].isdigit():
        wanted = "".join(ch for ch in gpu.upper() if ch.isalnum())
        keys = [k for k in GPUS if "".join(ch for ch in k if ch.isalnum()).startswith(wanted)]
        exact = [k for k in keys if "".join(ch for ch in k if ch.isalnum()) == wanted]
        if len(exact) != 1 and len(keys) != 1:
            which = f"it could be {', '.join(keys)}" if keys else "it is not one batchlab knows"
            raise ValueError(
                f"{name} {gpu!r} is not a card in batchlab.reference.GPUS ({which}): give one of "
                f"{', '.join(GPUS)}, or its memory such as '12GiB'"
            )
        key = (exact or keys)[0]
        total, source = GPUS[key]
    else:
        key, total, source = None, parse_bytes(name, gpu), "given"
    if total <= context:
        raise ValueError(
            f"{name} {gpu!r} is smaller than the CUDA context alone ({context / 2**30:.2f} GiB): "
            f"give the card's whole memory, such as '12GiB'"
        )
    return {
        "gpu": key or gpu,
        "total_bytes": total,
        "context_bytes": context,
        "budget_bytes": total - context,
        "source": source,
        "context_source": context_source,
    }
