"""The default loss, cross-entropy, made to say what to do when a model's output does not suit it.

Every step in batchlab calls ``loss_fn(model(inputs), targets)`` (:func:`batchlab.train_step`). A
learner's loss receives the model's output exactly as the model returned it (a tensor, a tuple, a
dict, an object with ``.logits``). When no loss is given, :class:`DefaultLoss` is used: plain
``nn.CrossEntropyLoss`` (the mean over the batch) on the output's logits, with the shapes checked
first so that a language model's ``(batch, length, vocab)`` logits meet an error that says how to
pass a token-level loss instead of PyTorch's "Expected target size ..." from inside the kernel.
"""

from __future__ import annotations

import torch
from torch import nn

LANGUAGE_MODEL_LOSS = "loss_fn=lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten())"


def output_logits(output) -> torch.Tensor:
    """The logits tensor in a model's output: the tensor itself, ``.logits``, ``["logits"]``, or a tuple's first.

    A dict without ``"logits"`` is taken only when it holds exactly one tensor; anything else is refused
    with a ``TypeError`` that says to pass ``loss_fn``, which receives the output as it is.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(getattr(output, "logits", None), torch.Tensor):  # Hugging Face outputs, simple namespaces
        return output.logits
    if isinstance(output, dict):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        tensors = [key for key, value in output.items() if isinstance(value, torch.Tensor)]
        if len(tensors) == 1:
            return output[tensors[0]]
        raise TypeError(
            f"the default loss (cross-entropy) cannot tell which of the model's outputs {list(output)} "
            f"are the logits: pass loss_fn=lambda output, y: F.cross_entropy(output['KEY'], y) "
            f"with the key of the logits (loss_fn gets the output as the model returns it)"
        )
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"the default loss (cross-entropy) needs the model to return logits (a tensor, a tuple whose "
        f"first element they are, a dict or an object with 'logits'), got {type(output).__name__}: pass "
        f"loss_fn(output, targets), which gets the output as the model returns it"
    )


def check_cross_entropy_shapes(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Refuse logits and targets that ``F.cross_entropy`` cannot pair, saying to pass ``loss_fn``.

    It takes class indices of shape ``(batch, d1, ...)`` for logits ``(batch, classes, d1, ...)``, or
    class probabilities of the logits' own shape.
    """
    index_shape = logits.shape[:1] + logits.shape[2:]
    if logits.dim() >= 1 and (targets.shape == index_shape or targets.shape == logits.shape):
        return
    lm = logits.dim() == 3 and targets.shape == logits.shape[:2]
    hint = (
        f" This looks like a language model (logits (batch, length, vocab), targets (batch, length)): pass "
        f"{LANGUAGE_MODEL_LOSS} (torch.nn.functional as F), the token-level cross-entropy"
        if lm
        else f" Pass loss_fn(output, targets) returning the mean loss, e.g. for a language model {LANGUAGE_MODEL_LOSS}"
    )
    raise ValueError(
        f"the default loss (cross-entropy) cannot take the model's output of shape {tuple(logits.shape)} "
        f"with targets of shape {tuple(targets.shape)}: it needs logits (batch, classes) with targets "
        f"(batch,), or (batch, classes, d1, ...) with (batch, d1, ...).{hint}"
    )


class DefaultLoss(nn.CrossEntropyLoss):
    """Cross-entropy (mean over the batch) on the logits of any output :func:`output_logits` understands."""

    def forward(self, output, targets: torch.Tensor) -> torch.Tensor:
        logits = output_logits(output)
        check_cross_entropy_shapes(logits, targets)
        return super().forward(logits, targets)
