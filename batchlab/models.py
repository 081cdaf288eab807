"""The models the course trains, built by name (every chapter).

``build_model("cnn_bn", in_shape=(1, 28, 28))`` gives the same architecture as the ``cnn_28`` rows of
the GPU reference measurements (``batchlab/data/gpu_memory_h100.json``), so estimates made here can be
compared with a real GPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .validation import check_choice, check_int, check_seed

MODEL_NAMES = ("mlp", "cnn", "cnn_bn", "resnet18", "transformer")
VOCAB_SIZE = 1000  # tokens the "transformer" model knows (ids 0 ... 999)


def build_model(name: str, *, in_shape=(3, 32, 32), num_classes: int = 10, seed: int | None = 0) -> nn.Module:
    """Build one of :data:`MODEL_NAMES` for inputs of shape ``in_shape`` = (channels, height, width).

    * ``"mlp"``: Flatten, Linear(in, 512), ReLU, Linear(512, 512), ReLU, Linear(512, classes).
    * ``"cnn"`` / ``"cnn_bn"``: two 3x3 convolutions (32 and 64 channels), each followed by ReLU and a
      2x2 max-pool (``cnn_bn`` puts a BatchNorm before each ReLU), then Linear(., 128), ReLU,
      Linear(128, classes). Height and width must be at least 4.
    * ``"resnet18"``: torchvision's ResNet-18 with random weights (nothing is downloaded); its first
      convolution is adapted when there are not 3 input channels.
    * ``"transformer"``: a Transformer encoder that classifies sequences of token ids; ``in_shape`` is
      ``(sequence_length,)``. Embedding (:data:`VOCAB_SIZE` tokens, width 128) plus learned positions,
      2 encoder layers (4 heads, feed-forward 512, dropout 0.1), mean over positions, Linear.

    ``seed`` makes the initial weights reproducible without touching the global random state;
    ``seed=None`` draws them from the global generator instead.
    """
    check_choice("name", name, MODEL_NAMES)
    in_shape = _check_in_shape(in_shape, 1 if name == "transformer" else 3)
    check_int("num_classes", num_classes, minimum=2)
    if seed is None:
        return _build(name, in_shape, num_classes)
    check_seed("seed", seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(name, in_shape, num_classes)


def _build(name: str, in_shape: tuple, num_classes: int) -> nn.Module:
    if name == "transformer":
        return TransformerClassifier(in_shape[0], num_classes)
    channels, height, width = in_shape
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(in_shape), 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )
    if name in ("cnn", "cnn_bn"):
        if height < 4 or width < 4:
            raise ValueError(f"in_shape must have height and width of at least 4 for a CNN, got {in_shape}")
        norm = nn.BatchNorm2d if name == "cnn_bn" else lambda _: nn.Identity()
        return nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            norm(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            norm(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (height // 4) * (width // 4), 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _check_in_shape(in_shape, dims: int) -> tuple:
    if (
        not isinstance(in_shape, (tuple, list))
        or len(in_shape) != dims
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in in_shape)
    ):
        expected = "(sequence_length,)" if dims == 1 else "(channels, height, width)"
        raise ValueError(f"in_shape must be {expected} of positive ints, got {in_shape!r}")
    return tuple(in_shape)


class TransformerClassifier(nn.Module):
    """Token ids (batch, length) -> class scores, through a small Transformer encoder."""

    def __init__(self, length: int, num_classes: int, width: int = 128, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, width)
        self.position = nn.Parameter(torch.zeros(length, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype != torch.long or tokens.dim() != 2 or tokens.shape[1] > len(self.position):
            raise ValueError(
                f"expected token ids of shape (batch, up to {len(self.position)}) and dtype "
                f"torch.long, got {tuple(tokens.shape)} {tokens.dtype}"
            )
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.encoder(x).mean(dim=1))


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters (each a float: 4 bytes in float32)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
