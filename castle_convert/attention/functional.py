"""Tensor-only kernels of the attention kinds' inference math.

This file imports nothing but torch (and math): it is copied verbatim into every published
output directory, next to the Hugging Face remote-code files, so a checkpoint loaded with
``trust_remote_code=True`` runs exactly the code the converted model ran here. Keep it that way.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

INV_PI = 1.0 / math.pi


def global_scale(num_tokens: int, ref_tokens: int) -> float:
    """Weight of the global term ``Q̂(K̂ᵀV)`` relative to ``½V``: ``ref_tokens / N``.

    The global term is a sum over the N tokens while ½V is one token's value, so with a plain sum
    their balance drifts with the token count (a student fitted at 112 px would be dominated by the
    global term at 224 px). Scaling it by ``N_ref / N`` makes it a mean times the token count the
    layer was fitted at: identical at ``N_ref``, the same balance at every other resolution.
    ``ref_tokens = 0`` keeps the plain sum (checkpoints written before this option).
    """
    if ref_tokens == 0:
        return 1.0
    return float(ref_tokens) / num_tokens


def angular_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float,
                   extra: Optional[torch.Tensor] = None, ref_tokens: int = 0) -> torch.Tensor:
    """normalize(½·V + (r/π)·Q̂(K̂ᵀV) [+ extra]) per token per head, r = :func:`global_scale`.
    q, k, v: (B, h, N, d).

    Computed on ``V/√N`` (normalize removes the factor; it keeps K̂ᵀV inside the fp16 range at
    high token counts). ``extra`` (B, h, N, d) is added before the normalisation unscaled.
    """
    N = v.shape[-2]
    c = N ** -0.5                                                     # 1/√N, removed by normalize
    vs = v * c                                                        # (B, h, N, d)
    qh = F.normalize(q, dim=-1, eps=eps)                              # (B, h, N, d)
    kh = F.normalize(k, dim=-1, eps=eps)                              # (B, h, N, d)
    kv = kh.transpose(-2, -1) @ vs                                    # (B, h, d, d)
    la = torch.baddbmm(vs.flatten(0, 1), qh.flatten(0, 1), kv.flatten(0, 1),
                       beta=0.5, alpha=INV_PI * global_scale(N, ref_tokens)).view_as(vs)   # (B, h, N, d)
    if extra is not None:
        la = la + extra * c
    return F.normalize(la, dim=-1, eps=eps)                           # (B, h, N, d)


def linear_angular_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor,
                         eps: float, dw: Optional[torch.Tensor] = None, ref_tokens: int = 0) -> torch.Tensor:
    """The inference form's attention: ``merge(γ·normalize(LA)) + DW``, in few memory passes.

    q, k, v: (B, h, N, d) views of the fused qkv projection (any strides), gamma: (h,),
    dw: (B, N, h·d) or None. Returns (B, N, h·d). Equal to ``merge_heads(γ·angular_linear(q, k, v))
    + dw`` (with the same ``ref_tokens``) up to rounding; written for eager speed and for
    ``torch.compile`` to fuse:

    * normalize(LA) is invariant to a per-token scale, so Q̂ is never materialised: with
      ``T = Q (K̂ᵀV)`` (two small GEMMs, matmul order Q(KᵀV)), ``LA ∝ V + (2/π)·T/‖q‖`` is one
      fused multiply-add over the (B, N, h, d) layout V already has.
    * γ/‖LA‖, the DW term and the head merge are one more fused pass (``addcdiv`` whose first
      operand is in token layout), so merging heads needs no copy.
    * In half precision (fp16/bf16) K̂ and the ½V term carry the 1/√N factor of
      :func:`angular_linear` to keep K̂ᵀV in range; fp32 needs no rescaling.
    """
    B, h, N, d = v.shape
    half = v.dtype == torch.float16 or v.dtype == torch.bfloat16
    c = N ** -0.5 if half else 1.0                        # la below is (2/√N)·LA / c
    # Divisions, not reciprocal products: 1/eps overflows fp16, and 0·inf would be NaN.
    k_den = torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(eps) / c    # (B, h, N, 1)
    kv = (k / k_den).transpose(-2, -1) @ v                                          # (B, h, d, d)
    t = q @ kv                                                                      # (B, h, N, d)
    q_den = torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(eps) * (0.5 * math.pi / global_scale(N, ref_tokens))
    # la = c·(V + (2r/π)·Q̂K̂ᵀV) = (2c√N)·LA, laid out like v: (B, N, h, d) in memory
    la = torch.addcdiv(v * c if half else v, t, q_den)                               # (B, h, N, d)
    # the same eps as F.normalize(LA): ‖LA‖ ≥ eps  ⇔  ‖la‖ ≥ 2c√N·eps
    la_norm = torch.linalg.vector_norm(la, dim=-1, keepdim=True).clamp_min(2.0 * c * N ** 0.5 * eps)
    den = la_norm / gamma.view(1, h, 1, 1).to(la.dtype)                             # (B, h, N, 1)
    if dw is None:
        out = (la / den).transpose(1, 2)                                            # (B, N, h, d)
        return out.reshape(B, N, h * d)
    out = torch.addcdiv(dw.view(B, N, h, d).transpose(1, 2), la, den)               # (B, h, N, d) view
    return out.transpose(1, 2).reshape(B, N, h * d)                                 # (B, N, C) view


def merge_heads(heads: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) -> (B, N, h·d)."""
    B, h, N, d = heads.shape
    return heads.transpose(1, 2).reshape(B, N, h * d)


def patch_grid_dw(v: torch.Tensor, weight: torch.Tensor, num_prefix_tokens: int,
                  hw: Tuple[int, int]) -> torch.Tensor:
    """2-D depthwise conv over the patch grid; prefix tokens get 0. v: (B, N, C), weight (C, 1, k, k)."""
    B, N, C = v.shape
    P = num_prefix_tokens
    H, W = hw
    x = v[:, P:].reshape(B, H, W, C).permute(0, 3, 1, 2)             # (B, C, H, W), channels-last
    k = weight.shape[-1]
    x = F.conv2d(x, weight, padding=k // 2, groups=C)                 # (B, C, H, W)
    x = x.permute(0, 2, 3, 1).reshape(B, H * W, C)                    # (B, H·W, C)
    return F.pad(x, (0, 0, P, 0))                                     # (B, N, C), prefix rows = 0


def token_dw(v: torch.Tensor, weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """1-D per-head conv along the token sequence. v: (B, N, C), weight (h, 1, k, 1)."""
    B, N, C = v.shape
    x = v.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)   # (B, h, N, d)
    k = weight.shape[-2]
    x = F.conv2d(x, weight, padding=(k // 2, 0), groups=num_heads)    # (B, h, N, d)
    return x.transpose(1, 2).reshape(B, N, C)                         # (B, N, C)


def patch_grid(height: int, width: int, patch_size: Tuple[int, int], pad: bool = False) -> Tuple[int, int]:
    """The patch grid (rows, cols) of a ``height``×``width`` px image: integer ops only, so traced
    shapes stay symbolic (FX, torch.export, ONNX). ``pad``: a partial border patch counts (timm
    ``dynamic_img_pad``)."""
    ph, pw = patch_size
    if pad:
        return (height + ph - 1) // ph, (width + pw - 1) // pw
    return height // ph, width // pw


def resolve_grid(num_patches: int, grid: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """The patch grid of a call with ``num_patches`` patch tokens: ``grid`` as the model's forward
    passed it (checked against the token count), else a square one.

    The check is ``torch._assert``, which FX, TorchScript and torch.export keep as a graph op (no
    Python branch on traced values). Without ``grid`` a square count is assumed to be a square
    image; any other count cannot be placed and is an error.
    """
    if grid is not None:
        torch._assert(grid[0] * grid[1] == num_patches,
                      "the patch grid passed with grid=(rows, cols) does not match the number of patch tokens")
        return grid
    side = int(math.sqrt(num_patches) + 0.5)
    if side * side != num_patches:
        raise ValueError("cannot place " + str(num_patches) + " patch tokens on a grid: they are not a square, so "
                         "pass the image's patch grid, attn(x, grid=(rows, cols)), or call the whole model")
    return side, side


def context_scores(k: torch.Tensor, query: torch.Tensor, scale: float) -> torch.Tensor:
    """Context logits of separable attention: ``scale·⟨u_h, k_j⟩``. k: (B, h, N, d), query u: (h, d).

    Returns (B, h, N): one score per token per head (a d → 1 projection of the keys).
    """
    return (k @ (query * scale).unsqueeze(-1)).squeeze(-1)             # (B, h, N)


def separable_context(scores: torch.Tensor, v: torch.Tensor, context_gain: torch.Tensor,
                      relu_gain: torch.Tensor) -> torch.Tensor:
    """Separable self-attention (MobileViTv2) per head, O(N·d), nothing N×N.

    ``c = Σ_j softmax_j(scores)·v_j`` is one context vector per head; every token gets
    ``c ⊙ (a + b ⊙ ReLU(v_i))``. scores: (B, h, N); v: (B, h, N, d); a = context_gain and
    b = relu_gain: (h, d). Returns (B, h, N, d). The softmax over the N scores runs in fp32.
    """
    s = scores.float().softmax(dim=-1).to(v.dtype).unsqueeze(-2)       # (B, h, 1, N)
    c = s @ v                                                          # (B, h, 1, d)
    return c * (context_gain.unsqueeze(1) + relu_gain.unsqueeze(1) * F.relu(v))  # (B, h, N, d)
