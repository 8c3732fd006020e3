"""Linear-angular attention (Castling-ViT, arXiv 2211.10526), training and inference forms.

Per head, with q, k, v from the pretrained projections (DESIGN.md §2)::

    LA(V)  = ½·V + (1/π)·Q̂ (K̂ᵀ V)             # O(N·d²), never N×N
    DW(V)  = depthwise conv of V (patch grid or token sequence)
    AUX(V) = (M ⊙ softmax(Q Kᵀ·scale)) V       # training form only

    blend: out = g·AUX + (1-g)·(γ·normalize(LA) + DW)     g = 1, M = 1  →  softmax attention
    sum:   out = γ·normalize(LA + g·AUX) + DW              (reference-code style)
    inference: out = γ·normalize(LA) + DW                  then out_norm, out_gate, proj

``normalize`` is an L2 norm per token per head. LA is computed on ``V/√N``: normalize() removes
the factor, and it keeps K̂ᵀV inside the fp16 range at high token counts.

RoPE: q and k are rotated (patch tokens) before anything else, as in the source attention; a
rotation keeps norms, so q̂·k̂ is the cosine of the rotated vectors and K̂ᵀV stays one d×d sum
(linear in N). The softmax branch uses the same rotated q, k: gate 1 is the teacher exactly.
Key-padding masks: padding keys are dropped from K̂ᵀV and the global term's N_ref/N counts each
image's real tokens, so a padded image gets the output it gets alone.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx
from torch import nn

from castle_convert.attention.base import (CastlingModule, CastlingTrainingForm,
                                           SoftmaxAttentionSpec)
from castle_convert.attention.dwconv import build_dw, dw_macs
from castle_convert.attention.functional import (angular_linear, linear_angular_fused,
                                                 merge_heads)
from castle_convert.config import CastlingConfig

# One leaf node under FX symbolic tracing: the kernel picks its rescaling from the dtype (fp16/bf16),
# a Python branch FX cannot trace; as a leaf it runs as written at call time (TorchScript compiles it).
torch.fx.wrap("linear_angular_fused")


class _LinearAngularParts(CastlingModule):
    """Modules and helpers shared by both forms (same state_dict keys in both)."""

    kind_label = "linear-angular"

    def _init_parts(self, *, dim: int, num_heads: int, head_dim: int, scale: float,
                    num_prefix_tokens: int, qkv: nn.Linear, proj: nn.Linear, q_norm: nn.Module,
                    k_norm: nn.Module, out_norm: nn.Module, out_gate: Optional[nn.Linear],
                    dw: Optional[nn.Module], gamma: nn.Parameter, proj_drop: float, eps: float,
                    combine: str, ref_tokens: int = 0, rope_half: bool = False) -> None:
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_prefix_tokens = num_prefix_tokens
        self.eps = eps
        self.combine = combine
        self.ref_tokens = int(ref_tokens or 0)                             # global term × N_ref/N (0: plain sum)
        self.rope_half = bool(rope_half)                                   # RoPE layout (when a call passes rope)
        self.qkv = qkv
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.gamma = gamma                                            # (h,)
        self.dw = dw
        self.norm = out_norm
        self.out_gate = out_gate
        self.proj = proj
        self.proj_drop = nn.Dropout(proj_drop)

    def _merge(self, heads: torch.Tensor) -> torch.Tensor:
        return merge_heads(heads)                                            # (B, N, C)

    def _gamma(self) -> torch.Tensor:
        return self.gamma.view(1, -1, 1, 1)                                  # (1, h, 1, 1)

    def mixing_macs(self, num_tokens: int, grid: Tuple[int, int]) -> int:
        C = self.num_heads * self.head_dim
        return 2 * num_tokens * self.head_dim * C + dw_macs(self.dw, num_tokens, grid, C)  # K̂ᵀV, Q(K̂ᵀV), DW



class LinearAngularAttentionInference(_LinearAngularParts):
    """Inference form: ``proj(γ·normalize(LA) + DW)``. No softmax, no mask, nothing N×N."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid: Optional[Tuple[int, int]] = None, rope: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None, grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, dim); ``grid``, ``rope``, ``token_mask``, ``grid_sizes``: this call's, passed down by the
        model (see :mod:`castle_convert.attention.base`)."""
        self._check_mask(attn_mask, is_causal)
        q, k, v, v_tokens = self._qkv(x, rope)                              # (B, h, N, d)
        out = linear_angular_fused(q, k, v, self.gamma, self.eps, self._dw(v_tokens, grid, token_mask, grid_sizes),
                                   self.ref_tokens, token_mask)             # (B, N, C)
        return self._output(x, out)


class LinearAngularAttention(CastlingTrainingForm, _LinearAngularParts):
    """Training form: linear-angular + DW, blended with the annealed masked-softmax branch."""

    def __init__(self, spec: SoftmaxAttentionSpec, config: CastlingConfig):
        super().__init__()
        C = spec.num_heads * spec.head_dim
        self._init_parts(
            dim=spec.dim, num_heads=spec.num_heads, head_dim=spec.head_dim, scale=spec.scale,
            num_prefix_tokens=spec.num_prefix_tokens, qkv=spec.qkv, proj=spec.proj,
            q_norm=spec.q_norm, k_norm=spec.k_norm, out_norm=spec.out_norm,
            out_gate=spec.out_gate,
            dw=build_dw(config.dw, config.dw_kernel, C, spec.num_heads, spec.num_prefix_tokens,
                        like=spec.qkv.weight),
            gamma=nn.Parameter(torch.ones(spec.num_heads, device=spec.qkv.weight.device,
                                          dtype=spec.qkv.weight.dtype)),
            proj_drop=spec.proj_drop, eps=config.eps, combine=config.combine, ref_tokens=config.ref_tokens or 0,
            rope_half=spec.rope_half)
        self.attn_drop = nn.Dropout(spec.attn_drop)
        self.set_schedule(config.gate, config.threshold)
        self.last_mask_density: Optional[torch.Tensor] = None
        # Attention transfer (LoLCATs-style): when on, each forward records
        # MSE(γ·normalize(LA) + DW, softmax attention of the same q, k, v) as last_transfer_loss.
        self.compute_transfer = False
        self.last_transfer_loss: Optional[torch.Tensor] = None
        self._calib: Optional[list] = None        # [sum of per-head norms (h,), count] while calibrating
        if config.aux == "teacher":
            self.keep_teacher()

    @classmethod
    def from_pretrained_attention(cls, spec: SoftmaxAttentionSpec,
                                  config: CastlingConfig) -> "LinearAngularAttention":
        """Build the training form around a pretrained softmax attention's modules."""
        return cls(spec, config)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", ref_tokens={self.ref_tokens}, combine={self.combine}, "
                f"gate={self.aux_gate:g}, threshold={self.threshold:g}")

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid: Optional[Tuple[int, int]] = None, rope: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None, grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_mask(attn_mask, is_causal)
        g = self.aux_gate
        q, k, v, v_tokens = self._qkv(x, rope)                              # (B, h, N, d), q/k rotated
        calibrating = self._calib is not None
        aux = self._aux(q, k, v, token_mask) if self._needs_student_aux(g) else None   # (B, h, N, d) or None
        self._note_training(g)
        if calibrating:                      # record the teacher's output norms, pass its output on
            norms = aux.detach().float().norm(dim=-1)                       # (B, h, N)
            if token_mask is None:
                self._calib[0] += norms.mean(dim=(0, 2))                    # (h,)
            else:                                                           # real tokens only
                w = token_mask.to(norms.dtype).unsqueeze(1)                 # (B, 1, N)
                self._calib[0] += (norms * w).sum(dim=(0, 2)) / w.sum().clamp_min(1.0)
            self._calib[1] += 1
            return self._output(x, self._merge(aux))
        dw = self._dw(v_tokens, grid, token_mask, grid_sizes)               # (B, N, C) or None
        lin = None
        if self.combine == "blend" or self.compute_transfer:
            lin = self._merge(self._gamma() * angular_linear(q, k, v, self.eps, ref_tokens=self.ref_tokens,
                                                             token_mask=token_mask))
            if dw is not None:
                lin = lin + dw
        if self.compute_transfer:
            self._record_transfer(q, k, v, lin, aux, token_mask)
        if self.combine == "sum":
            extra = g * aux if (aux is not None and g > 0.0) else None
            out = self._merge(self._gamma() * angular_linear(q, k, v, self.eps, extra, self.ref_tokens, token_mask))
            if dw is not None:
                out = out + dw
            return self._output(x, out)
        return self._blend(x, lin, aux, g, rope, token_mask)

    # -- calibration of γ ----------------------------------------------------------------------
    def start_calibration(self) -> None:
        self._calib = [torch.zeros(self.num_heads, device=self.gamma.device), 0]

    def finish_calibration(self) -> None:
        total, count = self._calib
        self._calib = None
        if count:
            with torch.no_grad():
                self.gamma.copy_((total / count).clamp_min(self.eps).to(self.gamma.dtype))

    # -- inference form ------------------------------------------------------------------------
    def to_inference(self) -> LinearAngularAttentionInference:
        inf = LinearAngularAttentionInference()
        inf._init_parts(
            dim=self.dim, num_heads=self.num_heads, head_dim=self.head_dim, scale=self.scale,
            num_prefix_tokens=self.num_prefix_tokens, qkv=self.qkv, proj=self.proj,
            q_norm=self.q_norm, k_norm=self.k_norm, out_norm=self.norm, out_gate=self.out_gate,
            dw=self.dw, gamma=self.gamma, proj_drop=self.proj_drop.p, eps=self.eps,
            combine=self.combine, ref_tokens=self.ref_tokens, rope_half=self.rope_half)
        return inf.train(self.training)
