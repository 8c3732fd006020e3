"""What every attention kind shares: the description of the softmax attention it replaces and the
interface of training and inference forms.

Nothing here knows about timm or transformers: adapters fill a :class:`SoftmaxAttentionSpec`.

Per-call inputs travel with the call: every form's ``forward(x, attn_mask=None, is_causal=False,
grid=None)`` takes the patch grid ``(rows, cols)`` of this call's image as an argument (the
model's forward passes it down, see the adapters), never from state shared between calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from castle_convert.attention.functional import merge_heads


@dataclass
class SoftmaxAttentionSpec:
    """Everything a castling kind needs from a pretrained softmax self-attention.

    The modules are the pretrained ones, reused as they are (weights shared, not copied).
    ``qkv`` is one fused projection ``dim -> 3·heads·head_dim`` (adapters fuse separate q/k/v).
    """

    dim: int
    num_heads: int
    head_dim: int
    scale: float
    qkv: nn.Linear
    proj: nn.Linear
    num_prefix_tokens: int
    q_norm: nn.Module
    k_norm: nn.Module
    out_norm: nn.Module          # applied to the merged heads before proj (timm scale_norm)
    out_gate: Optional[nn.Linear] = None  # timm gated attention: x * sigmoid(out_gate(input))
    attn_drop: float = 0.0
    proj_drop: float = 0.0


class FinalizeError(RuntimeError):
    """The inference form does not reproduce the training form, or the training form was never
    trained at gate 0 (its linear attention learned nothing)."""


class NotAnnealedError(FinalizeError):
    """finalize / fuse of a training form whose linear branch never trained at gate 0."""


NOT_UPDATED_FIX = ("the optimizer does not hold the converted model's parameters: build it after cc.convert(...) "
                   "from the student's own parameters (e.g. torch.optim.AdamW(student.parameters())), or pass "
                   "force=True to finalize anyway")
ANNEAL_FIX = ("anneal the gate to 0 while training: cc.distill(...); in your own loop "
              "cc.GateSchedule(model, total_steps=N) with schedule.step() after each optimizer step (timm "
              "scheduler style: step(epoch) / step_update(num_updates)); with transformers.Trainer "
              "callbacks=[cc.CastlingTrainerCallback()]; or pass force=True to finalize anyway")


class CastlingModule(nn.Module):
    """Base of every converted attention (training and inference forms).

    Subclasses set ``dw`` (a DW branch or None), ``norm``, ``out_gate``, ``proj``, ``proj_drop``
    from the pretrained attention; the helpers below are the parts every kind shares.
    """

    is_training_form: bool = False
    kind_label: str = "linear"                   # for messages, e.g. "linear-angular"

    def _qkv(self, x: torch.Tensor):
        """q, k (through q_norm / k_norm), v: (B, h, N, d) from the fused ``qkv``; v_tokens (B, N, C) view."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)   # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                      # each (B, h, N, d)
        v_tokens = qkv[:, :, 2].flatten(2)                                   # (B, N, C) view
        return self.q_norm(q), self.k_norm(k), v, v_tokens

    def _dw(self, v_tokens: torch.Tensor, grid: Optional[Tuple[int, int]]) -> Optional[torch.Tensor]:
        if self.dw is None:
            return None
        return self.dw(v_tokens, grid)                                     # (B, N, C)

    def _output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out_norm, the gated output (timm), the output projection: (B, N, C) -> (B, N, dim)."""
        out = self.norm(out)
        if self.out_gate is not None:
            out = out * self.out_gate(x).sigmoid()
        return self.proj_drop(self.proj(out))

    def _check_mask(self, attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
        if not torch.jit.is_scripting():
            if isinstance(attn_mask, torch.fx.Proxy) or isinstance(is_causal, torch.fx.Proxy):
                return    # FX symbolic tracing: timm passes its forward's placeholders down; no value to test
        if attn_mask is not None or is_causal:
            raise NotImplementedError(
                "castling linear attention has no attention matrix to mask: attn_mask/is_causal are not supported "
                "(vision models do not pass them)")

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, "
                f"prefix_tokens={self.num_prefix_tokens}")

    def mixing_macs(self, num_tokens: int, grid: tuple[int, int]) -> int:
        """Analytic multiply-accumulates for one image of everything this module computes beyond
        the pretrained softmax attention's ``qkv`` and output projections (the token mixing, plus
        any change to the input projection — negative when rows of ``qkv`` are dropped). The
        softmax attention's counterpart is ``2·N²·C``; ``castle_convert.bench`` checks the counted
        MACs against the difference."""
        raise NotImplementedError


class CastlingTrainingForm(CastlingModule):
    """A training form carries the auxiliary softmax branch and its schedule state."""

    is_training_form = True

    aux_gate: float
    threshold: float
    # Set by a forward with gradients at gate 0 (the linear branch alone produced the output, so it
    # was trained as the inference form computes it). finalize() refuses a model without it.
    trained_at_gate_zero: bool = False

    def _note_training(self, gate: float) -> None:
        if gate <= 0.0 and self._calib is None and torch.is_grad_enabled() \
                and not torch.compiler.is_compiling() and not self.trained_at_gate_zero:
            self.trained_at_gate_zero = True

    def added_parameters(self) -> list[nn.Parameter]:
        """The parameters conversion added (γ, the depthwise conv, the kind's own), not the source attention's."""
        shared = {id(p) for mod in (self.qkv, self.proj, self.q_norm, self.k_norm, self.norm, self.out_gate)
                  if mod is not None for p in mod.parameters()}
        return [p for p in self.parameters() if id(p) not in shared]

    def _fingerprint(self) -> list[tuple[float, float]]:
        with torch.no_grad():
            return [(float(p.double().sum()), float(p.double().pow(2).sum())) for p in self.parameters()]

    def mark_initial(self) -> None:
        """Remember a fingerprint of this attention's parameters as convert() made them (two sums per
        tensor, not a copy): finalize() checks that training changed some of them."""
        self._initial_fingerprint = self._fingerprint()

    def updated_since_convert(self) -> bool:
        """Whether any parameter (q/k/v/proj, γ, the depthwise conv, ...) changed since convert(); True when
        there is no record or the values moved device/dtype (the check only catches a clear "never updated")."""
        initial = getattr(self, "_initial_fingerprint", None)
        return initial is None or self._fingerprint() != initial

    def fuse(self) -> CastlingModule:
        """timm's ``reparameterize_model`` hook: the inference form of this module (no parity check;
        refused like :func:`castle_convert.finalize` when it never trained at gate 0)."""
        if not self.trained_at_gate_zero:
            raise NotAnnealedError(f"cannot fuse a {self.kind_label} training form that never trained at gate 0 "
                                   f"(gate is {self.aux_gate:g}): {ANNEAL_FIX}")
        if not self.updated_since_convert():
            raise NotAnnealedError(f"cannot fuse a {self.kind_label} training form whose parameters were never "
                                   f"updated: {NOT_UPDATED_FIX}")
        return self.to_inference()

    def set_schedule(self, gate: float, threshold: float) -> None:
        """Set the blend gate g_t (1 → 0) and the mask threshold τ_t (in units of 1/N)."""
        self.aux_gate = float(gate)
        self.threshold = float(threshold)

    def to_inference(self) -> CastlingModule:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- the teacher's own attention as the auxiliary branch (CastlingConfig.aux = "teacher") ----------
    TEACHER_PARTS = ("qkv", "q_norm", "k_norm", "norm", "out_gate", "proj")
    teacher_aux: bool = False

    def keep_teacher(self) -> None:
        """Freeze a copy of the source attention's parameters (its qkv, q/k norms, out norm, gate and proj)
        as non-persistent buffers — not in the state dict, dropped by the inference form — so that the
        auxiliary branch computes the teacher's own attention and gate 1 stays the teacher whatever
        training changes in the student's projections."""
        self.teacher_aux = True
        self._teacher_buffers: dict[str, dict[str, str]] = {}
        for part in self.TEACHER_PARTS:
            module = getattr(self, part, None)
            if module is None:
                continue
            names = {}
            for pname, p in module.named_parameters():
                buf = f"teacher_{part}_{pname.replace('.', '_')}"
                self.register_buffer(buf, p.detach().clone(), persistent=False)
                names[pname] = buf
            self._teacher_buffers[part] = names

    def _teacher(self, part: str, *args: torch.Tensor) -> torch.Tensor:
        """``part`` of the source attention called with the frozen teacher parameters."""
        module, names = getattr(self, part), self._teacher_buffers.get(part)
        if not names:
            return module(*args)
        return torch.func.functional_call(module, {p: getattr(self, b) for p, b in names.items()}, args)

    def _teacher_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's (masked) softmax attention of this layer, output projection included: (B, N, dim)."""
        B, N, _ = x.shape
        qkv = self._teacher("qkv", x).reshape(B, N, 3, self.num_heads, self.head_dim)   # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                                   # each (B, h, N, d)
        out = self._teacher("norm", merge_heads(self._aux(self._teacher("q_norm", q), self._teacher("k_norm", k), v)))
        if self.out_gate is not None:
            out = out * self._teacher("out_gate", x).sigmoid()
        return self.proj_drop(self._teacher("proj", out))                               # (B, N, dim)

    def _blend(self, x: torch.Tensor, lin: torch.Tensor, aux: Optional[torch.Tensor], g: float) -> torch.Tensor:
        """The blended training-form output ``g·AUX + (1 − g)·LIN`` (LIN: (B, N, C), merged heads): before
        the output projection with the student's own auxiliary branch ``aux`` (B, h, N, d), after it with
        the teacher's (``aux`` unused)."""
        if g <= 0.0:
            return self._output(x, lin)
        if self.teacher_aux:
            return g * self._teacher_attention(x) + (1.0 - g) * self._output(x, lin)
        return self._output(x, g * merge_heads(aux) + (1.0 - g) * lin)

    def _needs_student_aux(self, g: float) -> bool:
        return self._calib is not None or (g > 0.0 and not self.teacher_aux)

    def _aux(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The auxiliary masked-softmax branch (B, h, N, d); records ``last_mask_density``."""
        drop = self.attn_drop.p if self.training else 0.0
        out, self.last_mask_density = masked_softmax_attention(q, k, v, self.scale, self.threshold, drop)
        return out

    def _record_transfer(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lin: torch.Tensor,
                         aux: Optional[torch.Tensor]) -> None:
        """Attention transfer: ``last_transfer_loss`` = MSE between the linear branch ``lin``
        (B, N, C) and the exact softmax attention of the same q, k, v (B, h, N, d)."""
        with torch.no_grad():
            target = aux if (aux is not None and self.threshold <= 0.0) else \
                F.scaled_dot_product_attention(q, k, v, scale=self.scale)      # (B, h, N, d)
        self.last_transfer_loss = F.mse_loss(lin.float(), merge_heads(target).float())

    @classmethod
    def config_problem(cls, config) -> Optional[tuple[str, str]]:
        """``(field, fix)`` when this kind cannot use ``config`` (checked by CastlingConfig.validate)."""
        return None


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             threshold: float, dropout_p: float = 0.0
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The auxiliary branch ``(M ⊙ softmax(QKᵀ·scale))·V`` of the training forms, and mask density.

    ``M`` keeps the softmax entries ``≥ threshold / N`` (τ in units of uniform attention);
    ``threshold = 0`` is the plain softmax attention (SDPA). q, k, v: (B, h, N, d).
    """
    N = q.shape[-2]
    if threshold <= 0.0:                                               # M = all ones
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        return out, torch.ones((), device=q.device)
    attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)         # (B, h, N, N)
    keep = attn >= (threshold / N)
    density = keep.float().mean().detach()
    attn = attn * keep
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v, density                                           # (B, h, N, d)
