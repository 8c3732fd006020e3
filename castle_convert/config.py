"""CastlingConfig: what `convert()` builds, validated before anything is touched."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

COMBINES = ("blend", "sum")
DW_MODES = ("2d", "1d", "none")
GAMMA_INITS = ("calibrate", "one")
AUX_SOURCES = ("student", "teacher")


def error_line(e: BaseException, limit: int = 200) -> str:
    """``"Type: first line of the message"`` — an exception from another library, quoted in a one-line error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit] if text else ''}".rstrip(": ")


def pickle_fix(path, out=None) -> str:
    """How to turn the torch pickle ``path`` into the safetensors file ``out`` (default: next to it), as the end
    of a one-line refusal."""
    from pathlib import Path
    out = out or Path(path).with_suffix(".safetensors")
    return ("convert it to safetensors once, only if you trust the file (unpickling runs any code in it): "
            "python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load('{path}', weights_only=False); sd = sd.get('state_dict', sd); "
            f"st.save_file({{k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, '{out}')\"")


class ModelLoadError(ValueError):
    """The named model cannot be found or loaded; the message says how to fix it (raised by ``castle_convert.models``
    and the built-ins of ``castle_convert.zoo``)."""


class DataError(ValueError):
    """A dataset cannot be found or does not fit the teacher; the message says how to fix it."""


class ConfigError(ValueError):
    """A CastlingConfig (or recipe) field has a value we cannot use."""


@dataclass
class CastlingConfig:
    """Settings of the attention that replaces each softmax self-attention.

    Attributes:
        kind: attention kind, a key of ``castle_convert.attention.KINDS``: ``linear_angular``
            (Castling-ViT, the default) or ``separable`` (MobileViTv2 separable self-attention).
        combine: ``blend`` (``g·AUX + (1-g)·(LIN + DW)`` with LIN the kind's linear attention,
            e.g. ``γ·normalize(LA)``; teacher-equivalent at g=1) or ``sum`` (paper/reference style
            ``γ·normalize(LA + g·AUX) + DW``; ``linear_angular`` only).
        dw: ``2d`` depthwise conv over the patch grid, ``1d`` per-head conv along the token
            sequence (the reference code's layout), or ``none``.
        dw_kernel: kernel size of the depthwise conv (odd).
        gate: initial auxiliary-branch gate g (1 = pure softmax in ``blend``).
        threshold: initial mask threshold, in units of uniform attention 1/N: entries of the
            softmax below ``threshold / N`` are masked out of the auxiliary branch. 0 = keep all.
        gamma_init: ``calibrate`` initialises the kind from the teacher's activations on a
            calibration batch (``linear_angular``: the per-head output scale γ = mean norm of the
            teacher's per-head attention output; ``separable``: the context query = the mean
            query of each head); ``one`` uses no data (γ = 1; the separable context query from
            the query bias).
        aux: what the auxiliary masked-softmax branch computes: ``student`` — softmax of the
            student's own q, k, v (they change in training, so after stage 1 gate 1 is no longer the
            teacher); ``teacher`` — the source attention's own frozen weights (copied at conversion,
            training-only, not in the state dict): gate 1 is exactly the teacher whatever training
            changed, so the anneal hands over from the teacher to the linear form (``blend`` only).
        eps: epsilon of every normalisation.
        ref_tokens: ``linear_angular``: the token count N_ref the global term ``Q̂(K̂ᵀV)`` is
            weighted for; at N tokens it is scaled by ``N_ref / N``, so its balance against ½V
            does not drift with the resolution. None (default): ``convert()`` sets it to the token
            count of the calibration images (the resolution the model is fitted at); 0 = plain sum
            (what checkpoints written before this option compute).
        block, halo, pool: ``local_global`` only (other kinds ignore them): each patch query attends exactly to
            the keys of its ``block``×``block`` block of the patch grid widened by ``halo`` on each side, to the
            prefix tokens, and to ``pool``×``pool`` pooled regions of the grid (one softmax over all of them).
        topk: ``local_global`` only: the ``topk`` patch tokens the first prefix token (CLS) attends to most, per
            head, are exact keys of every query too (0: none; models without prefix tokens have none).
        exact_tokens: ``local_global`` only: an image of at most this many tokens gets plain softmax attention
            (below about 600 tokens it is both cheaper on a CPU and closer to the teacher; 0: never).
    """

    kind: str = "linear_angular"
    combine: str = "blend"
    dw: str = "2d"
    dw_kernel: int = 3
    gate: float = 1.0
    threshold: float = 0.0
    gamma_init: str = "calibrate"
    aux: str = "student"
    eps: float = 1e-6
    ref_tokens: Optional[int] = None
    block: int = 8
    halo: int = 0
    pool: int = 8
    topk: int = 32
    exact_tokens: int = 600
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from castle_convert.attention import KINDS  # registry; lazy to keep config import-light

        def bad(name: str, value: Any, fix: str) -> ConfigError:
            return ConfigError(f"CastlingConfig.{name}={value!r} is invalid: {fix}")

        if self.kind not in KINDS:
            raise bad("kind", self.kind, f"choose one of {sorted(KINDS)}")
        if self.combine not in COMBINES:
            raise bad("combine", self.combine, f"choose one of {list(COMBINES)}")
        if self.dw not in DW_MODES:
            raise bad("dw", self.dw, f"choose one of {list(DW_MODES)}")
        if not isinstance(self.dw_kernel, int) or isinstance(self.dw_kernel, bool) or self.dw_kernel < 1 \
                or self.dw_kernel % 2 == 0:
            raise bad("dw_kernel", self.dw_kernel, "use a positive odd integer such as 3 (2d) or 9 (1d)")
        if not (0.0 <= float(self.gate) <= 1.0):
            raise bad("gate", self.gate, "use a value in [0, 1]")
        if float(self.threshold) < 0.0:
            raise bad("threshold", self.threshold, "use a value >= 0 (in units of 1/N)")
        if self.gamma_init not in GAMMA_INITS:
            raise bad("gamma_init", self.gamma_init, f"choose one of {list(GAMMA_INITS)}")
        if self.aux not in AUX_SOURCES:
            raise bad("aux", self.aux, f"choose one of {list(AUX_SOURCES)}")
        if self.aux == "teacher" and self.combine != "blend":
            raise bad("aux", self.aux, "the teacher's attention is blended at the layer output: use combine='blend'")
        if self.ref_tokens is not None and (not isinstance(self.ref_tokens, int) or isinstance(self.ref_tokens, bool)
                                            or self.ref_tokens < 0):
            raise bad("ref_tokens", self.ref_tokens, "use 0 (plain sum) or a positive token count")
        for name, low, high in (("block", 1, 64), ("halo", 0, 64), ("pool", 1, 64), ("topk", 0, 1024),
                                ("exact_tokens", 0, 1 << 20)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise bad(name, value, f"use an integer from {low} to {high}")
        if not (0.0 < float(self.eps) < 1e-2):
            raise bad("eps", self.eps, "use a small positive value such as 1e-6")
        problem = KINDS[self.kind].config_problem(self)
        if problem is not None:
            name, fix = problem
            raise bad(name, getattr(self, name), fix)
        if self.extra:
            raise ConfigError(f"CastlingConfig got unknown fields {sorted(self.extra)}; "
                              f"valid fields are {self.field_names()}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "CastlingConfig":
        """Build from a plain mapping (recipe section, config.json); unknown keys are errors."""
        data = dict(data or {})
        known = {k: data.pop(k) for k in list(data) if k in cls.field_names()}
        return cls(**known, extra=data)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}
