"""A GPT-style language model for the command-line benchmark: GPT-2 small's shape with an untied head.

Token and position embeddings, 12 pre-norm blocks of width 768 with 12 heads (causal attention through
``F.scaled_dot_product_attention``) and a 4x MLP, a final norm and a 768 x 50257 head: 163M parameters.
It is an ``nn.Sequential`` of embedding, blocks and head, so batchlab can checkpoint the blocks.

    python -m batchlab estimate --model benchmarks/gpt.py:gpt_160m --tokens 1024 --vocab 50257 --batch-size 8
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, WIDTH, HEADS, LAYERS, CONTEXT = 50257, 768, 12, 12, 1024


class Embedding(nn.Module):
    def __init__(self, vocab: int, width: int, context: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(context, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, width // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.norm, self.out = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


def gpt_160m() -> nn.Sequential:
    """(batch, length) token ids -> (batch, length, 50257) logits; 163M parameters."""
    return nn.Sequential(
        Embedding(VOCAB, WIDTH, CONTEXT), *(Block(WIDTH, HEADS) for _ in range(LAYERS)), Head(WIDTH, VOCAB)
    )
