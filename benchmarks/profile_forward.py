"""Where the time goes: torch.profiler breakdown of one forward, softmax vs castling.

    python benchmarks/profile_forward.py                          # deit_small, batch 1, 224 and 1024 px, CPU

Self CPU time of every aten op, grouped into categories, for the original timm model (fused
SDPA attention) and its converted inference form; percentages are of each model's own total.
Writes benchmarks/results/profile-<device>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import castle_convert as cc
from castle_convert.attention import KINDS
from castle_convert.bench import set_resolution
from castle_convert.models import resolve_name

ROOT = Path(__file__).resolve().parent

CATEGORIES = [   # (category, aten op names); first match wins, the rest is "other"
    ("linear layers (qkv, proj, MLP, head)", {"aten::addmm", "aten::mm", "aten::linear"}),
    ("softmax attention kernel (SDPA)", {"aten::_scaled_dot_product_flash_attention_for_cpu",
                                         "aten::_scaled_dot_product_efficient_attention",
                                         "aten::_scaled_dot_product_flash_attention",
                                         "aten::_scaled_dot_product_cudnn_attention", "aten::softmax",
                                         "aten::_softmax"}),
    ("linear mixing GEMMs (K̂ᵀV, Q·KV)", {"aten::bmm", "aten::matmul", "aten::baddbmm"}),
    ("norms and scaling (‖q‖, ‖k‖, ‖LA‖, addcdiv)", {"aten::linalg_vector_norm", "aten::clamp_min", "aten::div",
                                                     "aten::addcdiv", "aten::addcmul", "aten::mul",
                                                     "aten::reciprocal", "aten::sum"}),
    ("convolutions (patch embed, DW)", {"aten::mkldnn_convolution", "aten::_convolution",
                                        "aten::convolution", "aten::conv2d", "aten::_slow_conv2d_forward",
                                        "aten::cudnn_convolution"}),
    ("copies, padding, layout", {"aten::copy_", "aten::fill_", "aten::constant_pad_nd", "aten::clone",
                                 "aten::contiguous", "aten::cat", "aten::zeros", "aten::empty"}),
    ("layer norm", {"aten::native_layer_norm", "aten::layer_norm"}),
    ("GELU", {"aten::gelu"}),
    ("residual adds", {"aten::add", "aten::add_"}),
]


def categorise(events) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for e in events:
        if not e.key.startswith("aten::"):
            continue
        cat = next((c for c, names in CATEGORIES if e.key in names), "other")
        out[cat] += e.self_cpu_time_total
    return dict(out)


def profile_model(model, x, iters: int) -> tuple[dict[str, float], float]:
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                model(x)
    cats = categorise(prof.key_averages())
    total = sum(cats.values())
    return {k: v / total * 100 for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}, total / iters / 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small")
    ap.add_argument("--kind", default="linear_angular", choices=sorted(KINDS))
    ap.add_argument("--resolutions", default="224,1024")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    base = timm.create_model(resolve_name(args.model), pretrained=False).eval()
    conv0 = cc.finalize(cc.convert(base, kind=args.kind, gamma_init="one"), force=True)
    report = {"model": args.model, "kind": args.kind, "threads": torch.get_num_threads(), "profiles": []}
    for res in [int(r) for r in args.resolutions.split(",")]:
        x = torch.randn(1, 3, res, res)
        for label, m in (("softmax", base), (args.kind, conv0)):
            set_resolution(m, res)
            cats, ms = profile_model(m, x, args.iters)
            report["profiles"].append({"resolution": res, "model": label, "ms_per_forward_profiled": ms,
                                       "percent": cats})
            print(f"\n{args.model} {label} @ {res}px: {ms:.1f} ms/forward under the profiler")
            for k, v in cats.items():
                print(f"  {v:5.1f}%  {k}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile-cpu.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out / 'profile-cpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
