#!/usr/bin/env python
"""Per-layer study of attention forms on the real DINOv2-S/14 (issue 25, DESIGN.md §2 "Beyond the linear terms").

Stage 1's machinery on cached teacher hidden states: every attention layer of the teacher is replaced by a
candidate form built around the layer's own pretrained projections (``qkv``, ``proj``), fitted alone to the
layer's softmax output on the teacher's own inputs, and judged on **held-out crops** (other wallpaper
pictures than the ones fitted on; the 12 evaluation photos of ``castle-convert eval`` are never used here,
nor scikit-image/-learn's sample photos). Error = ``Σ‖student − teacher‖² / Σ‖teacher‖²`` of the attention
module's output.

Every candidate is evaluated here through one dense formulation (the study needs fidelity, not speed): a
softmax over the N keys with per-entry log-weights — exact logits ``q·k·s`` for the keys of the pattern S_i
(prefix tokens, a local window, the top-k tokens of the CLS row), ``log α_h + log sim(q, k)`` for a linear
kernel over the rest, and G×G pooled region keys with ``log(count of region keys outside S_i)`` — so
"one normaliser" over exact, pooled and linear terms is exactly what is computed. The product's kernels
(``castle_convert/attention/functional.py``) compute the chosen pattern without any N×N tensor;
``--stage speed`` measures those.

    python benchmarks/layer_study.py --stage cache                      # teacher states (minutes, once)
    python benchmarks/layer_study.py --stage fit --variants la,win7,pool8,win7+pool8 --layers 1,5,8
    python benchmarks/layer_study.py --stage report                     # the table from the JSON
    python benchmarks/layer_study.py --stage speed [--tuned-malloc]     # MACs and CPU latency of each form
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "layer_study.json"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cache_root() -> Path:
    from castle_convert import zoo
    return zoo.cache_dir() / "study"


# ----------------------------------------------------------------------------------------------------
# data: crops of training wallpapers, split by *picture* into fit / held-out
# ----------------------------------------------------------------------------------------------------
def image_sets(n_fit: int, n_held: int, size: int, seed: int = 0):
    from castle_convert import natural
    train, _ = natural.split_sources()                      # the 12 evaluation photos are not in `train`
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    held_src = [train[i] for i in sorted(order[: max(8, len(train) // 7)])]
    fit_src = [train[i] for i in sorted(order[max(8, len(train) // 7):])]
    fit = natural._make_training_images(n_fit, size, seed, 0.25, train=fit_src)
    held = natural._make_training_images(n_held, size, seed + 1, 0.0, train=held_src)
    return fit, held, [s.name for s in held_src]


def to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def teacher():
    from castle_convert.models import load_model
    return load_model("dinov2_small").eval()


def attention_paths(model) -> list[str]:
    from castle_convert import adapters
    return [c.name for c in adapters.adapter_for(model).scan(model).candidates]


@torch.no_grad()
def capture(model, images: torch.Tensor, batch: int = 16):
    """Per layer: the attention's input (n, N, C) and output (n, N, C), fp16."""
    from castle_convert.distill.transfer import _teacher_states
    paths = attention_paths(model)
    xs = {p: [] for p in paths}
    ys = {p: [] for p in paths}
    for i in range(0, len(images), batch):
        inputs, outputs, _ = _teacher_states(model, paths, images[i:i + batch])
        for p in paths:
            xs[p].append(inputs[p].half())
            ys[p].append(outputs[p].half())
    return {p: torch.cat(xs[p]) for p in paths}, {p: torch.cat(ys[p]) for p in paths}


def stage_cache(args) -> None:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    model = teacher()
    fit, held, held_names = image_sets(args.n_fit, args.n_held, 448, seed=0)
    for size in args.cache_res:
        t0 = time.time()
        out = {"held_sources": held_names}
        for part, imgs in (("fit", fit), ("held", held)):
            if part == "fit" and size not in args.fit_res:
                continue
            n = len(imgs) if part == "held" else min(len(imgs), args.n_fit_at.get(size, len(imgs)))
            x, y = capture(model, to_tensor(imgs[:n], size))
            out[part] = {"x": x, "y": y}
        torch.save(out, root / f"states-{size}.pt")
        print(f"cached {size} px in {time.time() - t0:.0f}s", flush=True)


# ----------------------------------------------------------------------------------------------------
# candidate forms, one dense formulation
# ----------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    form: str = "pattern"          # "pattern" (one normaliser) or "la" (the Castling-ViT form as shipped)
    window: str = "none"           # none | sliding | halo
    w: int = 7                     # sliding window side
    block: int = 4                 # halo: query block side
    halo: int = 2                  # halo: extra key rows/cols each side
    pool: int = 0                  # G: G×G pooled regions (0 = none)
    pool_bias: str = "count"       # count (log of the region keys outside S) | learned (+ per-head bias)
    topk: int = 0                  # the k patch tokens with the largest CLS attention (per head) stay exact
    lin: str = "none"              # none | angular | hedgehog
    lin_mode: str = "rest"         # rest (keys outside S) | full (every key)
    dw: bool = False               # + zero-initialised 3×3 depthwise conv of V (as the Castling form)
    sinks: int = 0                 # learned key/value pairs per head
    train: str = "attention"       # attention (qkv + proj + the form's own) | replacement (the form's own only)


def parse_variant(spec: str) -> Variant:
    """``la``, or ``+``-joined parts: ``win7`` (sliding 7×7), ``halo4.2`` (4×4 blocks, halo 2), ``pool8``,
    ``poolL8`` (learned bias), ``top8``, ``ang`` / ``angF`` (angular, rest/full), ``hh`` (hedgehog), ``dw``,
    ``sink4``, ``frozen`` (only the form's own parameters train)."""
    v = Variant(spec)
    if spec == "la":
        v.form = "la"
        v.dw = True
        return v
    for part in spec.split("+"):
        if part.startswith("win"):
            v.window, v.w = "sliding", int(part[3:])
        elif part.startswith("halo"):
            b, _, h = part[4:].partition(".")
            v.window, v.block, v.halo = "halo", int(b), int(h or 0)
        elif part.startswith("poolL"):
            v.pool, v.pool_bias = int(part[5:]), "learned"
        elif part.startswith("pool"):
            v.pool = int(part[4:])
        elif part.startswith("top"):
            v.topk = int(part[3:])
        elif part in ("ang", "angF"):
            v.lin, v.lin_mode = "angular", "full" if part == "angF" else "rest"
        elif part in ("hh", "hhF"):
            v.lin, v.lin_mode = "hedgehog", "full" if part == "hhF" else "rest"
        elif part == "dw":
            v.dw = True
        elif part.startswith("sink"):
            v.sinks = int(part[4:])
        elif part == "frozen":
            v.train = "replacement"
        elif part == "prefix":
            pass
        else:
            raise SystemExit(f"unknown variant part {part!r} in {spec!r}")
    return v


def window_mask(H: int, W: int, v: Variant) -> torch.Tensor:
    """(M, M) bool: patch query i may see patch key j exactly (row-major grid)."""
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    if v.window == "none":
        return torch.zeros(H * W, H * W, dtype=torch.bool)
    if v.window == "sliding":
        r = v.w // 2
        return ((ys[:, None] - ys[None]).abs() <= r) & ((xs[:, None] - xs[None]).abs() <= r)
    by, bx = ys // v.block, xs // v.block                                   # query block of each token
    y0, x0 = by * v.block - v.halo, bx * v.block - v.halo
    y1, x1 = by * v.block + v.block - 1 + v.halo, bx * v.block + v.block - 1 + v.halo
    return (ys[None] >= y0[:, None]) & (ys[None] <= y1[:, None]) & (xs[None] >= x0[:, None]) & (xs[None] <= x1[:, None])


def regions(H: int, W: int, G: int) -> torch.Tensor:
    """(G·G, M) one-hot: region of each patch token, rows/cols split as floor(y·G/H) (G ≥ grid: one token each)."""
    gy, gx = min(G, H), min(G, W)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    r = (ys.flatten() * gy // H) * gx + xs.flatten() * gx // W
    return F.one_hot(r, gy * gx).T.float()


class DenseForm(nn.Module):
    """A candidate form around one layer's pretrained ``qkv`` / ``proj`` (copied: each fit is independent)."""

    def __init__(self, spec, v: Variant):
        super().__init__()
        import copy
        self.v = v
        self.h, self.d, self.P = spec.num_heads, spec.head_dim, spec.num_prefix_tokens
        self.scale = spec.scale
        self.qkv = copy.deepcopy(spec.qkv).float()
        self.proj = copy.deepcopy(spec.proj).float()
        C = self.h * self.d
        dev = self.qkv.weight.device
        self.log_alpha = nn.Parameter(torch.zeros(self.h, device=dev))         # linear term weight (per head)
        self.alpha_init = False
        self.pool_b = nn.Parameter(torch.zeros(self.h, device=dev))            # learned pooled-logit bias
        self.gamma = nn.Parameter(torch.ones(self.h, device=dev))              # la: output scale
        self.hh = nn.Parameter(torch.eye(self.d, device=dev).repeat(self.h, 1, 1))   # hedgehog map (h, d, d)
        self.sink_k = nn.Parameter(torch.zeros(self.h, max(v.sinks, 0), self.d, device=dev))
        self.sink_v = nn.Parameter(torch.zeros(self.h, max(v.sinks, 0), self.d, device=dev))
        self.sink_b = nn.Parameter(torch.full((self.h, max(v.sinks, 0)), -10.0, device=dev))
        self.dwconv = nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False) if v.dw else None
        if self.dwconv is not None:
            nn.init.zeros_(self.dwconv.weight)
        self._geo: dict = {}

    def own_parameters(self) -> list[nn.Parameter]:
        v = self.v
        ps = []
        if v.form == "la":
            ps.append(self.gamma)
        if v.lin != "none":
            ps.append(self.log_alpha)
        if v.lin == "hedgehog":
            ps.append(self.hh)
        if v.pool and v.pool_bias == "learned":
            ps.append(self.pool_b)
        if v.sinks:
            ps += [self.sink_k, self.sink_v, self.sink_b]
        if self.dwconv is not None:
            ps += list(self.dwconv.parameters())
        return ps

    def parameters_to_train(self) -> list[nn.Parameter]:
        ps = self.own_parameters()
        if self.v.train == "attention":
            ps += list(self.qkv.parameters()) + list(self.proj.parameters())
        return ps

    def geometry(self, H: int, W: int, device):
        key = (H, W)
        if key not in self._geo:
            v, P = self.v, self.P
            M = H * W
            N = M + P
            exact = torch.zeros(N, N, dtype=torch.bool)
            exact[:P] = True                                                     # prefix queries: every key
            exact[:, :P] = True                                                  # prefix keys: every query
            exact[P:, P:] = window_mask(H, W, v)
            A = regions(H, W, v.pool) if v.pool else None                        # (R, M)
            self._geo[key] = (exact.to(device), None if A is None else A.to(device))
        return self._geo[key]

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, _ = x.shape
        h, d, P = self.h, self.d, self.P
        qkv = self.qkv(x.float()).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, vv = qkv.unbind(0)                                                  # (B, h, N, d)
        if self.v.form == "la":
            out = self._la(q, k, vv)
        else:
            out = self._pattern(q, k, vv, grid)
        out = out.transpose(1, 2).reshape(B, N, h * d)                            # (B, N, C)
        if self.dwconv is not None:
            H, W = grid
            t = vv.transpose(1, 2).reshape(B, N, h * d)[:, P:].reshape(B, H, W, -1).permute(0, 3, 1, 2)
            t = self.dwconv(t).permute(0, 2, 3, 1).reshape(B, H * W, -1)
            out = out + F.pad(t, (0, 0, P, 0))
        return self.proj(out)

    def _la(self, q, k, v):
        from castle_convert.attention.functional import angular_linear
        N = q.shape[-2]
        return self.gamma.view(1, -1, 1, 1) * angular_linear(q, k, v, 1e-6, ref_tokens=N)

    def _kernel(self, q, k):
        """log sim(q_i, k_j) (B, h, N, N) of the linear term."""
        if self.v.lin == "angular":
            s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            return torch.log(0.5 + s / math.pi)
        fq = self._hh(q)
        fk = self._hh(k)
        return torch.log((fq @ fk.transpose(-2, -1)).clamp_min(1e-12))

    def _hh(self, x):
        z = torch.einsum("bhnd,hde->bhne", x * self.scale ** 0.5, self.hh)
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)

    def _pattern(self, q, k, v, grid):
        B, h, N, d = q.shape
        P = self.P
        H, W = grid
        exact, A = self.geometry(H, W, q.device)
        logits = (q * self.scale) @ k.transpose(-2, -1)                           # (B, h, N, N)
        keep = exact.expand(B, h, N, N)
        if self.v.topk:                                                           # CLS attention's top-k patches
            cls_row = logits[:, :, 0, P:]                                         # (B, h, M)
            idx = cls_row.topk(min(self.v.topk, N - P), dim=-1).indices + P
            top = torch.zeros(B, h, N, dtype=torch.bool, device=q.device).scatter_(2, idx, True)
            keep = keep | top[:, :, None, :]
        neg = torch.finfo(logits.dtype).min
        parts_l = [logits.masked_fill(~keep, neg)]
        parts_v = [v]
        if self.v.lin != "none":
            ls = self._kernel(q, k)
            if not self.alpha_init:                                               # α: the mean exact logit
                with torch.no_grad():
                    self.log_alpha.copy_(logits.mean(dim=(0, 2, 3)))
                self.alpha_init = True
            lin = self.log_alpha.view(1, h, 1, 1) + ls
            if self.v.lin_mode == "full":
                merged = torch.where(keep, torch.logaddexp(logits, lin), lin)
            else:
                merged = torch.where(keep, logits, lin)
            parts_l[0] = merged
        if A is not None:
            R = A.shape[0]
            counts = A.sum(1)                                                     # (R,)
            kp = (A @ k[:, :, P:]) / counts[:, None]                              # (B, h, R, d)
            vp = (A @ v[:, :, P:]) / counts[:, None]
            covered = keep[..., P:].float() @ A.T                                 # (B, h, N, R) region keys in S_i
            rest = (counts - covered).clamp_min(0)
            lp = (q * self.scale) @ kp.transpose(-2, -1) + torch.log(rest.clamp_min(1e-30))
            lp = lp.masked_fill(rest < 0.5, neg)
            if self.v.pool_bias == "learned":
                lp = lp + self.pool_b.view(1, h, 1, 1)
            if self.v.lin != "none" and self.v.lin_mode == "rest":
                pass                                                              # both describe the rest (study)
            parts_l.append(lp)
            parts_v.append(vp)
        if self.v.sinks:
            ls_ = torch.einsum("bhnd,hsd->bhns", q * self.scale, self.sink_k) + self.sink_b[None, :, None]
            ls_ = ls_.clone()
            ls_[:, :, :P] = neg                                                   # prefix queries stay exact
            parts_l.append(ls_)
            parts_v.append(self.sink_v.unsqueeze(0).expand(B, -1, -1, -1))
        attn = torch.cat(parts_l, -1).softmax(-1)                                 # (B, h, N, N + R + s)
        out = 0
        i = 0
        for pv in parts_v:
            n = pv.shape[-2]
            out = out + attn[..., i:i + n] @ pv
            i += n
        return out                                                                # (B, h, N, d)


def rel_err(model, x, y, grid, batch=16) -> float:
    num = den = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            o = model(x[i:i + batch].float(), grid)
            t = y[i:i + batch].float()
            num += (o - t).pow(2).sum().item()
            den += t.pow(2).sum().item()
    return num / den


def fit_layer(spec, v: Variant, xf, yf, evals: dict, steps: int, lr: float, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    model = DenseForm(spec, v)
    grid_of = lambda n: (int(round(math.sqrt(n - model.P))),) * 2                # noqa: E731
    before = {r: rel_err(model, x, y, grid_of(x.shape[1])) for r, (x, y) in evals.items()}
    params = model.parameters_to_train()
    if not params:                      # nothing to fit (e.g. a pattern with no own parameters, frozen q/k/v)
        steps = 0
        params = [nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    g = torch.Generator().manual_seed(seed)
    grid = grid_of(xf.shape[1])
    t0 = time.time()
    train_loss = []
    for s in range(steps):
        idx = torch.randint(0, len(xf), (batch,), generator=g)
        xb, yb = xf[idx].float(), yf[idx].float()
        o = model(xb, grid)
        loss = (o - yb).pow(2).mean() / yb.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train_loss.append(loss.item())
    after = {r: rel_err(model, x, y, grid_of(x.shape[1])) for r, (x, y) in evals.items()}
    fit_err = rel_err(model, xf[:64], yf[:64], grid)
    return {"before": before, "after": after, "fit_err": fit_err, "seconds": time.time() - t0,
            "train_curve": [float(np.mean(train_loss[i:i + 25])) for i in range(0, steps, 25)]}


def stage_fit(args) -> None:
    root = cache_root()
    loaded = {r: torch.load(root / f"states-{r}.pt", weights_only=False, mmap=True)
              for r in {args.fit_at, *args.eval_res}}                   # memory-mapped: only what is used is read
    fit_states = loaded[args.fit_at]
    evals_at = {r: loaded[r]["held"] for r in args.eval_res}
    model = teacher()
    from castle_convert import adapters
    cands = adapters.adapter_for(model).scan(model).candidates
    specs = {c.name: c.build_spec() for c in cands}
    paths = [c.name for c in cands]
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    torch.set_num_threads(args.threads)
    for layer in args.layers:
        path = paths[layer]
        xf = fit_states["fit"]["x"][path][: args.n_fit].clone()
        yf = fit_states["fit"]["y"][path][: args.n_fit].clone()
        evals = {str(r): (evals_at[r]["x"][path][: args.n_eval].clone(), evals_at[r]["y"][path][: args.n_eval].clone())
                 for r in args.eval_res}
        for spec_str in args.variants:
            key = f"{spec_str}|L{layer}|fit{args.fit_at}|s{args.steps}|n{args.n_fit}|lr{args.lr:g}"
            if key in results and not args.redo:
                print("skip", key, flush=True)
                continue
            v = parse_variant(spec_str)
            r = fit_layer(specs[path], v, xf, yf, evals, args.steps, args.lr, args.batch)
            r.update(variant=spec_str, layer=layer, fit_at=args.fit_at, steps=args.steps, n_fit=args.n_fit,
                     lr=args.lr)
            results[key] = r
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1))
            print(f"L{layer:<2} {spec_str:<28} before " +
                  " ".join(f"{k}:{b:.4f}" for k, b in r["before"].items()) + "  after " +
                  " ".join(f"{k}:{a:.4f}" for k, a in r["after"].items()) +
                  f"  fit {r['fit_err']:.4f}  {r['seconds']:.0f}s", flush=True)


def stage_report(args) -> None:
    results = json.loads(RESULTS.read_text())
    rows: dict = {}
    for key, r in results.items():
        cfg = key.split("|", 2)[2]
        rows.setdefault((r["variant"], cfg), {})[r["layer"]] = r
    layers = sorted({r["layer"] for r in results.values()})
    for res in args.eval_res:
        print(f"\nheld-out error at {res} px after fitting (before in brackets)")
        print(f"{'variant':<30}{'cfg':<22}" + "".join(f"{'L' + str(l):>14}" for l in layers) + f"{'mean':>8}")
        for (var, cfg), by_layer in sorted(rows.items()):
            cells, vals = [], []
            for l in layers:
                r = by_layer.get(l)
                if r is None or str(res) not in r["after"]:
                    cells.append(f"{'-':>14}")
                    continue
                vals.append(r["after"][str(res)])
                cells.append(f"{r['after'][str(res)]:>7.4f}({r['before'][str(res)]:.3f})")
            mean = f"{np.mean(vals):>8.4f}" if vals else ""
            print(f"{var:<30}{cfg:<22}" + "".join(cells) + mean)


def stage_speed(args) -> None:
    """MACs (analytic, as ``torch.utils.flop_counter`` counts them) and CPU latency (median, batch 1, interleaved) of
    the attention mixing alone at DINOv2-S's size (6 heads of 64) for softmax (SDPA), the Castling-ViT form and the
    local-global patterns, at 224 / 518 / 1022 px (patch 14)."""
    import torch.utils.benchmark as tb

    from castle_convert.attention.functional import linear_angular_fused, local_global_attention
    from castle_convert.attention.local_global import local_global_macs
    from castle_convert.runtime import malloc_note, tune_malloc
    if args.tuned_malloc:
        tune_malloc()
    torch.set_num_threads(args.threads)
    h, d = 6, 64
    C = h * d
    forms = {"softmax (SDPA)": None, "linear-angular (Castling-ViT)": "la"}
    for spec in args.patterns:                                   # block.halo.pool.topk
        forms[f"local-global {spec}"] = tuple(int(x) for x in spec.split("."))
    out = {"malloc": malloc_note(), "threads": args.threads, "rows": []}
    print(f"attention mixing only, DINOv2-S geometry (6 heads x 64), batch 1, {args.threads} threads, {malloc_note()}")
    for px in args.speed_res:
        side = px // 14
        N = side * side + 1
        qkv = torch.randn(1, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        gamma = torch.ones(h)
        calls = {}
        for name, form in forms.items():
            if form is None:
                calls[name] = (lambda: F.scaled_dot_product_attention(q, k, v), 2 * N * N * C)
            elif form == "la":
                calls[name] = (lambda: linear_angular_fused(q, k, v, gamma, 1e-6), 2 * N * d * C)
            else:
                b, r, G, T = form
                calls[name] = ((lambda b=b, r=r, G=G, T=T: local_global_attention(q, k, v, d ** -0.5, 1, (side, side),
                                                                                  b, r, G, T)),
                               local_global_macs(N, (side, side), 1, C, b, r, G, T))
        times = {name: [] for name in calls}
        with torch.no_grad():
            for _ in range(args.rounds):                         # interleaved rounds
                for name, (fn, _) in calls.items():
                    m = tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2)
                    times[name].append(m.median * 1e3)
        base = float(np.median(times["softmax (SDPA)"]))
        for name, (_, macs) in calls.items():
            ms = float(np.median(times[name]))
            row = {"px": px, "tokens": N, "form": name, "ms": ms, "ratio": ms / base, "mmacs": macs / 1e6}
            out["rows"].append(row)
            print(f"{px:>5} {N:>6} {name:<32} {ms:>9.2f} ms  x{ms / base:5.3f}  {macs / 1e6:>9.1f} MMAC", flush=True)
    (ROOT / "results" / "attention_speed-cpu.json").write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["cache", "fit", "report", "speed"], required=True)
    ap.add_argument("--patterns", default="8.0.8.32,8.0.8.16,8.0.8.0,4.2.8.32,8.0.16.16,8.0.12.32,8.0.8.64",
                    help="--stage speed: local-global patterns block.halo.pool.topk")
    ap.add_argument("--speed-res", default="224,518,1022")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tuned-malloc", action="store_true", help="--stage speed: castle_convert.runtime.tune_malloc()")
    ap.add_argument("--variants", default="la")
    ap.add_argument("--layers", default="1,5,8")
    ap.add_argument("--fit-at", type=int, default=224)
    ap.add_argument("--eval-res", default="224,448")
    ap.add_argument("--cache-res", default="112,224,448")
    ap.add_argument("--fit-res", default="112,224")
    ap.add_argument("--n-fit", type=int, default=768)
    ap.add_argument("--n-held", type=int, default=96)
    ap.add_argument("--n-eval", type=int, default=48)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--redo", action="store_true")
    args = ap.parse_args()
    args.variants = [s for s in args.variants.split(",") if s]
    args.layers = [int(s) for s in args.layers.split(",") if s]
    args.eval_res = [int(s) for s in args.eval_res.split(",") if s]
    args.cache_res = [int(s) for s in args.cache_res.split(",") if s]
    args.fit_res = [int(s) for s in args.fit_res.split(",") if s]
    args.n_fit_at = {}
    args.patterns = [p for p in args.patterns.split(",") if p]
    args.speed_res = [int(r) for r in args.speed_res.split(",") if r]
    {"cache": stage_cache, "fit": stage_fit, "report": stage_report, "speed": stage_speed}[args.stage](args)


if __name__ == "__main__":
    main()
