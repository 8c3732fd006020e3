"""Depthwise-conv branches DW(V) used next to a linear attention (Castling-ViT §3).

Both take and return values in merged-head token layout ``(B, N, C)`` and start at zero
(zero-initialised weights), so adding them does not move a converted model away from its teacher.
"""

from typing import Optional, Tuple

import torch
from torch import nn

from castle_convert.attention.functional import padded_grid_dw, patch_grid_dw, resolve_grid, token_dw


def _zero_padding(v: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """v (B, N, C) with the padding tokens of a key-padding mask (B, N) zeroed: they never enter the conv."""
    return v if token_mask is None else v * token_mask.unsqueeze(-1).to(v.dtype)


class PatchGridDWConv(nn.Module):
    """2-D depthwise conv (one filter per channel) over the patch grid.

    Prefix tokens (class, distillation, registers) are not on the grid: their DW term is zero.
    The grid ``(rows, cols)`` is an argument of each call (the model's forward derives it from the
    image), so non-square and changed input sizes work, and calls never share it. A padded batch of
    differently sized images passes each image's grid as ``grid_sizes`` (B, 2) instead, with its
    key-padding ``token_mask`` (B, N): each image is convolved over its own grid, padding never read.
    """

    def __init__(self, channels: int, kernel_size: int, num_prefix_tokens: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                              groups=channels, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.conv.weight)
        # The conv runs channels-last (the token layout); its weight gradient comes back in that
        # layout, so keep the weight in it too (DDP's gradient buckets follow the weight's strides).
        # (C, 1, k, k) is "channels-last contiguous" either way, so set the strides explicitly.
        w = self.conv.weight
        self.conv.weight.data = torch.zeros_like(w).as_strided(w.shape, (kernel_size * kernel_size, 1, kernel_size, 1))

    def forward(self, v: torch.Tensor, grid: Optional[Tuple[int, int]] = None, token_mask: Optional[torch.Tensor] = None,
                grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        P = self.num_prefix_tokens                                     # v: (B, N, C)
        if grid_sizes is not None:
            return padded_grid_dw(v, self.conv.weight, P, grid_sizes, token_mask)
        return patch_grid_dw(_zero_padding(v, token_mask), self.conv.weight, P, resolve_grid(v.shape[1] - P, grid))


class TokenDWConv(nn.Module):
    """1-D conv along the token sequence, one filter per head shared over the head's channels.

    This is the layout of the reference code (``Conv2d(heads, heads, (k, 1), groups=heads)``);
    it treats prefix tokens as ordinary sequence positions (padding tokens are zeroed first).
    """

    def __init__(self, num_heads: int, kernel_size: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.conv = nn.Conv2d(num_heads, num_heads, (kernel_size, 1), padding=(kernel_size // 2, 0),
                              groups=num_heads, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.conv.weight)

    def forward(self, v: torch.Tensor, grid: Optional[Tuple[int, int]] = None, token_mask: Optional[torch.Tensor] = None,
                grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        return token_dw(_zero_padding(v, token_mask), self.conv.weight, self.num_heads)   # (B, N, C); no grid


def dw_macs(dw: Optional[nn.Module], num_tokens: int, grid: Tuple[int, int], channels: int) -> int:
    """Multiply-accumulates of a DW branch for one image: ``num_tokens`` tokens, ``grid`` patches."""
    if dw is None:
        return 0
    k = dw.conv.kernel_size
    if isinstance(dw, PatchGridDWConv):
        return k[0] * k[1] * grid[0] * grid[1] * channels             # over the patch grid only
    return k[0] * num_tokens * channels                                # along the token sequence


def build_dw(mode: str, kernel_size: int, channels: int, num_heads: int, num_prefix_tokens: int,
             like: Optional[torch.Tensor] = None) -> Optional[nn.Module]:
    """The DW branch of ``mode``, on the device and in the dtype of ``like`` (the source's ``qkv`` weight: an
    fp16/bf16 model gets an fp16/bf16 conv)."""
    where = {"device": like.device, "dtype": like.dtype} if like is not None else {}
    if mode == "2d":
        return PatchGridDWConv(channels, kernel_size, num_prefix_tokens, **where)
    if mode == "1d":
        return TokenDWConv(num_heads, kernel_size, **where)
    return None
