"""Cost measurement, original softmax model vs converted inference form, in one process.

* :func:`count_macs` (from :mod:`castle_convert.adapters`, where conversion's ``inspect`` uses it
  too) counts multiply-accumulates with ``torch.utils.flop_counter`` (works on meta-device
  models); :func:`mixing_macs` is the analytic count of the token-mixing part that
  the conversion changes, used to check the counter.
* :func:`benchmark` times both models interleaved (``torch.utils.benchmark.Timer``, one call at a time,
  alternating which model goes first), after warm-up, at several resolutions and batch sizes: median and
  interquartile range of latency (``Measurement``), throughput, peak memory, MACs, and the ratio
  converted/original. ``quantize="dynamic-int8"`` times both after
  ``torch.ao.quantization.quantize_dynamic`` (every ``nn.Linear`` → int8 weights, activations
  quantized per call; CPU) and measures what it costs: patch-token and CLS cosine of each int8 model's
  final tokens to its own fp32 form.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from castle_convert import adapters
from castle_convert.adapters import count_macs


class BenchError(ValueError):
    """A benchmark cannot run as asked (device, resolution, model); the message says why."""


QUANTIZE = ("dynamic-int8",)


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantized to int8 (CPU, fbgemm/x86)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # torch deprecates quantized tensors in favour of torchao
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


@torch.no_grad()
def final_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Every final token (B, N, C): timm ``forward_features``, transformers ``last_hidden_state``."""
    if hasattr(model, "forward_features"):
        return model.forward_features(images)
    base = getattr(model, "base_model", model)
    _, h, w = adapters.adapter_for(model).input_size(model)
    return base(pixel_values=images, interpolate_pos_encoding=tuple(images.shape[-2:]) != (h, w)).last_hidden_state


def token_cosines(got: torch.Tensor, ref: torch.Tensor, num_patches: int) -> dict[str, float]:
    """Mean cosine of the patch tokens (the last ``num_patches``) and of the class token (the first)."""
    cos = torch.nn.functional.cosine_similarity(got.float(), ref.float(), dim=-1)      # (B, N)
    return {"patch_cosine": cos[:, -num_patches:].mean().item(), "cls_cosine": cos[:, 0].mean().item()}


def geometry(model: nn.Module, img_size: tuple[int, int]) -> tuple[tuple[int, int], int]:
    """(patch grid, token count) of ``model``'s first ViT backbone for an ``img_size`` image."""
    adapter = adapters.adapter_for(model)
    backbones = adapter.scan(model).backbones if adapter is not None else []
    if not backbones:
        raise BenchError(f"{type(model).__name__} has no ViT backbone with a patch grid")
    bb = backbones[0]
    return bb.grid(*img_size), bb.tokens(*img_size)


def mixing_macs(converted: nn.Module, batch: int, grid: tuple[int, int]) -> tuple[int, int]:
    """Analytic MACs of the token mixing of every converted attention: (softmax, castling).

    Softmax mixing is ``QKᵀ`` and ``AV``: ``2·N²·C`` per layer; each castling kind states its own
    (``mixing_macs(num_tokens, grid)`` of its inference form). Everything else in the network is
    unchanged by the conversion, so ``count_macs(original) - count_macs(converted)`` must equal
    the difference of the two.
    """
    from castle_convert.convert import castling_modules

    soft = cast = 0
    for _, m in castling_modules(converted):
        n = grid[0] * grid[1] + m.num_prefix_tokens
        soft += batch * 2 * n * n * m.num_heads * m.head_dim
        cast += batch * m.mixing_macs(n, grid)
    return soft, cast


# -- measurement helpers -------------------------------------------------------------------------

def peak_memory_mib(fn: Callable[[], Any], model: nn.Module, device: torch.device) -> Optional[float]:
    """Peak memory of one call in MiB, parameters included.

    CUDA: the caching allocator's peak. CPU: the peak of live tensors (parameters + activations)
    tracked by ``torch.distributed._tools.mem_tracker.MemTracker``; scratch buffers allocated inside
    fused kernels are invisible to it. None when it cannot be measured.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            fn()
        return tracker.get_tracker_snapshot("peak")[device]["Total"] / 2**20
    except Exception:                                   # private API: report "not measured"
        return None


def set_resolution(model: nn.Module, size: int) -> None:
    """Resize a model's expected input (timm: ``set_input_size``; transformers interpolate at call)."""
    if hasattr(model, "set_input_size"):
        model.set_input_size(img_size=(size, size))
        return
    if hasattr(getattr(model, "embeds", None), "pos_embed_grid_size"):
        return                         # timm NaFlexVit: resizes its position embedding for each call's grid
    if adapters.adapter_for(model) is None or getattr(model, "config", None) is None:
        raise BenchError(f"{type(model).__name__} cannot change its input size; benchmark it at its "
                         "native resolution")


# -- the benchmark -------------------------------------------------------------------------------

@dataclass
class Cell:
    """One (resolution, batch) measurement of both models."""

    resolution: int
    batch: int
    tokens: int
    repeats: int
    original_ms: float
    castling_ms: float
    original_spread_ms: tuple[float, float]       # (25th, 75th) percentile
    castling_spread_ms: tuple[float, float]
    original_throughput: float                     # images / s
    castling_throughput: float
    original_peak_mib: Optional[float]
    castling_peak_mib: Optional[float]
    original_macs: int
    castling_macs: int
    mixing_macs_analytic: tuple[int, int]          # (softmax, castling) token mixing
    macs_check: bool                               # counted difference == analytic difference
    quantize: Optional[str] = None                 # both models timed after this quantization
    fidelity: Optional[dict] = None                # int8 vs fp32 final tokens: {"castling": {...}, "original": {...}}

    @property
    def ratio(self) -> float:
        return self.castling_ms / self.original_ms

    @property
    def macs_ratio(self) -> float:
        return self.castling_macs / self.original_macs


@dataclass
class BenchResult:
    model: str
    kind: str
    device: str
    threads: int
    dtype: str
    compiled: bool
    cells: list[Cell] = field(default_factory=list)
    quantize: Optional[str] = None
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        for c, cell in zip(d["cells"], self.cells):
            c["ratio"] = cell.ratio
            c["macs_ratio"] = cell.macs_ratio
        return d

    def format_table(self) -> str:
        lines = [f"model: {self.model}   attention: {self.kind}   device: {self.device}   "
                 f"threads: {self.threads}   dtype: {self.dtype}" + ("   torch.compile" if self.compiled else "")
                 + (f"   quantized: {self.quantize} (both models)" if self.quantize else ""),
                 f"{'res':>5} {'batch':>5} {'tokens':>6} {'softmax ms':>16} {'castling ms':>16} "
                 f"{'ratio':>6} {'MACs ratio':>10} {'img/s':>13} {'peak MiB':>13}"]
        for c in self.cells:
            def ms(m, s):
                return f"{m:8.1f} ±{(s[1] - s[0]) / 2:5.1f}"

            def mem(x):
                return "   -" if x is None else f"{x:6.0f}"
            lines.append(
                f"{c.resolution:>5} {c.batch:>5} {c.tokens:>6} {ms(c.original_ms, c.original_spread_ms):>16} "
                f"{ms(c.castling_ms, c.castling_spread_ms):>16} {c.ratio:6.3f} {c.macs_ratio:10.3f} "
                f"{c.original_throughput:6.1f}/{c.castling_throughput:<6.1f} "
                f"{mem(c.original_peak_mib)}/{mem(c.castling_peak_mib)}")
        if self.quantize:
            lines.append(f"{self.quantize} fidelity to the fp32 form (cosine of the final tokens, patch / CLS):")
            for c in self.cells:
                f = c.fidelity or {}
                lines.append(f"{c.resolution:>5} {c.batch:>5}  castling {f['castling']['patch_cosine']:.5f} / "
                             f"{f['castling']['cls_cosine']:.5f}   softmax {f['original']['patch_cosine']:.5f} / "
                             f"{f['original']['cls_cosine']:.5f}")
        bad = [c for c in self.cells if not c.macs_check]
        lines.append("MACs: counted by torch.utils.flop_counter; token-mixing difference "
                     + ("matches the analytic count in every row" if not bad else
                        f"does NOT match the analytic count at {[(c.resolution, c.batch) for c in bad]}"))
        lines.append("ratio = castling / softmax median latency, measured interleaved in this process; "
                     "± = half the interquartile range")
        return "\n".join(lines)


def _quartiles(m: Any) -> tuple[float, float]:
    """(25th, 75th) percentile of a ``torch.utils.benchmark.Measurement``'s times, in seconds (its own ``iqr``)."""
    q = torch.tensor(m.times, dtype=torch.float64).quantile(torch.tensor([0.25, 0.75], dtype=torch.float64))
    return float(q[0]), float(q[1])


def benchmark(model: nn.Module, *, converted: Optional[nn.Module] = None, resolutions: Sequence[int] = (224,),
              batches: Sequence[int] = (1,), device: str = "cpu", threads: Optional[int] = None,
              repeats: int = 10, min_repeats: int = 3, warmup: int = 2, time_budget_s: float = 30.0,
              dtype: str = "float32", compile: bool = False, kind: Optional[str] = None,
              keep_softmax: Optional[Sequence[int]] = None, quantize: Optional[str] = None,
              model_name: Optional[str] = None, progress: bool = True) -> BenchResult:
    """Time ``model`` (softmax) against its converted inference form at each resolution × batch.

    ``converted`` defaults to ``finalize(convert(model, kind=kind, gamma_init="one"))`` (speed does
    not depend on the weights). Each cell: ``warmup`` calls of each model, then up to ``repeats``
    interleaved calls (fewer, but at least ``min_repeats``, when a cell would take longer than
    ``time_budget_s``), alternating which model goes first.
    """
    from tqdm.auto import tqdm

    from castle_convert.convert import _model_name, convert, finalize

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"device {device!r} is not supported: use cpu or cuda")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if dt is None:
        raise BenchError(f"dtype {dtype!r} is not supported: use float32, bfloat16 or float16")
    if quantize is not None and quantize not in QUANTIZE:
        raise BenchError(f"--quantize {quantize!r} is not supported: use {', '.join(QUANTIZE)}")
    if quantize and (dev.type != "cpu" or dt != torch.float32 or compile):
        raise BenchError(f"--quantize {quantize} quantizes float32 Linear layers for the CPU: use --device cpu "
                         "--dtype float32, without --compile")
    if threads:
        torch.set_num_threads(int(threads))
    if adapters.adapter_for(model) is None:
        raise BenchError(f"{type(model).__name__} is not a timm or transformers ViT")
    grid = {int(r): adapters.off_patch_grid(model, int(r)) for r in resolutions}
    bad = [r for r, off in grid.items() if off]
    if bad:
        p = grid[bad[0]][0]
        raise BenchError(f"resolution {bad[0]} px is not a positive multiple of the model's patch size ({p} px): "
                         f"use e.g. --resolutions {','.join(str(off[1] if off else r) for r, off in grid.items())}")
    model = model.eval()
    if converted is None:
        converted = finalize(convert(model, kind=kind, gamma_init="one", keep_softmax=keep_softmax), force=True)
    converted = converted.eval()
    cfg = getattr(converted, "castling_config", None)
    result = BenchResult(model=model_name or _model_name(model), kind=getattr(cfg, "kind", kind or "?"),
                         device=str(dev), threads=torch.get_num_threads(), dtype=dtype, compiled=compile,
                         versions={"torch": torch.__version__}, quantize=quantize)
    cells = [(r, b) for r in resolutions for b in batches]
    bar = tqdm(cells, desc="bench", unit="cell", disable=not progress, dynamic_ncols=True)
    for res, batch in bar:
        bar.set_postfix_str(f"{res}px batch {batch}")
        result.cells.append(_cell(model, converted, res, batch, dev, dt, repeats, min_repeats, warmup,
                                  time_budget_s, compile, quantize))
        bar.set_postfix_str(f"{res}px batch {batch}: ratio {result.cells[-1].ratio:.3f}")
    return result


def _cell(model: nn.Module, converted: nn.Module, res: int, batch: int, dev: torch.device, dt: torch.dtype,
          repeats: int, min_repeats: int, warmup: int, budget: float, compile: bool,
          quantize: Optional[str] = None) -> Cell:
    orig, conv = copy.deepcopy(model), copy.deepcopy(converted)
    for m in (orig, conv):
        set_resolution(m, res)
    c, _, _ = adapters.adapter_for(orig).input_size(orig)
    meta_x = torch.empty(batch, c, res, res, device="meta")
    macs_o = count_macs(copy.deepcopy(orig).to("meta"), meta_x)
    macs_c = count_macs(copy.deepcopy(conv).to("meta"), meta_x)
    grid, tokens = geometry(orig, (res, res))
    soft, cast = mixing_macs(conv, batch, grid)
    check = abs((macs_o - macs_c) - (soft - cast)) <= max(1, 1e-6 * macs_o)
    orig, conv = orig.to(dev, dt), conv.to(dev, dt)
    x = torch.randn(batch, c, res, res, generator=torch.Generator().manual_seed(0)).to(dev, dt)
    fidelity = None
    if quantize:                  # time the int8 forms; fidelity: each int8 model against its own fp32 form
        fidelity = {}
        for name, fp32 in (("castling", conv), ("original", orig)):
            q = quantize_dynamic_int8(fp32)
            fidelity[name] = token_cosines(final_tokens(q, x), final_tokens(fp32, x), grid[0] * grid[1])
            if name == "castling":
                conv = q
            else:
                orig = q
    from torch.utils.benchmark import Measurement, Timer

    calls = []
    for m in (orig, conv):
        fn = torch.compile(m) if compile else m
        calls.append(lambda fn=fn: adapters.forward(fn, x))
    # torch.utils.benchmark: its timer synchronises CUDA, its Measurement keeps the times; one call per timeit, so
    # the two models stay interleaved (alternating which goes first) and share every disturbance of the machine
    timers = [Timer("call()", globals={"call": call}, num_threads=torch.get_num_threads(), label=f"{res}px b{batch}",
                    description=name) for call, name in zip(calls, ("softmax", "castling"))]
    runs: list[list] = [[], []]
    peaks: list[Optional[float]] = [None, None]
    with torch.inference_mode():
        for i, timer in enumerate(timers):
            timer.timeit(max(1, warmup))                       # warm-up, not kept
            # int8 packed weights are opaque to the CPU memory tracker: not measured rather than wrong
            peaks[i] = None if quantize and dev.type == "cpu" else peak_memory_mib(calls[i], (orig, conv)[i], dev)
        pair = [timer.timeit(1) for timer in timers]
        n = max(min_repeats, min(repeats, int(budget // max(pair[0].median + pair[1].median, 1e-9))))
        for rep in range(n):
            for i in ((0, 1) if rep % 2 == 0 else (1, 0)):
                runs[i].append(timers[i].timeit(1))
    measured = [Measurement.merge(r)[0] for r in runs]
    med = [m.median * 1e3 for m in measured]
    spread = [tuple(q * 1e3 for q in _quartiles(m)) for m in measured]
    return Cell(resolution=res, batch=batch, tokens=tokens, repeats=n,
                original_ms=med[0], castling_ms=med[1],
                original_spread_ms=spread[0], castling_spread_ms=spread[1],
                original_throughput=batch * 1e3 / med[0], castling_throughput=batch * 1e3 / med[1],
                original_peak_mib=peaks[0], castling_peak_mib=peaks[1],
                original_macs=macs_o, castling_macs=macs_c, mixing_macs_analytic=(soft, cast),
                macs_check=check, quantize=quantize, fidelity=fidelity)


def load_pair(spec: str, *, arch: Optional[str] = None, kind: Optional[str] = None
              ) -> tuple[nn.Module, Optional[nn.Module]]:
    """(original, converted-or-None) for a MODEL argument.

    A castle-convert output directory gives its converted model (its own weights) and the
    source architecture it was converted from (random weights: speed does not depend on them);
    anything else is loaded by :func:`castle_convert.models.load_model` and converted later.
    """
    import json
    from pathlib import Path

    from castle_convert.models import load_model

    path = Path(spec).expanduser()
    cfg_file = path / "config.json"
    if path.is_dir() and cfg_file.is_file() and "castling" in cfg_file.read_text(errors="replace"):
        from castle_convert.export.load import CheckpointError, full_source, load, read_config
        from castle_convert.export.source import build_source
        config = read_config(path)
        saved_kind = config["castling"].get("kind")
        if kind and kind != saved_kind:
            raise BenchError(f"{path} holds a converted model with attention kind '{saved_kind}'; drop "
                             f"--attention {kind}, or bench the original model with it")
        converted = load(path)
        try:
            return build_source(full_source(config)).eval(), converted
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot rebuild the source architecture in {cfg_file}: {e}") from None
    return load_model(spec, arch=arch, pretrained=False), None


def plot(result: BenchResult, path: str) -> None:
    """Latency against token count, both models, one panel per batch size (log-log)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        raise BenchError("--plot needs matplotlib: pip install matplotlib") from e
    batches = sorted({c.batch for c in result.cells})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        cells = sorted((c for c in result.cells if c.batch == b), key=lambda c: c.tokens)
        n = [c.tokens for c in cells]
        ax.errorbar(n, [c.original_ms for c in cells], fmt="o-", label="softmax (original)",
                    yerr=[[c.original_ms - c.original_spread_ms[0] for c in cells],
                          [c.original_spread_ms[1] - c.original_ms for c in cells]])
        ax.errorbar(n, [c.castling_ms for c in cells], fmt="s-", label=f"castling ({result.kind})",
                    yerr=[[c.castling_ms - c.castling_spread_ms[0] for c in cells],
                          [c.castling_spread_ms[1] - c.castling_ms for c in cells]])
        for c in cells:
            ax.annotate(f"{c.resolution}px", (c.tokens, c.original_ms), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(n, [str(t) for t in n])
        ax.set_xlabel("tokens")
        ax.set_ylabel("latency (ms, median)")
        ax.set_title(f"{result.model}, batch {b}, {result.device}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["BenchError", "BenchResult", "Cell", "benchmark", "count_macs", "final_tokens", "geometry", "load_pair",
           "mixing_macs", "peak_memory_mib", "plot", "quantize_dynamic_int8", "set_resolution", "token_cosines"]
