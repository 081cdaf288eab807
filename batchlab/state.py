"""What a tool gives back: the model's modes and gradients, and the random state, as it found them.

Every public function that takes a model promises to leave it as it was (its weights, each module's
train/eval flag, its ``.grad``) and not to advance the global random generator. These helpers keep
that promise in one place: :func:`saved_modes` / :func:`restore_modes` for the train flag of *every*
module (a BatchNorm frozen with ``.eval()`` inside a model in train mode stays frozen; :func:`train_mode`
keeps it frozen while training too),
:func:`stash_grads` / :func:`restore_grads` for the gradients (set aside, because ``backward`` adds
into an existing ``.grad`` in place), and :func:`forked_rng` for the random state of the CPU and of the
device a tool runs on.
"""

from __future__ import annotations

import torch
from torch import nn


def saved_modes(model: nn.Module) -> list:
    """``(module, training)`` for every module of ``model``: what :func:`restore_modes` puts back."""
    return [(module, module.training) for module in model.modules()]


def restore_modes(modes: list) -> None:
    """Give each module the train/eval flag it had when :func:`saved_modes` was called."""
    for module, training in modes:
        module.training = training


def train_mode(model: nn.Module) -> nn.Module:
    """Put ``model`` in train mode for training steps, without undoing a layer frozen on purpose.

    A model in eval mode is switched to train mode as a whole; a model already in train mode keeps each
    module's own flag, so a BatchNorm frozen with ``.eval()`` keeps its running statistics.
    """
    if not model.training:
        model.train()
    return model


def stash_grads(model: nn.Module) -> list:
    """Take every ``.grad`` of ``model`` away (set it to None) and return ``(parameter, grad)`` pairs.

    ``backward`` adds into an existing ``.grad`` in place, so a tool that trains must not start from it:
    stashing (not copying) keeps the caller's gradient tensors untouched and costs no memory.
    """
    grads = [(p, p.grad) for p in model.parameters()]
    for p, _ in grads:
        p.grad = None
    return grads


def restore_grads(grads: list) -> None:
    """Put back the gradients :func:`stash_grads` took (the same tensors, so bitwise as they were)."""
    for p, grad in grads:
        p.grad = grad


def forked_rng(device=None):
    """``torch.random.fork_rng`` over the CPU generator and, on CUDA, the generator of ``device``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
