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
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from castle_convert import adapters

DEFAULT_RESOLUTIONS = (224, 448, 518)
# images per resolution, one default for `castle-convert eval` and the main job's block (recipe fidelity.max_images):
# the natural set's first 12 views are the centre squares of its 12 held-out photos (views are ordered view by view)
DEFAULT_MAX_IMAGES = 12


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


def eval_images(data_spec: str, teacher: nn.Module, resolution: int, max_images: Optional[int] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(images (V, C, r, r), labels (V,) or None)`` for the fidelity block at ``resolution``."""
    from castle_convert.data import build_data
    from castle_convert.preprocess import data_config
    if data_spec == "natural":
        from castle_convert import natural
        cfg = data_config(teacher, resolution)
        return _normalize(natural.held_out_views(resolution, max_images), cfg.mean, cfg.std), None
    data = build_data(data_spec, teacher, resolution=resolution, max_eval_samples=max_images, materialize=False,
                      augmentation="none")
    n = len(data.val) if max_images is None else min(max_images, len(data.val))
    items = [data.val[i] for i in range(n)]
    labels = torch.tensor([int(y) for _, y in items]) if data.num_classes else None
    return torch.stack([x for x, _ in items]), labels


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
            batch_size: int = 8, bar=None) -> dict:
    """Patch-token and CLS cosines (and top-1 agreement / accuracy for classifiers) of student vs teacher."""
    teacher.eval()
    student.eval()
    prefix = _prefix_tokens(teacher)
    patch_sum = cls_sum = 0.0
    patch_n = n = agree = correct_t = correct_s = 0
    has_tokens = classify = True
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
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
        if labels is not None:
            y = labels[i:i + batch_size]
            correct_t += (pt == y).sum().item()
            correct_s += (ps == y).sum().item()
    result = {"images": n, "patch_cosine": patch_sum / patch_n if has_tokens and patch_n else None,
              "cls_cosine": cls_sum / max(n, 1)}
    if classify:
        result["agree"] = 100.0 * agree / max(n, 1)
        if labels is not None:
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
    report = FidelityReport(data=data_spec, device=str(next(student.parameters()).device),
                            threads=torch.get_num_threads())
    with tqdm(desc="fidelity", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for res in resolutions:
            images, labels = eval_images(data_spec, teacher, int(res), max_images)
            if bar.total is None:
                bar.total = len(images) * len(resolutions)
                bar.refresh()
            bar.set_postfix_str(f"{res} px: teacher vs student")
            images = images.to(report.device)
            row = FidelityRow(resolution=int(res), **compare(_at(teacher, int(res)), _at(student, int(res)), images,
                                                              None if labels is None else labels.to(report.device),
                                                              bar=bar))
            if not latency:                          # MACs only, counted on the meta device as bench counts them
                one = torch.empty(images[:1].shape, device="meta")
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


class FidelityError(ValueError):
    """The fidelity block cannot be measured as asked (a resolution off the patch grid); the message says what to
    use."""
