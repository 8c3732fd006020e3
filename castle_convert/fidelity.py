"""Fidelity where the user deploys: teacher vs converted student on held-out images at several resolutions.

For every resolution: the mean patch-token cosine (what dense heads read: every final token after the
prefix tokens) and the CLS / pooled-embedding cosine between student and teacher; for classifiers also
top-1 agreement with the teacher (and top-1 accuracy where the images have labels); beside them the MACs
ratio and the batch-1 latency ratio measured interleaved in this process (:mod:`castle_convert.bench`).

The images: ``natural`` — the held-out photos of :mod:`castle_convert.natural` (five views each, resized
from the full-size photo to each resolution); any other data spec — its validation split, transformed
at each resolution with the teacher's own data config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from castle_convert import adapters
from castle_convert.runtime import available_memory   # a module global: tests replace it

DEFAULT_RESOLUTIONS = (224, 448, 518)
# images per resolution, one default for `castle-convert eval` and the main job's block (recipe fidelity.max_images):
# the natural set's first 12 views are the centre squares of its 12 held-out photos (views are ordered view by view)
DEFAULT_MAX_IMAGES = 12
MAX_BATCH = 8                 # images per forward when memory allows


class FidelityError(ValueError):
    """A fidelity measurement that cannot run as asked (off-grid or too large a resolution); one line, with the fix."""


@dataclass
class FidelityRow:
    resolution: int
    images: int
    patch_cosine: Optional[float]            # mean over images × patch tokens; None when the model has no tokens
    cls_cosine: float                        # CLS / pooled embedding
    agree: Optional[float] = None            # classifiers: % of student predictions equal to the teacher's
    top1_teacher: Optional[float] = None     # classifiers on labelled images
    top1_student: Optional[float] = None
    macs_ratio: Optional[float] = None       # student / teacher, batch 1
    teacher_ms: Optional[float] = None       # batch-1 median latency, interleaved
    student_ms: Optional[float] = None
    teacher_iqr_ms: Optional[float] = None   # interquartile range of those latencies: how noisy the ratio is
    student_iqr_ms: Optional[float] = None

    @property
    def latency_ratio(self) -> Optional[float]:
        return self.student_ms / self.teacher_ms if self.student_ms and self.teacher_ms else None


@dataclass
class FidelityReport:
    data: str
    rows: list[FidelityRow] = field(default_factory=list)
    device: str = "cpu"
    threads: int = 1

    def to_dict(self) -> dict:
        return {"data": self.data, "device": self.device, "threads": self.threads,
                "rows": [{**asdict(r), "latency_ratio": r.latency_ratio} for r in self.rows]}

    def row(self, resolution: int) -> Optional[FidelityRow]:
        return next((r for r in self.rows if r.resolution == resolution), None)

    def format(self) -> str:
        def f(v, spec=".3f"):
            return "-" if v is None else format(v, spec)
        classify = any(r.agree is not None for r in self.rows)
        head = f"{'res':>5} {'images':>6} {'patch cos':>9} {'CLS cos':>8}"
        head += f" {'agree %':>8} {'top-1 t/s':>13}" if classify else ""
        head += f" {'MACs ratio':>10} {'latency ms teacher/student (±IQR/2)':>35} {'ratio':>6}"
        lines = [f"fidelity to the teacher on held-out images ({self.data}), {self.device}, {self.threads} threads",
                 head]
        for r in self.rows:
            line = f"{r.resolution:>5} {r.images:>6} {f(r.patch_cosine, '.4f'):>9} {f(r.cls_cosine, '.4f'):>8}"
            if classify:
                top = f"{f(r.top1_teacher, '.1f')}/{f(r.top1_student, '.1f')}"
                line += f" {f(r.agree, '.1f'):>8} {top:>13}"
            lat = f"{_ms(r.teacher_ms, r.teacher_iqr_ms)}/{_ms(r.student_ms, r.student_iqr_ms)}"
            line += f" {f(r.macs_ratio):>10} {lat:>35} {f(r.latency_ratio):>6}"
            lines.append(line)
        return "\n".join(lines)

    def write_json(self, path) -> None:
        from pathlib import Path
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def _ms(median: Optional[float], iqr: Optional[float]) -> str:
    if median is None:
        return "-"
    return f"{median:.1f}" + (f"±{iqr / 2:.1f}" if iqr is not None else "")


# -- images ----------------------------------------------------------------------------------------

def _normalize(images_u8: np.ndarray, mean, std) -> torch.Tensor:
    """(V, H, W, 3) uint8 → (V, 3, H, W) float, normalized."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def eval_batches(data_spec: str, teacher: nn.Module, resolution: int, max_images: Optional[int] = None,
                 batch_size: int = MAX_BATCH) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(images (b, C, r, r), labels (b,) or None)`` batches for the fidelity block at ``resolution``: only the
    ``max_images`` asked for are made, one batch at a time (never every view at once)."""
    from castle_convert.data import build_data
    from castle_convert.preprocess import data_config
    if data_spec == "natural":
        from castle_convert import natural
        cfg = data_config(teacher, resolution)
        batch: list[np.ndarray] = []
        for view in natural.iter_held_out_views(resolution, max_images):
            batch.append(view)
            if len(batch) == batch_size:
                yield _normalize(np.stack(batch), cfg.mean, cfg.std), None
                batch = []
        if batch:
            yield _normalize(np.stack(batch), cfg.mean, cfg.std), None
        return
    data = build_data(data_spec, teacher, resolution=resolution, max_eval_samples=max_images, materialize=False,
                      augmentation="none")
    n = len(data.val) if max_images is None else min(max_images, len(data.val))
    for start in range(0, n, batch_size):
        items = [data.val[i] for i in range(start, min(n, start + batch_size))]
        labels = torch.tensor([int(y) for _, y in items]) if data.num_classes else None
        yield torch.stack([x for x, _ in items]), labels


def eval_images(data_spec: str, teacher: nn.Module, resolution: int, max_images: Optional[int] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(images (V, C, r, r), labels (V,) or None)`` for the fidelity block at ``resolution`` (all in memory: small
    resolutions; :func:`measure` takes :func:`eval_batches` one at a time)."""
    parts = list(eval_batches(data_spec, teacher, resolution, max_images))
    labels = [y for _, y in parts]
    return torch.cat([x for x, _ in parts]), (torch.cat(labels) if labels and labels[0] is not None else None)


# -- memory: refuse what the machine cannot hold, before any work ----------------------------------

def _eager_heads(model: nn.Module) -> int:
    """Heads of the attentions in ``model`` that form the N×N attention matrix (eager attention: timm's
    ``fused_attn=False``, transformers' ``attn_implementation="eager"``); 0 when every attention is fused."""
    heads = 0
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "eager":
        vision = getattr(config, "vision_config", None) or config
        heads = int(getattr(vision, "num_attention_heads", 0) or 0)
    for m in model.modules():
        if getattr(m, "fused_attn", True) is False:
            heads = max(heads, int(getattr(m, "num_heads", 0) or 0))
    return heads


def bytes_per_image(model: nn.Module, resolution: int) -> Optional[int]:
    """Estimated peak memory (bytes) of one ``resolution``-px image through ``model``: the pixels, the token
    activations (8 × the widest Linear layer's output per token: measured 5.5 × for timm ViT-S) and, for eager
    attention, the N×N attention matrices of one layer (scores and softmax). None without a ViT backbone."""
    adapter = adapters.adapter_for(model)
    backbones = adapter.scan(model).backbones if adapter is not None else []
    if not backbones:
        return None
    n = backbones[0].tokens(resolution, resolution)
    p = next(model.parameters(), None)
    elem = p.element_size() if p is not None else 4
    width = max((m.out_features for m in model.modules() if isinstance(m, nn.Linear)), default=0)
    pixels = 3 * resolution * resolution * (4 + 1)
    return int(pixels + 8 * n * width * elem + 2 * _eager_heads(model) * n * n * 4)


def check_memory(teacher: nn.Module, student: nn.Module, resolutions: Sequence[int], device: str,
                 name: str = "resolution", fix: str = "use at most {px} px") -> int:
    """The batch size every resolution fits at (at most :data:`MAX_BATCH`), or a :class:`FidelityError` naming the
    first resolution one image of which does not fit in the memory available (as ``name``), and the largest size
    that does (``fix``)."""
    free = available_memory(device)
    need = {r: max(bytes_per_image(teacher, r) or 0, bytes_per_image(student, r) or 0) for r in resolutions}
    if free is None or not any(need.values()):
        return MAX_BATCH
    budget = 0.8 * free
    for r in resolutions:
        if need[r] > budget:
            patch = max(adapters.patch_sizes(teacher) or {1})
            lo, hi = 0, r // patch                            # largest multiple of the patch size that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                fits = max(bytes_per_image(teacher, mid * patch) or 0, bytes_per_image(student, mid * patch) or 0)
                lo, hi = (mid, hi) if fits <= budget else (lo, mid - 1)
            fix = fix.format(px=lo * patch) if lo else "use a machine with more memory"
            raise FidelityError(f"{name} {r} px needs about {need[r] / 2 ** 30:.1f} GiB for one image, more than "
                                f"the {free / 2 ** 30:.1f} GiB of memory available on {device}: {fix} (or free "
                                "memory)")
    return int(max(1, min(MAX_BATCH, budget // max(need.values()))))


# -- model outputs ---------------------------------------------------------------------------------

def _prefix_tokens(model: nn.Module) -> int:
    adapter = adapters.adapter_for(model)
    backbones = adapter.scan(model).backbones if adapter is not None else []
    return backbones[0].num_prefix_tokens if backbones else 1


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
    """``tokens`` (B, N, C) final tokens or None, ``embedding`` (B, C) CLS / pooled, ``logits`` (B, K) or None."""
    from castle_convert.distill.evaluate import embeddings, head_classes
    classify = head_classes(model) is not None
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):       # timm
        feats = model.forward_features(x)
        tokens = feats if feats.ndim == 3 else None
        return {"tokens": tokens, "embedding": model.forward_head(feats, pre_logits=True),
                "logits": model.forward_head(feats) if classify else None}
    base = getattr(model, "base_model", model)
    out = adapters.forward(base, x) if base is not model else adapters.forward(model, x)
    tokens = getattr(out, "last_hidden_state", None)
    logits = None
    if classify:
        logits = getattr(adapters.forward(model, x), "logits", None)
    return {"tokens": tokens, "embedding": embeddings(out), "logits": logits}


@torch.no_grad()
def compare(teacher: nn.Module, student: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
            batch_size: int = MAX_BATCH, bar=None) -> dict:
    """Patch-token and CLS cosines (and top-1 agreement / accuracy for classifiers) of student vs teacher."""
    return compare_batches(teacher, student, ((images[i:i + batch_size], None if labels is None else
                                               labels[i:i + batch_size]) for i in range(0, len(images), batch_size)),
                           bar=bar)


@torch.no_grad()
def compare_batches(teacher: nn.Module, student: nn.Module,
                    batches: Iterable[tuple[torch.Tensor, Optional[torch.Tensor]]], bar=None) -> dict:
    """:func:`compare` over ``(images, labels or None)`` batches, made as they are consumed."""
    teacher.eval()
    student.eval()
    prefix = _prefix_tokens(teacher)
    patch_sum = cls_sum = 0.0
    patch_n = n = agree = correct_t = correct_s = 0
    has_tokens = classify = True
    labelled = False
    for x, y in batches:
        t, s = outputs(teacher, x), outputs(student, x)
        cls_sum += F.cosine_similarity(s["embedding"].float(), t["embedding"].float(), -1).sum().item()
        n += len(x)
        if bar is not None:
            bar.update(len(x))
        if t["tokens"] is not None and s["tokens"] is not None and t["tokens"].shape[1] > prefix:
            cos = F.cosine_similarity(s["tokens"][:, prefix:].float(), t["tokens"][:, prefix:].float(), -1)  # (B, P)
            patch_sum += cos.sum().item()
            patch_n += cos.numel()
        else:
            has_tokens = False
        if t["logits"] is None or s["logits"] is None:
            classify = False
            continue
        pt, ps = t["logits"].argmax(-1), s["logits"].argmax(-1)
        agree += (pt == ps).sum().item()
        if y is not None:
            labelled = True
            y = y.to(pt.device)
            correct_t += (pt == y).sum().item()
            correct_s += (ps == y).sum().item()
    result = {"images": n, "patch_cosine": patch_sum / patch_n if has_tokens and patch_n else None,
              "cls_cosine": cls_sum / max(n, 1)}
    if classify:
        result["agree"] = 100.0 * agree / max(n, 1)
        if labelled:
            result["top1_teacher"] = 100.0 * correct_t / max(n, 1)
            result["top1_student"] = 100.0 * correct_s / max(n, 1)
    return result


def on_grid(model: nn.Module, resolutions: Sequence[int]) -> list[int]:
    """Each resolution rounded down to a multiple of the model's patch size (duplicates dropped)."""
    out: list[int] = []
    for r in resolutions:
        off = adapters.off_patch_grid(model, int(r))
        r = off[1] if off else int(r)
        if r not in out:
            out.append(r)
    return out


def _at(model: nn.Module, resolution: int) -> nn.Module:
    """``model`` itself, or for a fixed-size timm model a copy set to ``resolution`` (transformers models
    interpolate their position embeddings at call time)."""
    if not hasattr(model, "set_input_size"):
        return model
    import copy

    from castle_convert.bench import set_resolution
    model = copy.deepcopy(model)
    set_resolution(model, resolution)
    return model


def _meta_copy(model: nn.Module) -> nn.Module:
    """A shape-only copy of ``model`` on the meta device (``Module.to`` moves in place: never the caller's model)."""
    import copy
    return copy.deepcopy(model).to("meta")


def measure(teacher: nn.Module, student: nn.Module, data_spec: str = "natural",
            resolutions: Sequence[int] = DEFAULT_RESOLUTIONS, *, max_images: Optional[int] = DEFAULT_MAX_IMAGES,
            latency: bool = True, latency_budget_s: float = 10.0, progress: bool = True) -> FidelityReport:
    """The fidelity block: :func:`compare` at every resolution, with MACs and batch-1 latency ratios.
    Every resolution must be a multiple of the model's patch size (:func:`on_grid` rounds them); ``max_images``
    per resolution (None: every image). The progress bar counts images (teacher and student each see them) and
    says when latency is being measured."""
    from tqdm.auto import tqdm

    from castle_convert.bench import benchmark
    bad = [r for r in resolutions if adapters.off_patch_grid(teacher, int(r))]
    if bad:
        p, near = adapters.off_patch_grid(teacher, int(bad[0]))
        raise FidelityError(f"resolution {bad[0]} px is not a multiple of the model's patch size ({p} px): use e.g. "
                            f"{near}")
    device = str(next(student.parameters()).device)
    batch_size = check_memory(teacher, student, [int(r) for r in resolutions], device)   # before any work
    report = FidelityReport(data=data_spec, device=device, threads=torch.get_num_threads())
    with tqdm(desc="fidelity", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for res in resolutions:
            shapes: list[torch.Size] = []

            def batches():
                for x, y in eval_batches(data_spec, teacher, int(res), max_images, batch_size):
                    shapes.append(x.shape)
                    yield x.to(device), None if y is None else y.to(device)
            bar.set_postfix_str(f"{res} px: teacher vs student")
            row = FidelityRow(resolution=int(res), **compare_batches(_at(teacher, int(res)), _at(student, int(res)),
                                                                      batches(), bar=bar))
            if bar.total is None:                    # the first resolution's count, at every resolution
                bar.total = row.images * len(resolutions)
                bar.refresh()
            if not latency:                          # MACs only, counted on the meta device as bench counts them
                one = torch.empty((1, *shapes[0][1:]), device="meta")
                row.macs_ratio = adapters.count_macs(_meta_copy(_at(student, int(res))), one) / \
                    adapters.count_macs(_meta_copy(_at(teacher, int(res))), one)
            else:
                bar.set_postfix_str(f"{res} px: latency, batch 1, interleaved")
                cell = benchmark(teacher, converted=student, resolutions=[int(res)], batches=[1], repeats=10,
                                 min_repeats=2, warmup=1, time_budget_s=latency_budget_s, progress=False,
                                 device=report.device.split(":")[0]).cells[0]
                row.macs_ratio, row.teacher_ms, row.student_ms = cell.macs_ratio, cell.original_ms, cell.castling_ms
                row.teacher_iqr_ms = cell.original_spread_ms[1] - cell.original_spread_ms[0]
                row.student_iqr_ms = cell.castling_spread_ms[1] - cell.castling_spread_ms[0]
            report.rows.append(row)
    return report

