#!/usr/bin/env python
"""Fidelity benchmark: how much accuracy survives conversion + distillation.

The built-in Fashion-MNIST ViT teacher (trained and cached on first use) is converted and distilled
with the ``toy`` recipe; reported per variant: teacher test top-1, student at step 0 (must equal
the teacher), student after distillation in training form at g = 0 and finalized.
Both attention kinds: linear-angular (blend-2d, the default, and its ablations: combine blend vs
sum, DW conv 2-D vs 1-D, each changed alone; sum-1d on request) and separable (MobileViTv2, with
the same default settings: blend, DW 2-D kernel 3).

    python benchmarks/fidelity.py                       # blend-2d, sum-2d, blend-1d, separable: ~19 min on a 2-core CPU
    python benchmarks/fidelity.py --variants blend-2d,separable    # the two kinds side by side
    python benchmarks/fidelity.py --variants blend-2d --set epochs=2

Results are merged into ``--json`` by variant name: variants not run keep their earlier rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LA = ["castling.kind=linear_angular"]
VARIANTS = {
    "blend-2d": LA + ["castling.combine=blend", "castling.dw=2d", "castling.dw_kernel=3"],
    "sum-2d": LA + ["castling.combine=sum", "castling.dw=2d", "castling.dw_kernel=3"],
    "blend-1d": LA + ["castling.combine=blend", "castling.dw=1d", "castling.dw_kernel=9"],
    "sum-1d": LA + ["castling.combine=sum", "castling.dw=1d", "castling.dw_kernel=9"],
    "separable": ["castling.kind=separable", "castling.combine=blend", "castling.dw=2d", "castling.dw_kernel=3"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="blend-2d,sum-2d,blend-1d,separable",
                        help=f"comma list of {list(VARIANTS)} (default: linear-angular's default and its two "
                             "one-factor ablations, and the separable kind)")
    parser.add_argument("--recipe", default="toy")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    parser.add_argument("--eval-every", type=float, default=None,
                        help="evaluate only every this many epochs (default: only at the start and the end)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "fidelity.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    import torch

    from castle_convert import convert, zoo
    from castle_convert.data import build_data
    from castle_convert.distill.loop import distill
    from castle_convert.recipes import load_recipe
    from castle_convert.run import _calibration_batch

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    teacher = zoo.load_builtin("fmnist_vit", progress=not args.no_progress)
    teacher_time = time.time() - t0
    rows = []
    for name in args.variants.split(","):
        name = name.strip()
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
        base = load_recipe(args.recipe)
        cadence = [f"eval_every={args.eval_every or base.epochs}"]      # evaluation does not change training
        recipe = load_recipe(args.recipe, VARIANTS[name] + cadence + args.overrides)
        d = recipe.data
        data = build_data(d.name, teacher, resolution=d.resolution, augmentation=d.augmentation,
                          max_train_samples=d.max_train_samples, max_eval_samples=d.max_eval_samples,
                          seed=recipe.seed)
        student = convert(teacher, recipe.castling.to_config(), calibration_inputs=_calibration_batch(data.train))
        t = time.time()
        r = distill(teacher, student, data, recipe, progress=not args.no_progress)
        rows.append({
            "variant": name, "kind": recipe.castling.kind, "combine": recipe.castling.combine, "dw": recipe.castling.dw,
            "dw_kernel": recipe.castling.dw_kernel, "epochs": recipe.epochs,
            "teacher": r.teacher_eval["top1"], "student_start": r.student_start_eval["top1"],
            "student_start_agree": r.student_start_eval["agree"],
            "train_form_g0": r.student_train_form_eval["top1"], "finalized": r.student_final_eval["top1"],
            "finalized_agree": r.student_final_eval["agree"],
            "delta": r.student_final_eval["top1"] - r.teacher_eval["top1"], "time_s": time.time() - t,
            "recipe": args.recipe, "overrides": args.overrides,
        })
        print(f"[{name}] teacher {rows[-1]['teacher']:.2f}  finalized {rows[-1]['finalized']:.2f}  "
              f"Δ {rows[-1]['delta']:+.2f}  ({rows[-1]['time_s']:.0f}s)", flush=True)

    print("\n| variant | teacher top-1 | student step 0 | student g=0 (training form) | student finalized | Δ vs teacher | agreement | time |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['teacher']:.2f} | {row['student_start']:.2f} | {row['train_form_g0']:.2f} "
              f"| {row['finalized']:.2f} | {row['delta']:+.2f} | {row['finalized_agree']:.2f} | {row['time_s']:.0f}s |")
    print(f"\nteacher: fmnist_vit ({'cached' if teacher_time < 30 else f'trained in {teacher_time:.0f}s'}); "
          f"recipe {args.recipe} {' '.join(args.overrides)}; total {time.time() - t0:.0f}s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": merge_rows(args.json, rows)}, indent=2))
    return 0


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Earlier rows of ``path`` with this run's rows replacing (or appended after) those of the same
    variant. Rows of the older file layout get their run's recipe/overrides and kind filled in."""
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = []
    for row in old.get("rows", []):
        row = {"kind": "linear_angular", "recipe": old.get("recipe"), "overrides": old.get("overrides", []), **row}
        merged.append(row)
    new = {row["variant"]: row for row in rows}
    merged = [new.pop(row["variant"], row) for row in merged]
    return merged + list(new.values())


if __name__ == "__main__":
    sys.exit(main())
