"""What every attention kind shares: the description of the softmax attention it replaces and the
interface of training and inference forms.

Nothing here knows about timm or transformers: adapters fill a :class:`SoftmaxAttentionSpec`.

Per-call inputs travel with the call: every form's ``forward(x, attn_mask=None, is_causal=False,
grid=None, rope=None, token_mask=None, grid_sizes=None)`` takes them as arguments (the model's
forward passes them down, see the adapters), never from state shared between calls:

* ``grid`` — the patch grid ``(rows, cols)`` of this call's images;
* ``rope`` — the rotary position embedding of this call's patch tokens, ``[sin | cos]`` (…, M, 2d)
  (:func:`~castle_convert.attention.functional.apply_rope`), applied to q and k after q_norm / k_norm
  exactly as the source attention does, in the linear form as in the softmax branch;
* ``token_mask`` — a key-padding mask (B, N), True/1 = a real token, False/0 = padding: padding
  contributes nothing to any sum over tokens (K̂ᵀV, the separable context vector, the softmax
  branch) and nothing to the DW term;
* ``grid_sizes`` — (B, 2): each image's own (rows, cols) in a padded batch of differently sized
  images (NaFlex), its patch tokens row-major after the prefix tokens.

Any other mask (``attn_mask``: causal or arbitrary N×N) is a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from castle_convert.attention.functional import apply_rope, merge_heads, token_counts


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
    rope_half: bool = False      # RoPE layout of the source: rotate halves (True) or interleaved pairs
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

    rope_half = False                            # RoPE layout: rotate halves (True) or interleaved pairs

    def _rope(self, q: torch.Tensor, k: torch.Tensor, rope: Optional[torch.Tensor]):
        """q, k (B, h, N, d) rotated by this call's RoPE (patch tokens only), or as they are without one."""
        if rope is None:
            return q, k
        P = self.num_prefix_tokens
        return apply_rope(q, rope, self.rope_half, P), apply_rope(k, rope, self.rope_half, P)

    def _qkv(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None):
        """q, k (through q_norm / k_norm, then RoPE), v: (B, h, N, d) from the fused ``qkv``; v_tokens (B, N, C) view."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)   # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                      # each (B, h, N, d)
        v_tokens = qkv[:, :, 2].flatten(2)                                   # (B, N, C) view
        q, k = self._rope(self.q_norm(q), self.k_norm(k), rope)
        return q, k, v, v_tokens

    def _dw(self, v_tokens: torch.Tensor, grid: Optional[Tuple[int, int]], token_mask: Optional[torch.Tensor] = None,
            grid_sizes: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """DW(V) (B, N, C) or None: padding tokens are zeroed first; with ``grid_sizes`` over each image's own grid."""
        if self.dw is None:
            return None
        return self.dw(v_tokens, grid, token_mask, grid_sizes)             # (B, N, C)

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
                f"prefix_tokens={self.num_prefix_tokens}" + (", rope_half=True" if self.rope_half else ""))

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

    def _teacher_attention(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                           token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The teacher's (masked) softmax attention of this layer — its RoPE and key-padding mask too —
        output projection included: (B, N, dim)."""
        B, N, _ = x.shape
        qkv = self._teacher("qkv", x).reshape(B, N, 3, self.num_heads, self.head_dim)   # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                                   # each (B, h, N, d)
        q, k = self._rope(self._teacher("q_norm", q), self._teacher("k_norm", k), rope)
        out = self._teacher("norm", merge_heads(self._aux(q, k, v, token_mask)))
        if self.out_gate is not None:
            out = out * self._teacher("out_gate", x).sigmoid()
        return self.proj_drop(self._teacher("proj", out))                               # (B, N, dim)

    def _blend(self, x: torch.Tensor, lin: torch.Tensor, aux: Optional[torch.Tensor], g: float,
               rope: Optional[torch.Tensor] = None, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The blended training-form output ``g·AUX + (1 − g)·LIN`` (LIN: (B, N, C), merged heads): before
        the output projection with the student's own auxiliary branch ``aux`` (B, h, N, d), after it with
        the teacher's (``aux`` unused; it gets this call's ``rope`` and ``token_mask``)."""
        if g <= 0.0:
            return self._output(x, lin)
        if self.teacher_aux:
            return g * self._teacher_attention(x, rope, token_mask) + (1.0 - g) * self._output(x, lin)
        return self._output(x, g * merge_heads(aux) + (1.0 - g) * lin)

    def _needs_student_aux(self, g: float) -> bool:
        return self._calib is not None or (g > 0.0 and not self.teacher_aux)

    def _aux(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The auxiliary masked-softmax branch (B, h, N, d); records ``last_mask_density``."""
        drop = self.attn_drop.p if self.training else 0.0
        out, self.last_mask_density = masked_softmax_attention(q, k, v, self.scale, self.threshold, drop, token_mask)
        return out

    def _record_transfer(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lin: torch.Tensor,
                         aux: Optional[torch.Tensor], token_mask: Optional[torch.Tensor] = None) -> None:
        """Attention transfer: ``last_transfer_loss`` = MSE between the linear branch ``lin``
        (B, N, C) and the exact softmax attention of the same q, k, v (B, h, N, d), over real tokens."""
        with torch.no_grad():
            target = aux if (aux is not None and self.threshold <= 0.0) else \
                F.scaled_dot_product_attention(q, k, v, scale=self.scale, attn_mask=_key_mask(token_mask))
        err = (lin.float() - merge_heads(target).float()).pow(2)                 # (B, N, C)
        if token_mask is None:
            self.last_transfer_loss = err.mean()
        else:
            w = token_mask.to(err.dtype).unsqueeze(-1)                           # (B, N, 1)
            self.last_transfer_loss = (err * w).sum() / (w.sum() * err.shape[-1]).clamp_min(1.0)

    @classmethod
    def config_problem(cls, config) -> Optional[tuple[str, str]]:
        """``(field, fix)`` when this kind cannot use ``config`` (checked by CastlingConfig.validate)."""
        return None


def _key_mask(token_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A key-padding mask (B, N) as SDPA's boolean ``attn_mask`` (B, 1, 1, N), True = attend."""
    return None if token_mask is None else token_mask.to(torch.bool)[:, None, None, :]


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             threshold: float, dropout_p: float = 0.0, token_mask: Optional[torch.Tensor] = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The auxiliary branch ``(M ⊙ softmax(QKᵀ·scale))·V`` of the training forms, and mask density.

    ``M`` keeps the softmax entries ``≥ threshold / N`` (τ in units of uniform attention; N counts
    each image's real tokens under ``token_mask`` (B, N), whose padding keys get no attention);
    ``threshold = 0`` is the plain softmax attention (SDPA). q, k, v: (B, h, N, d).
    """
    N = q.shape[-2]
    keys = _key_mask(token_mask)                                       # (B, 1, 1, N) or None
    if threshold <= 0.0:                                               # M = all ones
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=dropout_p, scale=scale)
        return out, torch.ones((), device=q.device)
    logits = (q * scale) @ k.transpose(-2, -1)                         # (B, h, N, N)
    if keys is not None:
        logits = logits.masked_fill(~keys, float("-inf"))
    attn = logits.softmax(dim=-1)                                      # (B, h, N, N)
    if token_mask is None:
        keep = attn >= (threshold / N)
        density = keep.float().mean().detach()
    else:
        keep = attn >= (threshold / token_counts(token_mask, attn.dtype))
        real = keys.expand_as(keep)
        density = (keep & real).float().sum().detach() / real.float().sum().clamp_min(1.0)
    attn = attn * keep
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v, density                                           # (B, h, N, d)
