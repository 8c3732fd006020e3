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


def token_counts(token_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Real tokens per image, (B, 1, 1, 1), of a key-padding mask ``token_mask`` (B, N) (True/1 = a real token)."""
    return token_mask.to(dtype).sum(-1).view(-1, 1, 1, 1)


def key_weights(token_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A key-padding mask (B, N) as (B, 1, N, 1) weights: 1 for real tokens, 0 for padding."""
    return token_mask.to(dtype)[:, None, :, None]


def angular_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float,
                   extra: Optional[torch.Tensor] = None, ref_tokens: int = 0,
                   token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """normalize(½·V + (r/π)·Q̂(K̂ᵀV) [+ extra]) per token per head, r = :func:`global_scale`.
    q, k, v: (B, h, N, d).

    Computed on ``V/√N`` (normalize removes the factor; it keeps K̂ᵀV inside the fp16 range at
    high token counts). ``extra`` (B, h, N, d) is added before the normalisation unscaled.
    ``token_mask`` (B, N), True/1 = a real token: padding keys contribute nothing to K̂ᵀV, and r
    counts each image's real tokens, so a padded image gets the output it gets alone.
    """
    N = v.shape[-2]
    c = N ** -0.5                                                     # 1/√N, removed by normalize
    vs = v * c                                                        # (B, h, N, d)
    qh = F.normalize(q, dim=-1, eps=eps)                              # (B, h, N, d)
    kh = F.normalize(k, dim=-1, eps=eps)                              # (B, h, N, d)
    if token_mask is None:
        kv = kh.transpose(-2, -1) @ vs                                # (B, h, d, d)
        la = torch.baddbmm(vs.flatten(0, 1), qh.flatten(0, 1), kv.flatten(0, 1),
                           beta=0.5, alpha=INV_PI * global_scale(N, ref_tokens)).view_as(vs)   # (B, h, N, d)
    else:
        kv = (kh * key_weights(token_mask, kh.dtype)).transpose(-2, -1) @ vs      # (B, h, d, d), real keys only
        r = float(ref_tokens) / token_counts(token_mask, vs.dtype) if ref_tokens != 0 \
            else torch.ones(1, 1, 1, 1, dtype=vs.dtype, device=vs.device)     # (B, 1, 1, 1)
        la = 0.5 * vs + (INV_PI * r) * (qh @ kv)                      # (B, h, N, d)
    if extra is not None:
        la = la + extra * c
    return F.normalize(la, dim=-1, eps=eps)                           # (B, h, N, d)


def linear_angular_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor,
                         eps: float, dw: Optional[torch.Tensor] = None, ref_tokens: int = 0,
                         token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The inference form's attention: ``merge(γ·normalize(LA)) + DW``, in few memory passes.

    q, k, v: (B, h, N, d) views of the fused qkv projection (any strides), gamma: (h,),
    dw: (B, N, h·d) or None. Returns (B, N, h·d). Equal to ``merge_heads(γ·angular_linear(q, k, v))
    + dw`` (with the same ``ref_tokens``) up to rounding; written for eager speed and for
    ``torch.compile`` to fuse:

    * normalize(LA) is invariant to a per-token scale, so Q̂ is never materialised: with
      ``T = Q (K̂ᵀV)`` (two small GEMMs, matmul order Q(KᵀV)), ``LA ∝ V + (2/π)·T/‖q‖`` is one
      fused multiply-add over the (B, N, h, d) layout V already has.
    * γ/‖LA‖, the DW term and the head merge are one more pass (an add whose first operand is in
      token layout, so the result is too), so merging heads needs no copy. Plain mul / div / add, not
      ``addcdiv``: every exporter has them (the TorchScript ONNX exporter has no ``aten::addcdiv``), and in
      fp32 ``a + t / q`` rounds exactly as ``addcdiv(a, t, q)`` does.
    * In half precision (fp16/bf16) K̂ and the ½V term carry the 1/√N factor of
      :func:`angular_linear` to keep K̂ᵀV in range; fp32 needs no rescaling.
    * ``token_mask`` (B, N), True/1 = a real token: as in :func:`angular_linear`.
    """
    B, h, N, d = v.shape
    half = v.dtype == torch.float16 or v.dtype == torch.bfloat16
    c = N ** -0.5 if half else 1.0                        # la below is (2/√N)·LA / c
    # Divisions, not reciprocal products: 1/eps overflows fp16, and 0·inf would be NaN.
    k_den = torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(eps) / c    # (B, h, N, 1)
    q_den = torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(eps)        # (B, h, N, 1)
    if token_mask is None:
        kv = (k / k_den).transpose(-2, -1) @ v                                      # (B, h, d, d)
        q_den = q_den * (0.5 * math.pi / global_scale(N, ref_tokens))
    else:                                       # padding keys contribute nothing; r = N_ref / (real tokens)
        kv = (k / k_den * key_weights(token_mask, k.dtype)).transpose(-2, -1) @ v   # (B, h, d, d)
        if ref_tokens != 0:
            q_den = q_den * (0.5 * math.pi / float(ref_tokens)) * token_counts(token_mask, q_den.dtype)
        else:
            q_den = q_den * (0.5 * math.pi)
    t = q @ kv                                                                      # (B, h, N, d)
    # la = c·(V + (2r/π)·Q̂K̂ᵀV) = (2c√N)·LA, laid out like v: (B, N, h, d) in memory
    la = (v * c if half else v) + t / q_den                                          # (B, h, N, d)
    # the same eps as F.normalize(LA): ‖LA‖ ≥ eps  ⇔  ‖la‖ ≥ 2c√N·eps
    la_norm = torch.linalg.vector_norm(la, dim=-1, keepdim=True).clamp_min(2.0 * c * N ** 0.5 * eps)
    den = la_norm / gamma.view(1, h, 1, 1).to(la.dtype)                             # (B, h, N, 1)
    if dw is None:
        out = (la / den).transpose(1, 2)                                            # (B, N, h, d)
        return out.reshape(B, N, h * d)
    out = dw.view(B, N, h, d).transpose(1, 2) + la / den                            # (B, h, N, d), token layout
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


def padded_grid_dw(v: torch.Tensor, weight: torch.Tensor, num_prefix_tokens: int, grid_sizes: torch.Tensor,
                   token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """2-D depthwise conv over each image's own patch grid in a padded batch of differently sized images
    (NaFlex); prefix tokens and padding get 0. v: (B, N, C), weight (C, 1, k, k), grid_sizes (B, 2) =
    (rows, cols) of each image, whose patch tokens follow the prefix row-major; token_mask (B, N).

    One gather per kernel tap: token (y, x) of image b reads its neighbour (y + dy, x + dx) at
    position ``(y + dy)·cols_b + x + dx`` when that lies inside the image — zero padding at each
    image's own border, so every image gets the conv it gets alone. Static shapes, no N×N tensor.
    """
    B, N, C = v.shape
    P = num_prefix_tokens
    M = N - P
    x = v[:, P:]                                                      # (B, M, C)
    if token_mask is not None:
        x = x * token_mask[:, P:, None].to(x.dtype)                   # padding never enters the conv
    rows, cols = grid_sizes[:, 0:1], grid_sizes[:, 1:2]               # (B, 1) each
    pos = torch.arange(M, device=v.device).unsqueeze(0)               # (1, M)
    y, xx = pos // cols, pos % cols                                   # (B, M) row, col of each token
    inside = pos < rows * cols                                        # (B, M) a patch of its image
    k = weight.shape[-1]
    r = k // 2
    w = weight.reshape(C, k * k).to(x.dtype)                          # (C, k·k)
    out = torch.zeros_like(x)                                         # (B, M, C)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ny, nx = y + dy, xx + dx                                  # (B, M)
            ok = inside & (ny >= 0) & (ny < rows) & (nx >= 0) & (nx < cols)
            idx = (ny * cols + nx).clamp(0, M - 1)                    # (B, M) neighbour position
            nb = x.gather(1, idx.unsqueeze(-1).expand(B, M, C))       # (B, M, C)
            out = out + nb * ok.unsqueeze(-1).to(x.dtype) * w[:, (dy + r) * k + dx + r]
    return F.pad(out, (0, 0, P, 0))                                   # (B, N, C), prefix rows = 0


def apply_rope(x: torch.Tensor, rope: torch.Tensor, half: bool, num_prefix_tokens: int) -> torch.Tensor:
    """Rotary position embedding of the patch tokens of ``x`` (B, h, N, d); the prefix tokens stay as they are.

    ``rope`` (..., N - prefix, 2d) is ``[sin | cos]`` (timm's concatenated layout), broadcast over batch and
    heads; ``half``: rotate the two halves of each head (``[-x₂, x₁]``), else interleaved pairs
    (``[-x₁, x₀, -x₃, x₂, …]``). The same arithmetic as timm's ``apply_rot_embed_cat`` and transformers'
    ``apply_rotary_pos_emb``. A rotation keeps each vector's norm, so the angular kernel of the linear
    form works on the rotated q̂, k̂ unchanged and K̂ᵀV stays one d×d sum.
    """
    P = num_prefix_tokens
    sin, cos = rope.chunk(2, -1)                                      # (..., M, d) each
    xp = x[:, :, P:]                                                  # (B, h, M, d)
    if half:
        x1, x2 = xp.chunk(2, -1)
        turned = torch.cat([-x2, x1], -1)                             # (B, h, M, d)
    else:
        turned = torch.stack([-xp[..., 1::2], xp[..., ::2]], -1).reshape(xp.shape)
    rotated = (xp * cos + turned * sin).to(x.dtype)                   # (B, h, M, d)
    if P == 0:
        return rotated
    return torch.cat([x[:, :, :P], rotated], dim=2)                   # (B, h, N, d)


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
                      relu_gain: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Separable self-attention (MobileViTv2) per head, O(N·d), nothing N×N.

    ``c = Σ_j softmax_j(scores)·v_j`` is one context vector per head; every token gets
    ``c ⊙ (a + b ⊙ ReLU(v_i))``. scores: (B, h, N); v: (B, h, N, d); a = context_gain and
    b = relu_gain: (h, d). Returns (B, h, N, d). The softmax over the N scores runs in fp32.
    ``token_mask`` (B, N), True/1 = a real token: padding gets no weight in the context vector.
    """
    s = scores.float()                                                 # (B, h, N)
    if token_mask is not None:
        s = s.masked_fill(~token_mask.to(torch.bool).unsqueeze(1), -3.4028234663852886e38)   # fp32 min: no NaN
    s = s.softmax(dim=-1).to(v.dtype).unsqueeze(-2)                    # (B, h, 1, N)
    c = s @ v                                                          # (B, h, 1, d)
    return c * (context_gain.unsqueeze(1) + relu_gain.unsqueeze(1) * F.relu(v))  # (B, h, N, d)
