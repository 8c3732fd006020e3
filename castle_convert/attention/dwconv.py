"""Depthwise-conv branches DW(V) used next to a linear attention (Castling-ViT §3).

Both take and return values in merged-head token layout ``(B, N, C)`` and start at zero
(zero-initialised weights), so adding them does not move a converted model away from its teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from castle_convert.attention.base import GridTracker


class PatchGridDWConv(nn.Module):
    """2-D depthwise conv (one filter per channel) over the patch grid.

    Prefix tokens (class, distillation, registers) are not on the grid: their DW term is zero.
    The grid comes from the model's :class:`GridTracker` at forward time, so non-square and
    changed input sizes work.
    """

    def __init__(self, channels: int, kernel_size: int, num_prefix_tokens: int, grid: GridTracker):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = grid
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                              groups=channels, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        B, N, C = v.shape                                              # v: (B, N, C)
        P = self.num_prefix_tokens
        H, W = self.grid.resolve(N - P)
        x = v[:, P:].reshape(B, H, W, C).permute(0, 3, 1, 2)           # (B, C, H, W), channels-last
        x = self.conv(x).permute(0, 2, 3, 1).reshape(B, H * W, C)      # (B, H·W, C)
        return F.pad(x, (0, 0, P, 0))                                  # (B, N, C), prefix rows = 0


class TokenDWConv(nn.Module):
    """1-D conv along the token sequence, one filter per head shared over the head's channels.

    This is the layout of the reference code (``Conv2d(heads, heads, (k, 1), groups=heads)``);
    it treats prefix tokens as ordinary sequence positions.
    """

    def __init__(self, num_heads: int, kernel_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.conv = nn.Conv2d(num_heads, num_heads, (kernel_size, 1), padding=(kernel_size // 2, 0),
                              groups=num_heads, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        B, N, C = v.shape                                              # v: (B, N, C)
        x = v.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, h, N, d)
        return self.conv(x).transpose(1, 2).reshape(B, N, C)          # (B, N, C)


def build_dw(mode: str, kernel_size: int, channels: int, num_heads: int, num_prefix_tokens: int,
             grid: GridTracker) -> nn.Module | None:
    if mode == "2d":
        return PatchGridDWConv(channels, kernel_size, num_prefix_tokens, grid)
    if mode == "1d":
        return TokenDWConv(num_heads, kernel_size)
    return None
