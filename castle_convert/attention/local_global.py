"""Local-global softmax attention: exact softmax over a sparse key pattern at linear cost.

Every patch query attends, in one softmax, to the prefix tokens (CLS, registers), the keys of a local window
(its b×b block of the patch grid widened by ``halo`` on each side), the ``topk`` patch tokens the first prefix
token (CLS) attends to most (per head) and G×G pooled regions of the grid, each region one key (the mean of its
keys and values) whose logit carries ``+ log(n)``, n = the region's keys not already exact for the query (outside
its window, not a top token): the softmax mass the region would have if its keys were all equal. Prefix queries attend
to every key exactly. See :func:`castle_convert.attention.functional.local_global_attention` and
``docs/method.md`` (the per-layer study that chose it). Nothing is N×N at inference; the cost is
O(N·((b + 2·halo)² + P + topk + G²)·d) for fixed block, halo, topk and G; on a grid of at most G×G patches the pattern is
exactly the teacher's softmax attention.

**Training form: the masked softmax branch anneals to the pattern.** At gate ``g > 0`` the training form
computes the softmax over *all* keys, with the keys of the pattern ``S_i`` exact and, of the others, those
whose teacher-form attention weight is large enough exact too — ``a_ij · g · N ≥ τ`` — while the remaining
keys enter through their pooled regions (the region's count only counts them). At ``g = 1, τ = 0`` every key
is exact: the student is its teacher (q/k/v are the pretrained ones). As ``g`` falls and ``τ`` rises the kept
set shrinks to ``S``; at ``g = 0`` it is exactly the inference form. This is Castling-ViT's "anneal the mask",
with an endpoint that keeps what linear terms cannot express. The DW branch (optional, zero-initialised)
enters with weight ``1 − g``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from castle_convert.attention.base import CastlingModule, CastlingTrainingForm, SoftmaxAttentionSpec
from castle_convert.attention.dwconv import build_dw, dw_macs
from castle_convert.attention.functional import local_global_attention, merge_heads, resolve_grid
from castle_convert.config import CastlingConfig

# One leaf node under FX symbolic tracing (Python branches on the grid and the prefix count).
torch.fx.wrap("local_global_attention")


def local_global_macs(num_tokens: int, grid: Tuple[int, int], num_prefix_tokens: int, channels: int,
                      block: int, halo: int, pool: int, topk: int = 0, heads: int = 1) -> int:
    """Multiply-accumulates of :func:`local_global_attention` for one image (matmuls and einsums, as
    ``torch.utils.flop_counter`` counts them): prefix queries over all keys, window and global logits and
    their weighted sums over the padded blocks, and the pooling of keys and values."""
    H, W = grid
    P = num_prefix_tokens
    nb = -(-H // block) * -(-W // block)
    padded = nb * block * block                                  # queries of the padded blocks
    Gh, Gw = min(pool, H), min(pool, W)
    window = (block + 2 * halo) ** 2
    T = min(topk, H * W) if P else 0
    glob = P + T + Gh * Gw
    pooling = 2 * (Gh * H * W + Gh * Gw * W) * channels          # keys and values, two einsums each
    regions = 0 if not T else heads * nb * T * Gh * Gw           # which regions each head's top tokens leave, per block
    return 2 * P * num_tokens * channels + 2 * padded * (window + glob) * channels + pooling + regions


def pattern_masks(num_prefix_tokens: int, num_tokens: int, grid_sizes: torch.Tensor, real: torch.Tensor,
                  block: int, halo: int, pool: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The dense description of the pattern for the annealed training form (N×N is allowed in training).

    grid_sizes (B, 2): each image's (rows, cols); real (B, N): real tokens. Returns ``S`` (B, N, N) bool — key j is
    exact for query i (prefix rows and columns, the window of i's block, both real) — and the region one-hot
    (B, G·G, M) of the patch tokens (a slot per region of a G×G split; slots beyond an image's own
    min(G, rows) × min(G, cols) split are empty)."""
    B = grid_sizes.shape[0]
    P, N = num_prefix_tokens, num_tokens
    M = N - P
    dev = real.device
    rows, cols = grid_sizes[:, 0:1].long(), grid_sizes[:, 1:2].long()   # (B, 1)
    pos = torch.arange(M, device=dev).unsqueeze(0)                       # (1, M)
    y, x = pos // cols, pos % cols                                       # (B, M)
    inside = (pos < rows * cols) & real[:, P:]
    by, bx = (y // block) * block, (x // block) * block                  # block origin of each query
    win = ((y[:, None, :] >= by[:, :, None] - halo) & (y[:, None, :] < by[:, :, None] + block + halo)
           & (x[:, None, :] >= bx[:, :, None] - halo) & (x[:, None, :] < bx[:, :, None] + block + halo))   # (B, M, M)
    S = torch.ones(B, N, N, dtype=torch.bool, device=dev)
    S[:, P:, P:] = win & inside[:, :, None] & inside[:, None, :]
    S &= real[:, None, :]
    Gy, Gx = rows.clamp(max=pool), cols.clamp(max=pool)
    region = (y * Gy // rows) * pool + x * Gx // cols                    # (B, M)
    onehot = (region.unsqueeze(1) == torch.arange(pool * pool, device=dev).view(1, -1, 1)) & inside.unsqueeze(1)
    return S, onehot


class _LocalGlobalParts(CastlingModule):
    """Modules and helpers shared by both forms (same state_dict keys in both)."""

    kind_label = "local-global softmax"

    def _init_parts(self, *, dim: int, num_heads: int, head_dim: int, scale: float, num_prefix_tokens: int,
                    qkv: nn.Linear, proj: nn.Linear, q_norm: nn.Module, k_norm: nn.Module, out_norm: nn.Module,
                    out_gate: Optional[nn.Linear], dw: Optional[nn.Module], proj_drop: float, eps: float,
                    block: int, halo: int, pool: int, topk: int, exact_tokens: int, rope_half: bool = False) -> None:
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_prefix_tokens = num_prefix_tokens
        self.eps = eps
        self.block, self.halo, self.pool, self.topk = int(block), int(halo), int(pool), int(topk)
        self.exact_tokens = int(exact_tokens)
        self.rope_half = bool(rope_half)
        self.qkv = qkv
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.dw = dw
        self.norm = out_norm
        self.out_gate = out_gate
        self.proj = proj
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", block={self.block}, halo={self.halo}, pool={self.pool}, topk={self.topk}, "
                                      f"exact_tokens={self.exact_tokens}")

    def _pattern(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Optional[Tuple[int, int]],
                 token_mask: Optional[torch.Tensor], grid_sizes: Optional[torch.Tensor]) -> torch.Tensor:
        """The inference pattern, merged heads (B, N, C)."""
        hw = None if grid_sizes is not None else resolve_grid(q.shape[-2] - self.num_prefix_tokens, grid)
        return local_global_attention(q, k, v, self.scale, self.num_prefix_tokens, hw, self.block, self.halo,
                                      self.pool, self.topk, self.exact_tokens, token_mask=token_mask,
                                      grid_sizes=grid_sizes)

    def mixing_macs(self, num_tokens: int, grid: Tuple[int, int]) -> int:
        C = self.num_heads * self.head_dim
        mixing = 2 * num_tokens * num_tokens * C if num_tokens <= self.exact_tokens else local_global_macs(
            num_tokens, grid, self.num_prefix_tokens, C, self.block, self.halo, self.pool, self.topk, self.num_heads)
        return mixing + dw_macs(self.dw, num_tokens, grid, C)


class LocalGlobalAttentionInference(_LocalGlobalParts):
    """Inference form: ``proj(local-global softmax(q, k, v) + DW)``. No N×N tensor, no schedule state."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid: Optional[Tuple[int, int]] = None, rope: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None, grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, dim); ``grid``, ``rope``, ``token_mask``, ``grid_sizes``: this call's, passed down by the
        model (see :mod:`castle_convert.attention.base`)."""
        self._check_mask(attn_mask, is_causal)
        q, k, v, v_tokens = self._qkv(x, rope)                              # (B, h, N, d)
        out = self._pattern(q, k, v, grid, token_mask, grid_sizes)          # (B, N, C)
        dw = self._dw(v_tokens, grid, token_mask, grid_sizes)
        return self._output(x, out if dw is None else out + dw)


class LocalGlobalAttention(CastlingTrainingForm, _LocalGlobalParts):
    """Training form: the annealed masked softmax (see the module docstring); at gate 0 the inference form."""

    def __init__(self, spec: SoftmaxAttentionSpec, config: CastlingConfig):
        super().__init__()
        C = spec.num_heads * spec.head_dim
        self._init_parts(
            dim=spec.dim, num_heads=spec.num_heads, head_dim=spec.head_dim, scale=spec.scale,
            num_prefix_tokens=spec.num_prefix_tokens, qkv=spec.qkv, proj=spec.proj, q_norm=spec.q_norm,
            k_norm=spec.k_norm, out_norm=spec.out_norm, out_gate=spec.out_gate,
            dw=build_dw(config.dw, config.dw_kernel, C, spec.num_heads, spec.num_prefix_tokens, like=spec.qkv.weight),
            proj_drop=spec.proj_drop, eps=config.eps, block=config.block, halo=config.halo, pool=config.pool,
            topk=config.topk, exact_tokens=config.exact_tokens, rope_half=spec.rope_half)
        self.attn_drop = nn.Dropout(spec.attn_drop)
        self.set_schedule(config.gate, config.threshold)
        self.last_mask_density: Optional[torch.Tensor] = None
        self.compute_transfer = False
        self.last_transfer_loss: Optional[torch.Tensor] = None
        self._calib = None                       # nothing to calibrate: the pattern starts from the teacher's q/k/v

    @classmethod
    def from_pretrained_attention(cls, spec: SoftmaxAttentionSpec, config: CastlingConfig) -> "LocalGlobalAttention":
        return cls(spec, config)

    @classmethod
    def config_problem(cls, config) -> Optional[tuple[str, str]]:
        if config.combine != "blend":
            return "combine", ("local_global has one softmax over exact and pooled keys (nothing to sum into); "
                               "use combine: blend")
        if config.aux != "student":
            return "aux", ("local_global anneals the mask of its own softmax (at gate 1 it is the teacher's); "
                           "use aux: student")
        return None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gate={self.aux_gate:g}, threshold={self.threshold:g}"

    def start_calibration(self) -> None:
        """Nothing to calibrate (the kind adds no scale): a no-op for :func:`castle_convert.convert.calibrate`."""

    def finish_calibration(self) -> None:
        self._calib = None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid: Optional[Tuple[int, int]] = None, rope: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None, grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_mask(attn_mask, is_causal)
        g = self.aux_gate
        q, k, v, v_tokens = self._qkv(x, rope)                              # (B, h, N, d), q/k rotated
        self._note_training(g)
        if g > 0.0:
            out = merge_heads(self._annealed(q, k, v, grid, token_mask, grid_sizes, g))   # (B, N, C)
        else:
            out = self._pattern(q, k, v, grid, token_mask, grid_sizes)     # (B, N, C)
            self.last_mask_density = None
        dw = self._dw(v_tokens, grid, token_mask, grid_sizes)
        if dw is not None:
            out = out + (1.0 - g) * dw if g > 0.0 else out + dw
        if self.compute_transfer:
            self._record_transfer(q, k, v, out, None, token_mask)
        return self._output(x, out)

    def _annealed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, token_mask, grid_sizes,
                  g: float) -> torch.Tensor:
        """The masked softmax at gate g > 0 (B, h, N, d): dense (training only). Keys of the pattern and keys whose
        attention weight a satisfies ``a·g·N ≥ τ`` are exact, the others pooled; records ``last_mask_density``
        (the fraction of exact query-key pairs among real ones)."""
        B, h, N, d = q.shape
        P = self.num_prefix_tokens
        dev = q.device
        real = torch.ones(B, N, dtype=torch.bool, device=dev) if token_mask is None else token_mask.to(torch.bool)
        if grid_sizes is None:
            grid_sizes = torch.tensor([resolve_grid(N - P, grid)], device=dev).expand(B, 2)
        S, onehot = pattern_masks(P, N, grid_sizes.to(dev), real, self.block, self.halo, self.pool)
        neg = torch.finfo(q.dtype).min
        logits = (q * self.scale) @ k.transpose(-2, -1)                     # (B, h, N, N)
        logits = logits.masked_fill(~real[:, None, None, :], neg)
        pair = real[:, None, :, None] & real[:, None, None, :]              # (B, 1, N, N) real query-key pairs
        if self.threshold > 0.0:
            with torch.no_grad():
                keep = S[:, None].expand(B, h, N, N)                        # the pattern ...
                if P and self.topk:                                         # ... with the CLS row's top-k keys
                    M = N - P
                    top = logits[:, :, 0, P:].masked_fill(~onehot.any(1)[:, None], neg).topk(min(self.topk, M), -1)
                    cols = torch.zeros(B, h, N, dtype=torch.bool, device=dev).scatter_(2, top.indices + P, True)
                    keep = keep | (cols[:, :, None, :] & real[:, None, None, :])
                a = logits.float().softmax(-1)                              # (B, h, N, N)
                n = real.sum(-1).view(B, 1, 1, 1).to(a.dtype)
                keep = keep | (a * (g * n) >= self.threshold)               # ... and what the mask still keeps
                keep = keep | (n <= self.exact_tokens)                      # small images: plain softmax
        else:
            keep = real[:, None, None, :].expand(B, h, N, N)                # τ = 0: every key exact
        keep = keep & real[:, None, None, :]
        self.last_mask_density = ((keep & pair).sum().float() / (pair.sum() * h).clamp_min(1)).detach()
        onehot = onehot.to(q.dtype)                                         # (B, R, M)
        count = onehot.sum(-1)                                              # (B, R)
        mean = (onehot / count.clamp_min(1).unsqueeze(-1)).unsqueeze(1)     # (B, 1, R, M)
        kg, vg = mean @ k[:, :, P:], mean @ v[:, :, P:]                     # (B, h, R, d)
        rest = count[:, None, None, :] - keep[..., P:].to(q.dtype) @ onehot.transpose(-2, -1).unsqueeze(1)  # (B,h,N,R)
        lg = ((q * self.scale) @ kg.transpose(-2, -1) + rest.clamp_min(1).log()).masked_fill(rest < 0.5, neg)
        full = torch.cat([logits.masked_fill(~keep, neg), lg], -1)          # (B, h, N, N + R)
        a = full.float().softmax(-1).to(v.dtype) if full.dtype != torch.float32 else full.softmax(-1)
        a = self.attn_drop(a)
        return a[..., :N] @ v + a[..., N:] @ vg                             # (B, h, N, d)

    def to_inference(self) -> LocalGlobalAttentionInference:
        inf = LocalGlobalAttentionInference()
        inf._init_parts(
            dim=self.dim, num_heads=self.num_heads, head_dim=self.head_dim, scale=self.scale,
            num_prefix_tokens=self.num_prefix_tokens, qkv=self.qkv, proj=self.proj, q_norm=self.q_norm,
            k_norm=self.k_norm, out_norm=self.norm, out_gate=self.out_gate, dw=self.dw, proj_drop=self.proj_drop.p,
            eps=self.eps, block=self.block, halo=self.halo, pool=self.pool, topk=self.topk,
            exact_tokens=self.exact_tokens, rope_half=self.rope_half)
        return inf.train(self.training)
