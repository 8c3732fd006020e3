"""convert / finalize / inspect: walk a model, dispatch to its family adapter, validate first.

Module surgery in the style of PEFT's ``inject_adapter`` and torchao's ``quantize_``; finalize in
the style of timm's ``reparameterize_model`` (each training form knows its inference form).
"""

from __future__ import annotations

import copy
import math
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from castle_convert import adapters
from castle_convert.attention import KINDS, CastlingModule, CastlingTrainingForm
from castle_convert.attention.base import ANNEAL_FIX, NOT_UPDATED_FIX, FinalizeError, NotAnnealedError
from castle_convert.config import CastlingConfig

FilterFn = Callable[[nn.Module, str], bool]     # (module, fqn) -> bool, as torchao's quantize_; see filter_by_name
_NAME_FIRST = ("name", "n", "path")


def filter_by_name(filter_fn: Optional[Callable]) -> Optional[Callable[[str, nn.Module], bool]]:
    """``filter_fn`` as the internals call it, ``(name, module)``.

    Public ``filter_fn`` arguments take ``(module, fqn)`` like torchao's ``quantize_``. A function
    written for castle-convert's earlier ``(name, module)`` order is still accepted, recognised by its
    first parameter alone: named ``name`` / ``n`` / ``path``, or annotated ``str``.
    """
    if filter_fn is None or getattr(filter_fn, "_castle_by_name", False):
        return filter_fn
    import inspect as _pyinspect
    try:
        params = [p for p in _pyinspect.signature(filter_fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    name_first = bool(params) and (params[0].name in _NAME_FIRST or params[0].annotation in (str, "str"))

    def by_name(name: str, module: nn.Module) -> bool:
        return bool(filter_fn(name, module) if name_first else filter_fn(module, name))
    by_name._castle_by_name = True
    return by_name


def _by_name(fn: Callable[[str, nn.Module], bool]) -> Callable[[str, nn.Module], bool]:
    fn._castle_by_name = True
    return fn


class ConversionError(ValueError):
    """The model cannot be converted (as it is); the message says why and what to do."""


# -- helpers -------------------------------------------------------------------------------------

def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return f"{type(model).__name__}" + (f" ({name})" if name else "")


def castling_modules(model: nn.Module) -> Iterator[tuple[str, CastlingModule]]:
    """Every converted attention (training or inference form) with its path."""
    for name, m in model.named_modules():
        if isinstance(m, CastlingModule):
            yield name, m


def training_forms(model: nn.Module) -> list[tuple[str, CastlingTrainingForm]]:
    return [(n, m) for n, m in castling_modules(model) if isinstance(m, CastlingTrainingForm)]


def _require_module(model: Any, call: str) -> None:
    if not isinstance(model, nn.Module):
        hint = (f": build it first, e.g. castle_convert.models.load_model({model!r}) or timm.create_model({model!r})"
                if isinstance(model, str) else "")
        raise TypeError(f"{call}() takes an nn.Module (a timm or transformers ViT), got {type(model).__name__}{hint}")


def set_schedule(model: nn.Module, gate: float, threshold: float = 0.0) -> None:
    """Set the auxiliary gate g_t ∈ [0, 1] and mask threshold τ_t ≥ 0 (units of 1/N) of every training form."""
    _require_module(model, "set_schedule")
    forms = training_forms(model)
    if not forms:
        raise ConversionError(f"{_model_name(model)} has no castling training form: set_schedule applies to "
                              "cc.convert(model) before cc.finalize()")
    if not (isinstance(gate, (int, float)) and 0.0 <= gate <= 1.0):
        raise ValueError(f"gate={gate!r} is invalid: use a value in [0, 1] (1 = the softmax teacher, 0 = linear only)")
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold < math.inf):
        raise ValueError(f"threshold={threshold!r} is invalid: use a finite value >= 0 (units of 1/N)")
    for _, m in forms:
        m.set_schedule(gate, threshold)


def primary_output(out: Any) -> torch.Tensor:
    """Logits (or final features) from a timm tensor / transformers ModelOutput / tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def _resolve_config(config: Union[CastlingConfig, Mapping, None], **overrides: Any) -> CastlingConfig:
    if config is None:
        config = CastlingConfig()
    elif isinstance(config, Mapping):
        config = CastlingConfig.from_dict(config)
    elif not isinstance(config, CastlingConfig):
        raise TypeError(f"config must be a CastlingConfig or a dict, got {type(config).__name__}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "attention" in overrides:                       # alias of kind, as the CLI's --attention
        attention = overrides.pop("attention")
        if overrides.setdefault("kind", attention) != attention:
            raise TypeError(f"attention={attention!r} and kind={overrides['kind']!r} disagree: pass one")
    if overrides:
        config = CastlingConfig.from_dict({**config.to_dict(), **overrides})
    return config


def kept_softmax_paths(model: nn.Module, keep_softmax: list[int], filter_fn: Optional[FilterFn] = None) -> list[str]:
    """Attention paths at ``keep_softmax`` (indices in the model's attention order, as ``inspect``
    lists them); an out-of-range index is an error naming the valid range."""
    adapter = adapters.adapter_for(model)
    if adapter is None or not keep_softmax:
        return []
    filter_fn = filter_by_name(filter_fn)
    names = [c.name for c in adapter.scan(model).candidates if filter_fn is None or filter_fn(c.name, c.module)]
    bad = [i for i in keep_softmax if not 0 <= int(i) < len(names)]
    if bad:
        raise ConversionError(f"keep_softmax {bad} out of range: {_model_name(model)} has {len(names)} attention "
                              f"layers (indices 0..{len(names) - 1})")
    if len(set(keep_softmax)) >= len(names):
        raise ConversionError(f"keep_softmax {sorted(keep_softmax)} keeps every attention layer softmax: "
                              "nothing would be converted")
    return [names[int(i)] for i in keep_softmax]


def _keep_indices(keep_softmax: Any) -> list[int]:
    """``keep_softmax`` as layer indices: a list, or a string such as ``"0,11"`` (not ``auto:K``)."""
    if keep_softmax is None or isinstance(keep_softmax, (list, tuple)):
        return list(keep_softmax or [])
    from castle_convert.recipes import parse_keep_softmax
    indices, auto_k = parse_keep_softmax(keep_softmax)
    if auto_k:
        raise ValueError(f"keep_softmax={keep_softmax!r}: auto:K ranks layers by stage-1 errors, so it applies to a "
                         "distillation recipe (castling.keep_softmax); here pass layer indices such as [0, 11]")
    return indices


def keep_softmax_filter(model: nn.Module, keep_softmax: Optional[list[int]],
                        filter_fn: Optional[FilterFn] = None) -> Optional[FilterFn]:
    """A filter_fn that leaves the attentions at ``keep_softmax`` as softmax (see :func:`kept_softmax_paths`)."""
    filter_fn = filter_by_name(filter_fn)
    kept = set(kept_softmax_paths(model, _keep_indices(keep_softmax), filter_fn))
    if not kept:
        return filter_fn
    return _by_name(lambda name, m: name not in kept and (filter_fn is None or filter_fn(name, m)))


def restore_softmax(student: nn.Module, teacher: nn.Module, paths: list[str]) -> nn.Module:
    """Put the teacher's own softmax attention back at ``paths`` of a converted ``student`` (hybrid
    layers chosen after conversion, e.g. by their stage-1 error). In place; returns ``student``."""
    converted = list(getattr(student, "castling_converted", []))
    missing = [p for p in paths if p not in converted]
    if missing:
        raise ConversionError(f"cannot restore softmax at {missing}: not converted attention paths")
    if len(set(paths)) >= len(converted):
        raise ConversionError("restoring every converted layer would leave no linear attention")
    device = next(student.parameters()).device
    for path in paths:
        student.set_submodule(path, copy.deepcopy(teacher.get_submodule(path)).to(device))
    student.castling_converted = [p for p in converted if p not in set(paths)]
    adapters.pass_grid(student)                   # the blocks holding them again take the grid without using it
    return student


def _plan(model: nn.Module, filter_fn: Optional[FilterFn]):
    """Scan and validate without modifying anything; returns (adapter, scan, candidates)."""
    filter_fn = filter_by_name(filter_fn)
    converted = [n for n, _ in castling_modules(model)]
    if converted:
        raise ConversionError(
            f"{_model_name(model)} is already converted ({len(converted)} castling attention modules, "
            f"e.g. '{converted[0]}'). Convert the original softmax model, or call finalize() on this one.")
    adapter = adapters.adapter_for(model)
    if adapter is None:
        raise ConversionError(
            f"{_model_name(model)} is not a model family castle_convert knows (timm or Hugging Face "
            f"transformers). Supported attention classes: {'; '.join(adapters.supported_classes())}.")
    scan = adapter.scan(model)
    keep = (lambda c: True) if filter_fn is None else (lambda c: filter_fn(c.name, c.module))
    candidates = [c for c in scan.candidates if keep(c)]
    rejected = [r for r in scan.rejected if keep(r)]
    if rejected:
        lines = "\n".join(f"  - {line}" for line in adapters.group_by_reason(rejected))
        raise ConversionError(
            f"{_model_name(model)} has attention modules that cannot be converted to linear attention:\n"
            f"{lines}\nNothing was modified. Use a model with plain softmax self-attention, or pass "
            "filter_fn to convert only the supported modules.")
    if not candidates:
        raise ConversionError(
            f"{_model_name(model)} has no supported attention to convert. Supported attention "
            f"classes: {'; '.join(adapters.supported_classes())}.")
    return adapter, scan, candidates


# -- convert -------------------------------------------------------------------------------------

def convert(model: nn.Module, config: Union[CastlingConfig, Mapping, None] = None, *,
            inplace: bool = False, filter_fn: Optional[FilterFn] = None,
            calibration_inputs: Optional[torch.Tensor] = None, keep_softmax: Optional[list[int]] = None,
            **overrides: Any) -> nn.Module:
    """Replace every softmax self-attention of ``model`` with the Castling training form.

    With the default ``combine='blend'``, ``gate=1`` and ``threshold=0`` the result computes the
    same logits as ``model`` (teacher-equivalent start). Everything is validated before anything
    is modified; with ``inplace=False`` (default) ``model`` itself is never touched.

    Args:
        config: a :class:`CastlingConfig` or dict; keyword ``overrides`` (e.g. ``kind=...``,
            ``combine=...``) replace its fields. ``kind`` picks the attention kind
            (``linear_angular``, default, or ``separable``); ``attention=`` is an alias.
        filter_fn: ``(module, fqn) -> bool`` to convert only some attentions, as torchao's
            ``quantize_`` takes it (``fqn``: the attention's path, e.g. ``blocks.3.attn``); a function
            whose first parameter is named ``name`` (the earlier ``(name, module)`` order) still works.
        keep_softmax: hybrid model: indices of attention layers (in the model's order, as
            ``inspect`` lists them) that stay softmax.
        calibration_inputs: image batch the kind is initialised from (``gamma_init='calibrate'``:
            linear-angular's γ, separable's context query); default: a fixed-seed random batch at
            the model's input size.
    """
    _require_module(model, "convert")
    config = _resolve_config(config, **overrides)
    filter_fn = keep_softmax_filter(model, keep_softmax, filter_fn)
    _plan(model, filter_fn)                                   # raises before any change
    if not inplace:
        model = copy.deepcopy(model)
    adapter, scan, candidates = _plan(model, filter_fn)
    if config.ref_tokens is None and scan.backbones:          # the token count the layers are fitted at
        config = dataclasses.replace(config, ref_tokens=_token_count(model, scan, calibration_inputs))
    kind = KINDS[config.kind]
    for cand in candidates:
        new = kind.from_pretrained_attention(cand.build_spec(), config)
        new.train(cand.module.training)
        model.set_submodule(cand.name, cand.wrap(new))
    adapter.pass_grid(model)                                  # each call's patch grid reaches the new modules
    model.castling_config = config
    model.castling_converted = [c.name for c in candidates]   # paths of the replaced attentions
    if config.gamma_init == "calibrate" and next(model.parameters()).device.type != "meta":
        calibrate(model, calibration_inputs)
    if next(model.parameters()).device.type != "meta":
        for _, m in training_forms(model):
            m.mark_initial()                  # finalize() checks that training moved these
    return model


def _token_count(model: nn.Module, scan, images: Optional[torch.Tensor]) -> int:
    """Tokens of the first backbone for ``images`` (default: the model's own input size)."""
    h, w = images.shape[-2:] if images is not None else adapters.adapter_for(model).input_size(model)[1:]
    return scan.backbones[0].tokens(h, w)


@torch.no_grad()
def calibrate(model: nn.Module, inputs: Optional[torch.Tensor] = None) -> None:
    """Initialise every training form from the teacher's activations on ``inputs``.

    Linear-angular: each head's output scale γ = the mean norm of the teacher's attention output;
    separable: each head's context query = the teacher's mean query. Runs the model once on
    ``inputs`` with every training form passing the softmax (teacher) output through, so each
    layer sees teacher activations (a kind implements ``start_calibration`` / ``finish_calibration``).
    """
    modules = [m for _, m in training_forms(model)]
    if inputs is None:
        inputs = adapters.example_inputs(model, batch=4, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    for m in modules:
        m.start_calibration()
    try:
        adapters.forward(model, inputs)
        for m in modules:
            m.finish_calibration()
    finally:
        for m in modules:
            m._calib = None
        model.train(was_training)


# -- finalize ------------------------------------------------------------------------------------

def _parity_inputs(model: nn.Module) -> torch.Tensor:
    return adapters.example_inputs(model, batch=2, generator=torch.Generator().manual_seed(1234))


@torch.no_grad()
def _eval_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return primary_output(adapters.forward(model, x)).float()
    finally:
        model.train(was_training)


# finalize's parity tolerance (times the output's scale) for the precision the model computes in
PARITY_TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def compute_dtype(model: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype ``model`` computes in: the autocast dtype when autocast is on for ``x``'s device (Accelerate's
    ``mixed_precision``), else its parameters' dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return next(model.parameters()).dtype


def finalize(model: nn.Module, *, inplace: bool = False, check: bool = True,
             atol: Optional[float] = None, inputs: Optional[torch.Tensor] = None, force: bool = False) -> nn.Module:
    """Swap every training form for its inference form and verify parity.

    A training form that never ran a forward with gradients at gate 0 (its linear attention
    never trained: the gate starts at 1, where the linear branch gets exactly zero gradient) is
    refused with :class:`NotAnnealedError` naming the schedule to use (``cc.distill``,
    :class:`GateSchedule`, :class:`CastlingTrainerCallback`); ``force=True`` finalizes anyway
    (e.g. to measure speed, or an untrained conversion on purpose).

    The auxiliary softmax branch, its mask and its schedule state are dropped. The result is
    compared with the training form at gate 0 on a random batch (or ``inputs``), in the precision the model
    computes in (its parameters' dtype, or the autocast dtype when called under autocast, as Accelerate's
    ``mixed_precision`` runs it); if the largest absolute logit difference exceeds ``atol`` (default 1e-4 in
    fp32, 2e-2 in fp16, 5e-2 in bf16, times the largest |output| when that is above 1: a backbone's features are
    larger than logits) a :class:`FinalizeError` is raised and ``model`` is left as it was.
    """
    _require_module(model, "finalize")
    forms = training_forms(model)
    if not forms:
        if any(True for _ in castling_modules(model)):
            raise ConversionError(f"{_model_name(model)} is already finalized (inference form).")
        raise ConversionError(f"{_model_name(model)} has no castling attention: call convert() first.")
    untrained = [n for n, m in forms if not m.trained_at_gate_zero]
    if untrained and not force:
        gates = sorted({f"{m.aux_gate:g}" for _, m in forms})
        raise NotAnnealedError(
            f"finalize: {len(untrained)} of {len(forms)} converted attentions (e.g. '{untrained[0]}') never "
            f"trained at gate 0 (gate now {'/'.join(gates)}), so their linear attention learned nothing and the "
            f"inference form would drop the softmax branch the model computes: {ANNEAL_FIX}")
    stale = [n for n, m in forms if not m.updated_since_convert()]
    if stale and not force:
        raise NotAnnealedError(
            f"finalize: {len(stale)} of {len(forms)} converted attentions (e.g. '{stale[0]}') ran at gate 0 but none "
            f"of their parameters (q/k/v, γ, depthwise conv, ...) changed since convert(), so nothing was trained: "
            f"{NOT_UPDATED_FIX}")
    meta = next(model.parameters()).device.type == "meta"
    check = check and not meta
    reference = None
    if check:
        x = _parity_inputs(model) if inputs is None else inputs
        saved = [(m.aux_gate, m.threshold) for _, m in forms]
        set_schedule(model, 0.0, 0.0)
        try:
            reference = _eval_logits(model, x)
        finally:
            for (_, m), (g, t) in zip(forms, saved):
                m.set_schedule(g, t)
    out = model if inplace else copy.deepcopy(model)
    for name, _ in forms:
        out.set_submodule(name, out.get_submodule(name).to_inference())
    if check:
        got = _eval_logits(out, x)
        diff = (got - reference).abs().max().item()
        dtype = compute_dtype(model, x)
        # relative to the output's scale: logits are O(1), a backbone's features can be O(10)
        scale = max(1.0, reference.abs().max().item()) if torch.isfinite(reference).all() else 1.0
        tol = atol if atol is not None else PARITY_TOL.get(dtype, 2e-2) * scale
        if not diff <= tol:                                       # also catches NaN
            if inplace:
                for name, m in forms:
                    out.set_submodule(name, m)
            raise FinalizeError(
                f"finalize parity check failed: max |Δlogits| = {diff:.3g} > {tol:g} between the "
                "inference form and the training form at gate 0. The model was not changed.")
        out.castling_parity = diff
    return out


# -- PEFT target names ---------------------------------------------------------------------------

# What the pretrained attention's projections are called in a converted model: q/k/v are fused into one
# ``qkv`` Linear (``in_proj`` in the separable inference form, [values | context logits or keys]), the output
# projection is ``proj``. "dense" also names transformers' MLP layers, which keep it.
_LORA_NAMES = {**dict.fromkeys(("q_proj", "k_proj", "v_proj", "query", "key", "value", "qkv", "in_proj"), "qkv"),
               **dict.fromkeys(("o_proj", "out_proj", "proj", "dense"), "proj")}


def lora_targets(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT ``target_modules`` for a converted model, from the names a LoRA config uses on the original.

    ``LoraConfig(target_modules=cc.lora_targets(student, ["q_proj", "v_proj"]))``: q/k/v → ``qkv``
    (one fused projection: LoRA on it adapts q, k and v together) or ``in_proj`` (separable inference
    form); ``o_proj`` / attention ``dense`` → ``proj``. Names the model still has (an MLP ``dense``, a
    hybrid's softmax layers) are kept. An unknown name is an error listing the Linear names there are.
    """
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out: list[str] = []
    for name in names:
        hits = [name] if name in present else []
        mapped = _LORA_NAMES.get(name)
        if mapped == "qkv":
            hits += [n for n in ("qkv", "in_proj") if n in present and n not in hits]
        elif mapped == "proj" and "proj" in present and "proj" not in hits:
            hits.append("proj")
        if not hits:
            raise ValueError(f"lora_targets: no Linear named '{name}' (or a converted counterpart) in "
                             f"{_model_name(model)}; its Linear names are {sorted(present)}")
        out += [h for h in hits if h not in out]
    return out


# -- inspect -------------------------------------------------------------------------------------

@dataclass
class InspectReport:
    model: str
    adapter: str
    input_size: tuple[int, int, int]
    tokens: int
    converted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    kept: list[dict] = field(default_factory=list)        # hybrid: layers that stay softmax
    left_softmax: list[dict] = field(default_factory=list)  # pooling heads / text towers: softmax by design
    layer_macs: list[dict] = field(default_factory=list)  # per attention layer: token-mixing MACs either way
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    error: Optional[str] = None

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)

    def format(self) -> str:
        lines = [f"model:      {self.model}  [{self.adapter} adapter]",
                 f"input:      {self.input_size[0]}x{self.input_size[1]}x{self.input_size[2]}  "
                 f"({self.tokens} tokens)"]
        lines.append(f"converted:  {len(self.converted)} attention modules")
        for c in self.converted:
            lines.append(f"  + {c['name']:<32} {c['class']:<16} heads={c['heads']} head_dim={c['head_dim']} "
                         f"prefix_tokens={c['prefix_tokens']}")
        if self.kept:
            lines.append(f"softmax:    {len(self.kept)} attention modules kept (keep_softmax)")
            lines += [f"  = {c['name']:<32} {c['class']}" for c in self.kept]
        if self.left_softmax:
            lines.append(f"left as softmax: {len(self.left_softmax)} attention modules")
            lines += [f"  = {c['name']:<32} {c['class']}: {c['reason']}" for c in self.left_softmax]
        if self.error:
            lines.append(f"cannot convert: {self.error}")
            return "\n".join(lines)
        ratio = self.macs_after / self.macs_before if self.macs_before else float("nan")
        lines += [
            f"{'':<12}{'original':>14}{'castling':>14}{'ratio':>8}",
            f"{'params':<12}{self.params_before / 1e6:>13.2f}M{self.params_after / 1e6:>13.2f}M"
            f"{self.params_after / max(self.params_before, 1):>8.3f}",
            f"{'MACs':<12}{self.macs_before / 1e9:>13.3f}G{self.macs_after / 1e9:>13.3f}G{ratio:>8.3f}",
        ]
        if self.layer_macs:
            soft = self.layer_macs[0]["softmax"]
            lin = next((m["castling"] for m in self.layer_macs if m["castling"] is not None), None)
            if lin is not None and self.macs_before:
                lines.append(f"each layer kept softmax costs {(soft - lin) / 1e6:+.2f}M MACs "
                             f"({(soft - lin) / self.macs_before:+.2%} of the original) at {self.tokens} tokens "
                             f"(token mixing: softmax {soft / 1e6:.2f}M vs castling {lin / 1e6:.2f}M per layer)")
        return "\n".join(lines)


def inspect(model: nn.Module, config: Union[CastlingConfig, Mapping, None] = None, *,
            img_size: Optional[tuple[int, int]] = None, filter_fn: Optional[FilterFn] = None,
            keep_softmax: Optional[list[int]] = None, **overrides: Any) -> InspectReport:
    """Dry run: what would be converted (and, with ``keep_softmax``, what stays softmax), parameters
    and MACs before and after, and the token-mixing MACs of each layer either way.

    Works on a meta-device copy (shapes only): no weights are needed, nothing is computed,
    ``model`` is not modified.
    """
    _require_module(model, "inspect")
    if img_size is not None and not all(isinstance(v, int) and v > 0 for v in img_size):
        raise ValueError(f"img_size={img_size!r}: use positive (height, width) in pixels")
    config = _resolve_config(config, **overrides)
    filter_fn = filter_by_name(filter_fn)
    meta = copy.deepcopy(model).to("meta")
    try:
        kept_filter = keep_softmax_filter(meta, keep_softmax, filter_fn)
    except ConversionError as e:
        raise ConversionError(str(e)) from None
    adapter = adapters.adapter_for(meta)
    x = adapters.example_inputs(meta, batch=1, img_size=img_size) if adapter else None
    report = InspectReport(model=_model_name(model), adapter=adapter.NAME if adapter else "none",
                           input_size=tuple(x.shape[1:]) if x is not None else (0, 0, 0), tokens=0)
    if adapter is not None:
        scan = adapter.scan(meta)
        for c in scan.candidates:
            spec = c.build_spec()
            if kept_filter is not None and not kept_filter(c.name, c.module):
                if filter_fn is None or filter_fn(c.name, c.module):
                    report.kept.append(dict(name=c.name, **{"class": type(c.module).__name__}))
                continue
            report.converted.append(dict(name=c.name, **{"class": type(c.module).__name__},
                                         heads=spec.num_heads, head_dim=spec.head_dim,
                                         prefix_tokens=spec.num_prefix_tokens))
        report.rejected = [dict(name=r.name, reason=r.reason, **{"class": type(r.module).__name__})
                           for r in scan.rejected]
        report.left_softmax = [dict(name=r.name, reason=r.reason, **{"class": type(r.module).__name__})
                               for r in scan.left_softmax]
        if scan.backbones:
            report.tokens = scan.backbones[0].tokens(x.shape[-2], x.shape[-1])
    report.params_before = sum(p.numel() for p in meta.parameters())
    try:
        converted = finalize(convert(meta, config, inplace=True, filter_fn=kept_filter, gamma_init="one"),
                             inplace=True, check=False, force=True)
    except ConversionError as e:
        report.error = str(e)
        return report
    if scan.backbones:
        grid = scan.backbones[0].grid(x.shape[-2], x.shape[-1])
        mods = dict(castling_modules(converted))
        specs = {k.name: k.build_spec() for k in scan.candidates}
        for c in report.converted + report.kept:
            inner = next((m for n, m in mods.items() if n == c["name"] or n.startswith(c["name"] + ".")), None)
            C = specs[c["name"]].num_heads * specs[c["name"]].head_dim
            report.layer_macs.append(dict(name=c["name"], softmax=2 * report.tokens ** 2 * C,
                                          castling=None if inner is None else inner.mixing_macs(report.tokens, grid)))
    report.macs_before = adapters.count_macs(copy.deepcopy(model).to("meta"), x)
    report.params_after = sum(p.numel() for p in converted.parameters())
    report.macs_after = adapters.count_macs(converted, x)
    return report
