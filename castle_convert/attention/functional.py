"""Tensor-only kernels of the attention kinds' inference math.

This file imports nothing but torch (and math): it is copied verbatim into every published
output directory, next to the Hugging Face remote-code files, so a checkpoint loaded with
``trust_remote_code=True`` runs exactly the code the converted model ran here. Keep it that way.
"""

import math
from typing import Dict, List, Optional, Tuple

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


# -- local-global softmax: exact softmax over a sparse key pattern at linear cost ----------------------------
#
# Each patch query i attends, in ONE softmax, to
#   * the prefix tokens (CLS, distillation, registers): exact;
#   * the keys of a local window: the query's b×b block of the patch grid widened by ``halo`` on each side
#     ((b + 2·halo)² keys; every query of a block shares its window): exact;
#   * G×G pooled regions of the patch grid (rows split as floor(y·G/H), columns likewise): each region is one key,
#     the mean of its keys and values, whose logit gets + log(number of the region's keys outside the window).
#     That is the region's softmax mass if its keys were all equal to their mean (Σ_j e^{q·k_j} ≈ n·e^{q·k̄}), so
#     exact, pooled and window terms share one normaliser, and no key is counted twice.
#   * optionally the T patch tokens the first prefix token (CLS) attends to most (per head): exact for every query.
# Prefix queries attend to every key exactly (P·N: linear). For a fixed block, halo, G and T the cost is
# O(N·((b+2·halo)² + P + T + G²)·d) and no tensor is N×N. At or below ``exact_tokens`` tokens (where exact softmax
# is both cheaper and closer to the teacher) the layer computes plain softmax attention instead.

def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _neg(dtype: torch.dtype) -> float:
    """The most negative finite value of ``dtype`` (a masked logit: exp() of it is 0, never NaN)."""
    if dtype == torch.float16:
        return -65504.0
    if dtype == torch.bfloat16:
        return -3.3895313892515355e38
    return -3.4028234663852886e38


def lg_region_bounds(n: torch.Tensor, G: torch.Tensor, slots: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """First and last row of each of ``slots`` regions when ``n`` rows are split into ``G`` regions as
    floor(y·G/n); n, G (..., 1) integer tensors; returns (..., slots) each (empty where g ≥ G: hi < lo)."""
    g = torch.arange(slots, device=n.device)
    lo = (g * n + G - 1) // G
    hi = torch.where(g < G, ((g + 1) * n + G - 1) // G - 1, lo - 1)
    return lo, hi


def _lg_axis(n: int, Gn: int, nbl: int, block: int, halo: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Along one axis of n rows split into Gn regions: each region's size (Gn,) and its overlap with the rows of each
    of the nbl blocks' windows (nbl, Gn)."""
    lo, hi = lg_region_bounds(torch.full((1,), n, device=device), torch.full((1,), Gn, device=device), Gn)
    i = torch.arange(nbl, device=device)
    w0 = (i * block - halo).clamp_min(0)
    w1 = (i * block + block - 1 + halo).clamp_max(n - 1)                                      # (nbl,)
    ov = (torch.minimum(hi.unsqueeze(0), w1.unsqueeze(1)) - torch.maximum(lo.unsqueeze(0), w0.unsqueeze(1))
          + 1).clamp_min(0)                                                                  # (nbl, Gn)
    return hi - lo + 1, ov


def _lg_layout(H: int, W: int, block: int, pool: int, traced: bool) -> Tuple[int, int, int, int]:
    """(block rows, block cols, region rows, region cols) of an H×W grid. Traced (torch.export / torch.compile):
    the sizes never depend on comparisons of H and W with the block or pool size — one more block whenever the
    grid divides evenly, and pool×pool regions however small the grid (the empty ones are masked out): same result,
    and the graph stays dynamic in H and W."""
    if traced:
        return H // block + 1, W // block + 1, pool, pool
    return _cdiv(H, block), _cdiv(W, block), min(pool, H), min(pool, W)


def lg_rest_counts(hw: Tuple[int, int], block: int, halo: int, pool: int, device: torch.device,
                   traced: bool = False) -> torch.Tensor:
    """(nb, Gh·Gw): how many patch keys of each pooled region lie outside each block's window (uniform grid)."""
    H, W = hw
    nbh, nbw, Gh, Gw = _lg_layout(H, W, block, pool, traced)
    cy, oy = _lg_axis(H, Gh, nbh, block, halo, device)
    cx, ox = _lg_axis(W, Gw, nbw, block, halo, device)
    rest = cy.view(1, 1, Gh, 1) * cx.view(1, 1, 1, Gw) - oy.view(nbh, 1, Gh, 1) * ox.view(1, nbw, 1, Gw)
    return rest.reshape(nbh * nbw, Gh * Gw)                                                  # (nb, R)


def _lg_softmax(logits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim in fp32 for half-precision inputs, returned in ``like``'s dtype."""
    if logits.dtype == torch.float16 or logits.dtype == torch.bfloat16:
        return logits.float().softmax(-1).to(like.dtype)
    return logits.softmax(-1)


def _lg_geometry(hw: Tuple[int, int], block: int, halo: int, pool: int, num_prefix_tokens: int,
                 device: torch.device, dtype: torch.dtype, traced: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logit offsets of a uniform grid: (nb, 1, w²) for the window keys (0, or a large negative number where the
    window reaches past the grid) and (nb, 1, P + R) for the global keys (0 for prefix keys, log of each region's
    keys outside the block's window, a large negative number where none is left)."""
    H, W = hw
    neg = _neg(dtype)
    nbh, nbw, _, _ = _lg_layout(H, W, block, pool, traced)
    w = block + 2 * halo
    off = torch.arange(w, device=device)
    ys = (torch.arange(nbh, device=device) * block - halo).view(-1, 1, 1, 1) + off.view(1, 1, -1, 1)
    xs = (torch.arange(nbw, device=device) * block - halo).view(1, -1, 1, 1) + off.view(1, 1, 1, -1)
    inside = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)                                     # (nbh, nbw, w, w)
    wbias = torch.zeros(inside.shape, device=device, dtype=dtype).masked_fill(~inside, neg)
    rest = F.pad(lg_rest_counts(hw, block, halo, pool, device, traced).to(dtype), (num_prefix_tokens, 0), value=1.0)
    gbias = rest.clamp_min(1.0).log().masked_fill(rest < 0.5, neg)                           # (nb, P + R)
    return wbias.reshape(nbh * nbw, 1, w * w), gbias.unsqueeze(1)


_LG_GEOMETRY: Dict[Tuple[int, int, int, int, int, int, str, str], Tuple[torch.Tensor, torch.Tensor]] = {}


@torch.jit.unused
def _lg_geometry_cached(hw: Tuple[int, int], block: int, halo: int, pool: int, P: int, device: torch.device,
                        dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_lg_geometry`, remembered per concrete grid (eager calls only: traced and compiled calls compute it in
    their graph)."""
    if not (isinstance(hw[0], int) and isinstance(hw[1], int)) or torch.compiler.is_compiling() \
            or torch.jit.is_tracing():
        return _lg_geometry(hw, block, halo, pool, P, device, dtype)
    key = (hw[0], hw[1], block, halo, pool, P, str(device), str(dtype))
    got = _LG_GEOMETRY.get(key)
    if got is None:
        if len(_LG_GEOMETRY) > 64:
            _LG_GEOMETRY.clear()
        got = _LG_GEOMETRY[key] = _lg_geometry(hw, block, halo, pool, P, device, dtype)
    return got


def _prefix_rows(qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, P: int,
                 real: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The prefix queries' exact attention over every (real) key: output (B, h, P, d) and logits (B, h, P, N)."""
    lp = torch.matmul(qs[:, :, :P], k.transpose(-2, -1))                                     # (B, h, P, N)
    if real is not None:
        lp = lp.masked_fill(~real[:, None, None, :], _neg(lp.dtype))
    return torch.matmul(_lg_softmax(lp, v), v), lp


def _top_tokens(cls_logits: torch.Tensor, topk: int) -> torch.Tensor:
    """(B, h, T) indices of the patch keys with the largest CLS logits (T = min(topk, M)), per head."""
    return cls_logits.topk(min(topk, cls_logits.shape[-1]), dim=-1).indices


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, h, M, d), idx (B, h, T) -> (B, h, T, d)."""
    return x.gather(2, idx.unsqueeze(-1).expand(idx.shape[0], idx.shape[1], idx.shape[2], x.shape[-1]))


def _eager_inference(t: torch.Tensor) -> bool:
    """Whether out= buffers may be used: eager, no autograd through ``t``."""
    if torch.jit.is_scripting():
        return False
    return not torch.compiler.is_compiling() and not torch.jit.is_tracing() \
        and not (t.requires_grad and torch.is_grad_enabled())


def _symbolic(n: int) -> bool:
    """Whether ``n`` is a traced size (torch.export / torch.compile with dynamic shapes), not a number."""
    return isinstance(n, torch.SymInt)


@torch.jit.unused
def _exact_or_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, num_prefix_tokens: int,
                      grid: Optional[Tuple[int, int]], block: int, halo: int, pool: int, topk: int,
                      exact_tokens: int) -> torch.Tensor:
    """``N <= exact_tokens`` decided in the graph (``torch.cond``): plain softmax attention, or the pattern."""
    def exact(q, k, v):                               # (a branch may not return a view of its inputs: clones)
        return merge_heads(F.scaled_dot_product_attention(q, k, v, scale=scale)).clone()

    def pattern(q, k, v):
        return local_global_attention(q, k, v, scale, num_prefix_tokens, grid, block, halo, pool, topk, 0).clone()

    return torch.cond(q.shape[2] <= exact_tokens, exact, pattern, (q.contiguous(), k.contiguous(), v.contiguous()))


def local_global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, num_prefix_tokens: int,
                           grid: Optional[Tuple[int, int]], block: int, halo: int, pool: int, topk: int = 0,
                           exact_tokens: int = 0, token_mask: Optional[torch.Tensor] = None,
                           grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local-global softmax attention (see the comment above). q, k, v: (B, h, N, d) after q/k norms and RoPE (any
    strides, e.g. views of the fused projection); ``grid``: the patch grid (rows, cols) of the N − P patch tokens;
    ``topk``: the T patch tokens with the largest attention logits of the first prefix token (CLS), per head, are
    exact global keys for every query (where they are not already in its window; their regions count them out);
    an image of at most ``exact_tokens`` (real) tokens gets plain softmax attention. Returns the merged heads
    (B, N, h·d).

    Uniform grid: q, k, v are copied once into a (B, rows, cols, 3, h, d) buffer; the queries of each b×b block and
    the keys and values of its window are views/copies of it; window and global logits share one softmax. A padded
    batch of differently sized images (``token_mask`` (B, N), True/1 = real; ``grid_sizes`` (B, 2)) takes
    :func:`local_global_padded`: each image's window and regions on its own grid, padding never a key.
    """
    B, h, N, d = q.shape
    if token_mask is not None or grid_sizes is not None:
        out = local_global_padded(q, k, v, scale, num_prefix_tokens, grid, block, halo, pool, topk, token_mask,
                                  grid_sizes)                                                # (B, h, N, d)
        if exact_tokens > 0:                        # per image: its real token count decides, not the padding
            real = torch.ones(B, N, dtype=torch.bool, device=q.device)
            if token_mask is not None:
                real = token_mask.to(torch.bool)
            exact = F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :], scale=scale)
            out = torch.where((real.sum(-1) <= exact_tokens).view(B, 1, 1, 1), exact, out)
        return merge_heads(out)
    if exact_tokens > 0 and not torch.jit.is_scripting() and _symbolic(N):
        # torch.export / torch.compile with a dynamic token count: both forms in the graph, chosen per call
        # (an ONNX If) — never the one the example input took
        return _exact_or_pattern(q, k, v, scale, num_prefix_tokens, grid, block, halo, pool, topk, exact_tokens)
    if N <= exact_tokens:                           # exact softmax is cheaper here, and is the teacher's form
        return merge_heads(F.scaled_dot_product_attention(q, k, v, scale=scale))
    P = num_prefix_tokens
    H, W = resolve_grid(N - P, grid)
    b, r = block, halo
    eager = _eager_inference(q)
    traced = not eager and not torch.jit.is_scripting()       # torch.export / compile / jit.trace / autograd
    nbh, nbw, Gh, Gw = _lg_layout(H, W, b, pool, traced)
    nb, bb, w = nbh * nbw, b * b, b + 2 * halo
    half = q.dtype == torch.float16 or q.dtype == torch.bfloat16
    ft = torch.float32 if half else q.dtype
    neg = _neg(ft)
    if not eager:
        wbias, gbias = _lg_geometry((H, W), b, r, pool, P, q.device, ft, traced)             # (nb, 1, w²), (nb, 1, P + R)
    else:
        wbias, gbias = _lg_geometry_cached((H, W), b, r, pool, P, q.device, ft)
    # one copy of the patch tokens' q, k, v into a (B, rows, cols, 3, h, d) buffer: halo rows/cols around, blocks
    # completed at the end (only those margins are zeroed)
    Hb, Wb = nbh * b + 2 * r, nbw * b + 2 * r
    if not traced:                                  # one copy into the buffer, only its margins zeroed
        buf = q.new_empty(B, Hb, Wb, 3, h, d)
        if Hb > H or Wb > W:
            buf[:, :r].zero_()
            buf[:, r + H:].zero_()
            buf[:, :, :r].zero_()
            buf[:, :, r + W:].zero_()
        inner = buf[:, r:r + H, r:r + W]                                                     # (B, H, W, 3, h, d)
        inner[:, :, :, 0].copy_(q[:, :, P:].transpose(1, 2).reshape(B, H, W, h, d))
        inner[:, :, :, 1].copy_(k[:, :, P:].transpose(1, 2).reshape(B, H, W, h, d))
        inner[:, :, :, 2].copy_(v[:, :, P:].transpose(1, 2).reshape(B, H, W, h, d))
    else:                                           # traced / compiled / autograd: no branch on the sizes (exported
        inner = torch.stack([t[:, :, P:].transpose(1, 2).reshape(B, H, W, h, d) for t in (q, k, v)], 3)  # graphs
        buf = F.pad(inner, (0, 0, 0, 0, 0, 0, r, Wb - W - r, r, Hb - H - r))                # stay dynamic in H, W)
    qb = buf[:, r:r + nbh * b, r:r + nbw * b, 0].reshape(B, nbh, b, nbw, b, h, d).permute(0, 5, 1, 3, 2, 4, 6)
    if eager:                                       # scaled and laid out in one pass
        qb = torch.mul(qb, scale, out=q.new_empty(B, h, nbh, nbw, b, b, d)).view(B * h * nb, bb, d)
    else:
        qb = (qb * scale).reshape(B * h * nb, bb, d)                                         # (B·h·nb, b², d)
    if r == 0:
        kv = buf[:, :, :, 1:].reshape(B, nbh, b, nbw, b, 2, h, d).permute(5, 0, 6, 1, 3, 2, 4, 7)
    elif not traced:
        kv = buf[:, :, :, 1:].unfold(1, w, b).unfold(2, w, b).permute(3, 0, 4, 1, 2, 6, 7, 5)   # (2, B, h, nbh, nbw, w, w, d)
    else:                                           # overlapping windows gathered by index (ONNX exporters have no
        off = torch.arange(w, device=q.device)      # unfold of a traced size)
        wy = (torch.arange(nbh, device=q.device).unsqueeze(1) * b + off).reshape(-1)        # (nbh·w,)
        wx = (torch.arange(nbw, device=q.device).unsqueeze(1) * b + off).reshape(-1)        # (nbw·w,)
        kv = buf[:, :, :, 1:].index_select(1, wy).index_select(2, wx)                         # (B, nbh·w, nbw·w, 2, h, d)
        kv = kv.reshape(B, nbh, w, nbw, w, 2, h, d).permute(5, 0, 6, 1, 3, 2, 4, 7)          # (2, B, h, nbh, nbw, w, w, d)
    kv = kv.reshape(2, B * h * nb, w * w, d)                                                 # (2, B·h·nb, w², d)
    # global keys: the prefix tokens, the top-k tokens, then the pooled regions (separable means: rows, columns)
    ry = (torch.arange(H, device=q.device) * Gh // H == torch.arange(Gh, device=q.device).unsqueeze(1)).to(q.dtype)
    rx = (torch.arange(W, device=q.device) * Gw // W == torch.arange(Gw, device=q.device).unsqueeze(1)).to(q.dtype)
    ry = ry / ry.sum(1, keepdim=True).clamp_min(1.0)                                         # (Gh, H) row means
    rx = rx / rx.sum(1, keepdim=True).clamp_min(1.0)                                         # (Gw, W) (empty: 0)
    t = torch.einsum("gy,byxchd->bgxchd", ry, inner[:, :, :, 1:])                            # (B, Gh, W, 2, h, d)
    pooled = torch.einsum("fx,bgxchd->cbhgfd", rx, t).reshape(2, B, h, Gh * Gw, d)          # (2, B, h, R, d)
    parts: List[torch.Tensor] = []
    heads = q.new_empty(B, h, 0, d)
    if P > 0:
        parts.append(torch.stack([k[:, :, :P], v[:, :, :P]]))                                # (2, B, h, P, d)
        heads, lp = _prefix_rows(q * scale, k, v, P)                                         # (B, h, P, d), (B, h, P, N)
        if topk > 0:
            idx = _top_tokens(lp[:, :, 0, P:], topk)                                         # (B, h, T)
            T = idx.shape[-1]
            parts.append(torch.stack([_gather_tokens(k[:, :, P:], idx), _gather_tokens(v[:, :, P:], idx)]))
            ty = torch.div(idx, W, rounding_mode="floor")                                    # (B, h, T)
            tx = idx - ty * W                               # (not idx % W: the ONNX exporter has no tensor % SymInt)
            i_y = torch.arange(nbh, device=q.device) * b
            i_x = torch.arange(nbw, device=q.device) * b
            in_y = (ty.unsqueeze(-1) >= i_y - r) & (ty.unsqueeze(-1) < i_y + b + r)          # (B, h, T, nbh)
            in_x = (tx.unsqueeze(-1) >= i_x - r) & (tx.unsqueeze(-1) < i_x + b + r)          # (B, h, T, nbw)
            inwin = (in_y.unsqueeze(-1) & in_x.unsqueeze(-2)).reshape(B, h, T, nb).transpose(-2, -1)   # (B, h, nb, T)
            region = (ty * Gh // H) * Gw + tx * Gw // W                                      # (B, h, T)
            onehot = (region.unsqueeze(-1) == torch.arange(Gh * Gw, device=q.device)).to(ft)   # (B, h, T, R)
            taken = torch.matmul((~inwin).to(ft), onehot)                                    # (B, h, nb, R): top keys out
            rest = lg_rest_counts((H, W), b, r, pool, q.device, traced).to(ft) - taken       # (B, h, nb, R)
            gbias = torch.cat([torch.zeros(B, h, nb, P, device=q.device, dtype=ft),
                               torch.zeros(B, h, nb, T, device=q.device, dtype=ft).masked_fill(inwin, neg),
                               rest.clamp_min(1.0).log().masked_fill(rest < 0.5, neg)], -1)
    gbias = gbias.reshape(-1, nb, 1, gbias.shape[-1])                                        # (1 | B·h, nb, 1, G)
    parts.append(pooled)
    g = torch.cat(parts, 3).reshape(2, B * h, -1, d)                                         # (2, B·h, G, d)
    G = g.shape[2]
    # window and global logits in one softmax (fp32 for half-precision inputs)
    ll = torch.bmm(qb, kv[0].transpose(1, 2))                                                # (B·h·nb, b², w²)
    lg = torch.bmm(qb.view(B * h, nb * bb, d), g[0].transpose(1, 2))                         # (B·h, nb·b², G)
    if half:
        ll, lg = ll.float(), lg.float()
    a = torch.cat([ll.view(B * h, nb, bb, w * w) + wbias, lg.view(B * h, nb, bb, G) + gbias], -1).softmax(-1)
    if half:
        a = a.to(v.dtype)                                                                    # (B·h, nb, b², w² + G)
    o = torch.bmm(a[..., :w * w].reshape(B * h * nb, bb, w * w), kv[1]).view(B * h, nb * bb, d)
    o = torch.baddbmm(o, a[..., w * w:].reshape(B * h, nb * bb, G), g[1])                    # (B·h, nb·b², d)
    o = o.view(B, h, nbh, nbw, b, b, d).permute(0, 2, 4, 3, 5, 1, 6).reshape(B, nbh * b, nbw * b, h * d)
    if not traced:
        patches = o[:, :H, :W].reshape(B, H * W, h * d)                                      # (B, M, C)
    else:                                           # a copy whatever the sizes: no stride decision to guard on
        patches = o.narrow(1, 0, H).narrow(2, 0, W).clone(memory_format=torch.contiguous_format).view(B, H * W, h * d)
    if P == 0:
        return patches
    return torch.cat([merge_heads(heads), patches], 1)                                       # (B, N, C)


def local_global_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, num_prefix_tokens: int,
                        grid: Optional[Tuple[int, int]], block: int, halo: int, pool: int, topk: int = 0,
                        token_mask: Optional[torch.Tensor] = None,
                        grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`local_global_attention` for a padded batch: image b's patch tokens are the first rows_b·cols_b after
    the prefix, row-major on its own grid ``grid_sizes[b]`` (default: ``grid`` for every image), the rest padding
    (``token_mask`` (B, N), True/1 = real). Each query gathers its own window's keys (tensor-only, no N×N); the
    result for each image equals that image's alone. Returns (B, h, N, d)."""
    B, h, N, d = q.shape
    P = num_prefix_tokens
    M = N - P
    dev = q.device
    neg = _neg(q.dtype)
    if grid_sizes is None:
        rows_cols = resolve_grid(M, grid)
        grid_sizes = torch.tensor([rows_cols[0], rows_cols[1]], device=dev).view(1, 2).expand(B, 2)
    grid_sizes = grid_sizes.to(dev)
    real = torch.ones(B, N, dtype=torch.bool, device=dev)
    if token_mask is not None:
        real = token_mask.to(torch.bool)
    rows, cols = grid_sizes[:, 0:1].long(), grid_sizes[:, 1:2].long()       # (B, 1)
    pos = torch.arange(M, device=dev).unsqueeze(0)                            # (1, M)
    y, x = pos // cols, pos % cols                                            # (B, M)
    inside = (pos < rows * cols) & real[:, P:]                                # (B, M) a real patch of its image
    qs = q * scale
    outs: List[torch.Tensor] = []
    kp, vp = k[:, :, P:], v[:, :, P:]                                         # (B, h, M, d)
    # the window of each query: (b + 2·halo)² positions around its block, row-major
    w = block + 2 * halo
    off = torch.arange(w, device=dev)
    ky = ((y // block) * block - halo).unsqueeze(-1) + off                    # (B, M, w)
    kx = ((x // block) * block - halo).unsqueeze(-1) + off
    ok = ((ky >= 0) & (ky < rows.unsqueeze(-1))).unsqueeze(-1) & ((kx >= 0) & (kx < cols.unsqueeze(-1))).unsqueeze(-2)
    idx = (ky.unsqueeze(-1) * cols.view(B, 1, 1, 1) + kx.unsqueeze(-2)).clamp(0, M - 1).reshape(B, M, w * w)
    bidx = torch.arange(B, device=dev).view(B, 1, 1)
    ok = ok.reshape(B, M, w * w) & real[:, P:][bidx, idx]                     # (B, M, w²) a real key of the image
    kw = kp.transpose(1, 2)[bidx, idx].permute(0, 3, 1, 2, 4)                 # (B, h, M, w², d)
    vw = vp.transpose(1, 2)[bidx, idx].permute(0, 3, 1, 2, 4)
    l_loc = torch.einsum("bhmd,bhmwd->bhmw", qs[:, :, P:], kw).masked_fill(~ok[:, None], neg)   # (B, h, M, w²)
    # pooled regions on each image's own grid: G×G slots, region (gy, gx) valid when gy < min(G, rows) etc.
    Gy, Gx = rows.clamp(max=pool), cols.clamp(max=pool)                       # (B, 1)
    region = (y * Gy // rows) * pool + x * Gx // cols                         # (B, M)
    R = pool * pool
    onehot = (region.unsqueeze(1) == torch.arange(R, device=dev).view(1, R, 1)) & inside.unsqueeze(1)   # (B, R, M)
    onehot = onehot.to(q.dtype)
    count = onehot.sum(-1)                                                    # (B, R)
    mean = onehot / count.clamp_min(1).unsqueeze(-1)
    lo_y, hi_y = lg_region_bounds(rows, Gy, pool)                             # (B, G) each
    lo_x, hi_x = lg_region_bounds(cols, Gx, pool)
    wy0, wy1 = ky[..., 0].clamp_min(0), torch.minimum(ky[..., -1], rows - 1)  # (B, M) the window's rows
    wx0, wx1 = kx[..., 0].clamp_min(0), torch.minimum(kx[..., -1], cols - 1)
    oy = (torch.minimum(hi_y[:, None], wy1[..., None]) - torch.maximum(lo_y[:, None], wy0[..., None]) + 1).clamp_min(0)
    ox = (torch.minimum(hi_x[:, None], wx1[..., None]) - torch.maximum(lo_x[:, None], wx0[..., None]) + 1).clamp_min(0)
    rest = (count.unsqueeze(1) - (oy.unsqueeze(-1) * ox.unsqueeze(-2)).reshape(B, M, R).to(q.dtype)).unsqueeze(1)
    gk: List[torch.Tensor] = []                                               # global keys, values, logit offsets
    gv: List[torch.Tensor] = []
    gb: List[torch.Tensor] = []
    if P > 0:
        head, lp = _prefix_rows(qs, k, v, P, real)                            # (B, h, P, d), (B, h, P, N)
        outs.append(head)
        gk.append(k[:, :, :P])
        gv.append(v[:, :, :P])
        gb.append(torch.zeros(B, 1, M, P, device=dev, dtype=q.dtype))
        if topk > 0:
            top = _top_tokens(lp[:, :, 0, P:].masked_fill(~inside[:, None], neg), topk)   # (B, h, T)
            gk.append(_gather_tokens(kp, top))
            gv.append(_gather_tokens(vp, top))
            ty, tx = top // cols.unsqueeze(-1), top % cols.unsqueeze(-1)      # (B, h, T)
            inwin = ((ty.unsqueeze(2) >= wy0[:, None, :, None]) & (ty.unsqueeze(2) <= wy1[:, None, :, None])
                     & (tx.unsqueeze(2) >= wx0[:, None, :, None]) & (tx.unsqueeze(2) <= wx1[:, None, :, None]))
            gb.append(torch.zeros(inwin.shape, device=dev, dtype=q.dtype).masked_fill(inwin, neg))   # (B, h, M, T)
            t_region = region[:, None].expand(B, h, M).gather(2, top)         # (B, h, T)
            t_onehot = (t_region.unsqueeze(-1) == torch.arange(R, device=dev)).to(q.dtype)   # (B, h, T, R)
            rest = rest - torch.matmul((~inwin).to(q.dtype), t_onehot)        # (B, h, M, R)
    gk.append(mean.unsqueeze(1) @ kp)                                         # (B, h, R, d)
    gv.append(mean.unsqueeze(1) @ vp)
    gb.append(rest.clamp_min(1).log().masked_fill(rest < 0.5, neg))
    kg, vg = torch.cat(gk, 2), torch.cat(gv, 2)                               # (B, h, G, d)
    bias = torch.cat([t.expand(B, h, M, t.shape[-1]) for t in gb], -1)        # (B, h, M, G)
    l_glob = (qs[:, :, P:] @ kg.transpose(-2, -1) + bias).masked_fill(bias < neg / 2, neg)   # (B, h, M, G)
    a = _lg_softmax(torch.cat([l_loc, l_glob], -1), v)                        # (B, h, M, w² + G)
    out = torch.einsum("bhmw,bhmwd->bhmd", a[..., :w * w], vw) + a[..., w * w:] @ vg   # (B, h, M, d)
    outs.append(out)
    return torch.cat(outs, 2) if P > 0 else outs[0]
