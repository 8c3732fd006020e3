"""The inference-form attentions of the published remote code: linear-angular (``CastlingAttention``),
local-global softmax (``CastlingLocalGlobalAttention``), separable (``CastlingSeparableAttention``) and the softmax
attention a hybrid keeps, with the DW branch.

Copied into every published output directory next to ``modeling_castling.py`` (which builds models from
them); imports only torch and ``castling_functional.py`` (the attention math, a verbatim copy of
``castle_convert/attention/functional.py``). Each takes the call's patch grid, RoPE, key-padding mask and
per-image grids as arguments, as castle-convert's own forms do.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .castling_checks import check_config, read_header
from .castling_functional import (apply_rope, context_scores, linear_angular_fused, local_global_attention, merge_heads,
                                  padded_grid_dw, patch_grid_dw, resolve_grid, separable_context, token_dw)

SUPPORTED_KINDS = ("linear_angular", "separable", "local_global")
DW_MODES = ("2d", "1d", "none")


def _weights_header(config):
    """The header (names, shapes) of the ``model.safetensors`` beside this config — its local directory, or the Hub
    cache — or None when there is none (a config built in memory, sharded weights)."""
    import os
    name = str(getattr(config, "_name_or_path", "") or "")
    if not name:
        return None
    file = os.path.join(name, "model.safetensors")
    if not os.path.isfile(file):
        try:
            from transformers.utils import cached_file
            file = cached_file(name, "model.safetensors", local_files_only=True,
                               _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except Exception:  # noqa: BLE001 - not a local directory or a cached repo: sizes are bounded without it
            return None
    return read_header(file) if file and os.path.isfile(file) else None


def _check_published(config) -> None:
    """config.json is untrusted input: the one validation castle-convert's own routes run too
    (``castling_checks.py``), before anything is allocated or looked up; a one-line ValueError."""
    check_config(config.to_dict(), _weights_header(config), kinds=SUPPORTED_KINDS)


class _StrictLoading:
    """``from_pretrained`` that refuses weights that leave part of the model random or are not used: transformers
    only warns (an edited config.json with more layers than the file loaded with the extra layers random). Tolerated:
    a whole part the file does not have at all (a base model's pooler) or a part the model does not have (the head of a
    classifier's file loaded as its base model)."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        own = set(model.state_dict())
        missing = set(info.get("missing_keys") or [])
        loaded_tops = {k.split(".")[0] for k in own - missing}
        children = {n for n, _ in model.named_children()} | {k.split(".")[0] for k in own}
        partly = sorted(k for k in missing if k.split(".")[0] in loaded_tops)
        unused = sorted(k for k in info.get("unexpected_keys") or [] if k.split(".")[0] in children)
        mismatched = list(info.get("mismatched_keys") or [])
        if partly or unused or mismatched:
            what = (f"{len(partly)} of the model's weights are not in it (e.g. {partly[0]})" if partly else
                    f"{len(unused)} of its weights fit nothing in the model (e.g. {unused[0]})" if unused else
                    f"{len(mismatched)} of its weights have another shape (e.g. {list(mismatched)[0]})")
            raise ValueError(f"the weights do not fit the architecture config.json describes: {what}; the file and "
                             "config.json come from different models (was config.json edited?)")
        return (model, info) if want_info else model


def _check_castling(castling: dict) -> None:
    kind = castling.get("kind", "linear_angular")
    if kind not in SUPPORTED_KINDS:
        raise ValueError(
            f"this checkpoint uses attention kind '{kind}', which its modeling_castling.py does not "
            f"implement (supported: {', '.join(SUPPORTED_KINDS)}). Re-export it with a castle-convert "
            "version that supports it, or load it with castle_convert.load().")
    if castling.get("dw", "2d") not in DW_MODES:
        raise ValueError(f"unknown castling dw mode {castling.get('dw')!r} (supported: {DW_MODES})")


class _DWConv(nn.Module):
    """Holds the depthwise-conv weight (key ``dw.conv.weight``): 2-D (C, 1, k, k) or 1-D (h, 1, k, 1)."""

    def __init__(self, mode: str, kernel: int, channels: int, num_heads: int):
        super().__init__()
        self.mode = mode
        if mode == "2d":
            self.conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)
        else:
            self.conv = nn.Conv2d(num_heads, num_heads, (kernel, 1), padding=(kernel // 2, 0), groups=num_heads,
                                  bias=False)


class _CastlingAttentionBase(nn.Module):
    """What both kinds share: geometry, the DW branch, out norm, gated output, output projection."""

    def _init_shared(self, dim: int, num_heads: int, head_dim: int, num_prefix_tokens: int, castling: dict,
                     proj_bias: bool, dim_out: Optional[int], out_norm_eps: Optional[float], gated: bool,
                     gate_bias: bool) -> None:
        _check_castling(castling)
        C = num_heads * head_dim
        self.num_heads, self.head_dim, self.num_prefix_tokens = num_heads, head_dim, num_prefix_tokens
        mode = castling.get("dw", "2d")
        self.dw = None if mode == "none" else _DWConv(mode, int(castling.get("dw_kernel", 3)), C, num_heads)
        self.norm = nn.LayerNorm(C, eps=out_norm_eps) if out_norm_eps is not None else nn.Identity()
        self.out_gate = nn.Linear(dim, C, bias=gate_bias) if gated else None
        self.proj = nn.Linear(C, dim_out or dim, bias=proj_bias)

    def _dw_term(self, v_tokens: torch.Tensor, grid: Optional[Tuple[int, int]],
                 token_mask: Optional[torch.Tensor] = None,
                 grid_sizes: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """DW(V) (B, N, C), or None without a DW branch. v_tokens: (B, N, C); grid: this call's patch grid; a
        padded batch (NaFlex): token_mask (B, N) and each image's own grid, grid_sizes (B, 2)."""
        if self.dw is None:
            return None
        P = self.num_prefix_tokens
        if self.dw.mode == "2d" and grid_sizes is not None:
            return padded_grid_dw(v_tokens, self.dw.conv.weight, P, grid_sizes, token_mask)
        if token_mask is not None:                                                 # padding never enters the conv
            v_tokens = v_tokens * token_mask.unsqueeze(-1).to(v_tokens.dtype)
        if self.dw.mode == "2d":
            return patch_grid_dw(v_tokens, self.dw.conv.weight, P, resolve_grid(v_tokens.shape[1] - P, grid))
        return token_dw(v_tokens, self.dw.conv.weight, self.num_heads)

    def _output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out = self.norm(out)                                                       # (B, N, C)
        if self.out_gate is not None:
            out = out * self.out_gate(x).sigmoid()
        return self.proj(out)                                                      # (B, N, dim)


class _CastlingQKVAttention(_CastlingAttentionBase):
    """The kinds that keep the fused ``qkv`` projection and q/k norms (linear-angular, local-global)."""

    def _init_qkv(self, dim: int, num_heads: int, head_dim: int, castling: dict, qkv_bias: bool,
                  qk_norm_eps: Optional[float]) -> None:
        C = num_heads * head_dim
        self.eps = float(castling.get("eps", 1e-6))
        self.qkv = nn.Linear(dim, 3 * C, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(head_dim, eps=qk_norm_eps) if qk_norm_eps is not None else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=qk_norm_eps) if qk_norm_eps is not None else nn.Identity()
        self.rope_half = bool(castling.get("rope_half", False))

    def _qkv(self, x: torch.Tensor, rope: Optional[torch.Tensor]):
        """q, k (normed, rotated), v: (B, h, N, d); v_tokens (B, N, C)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)          # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                            # each (B, h, N, d)
        v_tokens = qkv[:, :, 2].flatten(2)                                         # (B, N, C)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:                                                       # rotate q, k (patch tokens)
            P = self.num_prefix_tokens
            q, k = apply_rope(q, rope, self.rope_half, P), apply_rope(k, rope, self.rope_half, P)
        return q, k, v, v_tokens


class CastlingAttention(_CastlingQKVAttention):
    """Linear-angular attention, inference form. Keys: qkv, q_norm, k_norm, gamma, dw.conv, norm,
    out_gate, proj."""

    def extra_repr(self) -> str:                  # what print(model) shows where PEFT finds no query/value
        return "qkv: query, key and value fused (PEFT / LoRA: target_modules=['qkv', 'proj'])"

    def __init__(self, dim: int, num_heads: int, head_dim: int, num_prefix_tokens: int, castling: dict, *,
                 qkv_bias: bool = True, proj_bias: bool = True, dim_out: Optional[int] = None,
                 qk_norm_eps: Optional[float] = None, out_norm_eps: Optional[float] = None,
                 gated: bool = False, gate_bias: bool = True):
        super().__init__()
        self._init_qkv(dim, num_heads, head_dim, castling, qkv_bias, qk_norm_eps)
        self.ref_tokens = int(castling.get("ref_tokens", 0))      # global term × N_ref/N (0: plain sum)
        self.gamma = nn.Parameter(torch.ones(num_heads))                     # (h,)
        self._init_shared(dim, num_heads, head_dim, num_prefix_tokens, castling, proj_bias, dim_out,
                          out_norm_eps, gated, gate_bias)

    def forward(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None,
                rope: Optional[torch.Tensor] = None, token_mask: Optional[torch.Tensor] = None,
                grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, dim); grid: the call's patch grid (rows, cols), passed down by the model's forward;
        rope: the call's rotary embedding [sin | cos] (M, 2d) of the patch tokens, or None; token_mask (B, N)
        and grid_sizes (B, 2): a padded batch's real tokens and each image's grid (NaFlex), or None."""
        q, k, v, v_tokens = self._qkv(x, rope)
        out = linear_angular_fused(q, k, v, self.gamma, self.eps,
                                   self._dw_term(v_tokens, grid, token_mask, grid_sizes),
                                   self.ref_tokens, token_mask)                    # (B, N, C)
        return self._output(x, out)


class CastlingLocalGlobalAttention(_CastlingQKVAttention):
    """Local-global softmax attention, inference form: one softmax over the prefix tokens, the keys of a local
    window and pooled regions of the patch grid (castling_functional.local_global_attention). Keys: qkv, q_norm,
    k_norm, dw.conv, norm, out_gate, proj."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, num_prefix_tokens: int, castling: dict, *,
                 qkv_bias: bool = True, proj_bias: bool = True, dim_out: Optional[int] = None,
                 qk_norm_eps: Optional[float] = None, out_norm_eps: Optional[float] = None,
                 gated: bool = False, gate_bias: bool = True):
        super().__init__()
        self._init_qkv(dim, num_heads, head_dim, castling, qkv_bias, qk_norm_eps)
        self.scale = head_dim ** -0.5
        # defaults: castle_convert.config.CastlingConfig's (a config without these fields is the same model everywhere)
        self.block, self.halo, self.pool, self.topk = (int(castling.get("block", 8)), int(castling.get("halo", 0)),
                                                       int(castling.get("pool", 8)), int(castling.get("topk", 32)))
        self.exact_tokens = int(castling.get("exact_tokens", 600))
        self._init_shared(dim, num_heads, head_dim, num_prefix_tokens, castling, proj_bias, dim_out,
                          out_norm_eps, gated, gate_bias)

    def forward(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None,
                rope: Optional[torch.Tensor] = None, token_mask: Optional[torch.Tensor] = None,
                grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As CastlingAttention.forward."""
        q, k, v, v_tokens = self._qkv(x, rope)
        hw = None if grid_sizes is not None else resolve_grid(q.shape[-2] - self.num_prefix_tokens, grid)
        out = local_global_attention(q, k, v, self.scale, self.num_prefix_tokens, hw, self.block, self.halo,
                                     self.pool, self.topk, self.exact_tokens, token_mask=token_mask,
                                     grid_sizes=grid_sizes)                        # (B, N, C)
        dw = self._dw_term(v_tokens, grid, token_mask, grid_sizes)
        return self._output(x, out if dw is None else out + dw)


class CastlingSeparableAttention(_CastlingAttentionBase):
    """Separable self-attention (MobileViTv2), inference form. Keys: in_proj ([values | context
    logits], or [values | keys] + k_norm + context_query with qk-norm), context_gain, relu_gain,
    dw.conv, norm, out_gate, proj."""

    def extra_repr(self) -> str:                  # what print(model) shows where PEFT finds no query/value
        return "in_proj: values and context fused (PEFT / LoRA: target_modules=['in_proj', 'proj'])"

    def __init__(self, dim: int, num_heads: int, head_dim: int, num_prefix_tokens: int, castling: dict, *,
                 qkv_bias: bool = True, proj_bias: bool = True, dim_out: Optional[int] = None,
                 qk_norm_eps: Optional[float] = None, out_norm_eps: Optional[float] = None,
                 gated: bool = False, gate_bias: bool = True):
        super().__init__()
        C = num_heads * head_dim
        self.scale = head_dim ** -0.5
        folded = qk_norm_eps is None                    # no k_norm: the context projection is folded in
        self.in_proj = nn.Linear(dim, C + (num_heads if folded else C), bias=qkv_bias)
        self.k_norm = None if folded else nn.LayerNorm(head_dim, eps=qk_norm_eps)
        self.context_query = None if folded else nn.Parameter(torch.zeros(C))      # (C,)  u
        self.context_gain = nn.Parameter(torch.ones(C))                             # (C,)  a
        self.relu_gain = nn.Parameter(torch.zeros(C))                               # (C,)  b
        self._init_shared(dim, num_heads, head_dim, num_prefix_tokens, castling, proj_bias, dim_out,
                          out_norm_eps, gated, gate_bias)

    def forward(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None,
                rope: Optional[torch.Tensor] = None, token_mask: Optional[torch.Tensor] = None,
                grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, dim); grid: the call's patch grid (rows, cols), passed down by the model's forward; rope is
        not used (the separable branch is position-free); token_mask (B, N), grid_sizes (B, 2): a padded
        batch's real tokens and each image's grid (NaFlex), or None."""
        B, N, _ = x.shape
        h, d = self.num_heads, self.head_dim
        C = h * d
        y = self.in_proj(x)                                                        # (B, N, C + h | 2C)
        v_tokens = y[..., :C]                                                      # (B, N, C)
        v = v_tokens.reshape(B, N, h, d).transpose(1, 2)                           # (B, h, N, d)
        if self.context_query is None:
            scores = y[..., C:].transpose(1, 2)                                    # (B, h, N)
        else:
            k = self.k_norm(y[..., C:].reshape(B, N, h, d).transpose(1, 2))        # (B, h, N, d)
            scores = context_scores(k, self.context_query.view(h, d), self.scale)  # (B, h, N)
        out = merge_heads(separable_context(scores, v, self.context_gain.view(h, d),
                                            self.relu_gain.view(h, d), token_mask))  # (B, N, C)
        dw = self._dw_term(v_tokens, grid, token_mask, grid_sizes)
        return self._output(x, out if dw is None else out + dw)


class SoftmaxAttention(nn.Module):
    """A layer a hybrid model keeps as softmax attention (``keep_softmax``), timm's ``Attention``
    keys: qkv, q_norm, k_norm, norm, proj."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, num_prefix_tokens: int = 0,
                 castling: Optional[dict] = None, *, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm_eps: Optional[float] = None, out_norm_eps: Optional[float] = None, **_):
        super().__init__()
        C = num_heads * head_dim
        self.num_heads, self.head_dim, self.num_prefix_tokens = num_heads, head_dim, num_prefix_tokens
        self.rope_half = bool((castling or {}).get("rope_half", False))
        self.qkv = nn.Linear(dim, 3 * C, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(head_dim, eps=qk_norm_eps) if qk_norm_eps is not None else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=qk_norm_eps) if qk_norm_eps is not None else nn.Identity()
        self.norm = nn.LayerNorm(C, eps=out_norm_eps) if out_norm_eps is not None else nn.Identity()
        self.proj = nn.Linear(C, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None,
                rope: Optional[torch.Tensor] = None, token_mask: Optional[torch.Tensor] = None,
                grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                                    # each (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, rope, self.rope_half, self.num_prefix_tokens)
            k = apply_rope(k, rope, self.rope_half, self.num_prefix_tokens)
        keys = None if token_mask is None else token_mask.to(torch.bool)[:, None, None, :]   # (B, 1, 1, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)              # (B, h, N, d)
        return self.proj(self.norm(out.transpose(1, 2).reshape(B, N, -1)))         # (B, N, dim)


def make_attention(dim: int, num_heads: int, head_dim: int, num_prefix_tokens: int, castling: dict,
                   **kwargs) -> nn.Module:
    """The inference-form attention of ``castling['kind']``."""
    _check_castling(castling)
    cls = {"separable": CastlingSeparableAttention,
           "local_global": CastlingLocalGlobalAttention}.get(castling.get("kind"), CastlingAttention)
    return cls(dim, num_heads, head_dim, num_prefix_tokens, castling, **kwargs)


def _init_castling_weights(module: nn.Module, std: float = 0.02) -> None:
    """Initialisation for freshly built (not loaded) models; loaded weights replace it."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, CastlingAttention):
        nn.init.ones_(module.gamma)
    elif isinstance(module, CastlingSeparableAttention):
        nn.init.ones_(module.context_gain)
        nn.init.zeros_(module.relu_gain)
        if module.context_query is not None:
            nn.init.zeros_(module.context_query)
    elif isinstance(module, _DWConv):
        nn.init.zeros_(module.conv.weight)
