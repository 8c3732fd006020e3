"""Speed table of the README: softmax DeiTs vs their converted inference forms.

    python benchmarks/speed.py                      # CPU: deit_tiny/small/base, 224-1024 px, batch 1
    python benchmarks/speed.py --device cuda        # the same on a GPU (reported separately)

For every model and attention kind, the original (timm, fused SDPA attention) and the converted
inference-only model are timed in the same process, interleaved, after warm-up
(:func:`castle_convert.bench.benchmark`); ratios are only ever taken within one run. Random
weights (speed does not depend on them). Writes benchmarks/results/speed-<device>.json and
prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import timm
import torch

from castle_convert.attention import KINDS
from castle_convert.bench import benchmark, plot
from castle_convert.models import resolve_name

ROOT = Path(__file__).resolve().parent


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="deit_tiny,deit_small,deit_base")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"attention kinds (default: all: {','.join(KINDS)})")
    ap.add_argument("--resolutions", default="224,384,512,768,1024")
    ap.add_argument("--batch", default="1", help="batch sizes, comma-separated")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--time-budget", type=float, default=20.0, help="seconds per cell (at least 3 repeats)")
    ap.add_argument("--out", type=Path, default=ROOT / "results", help="where the JSON and plots go")
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device on this machine", file=sys.stderr)
        return 2
    threads = args.threads or len(os.sched_getaffinity(0))
    kinds = [k for k in args.kinds.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            print(f"unknown attention kind {k!r}: choose from {sorted(KINDS)}", file=sys.stderr)
            return 2
    device_name = (torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine())
    runs = []
    t0 = time.time()
    for name in [m for m in args.models.split(",") if m]:
        arch = resolve_name(name)
        for kind in kinds:
            model = timm.create_model(arch, pretrained=False)
            print(f"\n== {name} ({arch}), {kind}, {args.device} ==", flush=True)
            result = benchmark(model, resolutions=_ints(args.resolutions), batches=_ints(args.batch),
                               device=args.device, threads=threads, repeats=args.repeats,
                               warmup=args.warmup, time_budget_s=args.time_budget, dtype=args.dtype,
                               kind=kind, model_name=name)
            print(result.format_table(), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            plot(result, str(args.out / f"speed-{args.device}-{name}-{kind}.png"))
            runs.append(result.to_dict())
    out = args.out / f"speed-{args.device}.json"
    out.write_text(json.dumps({"device": args.device, "device_name": device_name, "threads": threads,
                               "dtype": args.dtype, "command": " ".join(["python benchmarks/speed.py", *(argv or sys.argv[1:])]),
                               "seconds": round(time.time() - t0), "runs": runs}, indent=2))
    print(f"\nwrote {out}  ({time.time() - t0:.0f} s)\n")
    print(markdown(runs))
    return 0


def markdown(runs: list[dict]) -> str:
    """README table: one row per model × kind × resolution × batch."""
    lines = ["| model | attention | px | batch | tokens | softmax ms | castling ms | latency ratio | MACs ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        for c in run["cells"]:
            lines.append(f"| {run['model']} | {run['kind']} | {c['resolution']} | {c['batch']} | {c['tokens']} | "
                         f"{c['original_ms']:.1f} | {c['castling_ms']:.1f} | **{c['ratio']:.3f}** | "
                         f"{c['macs_ratio']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
