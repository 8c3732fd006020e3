"""Stage 1 — attention transfer on the teacher's own hidden states.

Each converted layer learns to reproduce its softmax layer's output on the inputs the frozen teacher
actually feeds it (DESIGN.md §2, "Converting a pretrained model"). One teacher forward per batch feeds
every layer: forward hooks capture each teacher attention's input and output; the student's converted
module at the same path runs on that input in its inference-equivalent form (gate 0) and is pulled to
that output. The layers do not interact, so no end-to-end backward is needed and it is cheap.

What trains (``train``):
  * ``replacement``: only what the conversion added (linear-angular γ and DW; separable's context
    query, gains and DW);
  * ``qk``: that, plus the query/key rows of the layer's ``qkv`` projection;
  * ``attention``: that, plus the value rows and the output projection (everything inside the layer).

The per-layer normalized residual error ``‖student − teacher‖² / ‖teacher‖²`` on held-out batches is
reported before and after; it is also the sensitivity ranking used by ``keep_softmax: auto:K``.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from castle_convert import adapters
from castle_convert.attention.base import CastlingTrainingForm
from castle_convert.convert import training_forms
from castle_convert.distill.losses import DivergenceError, is_finite
from castle_convert.distill.schedule import lr_scheduler

TRAIN_CHOICES = ("replacement", "qk", "attention")


@dataclass
class TransferResult:
    errors_before: dict[str, float]        # per converted layer, normalized residual error, held-out batches
    errors: dict[str, float]               # the same after stage 1
    steps: int = 0
    images: int = 0
    wall_time_s: float = 0.0
    trainable: int = 0
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"errors_before": self.errors_before, "errors": self.errors, "steps": self.steps,
                "images": self.images, "wall_time_s": self.wall_time_s, "trainable": self.trainable}

    def format(self) -> str:
        lines = [f"{'layer':<40}{'error before':>14}{'after':>10}"]
        for name, after in self.errors.items():
            lines.append(f"{name:<40}{self.errors_before.get(name, float('nan')):>14.4f}{after:>10.4f}")
        return "\n".join(lines)


def _form(module: nn.Module) -> CastlingTrainingForm:
    """The training form inside a converted path (itself, or inside a family shim)."""
    for m in module.modules():
        if isinstance(m, CastlingTrainingForm):
            return m
    raise ValueError(f"{type(module).__name__} holds no castling training form")


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# keyword arguments of a teacher attention's call that the student's layer needs too: the call's RoPE
# (transformers DINOv3: ``position_embeddings=(cos, sin)``, (M, d) each; timm Eva: ``rope`` = [sin | cos],
# (M, 2d) or (heads, M, 2d)), the same for every image of the batch
CALL_KWARGS = ("position_embeddings", "rope")


class _Capture:
    """Forward hooks on the teacher's attentions: their input hidden states, their output, and the call's
    :data:`CALL_KWARGS`."""

    def __init__(self, teacher: nn.Module, paths: list[str]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.call_kwargs: dict[str, dict] = {}
        self.handles = [teacher.get_submodule(p).register_forward_hook(self._hook(p), with_kwargs=True)
                        for p in paths]

    def _hook(self, path: str):
        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
            self.inputs[path] = x.detach()
            self.outputs[path] = _first(out).detach()
            self.call_kwargs[path] = {k: kwargs[k] for k in CALL_KWARGS if kwargs.get(k) is not None}
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def trainable_parameters(student: nn.Module, paths: list[str], train: str) -> list[nn.Parameter]:
    """The parameters stage 1 updates (``train`` in :data:`TRAIN_CHOICES`)."""
    if train not in TRAIN_CHOICES:
        raise ValueError(f"transfer.train={train!r}: choose one of {list(TRAIN_CHOICES)}")
    params: list[nn.Parameter] = []
    for path in paths:
        form = _form(student.get_submodule(path))
        params += form.added_parameters()                                        # what conversion added
        if train in ("qk", "attention"):
            params += list(form.qkv.parameters())
        if train == "attention":
            params += list(form.proj.parameters())
    return params


def _qk_only_hooks(student: nn.Module, paths: list[str]) -> list:
    """``train='qk'``: zero the value rows' gradient of each fused qkv (rows 2C..3C)."""
    handles = []
    for path in paths:
        form = _form(student.get_submodule(path))
        C = form.num_heads * form.head_dim

        def mask(grad: torch.Tensor, C: int = C) -> torch.Tensor:
            grad = grad.clone()
            grad[2 * C:] = 0
            return grad
        handles += [p.register_hook(mask) for p in form.qkv.parameters()]
    return handles


@contextmanager
def _layerwise(student: nn.Module, teacher: nn.Module, paths: list[str]):
    """Both models in eval mode (no dropout), every converted layer at gate 0; restored on exit."""
    forms = [_form(student.get_submodule(p)) for p in paths]
    saved = [(m.aux_gate, m.threshold) for m in forms]
    modes = teacher.training, student.training
    teacher.eval()
    student.eval()
    for m in forms:
        m.set_schedule(0.0, 0.0)
    try:
        yield
    finally:
        for m, (g, t) in zip(forms, saved):
            m.set_schedule(g, t)
        teacher.train(modes[0])
        student.train(modes[1])


def layer_errors(student: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor],
                 paths: Optional[list[str]] = None) -> dict[str, float]:
    """Per converted layer ``Σ‖student(x) − teacher(x)‖² / Σ‖teacher(x)‖²`` over image ``batches``,
    on the teacher's own inputs ``x`` to that layer (the student at gate 0: its inference form)."""
    paths = list(paths or getattr(student, "castling_converted", []))
    num = {p: 0.0 for p in paths}
    den = {p: 0.0 for p in paths}
    device = next(student.parameters()).device
    with torch.no_grad(), _layerwise(student, teacher, paths):
        for images in batches:
            for path, s, t in _layer_outputs(student, teacher, paths, images.to(device)):
                num[path] += (s.float() - t.float()).pow(2).sum().item()
                den[path] += t.float().pow(2).sum().item()
    return {p: num[p] / max(den[p], 1e-12) for p in paths}


def _layer_outputs(student, teacher, paths, images) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    inputs, outputs, call_kwargs = _teacher_states(teacher, paths, images)
    grid = adapters.image_grid(student, images.shape[-2], images.shape[-1])      # these images' patch grid
    for path, out in _student_outputs(student, paths, inputs, grid, call_kwargs):
        yield path, out, outputs[path]


def _teacher_states(teacher, paths, images) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """The teacher's input hidden states (B, N, C), attention outputs (B, N, C) and call keyword arguments
    (:data:`CALL_KWARGS`) at every path, one forward."""
    capture = _Capture(teacher, paths)
    try:
        with torch.no_grad():
            adapters.forward(teacher, images)
    finally:
        capture.remove()
    return capture.inputs, capture.outputs, capture.call_kwargs


def _student_outputs(student, paths, inputs: dict[str, torch.Tensor], grid: tuple[int, int],
                     call_kwargs: Optional[dict] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Each converted layer of ``student`` on the teacher's hidden states ``inputs[path]`` (patch grid ``grid``,
    the teacher call's RoPE in ``call_kwargs[path]``)."""
    for path in paths:
        extra = (call_kwargs or {}).get(path, {})
        yield path, _first(student.get_submodule(path)(inputs[path], grid=grid, **extra))


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """A (normalised) image batch (B, C, H, W) resized to ``size``×``size`` (antialiased when shrinking)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def attention_transfer(teacher: nn.Module, student: nn.Module, batches: Iterable[torch.Tensor], *, steps: int,
                       lr: float = 3e-4, train: str = "attention", weight_decay: float = 0.0, reuse: int = 1,
                       eval_batches: Optional[list[torch.Tensor]] = None, accelerator=None,
                       progress: bool = True, log_every: int = 10,
                       resolutions: Optional[list[int]] = None) -> TransferResult:
    """Train every converted layer of ``student`` to reproduce ``teacher``'s attention output on the
    teacher's own hidden states, for ``steps`` optimizer steps on batches drawn (cyclically) from ``batches``.

    ``reuse``: how many optimizer steps each image's hidden states feed. The teacher runs once on a chunk
    of ``reuse`` batches; its hidden states then feed ``reuse`` passes over the chunk in shuffled batches
    (``reuse²`` steps), so the teacher's cost per step falls by ``reuse`` while every layer still sees
    varied batches. A student layer's forward and backward cost about what the teacher's forward does, so
    ``reuse = 4`` runs about 1.6× the steps of ``reuse = 1`` in the same time (on a quarter of the images).

    The defaults are the ``quick`` recipe's (measured on DINOv2-S, README "Converting a pretrained
    model"). Only stage-1 parameters (see :func:`trainable_parameters`) change; the student's other
    ``requires_grad`` flags are restored afterwards. With an ``accelerator`` of several processes the
    gradients are averaged across processes, so every process holds the same student.
    Returns the per-layer errors on ``eval_batches`` (default: the first batch) before and after.
    ``resolutions``: each chunk's images are resized to the next size of this cycle (multi-resolution fitting:
    a form whose pattern depends on the token count, e.g. ``local_global``, learns at every size it will run at).
    """
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps={steps!r}: use a number of optimizer steps >= 0")
    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise ValueError(f"lr={lr!r}: use a finite learning rate > 0")
    if not (isinstance(reuse, int) and reuse >= 1):
        raise ValueError(f"reuse={reuse!r}: use the number of steps each teacher forward feeds (>= 1)")
    paths = list(getattr(student, "castling_converted", []))
    if not paths:
        raise ValueError("student has no converted attention (castling_converted): pass cc.convert(teacher)")
    device = next(student.parameters()).device
    saved_flags = {id(p): p.requires_grad for p in student.parameters()}
    params = trainable_parameters(student, paths, train)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    hooks = _qk_only_hooks(student, paths) if train == "qk" else []
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = lr_scheduler(optimizer, steps, max(1, steps // 10))          # 10 % warmup, cosine to 0

    def cycle() -> Iterator[torch.Tensor]:
        while True:
            empty = True
            for item in batches:
                empty = False
                yield (item[0] if isinstance(item, (tuple, list)) else item).to(device)
            if empty:
                raise ValueError("attention transfer got no images")

    source = cycle()
    first = next(source)
    eval_batches = [b.to(device) for b in eval_batches] if eval_batches else [first]
    t0 = time.time()
    result = TransferResult(errors_before=layer_errors(student, teacher, eval_batches, paths), errors={},
                            trainable=sum(p.numel() for p in params))
    bar = None
    if progress and (accelerator is None or accelerator.is_local_main_process):
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="stage 1: attention transfer", dynamic_ncols=True)
    shuffle = torch.Generator().manual_seed(0)
    stack = ExitStack()
    chunk: list = []                     # (hidden states, patch grid, shuffled batch indices) of the current chunk
    chunks = 0
    try:
        stack.enter_context(_layerwise(student, teacher, paths))
        for step in range(steps):
            if not chunk:                # the teacher's forward on the next `reuse` batches, then reuse² steps
                images = torch.cat([first if (step == 0 and i == 0) else next(source) for i in range(reuse)])
                if resolutions:
                    images = resize_batch(images, resolutions[chunks % len(resolutions)])
                chunks += 1
                inputs, outputs, call_kwargs = _teacher_states(teacher, paths, images)
                result.images += images.shape[0] * (accelerator.num_processes if accelerator else 1)
                n, b = images.shape[0], images.shape[0] // reuse
                order = torch.cat([torch.randperm(n, generator=shuffle) for _ in range(reuse)]) if reuse > 1 \
                    else torch.arange(n)
                grid = adapters.image_grid(student, images.shape[-2], images.shape[-1])
                chunk = [(inputs, outputs, call_kwargs, grid, order[i:i + b].to(device))
                         for i in range(0, len(order) - b + 1, b)]
            inputs, outputs, call_kwargs, grid, idx = chunk.pop(0)
            sub = {p: inputs[p][idx] for p in paths} if reuse > 1 else inputs
            losses = []
            for path, s in _student_outputs(student, paths, sub, grid, call_kwargs):
                t = outputs[path][idx] if reuse > 1 else outputs[path]
                losses.append((s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12))
            loss = torch.stack(losses).sum()
            if not is_finite(loss, accelerator):
                raise DivergenceError(f"stage 1 (attention transfer) diverged at step {step + 1}: the loss is "
                                      f"{loss.item()} with lr={lr:g}: use a lower transfer.lr (e.g. --set "
                                      f"transfer.lr={lr / 10:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if accelerator is not None and accelerator.num_processes > 1:
                for p in params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
            optimizer.step()
            sched.step()
            result.steps += 1
            if step % log_every == 0 or step == steps - 1:
                row = {"step": step + 1, "loss": loss.item() / len(paths), "lr": sched.get_last_lr()[0]}
                result.history.append(row)
                if bar:
                    bar.set_postfix(err=f"{row['loss']:.4f}")
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
        for h in hooks:
            h.remove()
        optimizer.zero_grad(set_to_none=True)      # the last step's gradients must not reach a later optimizer
        for p in student.parameters():
            p.requires_grad_(saved_flags[id(p)])
        stack.close()
    result.errors = layer_errors(student, teacher, eval_batches, paths)
    result.wall_time_s = time.time() - t0
    return result
