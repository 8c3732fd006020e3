"""Separable self-attention (MobileViTv2, arXiv 2206.02680), training and inference forms.

MobileViTv2 computes context scores with a ``d → 1`` projection and a softmax over the tokens,
``s = softmax_N(x W_I)``, sums one branch of the tokens into a single context vector
``c = Σ_j s_j·(x_j W_K)`` and multiplies it into every token: ``y_i = (ReLU(x_i W_V) ⊙ c) W_O``.
Cost O(N·d); there is no N×N matrix, batched or not.

Here, per head h of the pretrained softmax attention, with q, k, v from its projections::

    s_j   = softmax_j(scale·⟨u_h, k_j⟩)            context scores (B, h, N)
    c     = Σ_j s_j·v_j                            context vector (B, h, 1, d)
    SEP_i = c ⊙ (a_h + b_h ⊙ ReLU(v_i))            (B, h, N, d), a, b learnable per channel
    DW    = depthwise conv of V, as in linear-angular (zero-initialised)
    AUX   = (M ⊙ softmax(Q Kᵀ·scale)) V            training form only

    blend:     out = g·AUX + (1-g)·(SEP + DW)      g = 1, M = 1  →  the teacher's softmax attention
    inference: out = SEP + DW                      then out_norm, out_gate, proj

How MobileViTv2's parts map onto the pretrained attention, and the initialisation:

* The ``d → 1`` context projection is ``u_h`` applied to the pretrained keys, i.e.
  ``W_I = scale·W_kᵀ u_h`` (plus a bias that the softmax ignores). ``u_h`` is the head's **mean
  query** on the calibration batch that :func:`castle_convert.convert` runs (``gamma_init:
  calibrate``; without data, ``gamma_init: one``, the query bias ``b_q`` through ``q_norm``, or 0
  = uniform scores when the projection has no bias). So at init ``s`` is exactly the teacher's
  softmax attention row of the mean query, and ``c`` is that query's teacher output:
  ``Σ_j softmax_j(scale·q̄·k_j)·v_j`` is separable as it stands.
* MobileViTv2's summed branch (its "keys") is the pretrained **value** projection: the pretrained
  output projection expects (weighted sums of) values, and ``c`` above is exactly such a sum.
* MobileViTv2's ``ReLU(V)`` modulation uses the pretrained values through a learnable per-channel
  mix ``a + b ⊙ ReLU(v_i)``, initialised to ``a = 1, b = 0`` (identity, so the separable branch
  starts as the mean-query softmax attention); ``a = 0, b = 1`` is MobileViTv2's ``ReLU(V) ⊙ c``.
  One context vector per head means every token gets the same mixture up to the ReLU gain:
  measured on the Fashion-MNIST teacher (held-out images), the mean-query context leaves 45–68%
  of each layer's attention-output energy unexplained (the best token-independent output, fitted
  on the calibration images themselves, leaves 31–42%; fitting u to the teacher's
  query-averaged attention by maximum likelihood gave 42–64%, not worth the extra calibration
  state). The ReLU mix, the DW conv and the distillation bring back per-token detail.
* ``u``, ``a`` and ``b`` are 1-D parameters of size ``heads·head_dim`` (no weight decay, like
  norm scales) and get gradients whenever the separable branch is live (g < 1).

``combine: sum`` (the Castling-ViT reference style, AUX added inside linear-angular's
normalisation) has no counterpart here: this kind has no normalisation to add it into, and
``SEP + g·AUX`` would start at twice the teacher's output. It is rejected at config validation.

RoPE: the separable branch is position-free by construction (one context vector per head, shared by
every token), so its context scores use the keys *before* the rotation, ``⟨u_h, k_j⟩`` with ``u`` the
mean un-rotated query: rotating the keys against one shared query would only add an arbitrary
per-position preference. Position reaches the output through the DW term. The auxiliary softmax
branch (and the attention-transfer target) uses the rotated q, k exactly as the source attention
does, so gate 1 is still the teacher; the inference form needs no RoPE and keeps the folded
projection. Key-padding masks: padding gets no weight in the context vector and never enters DW.

Inference form: the query half of ``qkv`` is not needed any more. Without ``k_norm`` the context
projection is folded into the input projection: one ``Linear(dim, C + heads)`` gives the values
and the context logits (MobileViTv2's fused ``d → 1 + d`` projection), so the query and key rows
of ``qkv`` are dropped. With ``k_norm`` (qk-norm models) the keys are kept, normalised, and dotted
with ``u``. Either way the forward is tensor-only: a softmax over N scores, no N×N tensor.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from castle_convert.attention.base import (CastlingModule, CastlingTrainingForm,
                                           SoftmaxAttentionSpec)
from castle_convert.attention.dwconv import build_dw, dw_macs
from castle_convert.attention.functional import context_scores, merge_heads, separable_context
from castle_convert.config import CastlingConfig


class _SeparableParts(CastlingModule):
    """Modules and helpers shared by both forms."""

    kind_label = "separable"

    def _init_common(self, *, dim: int, num_heads: int, head_dim: int, scale: float,
                     num_prefix_tokens: int, proj: nn.Linear, out_norm: nn.Module,
                     out_gate: Optional[nn.Linear], dw: Optional[nn.Module],
                     context_gain: nn.Parameter, relu_gain: nn.Parameter, proj_drop: float,
                     eps: float) -> None:
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_prefix_tokens = num_prefix_tokens
        self.eps = eps
        self.context_gain = context_gain                                   # (C,)  a
        self.relu_gain = relu_gain                                         # (C,)  b
        self.dw = dw
        self.norm = out_norm
        self.out_gate = out_gate
        self.proj = proj
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, p: torch.Tensor) -> torch.Tensor:
        return p.view(self.num_heads, self.head_dim)                       # (C,) -> (h, d)

    def _sep(self, scores: torch.Tensor, v: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Merged separable output (B, N, C) from context logits (B, h, N) and values (B, h, N, d)."""
        return merge_heads(separable_context(scores, v, self._heads(self.context_gain),
                                             self._heads(self.relu_gain), token_mask))

    def mixing_macs(self, num_tokens: int, grid: Tuple[int, int]) -> int:
        h, d = self.num_heads, self.head_dim
        C = h * d
        in_proj = getattr(self, "in_proj", None)        # inference form: [values | logits or keys]
        delta = 0 if in_proj is None else num_tokens * in_proj.in_features * (in_proj.out_features - 3 * C)
        scores = 0 if (in_proj is not None and self.context_query is None) else num_tokens * C   # ⟨u, k_j⟩
        return delta + scores + num_tokens * C + dw_macs(self.dw, num_tokens, grid, C)  # + Σ_j s_j v_j, DW



class SeparableAttentionInference(_SeparableParts):
    """Inference form: ``proj(SEP + DW)``. A softmax over N context scores, nothing N×N.

    ``in_proj`` computes ``[values (C) | context logits (heads)]`` when the context projection is
    folded in (no ``k_norm``), else ``[values (C) | keys (C)]`` followed by ``k_norm`` and ``u``.
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid: Optional[Tuple[int, int]] = None, rope: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None, grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, dim); ``grid``, ``token_mask``, ``grid_sizes``: this call's (see
        :mod:`castle_convert.attention.base`); ``rope`` is not used (the separable branch is position-free)."""
        self._check_mask(attn_mask, is_causal)
        B, N, _ = x.shape
        h, d = self.num_heads, self.head_dim
        C = h * d
        y = self.in_proj(x)                                                # (B, N, C + h) or (B, N, 2C)
        v_tokens = y[..., :C]                                              # (B, N, C)
        v = v_tokens.reshape(B, N, h, d).transpose(1, 2)                   # (B, h, N, d)
        if self.context_query is None:                                     # folded
            scores = y[..., C:].transpose(1, 2)                            # (B, h, N)
        else:
            k = self.k_norm(y[..., C:].reshape(B, N, h, d).transpose(1, 2))  # (B, h, N, d)
            scores = context_scores(k, self._heads(self.context_query), self.scale)  # (B, h, N)
        out = self._sep(scores, v, token_mask)                             # (B, N, C)
        dw = self._dw(v_tokens, grid, token_mask, grid_sizes)
        if dw is not None:
            out = out + dw
        return self._output(x, out)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", folded={self.context_query is None}"


class SeparableAttention(CastlingTrainingForm, _SeparableParts):
    """Training form: separable attention + DW, blended with the annealed masked-softmax branch."""

    def __init__(self, spec: SoftmaxAttentionSpec, config: CastlingConfig):
        super().__init__()
        C = spec.num_heads * spec.head_dim
        w = spec.qkv.weight
        self._init_common(
            dim=spec.dim, num_heads=spec.num_heads, head_dim=spec.head_dim, scale=spec.scale,
            num_prefix_tokens=spec.num_prefix_tokens, proj=spec.proj, out_norm=spec.out_norm,
            out_gate=spec.out_gate,
            dw=build_dw(config.dw, config.dw_kernel, C, spec.num_heads, spec.num_prefix_tokens,
                        like=spec.qkv.weight),
            context_gain=nn.Parameter(torch.ones(C, device=w.device, dtype=w.dtype)),
            relu_gain=nn.Parameter(torch.zeros(C, device=w.device, dtype=w.dtype)),
            proj_drop=spec.proj_drop, eps=config.eps)
        self.qkv = spec.qkv
        self.q_norm = spec.q_norm
        self.k_norm = spec.k_norm
        self.rope_half = bool(spec.rope_half)           # RoPE layout of the softmax branch (when a call passes rope)
        self.context_query = nn.Parameter(self._query_from_bias())            # (C,)  u
        self.attn_drop = nn.Dropout(spec.attn_drop)
        self.set_schedule(config.gate, config.threshold)
        self.last_mask_density: Optional[torch.Tensor] = None
        # Attention transfer (LoLCATs-style): when on, each forward records
        # MSE(SEP + DW, softmax attention of the same q, k, v) as last_transfer_loss.
        self.compute_transfer = False
        self.last_transfer_loss: Optional[torch.Tensor] = None
        self._calib: Optional[list] = None        # [sum of queries (h, d), token count] while calibrating
        if config.aux == "teacher":
            self.keep_teacher()

    @classmethod
    def from_pretrained_attention(cls, spec: SoftmaxAttentionSpec,
                                  config: CastlingConfig) -> "SeparableAttention":
        """Build the training form around a pretrained softmax attention's modules."""
        return cls(spec, config)

    @classmethod
    def config_problem(cls, config) -> Optional[tuple[str, str]]:
        if config.combine != "blend":
            return ("combine", "the separable kind supports only combine='blend' (sum adds the "
                               "auxiliary branch inside linear-angular's normalisation, which "
                               "separable attention does not have)")
        return None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gate={self.aux_gate:g}, threshold={self.threshold:g}"

    @torch.no_grad()
    def _query_from_bias(self) -> torch.Tensor:
        """Data-free context query: the query bias through q_norm (0 without a bias)."""
        C = self.num_heads * self.head_dim
        w, b = self.qkv.weight, self.qkv.bias
        if b is None:
            return torch.zeros(C, device=w.device, dtype=w.dtype)
        q = self.q_norm(b[:C].detach().view(1, self.num_heads, 1, self.head_dim))  # (1, h, 1, d)
        return q.reshape(C).to(w.dtype).clone()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid: Optional[Tuple[int, int]] = None, rope: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None, grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_mask(attn_mask, is_causal)
        g = self.aux_gate
        q, k, v, v_tokens = self._qkv(x)                                    # (B, h, N, d), not rotated
        qr, kr = self._rope(q, k, rope)                                     # rotated: the softmax branch's
        calibrating = self._calib is not None
        aux = self._aux(qr, kr, v, token_mask) if self._needs_student_aux(g) else None   # (B, h, N, d) or None
        self._note_training(g)
        if calibrating:                     # record the mean (un-rotated) query, pass the teacher's output on
            if token_mask is None:
                self._calib[0] += q.detach().float().sum(dim=(0, 2))       # (h, d)
                self._calib[1] += q.shape[0] * q.shape[2]
            else:                                                           # real tokens only
                w = token_mask.to(torch.float32)[:, None, :, None]          # (B, 1, N, 1)
                self._calib[0] += (q.detach().float() * w).sum(dim=(0, 2))
                self._calib[1] += float(w.sum())
            return self._output(x, merge_heads(aux))
        scores = context_scores(k, self._heads(self.context_query), self.scale)  # (B, h, N)
        lin = self._sep(scores, v, token_mask)                              # (B, N, C)
        dw = self._dw(v_tokens, grid, token_mask, grid_sizes)
        if dw is not None:
            lin = lin + dw
        if self.compute_transfer:
            self._record_transfer(qr, kr, v, lin, aux, token_mask)
        elif aux is None and self._q_norm_trains():
            # The separable branch does not read the queries: keep q_norm's parameters in the
            # graph (zero gradient) so DistributedDataParallel sees every parameter used.
            lin = lin + 0.0 * q[..., :1, :1].sum()
        return self._blend(x, lin, aux, g, rope, token_mask)

    def _q_norm_trains(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.q_norm.parameters())

    # -- calibration of the context query ------------------------------------------------------
    def start_calibration(self) -> None:
        self._calib = [torch.zeros(self.num_heads, self.head_dim, device=self.context_query.device), 0]

    def finish_calibration(self) -> None:
        total, count = self._calib
        self._calib = None
        if count:
            with torch.no_grad():
                self.context_query.copy_((total / count).reshape(-1).to(self.context_query.dtype))

    # -- inference form ------------------------------------------------------------------------
    @torch.no_grad()
    def _inference_in_proj(self, folded: bool) -> nn.Linear:
        """``Linear(dim, C + h)`` = [values | context logits] (folded), else [values | keys]."""
        h, d = self.num_heads, self.head_dim
        C = h * d
        w, b = self.qkv.weight, self.qkv.bias                               # (3C, dim), (3C,)
        w_v, w_k = w[2 * C:], w[C:2 * C]
        b_v = b[2 * C:] if b is not None else None
        b_k = b[C:2 * C] if b is not None else None
        if folded:   # scale·⟨u_h, W_k^h x + b_k^h⟩ = x·(scale·W_k^hᵀ u_h) + scale·⟨u_h, b_k^h⟩
            u = self._heads(self.context_query).float() * self.scale       # (h, d)
            w_s = torch.einsum("hd,hdi->hi", u, w_k.float().view(h, d, -1)).to(w.dtype)  # (h, dim)
            b_s = (u * b_k.float().view(h, d)).sum(-1).to(w.dtype) if b is not None else None
            w_k, b_k = w_s, b_s
        out = w_v.shape[0] + w_k.shape[0]
        lin = nn.Linear(w.shape[1], out, bias=b is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(torch.cat([w_v, w_k], 0))
        if b is not None:
            lin.bias.copy_(torch.cat([b_v, b_k], 0))
        lin.requires_grad_(w.requires_grad)
        return lin

    def to_inference(self) -> SeparableAttentionInference:
        folded = isinstance(self.k_norm, nn.Identity)
        inf = SeparableAttentionInference()
        inf._init_common(
            dim=self.dim, num_heads=self.num_heads, head_dim=self.head_dim, scale=self.scale,
            num_prefix_tokens=self.num_prefix_tokens, proj=self.proj, out_norm=self.norm,
            out_gate=self.out_gate, dw=self.dw, context_gain=self.context_gain,
            relu_gain=self.relu_gain, proj_drop=self.proj_drop.p, eps=self.eps)
        inf.in_proj = self._inference_in_proj(folded)
        inf.k_norm = None if folded else self.k_norm
        inf.context_query = None if folded else self.context_query
        return inf.train(self.training)
